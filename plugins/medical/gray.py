"""Grayscale (medical) data with a colour prior: the ``gray`` prior (:class:`GrayPrior`) wraps the bundled RGB
``default`` prior, or another unconditional prior, in :class:`GrayDenoiser` (the channel replicated in, the
output channels averaged)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from restoreflow.plugin_api import ConfigError, IncompatibleError, InputError, Prior


class GrayDenoiser(nn.Module):
    """A ``C``-channel denoiser on 1-channel states: replicate the channel in, average the output channels."""

    def __init__(self, base: Any, channels: int):
        super().__init__()
        self.inner = base
        self.channels = int(channels)
        self.path = base.path
        self.conditional = bool(getattr(base, "conditional", False))

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        rep = x_t.expand(-1, self.channels, -1, -1) if x_t.shape[1] == 1 else x_t
        a = anchor.expand(-1, self.channels, -1, -1) if anchor is not None and anchor.shape[1] == 1 else anchor
        out = self.inner(rep, t, anchor=a)
        return out.mean(dim=1, keepdim=True) if x_t.shape[1] == 1 else out


class GrayPrior(Prior):
    """A prior for grayscale (medical) images: the bundled RGB ``default`` prior with the channel replicated.

    ``--prior-opt base=NAME|PATH`` wraps another unconditional prior or checkpoint instead; single-channel
    bases pass through unchanged. Replicating a gray state gives the network noise that is identical across
    channels (it was trained on independent noise per channel); averaging the three outputs is the
    simple, deterministic compromise -- a prior trained on grayscale data is better when one exists.
    """

    name = "gray"
    conditional = False
    path_kind = "ve"
    channels = 1

    def _base(self) -> tuple[Prior, int | None]:
        from restoreflow.plugin_api import default_plugin_manager, default_registries
        from restoreflow.plugin_api import looks_like_path

        opts = dict(self.options)
        base = str(opts.pop("base", "default"))
        if base == self.name:
            raise ConfigError("the gray prior cannot wrap itself")
        if looks_like_path(base):
            p = Path(base)
            if not p.exists():
                raise InputError(f"prior {p} does not exist")
            prior = default_plugin_manager().hook.load_prior(path=p, options=opts)
            if prior is None:
                raise InputError(f"no plugin recognises the checkpoint format of {p}")
            cls = type(prior)
        else:
            cls = default_registries().priors.get(base)
            prior = cls(**opts)
        if cls.conditional:
            raise IncompatibleError(f"the gray prior wraps unconditional priors; {base} is conditional")
        return prior, cls.channels

    def tuned_options(self):
        """The wrapped prior's tuned sampler options (its card's ``sampler_defaults``, e.g. ``dpir:mri``)."""
        return self._base()[0].tuned_options()

    def load(self, *, device="cpu", x_shape=None):
        base, ch = self._base()
        if ch is None and x_shape is not None:  # unknown: try the image's single channel, then RGB
            try:
                return base.load(device=device, x_shape=x_shape)
            except ConfigError:
                ch = 3
        if ch == 1:
            return base.load(device=device, x_shape=x_shape)
        if ch is None:  # a checkpoint of unknown channels and no image shape: ask the loaded network
            den = base.load(device=device, x_shape=None)
            ch = _channels_of(den)
            return den if ch in (None, 1) else GrayDenoiser(den, ch)
        shape = None if x_shape is None else (x_shape[0], ch, *x_shape[2:])
        return GrayDenoiser(base.load(device=device, x_shape=shape), ch)


def _channels_of(den: Any) -> int | None:
    """The image channels a loaded denoiser takes: its ``channels``, else its network's ``in_channels``."""
    ch = getattr(den, "channels", None) or getattr(getattr(den, "net", None), "in_channels", None)
    return None if ch is None else int(ch)
