"""Planning a bench: methods (``SAMPLER[+GUIDANCE][+CORRECTOR][@PRIOR]`` and peers from other libraries),
where each ``-o`` option goes, and the grid of cells -- all resolved before the first image is read."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from restoreflow.core.errors import (
    ConfigError, IncompatibleError, RestoreflowError,
)
from restoreflow.host.registry import Registries
from restoreflow.core.options import build_config, config_fields, parse_options



F64 = torch.float64


# -- peers: other libraries' samplers on our denoiser and operator ------------------------------------


class _DeepinvDenoiser(torch.nn.Module):
    r"""A restoreflow x0-denoiser as a deepinv denoiser ``forward(x, sigma)``, where :math:`x = x_0 + \sigma n`
    in [0, 1] units: on our path the state with noise-to-signal ratio :math:`\sigma` is :math:`a(t)\,x`.
    Counts its calls (the NFE)."""

    def __init__(self, den: Any):
        super().__init__()
        self.den = den
        self.calls = 0
        self._times: dict[float, tuple[Tensor, float]] = {}

    def forward(self, x: Tensor, sigma: Any, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        if s not in self._times:
            t = self.den.path.t_from_nsr(torch.tensor(max(s, 1e-8), dtype=F64))
            self._times[s] = (t, float(self.den.path.a(t)))
        t, a = self._times[s]
        return self.den((a * x).to(torch.float32), t).to(x.dtype)


def _deepinv_physics(op: Any, sigma_y: float) -> Any:
    import deepinv as dinv

    return dinv.physics.LinearPhysics(A=lambda x, **_: op.A(x), A_adjoint=lambda y, **_: op.A_adjoint(y),
                                      noise_model=dinv.physics.GaussianNoise(sigma=max(float(sigma_y), 1e-4)))


def _peer_deepinv_dps(den: Any, op: Any, y: Tensor, steps: int, seed: int, options: Mapping[str, Any],
                      device: torch.device) -> tuple[Tensor, int]:
    import deepinv as dinv

    wrap = _DeepinvDenoiser(den)
    physics = _deepinv_physics(op, options["sigma_y"])
    gen = torch.Generator(device=device).manual_seed(int(seed))
    # num_steps time points = steps denoiser calls (the ancestral solver never calls it at the last point)
    model = dinv.sampling.DPS(wrap, num_steps=int(steps) + 1, weight=float(options["weight"]), rng=gen, device=device)
    out = model(y, physics, x_init=tuple(op.x_shape), seed=int(seed))
    return out.detach(), wrap.calls


def _peer_deepinv_diffpir(den: Any, op: Any, y: Tensor, steps: int, seed: int, options: Mapping[str, Any],
                          device: torch.device) -> tuple[Tensor, int]:
    import deepinv as dinv

    wrap = _DeepinvDenoiser(den)
    physics = _deepinv_physics(op, options["sigma_y"])
    model = dinv.sampling.DiffPIR(wrap, dinv.optim.data_fidelity.L2(), sigma=max(float(options["sigma_y"]), 1e-4),
                                  max_iter=int(steps), zeta=float(options["zeta"]), lambda_=float(options["lambda_"]),
                                  device=device)
    # DiffPIR draws from torch's global generator: seed it inside a forked RNG state (nothing leaks out)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        out = model(y, physics)
    return out.detach(), wrap.calls


@dataclass(frozen=True)
class Peer:
    """A method of another library, run on our denoiser, operator and measurement."""

    name: str
    run: Callable[..., tuple[Tensor, int]]
    options: Mapping[str, float]
    help: str


PEERS: dict[str, Peer] = {
    "deepinv-dps": Peer("deepinv-dps", _peer_deepinv_dps, {"weight": 1.0},
                        "deepinv.sampling.DPS (DDPM steps on deepinv's VP schedule; weight: its step size)"),
    "deepinv-diffpir": Peer("deepinv-diffpir", _peer_deepinv_diffpir, {"zeta": 0.1, "lambda_": 7.0},
                            "deepinv.sampling.DiffPIR (HQS with a denoiser; zeta, lambda_: its defaults)"),
}


# -- methods, options and the grid ---------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One ``SAMPLER[+GUIDANCE][+CORRECTOR][@PRIOR]`` (or peer) token."""

    token: str
    sampler: str | None = None
    guidance: str | None = None
    corrector: str | None = None
    peer: str | None = None
    prior: str | None = None

    @property
    def name(self) -> str:
        """The token without its ``@prior``."""
        return self.token.split("@", 1)[0]

    def components(self) -> list[tuple[str, str]]:
        """``(kind, name)`` of each part: kind is sampler, guidance, corrector or peer."""
        out = [("peer", self.peer)] if self.peer else [("sampler", self.sampler)]
        out += [(k, n) for k, n in (("guidance", self.guidance), ("corrector", self.corrector)) if n]
        return out  # type: ignore[return-value]


def parse_method(token: str, regs: Registries) -> Method:
    """Parse one method token (names are checked against the registries, with suggestions)."""
    tok = token.strip()
    if not tok:
        raise ConfigError("empty method name in the method list")
    body, _, prior = tok.partition("@")
    if "@" in tok and not prior.strip():
        raise ConfigError(f"method {tok!r}: nothing after '@' (write METHOD@PRIOR)")
    parts = [p.strip() for p in body.split("+")]
    if any(not p for p in parts):
        raise ConfigError(f"method {tok!r} has an empty part (write SAMPLER[+GUIDANCE][+CORRECTOR][@PRIOR])")
    first, rest = parts[0], parts[1:]
    if first in PEERS:
        if rest:
            raise ConfigError(f"peer {first} takes no guidance or corrector")
        return Method(tok, peer=first, prior=prior.strip() or None)
    regs.samplers.get(first)  # unknown names raise with suggestions
    guidance = corrector = None
    for p in rest:
        if p in regs.guidance and guidance is None:
            guidance = p
        elif p in regs.correctors and corrector is None:
            corrector = p
        elif p in regs.guidance or p in regs.correctors:
            raise ConfigError(f"method {tok!r} names two {'guidances' if p in regs.guidance else 'correctors'}")
        else:
            from restoreflow.core.errors import UnknownNameError

            raise UnknownNameError("guidance or corrector", p, list(regs.guidance) + list(regs.correctors))
    return Method(tok, sampler=first, guidance=guidance, corrector=corrector, prior=prior.strip() or None)


def parse_methods(spec: str | Sequence[str], regs: Registries) -> list[Method]:
    tokens = spec.split(",") if isinstance(spec, str) else list(spec)
    methods = [parse_method(t, regs) for t in tokens if t.strip()]
    if not methods:
        raise ConfigError("no methods given")
    seen = set()
    for m in methods:
        if m.token in seen:
            raise ConfigError(f"method {m.token} is listed twice")
        seen.add(m.token)
    return methods


def _fields(kind: str, name: str, regs: Registries) -> set[str]:
    if kind == "peer":
        return set(PEERS[name].options)
    reg = {"sampler": regs.samplers, "guidance": regs.guidance, "corrector": regs.correctors}[kind]
    return set(config_fields(reg.get(name).Config))


def route_options(pairs: Sequence[str], methods: Sequence[Method], regs: Registries) -> dict[tuple[str, str], dict[str, str]]:
    """``NAME:KEY=VALUE`` / ``KEY=VALUE`` pairs -> options per ``(kind, name)`` component.

    A targeted pair goes to every component called NAME; an untargeted one to every component whose
    options have KEY. A pair that reaches nothing is a :class:`ConfigError`.
    """
    comps = {c for m in methods for c in m.components()}
    out: dict[tuple[str, str], dict[str, str]] = {c: {} for c in comps}
    for pair in pairs:
        target, sep, kv = pair.partition(":")
        if not sep or "=" in target:
            target, kv = "", pair
        (key, value), = parse_options([kv]).items()
        hit = False
        for kind, name in comps:
            if target and name != target:
                continue
            if key in _fields(kind, name, regs) or target:
                out[(kind, name)][key] = value
                hit = True
        if not hit:
            where = f"method part {target!r}" if target else "any listed sampler, guidance, corrector or peer"
            raise ConfigError(f"option {pair!r} does not apply to {where}")
    return out


@dataclass
class Cell:
    """One column of the grid: a method with its prior and steps, planned."""

    method: Method
    prior: str | None
    steps: int | None
    plan: Any = None
    peer_options: dict[str, float] = field(default_factory=dict)
    options: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.method.name + (f"@{self.prior}" if self.prior else "")

    def fingerprint(self) -> dict[str, Any]:
        return {"method": self.method.name, "prior": self.prior, "steps": self.steps, "options": self.options,
                "peer_options": self.peer_options}


def _operator(task: str, operator: str | None, op_options: Mapping[str, Any], regs: Registries) -> tuple[type, Any]:
    task_obj = regs.tasks.get(task)
    op_cls = regs.operators.get(operator or task_obj.operator)
    own = config_fields(op_cls.Config)
    cfg = build_config(op_cls.Config, {**{k: v for k, v in dict(task_obj.defaults).items() if k in own},
                                       **dict(op_options)}, owner=op_cls.name)
    return op_cls, cfg


def _plan_peer(method: Method, prior: str | None, task: str, operator: str | None, op_options: Mapping[str, Any],
               options: Mapping[str, str], regs: Registries) -> tuple[str, dict[str, float]]:
    op_cls, cfg = _operator(task, operator, op_options, regs)
    if not op_cls.linear:
        raise IncompatibleError(f"{method.peer} needs a linear operator; {op_cls.name} is not")
    name = prior or "default"
    pc = regs.priors.get(name)
    if pc.conditional:
        raise IncompatibleError(f"{method.peer} needs an unconditional prior; {name} is conditional")
    peer = PEERS[method.peer]  # type: ignore[index]
    unknown = sorted(set(options) - set(peer.options))
    if unknown:
        raise ConfigError(f"{method.peer} has no option {unknown[0]!r}; options: {', '.join(peer.options)}")
    opts: dict[str, float] = {}
    for k, v in {**peer.options, **options}.items():
        try:
            opts[k] = float(v)
        except ValueError:
            raise ConfigError(f"{method.peer} option {k} must be a number; got {v!r}") from None
    opts["sigma_y"] = float(getattr(cfg, "noise_sigma", 0.0) or 0.0) if getattr(cfg, "noise", "gaussian") != "none" else 0.0
    return name, opts


def plan_cells(task: str, methods: Sequence[Method], *, priors: Sequence[str] | None = None,
               nfe: Sequence[int] = (10,), operator: str | None = None, op_options: Mapping[str, Any] | None = None,
               options: Sequence[str] = (), regs: Registries, pm: Any = None) -> tuple[list[Cell], list[str]]:
    """Plan every cell (all names, options and compatibility checked; nothing loaded).

    Returns the cells and the skipped ``method x prior`` pairs (one line each). A method that no listed
    prior fits raises the first incompatibility.
    """
    from restoreflow.app.api import plan

    op_options = dict(op_options or {})
    _operator(task, operator, op_options, regs)  # operator options checked even when every method is a peer
    routed = route_options(options, methods, regs)
    if any(int(n) < 1 for n in nfe):
        raise ConfigError(f"--nfe values must be >= 1; got {','.join(map(str, nfe))}")
    cells: list[Cell] = []
    skipped: list[str] = []
    for m in methods:
        opts = {f"{k}:{n}": routed.get((k, n), {}) for k, n in m.components()}
        first_error: RestoreflowError | None = None
        made = 0
        if m.peer:
            candidates = [m.prior] if m.prior else (list(priors) if priors else [None])
            for p in candidates:
                try:
                    label, popts = _plan_peer(m, p, task, operator, op_options, routed.get(("peer", m.peer), {}), regs)
                except IncompatibleError as e:
                    first_error = first_error or e
                    skipped.append(f"{m.name} x {p}: {e}")
                    continue
                for n in nfe:
                    cells.append(Cell(m, label, int(n), None, popts, opts))
                    made += 1
        else:
            s_cls = regs.samplers.get(m.sampler)  # type: ignore[arg-type]
            has_steps = "steps" in config_fields(s_cls.Config)
            needs_prior = "denoiser" in s_cls.requires or bool(m.guidance or m.corrector)
            if m.prior:
                candidates: list[str | None] = [m.prior]
            elif needs_prior and priors:
                candidates = list(priors)
            else:
                candidates = [None]
            kw = dict(sampler=m.sampler, guidance=m.guidance, corrector=m.corrector, operator=operator,
                      op_options=op_options, sampler_options=routed.get(("sampler", m.sampler), {}),
                      guidance_options=routed.get(("guidance", m.guidance), {}) if m.guidance else None,
                      corrector_options=routed.get(("corrector", m.corrector), {}) if m.corrector else None,
                      registries=regs, pm=pm)
            steps_list: list[int | None] = [int(n) for n in nfe] if has_steps else [None]
            for p in candidates:
                try:
                    plans = [plan(task, prior=p, steps=s, **kw) for s in steps_list]
                except IncompatibleError as e:
                    if m.prior or not priors:
                        raise IncompatibleError(f"{m.token}: {e}") from None
                    first_error = first_error or e
                    skipped.append(f"{m.name} x {p}: {e}")
                    continue
                for s, pl in zip(steps_list, plans):
                    cells.append(Cell(m, pl.prior_label, s, pl, {}, opts))
                    made += 1
            if not made:  # no listed prior fits: the method's own default prior
                try:
                    plans = [plan(task, prior=None, steps=s, **kw) for s in steps_list]
                except IncompatibleError as e:
                    raise IncompatibleError(f"{m.token}: no listed prior fits ({first_error}); nor its default: {e}") from None
                for s, pl in zip(steps_list, plans):
                    cells.append(Cell(m, pl.prior_label, s, pl, {}, opts))
                    made += 1
        if not made:
            raise IncompatibleError(f"{m.token}: no listed prior fits ({first_error})")
    return cells, skipped
