"""restoreflow: image restoration and inverse problems with diffusion and flow models.

The host defines hooks (:mod:`restoreflow.host.hookspecs`); every algorithm is a plugin registered through the
``restoreflow`` entry-point group. A plugin module needs only::

    from restoreflow import hookimpl, Sampler

    @hookimpl
    def register_samplers(register):
        register(MySampler)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from restoreflow.core.errors import (
    CheckpointError, ConfigError, IncompatibleError, InputError, NumericalError, OutputError, PluginError,
    RestoreflowError, UnknownNameError,
)
from restoreflow.host.hookspecs import hookimpl
from restoreflow.core.options import build_config, check
from restoreflow.core.version import __version__

# Everything else is imported on first use (PEP 562), so that `restoreflow --help` and the listings start
# without importing torch; `from restoreflow import Sampler` works as before.
_LAZY = {
    "Denoiser": "core.denoiser", "PredictionAdapter": "core.denoiser", "Prior": "core.denoiser", "ValueRange": "core.denoiser",
    "reparameterize": "core.denoiser",
    "ConditionalOracle": "exact.gaussian", "DenseGaussian": "exact.gaussian", "FourierGaussian": "exact.gaussian",
    "GaussianDenoiser": "exact.gaussian", "GaussianModel": "exact.gaussian", "PowerLawSpectrum": "exact.gaussian",
    "DeepinvOperator": "core.operators", "GaussianNoise": "core.operators", "LinearOperator": "core.operators",
    "NoiseModel": "core.operators", "Operator": "core.operators", "OperatorConfig": "core.operators", "PoissonNoise": "core.operators",
    "ZeroNoise": "core.operators", "conjugate_gradient": "core.linalg",
    "PREDICTIONS": "core.parameterization", "from_x0": "core.parameterization", "to_x0": "core.parameterization",
    "AffinePath": "core.paths", "mean_reverting": "core.paths", "rectified_flow": "core.paths", "tabulated": "core.paths", "ve": "core.paths",
    "vp": "core.paths", "vp_cosine": "core.paths",
    "collect": "host.manager", "default_plugin_manager": "host.manager", "default_registries": "host.manager",
    "get_plugin_manager": "host.manager",
    "Context": "core.sampling", "Corrector": "core.sampling", "EulerMaruyama": "core.kernels", "EulerODE": "core.kernels",
    "ExpIntegrator": "core.kernels", "Guidance": "core.sampling", "Heun": "core.kernels", "Kernel": "core.sampling",
    "Problem": "core.sampling", "Sampler": "core.sampling", "Task": "core.sampling", "Transition": "core.sampling",
    "anchored_for": "core.sampling", "integrate": "core.sampling", "make_anchor": "core.sampling", "time_grid": "core.sampling",
    "Result": "app.api", "Measurement": "io",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'restoreflow' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from restoreflow.core.denoiser import Denoiser, PredictionAdapter, Prior, ValueRange, reparameterize
    from restoreflow.exact.gaussian import (
        ConditionalOracle, DenseGaussian, FourierGaussian, GaussianDenoiser, GaussianModel, PowerLawSpectrum,
    )
    from restoreflow.core.linalg import conjugate_gradient
    from restoreflow.core.operators import (
        DeepinvOperator, GaussianNoise, LinearOperator, NoiseModel, Operator, OperatorConfig, PoissonNoise,
        ZeroNoise,
    )
    from restoreflow.core.parameterization import PREDICTIONS, from_x0, to_x0
    from restoreflow.core.paths import AffinePath, mean_reverting, rectified_flow, tabulated, ve, vp, vp_cosine
    from restoreflow.host.manager import collect, default_plugin_manager, default_registries, get_plugin_manager
    from restoreflow.core.kernels import EulerMaruyama, EulerODE, ExpIntegrator, Heun
    from restoreflow.core.sampling import (
        Context, Corrector, Guidance, Kernel, Problem, Sampler, Task, Transition, anchored_for, integrate, make_anchor,
        time_grid,
    )
    from restoreflow.app.api import Result
    from restoreflow.io import Measurement



def restore(*args, **kwargs):
    """Restore an image: see :func:`restoreflow.app.api.restore`."""
    from restoreflow.app.api import restore as _restore

    return _restore(*args, **kwargs)


__all__ = [
    "AffinePath", "CheckpointError", "ConditionalOracle", "ConfigError", "Context", "Corrector", "DeepinvOperator",
    "DenseGaussian", "Denoiser", "EulerMaruyama", "EulerODE", "ExpIntegrator", "FourierGaussian", "GaussianDenoiser",
    "GaussianModel", "GaussianNoise", "Guidance", "Heun", "IncompatibleError", "InputError", "Kernel", "LinearOperator",
    "Measurement", "NoiseModel", "NumericalError", "Operator", "OperatorConfig", "OutputError", "PREDICTIONS", "PluginError",
    "PoissonNoise", "PowerLawSpectrum", "PredictionAdapter", "Prior", "Problem", "RestoreflowError", "Result", "Sampler",
    "Task", "Transition", "UnknownNameError", "ValueRange", "ZeroNoise", "build_config", "check", "collect",
    "conjugate_gradient", "default_plugin_manager", "default_registries", "from_x0", "get_plugin_manager", "hookimpl",
    "anchored_for", "integrate", "make_anchor", "mean_reverting", "rectified_flow", "reparameterize", "restore", "tabulated", "time_grid", "to_x0",
    "ve", "vp", "vp_cosine", "__version__",
]
