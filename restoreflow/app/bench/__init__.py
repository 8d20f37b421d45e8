"""``restoreflow bench``: methods x priors x NFE over a folder of images, several seeds, one table and two figures.

::

    restoreflow bench --task deblur --methods pinv,wiener,ddim+dps@default,deepinv-dps@default \\
        --nfe 10,20,50 --seeds 0,1,2 --size 64 --out bench-deblur
    restoreflow bench --task sr --op factor=4 --methods wiener,dps --priors default,gaussian --out bench-sr

How it works:

* **Methods.** A method is ``SAMPLER[+GUIDANCE][+CORRECTOR][@PRIOR]``: ``ddim+dps`` is ``--sampler ddim
  --guidance dps``, ``ddim+dps+smc`` adds ``--corrector smc``, ``mrs@mr-deblur`` fixes the prior. The
  first name is always the sampler (``dps`` alone is the DPS sampler); later names are looked up among
  the guidance and corrector plugins. Peers from other libraries run on the same denoiser, operator,
  measurement and NFE: ``deepinv-dps`` (``deepinv.sampling.DPS``) and ``deepinv-diffpir``
  (``deepinv.sampling.DiffPIR``), with an unconditional prior (``@default`` by default).
* **Options.** ``-o NAME:KEY=VALUE`` sets an option of the sampler, guidance, corrector or peer called
  NAME; ``-o KEY=VALUE`` sets it on every one whose options have KEY. ``--op KEY=VALUE`` sets operator
  options (the operator's ``seed`` fixes kernels and masks: every method sees the same ones).
* **Grid.** Every method runs at every ``--nfe`` value (its ``steps`` option; the NFE actually spent is
  recorded) -- methods without steps (pinv, Wiener) once; with every ``--priors`` entry that fits it
  (pairs that do not fit are listed as skipped; a method no listed prior fits uses its own default prior,
  e.g. ``mrs`` its MR model). Everything is planned (names, options, compatibility) before the first
  image is read.
* **Timing.** Each cell first runs once untimed (``--no-warmup`` to skip), so one-off set-up -- weight
  loading, cached spectra -- is in no time or memory figure. Seconds are the sampler's wall time per
  image (measurement simulation and metrics excluded); memory is the peak growth over the whole run.
* **Runs.** For each image (``--images``: a folder or file; default the bundled held-out images,
  centre-cropped to ``--size``), seed and cell, :func:`restoreflow.app.api.restore` degrades the clean image
  with noise drawn from the seed (``simulate``) and restores it, so all methods of one image and seed
  see the same measurement. Recorded: PSNR, SSIM (scikit-image), LPIPS (null without local weights, see
  :mod:`restoreflow.app.metrics`), NFE, sampling wall time, process CPU time, peak memory of the run
  (:class:`~restoreflow.app.metrics.PeakMemory`) and the device; the load average at the start and the end
  goes into the results (wall times of a busy machine are flagged).
* **Resume.** Each finished run is one JSON line appended to ``OUT/runs.jsonl`` (one write, flush and
  fsync; a torn last line is ignored). A rerun skips runs whose key (image, crop, task, operator options,
  method, options, prior, steps, seed, device) has an ``ok`` line, so an interrupted bench finishes where
  it stopped; failed runs are retried. Changing the grid keeps the old lines and only adds new ones.
* **Outputs** (rewritten at the end, atomically): ``OUT/results.json`` (settings, per-cell summary mean
  ± std over images x seeds, every run), ``OUT/results.md``, ``OUT/psnr_vs_nfe.png`` and
  ``OUT/side_by_side.png`` (first image, first seed: clean | degraded | each method at its largest NFE;
  the restored images are kept in ``OUT/images/``).
"""


from restoreflow.app.bench.command import bench, bench_command, compare_cli, compare_output, compare_samplers, main
from restoreflow.app.bench.plan import (
    PEERS, Cell, Method, Peer, parse_method, parse_methods, plan_cells, route_options,
)
from restoreflow.app.bench.report import aggregate, markdown, write_outputs
from restoreflow.app.bench.run import (
    FIGURE, PLOT, RESULTS_JSON, RESULTS_MD, RUNS, load_images, read_runs, run_bench, run_key,
)

__all__ = ["bench", "bench_command", "compare_cli", "compare_output", "compare_samplers", "main", "PEERS", "Cell",
           "Method", "Peer", "parse_method", "parse_methods", "plan_cells", "route_options", "aggregate", "markdown",
           "write_outputs", "FIGURE", "PLOT", "RESULTS_JSON", "RESULTS_MD", "RUNS", "load_images", "read_runs", "run_bench", "run_key"]
