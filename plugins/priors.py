r"""Analytic Gaussian priors: exact denoisers, scores and posteriors for every path.

``gaussian`` is a stationary image prior (power spectrum per decorrelated colour, fitted on
scikit-image's sample images; any image size). ``gaussian-dense`` is the same prior as a dense float64
covariance for small images (at most 4096 values), which has exact posteriors for *any* linear operator.
Both return :class:`restoreflow.GaussianDenoiser` on a VP path; given a problem they return the exact
posterior denoiser, so ``--prior gaussian --sampler dpmpp-2m`` samples the exact posterior.
"""

from __future__ import annotations

import math

from restoreflow.plugin_api import (
    ConfigError, FourierGaussian, GaussianDenoiser, IncompatibleError, Prior, default_spectrum, hookimpl, vp,
)

DENSE_LIMIT = 4096


class StationaryGaussian(Prior):
    """Stationary Gaussian image prior fitted on scikit-image samples (exact denoiser and posterior)."""

    name = "gaussian"
    path_kind = "vp"
    exact_posterior = True
    option_names = frozenset()  # takes no --prior-opt (the CLI refuses any, misspelt ones included)

    def model(self, x_shape) -> FourierGaussian:
        if x_shape is None:
            raise ConfigError("the gaussian prior needs the image shape")
        _, C, H, W = x_shape
        if C not in (1, 3):
            raise ConfigError(f"the gaussian prior models 1- or 3-channel images, not {C}")
        return default_spectrum(C).model(H, W)

    def load(self, *, device="cpu", x_shape=None):
        return GaussianDenoiser(self.model(x_shape), vp()).to(device)

    def posterior(self, problem, *, device="cpu"):
        model = self.model(problem.x_shape)
        y = problem.y.cpu()
        if problem.operator.fourier_symbol() is not None:
            try:
                return GaussianDenoiser(model.posterior(problem.operator, y), vp()).to(device)
            except ValueError:
                pass
        if math.prod(problem.x_shape[1:]) <= DENSE_LIMIT:
            return GaussianDenoiser(model.to_dense().posterior(problem.operator, y), vp()).to(device)
        raise IncompatibleError(f"the exact gaussian posterior for {problem.operator.name} needs a circulant operator "
                                f"or an image of at most {DENSE_LIMIT} values; add --guidance dps instead")


class DenseGaussianPrior(StationaryGaussian):
    """The stationary Gaussian prior as a dense covariance (small images; exact posteriors for any operator)."""

    name = "gaussian-dense"

    def model(self, x_shape):
        fourier = super().model(x_shape)
        if math.prod(x_shape[1:]) > DENSE_LIMIT:
            raise ConfigError(f"gaussian-dense handles at most {DENSE_LIMIT} values per image; "
                              f"got {x_shape[1]}x{x_shape[2]}x{x_shape[3]} (use the gaussian prior)")
        return fourier.to_dense()

    def posterior(self, problem, *, device="cpu"):
        return GaussianDenoiser(self.model(problem.x_shape).posterior(problem.operator, problem.y.cpu()), vp()).to(device)


@hookimpl
def register_priors(register):
    register(StationaryGaussian)
    register(DenseGaussianPrior)
