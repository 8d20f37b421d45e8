"""``ddim`` and ``dpmpp-2m`` on a discrete DDPM prior against diffusers' own ``DDIMScheduler`` and
``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``, ``solver_order=2``), run step by step here on the
same float64 toy network and the same noise draws (issue 19 item 7).

The facts -- beta tables, ``set_timesteps`` grids, ``steps_offset``, ``set_alpha_to_one``, ``clip_sample``,
``lower_order_final``, ``final_sigmas_type``, prediction types and the step formulas -- are those of diffusers
0.42.1 (huggingface/diffusers, tag v0.42.1: ``src/diffusers/schedulers/scheduling_ddim.py`` and
``scheduling_dpmsolver_multistep.py``), the release installed by the ``dev`` extra; the schedulers themselves run
here, nothing of them is restated.

diffusers keeps its tables in float32, and DPM-Solver's step rounds the sample to float32 each step. To compare
algorithms, not roundings, the main tests run diffusers with its module's ``torch.float32``/``np.float32`` read as
float64 *after* building the scheduler: its own float32 table, float64 arithmetic. Restoreflow's side is the prior's
real code path (:func:`diffusers_denoiser` on the scheduler config, float32 table). Unmodified diffusers is compared
too, where its float32 arithmetic stays below 1e-6 (:func:`test_unmodified_diffusers_within_its_float32_rounding`).

The toy network is the exact Gaussian denoiser of per-pixel N(m, C) data (values beyond [-1, 1], so
``clip_sample`` binds) as epsilon, v or sample prediction in the network's [-1, 1] units at diffusers' integer
timestep; restoreflow sees it through the [0, 1]-unit adapter the diffusers prior uses.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from restoreflow.plugin_api import (
    CheckpointError, ConfigError, ExpIntegrator, IncompatibleError, PredictionAdapter, Problem, ddpm, ddpm_betas,
    ddpm_timesteps, integrate, time_grid, vp,
)
from restoreflow_plugins.diffusion import DDIM, DPMSolverPP2M
from restoreflow_plugins.models.checkpoints import (
    DiffusersPrior, diffusers_denoiser, diffusers_sampler_options, diffusers_schedule,
)

try:
    import diffusers
    import diffusers.schedulers.scheduling_ddim as ddim_module
    import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm_module
except ImportError:  # fails every test below with the install hint (diffusers is in the dev extra)
    diffusers = None

F64 = torch.float64
SHAPE = (2, 3, 4, 4)
SCHEDULES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (1e-4, 0.02)}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


@pytest.fixture(autouse=True)
def _needs_diffusers():
    if diffusers is None:
        pytest.fail("these tests run diffusers' schedulers: pip install -e '.[dev]' (or 'restoreflow[diffusers]')")


_g = torch.Generator().manual_seed(0)
_M = 0.6 * torch.randn(SHAPE[1:], generator=_g, dtype=F64)
_C = (0.3 + 0.5 * torch.rand(SHAPE[1:], generator=_g, dtype=F64)) ** 2


class Toy(torch.nn.Module):
    """The exact denoiser of N(_M, _C) data at integer timestep ``t`` of the table ``alphas_cumprod``."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str):
        super().__init__()
        self.ac, self.prediction = alphas_cumprod.to(F64), prediction
        self.dtype_probe = torch.nn.Parameter(torch.zeros(1, dtype=F64), requires_grad=False)  # runs in float64

    def forward(self, x, t):
        t = torch.as_tensor(t).reshape(-1)[0]
        ab = self.ac[int(round(float(t)))]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x0 = _M + _C * a / (ab * _C + 1 - ab) * (x - a * _M)
        eps = (x - a * x0) / s
        return {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[self.prediction]


class _As64:
    """A module stand-in whose ``float32`` is float64 (everything else is the module's own)."""

    def __init__(self, module, f64):
        self._module, self.float32 = module, f64

    def __getattr__(self, name):
        return getattr(self._module, name)


def _config(schedule: str, spacing: str, **extra) -> dict:
    bs, be = SCHEDULES[schedule]
    return {"num_train_timesteps": 1000, "beta_start": bs, "beta_end": be, "beta_schedule": schedule,
            "timestep_spacing": spacing, "steps_offset": 1 if spacing == "leading" else 0, **extra}


def _scheduler(kind: str, config: dict, monkeypatch, arithmetic64: bool, clip: bool = False):
    """diffusers' scheduler for ``config``; ``arithmetic64``: its float32 table kept, its arithmetic in float64."""
    monkeypatch.undo()  # built by diffusers as installed
    if kind == "ddim":
        sch = diffusers.DDIMScheduler(**config, clip_sample=clip)
    else:
        sch = diffusers.DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2)
    if arithmetic64:
        for mod in (ddim_module, dpm_module):
            monkeypatch.setattr(mod, "torch", _As64(torch, torch.float64))
            monkeypatch.setattr(mod, "np", _As64(np, np.float64))
        sch.alphas_cumprod = sch.alphas_cumprod.to(F64)
        if kind == "ddim":
            sch.final_alpha_cumprod = sch.final_alpha_cumprod.to(F64)
    return sch


def _diffusers_run(sch, toy, steps, *, seed, eta=0.0, timesteps=None):
    """A pipeline's loop: x_T ~ N(0, I) from ``seed``'s generator, which also draws DDIM's step noise."""
    if timesteps is None:
        sch.set_timesteps(steps)
    else:
        sch.set_timesteps(timesteps=list(timesteps))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen, dtype=F64)
    ddim = isinstance(sch, diffusers.DDIMScheduler)
    for t in sch.timesteps:
        x = sch.step(toy(x, t), t, x, **({"eta": eta, "generator": gen} if ddim else {})).prev_sample
    return x


def _ours(sampler, den, seed, shape=SHAPE):
    """The sampler's run in [0, 1] units, returned in the network's units at the grid's end."""
    prob = Problem(y=torch.zeros(shape, dtype=F64), operator=None, x_shape=shape)
    x = sampler.sample(prob, den, generator=torch.Generator().manual_seed(seed))
    return 2 * x - float(den.path.a(sampler.grid(den.path)[-1]))


DDIM_CASES = [  # (steps, eta, clip_sample, extra config)
    (7, 0.0, False, {}), (30, 0.0, False, {}), (10, 0.7, False, {"set_alpha_to_one": False}),
    (10, 1.0, True, {}), (30, 0.0, True, {"set_alpha_to_one": False}), (10, 0.0, False, {"prediction_type": "v_prediction"}),
    (12, 0.5, False, {"prediction_type": "sample"}),
]
DPM_CASES = [  # (steps, extra config)
    (7, {}), (30, {}), (12, {"final_sigmas_type": "sigma_min"}), (12, {"lower_order_final": False}),
    (20, {"final_sigmas_type": "sigma_min", "lower_order_final": False}), (10, {"prediction_type": "v_prediction"}),
    (10, {"prediction_type": "sample", "final_sigmas_type": "sigma_min"}),
]


def _ddim_sampler(config, steps, eta, clip):
    return DDIM(steps=steps, spacing=config["timestep_spacing"], eta=eta, clip_sample=clip,
                **diffusers_sampler_options(config).get("ddim", {}))


def _dpm_sampler(config, steps):
    return DPMSolverPP2M(steps=steps, spacing=config["timestep_spacing"],
                         **diffusers_sampler_options(config).get("dpmpp-2m", {}))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ddim_is_diffusers_ddim(schedule, spacing, monkeypatch):
    """``ddim -o spacing=...`` on the prior of a diffusers scheduler config is ``DDIMScheduler``: deterministic and
    stochastic (the same noise draws), clip_sample, set_alpha_to_one false, v and sample prediction, step counts
    whose linspace/trailing grids make diffusers land off its next timestep (7, 12, 30 of 1000)."""
    for steps, eta, clip, extra in DDIM_CASES:
        config = _config(schedule, spacing, **extra)
        sch = _scheduler("ddim", config, monkeypatch, arithmetic64=True, clip=clip)
        ref = _diffusers_run(sch, Toy(sch.alphas_cumprod, sch.config.prediction_type), steps, seed=steps, eta=eta)
        den = diffusers_denoiser(Toy(sch.alphas_cumprod, sch.config.prediction_type), config, dtype=F64)
        ours = _ours(_ddim_sampler(config, steps, eta, clip), den, seed=steps)
        assert float((ours - ref).abs().max()) <= 1e-9, (steps, eta, clip, extra, float((ours - ref).abs().max()))
        if clip:  # the toy's estimates leave [-1, 1]: the clamp binds
            unclipped = _ours(_ddim_sampler(config, steps, eta, False), den, seed=steps)
            assert float((unclipped - ref).abs().max()) > 1e-2


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_dpmpp_2m_is_diffusers_dpm_solver_pp(schedule, spacing, monkeypatch):
    """``dpmpp-2m -o spacing=...`` is ``DPMSolverMultistepScheduler(dpmsolver++, order 2, midpoint)``: final sigma
    zero or sigma_min, lower_order_final on and off (12 and 20 steps: diffusers lowers below 15 steps, DPM-Solver's
    own rule below 10), v and sample prediction."""
    for steps, extra in DPM_CASES:
        config = _config(schedule, spacing, **extra)
        sch = _scheduler("dpm", config, monkeypatch, arithmetic64=True)
        ref = _diffusers_run(sch, Toy(sch.alphas_cumprod, sch.config.prediction_type), steps, seed=steps)
        den = diffusers_denoiser(Toy(sch.alphas_cumprod, sch.config.prediction_type), config, dtype=F64)
        ours = _ours(_dpm_sampler(config, steps), den, seed=steps)
        assert float((ours - ref).abs().max()) <= 1e-9, (steps, extra, float((ours - ref).abs().max()))


def test_lower_order_final_follows_diffusers_below_15_steps(monkeypatch):
    """At 12 steps with sigma_min the last step's order is what differs: diffusers' rule (first order below 15 steps)
    is reproduced, and it is not DPM-Solver's (below 10), which moves the result by more than 1e-6."""
    config = _config("linear", "leading", final_sigmas_type="sigma_min")
    sch = _scheduler("dpm", config, monkeypatch, arithmetic64=True)
    toy = Toy(sch.alphas_cumprod, "epsilon")
    lowered = _diffusers_run(sch, toy, 12, seed=0)
    den = diffusers_denoiser(toy, config, dtype=F64)
    kept = _ours(DPMSolverPP2M(steps=12, spacing="leading", steps_offset=1, final_sigmas_type="sigma_min",
                               lower_order_final=False), den, seed=0)
    assert float((_ours(_dpm_sampler(config, 12), den, seed=0) - lowered).abs().max()) <= 1e-9
    assert float((kept - lowered).abs().max()) > 1e-6


def test_explicit_timesteps(monkeypatch):
    """``timesteps=`` is diffusers' ``set_timesteps(timesteps=...)`` for DPM-Solver++; DDIM (which diffusers gives no
    custom timesteps) lands on each next listed timestep: on a leading grid, where diffusers' stride lands there
    too, it equals ``spacing=leading``."""
    config = _config("scaled_linear", "leading")
    sch = _scheduler("dpm", config, monkeypatch, arithmetic64=True)
    toy = Toy(sch.alphas_cumprod, "epsilon")
    custom = (999, 950, 800, 640, 400, 333, 120, 45, 7)
    ref = _diffusers_run(sch, toy, None, seed=3, timesteps=custom)
    den = diffusers_denoiser(toy, config, dtype=F64)
    smp = DPMSolverPP2M(timesteps=custom)
    assert smp.config.steps == len(custom) == smp.nfe()
    assert float((_ours(smp, den, seed=3) - ref).abs().max()) <= 1e-9
    lead = ddpm_timesteps(1000, 20, "leading", steps_offset=1)
    a = _ours(DDIM(steps=20, spacing="leading", steps_offset=1, eta=0.3), den, seed=4)
    b = _ours(DDIM(timesteps=tuple(lead), eta=0.3), den, seed=4)
    assert float((a - b).abs().max()) <= 1e-12


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_float64_tables_match_diffusers_run_in_float64(schedule, monkeypatch):
    """``ddpm(ddpm_betas(...))`` in float64 is diffusers' schedule computed in float64 (its module's float32 read as
    float64 from the start): the same algorithm on the core's float64 definitions of the three schedules."""
    for mod in (ddim_module, dpm_module):
        monkeypatch.setattr(mod, "torch", _As64(torch, torch.float64))
        monkeypatch.setattr(mod, "np", _As64(np, np.float64))
    config = _config(schedule, "trailing")
    bs, be = SCHEDULES[schedule]
    path = ddpm(ddpm_betas(schedule, beta_start=bs, beta_end=be, num_train_timesteps=1000))
    for kind in ("ddim", "dpm"):
        sch = (diffusers.DDIMScheduler(**config, clip_sample=False) if kind == "ddim" else
               diffusers.DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2))
        assert sch.alphas_cumprod.dtype == F64
        toy = Toy(sch.alphas_cumprod, "epsilon")
        den = PredictionAdapter(toy, prediction="eps", path=path, value_range=(-1, 1), time_fn=lambda t: t * 999,
                                dtype=F64)
        smp = DDIM(steps=15, spacing="trailing", eta=0.5) if kind == "ddim" else DPMSolverPP2M(steps=15, spacing="trailing")
        ref = _diffusers_run(sch, toy, 15, seed=1, eta=0.5)
        assert float((_ours(smp, den, seed=1) - ref).abs().max()) <= 1e-9, kind


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_unmodified_diffusers_within_its_float32_rounding(kind, monkeypatch):
    """Against diffusers exactly as installed (float32 tables and arithmetic) the difference is diffusers' own
    rounding: at most 3.5e-7 here (10 steps; the schedules without squaredcos_cap_v2's timestep 999, where float32
    rounds 1 - alpha-bar = 1 - 9.7e-9 to 1 and diffusers' own float64 run moves by up to 4.5e-4)."""
    cases = [(s, sp) for s in ("linear", "scaled_linear") for sp in ("leading", "trailing", "linspace")]
    cases.append(("squaredcos_cap_v2", "leading"))
    for schedule, spacing in cases:
        config = _config(schedule, spacing)
        sch = _scheduler(kind, config, monkeypatch, arithmetic64=False)
        toy = Toy(sch.alphas_cumprod, "epsilon")
        ref = _diffusers_run(sch, toy, 10, seed=2)
        den = diffusers_denoiser(toy, config, dtype=F64)
        smp = _ddim_sampler(config, 10, 0.0, False) if kind == "ddim" else _dpm_sampler(config, 10)
        assert float((_ours(smp, den, seed=2) - ref).abs().max()) <= 1e-6, (schedule, spacing)


def test_the_prior_table_is_diffusers_own():
    """The prior's path is diffusers' float32 table (betas and cumulative product bit for bit), timestep n at
    t = n / 999, the clean state one step below 0; trained_betas; what is not supported is refused in one line."""
    for schedule, (bs, be) in SCHEDULES.items():
        sch = diffusers.DDPMScheduler(beta_schedule=schedule, beta_start=bs, beta_end=be)
        assert torch.equal(ddpm_betas(schedule, beta_start=bs, beta_end=be, dtype=torch.float32), sch.betas)
        path, pred = diffusers_schedule(dict(sch.config))
        a, _, s = path.coefficients(torch.arange(1000, dtype=F64) / 999)
        assert pred == "eps" and torch.allclose(a ** 2, sch.alphas_cumprod.to(F64), rtol=1e-13, atol=0)
        assert torch.allclose(s ** 2, 1 - sch.alphas_cumprod.to(F64), rtol=1e-6, atol=0)
        assert [float(c) for c in path.coefficients(-1 / 999)] == [1.0, 0.0, 0.0]
    betas = [0.001 * (k + 1) for k in range(50)]
    path, pred = diffusers_schedule({"num_train_timesteps": 50, "trained_betas": betas, "prediction_type": "v_prediction"})
    ref = torch.cumprod(1 - torch.tensor(betas, dtype=torch.float32), 0).to(F64)
    assert pred == "v" and torch.allclose(path.a(torch.arange(50, dtype=F64) / 49) ** 2, ref, rtol=1e-13, atol=0)
    for bad, match in (({"beta_schedule": "sigmoid"}, "sigmoid"), ({"rescale_betas_zero_snr": True}, "zero_snr"),
                       ({"prediction_type": "flow_prediction"}, "prediction_type")):
        with pytest.raises(CheckpointError, match=match):
            diffusers_schedule(bad)


def test_grids_are_diffusers_set_timesteps():
    """``ddpm_timesteps`` is each scheduler's ``set_timesteps`` (step counts that divide 1000 or not, offsets)."""
    for T in (1000, 37):
        for steps in (1, 2, 3, 7, 10, 12, 30, 36):
            for spacing in ("leading", "trailing", "linspace"):
                for offset in (0, 1):
                    kw = {"num_train_timesteps": T, "timestep_spacing": spacing, "steps_offset": offset}
                    d, p = diffusers.DDIMScheduler(**kw), diffusers.DPMSolverMultistepScheduler(**kw)
                    d.set_timesteps(steps)
                    p.set_timesteps(steps)
                    assert ddpm_timesteps(T, steps, spacing, steps_offset=offset) == d.timesteps.tolist()
                    assert ddpm_timesteps(T, steps, spacing, steps_offset=offset, solver="dpm") == p.timesteps.tolist()


def test_continuous_priors_and_spacings_are_unchanged():
    """On a continuous path leading/trailing/linspace keep the continuous grid and the plain kernels (bit for bit);
    on a discrete prior the default spacing stays continuous; integer timesteps on a continuous prior are refused."""
    path = vp()
    prob = Problem(y=torch.zeros(SHAPE, dtype=F64), operator=None, x_shape=SHAPE)
    from restoreflow.exact.gaussian import DenseGaussian, GaussianDenoiser

    d = 3 * 4 * 4
    den = GaussianDenoiser(DenseGaussian(torch.full((d,), 0.4, dtype=F64), 0.05 * torch.eye(d, dtype=F64), SHAPE[1:]), path)
    for spacing in ("leading", "trailing", "linspace"):
        for smp, kernel in ((DDIM(steps=8, spacing=spacing, eta=0.5), ExpIntegrator(order=1, eta=0.5)),
                            (DPMSolverPP2M(steps=8, spacing=spacing), ExpIntegrator(order=2, phi="midpoint", total_steps=8))):
            assert torch.equal(smp.grid(path), time_grid(path, 8, spacing))
            ref = integrate(kernel, den, prob, time_grid(path, 8, spacing), generator=torch.Generator().manual_seed(0))
            assert torch.equal(smp.sample(prob, den, generator=torch.Generator().manual_seed(0)), ref)
    disc = ddpm(ddpm_betas("linear"))
    assert torch.equal(DDIM(steps=8).grid(disc), time_grid(disc, 8, "uniform_lambda"))
    with pytest.raises(IncompatibleError, match="continuous"):
        DDIM(timesteps=(900, 500, 0)).grid(path)
    with pytest.raises(ConfigError, match="descending"):
        DDIM(timesteps=(10, 500))
    with pytest.raises(ConfigError, match=r"\[0, 999\]"):
        DPMSolverPP2M(timesteps=(1200, 5)).grid(disc)
    with pytest.raises(ConfigError, match="repeats"):
        DPMSolverPP2M(steps=1000, spacing="leading").grid(disc)


def test_a_diffusers_folder_sets_the_samplers_scheduler_options(tmp_path):
    """The folder's scheduler config sets ddim's steps_offset/set_alpha_to_one and dpmpp-2m's final_sigmas_type /
    lower_order_final (the user's options win); they act on diffusers' grids only."""
    from restoreflow.app.api import plan

    folder = tmp_path / "ddpm"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False, "final_sigmas_type": "sigma_min",
         "lower_order_final": False, "clip_sample": True}))
    assert DiffusersPrior(folder).tuned_options() == {
        "ddim": {"steps_offset": 1, "set_alpha_to_one": False},
        "dpmpp-2m": {"steps_offset": 1, "lower_order_final": False, "final_sigmas_type": "sigma_min"}}
    c = plan("deblur", sampler="ddim", guidance="dps", prior=str(folder), sampler_options={"spacing": "leading"}).sampler.config
    assert (c.spacing, c.steps_offset, c.set_alpha_to_one, c.clip_sample) == ("leading", 1, False, False)
    c = plan("deblur", sampler="dpmpp-2m", guidance="dps", prior=str(folder),
             sampler_options={"final_sigmas_type": "zero"}).sampler.config
    assert (c.final_sigmas_type, c.lower_order_final) == ("zero", False)


def test_a_diffusers_folder_runs_diffusers_ddim(tmp_path, monkeypatch):
    """End to end with a real (tiny) ``UNet2DModel`` saved by diffusers beside a ``DDIMScheduler`` config
    (scaled_linear, steps_offset 1, set_alpha_to_one false, clip_sample): the loaded prior, its tuned options and
    ``ddim -o spacing=leading -o clip_sample=true`` are diffusers' loop on that network (run in float64 on both
    sides: with the network in float32, the 1-ulp differences of its input move the result by up to 6e-6)."""
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    folder = tmp_path / "ddpm"
    net.save_pretrained(folder / "unet", safe_serialization=True)
    config = {**_config("scaled_linear", "leading"), "set_alpha_to_one": False}
    sch = _scheduler("ddim", config, monkeypatch, arithmetic64=True, clip=True)
    sch.save_pretrained(folder / "scheduler")
    net = net.to(F64)
    shape = (1, 3, 8, 8)
    sch.set_timesteps(10)
    gen = torch.Generator().manual_seed(7)
    ref = torch.randn(shape, generator=gen, dtype=F64)
    with torch.no_grad():
        for t in sch.timesteps:
            ref = sch.step(net(ref, t).sample, t, ref).prev_sample
    prior = DiffusersPrior(folder)
    den = prior.load()
    den.net_module.to(F64)
    den.net_dtype = F64
    smp = DDIM(steps=10, spacing="leading", clip_sample=True, **prior.tuned_options()["ddim"])
    with torch.no_grad():
        ours = _ours(smp, den, seed=7, shape=shape)
        plain = _ours(DDIM(steps=10, spacing="leading"), den, seed=7, shape=shape)
    assert float((ours - ref).abs().max()) <= 1e-9, float((ours - ref).abs().max())
    assert float((plain - ref).abs().max()) > 1e-3  # the folder's settings matter
