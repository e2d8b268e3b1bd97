"""SSL-HSIC's functional forms: the ``rff_hsic`` op, the exact-kernel estimators, the kernel-scale
objective and the loss (docs/rff_hsic.md)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import dispatch
from .._checks import check_bool, check_int, check_positive, check_same_device, check_tensor, describe
from .._checks import check_finite as assert_finite
from ..ops import rff_hsic as _ops
from ..ops.rff_hsic import KERNELS, check_kernel, sample_gaussian_rff, sample_imq_rff, sample_laplace_rff, sample_rff
from ._common import as_views, assert_finite_hyper, fp32_compute, gather_views, positive_or_nan

__all__ = [
    "HSICComponents",
    "KERNELS",
    "rff_hsic",
    "exact_hsic",
    "kernel_scale_objective",
    "ssl_hsic_loss",
    "hsic_loss",
    "sample_rff",
    "sample_imq_rff",
    "sample_gaussian_rff",
    "sample_laplace_rff",
    "rff_features",
]

Tensor = torch.Tensor
hsic_loss = _ops.hsic_loss


@dataclass
class HSICComponents:
    """Terms of the SSL-HSIC loss, for logging.  All are 0-dim tensors (no host sync)."""

    loss: Tensor  #: what the loss returned (including ``scale_objective`` when the scale is learned)
    hsic_zy: Tensor  #: HSIC(Z, Y), the identity term (maximised)
    hsic_zz: Tensor  #: HSIC(Z, Z), the redundancy term (its square root is penalised)
    kernel_scale: Tensor  #: the kernel scale c used this step
    scale_objective: Tensor | None = None  #: side objective of c when it is learned, else None


# --------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------


def check_map(w: object, b: object, d: int, device: torch.device, wn: str, bn: str) -> None:
    """A random-feature map ``(w (D, d), b (D,))`` on ``device``."""
    check_tensor(w, wn, ndim=2)
    check_tensor(b, bn, ndim=1)
    if w.shape[1] != d:
        raise ValueError(f"{wn}: expected shape (D, {d}) (d = views' last dim), got {tuple(w.shape)}")
    if b.shape[0] != w.shape[0]:
        raise ValueError(f"{bn}: expected shape ({w.shape[0]},) (D of {wn}), got {tuple(b.shape)}")
    for t, n in ((w, wn), (b, bn)):
        if t.device != device:
            raise ValueError(f"{n}: expected device {device} (the device of views), got {t.device}")


def check_scale(kernel_scale: object) -> None:
    """c > 0 as a Python number, or a one-element floating tensor (its value is not read)."""
    if isinstance(kernel_scale, Tensor):
        if not kernel_scale.is_floating_point() or kernel_scale.numel() != 1:
            raise TypeError(
                "kernel_scale: expected a positive number or a one-element floating-point tensor, "
                f"got {describe(kernel_scale)}"
            )
    else:
        check_positive(kernel_scale, "kernel_scale", minimum=_ops.MIN_KERNEL_SCALE,
                       why="below it x / c and W / c overflow float32")


def check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {describe(generator)}")


# --------------------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------------------


def rff_hsic_impl(views: Tensor, w_a, b_a, w_b, b_b, kernel_scale, backend: str,
                  input_precision: str | None) -> tuple[Tensor, Tensor]:
    """:func:`rff_hsic` on checked arguments: the implementation :mod:`kernelssl.dispatch` picks."""
    impl = dispatch.implementation("rff_hsic", backend, views, frozen=(w_a, b_a, w_b, b_b))
    if impl == "triton":
        return dispatch.triton_op("rff_hsic").rff_hsic(
            views, w_a, b_a, w_b, b_b, kernel_scale,
            input_precision=dispatch.resolve_precision(input_precision, views.device))
    if impl == "autograd":
        return _ops.rff_hsic_autograd(views, w_a, b_a, w_b, b_b, kernel_scale)
    return _ops.rff_hsic(views, w_a, b_a, w_b, b_b, kernel_scale)


@fp32_compute
def rff_hsic(
    views: Tensor,
    w_a: Tensor,
    b_a: Tensor,
    w_b: Tensor,
    b_b: Tensor,
    kernel_scale: float | Tensor,
    *,
    backend: str = "auto", check_finite: bool = False, input_precision: str | None = None,
) -> tuple[Tensor, Tensor]:
    """SSL-HSIC's two estimators with random Fourier features.

    ``phi(x) = sqrt(2/D) cos(W x / c + beta)``; map A gives ``Phi_A`` (used by both terms), map B the
    second side of HSIC(Z, Z)::

        HSIC(Z, Y) = (1/(B K (K-1))) sum_i ||S_i||^2 - ||mu||^2      S_i = sum_v phi_A(z_i^v)
        HSIC(Z, Z) = ||Phi_B_c^T Phi_A_c||_F^2 / N^2                (column-centred features)

    Args:
        views: ``(K, B, d)`` -- K >= 2 views of B >= 2 images; row i of every view is image i.
        w_a, w_b: ``(D, d)`` RFF directions; b_a, b_b: ``(D,)`` phases -- any shift-invariant kernel's
            maps (:func:`sample_rff`: "imq", "gaussian" or "laplace"; the op itself is kernel-agnostic).
        kernel_scale: c > 0, a float or 1-element tensor; not differentiated through (stop-gradient).
            A tensor's value is not read (no sync): a value <= 0 gives NaN results.
        backend: ``"auto" | "triton" | "torch"`` (and ``KERNELSSL_BACKEND``; :mod:`kernelssl.dispatch`).
        check_finite: raise a ``ValueError`` on NaN/Inf input (one host sync); by default NaN/Inf
            propagate to the outputs.
        input_precision: the fused kernel's fp32 GEMM precision: ``"tf32x3"``, ``"ieee"``, ``"tf32"``,
            or ``None`` (``"tf32"`` under torch's TF32 flag, else ``"tf32x3"``).  The torch tier ignores
            it (its matmuls follow torch's own flag).

    Returns:
        ``(hsic_zy, hsic_zz)``, 0-dim tensors, float32 (float64 for float64 views).  Cost
        O(N d D + N D^2), memory O(N D + D^2): never an N x N matrix.
    """
    views = as_views(views)
    d = views.shape[-1]
    check_map(w_a, b_a, d, views.device, "w_a", "b_a")
    check_map(w_b, b_b, d, views.device, "w_b", "b_b")
    check_scale(kernel_scale)
    dispatch.check_precision(input_precision)
    check_bool(check_finite, "check_finite")
    if check_finite:
        assert_finite([views, w_a, b_a, w_b, b_b], ("views", "w_a", "b_a", "w_b", "b_b"))
        assert_finite_hyper(kernel_scale, "kernel_scale")
    return rff_hsic_impl(views, w_a, b_a, w_b, b_b, positive_or_nan(kernel_scale), backend, input_precision)


def rff_features(x: Tensor, w: Tensor, b: Tensor, kernel_scale: float | Tensor) -> Tensor:
    """``phi(x) = sqrt(2/D) cos(W (x / c) + b)`` applied to the last dim: ``x (..., d)`` -> ``(..., D)``
    (:func:`kernelssl.ops.rff_hsic.rff_features`, after checking the shapes and devices)."""
    check_tensor(x, "x", min_ndim=1)
    check_tensor(w, "w", ndim=2)
    check_tensor(b, "b", ndim=1)
    if w.shape[1] != x.shape[-1]:
        raise ValueError(f"w: expected shape (D, {x.shape[-1]}) to match x's last dim, got {tuple(w.shape)}")
    if b.shape[0] != w.shape[0]:
        raise ValueError(f"b: expected shape ({w.shape[0]},) to match w's D, got {tuple(b.shape)}")
    check_same_device([x, w, b], ["x", "w", "b"])
    return _ops.rff_features(x, w, b, kernel_scale)


@fp32_compute
def exact_hsic(
    views: Tensor, kernel_scale: float | Tensor, *, kernel: str = "imq", check_finite: bool = False
) -> tuple[Tensor, Tensor]:
    """The exact-kernel estimators that :func:`rff_hsic` converges to as D grows.

    ``k_c(x, y)`` in place of ``phi(x)^T phi(y)``, HSIC(Z, Z) = ``||H K H||_F^2 / N^2``, for ``kernel``
    "imq" (``c / sqrt(||x - y||^2 + c^2)``, default), "gaussian" (``exp(-||x - y||^2 / (2 c^2))``) or
    "laplace" (``exp(-||x - y||_1 / c)``; gradient with the subgradient sign(0) = 0 at tied
    coordinates).  A check path: it materialises the N x N kernel (torch only).  The kernel is
    evaluated on ``x/c`` from direct differences, so ``k(x, x) = 1`` exactly and no ``c^2`` can
    overflow or underflow (see :func:`kernelssl.ops.rff_hsic.exact_hsic`).
    """
    views = as_views(views)
    check_scale(kernel_scale)
    check_kernel(kernel)
    check_bool(check_finite, "check_finite")
    if check_finite:
        assert_finite([views], ["views"])
        assert_finite_hyper(kernel_scale, "kernel_scale")
    return _ops.exact_hsic(views, positive_or_nan(kernel_scale), kernel=kernel)


@fp32_compute
def kernel_scale_objective(
    views: Tensor,
    kernel_scale: Tensor,
    *,
    num_pairs: int = 1024,
    generator: torch.Generator | None = None,
    kernel: str = "imq",
) -> Tensor:
    """Side objective that learns the kernel scale c, differentiable in c only: minus
    ``mean 1/2 log (dk/drho)^2`` over sampled pairs (no gradient to the embeddings)::

        "imq"       -log(c/2) + (3/2) mean_ij log(rho_ij + c^2)      rho_ij = ||z_i - z_j||^2
        "gaussian"  log(2 c^2) + mean_ij rho_ij / (2 c^2)            (minimum at c^2 = mean rho / 2)
        "laplace"   log(c) + mean_ij r_ij / c                        r_ij = ||z_i - z_j||_1 (minimum at c = mean r)

    See :func:`kernelssl.ops.rff_hsic.kernel_scale_objective`.
    """
    views = as_views(views)
    num_pairs = check_int(num_pairs, "num_pairs", minimum=1)
    check_scale(kernel_scale)
    check_kernel(kernel)
    check_generator(generator)
    return _ops.kernel_scale_objective(views, kernel_scale, num_pairs=num_pairs, generator=generator, kernel=kernel)


# --------------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------------


def draw_maps(kernel: str, views: Tensor, num_features: int, generator: torch.Generator | None):
    """Two fresh independent maps ``(w_a, b_a, w_b, b_b)`` of ``kernel`` for ``views``, in the compute
    dtype (fp32 for half views: rounding W and beta to half precision would add ~1e-3 rad phase
    error), drawn on the generator's device and moved to the views'."""
    d, dt = views.shape[-1], torch.float64 if views.dtype == torch.float64 else torch.float32
    w_a, b_a = sample_rff(kernel, d, num_features, generator=generator, device=views.device, dtype=dt)
    w_b, b_b = sample_rff(kernel, d, num_features, generator=generator, device=views.device, dtype=dt)
    return w_a, b_a, w_b, b_b


def hsic_components(views: Tensor, maps: Sequence[Tensor] | None, *, gamma: float, kernel_scale, kernel: str,
                    exact: bool, backend: str, input_precision: str | None) -> HSICComponents:
    """The loss and its terms on checked, gathered views; ``maps`` None with ``exact``."""
    if exact:
        dispatch.implementation("exact_hsic", backend, views)  # an explicit backend='triton' raises
        zy, zz = _ops.exact_hsic(views, kernel_scale, kernel=kernel)
    else:
        zy, zz = rff_hsic_impl(views, *maps, kernel_scale, backend, input_precision)
    c = kernel_scale.detach().reshape(()) if isinstance(kernel_scale, Tensor) else torch.tensor(kernel_scale)
    return HSICComponents(loss=_ops.hsic_loss(zy, zz, gamma=gamma), hsic_zy=zy, hsic_zz=zz, kernel_scale=c)


@fp32_compute
def ssl_hsic_loss(
    views: Sequence[Tensor] | Tensor,
    *,
    num_features: int = 512,
    gamma: float = 3.0,
    kernel_scale: float | Tensor = 1.0,
    kernel: str = "imq",
    exact: bool = False,
    generator: torch.Generator | None = None,
    gather_distributed: bool = False, backend: str = "auto", check_finite: bool = False,
    return_components: bool = False, input_precision: str | None = None,
) -> Tensor | HSICComponents:
    """SSL-HSIC loss ``gamma * sqrt(HSIC(Z, Z)) - HSIC(Z, Y)`` (Li et al., NeurIPS 2021).

    ``kernel`` names the family: "imq" (the paper's, default), "gaussian" or "laplace".  Draws two
    fresh independent RFF maps (A, B) of that kernel from ``generator`` (``exact=False``,
    :func:`sample_rff`) or uses the exact kernel (``exact=True``, O(N^2) memory, for checking).  The
    views are used as given (the reference L2-normalises them before the loss;
    :class:`kernelssl.losses.HSICLoss` offers ``normalize=True``).  The square root is guarded:
    ``sqrt(max(x, 0) + 1e-12)``, so a collapsed batch (HSIC(Z,Z) -> 0) keeps a finite gradient.

    ``gather_distributed=True``: the views of all ranks are gathered along the image dim (B = the
    global batch, N = K * B) and the maps drawn after the gather, so ``generator`` must be in the
    same state on every rank (seeded alike, never by rank); a differing state raises a ``ValueError``
    (its checksum is compared across ranks in the gather's metadata exchange, see
    :mod:`kernelssl.distributed`).
    """
    views = as_views(views)
    num_features = check_int(num_features, "num_features", minimum=1)
    check_positive(gamma, "gamma", allow_zero=True)
    check_kernel(kernel)
    check_scale(kernel_scale)
    check_generator(generator)
    dispatch.check_precision(input_precision)  # the fused kernel's, see rff_hsic
    for flag, name in ((exact, "exact"), (gather_distributed, "gather_distributed"), (check_finite, "check_finite"),
                       (return_components, "return_components")):
        check_bool(flag, name)
    if gather_distributed:
        views = gather_views(views, generator if not exact else False)
    if check_finite:
        assert_finite([views], ["views"])
        assert_finite_hyper(kernel_scale, "kernel_scale")
    kernel_scale = positive_or_nan(kernel_scale)
    maps = None if exact else draw_maps(kernel, views, num_features, generator)
    out = hsic_components(views, maps, gamma=gamma, kernel_scale=kernel_scale, kernel=kernel, exact=exact,
                          backend=backend, input_precision=input_precision)
    return out if return_components else out.loss
