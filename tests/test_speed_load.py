"""#21: bundled networks are built for their weights without torch's random initialisation (a ``meta`` build made
real and given the weights, ``restoreflow.models.nets.materialize``), and the loaded models are the same as the
normal build + ``load_into`` gives, bit for bit; networks holding tensors a state dict does not restore are still
built normally."""

import pytest
import torch
from torch import nn

from restoreflow.core.modelcard import load_into, load_state_dict
from restoreflow.host.manager import default_registries
from restoreflow.models import nets

BUNDLED = ["default", "mr-deblur", "rddm-deblur", "resfusion-deblur"]


def _call(den, size=32):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, size, size, generator=g)
    kw = {"anchor": torch.rand(1, 3, size, size, generator=g)} if getattr(den, "conditional", False) else {}
    t = torch.tensor(0.5 * (den.path.t_min + den.path.t_max))
    with torch.no_grad():
        return den(x, t, **kw)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_equals_the_initialised_build(name, monkeypatch):
    prior = default_registries().priors.get(name)
    built = []
    real = nets.materialize
    monkeypatch.setattr(nets, "materialize", lambda *a, **k: built.append(1) or real(*a, **k))
    fast = prior().load(x_shape=(1, 3, 32, 32))
    assert built and all(n is not None for n in built)  # the fast path ran (the network holds no unsaved tensor)
    monkeypatch.setattr(nets, "materialize", lambda *a, **k: None)  # today's path: random init, then the weights
    slow = prior().load(x_shape=(1, 3, 32, 32))
    a, b = fast.state_dict(), slow.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and not a[k].is_meta and torch.equal(a[k], b[k]), k
    assert all(not p.is_meta for p in fast.parameters()) and all(not p.requires_grad for p in fast.parameters())
    assert torch.equal(_call(fast), _call(slow))


def test_materialize_gives_the_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Linear(4, 2))
    save_file({k: v.half() for k, v in ref.state_dict().items()}, tmp_path / "w.safetensors")
    probe = nets.probe_network(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Linear(4, 2)), "toy")
    assert all(p.is_meta for p in probe.parameters())
    net = nets.materialize(probe, load_state_dict(tmp_path / "w.safetensors"))
    for k, v in ref.state_dict().items():
        assert net.state_dict()[k].dtype == torch.float32 and torch.equal(net.state_dict()[k], v.half().float())


class _Unsaved(nn.Module):
    """A non-persistent buffer and a plain tensor attribute, both computed in ``__init__``."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("scale", torch.linspace(1.0, 2.0, 3).reshape(1, 3, 1, 1), persistent=False)
        self.shift = torch.full((1, 3, 1, 1), 0.25)

    def forward(self, x):
        return self.conv(x) * self.scale + self.shift


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight


@pytest.mark.parametrize("cls", [_Unsaved, _Tied])
def test_unsaved_tensors_are_built_normally(cls):
    probe = nets.probe_network(cls, "toy")
    assert nets._unsaved_tensors(probe)
    assert nets.materialize(probe, {k: torch.zeros(v.shape) for k, v in probe.state_dict().items()}) is None


def test_build_for_weights_keeps_non_persistent_buffers(tmp_path):
    from safetensors.torch import save_file

    nets.register_architecture("_speed_test_unsaved")(_Unsaved)
    try:
        torch.manual_seed(1)
        ref = _Unsaved()
        save_file(ref.state_dict(), tmp_path / "u.safetensors")
        net = nets.build_for_weights("_speed_test_unsaved", {}, tmp_path / "u.safetensors")
        load_into(net, load_state_dict(tmp_path / "u.safetensors"))
        x = torch.rand(1, 3, 5, 5, generator=torch.Generator().manual_seed(2))
        assert torch.equal(net.scale, ref.scale) and torch.equal(net.shift, ref.shift)
        assert torch.equal(net(x), ref(x))
    finally:
        nets._ARCH.pop("_speed_test_unsaved", None)


def test_probe_skips_initialisation_only_on_meta():
    """The probe's skipped init ops leave real builds' random initialisation (and the global RNG) as they were."""
    torch.manual_seed(5)
    a = nn.Conv2d(3, 4, 3).state_dict()
    torch.manual_seed(5)
    nets.probe_network(lambda: nn.Conv2d(3, 4, 3), "toy")
    b = nn.Conv2d(3, 4, 3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with nets._skip_meta_init():  # a real tensor's init still runs
        w = torch.zeros(3)
        nn.init.ones_(w)
        w.uniform_(2.0, 3.0)
    assert bool((w >= 2).all())


def test_loading_imports_no_sympy():
    """``Module.to_empty`` on meta tensors imports sympy through torch._refs (1-1.5 s CPU in a fresh process):
    loading a bundled model must not."""
    import subprocess
    import sys

    code = ("import sys\nfrom restoreflow.host.manager import default_registries\n"
            "default_registries().priors.get('default')().load(x_shape=(1, 3, 32, 32))\n"
            "print('sympy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-1000:]
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_weights_are_read_once(name, monkeypatch):
    """Before: the MR loader read its weights twice (``build_for_weights`` materialised them, then ``load_into``
    loaded the same file again)."""
    import safetensors.torch as st

    reads = []
    real = st.load_file
    monkeypatch.setattr(st, "load_file", lambda path, *a, **k: reads.append(str(path)) or real(path, *a, **k))
    default_registries().priors.get(name)().load(x_shape=(1, 3, 32, 32))
    weights = [p for p in reads if not p.endswith(".gaussian.safetensors")]
    assert len(weights) == 1, reads
