"""Fault injection: hostile plugins, hostile folders and files, killed and concurrent ``batch`` runs.

Every case ends in one clear line (a warning and a skipped plugin, or an ``error:`` and a non-zero exit), with
no traceback, no file outside ``--out``, no input changed and no record lost. Hostile plugins are installed the
way real ones are: a ``*.dist-info`` folder with an ``entry_points.txt`` on ``sys.path``, found by
``importlib.metadata`` exactly like a pip-installed distribution.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from restoreflow.app import batch as rb
from restoreflow.app.cli import build_cli
from restoreflow.host.manager import collect, get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]

# -- hostile plugins ----------------------------------------------------------------------------------

HEADER = "from restoreflow import hookimpl\nimport restoreflow as rf\n"

HOSTILE = {
    # failures at import
    "imports_missing": "import restoreflow_no_such_module_xyz\n",
    "exits_at_import": "import sys\nsys.exit(3)\n",
    "raises_at_import": "raise RuntimeError('broken on purpose')\n",
    "interrupts_at_import": "raise KeyboardInterrupt\n",  # the plugin's own, not the user's Ctrl-C
    # hooks that do not fit the specification
    "misspelt_hook": "@hookimpl\ndef register_sampler(register):\n    pass\n",
    "wrong_hook_args": "@hookimpl\ndef register_samplers(reg, extra):\n    pass\n",
    # register_* hooks misbehaving: none of the plugin's registrations may survive
    "raises_in_register": textwrap.dedent("""
        class Mine(rf.Sampler):
            name = "hostile-mine"
            def sample(self, problem, denoiser=None, *, generator, guidance=None, corrector=None, callback=None):
                return problem.y
        @hookimpl
        def register_samplers(register):
            register(Mine)
            raise ValueError("kaboom in register")
    """),
    "returns_list": textwrap.dedent("""
        class Other(rf.Sampler):
            name = "hostile-returned"
            def sample(self, problem, denoiser=None, *, generator, guidance=None, corrector=None, callback=None):
                return problem.y
        @hookimpl
        def register_samplers(register):
            return [Other]
    """),
    "task_named_batch": "@hookimpl\ndef register_tasks(register):\n    register(rf.Task('batch', 'gaussian_blur', 'Hijack.'))\n",
    "registers_junk": "@hookimpl\ndef register_operators(register):\n    register(42)\n",
    "exits_in_register": "import sys\n@hookimpl\ndef register_tasks(register):\n    sys.exit(0)\n",
    "interrupts_in_register": "@hookimpl\ndef register_samplers(register):\n    raise KeyboardInterrupt\n",
    # a name that is taken, a command that is taken
    "shadows_wiener": textwrap.dedent("""
        class FakeWiener(rf.Sampler):
            name = "wiener"
            def sample(self, problem, denoiser=None, *, generator, guidance=None, corrector=None, callback=None):
                return problem.y * 0
        @hookimpl
        def register_samplers(register):
            register(FakeWiener)
    """),
    "replaces_deblur": textwrap.dedent("""
        import click
        @hookimpl
        def register_commands(cli):
            @click.command(name="deblur")
            def fake():
                click.echo("HIJACKED")
            cli.add_command(fake, "deblur")
            @click.command(name="hostile-hello")
            def hello():
                click.echo("hello from a hostile plugin")
            cli.add_command(hello)
    """),
    "raises_in_commands": textwrap.dedent("""
        import click
        @hookimpl
        def register_commands(cli):
            @click.command(name="half-added")
            def half():
                pass
            cli.add_command(half)
            raise KeyError("no commands today")
    """),
    # run-time hooks misbehaving
    "raising_io": textwrap.dedent("""
        @hookimpl
        def load_measurement(path, task):
            raise OSError("reader exploded")
        @hookimpl
        def save_result(path, image, like):
            raise ZeroDivisionError("writer exploded")
    """),
    "wrong_types_io": textwrap.dedent("""
        @hookimpl
        def load_measurement(path, task):
            return "not a measurement"
        @hookimpl
        def save_result(path, image, like):
            return "written, honest"
    """),
    # a hook function that pluggy would silently ignore
    "forgot_hookimpl": "def register_samplers(register):\n    pass\n",
}


def install(root: Path, plugins: dict[str, str], *, entry_names: dict[str, str] | None = None) -> dict[str, str]:
    """Write each plugin as a module under ``root`` plus one distribution ``hostile-<tag>`` whose entry points
    name them (``entry_names`` maps an entry-point name to a module when they must differ). Returns
    entry-point name -> module name."""
    tag = uuid.uuid4().hex[:8]
    root.mkdir(parents=True, exist_ok=True)
    eps = {}
    for name, body in plugins.items():
        mod = f"hostile_{name}_{tag}"
        (root / f"{mod}.py").write_text(HEADER + body)
        eps[name] = mod
    for ep_name, name in (entry_names or {}).items():
        eps[ep_name] = eps.pop(name)
    dist = root / f"hostile_{tag}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: hostile-{tag}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[restoreflow]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return eps


@pytest.fixture
def hostile_path(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def _problems(pm) -> list[str]:
    return collect(pm).problems


def _one_problem(problems: list[str], plugin: str) -> str:
    hits = [p for p in problems if repr(plugin) in p]
    assert len(hits) == 1, (plugin, problems)
    assert "\n" not in hits[0]
    return hits[0]


@pytest.mark.parametrize("name, expect", [
    ("imports_missing", "failed to import: ModuleNotFoundError"),
    ("exits_at_import", "failed to import: called sys.exit(3)"),
    ("raises_at_import", "failed to import: RuntimeError: broken on purpose"),
    ("misspelt_hook", "unknown hook 'register_sampler' (did you mean 'register_samplers'?)"),
    ("wrong_hook_args", "implements register_samplers() with argument(s) extra, reg that the hook does not provide"),
    ("raises_in_register", "failed in register_samplers: ValueError: kaboom in register"),
    ("returns_list", "register_samplers returned list"),
    ("registers_junk", "register_operators registered int 42, which is not a restoreflow.Operator subclass"),
    ("exits_in_register", "failed in register_tasks: called sys.exit(0)"),
    ("interrupts_at_import", "failed to import: KeyboardInterrupt"),
    ("interrupts_in_register", "failed in register_samplers: KeyboardInterrupt"),
])
def test_a_broken_plugin_is_one_warning_and_skipped(hostile_path, name, expect):
    install(hostile_path, {name: HOSTILE[name]})
    pm = get_plugin_manager()
    regs = collect(pm)
    line = _one_problem(regs.problems, name)
    assert expect in line and "skipped" in line
    # nothing of it survives, everything else works
    assert "hostile-mine" not in regs.samplers and "hostile-returned" not in regs.samplers
    assert {"wiener", "pinv", "ddim"} <= set(regs.samplers.names())
    assert {"deblur", "inpaint", "sr", "denoise"} <= set(regs.tasks.names())
    assert "gaussian_blur" in regs.operators


def test_a_real_ctrl_c_while_plugins_load_still_interrupts(hostile_path):
    """A SIGINT that arrives while a plugin imports is the user's: it interrupts (the plugin is not blamed)."""
    install(hostile_path, {"slow": "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(5)\n"})
    with pytest.raises(KeyboardInterrupt):
        get_plugin_manager()


def test_what_a_plugin_prints_goes_to_stderr(hostile_path, capsys):
    chatty = 'print("HELLO at import")\n@hookimpl\ndef register_samplers(register):\n    print("HELLO in a hook")\n'
    install(hostile_path, {"chatty": chatty})
    capsys.readouterr()
    collect(get_plugin_manager())
    out, err = capsys.readouterr()
    assert out == "" and "HELLO at import" in err and "HELLO in a hook" in err  # stdout stays parseable (--json)


def test_a_task_naming_parts_nobody_registered_is_ignored(hostile_path):
    bad = ("@hookimpl\ndef register_tasks(register):\n"
           "    register(rf.Task('smear', 'no_such_operator', 'Missing operator.'))\n"
           "    register(rf.Task('smudge', 'gaussian_blur', 'Missing sampler.', default_sampler='no_such_sampler'))\n")
    install(hostile_path, {"bad_tasks": bad})
    regs = collect(get_plugin_manager())
    assert "smear" not in regs.tasks and "smudge" not in regs.tasks and "deblur" in regs.tasks
    lines = [p for p in regs.problems if "'bad_tasks'" in p]
    assert len(lines) == 2 and "the operator 'no_such_operator', which is not registered" in lines[0]
    assert "the default sampler 'no_such_sampler'" in lines[1] and all("task is ignored" in ln for ln in lines)


def test_a_taken_name_is_refused_with_a_warning(hostile_path):
    install(hostile_path, {"shadows_wiener": HOSTILE["shadows_wiener"]})
    regs = collect(get_plugin_manager())
    line = _one_problem(regs.problems, "shadows_wiener")
    assert "'wiener' is registered twice" in line and "restoreflow_plugins.classical" in line
    assert regs.samplers.get("wiener").__module__ == "restoreflow_plugins.classical"


def test_an_entry_point_cannot_take_a_first_party_plugin_name(hostile_path):
    install(hostile_path, {"shadows_wiener": HOSTILE["shadows_wiener"]}, entry_names={"classical": "shadows_wiener"})
    pm = get_plugin_manager()
    assert pm.get_plugin("classical").__name__ == "restoreflow_plugins.classical"
    line = _one_problem(collect(pm).problems, "classical")
    assert "is ignored: the name is already taken by restoreflow_plugins.classical" in line


def test_a_task_cannot_take_a_built_in_command_name(hostile_path):
    install(hostile_path, {"task_named_batch": HOSTILE["task_named_batch"]})
    pm = get_plugin_manager()
    regs = collect(pm)
    assert "the task 'batch', which is a built-in command; the task is ignored" in _one_problem(regs.problems, "task_named_batch")
    assert "batch" not in regs.tasks
    assert build_cli(pm).commands["batch"].params[0].name == "in_dir"  # the real batch command


def test_a_hook_without_hookimpl_is_reported(hostile_path):
    install(hostile_path, {"forgot_hookimpl": HOSTILE["forgot_hookimpl"]})
    pm = get_plugin_manager()
    res = CliRunner().invoke(build_cli(pm), ["plugins", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output.strip().splitlines()[-1])
    line = _one_problem(data["problems"], "forgot_hookimpl")
    assert "register_samplers() without @hookimpl" in line
    assert "forgot_hookimpl" in {r["name"] for r in data["plugins"]}  # loaded (it may have other, marked hooks)


def test_commands_cannot_be_replaced_and_a_raising_register_commands_adds_nothing(hostile_path):
    install(hostile_path, {"replaces_deblur": HOSTILE["replaces_deblur"], "raises_in_commands": HOSTILE["raises_in_commands"]})
    cli = build_cli(get_plugin_manager())
    assert "half-added" not in cli.commands and "hostile-hello" in cli.commands
    assert "HIJACKED" not in CliRunner().invoke(cli, ["deblur", "--help"]).output
    res = CliRunner().invoke(cli, ["hostile-hello"])
    assert res.exit_code == 0 and "hello from a hostile plugin" in res.output
    assert "replaces_deblur' tried to replace the command 'deblur'; the existing command is kept" in \
        _one_problem(res.output.splitlines(), "replaces_deblur")  # printed once, before the command runs
    assert "failed in register_commands: KeyError" in _one_problem(res.output.splitlines(), "raises_in_commands")


def _png(path: Path, size: int = 32, seed: int = 0) -> Path:
    from skimage import io

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    io.imsave(path, rng.integers(0, 256, (size, size), dtype=np.uint8), check_contrast=False)
    return path


@pytest.mark.parametrize("name, expect", [
    ("raising_io", ("failed in load_measurement: OSError: reader exploded",
                    "failed in save_result: ZeroDivisionError: writer exploded")),
    ("wrong_types_io", ("returned str from load_measurement instead of a restoreflow.io.Measurement",
                        "returned str from save_result instead of True or None")),
])
def test_misbehaving_io_hooks_are_switched_off_and_the_built_in_io_answers(hostile_path, tmp_path, name, expect):
    install(hostile_path, {name: HOSTILE[name]})
    cli = build_cli(get_plugin_manager())
    d = tmp_path / "in"
    for i in range(3):
        _png(d / f"im{i}.png", seed=i)
    res = CliRunner().invoke(cli, ["batch", str(d), "--out", str(tmp_path / "out"), "--task", "deblur",
                                   "--sampler", "wiener", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "3 restored" in res.output and "Traceback" not in res.output
    for e in expect:
        assert res.output.count(e) == 1, res.output  # once, not once per image
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["im0.png", "im1.png", "im2.png"]


LYING_IO = textwrap.dedent("""
    import torch
    from restoreflow.io import Measurement
    @hookimpl
    def load_measurement(path, task):
        return Measurement(torch.full((3,), float("nan")), path)
    @hookimpl
    def save_result(path, image, like):
        return True  # claims to have written, writes nothing
""")


def test_io_hooks_that_lie_are_switched_off_and_the_built_in_io_answers(hostile_path, tmp_path):
    install(hostile_path, {"lying_io": LYING_IO})
    cli = build_cli(get_plugin_manager())
    d = tmp_path / "in"
    for i in range(2):
        _png(d / f"im{i}.png", seed=i)
    res = CliRunner().invoke(cli, ["batch", str(d), "--out", str(tmp_path / "out"), "-t", "deblur", "-s", "wiener",
                                   "-q", "--op", "boundary=circular"])
    assert res.exit_code == 0 and "2 restored" in res.output and "Traceback" not in res.output, res.output
    for e in ("returned a Measurement from load_measurement whose data is a float32 tensor of shape (3,)",
              "returned True from save_result (written) but"):
        assert res.output.count(e) == 1, res.output
    rows = [json.loads(x) for x in (tmp_path / "out" / rb.MANIFEST).read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:  # every recorded output is really there, with the recorded hash
        assert hashlib.sha256((tmp_path / "out" / r["output"]).read_bytes()).hexdigest() == r["sha256"]


def test_every_hostile_plugin_at_once_harms_no_command(tmp_path):
    """End to end, in a fresh interpreter: every command still works, each plugin is named once, no traceback."""
    root = tmp_path / "site"
    install(root, HOSTILE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("RESTOREFLOW_DEBUG", None)
    exe = [sys.executable, "-m", "restoreflow.app.cli"] if (ROOT / "restoreflow" / "__main__.py").exists() else None
    exe = exe or [str(Path(sys.executable).with_name("restoreflow"))]
    res = subprocess.run([*exe, "plugins", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and all(ln.startswith("warning: ") for ln in res.stderr.strip().splitlines())
    listed = {r["name"] for r in json.loads(res.stdout.strip().splitlines()[-1])["plugins"]}
    assert {"classical", "io", "diffusion"} <= listed
    for name in HOSTILE:
        if name not in ("raising_io", "wrong_types_io"):  # these misbehave only when called
            _one_problem(res.stderr.strip().splitlines(), name)
    res = subprocess.run([*exe, "plugins", "--no-hooks"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    for name in HOSTILE:
        if name not in ("raising_io", "wrong_types_io"):
            _one_problem(res.stderr.strip().splitlines(), name)  # once, also in the table listing
    img = _png(tmp_path / "x.png")
    out = tmp_path / "x.out.png"
    res = subprocess.run([*exe, "deblur", str(img), "--sampler", "wiener", "--out", str(out), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert out.exists() and "Traceback" not in res.stderr and "HIJACKED" not in res.stdout
    assert not [ln for ln in res.stderr.splitlines() if ln.startswith("error")], res.stderr


# -- killed and concurrent batch runs ----------------------------------------------------------------

# circular: the closed-form Fourier Wiener filter, bit-identical whatever the thread count (the killed run's child
# and the in-process reference use different counts; the task's boundary=valid solves by CG, which is not)
FAST = ["--task", "deblur", "--sampler", "wiener", "--quiet", "--op", "boundary=circular"]

# A writer that stops forever in the middle of an atomic write (its temporary file exists, half written), so
# the test can SIGKILL the run at exactly the worst moment.
STALL = textwrap.dedent("""
    import os, time
    from pathlib import Path
    from restoreflow.core.atomic import atomic_write
    @hookimpl(tryfirst=True)
    def save_result(path, image, like):
        if Path(path).name != os.environ.get("RF_STALL_ON"):
            return None
        with atomic_write(path, suffix=Path(path).suffix) as tmp:
            tmp.write_bytes(b"half a png")
            Path(os.environ["RF_STALL_FLAG"]).write_text("stalled")
            time.sleep(600)
        return True
""")


# A writer that takes its time over each image and then lets the normal writer save it: the run is still going when
# its first record lands, however fast the machine (without it a fast CI machine finished all six before the test
# looked).
THROTTLE = textwrap.dedent("""
    import os, time
    @hookimpl(tryfirst=True)
    def save_result(path, image, like):
        time.sleep(float(os.environ["RF_THROTTLE_S"]))
        return None
""")


def _folder(d: Path, n: int, size: int = 32) -> list[str]:
    names = [f"{chr(97 + i)}.png" for i in range(n)]
    for i, name in enumerate(names):
        _png(d / name, size=size, seed=i)
    return names


def _batch_cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", "from restoreflow.app.cli import main; main()", "batch", str(src), "--out", str(out), *FAST]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    for k in ("RESTOREFLOW_DEBUG", "WORLD_SIZE"):
        env.pop(k, None)
    return env


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "the child never reached the stall point"
        time.sleep(0.05)


def _run(*args):
    return CliRunner().invoke(build_cli(), ["batch", *map(str, args)])


def _check_complete(out: Path, ref: Path, names: list[str]) -> None:
    assert not [p for p in out.rglob(".rftmp-*")] and not (out / rb.LOCK).exists()
    assert not list(out.glob(".manifest-rank*"))
    rows = [json.loads(line) for line in (out / rb.MANIFEST).read_text().splitlines()]
    assert [r["input"] for r in rows] == names and {r["status"] for r in rows} == {"ok"}
    for r in rows:
        data = (out / r["output"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
        assert data == (ref / r["output"]).read_bytes()  # same seed, same bytes as an uninterrupted run


def test_sigkill_mid_write_then_rerun_completes_and_cleans_up(tmp_path):
    src, out, ref, site = tmp_path / "in", tmp_path / "out", tmp_path / "ref", tmp_path / "site"
    names = _folder(src, 5)
    assert _run(src, "--out", ref, *FAST).exit_code == 0
    install(site, {"stall": STALL})
    flag = tmp_path / "stalled"
    env = _env(PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               RF_STALL_ON="c.png", RF_STALL_FLAG=str(flag))
    child = subprocess.Popen(_batch_cmd(src, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(flag, child)
        # a second run on the same folder while the first holds it: refused at once, naming the holder
        t0 = time.monotonic()
        res = _run(src, "--out", out, *FAST)
        assert res.exit_code == 4 and time.monotonic() - t0 < 30, res.output
        assert f"another restoreflow batch (pid {child.pid}) is writing to" in res.output
        assert len(res.output.strip().splitlines()) == 1
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    left = [p.name for p in out.glob(".rftmp-*")]
    assert len(left) == 1 and left[0].startswith(".rftmp-c.png.")  # what SIGKILL leaves behind
    assert sorted(p.name for p in out.glob("[!.]*.png")) == ["a.png", "b.png"]  # finished ones only, none half
    res = _run(src, "--out", out, "--task", "deblur", "--sampler", "wiener", "--op", "boundary=circular")
    assert res.exit_code == 0, res.output
    assert "removed 1 temporary file(s)" in res.output and "3 restored, 2 already done" in res.output
    _check_complete(out, ref, names)


def test_sigkill_at_any_moment_then_rerun_completes(tmp_path):
    src, out, ref = tmp_path / "in", tmp_path / "out", tmp_path / "ref"
    names = _folder(src, 6)
    assert _run(src, "--out", ref, *FAST).exit_code == 0
    site = tmp_path / "site"
    install(site, {"throttle": THROTTLE})
    env = _env(PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), RF_THROTTLE_S="0.5")
    child = subprocess.Popen(_batch_cmd(src, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    part = out / f"{rb.PART_PREFIX}0.jsonl"
    try:
        _wait_for(part, child)  # at least one record written, the run is in full swing
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL  # killed mid-run, not finished before the kill
    res = _run(src, "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    _check_complete(out, ref, names)


def test_two_runs_at_once_never_mix_or_lose_records(tmp_path):
    src, out, ref = tmp_path / "in", tmp_path / "out", tmp_path / "ref"
    names = _folder(src, 6)
    assert _run(src, "--out", ref, *FAST).exit_code == 0
    procs = [subprocess.Popen(_batch_cmd(src, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes in ([0, 0], [0, 4]), results
    for code, _stdout, stderr in results:
        assert "Traceback" not in stderr
        if code == 4:
            assert "another restoreflow batch (pid" in stderr and len(stderr.strip().splitlines()) == 1
    if codes == [0, 0]:  # the second started after the first had finished: it found everything done
        assert any("0 restored, 6 already done" in r[1] for r in results), results
    _check_complete(out, ref, names)


# -- hostile files -----------------------------------------------------------------------------------


def test_atomic_temporary_is_created_in_the_target_folder(tmp_path, monkeypatch):
    import tempfile

    from restoreflow.core.atomic import atomic_write

    seen = []
    real = tempfile.mkstemp

    def spy(*a, **k):
        fd, name = real(*a, **k)
        seen.append(Path(name))
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    target = tmp_path / "deep" / "x.png"
    target.parent.mkdir()
    with atomic_write(target, suffix=".png") as tmp:
        assert tmp.parent == target.parent and tmp.exists() and tmp.name.endswith(".png")
        assert os.stat(tmp).st_dev == os.stat(target.parent).st_dev  # same filesystem: the rename is atomic
        tmp.write_bytes(b"data")
    assert seen == [tmp] and target.read_bytes() == b"data" and not tmp.exists()


@pytest.mark.parametrize("stem_bytes", [251, 240, 200])
def test_names_near_the_255_byte_limit_work(tmp_path, stem_bytes):
    from restoreflow.core.atomic import atomic_write, temporary_affixes

    for stem in ("a" * stem_bytes, ("é" * stem_bytes)[: stem_bytes // 2]):
        target = tmp_path / f"{stem}.png"
        assert len(os.fsencode(target.name)) <= 255
        prefix, suffix = temporary_affixes(target, ".png")
        assert len(os.fsencode(prefix + "12345678" + suffix)) <= 255 and suffix == ".png"
        with atomic_write(target, suffix=".png") as tmp:
            assert len(os.fsencode(tmp.name)) <= 255
            tmp.write_bytes(b"ok")
        assert target.read_bytes() == b"ok"
    # end to end: batch restores an image whose name is exactly 255 bytes into a file of the same name
    src, out = tmp_path / "in", tmp_path / "out"
    name = "o" * 251 + ".png"
    _png(src / name)
    res = _run(src, "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    assert (out / name).exists() and not list(out.glob(".rftmp-*"))


def test_hostile_inputs_in_a_batch_folder(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _folder(src, 2)
    (src / "empty.png").write_bytes(b"")
    (src / "truncated.png").write_bytes((src / "a.png").read_bytes()[:60])
    (src / "folder.png").mkdir()
    (src / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(src / "fifo.png")  # reading it would block forever: must be skipped, not opened
    long_name = "z" * 251 + ".png"
    _png(src / long_name, seed=7)
    res = _run(src, "--out", out, "--task", "deblur", "--sampler", "wiener", "--op", "boundary=circular")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "2 of 5 inputs failed" in res.output
    rows = {r["input"]: r for r in (json.loads(x) for x in (out / rb.MANIFEST).read_text().splitlines())}
    assert set(rows) == {"a.png", "b.png", "empty.png", "truncated.png", long_name}
    assert rows["empty.png"]["status"] == rows["truncated.png"]["status"] == "error"
    assert (out / long_name).exists() and not list(out.glob(".rftmp-*"))
    assert "\n" not in rows["truncated.png"]["error"]


# -- thread count ----------------------------------------------------------------------------------

def _restore_at(threads: int, img, task: str, sampler: str | None, steps: int | None):
    import torch

    import restoreflow as rf

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return rf.restore(img, task, sampler=sampler, seed=3, simulate=True, steps=steps).image
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def small_rgb():
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[100:132, 180:212])  # 32 x 32 RGB


@pytest.mark.parametrize("task, sampler", [("deblur", "wiener"), ("denoise", "wiener"), ("deblur", "pinv"),
                                           ("inpaint", "pinv")])
def test_closed_form_samplers_are_bit_identical_across_thread_counts(small_rgb, task, sampler):
    import torch

    assert torch.equal(_restore_at(1, small_rgb, task, sampler, None), _restore_at(2, small_rgb, task, sampler, None))


@pytest.mark.parametrize("task, sampler, steps", [("inpaint", "dps", 3), ("sr", "wiener", None)])
def test_network_and_iterative_samplers_differ_across_thread_counts_only_by_rounding(small_rgb, task, sampler, steps):
    """The documented exception (README, Determinism): at one thread count the result is bit-identical; between
    thread counts only the order of float32 additions inside ATen's whole-tensor reductions and oneDNN's
    convolutions changes, so the results agree to rounding (measured <= 3e-5 at 128 px), never more."""
    import torch

    a, again = _restore_at(1, small_rgb, task, sampler, steps), _restore_at(1, small_rgb, task, sampler, steps)
    b = _restore_at(2, small_rgb, task, sampler, steps)
    assert torch.equal(a, again)
    assert float((a - b).abs().max()) <= 1e-4


RAISES_IN_SAMPLE = textwrap.dedent("""
    import torch
    class Fragile(rf.Sampler):
        '''Fails at run time (fixture).'''
        name = "hostile-fragile"
        requires = frozenset()
        uses_measurement = True
        def sample(self, problem, denoiser=None, *, generator, guidance=None, corrector=None, callback=None):
            return problem.y @ torch.ones(3, 5)  # a shape error raised inside torch, caused by the plugin
    @hookimpl
    def register_samplers(register):
        register(Fragile)
""")


def test_an_error_raised_by_plugin_code_during_a_run_names_the_plugin(hostile_path, tmp_path):
    """A third-party sampler that fails while restoring: one line naming the plugin and where, exit 6 (plugin),
    not an anonymous internal error; restoreflow's own failures stay internal errors."""
    from skimage import io

    install(hostile_path, {"fragile": RAISES_IN_SAMPLE})
    img = tmp_path / "in.png"
    io.imsave(img, (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8), check_contrast=False)
    res = CliRunner().invoke(build_cli(get_plugin_manager()), ["deblur", str(img), "--sampler", "hostile-fragile",
                                                               "--op", "boundary=circular", "--out",
                                                               str(tmp_path / "o.png")])
    assert res.exit_code == 6, res.output
    line = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "plugin 'fragile' failed (RuntimeError" in line[0] and ".py:" in line[0], res.output
    assert "Traceback" not in res.output and not (tmp_path / "o.png").exists()


JUNK_SAMPLER = textwrap.dedent("""
    import torch
    import click
    class Junk(rf.Sampler):
        '''Returns the wrong thing (fixture).'''
        name = "hostile-junk"
        requires = frozenset()
        uses_measurement = True
        def sample(self, problem, denoiser=None, *, generator, guidance=None, corrector=None, callback=None):
            return "not a tensor" if problem.y.shape[-1] % 2 else torch.zeros(1, 7, 3, 3)
    @hookimpl
    def register_samplers(register):
        register(Junk)
    @hookimpl
    def register_commands(cli):
        @click.command(name="hostile-crash")
        @click.option("--user-error", is_flag=True)
        def crash(user_error):
            if user_error:
                raise rf.InputError("a user mistake the plugin found")
            raise RuntimeError("plugin command bug")
        cli.add_command(crash)
""")


@pytest.mark.parametrize("size, got", [(17, "a str"), (16, "a tensor of shape (1, 7, 3, 3)")])
def test_a_sampler_returning_the_wrong_thing_is_named(hostile_path, tmp_path, size, got):
    from skimage import io

    install(hostile_path, {"junk": JUNK_SAMPLER})
    img = tmp_path / "in.png"
    io.imsave(img, np.zeros((size, size, 3), np.uint8), check_contrast=False)
    res = CliRunner().invoke(build_cli(get_plugin_manager()), ["deblur", str(img), "-s", "hostile-junk", "--op",
                                                               "boundary=circular", "-O", str(tmp_path / "o.png")])
    assert res.exit_code == 6 and "Traceback" not in res.output, res.output
    assert (f"error: sampler hostile-junk (plugin 'junk') returned {got}; it must return a tensor of shape "
            f"(1, 3, {size}, {size})") in res.output
    assert not (tmp_path / "o.png").exists()


def test_a_plugin_command_without_error_handling_still_fails_in_one_line(hostile_path):
    """A command a plugin adds has no @handle_errors: the group still turns its failure into one line."""
    install(hostile_path, {"junk": JUNK_SAMPLER})
    cli = build_cli(get_plugin_manager())
    res = CliRunner().invoke(cli, ["hostile-crash"])
    assert res.exit_code == 6 and "Traceback" not in res.output, res.output
    assert "error: plugin 'junk' failed (RuntimeError: plugin command bug) at hostile_junk_" in res.output
    res = CliRunner().invoke(cli, ["hostile-crash", "--user-error"])
    assert res.exit_code == 3 and "error: a user mistake the plugin found" in res.output, res.output


def test_a_plugin_failing_on_one_batch_input_is_named_in_the_manifest(hostile_path, tmp_path):
    install(hostile_path, {"fragile": RAISES_IN_SAMPLE})
    src = tmp_path / "in"
    _png(src / "a.png", size=16)
    res = CliRunner().invoke(build_cli(get_plugin_manager()), ["batch", str(src), "--out", str(tmp_path / "o"), "-t",
                                                               "deblur", "-s", "hostile-fragile", "-q"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    row = json.loads((tmp_path / "o" / rb.MANIFEST).read_text().splitlines()[0])
    assert row["status"] == "error" and row["error"].startswith("plugin 'fragile' failed at hostile_fragile_"), row
