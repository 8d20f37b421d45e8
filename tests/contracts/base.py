"""What the contract suites share: the registries, the checks every configurable plugin passes (its ``Config``
read from command-line strings, one-line errors), and the meta-check that every registered plugin has a contract.

A contract class for one plugin::

    class TestGaussianBlur(OperatorContract):
        name = "gaussian_blur"                # the registered name
        config = {"sigma": 0.8}               # tiny, fast options for the checks
        bad_options = {"sigma": "-1"}         # outside the documented range: a one-line ConfigError naming it

``known_failures = {"test_name": "file:function: what is wrong"}`` marks one inherited check of one plugin as a
known library bug (``xfail(strict=True)``, applied in ``conftest.py``): it fails loudly once the bug is fixed.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import pytest

from restoreflow.core.errors import ConfigError, UnknownNameError
from restoreflow.core.options import build_config
from restoreflow.host.manager import collect, get_plugin_manager

#: everything installed, through the entry points (as ``tests/test_bench.py``)
REGISTRIES = collect(get_plugin_manager())

#: the capabilities a ``requires`` set may name (docs/samplers.md, "The class attributes")
CAPABILITIES = frozenset({"denoiser", "conditional", "unconditional", "linear_operator", "differentiable_operator",
                          "gaussian_noise"})


def option_string(value: Any) -> str:
    """``value`` as a user types it after ``-o key=`` (``none``, ``true``, ``1,2``...)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(option_string(v) for v in value)
    return str(value)


def malformed_string(annotation: Any) -> str | None:
    """A string that no value of ``annotation`` reads as (``None`` when any string could be valid)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "no-such-choice"
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        inner = [a for a in args if a is not type(None)]
        return malformed_string(inner[0]) if len(inner) == 1 else None
    if annotation in (int, float):
        return "not-a-number"
    if annotation is bool:
        return "maybe"
    return None


def assert_one_line(err: BaseException, *, mentions: str | None = None) -> None:
    text = str(err)
    assert text.strip() and "\n" not in text, f"not a one-line message: {text!r}"
    if mentions is not None:
        assert mentions in text, f"the message does not name {mentions!r}: {text!r}"


class PluginContract:
    """One registered plugin of one kind (``kind`` is the :class:`restoreflow.host.registry.Registries` field)."""

    kind: ClassVar[str]
    name: ClassVar[str]
    known_failures: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def registry(cls) -> Any:
        return getattr(REGISTRIES, cls.kind)

    @classmethod
    def plugin(cls) -> Any:
        return cls.registry().get(cls.name)

    @pytest.fixture(autouse=True)
    def _installed(self):
        # every contract names a plugin the README's install provides (the example package included)
        assert self.name in self.registry(), (f"{self.kind} {self.name!r} is not installed; run the README's first "
                                              "command (it installs examples/restoreflow-lowlight too)")

    def test_registered_under_its_own_name(self):
        assert self.plugin().name == self.name

    def test_has_a_one_line_description(self):
        cls = self.plugin()
        doc = (cls.__dict__.get("__doc__") or "").strip()
        assert doc, f"{cls.__qualname__} has no docstring (its first line is the listing's description)"
        describe = getattr(cls, "describe", None)
        if describe is not None:
            assert describe().strip() == doc.splitlines()[0].strip()


class ConfigContract(PluginContract):
    """A plugin with a ``Config`` dataclass of options, built by :func:`restoreflow.core.options.build_config`."""

    #: options the checks run with (small and fast)
    config: ClassVar[Mapping[str, Any]] = {}
    #: ``{option: string outside its documented range}``: each must be a one-line ConfigError naming the option
    bad_options: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def config_cls(cls) -> type:
        return cls.plugin().Config

    def test_config_is_a_frozen_dataclass_with_defaults(self):
        C = self.config_cls()
        assert dataclasses.is_dataclass(C) and C.__dataclass_params__.frozen
        required = [f.name for f in dataclasses.fields(C)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        assert not required, f"options without a default: {required}"
        build_config(C, dict(self.config), owner=self.name)  # the contract's own options are valid

    def test_config_round_trips_through_strings(self):
        """Every default, written as a user writes it on the command line, reads back as itself."""
        C = self.config_cls()
        default = C()
        strings = {f.name: option_string(getattr(default, f.name)) for f in dataclasses.fields(C)}
        for key, text in strings.items():
            got = getattr(build_config(C, {key: text}, owner=self.name), key)
            assert got == getattr(default, key), f"{key}={text} reads back as {got!r}"
        assert build_config(C, strings, owner=self.name) == default
        as_text = {k: option_string(v) for k, v in self.config.items()}
        assert build_config(C, as_text, owner=self.name) == build_config(C, dict(self.config), owner=self.name)

    def test_unknown_option_is_a_one_line_error(self):
        with pytest.raises(UnknownNameError) as e:
            build_config(self.config_cls(), {"no_such_option": "1"}, owner=self.name)
        assert_one_line(e.value, mentions="no_such_option")

    def test_malformed_values_are_one_line_config_errors(self):
        C = self.config_cls()
        hints = typing.get_type_hints(C)
        for f in dataclasses.fields(C):
            bad = malformed_string(hints[f.name])
            if bad is None:
                continue
            with pytest.raises(ConfigError) as e:
                build_config(C, {f.name: bad}, owner=self.name)
            assert_one_line(e.value, mentions=f.name)

    def test_out_of_range_values_are_one_line_config_errors(self):
        if not dataclasses.fields(self.config_cls()):  # no options: any option is an unknown name
            assert not self.bad_options
            with pytest.raises(UnknownNameError) as e:
                build_config(self.config_cls(), {"steps": "3"}, owner=self.name)
            assert_one_line(e.value, mentions="steps")
            return
        assert self.bad_options, "declare `bad_options`: a value outside the documented range of some option"
        for key, value in self.bad_options.items():
            with pytest.raises(ConfigError) as e:
                build_config(self.config_cls(), {key: value}, owner=self.name)
            assert_one_line(e.value, mentions=key)


def assert_every_plugin_has_a_contract(base: type, namespace: Mapping[str, Any]) -> None:
    """Every plugin registered in ``base.kind`` has exactly one ``Test*`` subclass of ``base`` in ``namespace``."""
    classes = [v for k, v in namespace.items()
               if k.startswith("Test") and isinstance(v, type) and issubclass(v, base) and v is not base]
    names = [c.name for c in classes]
    twice = sorted({n for n in names if names.count(n) > 1})
    assert not twice, f"more than one contract class for {twice}"
    missing = sorted(set(getattr(REGISTRIES, base.kind).names()) - set(names))
    assert not missing, (f"registered {base.kind} without a contract class: {missing}; add "
                         f"`class TestX({base.__name__}): name = ...` to {namespace.get('__name__')}")
