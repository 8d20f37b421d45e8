"""Typed certification declarations, and the legacy ``bench`` dicts third-party plugins may still carry."""

import pytest

from restoreflow.core.certification import FlowMap, OperatorOnly, Posterior, Report, certification_of
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
