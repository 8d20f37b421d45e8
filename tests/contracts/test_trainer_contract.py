"""The training-method contract: what every registered ``TrainingMethod`` guarantees (``restoreflow.models``).

:class:`TrainerContract` holds the checks; each registered method has a ``Test*`` subclass naming it and the tiny
method options its network is built with. The loss is checked directly on 16-px crops, then one step runs through
the generic loop (:func:`restoreflow.models.train_loop.train`) on two 24-px images, as ``tests/test_train.py`` does,
and the card it writes is read back.
"""

from __future__ import annotations

import json
import math
from typing import ClassVar

import numpy as np
import pytest
import torch

from restoreflow.core.paths import AffinePath
from restoreflow.models import data as rfdata
from restoreflow.models.train_loop import TrainOptions, load_model, train

from contracts.base import REGISTRIES, ConfigContract, assert_every_plugin_has_a_contract

#: what every card the loop writes holds (``restoreflow.models.train_loop.train``; tests/test_train.py)
CARD_FIELDS = ("name", "method", "method_options", "architecture", "path", "prediction", "value_range", "conditional",
               "data", "steps", "batch", "crop", "lr", "ema", "seed", "channels", "command", "metrics", "final_loss",
               "created", "torch_version")
#: what a method's own ``card()`` must give to rebuild its model (``TrainingMethod.card``)
METHOD_CARD_FIELDS = ("path", "prediction", "value_range", "conditional")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two small PNGs: a fast training set (the builtin set takes seconds to load)."""
    from skimage import io as skio

    d = tmp_path_factory.mktemp("contract-imgs")
    for i in range(2):
        img = (rfdata.dead_leaves(24, seed=i) * 255).astype(np.uint8)
        skio.imsave(str(d / f"im{i}.png"), img, check_contrast=False)
    return d


class TrainerContract(ConfigContract):
    kind = "trainers"
    #: base feature count of the tiny network (8: the RDDM UNets need a multiple of 8)
    width: ClassVar[int] = 8

    def method(self):
        return self.plugin()(**self.config)

    def batch(self, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Two clean 16-px crops in [0, 1] and, for a conditional method, their blurred copies (the anchors)."""
        x0 = torch.rand(2, channels, 16, 16, generator=torch.Generator().manual_seed(0))
        if not self.plugin().conditional:
            return x0, None
        op = REGISTRIES.operators.get("gaussian_blur")(x_shape=tuple(x0.shape), sigma=1.0, noise_sigma=0.0)
        return x0, op.A(x0)

    @pytest.fixture(scope="class")
    def net(self):
        with torch.random.fork_rng():
            torch.manual_seed(0)  # parameter initialisation, as the loop does
            return self.method().build_network(channels=3, width=self.width)

    # -- declarations --------------------------------------------------------------------------------------
    def test_default_sampler_fits_the_model(self):
        cls = self.plugin()
        assert cls.default_sampler in REGISTRIES.samplers, f"default_sampler {cls.default_sampler!r} is not registered"
        requires = REGISTRIES.samplers.get(cls.default_sampler).requires
        if cls.conditional:
            assert "conditional" in requires, "a conditional model's default sampler must run conditional models"
        else:
            assert "conditional" not in requires

    def test_card_rebuilds_the_model(self):
        card = self.method().card()
        missing = [k for k in METHOD_CARD_FIELDS if k not in card]
        assert not missing, f"card() lacks {missing}"
        assert card["conditional"] is self.plugin().conditional
        json.dumps(card)  # plain data

    # -- one loss step -------------------------------------------------------------------------------------
    def test_one_loss_step(self, net):
        """A finite scalar loss, drawn only from the generator (the same generator, the same loss), whose gradient
        reaches the network."""
        method = self.method()
        x0, mu = self.batch()
        before = torch.get_rng_state()
        loss = method.loss(net, x0, mu, generator=torch.Generator().manual_seed(1))
        assert torch.equal(before, torch.get_rng_state()), "the loss drew from the global random stream"
        again = method.loss(net, x0, mu, generator=torch.Generator().manual_seed(1))
        assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
        assert torch.equal(loss.detach(), again.detach()), "the same generator gave another loss"
        net.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().max() > 0 for g in grads)
        net.zero_grad(set_to_none=True)

    def test_denoiser_wraps_the_net(self, net):
        den = self.method().denoiser(net)
        assert isinstance(den.path, AffinePath)
        assert bool(getattr(den, "conditional", False)) == self.plugin().conditional == den.path.anchored
        x0, mu = self.batch()
        t = torch.tensor(0.5, dtype=torch.float64)
        xt, _ = den.path.sample(x0, t, generator=torch.Generator().manual_seed(2), anchor=mu)
        with torch.no_grad():
            out = den(xt, t, anchor=mu)
        assert out.shape == x0.shape and out.dtype == x0.dtype and torch.isfinite(out).all()

    def test_one_channel_images(self):
        """``restoreflow train --channels 1`` (grayscale data): the network, loss and denoiser take 1 channel."""
        method = self.method()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = method.build_network(channels=1, width=self.width)
        x0, mu = self.batch(channels=1)
        loss = method.loss(net, x0, mu, generator=torch.Generator().manual_seed(1))
        assert loss.ndim == 0 and torch.isfinite(loss)
        den = method.denoiser(net)
        t = torch.tensor(0.5, dtype=torch.float64)
        xt, _ = den.path.sample(x0, t, generator=torch.Generator().manual_seed(2), anchor=mu)
        with torch.no_grad():
            assert den(xt, t, anchor=mu).shape == x0.shape

    # -- through the loop ----------------------------------------------------------------------------------
    def test_one_training_step_writes_a_card_that_loads(self, folder, tmp_path):
        cls = self.plugin()
        o = TrainOptions(method=self.name, task="deblur" if cls.conditional else None, steps=1, batch=1, crop=16,
                         width=self.width, data=str(folder), eval_size=16, eval_crops=1, eval_steps=2, threads=1,
                         method_options=dict(self.config))
        card = train(o, tmp_path, registries=REGISTRIES, progress=False)
        missing = [k for k in CARD_FIELDS if k not in card]
        assert not missing, f"the card lacks {missing}"
        assert card["method"] == self.name and card["steps"] == 1 and card["conditional"] is cls.conditional
        assert math.isfinite(card["final_loss"])
        weights = tmp_path / f"{card['name']}.safetensors"
        assert json.loads(weights.with_suffix(".json").read_text()) == json.loads(json.dumps(card))
        loaded = load_model(weights, registries=REGISTRIES)
        x0, mu = self.batch()
        t = torch.tensor(0.5, dtype=torch.float64)
        xt, _ = loaded.denoiser.path.sample(x0, t, generator=torch.Generator().manual_seed(3), anchor=mu)
        with torch.no_grad():
            out = loaded.denoiser(xt, t, anchor=mu)
        assert out.shape == x0.shape and torch.isfinite(out).all()


# -- one contract per registered training method -------------------------------------------------------------


class TestDenoiserMethod(TrainerContract):
    name = "denoiser"
    config = {"mult": "1,2"}
    bad_options = {"p_std": "0", "p_uniform": "2", "mult": "0", "arch": "vit"}


class TestMRMethod(TrainerContract):
    name = "mr"
    config = {"depth": 1, "T": 10}
    bad_options = {"depth": "9", "norm": "l3", "loss": "hinge"}


class TestRDDMMethod(TrainerContract):
    name = "rddm"
    config = {"dim_mults": "1,2", "T": 10}
    bad_options = {"T": "1", "sum_scale": "0"}


class TestResfusionMethod(TrainerContract):
    name = "resfusion"
    config = {"dim_mults": "1,2"}
    bad_options = {"T": "1", "mode": "velocity"}


def test_every_registered_training_method_has_a_contract():
    assert_every_plugin_has_a_contract(TrainerContract, globals())
