"""The models plugin: the denoiser method, the bundled default prior and the checkpoint loaders."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from restoreflow import CheckpointError, IncompatibleError, collect, get_plugin_manager
from restoreflow.models import data as rfdata
from restoreflow.core.modelcard import save_weights, write_card
from restoreflow.models.nets.unet import EDMDenoiser, UNet
from restoreflow_plugins import models as M
from restoreflow_plugins.models import bundled


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager()


def _load_prior(pm, path, **options):
    return pm.hook.load_prior(path=path, options=options)


# -- registration ------------------------------------------------------------------------------------


def test_registers_method_prior_and_command(pm):
    regs = collect(pm)
    assert regs.trainers.get("denoiser") is M.DenoiserMethod
    assert regs.priors.get("default") is M.DefaultPrior
    from restoreflow.app.cli import build_cli

    assert "train" in build_cli(pm).commands


# -- the EDM denoiser ----------------------------------------------------------------------------------


def test_edm_preconditioning_algebra():
    """With F equal to its training target, D(x; sigma) returns x0 exactly; at t = 0 D is the identity."""
    torch.manual_seed(0)
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    sigma = torch.tensor([0.01, 0.5, 20.0], dtype=torch.float64)
    captured = {}

    class Oracle(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x, c_noise):
            return captured.get("target", torch.zeros_like(x))

    den = EDMDenoiser(Oracle())
    _, target = den.training_target(x0, noise, sigma)
    captured["target"] = target
    x = x0 + sigma.view(-1, 1, 1, 1).float() * noise
    assert torch.allclose(den.precond(x, sigma), x0, atol=1e-4)
    # the public path is VE in [0, 1] units: sigma_img = sigma_net / 2
    net = UNet(channels=(4, 8))
    den = EDMDenoiser(net, sigma_min=0.001, sigma_max=80.0)
    y = torch.rand(2, 3, 12, 12)
    assert torch.allclose(den(y, 0.0), y, atol=1e-6)
    assert den.path.kind == "ve" and math.isclose(float(den.path.sigma(torch.tensor(1.0, dtype=torch.float64))), 80.0)


def test_unet_any_size_and_conditional_input():
    net = UNet(in_channels=3, cond_channels=3, channels=(4, 8, 8))
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    x = torch.rand(2, 3, 13, 22)
    out = net(x, torch.rand(2), torch.rand(2, 3, 13, 22))
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="conditional"):
        net(x, 0.5)


def test_denoiser_method_loss_trains_down():
    method = M.DenoiserMethod(mult="1,2")
    torch.manual_seed(0)
    net = method.build_network(channels=1, width=8)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.from_numpy(rfdata.to_channels(rfdata.dead_leaves(32, seed=1), 1))[None].repeat(4, 1, 1, 1)
    losses = []
    for _ in range(25):
        loss = method.loss(net, x0, None, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8
    card = method.card()
    assert card["prediction"] == "x0" and card["path"]["kind"] == "ve" and card["conditional"] is False


# -- the bundled default prior -----------------------------------------------------------------------


def test_default_prior_denoises_held_out_images(pm):
    prior = collect(pm).priors.get("default")()
    card = prior.card()
    assert card["method"] == "denoiser" and card["command"].startswith("restoreflow train --method denoiser")
    assert os.path.getsize(prior.weights) < 10 * 2**20
    den = prior.load(x_shape=(1, 3, 64, 64))
    x0 = rfdata.held_out_images(64, 3)
    g = torch.Generator().manual_seed(0)
    s = 0.1
    y = x0 + s * torch.randn(x0.shape, generator=g)
    t = den.path.t_from_nsr(torch.tensor(s, dtype=torch.float64))
    with torch.no_grad():
        out = den(y, t).clamp(0, 1)
    gain = sum(rfdata.psnr(out, x0)) / 4 - sum(rfdata.psnr(y, x0)) / 4
    assert gain > 3.0  # a trained denoiser: the noisy input is ~20 dB, a good small denoiser gains >5 dB
    tiled = collect(pm).priors.get("default")(tile="32", overlap="16").load()
    with torch.no_grad():
        out_t = tiled(y, t).clamp(0, 1)
    assert abs(sum(rfdata.psnr(out_t, x0)) / 4 - sum(rfdata.psnr(out, x0)) / 4) < 0.5


# -- loaders -----------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(pm, tmp_path):
    marker = tmp_path / "pwned"
    for name in ("evil.pt", "evil.pth", "evil.ckpt"):
        path = tmp_path / name
        torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil(marker)}, path)
        with pytest.raises(CheckpointError, match="unsafe pickle|refused"):
            _load_prior(pm, path)
        assert not marker.exists()
    # the same through the CLI: one line, exit code of CheckpointError
    from click.testing import CliRunner

    from restoreflow.app.cli import build_cli

    img = rfdata.bundled_image("astronaut")
    res = CliRunner().invoke(build_cli(pm), ["denoise", str(img), "--prior", str(tmp_path / "evil.pt"),
                                             "--sampler", "dps", "-O", str(tmp_path / "o.png")])
    assert res.exit_code != 0 and not marker.exists()
    assert "refused" in res.output or "unsafe" in res.output


def _tiny_edm_adm(label_dim=0):
    from deepinv.models import ADMUNet

    torch.manual_seed(0)
    net = ADMUNet(img_resolution=16, in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
                  num_blocks=1, attn_resolutions=(8,), label_dim=label_dim, pretrained=None, dropout=0.0)
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    return net.eval()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_edm_adm_checkpoint_loads_with_inferred_architecture(pm, tmp_path, suffix):
    net = _tiny_edm_adm()
    path = tmp_path / f"adm{suffix}"
    if suffix == ".pt":
        torch.save({"ema": net.state_dict()}, path)
    else:
        save_weights(path, net.state_dict())
    prior = _load_prior(pm, path)
    assert isinstance(prior, M.ADMPrior) and prior.layout == "edm-adm"
    den = prior.load(x_shape=(2, 3, 16, 16))
    arch = den.card["architecture"]
    assert arch["model_channels"] == 32 and arch["channel_mult"] == [1, 2] and arch["attn_resolutions"] == [8]
    # EDM trains on [-1, 1] with sigma_data 0.5: the denoiser's path is VE with sigma halved into [0, 1] units
    net._was_trained_on_minus_one_one, net.pixel_std = True, 0.5
    x, t = torch.rand(2, 3, 16, 16), torch.tensor(0.6)
    with torch.no_grad():
        ref = net(x, den.path.sigma(t).float())
        assert torch.allclose(den(x, t), ref, atol=1e-5)
    assert math.isclose(float(den.path.sigma(torch.tensor(1.0, dtype=torch.float64))), 40.0)
    with pytest.raises(IncompatibleError, match="tiles"):
        _load_prior(pm, path, tile="16").load()


def test_class_conditional_edm_adm_needs_a_label(pm, tmp_path):
    path = tmp_path / "cond.pt"
    torch.save(_tiny_edm_adm(label_dim=5).state_dict(), path)
    with pytest.raises(CheckpointError, match="class_label"):
        _load_prior(pm, path).load()
    den = _load_prior(pm, path, class_label="3").load()
    with torch.no_grad():
        assert den(torch.rand(1, 3, 16, 16), 0.5).shape == (1, 3, 16, 16)


def test_ddpm_path_matches_the_discrete_schedule():
    path = M.ddpm_path("linear", 0.1, 20.0, 1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    i = torch.tensor([0, 1, 250, 999])
    a, b, s = path.coefficients(i.double() / 999)
    assert torch.allclose(a**2, abar[i], rtol=1e-10) and torch.allclose(s**2, 1 - abar[i], rtol=1e-8)
    assert torch.all(b == 0)
    cos = M.ddpm_path("cosine", steps=1000)
    assert float(cos.coefficients(0.0)[0]) > 0.999 and float(cos.coefficients(1.0)[0]) < 0.01


def test_guided_diffusion_layout_is_detected_and_checked(pm, tmp_path):
    """The openai layout is recognised; widths deepinv's DiffUNet does not have are refused clearly."""
    sd = {"input_blocks.0.0.weight": torch.zeros(64, 3, 3, 3), "time_embed.0.weight": torch.zeros(256, 64),
          "out.2.weight": torch.zeros(6, 64, 3, 3)}
    path = tmp_path / "gd.pt"
    torch.save(sd, path)
    prior = _load_prior(pm, path)
    assert isinstance(prior, M.ADMPrior) and prior.layout == "guided-diffusion" and prior.path_kind == "vp"
    with pytest.raises(CheckpointError, match="two published"):
        prior.load()
    torch.save({**sd, "label_emb.weight": torch.zeros(1000, 256)}, path)
    with pytest.raises(CheckpointError, match="class-conditional"):
        _load_prior(pm, path).load()


@pytest.mark.slow
def test_guided_diffusion_ffhq_layout_loads_through_deepinv(pm, tmp_path):
    """A checkpoint in the exact layout of DPS's ffhq_10m.pt (93.6M parameters) loads and runs."""
    from deepinv.models import DiffUNet

    torch.manual_seed(0)
    net = DiffUNet(pretrained=None).eval()
    sd = {k: v for k, v in net.state_dict().items() if "alphas_cumprod" not in k}  # as published
    path = tmp_path / "ffhq_10m.pt"
    torch.save(sd, path)
    den = _load_prior(pm, path).load()
    assert den.card["learn_sigma"] and not den.card["large_model"]
    x, t = torch.rand(1, 3, 32, 32), torch.tensor(0.3, dtype=torch.float64)
    a, _, s = den.path.coefficients(t)
    with torch.no_grad():
        eps = net(2 * x - float(a), t.float().reshape(1) * 999, type_t="timestep")[:, :3]
        ref = ((2 * x - float(a)) - 2 * float(s) * eps) / float(a)  # x0 in [-1, 1]
        assert torch.allclose(den(x, t), (ref + 1) / 2, atol=1e-4)


def test_diffusers_folder_needs_diffusers(pm, tmp_path):
    folder = tmp_path / "ddpm"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 32}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 1000}))
    prior = _load_prior(pm, folder)
    assert isinstance(prior, M.DiffusersPrior)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        with pytest.raises(CheckpointError, match=r"pip install 'restoreflow\[diffusers\]'"):
            prior.load()
    else:
        with pytest.raises(CheckpointError, match="safetensors"):
            prior.load()
    assert _load_prior(pm, tmp_path) is None  # a folder that is not a diffusers model is not ours


def test_diffusers_unet_folder_matches_diffusers_own_scheduler(pm, tmp_path):
    """A UNet2DModel + DDPMScheduler folder written by diffusers itself: our denoiser's x0 equals the scheduler's
    ``pred_original_sample`` (in [0, 1] units, where the state is ``(x_diffusers + sqrt(alphabar)) / 2``)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    folder = tmp_path / "ddpm"
    net.save_pretrained(folder / "unet", safe_serialization=True)
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    sch.save_pretrained(folder / "scheduler")
    prior = _load_prior(pm, folder)
    assert isinstance(prior, M.DiffusersPrior)
    den = prior.load()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for k in (10, 500, 900):
        a = float(sch.alphas_cumprod[k]) ** 0.5
        with torch.no_grad():
            ref = sch.step(net(2 * x - a, k).sample, k, 2 * x - a).pred_original_sample
            ours = den(x, torch.tensor(k / 999, dtype=torch.float64))
        assert float(((2 * ours - 1) - ref).abs().max()) < 1e-4 / a, k
    from restoreflow.app.api import restore

    res = restore(x[:1], "deblur", sampler="dps", prior=str(folder), steps=3, simulate=True)
    assert res.nfe == 3 and torch.isfinite(res.image).all()


def test_cards_of_other_methods_are_left_to_their_plugins(pm, tmp_path):
    w = tmp_path / "mr.safetensors"
    save_weights(w, {"x": torch.zeros(1)})
    write_card(tmp_path / "mr.json", {"method": "some-other-method", "architecture": {"class": "unet"}})
    assert M.load_prior(w, {}) is None
    # an unknown bare state dict is not claimed either
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    assert M.load_prior(tmp_path / "other.pt", {}) is None


def test_card_sampler_defaults_apply_unless_the_user_sets_them(pm, tmp_path):
    """A card's ``sampler_defaults`` tune a sampler for that prior; explicit options and --steps win."""
    import shutil

    from restoreflow.app.api import plan

    src = bundled._weights_dir() / "default.safetensors"
    w = tmp_path / "tuned.safetensors"
    shutil.copy(src, w)
    card = json.loads((bundled._weights_dir() / "default.json").read_text())
    card["sampler_defaults"] = {"red_diff": {"lam": 0.3, "lr": 0.04, "steps": 7}}
    write_card(tmp_path / "tuned.json", card)
    c = plan("deblur", sampler="red_diff", prior=str(w)).sampler.config
    assert (c.lam, c.lr, c.steps) == (0.3, 0.04, 7)
    c = plan("deblur", sampler="red_diff", prior=str(w), steps=5, sampler_options={"lam": 0.1}).sampler.config
    assert (c.lam, c.lr, c.steps) == (0.1, 0.04, 5)
    assert plan("deblur", sampler="dps", prior=str(w)).sampler.config == plan("deblur", sampler="dps").sampler.config
    shipped = json.loads((bundled._weights_dir() / "default.json").read_text())["sampler_defaults"]["red_diff"]
    c = plan("deblur", sampler="red_diff").sampler.config  # the bundled prior ships its own tuning
    assert (c.lam, c.lr) == (shipped["lam"], shipped["lr"])
