"""Fault injection, hostile plugins: failing at import, in a register hook, in an I/O hook, while restoring, in a
command they add; each ends in one clear line (a warning and a skipped plugin, or an ``error:`` naming the plugin),
with no traceback, and every other plugin and command keeps working. Folders, files and killed or concurrent
``batch`` runs: ``test_faults_batch.py``; thread counts: ``test_faults_threads.py``; helpers: ``fault_helpers.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fault_helpers import HOSTILE, ROOT, _one_problem, _png, install, site_on_path

from restoreflow.app import batch as rb
from restoreflow.app.cli import build_cli
from restoreflow.host.manager import collect, get_plugin_manager

hostile_path = pytest.fixture(site_on_path, name="hostile_path")


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
    # as in an interactive session: a shell's background job (`.ci/run &`) starts with SIGINT ignored, and then
    # no Ctrl-C arrives at all
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            get_plugin_manager()
    finally:
        signal.signal(signal.SIGINT, old)


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
