"""SFRIK's functional forms: the ``legendre_gram`` op (the Gram mean M(Z)) and the loss
(docs/legendre_gram.md)."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import dispatch
from .. import distributed as _dist
from .._checks import check_bool, check_coefficients, check_positive, check_same_device, check_same_shape, check_tensor
from .._checks import check_finite as assert_finite
from ..ops import legendre_gram as _ops
from ..ops import sfrik_loss as _loss_ops
from ..ops._common import prescale_rows
from ._common import fp32_compute

__all__ = ["SFRIKComponents", "legendre_gram_mean", "sfrik_loss"]

Tensor = torch.Tensor


@dataclass
class SFRIKComponents:
    """Terms of the SFRIK loss, for logging (0-dim tensors)."""

    loss: Tensor
    mse: Tensor  #: R, the mean squared difference of the normalised views (over n*q entries)
    mmd_a: Tensor  #: M(Z_a), MMD^2 of view a to the uniform distribution on the sphere
    mmd_b: Tensor  #: M(Z_b)


def check_z(z: object, name: str) -> Tensor:
    """``(n, q)``, n >= 2, q >= 2 (the sphere S^(q-1) needs q >= 2), floating point."""
    check_tensor(z, name, ndim=2, min_rows=2)
    if z.shape[1] < 2:  # type: ignore[union-attr]
        raise ValueError(
            f"{name}: expected q >= 2 columns (the sphere S^(q-1) needs q >= 2), got shape {tuple(z.shape)}"  # type: ignore[union-attr]
        )
    return z  # type: ignore[return-value]


def gram_mean_impl(z: Tensor, b: tuple[float, ...], *, normalize: bool, backend: str,
                   input_precision: str | None, impl: str | None = None) -> Tensor:
    """:func:`legendre_gram_mean` on checked (and, with ``normalize``, prescaled) rows: the
    implementation :mod:`kernelssl.dispatch` picks (``impl``: already picked)."""
    impl = impl or dispatch.implementation("legendre_gram", backend, z)
    if impl == "triton":
        return dispatch.triton_op("legendre_gram").legendre_gram_mean(
            z, b, normalize=normalize, input_precision=dispatch.resolve_precision(input_precision, z.device))
    if impl == "autograd":
        return _ops.legendre_gram_mean_eager(z, b, normalize=normalize)
    return _ops.legendre_gram_mean(z, b, normalize=normalize)


@fp32_compute
def legendre_gram_mean(
    z: Tensor,
    coefficients: Sequence[float] = (1.0, 40.0, 40.0),
    *,
    normalize: bool = True, backend: str = "auto", check_finite: bool = False, input_precision: str | None = None,
) -> Tensor:
    """SFRIK's uniformity term, the V-statistic MMD^2 to the uniform law on the sphere::

        M(Z) = (1/n^2) sum_{i,j} phi(z_i . z_j)       phi(t) = sum_{l=1..L} b_l P_l(q; t)

    with ``P_l(q; .)`` the Legendre polynomial in dimension q (``P_l(q; 1) = 1``), diagonal included.

    Args:
        z: ``(n, q)``, n >= 2, q >= 2.  Rows are L2-normalised first unless ``normalize=False``
            (then they must already be unit rows).
        coefficients: ``(b_1, ..., b_L)``, Python floats, any degree L >= 1.
        backend: ``"auto" | "triton" | "torch"`` (and ``KERNELSSL_BACKEND``; :mod:`kernelssl.dispatch`).
        check_finite: raise a ``ValueError`` on NaN/Inf input (one host sync); by default NaN/Inf
            propagate to a NaN result.
        input_precision: the fused kernel's fp32 GEMM precision, as in
            :func:`kernelssl.functional.rff_hsic`; the torch tier ignores it.

    Returns a 0-dim float32 tensor (float64 for float64 input).  The torch tier streams the Gram in
    blocks: peak extra memory O(n q), never n x n.  Under a ``torch.func`` transform it is the
    plain-autograd form instead (O(n^2) memory).

    Precision at high degree L (fp32): the value stays within ~1e-7 * sum(b) of float64, but the
    gradient's relative error grows about as L^2 (the recurrence amplifies the rounding of Gram
    entries near +-1 by ``P'_L(1) = L (L + q - 2) / (q - 1)``).  Measured at n = 256 (max-abs error
    of the gradient over its max-abs, b_l = 1): L = 10: ~5e-6, L = 50: ~5e-5, L = 100: ~5e-4,
    L = 200: ~3e-3 (q from 2 to 128).  The paper's L = 3 is far from this; for L beyond ~50, pass
    float64 embeddings if the gradient must be exact to fp32 precision.
    """
    check_z(z, "z")
    b = check_coefficients(coefficients)
    dispatch.check_precision(input_precision)
    check_bool(normalize, "normalize")
    check_bool(check_finite, "check_finite")
    if check_finite:
        assert_finite([z], ["z"])
    if normalize:
        z = prescale_rows(z)
    return gram_mean_impl(z, b, normalize=normalize, backend=backend, input_precision=input_precision)


@fp32_compute
def sfrik_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    coefficients: Sequence[float] = (1.0, 40.0, 40.0),
    sim_weight: float = 4000.0,
    mmd_weight: float = 1.0,
    gather_distributed: bool = False, backend: str = "auto", check_finite: bool = False,
    return_components: bool = False, input_precision: str | None = None,
) -> Tensor | SFRIKComponents:
    """SFRIK loss (Zheng et al., ICLR 2023) on raw projector outputs ``(n, q)``::

        L = sim_weight * R + mmd_weight * (M(Z_a) + M(Z_b)) / 2      R = mean((z_a^ - z_b^)^2)

    ``gather_distributed=True``: both M and R on the batch gathered from all ranks (n global).
    ``input_precision``: the fused Gram kernel's fp32 precision (see :func:`legendre_gram_mean`).
    """
    dispatch.check_precision(input_precision)
    for flag, name in ((gather_distributed, "gather_distributed"), (check_finite, "check_finite"),
                       (return_components, "return_components")):
        check_bool(flag, name)
    check_z(z_a, "z_a")
    check_z(z_b, "z_b")
    check_same_shape([z_a, z_b], ["z_a", "z_b"])
    check_same_device([z_a, z_b], ["z_a", "z_b"])
    b = check_coefficients(coefficients)
    sim_weight = check_positive(sim_weight, "sim_weight", allow_zero=True)
    mmd_weight = check_positive(mmd_weight, "mmd_weight", allow_zero=True)
    if check_finite:  # before the scaling below, which would spread a NaN over its row
        assert_finite([z_a, z_b], ["z_a", "z_b"])
    # the torch tier outside torch.func transforms: its fused loss (one autograd Function for the
    # prescaling and normalisation, R and both M's); otherwise the loss formula with M from the picked
    # implementation, on rows prescaled here (both terms normalise the rows)
    impl = dispatch.implementation("legendre_gram", backend, z_a, z_b)
    if impl != "torch":
        z_a, z_b = prescale_rows(z_a), prescale_rows(z_b)
    if gather_distributed:
        z_a, z_b = _dist.gather_batch([z_a, z_b], names=["z_a", "z_b"])
    gram_mean = None if impl == "torch" else functools.partial(
        gram_mean_impl, normalize=True, backend=backend, input_precision=input_precision, impl=impl)
    loss, mse, mmd_a, mmd_b = _loss_ops.sfrik_loss(z_a, z_b, coefficients=b, sim_weight=sim_weight,
                                              mmd_weight=mmd_weight, gram_mean=gram_mean, prescale=impl == "torch")
    if return_components:
        return SFRIKComponents(loss=loss, mse=mse, mmd_a=mmd_a, mmd_b=mmd_b)
    return loss
