"""Weights are checked against the architecture before they are used: names, shapes, dtypes, finiteness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from restoreflow.core.errors import CheckpointError
from restoreflow.core.modelcard import load_into


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 3, 1))


def test_integer_weights_with_the_right_names_are_refused():
    net = _net()
    sd = {k: v.to(torch.int8) for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError, match="int8"):
        load_into(_net(), sd, source="w.safetensors")


def test_non_finite_weights_are_refused():
    sd = dict(_net().state_dict())
    sd["0.weight"] = sd["0.weight"].clone()
    sd["0.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        load_into(_net(), sd, source="w.safetensors")


def test_half_precision_weights_load_into_a_float_network():
    src = _net()
    sd = {k: v.half() for k, v in src.state_dict().items()}
    dst = load_into(_net(), sd)
    for k, v in dst.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, sd[k].float())


def test_shape_and_name_mismatches_are_one_line_errors():
    sd = dict(_net().state_dict())
    sd["0.weight"] = torch.zeros(4, 3, 5, 5)
    with pytest.raises(CheckpointError, match="shape"):
        load_into(_net(), sd)
    sd = dict(_net().state_dict())
    del sd["1.bias"]
    with pytest.raises(CheckpointError, match="missing"):
        load_into(_net(), sd)


def test_a_card_describing_a_huge_network_is_refused_before_any_allocation():
    import resource

    from restoreflow.models.nets import build_network

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="over the limit"):
        build_network("unet", in_channels=3, channels=[4096, 8192, 16384], blocks=4)  # ~10^10 parameters
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200


def test_card_arguments_must_be_plain_values():
    from restoreflow.models.nets import build_network

    with pytest.raises(CheckpointError, match="must be a number"):
        build_network("unet", channels={"a": 1})
    with pytest.raises(CheckpointError, match="cannot build"):
        build_network("unet", channels=[-3, 4])
    net = build_network("resunet", channels=[8, 16], blocks=1)
    assert sum(p.numel() for p in net.parameters()) > 0
