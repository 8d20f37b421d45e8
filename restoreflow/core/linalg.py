"""Linear-algebra helpers of the operators: conjugate gradients, boundary padding with its exact adjoint, and
the 2-D FFT conventions (orthonormal, centred kernels) that turn a blur kernel into its Fourier symbol."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from restoreflow.core.errors import ConfigError

__all__ = ["conjugate_gradient", "ConvolutionPreconditioner", "BOUNDARIES", "pad_index", "pad", "pad_adjoint", "fft2",
           "ifft2", "kernel_to_symbol"]


def conjugate_gradient(apply, b: Tensor, *, x0: Tensor | None = None, iters: int = 100, tol: float = 1e-6,
                       precond: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Batched CG for a symmetric positive (semi-)definite ``apply``; each batch element converges on its own
    (stops when :math:`\\lVert b - Ax\\rVert \\le` ``tol`` :math:`\\lVert b\\rVert`).

    Started from zero on a consistent semi-definite system it returns the minimum-norm solution. ``precond``
    (symmetric positive definite, an approximate inverse of ``apply``) makes it preconditioned CG: same
    answer, fewer iterations when ``precond(apply(v))`` is close to ``v``.
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply(x) if x0 is not None else b.clone()
    z = precond(r) if precond is not None else r
    p = z.clone()
    dims = tuple(range(1, b.ndim))
    rs = (r * r).sum(dim=dims, keepdim=True)
    rz = (r * z).sum(dim=dims, keepdim=True) if precond is not None else rs
    bnorm = (b * b).sum(dim=dims, keepdim=True).clamp(min=1e-30)
    for _ in range(iters):
        if bool((rs <= tol * tol * bnorm).all()):
            break
        Ap = apply(p)
        pAp = (p * Ap).sum(dim=dims, keepdim=True)
        active = (rs > tol * tol * bnorm) & (pAp > 0)
        alpha = torch.where(active, rz / pAp.where(pAp > 0, torch.ones_like(pAp)), torch.zeros_like(rz))
        x = x + alpha * p
        r = r - alpha * Ap
        rs = (r * r).sum(dim=dims, keepdim=True)
        if precond is not None:
            z = precond(r)
            rz_new = (r * z).sum(dim=dims, keepdim=True)
        else:
            z, rz_new = r, rs
        beta = torch.where(active, rz_new / rz.clamp(min=1e-30), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    return x



class ConvolutionPreconditioner:
    r"""An approximate inverse of :math:`N + \alpha I` for a symmetric positive semi-definite ``normal`` :math:`N` on
    ``H x W`` images that is close to a *linear* (not circular) convolution -- :math:`R^\top R` of a parallel-beam
    projector, whose kernel is the :math:`1/|\omega|` filter's star of rays.

    The kernel is read once from :math:`N`'s responses to impulses at the four corners (together they hold every
    offset in :math:`(-H, H) \times (-W, W)`; four images in one batched call) and placed in a ``2H x 2W`` circulant
    that embeds the linear convolution. Applied as: zero-pad to ``2H x 2W``, divide by the circulant's symbol plus
    :math:`\alpha`, crop. That is :math:`E^\top C^{-1} E` with :math:`E` the zero-padding embedding and :math:`C`
    positive definite (its symbol is floored at ``floor`` times its largest value), so it is symmetric positive
    definite: a valid preconditioner for conjugate gradients, whose answer it does not change. A circulant on
    ``H x W`` itself wraps the kernel's long tails around and saves half as many iterations (measured on CT)."""

    def __init__(self, normal: Callable[[Tensor], Tensor], shape: tuple[int, int], *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None, floor: float = 1e-6):
        H, W = self.shape = tuple(shape)
        imp = torch.zeros(4, 1, H, W, dtype=dtype, device=device)
        corners = ((0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1))
        for k, (i, j) in enumerate(corners):
            imp[k, 0, i, j] = 1
        resp = normal(imp)[:, 0]
        kernel = torch.zeros(2 * H, 2 * W, dtype=dtype, device=device)
        rows, cols = torch.arange(H, device=device), torch.arange(W, device=device)
        for k, (i, j) in enumerate(corners):  # the response at (r, c) to an impulse at (i, j) is offset (r - i, c - j)
            kernel[((rows - i) % (2 * H))[:, None], ((cols - j) % (2 * W))[None, :]] = resp[k]
        sym = torch.fft.rfft2(kernel).real
        self.symbol = sym.clamp(min=floor * float(sym.max()))

    def __call__(self, r: Tensor, alpha: float) -> Tensor:
        """:math:`\approx (N + \alpha I)^{-1} r` for ``r`` of shape ``(..., H, W)``."""
        H, W = self.shape
        big = torch.nn.functional.pad(r, (0, W, 0, H))
        sym = self.symbol.to(r.device, torch.promote_types(r.dtype, torch.float32))
        return torch.fft.irfft2(torch.fft.rfft2(big) / (sym + alpha), s=(2 * H, 2 * W))[..., :H, :W].to(r.dtype)


# -- boundaries -------------------------------------------------------------------------------

#: How a convolution sees beyond the image edge. ``circular``: the image wraps around (exact Fourier fast
#: paths); ``reflect``: mirrored about the edge, edge pixel repeated (``d c b a | a b c d``: scipy.ndimage's
#: ``reflect``, numpy's ``symmetric``, MATLAB's ``symmetric``); ``replicate``: the edge pixel repeated
#: (scipy's ``nearest``); ``valid``: nothing is assumed -- the unknown image is larger than the measurement
#: by the kernel's support and the measurement is the valid part of the convolution.
BOUNDARIES: tuple[str, ...] = ("circular", "reflect", "replicate", "valid")


def pad_index(n: int, before: int, after: int, mode: str, *, device: torch.device | str | None = None) -> Tensor:
    """Source index of each of the ``before + n + after`` padded positions along one axis of length ``n``
    (any overhang, also larger than ``n``): ``circular``, ``reflect`` (half-sample symmetric) or ``replicate``."""
    i = torch.arange(-before, n + after, device=device)
    if mode == "circular":
        return i % n
    if mode == "reflect":
        i = i % (2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    if mode == "replicate":
        return i.clamp(0, n - 1)
    raise ConfigError(f"boundary {mode!r} pads nothing; expected circular, reflect or replicate")


def pad(x: Tensor, pads: tuple[int, int, int, int], mode: str) -> Tensor:
    """Extend the last two dimensions of ``x`` by ``pads = (top, bottom, left, right)`` pixels (``mode`` as in
    :func:`pad_index`). A gather: linear, exact, deterministic, any pad size; its adjoint is :func:`pad_adjoint`."""
    t, b, l, r = pads
    H, W = x.shape[-2:]
    rows = pad_index(H, t, b, mode, device=x.device)
    cols = pad_index(W, l, r, mode, device=x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def _fold(v: Tensor, n: int, before: int, after: int, mode: str, dim: int) -> Tensor:
    """Adjoint of padding along ``dim``: each padded position adds into its source (deterministic: the
    interior is a slice, the two strips are small one-hot matrix products)."""
    v = v.movedim(dim, -1)
    idx = pad_index(n, before, after, mode, device=v.device)
    out = v[..., before:before + n]
    for lo, hi in ((0, before), (before + n, before + n + after)):
        if hi > lo:
            onehot = torch.nn.functional.one_hot(idx[lo:hi], n).to(v.dtype)  # (hi - lo) x n
            out = out + v[..., lo:hi] @ onehot
    return out.movedim(-1, dim)


def pad_adjoint(v: Tensor, shape: tuple[int, int], pads: tuple[int, int, int, int], mode: str) -> Tensor:
    """The adjoint of :func:`pad`: ``v`` (padded) folded back onto an image of ``shape = (H, W)``."""
    t, b, l, r = pads
    H, W = shape
    return _fold(_fold(v, W, l, r, mode, v.ndim - 1), H, t, b, mode, v.ndim - 2)


def fft2(x: Tensor) -> Tensor:
    """Unitary 2-D FFT over the last two dimensions."""
    return torch.fft.fft2(x, norm="ortho")


def ifft2(x: Tensor) -> Tensor:
    """Inverse of :func:`fft2` (real part is the caller's business)."""
    return torch.fft.ifft2(x, norm="ortho")


def kernel_to_symbol(kernel: Tensor, shape: tuple[int, int]) -> Tensor:
    """Fourier symbol of circular convolution by ``kernel`` (``k x k`` or ``C x k x k``, centred) on ``shape``.

    The kernel is zero-padded to ``shape`` with its centre moved to pixel (0, 0), so that
    ``ifft2(symbol * fft2(x))`` convolves without shifting the image (unnormalised FFT convention).
    Kernels larger than the image wrap around (still exact circular convolution).
    """
    H, W = shape
    k = kernel if kernel.ndim == 3 else kernel[None]
    kh, kw = k.shape[-2:]
    # place tap (i, j) at ((i - kh//2) mod H, (j - kw//2) mod W): exact circular convolution, also when the
    # kernel is larger than the image (its taps then wrap around and add up)
    rows = (torch.arange(kh, device=k.device) - kh // 2) % H
    cols = (torch.arange(kw, device=k.device) - kw // 2) % W
    pad = torch.zeros(k.shape[0], H, W, dtype=k.dtype, device=k.device)
    idx = (rows[:, None] * W + cols[None, :]).reshape(-1)
    pad.reshape(k.shape[0], -1).index_add_(1, idx, k.reshape(k.shape[0], -1))
    return torch.fft.fft2(pad)
