"""The public API for plugin authors: everything a plugin may import from restoreflow, in one place.

A plugin module imports from here and nowhere else in restoreflow -- the first-party plugins under ``plugins/``
and the example package in ``examples/restoreflow-lowlight`` included (``tests/test_layers.py`` enforces it). The
layers behind these names (``restoreflow.core``, ``exact``, ``io``, ``models``, ``host``, ``app``) may be
reorganised between releases; the names here keep their meaning. ::

    from restoreflow.plugin_api import Sampler, check, hookimpl

    class Identity(Sampler):
        name = "identity"
        ...

    @hookimpl
    def register_samplers(register):
        register(Identity)

Sections: the hook marker and registries; errors; options; paths and parameterizations; denoisers and priors;
operators and noise; the sampling framework; exact Gaussian models; image and array I/O; model files, networks
and training; helpers for plugins that add commands.
"""

from __future__ import annotations

# -- the host ---------------------------------------------------------------------------------------------
from restoreflow.host.hookspecs import hookimpl
from restoreflow.host.manager import default_plugin_manager, default_registries
from restoreflow.host.registry import Registries, Registry

# -- errors: a RestoreflowError is a user's mistake, shown as one line -------------------------------------
from restoreflow.core.errors import (
    CheckpointError, ConfigError, IncompatibleError, InputError, NumericalError, OutputError, PluginError,
    RestoreflowError, UnknownNameError,
)

# -- options: Config dataclasses --------------------------------------------------------------------------
from restoreflow.core.options import build_config, check, parse_bool, parse_float, parse_int, parse_options
from restoreflow.core.options import (
    Clip, Doc, Eta, Fraction, Iterations, NonNegative, Options, Positive, Range, Seed, Steps, validate_options,
)

# -- paths, parameterizations, denoisers and priors --------------------------------------------------------
from restoreflow.core.paths import AffinePath, as_time, bcast, mean_reverting, rectified_flow, tabulated, ve, vp
from restoreflow.core.paths import BETA_SCHEDULES, ddpm, ddpm_betas, ddpm_clean_time, ddpm_steps, ddpm_timesteps
from restoreflow.core.parameterization import from_x0, to_x0
from restoreflow.core.denoiser import (
    Denoiser, PredictionAdapter, Prior, ValueRange, for_inference, network_units, reparameterize,
)
from restoreflow.core.tiling import TiledDenoiser
from restoreflow.core.collaborative import collaborative_wiener

# -- operators and noise ----------------------------------------------------------------------------------
from restoreflow.core.linalg import (
    BOUNDARIES, ConvolutionPreconditioner, conjugate_gradient, kernel_to_symbol, pad, pad_adjoint,
)
from restoreflow.core.operators import GaussianNoise, LinearOperator, Operator, OperatorConfig, PoissonNoise

# -- how a sampler is certified on the exact bench -----------------------------------------------------
from restoreflow.core.certification import (
    Certification, FlowMap, OperatorOnly, PointEstimate, Posterior, Report, certification_of,
)

# -- the sampling framework -------------------------------------------------------------------------------
from restoreflow.core.kernels import EulerMaruyama, EulerODE, ExpIntegrator, Heun, KernelSampler
from restoreflow.core.sampling import Spacing
from restoreflow.core.sampling import (
    SPACINGS, Context, Corrector, Guidance, Kernel, Problem, Sampler, Task, Transition, anchored_for, check_finite,
    integrate, make_anchor, randn, start_state, time_grid,
)

# -- exact Gaussian models --------------------------------------------------------------------------------
from restoreflow.exact.gaussian import FourierGaussian, GaussianDenoiser, GaussianModel, default_spectrum
from restoreflow.exact.teleport import TeleportOption, Teleporting, load_prior_gaussian

# -- image and array I/O ----------------------------------------------------------------------------------
from restoreflow.io import (
    IMAGE_SUFFIXES, READABLE_SUFFIXES, Measurement, check_size, npy_header, read_array, read_image, write_file,
    write_image,
)

# -- model files, networks and training -------------------------------------------------------------------
from restoreflow.core.modelcard import (
    card_path, load_into, load_state_dict, read_card, safe_torch_load, save_weights, write_card,
)
from restoreflow.core.files import require_regular_file
from restoreflow.models.nets import build_for_weights, build_network, register_architecture
from restoreflow.models.nets.irsde import infer_architecture, strip_module_prefix
from restoreflow.models.nets.rddm import RDDMUnet, UnetRes
from restoreflow.models.nets.resunet import ResUNet
from restoreflow.models.nets.unet import EDMDenoiser, UNet
from restoreflow.models.train_loop import TrainOptions, load_model, train
from restoreflow.models.training import TrainingMethod
from restoreflow.models.weights import WEIGHTS_DIR

# -- for plugins that add commands or read inputs like the CLI does ----------------------------------------
from restoreflow.app.api import _load_input as load_input
from restoreflow.app.api import looks_like_path, resolve_device
from restoreflow.app.console import handle_errors

__all__ = [
    "hookimpl", "default_plugin_manager", "default_registries", "Registries", "Registry",
    "CheckpointError", "ConfigError", "IncompatibleError", "InputError", "NumericalError", "OutputError",
    "PluginError", "RestoreflowError", "UnknownNameError",
    "build_config", "check", "parse_options", "parse_bool", "parse_int", "parse_float",
    "Options", "Range", "Doc", "validate_options", "Steps", "Iterations", "Eta", "Fraction", "Positive", "NonNegative",
    "Seed", "Clip", "Spacing",
    "AffinePath", "as_time", "bcast", "mean_reverting", "rectified_flow", "tabulated", "ve", "vp",
    "BETA_SCHEDULES", "ddpm", "ddpm_betas", "ddpm_clean_time", "ddpm_steps", "ddpm_timesteps",
    "from_x0", "to_x0",
    "Denoiser", "PredictionAdapter", "Prior", "ValueRange", "for_inference", "network_units", "reparameterize", "TiledDenoiser",
    "collaborative_wiener",
    "BOUNDARIES", "GaussianNoise", "LinearOperator", "Operator", "OperatorConfig", "PoissonNoise",
    "ConvolutionPreconditioner", "conjugate_gradient", "kernel_to_symbol", "pad", "pad_adjoint",
    "Certification", "FlowMap", "OperatorOnly", "PointEstimate", "Posterior", "Report", "certification_of",
    "SPACINGS", "Context", "Corrector", "EulerMaruyama", "EulerODE", "ExpIntegrator", "Guidance", "Heun", "Kernel",
    "KernelSampler", "Problem", "Sampler", "Task", "Transition", "anchored_for", "check_finite", "integrate",
    "make_anchor", "randn", "start_state", "time_grid",
    "FourierGaussian", "GaussianDenoiser", "GaussianModel", "default_spectrum",
    "TeleportOption", "Teleporting", "load_prior_gaussian",
    "IMAGE_SUFFIXES", "READABLE_SUFFIXES", "Measurement", "check_size", "npy_header", "read_array", "read_image", "write_file",
    "write_image",
    "card_path", "load_into", "load_state_dict", "read_card", "safe_torch_load", "save_weights", "write_card",
    "require_regular_file",
    "build_network", "build_for_weights", "register_architecture", "infer_architecture", "strip_module_prefix",
    "RDDMUnet", "UnetRes",
    "ResUNet", "EDMDenoiser", "UNet", "TrainOptions", "load_model", "train", "TrainingMethod", "WEIGHTS_DIR",
    "load_input", "looks_like_path", "resolve_device", "handle_errors",
]
