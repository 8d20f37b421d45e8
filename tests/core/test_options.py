"""Declarative options (restoreflow.core.options): ``Literal`` choices and ``Range`` bounds checked for strings
(CLI) and typed values (API) alike, on direct construction of an ``Options`` config, listed by
``restoreflow samplers NAME``; and the contract that replaces the plugins' hand-written checks: every declared
bound of every first-party ``Config`` rejects the value just outside it and accepts the value just inside."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Annotated, Literal

import pytest
from click.testing import CliRunner

from restoreflow.core.errors import ConfigError
from restoreflow.core.options import (
    Clip, Eta, Options, Range, Seed, Steps, build_config, describe_type, option_docs, option_types, validate_value,
)


@dataclass(frozen=True)
class Demo(Options):
    steps: Steps = 20
    eta: Eta = 0.0
    #: denoiser noise level of the first iteration
    sigma_start: Annotated[float, Range(0, 1, lo_open=True)] = 0.5
    sigma_end: Annotated[float, Range(0)] = 0.0
    size: Annotated[int, Range(3, 129)] = 15
    arc: Annotated[float, Range(0, 360, lo_open=True, unit="degrees")] = 180.0
    box: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.3
    space: Literal["data", "noise"] = "data"
    ensemble: Literal[1, 2, 4, 8] = 1
    weight: Literal[0.5, 1.0] = 1.0
    chunk: Annotated[int, Range(1)] | None = None
    tau2: Annotated[float | None, Range(0, lo_open=True)] = None
    threshold: Annotated[float, Range(0, 1)] | Literal["always"] = 0.5
    levels: tuple[Annotated[float, Range(0, 1)], ...] = (0.25,)
    gains: Annotated[tuple[float, ...], Range(0, lo_open=True)] = (1.0,)
    clip: Clip = True
    seed: Seed = 0
    name: str = "x"

    def __post_init__(self):
        super().__post_init__()
        if self.sigma_end > self.sigma_start:
            raise ConfigError(f"sigma_end must be <= sigma_start; got {self.sigma_end}")


def _error(values) -> str:
    with pytest.raises(ConfigError) as e:
        build_config(Demo, values, owner="demo")
    return str(e.value)


@pytest.mark.parametrize("values,message", [
    ({"steps": 0}, "steps must be in [1, 100000]; got 0"),
    ({"steps": "0"}, "steps must be in [1, 100000]; got 0"),
    ({"steps": 100001}, "steps must be in [1, 100000]; got 100001"),
    ({"eta": 1.5}, "eta must be in [0, 1]; got 1.5"),
    ({"eta": "-0.1"}, "eta must be in [0, 1]; got -0.1"),
    ({"eta": float("nan")}, "eta must be in [0, 1]; got nan"),
    ({"sigma_start": 0}, "sigma_start must be in (0, 1]; got 0"),
    ({"sigma_start": "1.5"}, "sigma_start must be in (0, 1]; got 1.5"),
    ({"size": 130}, "size must be in [3, 129]; got 130"),
    ({"arc": 0.0}, "arc must be in (0, 360] degrees; got 0.0"),
    ({"box": "1"}, "box must be in (0, 1); got 1.0"),
    ({"space": "pixel"}, "space must be one of data, noise; got 'pixel'"),
    ({"ensemble": 3}, "ensemble must be one of 1, 2, 4, 8; got 3"),
    ({"ensemble": "3"}, "ensemble must be one of 1, 2, 4, 8; got '3'"),
    ({"weight": "0.7"}, "weight must be one of 0.5, 1.0; got '0.7'"),
    ({"chunk": 0}, "chunk must be >= 1; got 0"),
    ({"chunk": "0"}, "chunk must be >= 1; got 0"),
    ({"tau2": 0.0}, "tau2 must be > 0; got 0.0"),
    ({"threshold": 2}, "threshold must be in [0, 1]; got 2"),
    ({"threshold": "sometimes"}, "threshold must be float in [0, 1] or one of always; got 'sometimes'"),
    ({"levels": "0.5,1.5"}, "levels must be in [0, 1]; got 1.5"),
    ({"levels": (0.5, -1.0)}, "levels must be in [0, 1]; got -1.0"),
    ({"gains": (1.0, 0.0)}, "gains must be > 0; got 0.0"),
    ({"steps": "many"}, "option steps expects int; got 'many'"),
    ({"sigma_start": 0.1, "sigma_end": 0.2}, "sigma_end must be <= sigma_start; got 0.2"),
])
def test_bounds_and_choices_for_strings_and_typed_values(values, message):
    assert _error(values) == message


def test_values_inside_are_taken_and_converted():
    c = build_config(Demo, {"steps": "1", "eta": "1", "sigma_start": 1, "ensemble": "8", "weight": "1", "chunk": "none",
                            "tau2": "0.5", "threshold": "always", "levels": "0,1", "gains": (2.0,), "seed": "-1"})
    assert (c.steps, c.eta, c.sigma_start, c.ensemble, c.weight) == (1, 1.0, 1, 8, 1.0)
    assert isinstance(c.ensemble, int) and isinstance(c.weight, float)
    assert c.chunk is None and c.tau2 == 0.5 and c.threshold == "always" and c.levels == (0.0, 1.0) and c.seed == -1
    assert build_config(Demo, {"threshold": "0.25", "chunk": 4}).threshold == 0.25


def test_direct_construction_checks_the_declarations():
    """``Config(...)`` with no build_config in between: Options.__post_init__ checks every field (defaults too)."""
    with pytest.raises(ConfigError, match=r"^steps must be in \[1, 100000\]; got 0$"):
        Demo(steps=0)
    with pytest.raises(ConfigError, match=r"^ensemble must be one of 1, 2, 4, 8; got 3$"):
        Demo(ensemble=3)
    with pytest.raises(ConfigError, match="chunk must be >= 1"):
        Demo(chunk=0)
    with pytest.raises(ConfigError, match=r"steps must be a number in \[1, 100000\]; got 'x'"):
        Demo(steps="x")
    with pytest.raises(ConfigError, match="sigma_end must be <= sigma_start"):  # the cross-field check still runs
        Demo(sigma_start=0.1, sigma_end=0.2)
    assert Demo(chunk=None, tau2=None).chunk is None
    with pytest.raises(ConfigError, match=r"steps must be in \[1, 100000\]"):
        dataclasses.replace(Demo(), steps=0)


def test_a_plain_dataclass_is_checked_by_build_config():
    """A Config that does not derive from Options (a third-party one) still gets its declarations checked by
    build_config; direct construction is then unchecked."""

    @dataclass(frozen=True)
    class Plain:
        steps: Annotated[int, Range(1)] = 3
        mode: Literal["a", "b"] = "a"

    with pytest.raises(ConfigError, match="steps must be >= 1; got 0"):
        build_config(Plain, {"steps": 0})
    with pytest.raises(ConfigError, match="mode must be one of a, b; got 'c'"):
        build_config(Plain, {"mode": "c"})
    assert Plain(steps=0).steps == 0


def test_range_is_declared_sensibly():
    with pytest.raises(TypeError):
        Range()
    with pytest.raises(TypeError):
        Range(2, 1)
    assert Range(1).describe() == ">= 1" and Range(0, lo_open=True).describe() == "> 0"
    assert Range(None, 5).describe() == "<= 5" and Range(0.0, 1.0, hi_open=True).describe() == "in [0, 1)"
    assert not Range(0, 1).contains(float("nan"))


def test_validate_value_walks_optional_union_and_tuples():
    validate_value("x", None, typing.Optional[Annotated[int, Range(1)]])
    validate_value("x", (1, 2), tuple[Annotated[int, Range(1)], Annotated[int, Range(2)]])
    with pytest.raises(ConfigError, match="x must be >= 2; got 1"):
        validate_value("x", (1, 1), tuple[Annotated[int, Range(1)], Annotated[int, Range(2)]])
    validate_value("x", "anything", str)  # no declaration: nothing to check


def test_describe_and_docs():
    types = option_types(Demo)
    assert types["steps"] == "int in [1, 100000]" and types["eta"] == "float in [0, 1]"
    assert types["sigma_start"] == "float in (0, 1]" and types["arc"] == "float in (0, 360] degrees"
    assert types["space"] == "one of data, noise" and types["ensemble"] == "one of 1, 2, 4, 8"
    assert types["chunk"] == "int >= 1 or none" and types["levels"] == "list of float in [0, 1]"
    assert types["threshold"] == "float in [0, 1] or one of always" and types["name"] == "str"
    assert types["seed"] == "int in [-2^63, 2^64 - 1]"
    assert describe_type(bool) == "bool"
    docs = option_docs(Demo)
    assert docs["sigma_start"] == "denoiser noise level of the first iteration"
    assert docs["clip"] == "clamp the estimate to the image's data range"  # the shared group's Doc


def test_the_listing_shows_each_options_values():
    from restoreflow.app.cli import build_cli
    from restoreflow.app.listings import registry_entries
    from restoreflow.host.manager import get_plugin_manager

    cli = build_cli(get_plugin_manager())
    dpir = next(e for e in registry_entries("samplers", cli.registries) if e["name"] == "dpir")
    rows = {r[0]: r for r in dpir["options"]}
    assert rows["steps"][1:] == ["8", "HQS iterations (= network calls)", "int in [1, 100000]"]
    assert rows["init"][3] == "one of auto, anchor, wiener, biharmonic"
    res = CliRunner().invoke(cli, ["samplers", "dpir"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for needle in ("values", "int in [1, 100000]", "float in (0, 1]", "one of auto, anchor, wiener, biharmonic"):
        assert needle in text, needle
    res = CliRunner().invoke(cli, ["operators", "gaussian_blur"])
    assert "float in (0, 50] pixels" in res.output and "one of circular, reflect, replicate, valid" in res.output
    res = CliRunner().invoke(cli, ["correctors", "smc"])
    assert "float in [0, 1] or one of always" in " ".join(res.output.split())


# -- the contract over every first-party Config -------------------------------------------------------------


def _first_party_configs():
    from restoreflow.plugin_api import default_registries

    regs = default_registries()
    out = []
    for attr in ("samplers", "operators", "guidance", "correctors", "trainers"):
        for name, obj in getattr(regs, attr).items():
            cfg = getattr(obj, "Config", None)
            if cfg is None or not dataclasses.is_dataclass(cfg):
                continue
            if not obj.__module__.startswith(("restoreflow_plugins", "restoreflow.")):
                continue
            out.append((f"{attr}:{name}", obj, cfg))
    return out


CONFIGS = _first_party_configs()


def _declared(annotation):
    """(base type, Range) pairs and Literal choices declared in ``annotation`` (through Optional/unions)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        ranges = [(args[0], m) for m in args[1:] if isinstance(m, Range)]
        inner_ranges, literals = _declared(args[0])
        return ranges + inner_ranges, literals
    if origin is Literal:
        return [], [args]
    if args and origin not in (tuple, list):
        ranges, literals = [], []
        for a in args:
            r, lit = _declared(a)
            ranges += r
            literals += lit
        return ranges, literals
    return [], []


def _number_type(base):
    if typing.get_origin(base) is not None:  # Optional[int] inside Annotated
        base = next(a for a in typing.get_args(base) if a is not type(None))
    return int if base is int else float


def _edges(base, rng: Range):
    """(value, inside) pairs: each finite bound and the representable number just beyond it."""
    kind = _number_type(base)
    out = []
    for bound, is_open, outward in ((rng.lo, rng.lo_open, -math.inf), (rng.hi, rng.hi_open, math.inf)):
        if bound is None:
            continue
        if kind is int:
            step = -1 if outward < 0 else 1
            inside, outside = (int(bound) - step, int(bound)) if is_open else (int(bound), int(bound) + step)
        else:
            beyond = math.nextafter(float(bound), outward)
            within = math.nextafter(float(bound), -outward)
            inside, outside = (within, float(bound)) if is_open else (float(bound), beyond)
        out += [(inside, True), (outside, False)]
    return out


def _cases():
    cases = []
    for label, obj, cfg in CONFIGS:
        hints = typing.get_type_hints(cfg, include_extras=True)
        for f in dataclasses.fields(cfg):
            ranges, _ = _declared(hints[f.name])
            for base, rng in ranges:
                for value, inside in _edges(base, rng):
                    cases.append(pytest.param(cfg, f.name, value, inside, id=f"{label}.{f.name}={value!r}"))
    return cases


def test_first_party_configs_declare_bounds():
    """The sweep below has something to sweep: the plugins' bounds are declarations, not hand-written checks."""
    assert len(_cases()) >= 100


@pytest.mark.parametrize("cfg,field,value,inside", _cases())
def test_every_declared_range_rejects_just_outside_and_accepts_just_inside(cfg, field, value, inside):
    for given in (value, repr(value)):  # typed (API) and string (CLI)
        if inside:
            assert getattr(build_config(cfg, {field: given}), field) == value
        else:
            with pytest.raises(ConfigError, match=field):
                build_config(cfg, {field: given})
    if issubclass(cfg, Options):
        if inside:
            cfg(**{field: value})
        else:
            with pytest.raises(ConfigError, match=field):
                cfg(**{field: value})


@pytest.mark.parametrize("label,obj,cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_declared_choices_reject_other_values_and_configs_check_on_construction(label, obj, cfg):
    hints = typing.get_type_hints(cfg, include_extras=True)
    declares = False
    for f in dataclasses.fields(cfg):
        ranges, literals = _declared(hints[f.name])
        declares = declares or bool(ranges or literals)
        for choices in literals:
            bad = "__not_a_choice__" if all(isinstance(c, str) for c in choices) else max(
                c for c in choices if not isinstance(c, str)) + 1
            with pytest.raises(ConfigError, match=f.name):
                build_config(cfg, {f.name: bad})
    cfg()  # the defaults satisfy the declarations
    if declares:  # so that Sampler.Config(steps=0) fails as build_config does
        assert issubclass(cfg, Options), f"{label}: {cfg.__qualname__} declares option values but is not an Options"
