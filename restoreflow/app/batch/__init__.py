"""``restoreflow batch``: restore every file of a folder -- resumable, atomic, and sharded under torchrun.

::

    restoreflow batch IN_DIR --task deblur --out OUT_DIR [--sampler ... --prior ... --steps ... --seed ...]
    torchrun --nproc-per-node 4 --no-python restoreflow batch IN_DIR --task deblur --out OUT_DIR
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m restoreflow.app.batch IN_DIR --task sr --out OUT_DIR --device cuda

How it works:

* **Plan first.** Names, options and compatibility are checked once (:func:`restoreflow.app.api.plan`) before any
  file is read or written; the prior's weights load once per process (cached by device and shape).
* **Inputs** are the files of ``IN_DIR`` matching ``--pattern`` (default: every file with a known image or
  medical suffix), sorted by their path relative to ``IN_DIR``; files under ``OUT_DIR`` are skipped.
  Outputs keep the relative path (and the suffix, unless ``--suffix`` is given) under ``OUT_DIR``.
* **Seeds.** Image ``rel`` is restored with seed ``int.from_bytes(sha256(f"{seed}:{rel}")[:8], "little")
  & (2**63 - 1)`` (``rel`` in POSIX form), so a result depends only on the base seed and the file's relative
  path -- never on the number of processes, the order, or what was done before.
* **Manifest.** Each process appends one JSON line per input to ``OUT_DIR/.manifest-rank<R>.jsonl`` (one
  ``write`` of a whole line on an ``O_APPEND`` file, then ``fsync``; a torn last line from a crash is
  ignored). At the end rank 0 merges every part into ``OUT_DIR/manifest.jsonl`` (sorted by input, written to
  a temporary file and renamed) and deletes the parts. Fields: ``input``, ``output``, ``status`` (ok/error),
  ``error``, ``task``, ``sampler``, ``prior``, ``seed`` (the image's own), ``nfe``, ``seconds``, ``metrics``
  (with ``--simulate``), ``sha256`` of the output file, ``input_sha256`` of the input as read, ``rank``, ``config`` (a fingerprint of the settings)
  and ``finished`` (UTC).
* **Resume.** An input is skipped when a manifest line (merged or part) with status ok and the same settings
  fingerprint names it *and* the input's and the output's current sha256 equal the recorded ``input_sha256``
  and ``sha256`` (an input replaced or an output truncated since is redone); everything else is (re)done. A
  manifest line that is not a valid record is ignored with one warning (a torn last line from a crash
  silently), and its input is redone. Outputs are written
  atomically through the ``save_result`` hook, so an interrupted run leaves no half files and rerunning the
  same command finishes the job. An ``OUT_DIR`` made with other settings is refused unless ``--redo``.
* **Safety checks, before anything runs.** ``--pattern`` must be relative to ``IN_DIR`` without ``..``;
  ``--suffix`` must be a plain extension (``.png``, ``.nii.gz``); every output path is resolved (symlinks
  followed) and must stay inside ``OUT_DIR``, must not be an input (nor a hard link to one), nor one of the
  folder's own files (``manifest.jsonl``, ``batch.json``); two inputs that map to one output (``x.jpg`` and
  ``x.png`` with ``--suffix .png``) are one error naming both. A symlink loop on the way is a one-line error.
* **One run per folder.** The run holds an exclusive ``flock`` on ``OUT_DIR/.restoreflow-batch.lock`` (taken
  by rank 0 under torchrun, the result shared with the other ranks); a second ``batch`` on the same
  ``OUT_DIR`` fails at once with one line naming the holder's pid. The lock file is removed at the end.
  While holding the lock the run removes the temporary files (``.rftmp-*``, see :mod:`restoreflow.core.atomic`)
  that killed runs left behind.
* **Failures** are recorded (status error) and the run goes on; the command exits with status 1 and one
  summary line when any input failed.
* **torchrun.** When ``WORLD_SIZE > 1`` the process group is initialised from the environment
  (``gloo`` on CPU, ``nccl`` with ``--device cuda``: one GPU per local rank). All ranks read the manifest,
  meet at a barrier, and take the pending inputs ``i`` with ``i % world_size == rank``; they meet again at
  the end, where the failure count is summed and rank 0 merges the manifest. The union of the outputs is the
  single-process result, byte for byte, on the same device type with the same thread count.
  ``RESTOREFLOW_DIST_TIMEOUT`` (seconds, default 86400) bounds the final barrier.
"""


from restoreflow.app.batch.command import batch_command, main
from restoreflow.app.batch.engine import run_batch
from restoreflow.app.batch.files import (
    DEFAULT_SUFFIXES, LOCK, MANIFEST, PART_PREFIX, SETTINGS, image_seed, list_inputs, output_name,
)
from restoreflow.app.batch.manifest import read_manifest

__all__ = ["image_seed", "list_inputs", "output_name", "read_manifest", "run_batch", "batch_command", "main",
           "DEFAULT_SUFFIXES", "MANIFEST", "LOCK", "PART_PREFIX", "SETTINGS"]
