"""restoreflow: image restoration and inverse problems with diffusion and flow models.

The host defines hooks (:mod:`restoreflow.hookspecs`); every algorithm is a plugin registered through the
``restoreflow`` entry-point group. A plugin module needs only::

    from restoreflow import hookimpl, Sampler

    @hookimpl
    def register_samplers(register):
        register(MySampler)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointError,
    ConfigError,
    IncompatibleError,
    InputError,
    NumericalError,
    OutputError,
    PluginError,
    RestoreflowError,
    UnknownNameError,
)
from .hookspecs import hookimpl
from .registry import build_config, check

# Everything else is imported on first use (PEP 562), so that `restoreflow --help` and the listings start
# without importing torch; `from restoreflow import Sampler` works as before.
_LAZY = {
    "Denoiser": "denoiser", "PredictionAdapter": "denoiser", "Prior": "denoiser", "ValueRange": "denoiser",
    "reparameterize": "denoiser",
    "ConditionalOracle": "gaussian", "DenseGaussian": "gaussian", "FourierGaussian": "gaussian",
    "GaussianDenoiser": "gaussian", "GaussianModel": "gaussian", "PowerLawSpectrum": "gaussian",
    "DeepinvOperator": "operators", "GaussianNoise": "operators", "LinearOperator": "operators",
    "NoiseModel": "operators", "Operator": "operators", "OperatorConfig": "operators", "PoissonNoise": "operators",
    "ZeroNoise": "operators", "conjugate_gradient": "operators",
    "PREDICTIONS": "parameterization", "from_x0": "parameterization", "to_x0": "parameterization",
    "AffinePath": "paths", "mean_reverting": "paths", "rectified_flow": "paths", "tabulated": "paths", "ve": "paths",
    "vp": "paths", "vp_cosine": "paths",
    "collect": "plugins", "default_plugin_manager": "plugins", "default_registries": "plugins",
    "get_plugin_manager": "plugins",
    "Context": "sampling", "Corrector": "sampling", "EulerMaruyama": "sampling", "EulerODE": "sampling",
    "ExpIntegrator": "sampling", "Guidance": "sampling", "Heun": "sampling", "Kernel": "sampling",
    "Problem": "sampling", "Sampler": "sampling", "Task": "sampling", "Transition": "sampling",
    "anchored_for": "sampling", "integrate": "sampling", "make_anchor": "sampling", "time_grid": "sampling",
    "Result": "api", "Measurement": "io",
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
    from .denoiser import Denoiser, PredictionAdapter, Prior, ValueRange, reparameterize
    from .gaussian import (ConditionalOracle, DenseGaussian, FourierGaussian, GaussianDenoiser, GaussianModel,
                           PowerLawSpectrum)
    from .operators import (DeepinvOperator, GaussianNoise, LinearOperator, NoiseModel, Operator, OperatorConfig,
                            PoissonNoise, ZeroNoise, conjugate_gradient)
    from .parameterization import PREDICTIONS, from_x0, to_x0
    from .paths import AffinePath, mean_reverting, rectified_flow, tabulated, ve, vp, vp_cosine
    from .plugins import collect, default_plugin_manager, default_registries, get_plugin_manager
    from .sampling import (Context, Corrector, EulerMaruyama, EulerODE, ExpIntegrator, Guidance, Heun, Kernel,
                           Problem, Sampler, Task, Transition, anchored_for, integrate, make_anchor, time_grid)
    from .api import Result
    from .io import Measurement

try:
    __version__ = version("restoreflow")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0.0.0"


def restore(*args, **kwargs):
    """Restore an image: see :func:`restoreflow.api.restore`."""
    from .api import restore as _restore

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
