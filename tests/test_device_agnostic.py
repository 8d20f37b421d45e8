"""The restoration pipeline is dtype- and device-agnostic (#21): a float64 problem is solved in float64 from the
measurement to the output -- only the network itself runs in its weights' float32 -- with no float32 tensor made
on the way and the global default dtype left alone; the same problem in float32 gives loosely the same answer;
and on CUDA (``-m gpu``) ``restoreflow.restore`` gives the CPU's answer.

``restoreflow.restore`` has no dtype argument: it reads every input as float32 and returns float32 images (the
``Result`` contract), except a :class:`restoreflow.Measurement`, whose data it takes as they are. So the float64
pipeline is exercised one level down, through the public pieces ``restore`` is made of: the task's operator
(``default_registries`` + ``build_config``), its ``simulate``, the task's default sampler with the prior's tuned
options, and ``Problem`` -- plus ``restore`` itself on a float64 ``Measurement``.

Only the top-level ``restoreflow`` package and ``restoreflow.testing`` are imported.
"""

from __future__ import annotations

import collections
import contextlib
import traceback

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import restoreflow as rf
from restoreflow.testing import check_sampler_reproducible

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA], id="cuda")]
TASKS = ("deblur", "denoise", "sr", "inpaint")
STEPS = {"deblur": 4, "sr": 5, "inpaint": 4}  # denoise is mmse: one (self-ensembled) network call
SIZE = 32
LOW = (torch.float32, torch.float16, torch.bfloat16)
CASTS = frozenset({"to", "type", "float", "half", "bfloat16"})

def _photo(size: int = SIZE, seed: int = 0) -> np.ndarray:
    """A smooth RGB test picture in [0, 1] (float64) with some texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.5 + 0.3 * np.sin(6 * xx + 3 * yy)[..., None] * np.linspace(0.6, 1.0, 3)
    return np.clip(base + 0.05 * rng.standard_normal((size, size, 3)), 0, 1)


def _image(device: str) -> torch.Tensor:
    return torch.from_numpy(_photo()).permute(2, 0, 1)[None].contiguous().to(device)


def _psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(((x.double().clamp(0, 1) - ref.double()) ** 2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-20))


class _Float32Watch(TorchFunctionMode):
    """Records every torch call that returns a low-precision float tensor, except inside the network (whose
    weights are float32 by design) and the casts to it that a denoiser makes around the network call."""

    def __init__(self, net: torch.nn.Module | None, denoiser: object):
        super().__init__()
        self.in_net = self.in_denoiser = 0
        self.hits: collections.Counter = collections.Counter()
        self._handles = []
        for mod, attr in ((net, "in_net"), (denoiser, "in_denoiser")):
            if isinstance(mod, torch.nn.Module):
                self._handles.append(mod.register_forward_pre_hook(lambda m, a, _a=attr: self._step(_a, 1)))
                self._handles.append(mod.register_forward_hook(lambda m, a, o, _a=attr: self._step(_a, -1)))

    def _step(self, attr: str, d: int) -> None:
        setattr(self, attr, getattr(self, attr) + d)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.in_net:
            return out
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(o, torch.Tensor) and o.dtype in LOW for o in outs):
            name = getattr(func, "__name__", str(func))
            if not (self.in_denoiser and name in CASTS):
                frames = [f for f in traceback.extract_stack()[:-1]
                          if "restoreflow" in f.filename or "plugins" in f.filename]
                where = (f"{'/'.join(frames[-1].filename.split('/')[-2:])}:{frames[-1].lineno} {frames[-1].name}"
                         if frames else "?")
                self.hits[f"{name} at {where}"] += 1
        return out


def _network(den: object) -> torch.nn.Module | None:
    """The raw network inside a denoiser: descend while one child holds all the parameters."""
    if not isinstance(den, torch.nn.Module):
        return None
    m = den
    while not list(m.parameters(recurse=False)):
        kids = [c for c in m.children() if any(True for _ in c.parameters())]
        if len(kids) != 1:
            break
        m = kids[0]
    return m


def _setup(task: str, device: str):
    """The task's default operator, prior and sampler (the prior's tuned options, few steps), and a float64
    measurement simulated from the test picture."""
    regs = rf.default_registries()
    t = regs.tasks.get(task)
    op_cls = regs.operators.get(t.operator)
    cfg = rf.build_config(op_cls.Config, {**dict(t.defaults), "noise_sigma": 0.01}, owner=op_cls.name)
    x = _image(device)
    sim = op_cls(cfg, x_shape=tuple(x.shape)).to(device)
    y, clean = sim.simulate(x, generator=torch.Generator().manual_seed(0))
    op = op_cls(cfg, x_shape=op_cls.x_shape_for(tuple(y.shape), cfg)).to(device)
    prior = regs.priors.get(t.default_prior or "default")()
    s_cls = regs.samplers.get(t.default_sampler)
    opts = dict(prior.sampler_defaults(s_cls.name, task))
    if task in STEPS:
        opts["steps"] = STEPS[task]
    sampler = s_cls(rf.build_config(s_cls.Config, opts, owner=s_cls.name))
    den = prior.load(device=device, x_shape=tuple(op.x_shape))
    return op, y, clean, sampler, den


@contextlib.contextmanager
def _float32_draws():
    """torch.rand / torch.randn draw in float32 and cast to the dtype asked for, so a float64 run gets the float32
    run's random numbers (from one generator, torch's float64 stream is another sequence)."""
    real = {name: getattr(torch, name) for name in ("rand", "randn")}

    def drawing(name):
        def draw(*size, dtype=None, **kw):
            return real[name](*size, dtype=torch.float32, **kw).to(dtype or torch.get_default_dtype())
        return draw

    try:
        for name in real:
            setattr(torch, name, drawing(name))
        yield
    finally:
        for name, fn in real.items():
            setattr(torch, name, fn)


def _solve(sampler, op, y, den, generator: torch.Generator) -> torch.Tensor:
    return sampler.sample(rf.Problem(y=y, operator=op, x_shape=tuple(op.x_shape)), den, generator=generator)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("task", TASKS)
def test_float64_problem_is_solved_in_float64(task, device):
    default = torch.get_default_dtype()
    op, y, clean, sampler, den = _setup(task, device)
    assert y.dtype == torch.float64 and clean.dtype == torch.float64, "simulate() changed the image's dtype"
    watch = _Float32Watch(_network(den), den)
    try:
        with watch:
            out = check_sampler_reproducible(lambda g: _solve(sampler, op, y, den, g), dtype=torch.float64)
    finally:
        watch.remove()
    assert out.device.type == device and tuple(out.shape) == tuple(op.x_shape)
    assert not watch.hits, f"{task}: float32 tensors made outside the network: {dict(watch.hits)}"
    assert torch.get_default_dtype() == default, "the default dtype was changed"

    # the same measurement in float32, from the same random draws: the same answer to float32 rounding (the network
    # is float32 either way). torch draws other normals in float32 than in float64 from one generator, and a single
    # draw's PSNR spreads by ~2.5 dB over seeds for dps at 4 steps on inpainting (11.9-21.8 dB over 40 seeds), so
    # only equal draws make a comparison that can fail for a dtype defect and not by chance.
    with _float32_draws():
        out64 = _solve(sampler, op, y, den, torch.Generator().manual_seed(1234))
        out32 = _solve(sampler, op, y.float(), den, torch.Generator().manual_seed(1234))
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    a, b = op.crop_to_measurement(out64), op.crop_to_measurement(out32)
    assert float((a - b.double()).abs().max()) <= 1e-3
    assert torch.get_default_dtype() == default


@pytest.mark.parametrize("task", TASKS)
def test_restore_takes_a_float64_measurement(task):
    """``restore`` on a float64 ``Measurement`` runs through (operator, simulate, prior, crop, metrics) and returns
    the ``Result`` contract's float32 image in [0, 1], close to the float32 measurement's restoration."""
    default = torch.get_default_dtype()
    x = _image("cpu")
    kw = {"simulate": True, "seed": 0, "steps": STEPS.get(task)}
    with _float32_draws():  # equal noise in the simulation and the sampler (see above)
        r64 = rf.restore(rf.Measurement(x), task, **kw)
        r32 = rf.restore(rf.Measurement(x.float()), task, **kw)
    assert r64.measurement.dtype == torch.float64, "the float64 measurement was not restored in float64"
    assert r64.image.dtype == torch.float32 and torch.isfinite(r64.image).all()
    assert 0 <= float(r64.image.min()) and float(r64.image.max()) <= 1
    assert r64.image.shape == r32.image.shape
    assert float((r64.image - r32.image).abs().max()) <= 1e-3
    assert abs(r64.metrics["psnr"] - r32.metrics["psnr"]) <= 0.01
    assert r64.metrics["psnr"] > 10 and torch.get_default_dtype() == default


def test_operator_shape_probe_follows_the_operator_device():
    """``y_shape`` must work wherever the operator lives. The ``meta`` device stands in for CUDA on a CPU-only
    machine: any device other than the CPU shows the probe's device mismatch."""
    regs = rf.default_registries()
    op_cls = regs.operators.get(regs.tasks.get("inpaint").operator)
    op = op_cls(rf.build_config(op_cls.Config, {"noise_sigma": 0.01}, owner=op_cls.name), x_shape=(1, 3, 8, 8))
    assert tuple(op.to("meta").y_shape) == (1, 3, 8, 8)


# -- on CUDA: the public entry point gives the CPU's answer -----------------------------------------------------


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("task", TASKS)
def test_restore_on_cuda_matches_cpu(task):
    a = (_photo(64) * 255).round().astype(np.uint8)
    kw = {"simulate": True, "seed": 0, "steps": STEPS.get(task)}
    rc = rf.restore(a, task, device="cpu", **kw)
    rg = rf.restore(a, task, device="cuda", **kw)
    assert rg.image.dtype == torch.float32 and torch.isfinite(rg.image).all()
    # every random draw comes from the same CPU generator, so only float32 rounding differs
    assert abs(rg.metrics["psnr"] - rc.metrics["psnr"]) <= 0.1
    assert float((rg.image.cpu() - rc.image).abs().max()) <= 0.05


@pytest.mark.gpu
@CUDA
def test_path_sample_takes_a_cpu_generator_for_cuda_states():
    x0 = torch.rand(2, 3, 8, 8, dtype=torch.float64, device="cuda")
    xt, noise = rf.vp().sample(x0, 0.5, generator=torch.Generator().manual_seed(0))
    assert xt.device.type == "cuda" and noise.device.type == "cuda"
