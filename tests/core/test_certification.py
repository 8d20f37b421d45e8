"""Typed certification declarations, and the legacy ``bench`` dicts third-party plugins may still carry."""

import pytest

from restoreflow.core.certification import (
    FlowMap, OperatorOnly, Posterior, Report, certification_of, check_report_bounded,
)
from restoreflow.core.errors import ConfigError


def test_legacy_dict_is_read_as_the_typed_declaration():
    class Old:
        name = "old"
        bench = {"kind": "flow_map", "order": 2, "steps": [4, 8, 16], "options": {"clip": False}}

    cert = certification_of(Old)
    assert cert == FlowMap(order=2, steps=(4, 8, 16), options={"clip": False})


def test_typed_declaration_wins_and_missing_is_none():
    class New:
        certification = Posterior(steps=50)
        bench = {"kind": "report"}

    assert certification_of(New) == Posterior(steps=50)
    assert certification_of(type("Nothing", (), {})) is None


@pytest.mark.parametrize("bad", [{"kind": "flow_map", "order": 1, "tol": 1e-3}, {"kind": "exactish"}])
def test_unknown_kinds_and_keys_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match="bench"):
        certification_of(type("Bad", (), {"name": "bad", "bench": bad}))


def test_declarations_validate_and_are_keyword_only():
    with pytest.raises(ConfigError):
        FlowMap(order=1, steps=(8, 4))
    with pytest.raises(TypeError):
        OperatorOnly("denoise")  # keyword only: a declaration reads as what it says
    assert Report().kind == "report" and OperatorOnly(operator="denoise").channels == 1


def test_every_registered_sampler_declares_a_typed_certification():
    import restoreflow as rf

    for name, cls in rf.default_registries().samplers.items():
        if cls.__module__.startswith("restoreflow_plugins"):
            assert "certification" in vars(cls) or any("certification" in vars(b) for b in cls.__mro__[1:-1]
                                                        if b.__module__.startswith("restoreflow_plugins")), name


def _first_party_samplers():
    import restoreflow as rf

    samplers = rf.default_registries().samplers
    return {name: samplers.get(name) for name in samplers.names()
            if samplers.get(name).__module__.startswith("restoreflow_plugins")}


def test_report_bounds_must_be_positive():
    for bad in ({"max_error": 0.0}, {"max_error": -1.0}, {"samples": 0}):
        with pytest.raises(ConfigError, match="Report needs"):
            Report(**bad)
    assert Report(max_error=0.1).max_error == 0.1


def test_every_first_party_report_cell_is_bounded():
    """The meta-check: a first-party sampler certified by ``Report`` sets ``max_error`` (the measured error with its
    margin), so the exact bench fails when a change makes it worse."""
    reported = []
    for name, cls in _first_party_samplers().items():
        check_report_bounded(cls)
        if certification_of(cls).kind == "report":
            reported.append(name)
    # the samplers without an exact target on the bench (2026-12-07); the check above ran on each of them
    assert {"dpir", "dps", "flowchef", "pinv", "resfusion", "tv", "tv3d"} <= set(reported)


def test_an_unbounded_report_cell_is_refused():
    unbounded = type("Loose", (), {"name": "loose", "certification": Report(samples=16)})
    with pytest.raises(ConfigError, match="'loose': its Report certification bounds nothing"):
        check_report_bounded(unbounded)
    legacy = type("OldLoose", (), {"name": "old-loose", "bench": {"kind": "report"}})
    with pytest.raises(ConfigError, match="bounds nothing"):
        check_report_bounded(legacy)
    check_report_bounded(type("Bounded", (), {"name": "b", "certification": Report(max_error=0.2)}))
    check_report_bounded(type("Exact", (), {"name": "e", "certification": Posterior(steps=10)}))


def test_an_error_above_the_declared_bound_fails_certification():
    """``certify_sampler`` holds a Report cell to its ``max_error``: the pseudo-inverse (deterministic) with a bound
    just below its measured error fails, just above passes."""
    from restoreflow.testing import certify_sampler

    pinv = _first_party_samplers()["pinv"]
    measured = certify_sampler(pinv)["mean_err"]
    assert 0 < measured <= pinv.certification.max_error
    tight = type("TightPinv", (pinv,), {"certification": Report(max_error=0.9 * measured)})
    with pytest.raises(AssertionError, match=r"pinv: error to the posterior mean .* > declared max_error"):
        certify_sampler(tight)
    loose = type("LoosePinv", (pinv,), {"certification": Report(max_error=1.1 * measured)})
    assert certify_sampler(loose)["mean_err"] == measured
