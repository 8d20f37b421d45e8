r"""A complete third-party restoreflow plugin: low-light imaging :math:`y = g\,x + n`.

Installing this package (``pip install -e examples/restoreflow-lowlight``) adds the ``gain`` operator and
the ``brighten`` task: ``restoreflow brighten dark.png --sampler wiener``.
"""

from dataclasses import dataclass

from restoreflow.plugin_api import LinearOperator, OperatorConfig, Task, check, hookimpl


class Gain(LinearOperator):
    r"""Global gain :math:`y = g x + n` with :math:`0 < g \le 1` (an under-exposed image)."""

    name = "gain"

    @dataclass(frozen=True)
    class Config(OperatorConfig):
        factor: float = 0.3

        def __post_init__(self):
            super().__post_init__()
            check(0 < self.factor <= 1, f"factor must be in (0, 1]; got {self.factor}")

    def A(self, x):
        return self.config.factor * x

    def A_adjoint(self, y):
        return self.config.factor * y

    def A_dagger(self, y):
        return y / self.config.factor

    def fourier_symbol(self):
        import torch

        return torch.full(self.x_shape[-2:], self.config.factor, dtype=torch.complex128)


@hookimpl
def register_operators(register):
    register(Gain)


@hookimpl
def register_tasks(register):
    register(Task("brighten", "gain", "Brighten an under-exposed image (example plugin).", default_sampler="wiener"))
