"""MEC's functional forms: the ``taylor_logdet`` op, the exact log det, and the loss
(docs/taylor_logdet.md)."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from .. import dispatch
from .. import distributed as _dist
from .._checks import (
    check_bool,
    check_choice,
    check_int,
    check_positive,
    check_same_device,
    check_same_shape,
    check_tensor,
    describe,
)
from .._checks import check_finite as assert_finite
from ..ops import taylor_logdet as _ops
from ..ops._common import compute_dtype, prescale_rows, promote
from ..ops.taylor_logdet import lambda_warmup as mec_lambda_warmup
from ._common import assert_finite_hyper, fp32_compute, positive_or_nan

__all__ = ["MECComponents", "taylor_logdet", "exact_logdet", "min_lambda", "mec_loss", "mec_lambda_warmup"]

Tensor = torch.Tensor


@dataclass
class MECComponents:
    """Terms and diagnostics of the MEC loss (0-dim tensors; diagnostics computed without grad)."""

    loss: Tensor
    t_ab: Tensor  #: T_n(target_a, z_b)
    t_ba: Tensor  #: T_n(target_b, z_a)
    coding_length: Tensor  #: mu * (t_ab + t_ba) / (2m), mu = (m + d) / 2
    lam: float | Tensor  #: the lambda used this step
    spectral_radius: Tensor  #: power-iteration estimate of rho(C), max over both directions; series converges iff < 1
    term_ratio: Tensor  #: |last series term| / |previous term|, max over both directions


# --------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------


def check_pair(a, b, lam) -> None:
    """``a, b (..., m, d)`` of one shape and device, m >= 2; ``lam`` a number > 0 or a floating tensor
    broadcastable to the batch shape (metadata only: its values are never read)."""
    check_tensor(a, "a", min_ndim=2, min_rows=2, min_cols=1)
    check_tensor(b, "b", min_ndim=2, min_rows=2, min_cols=1)
    check_same_shape([a, b], ["a", "b"])
    check_same_device([a, b], ["a", "b"])
    batch = a.shape[:-2]
    if isinstance(lam, Tensor):
        if not lam.is_floating_point():
            raise TypeError(f"lam: expected a floating-point tensor or a number, got {describe(lam)}")
        if lam.device != a.device:
            raise ValueError(f"lam: expected device {a.device} (the device of a), got {lam.device}")
        try:
            ok = torch.broadcast_shapes(lam.shape, batch) == batch
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"lam: expected a tensor broadcastable to the batch shape {tuple(batch)}, got shape {tuple(lam.shape)}"
            )
    else:
        check_positive(lam, "lam")


def min_lambda(dtype: torch.dtype) -> float:
    """The smallest Python-float lambda MEC accepts for a compute dtype (float32 or float64):
    ``finfo.tiny / finfo.eps`` (about 9.9e-32 in float32), so that every entry ``lam * a^_i . b^_j``
    of C that matters at the dtype's precision is a normal number.  Below it C's entries become
    subnormal or zero and the loss silently loses its digits (in fp32, eps_sq = 1e45 returned 0).
    The reference-scaled loss hardly depends on lambda there (it tends to minus the mean cosine
    similarity): use a larger lambda, or float64 embeddings."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    fi = torch.finfo(dtype)
    return fi.tiny / fi.eps


def check_lambda_range(lam: float | Tensor | None, dtype: torch.dtype, hint: str = "") -> None:
    if lam is None or isinstance(lam, Tensor):
        return
    lam = check_positive(lam, "lam")
    floor = min_lambda(dtype)
    if lam < floor:
        raise ValueError(
            f"lam: expected lambda >= {floor:.3g} for {dtype} computation (smaller values underflow: the "
            f"entries of C = lam * A^ B^T would be subnormal or zero), got {lam:.3g}{hint}; use a larger "
            f"lambda (smaller eps_sq) or float64 embeddings"
        )


# --------------------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------------------


def logdet_impl(a, b, lam, order, *, normalize: bool = True, backend: str, input_precision: str | None = None,
                diagnostics: list | None = None) -> Tensor:
    """:func:`taylor_logdet` on checked (and, with ``normalize``, prescaled) rows: the implementation
    :mod:`kernelssl.dispatch` picks.  When it is the fused kernel and ``diagnostics`` is a list, the
    kernel's diagnostics ``[rho, term_ratio]`` are kept there (``None``: not asked for, so not
    computed -- above ``ONCHIP_MAX`` they cost 16 power-iteration launches)."""
    impl = dispatch.implementation("taylor_logdet", backend, a, b)
    if impl == "triton":
        k = dispatch.triton_op("taylor_logdet")
        prec = dispatch.resolve_precision(input_precision, a.device)
        if diagnostics is None:
            return k.taylor_logdet(a, b, lam, order, normalize=normalize, input_precision=prec)
        t, rho, ratio = k.taylor_logdet_with_diagnostics(a, b, lam, order, normalize=normalize, input_precision=prec)
        diagnostics[:] = [rho, ratio]
        return t
    if impl == "autograd":  # under torch.func transforms
        return _ops.taylor_logdet_autograd(a, b, lam, order, normalize=normalize)
    return _ops.taylor_logdet(a, b, lam, order, normalize=normalize)  # its autograd Function


@fp32_compute
def taylor_logdet(
    a: Tensor,
    b: Tensor,
    lam: float | Tensor,
    order: int = 4,
    *,
    normalize: bool = True, backend: str = "auto", check_finite: bool = False, input_precision: str | None = None,
) -> Tensor:
    """MEC's truncated matrix-log series, batched over leading dims::

        T_n(A, B) = tr sum_{k=1..n} (-1)^(k+1) C^k / k        C = lam * A^ B^T   (m x m)

    ``T_n -> log det(I + C)`` when the spectral radius of C is < 1 (see :func:`mec_loss`'s
    diagnostics).  Evaluated in min(m, d) space with powers up to ceil(n/2) only.

    Args:
        a, b: ``(..., m, d)``, same shape, m >= 2; rows L2-normalised unless ``normalize=False``.
        lam: lambda > 0 (float, or a tensor broadcastable to the batch shape).  A float below what
            the compute dtype resolves (:func:`min_lambda`) is refused; a tensor's values are not
            read (no sync): a value <= 0 gives NaN.
        order: n >= 1.
        backend: ``"auto" | "triton" | "torch"`` (and ``KERNELSSL_BACKEND``; :mod:`kernelssl.dispatch`).
        check_finite: raise a ``ValueError`` on NaN/Inf input (one host sync).
        input_precision: the fused kernel's fp32 GEMM precision, as in
            :func:`kernelssl.functional.rff_hsic`; the torch tier ignores it.

    Returns a tensor of shape ``a.shape[:-2]``, float32 (float64 for float64 input).
    """
    check_pair(a, b, lam)
    order = check_int(order, "order", minimum=1)
    dispatch.check_precision(input_precision)
    check_bool(normalize, "normalize")
    check_bool(check_finite, "check_finite")
    check_lambda_range(lam, compute_dtype(a, b))
    if check_finite:
        assert_finite([a, b], ["a", "b"])
        assert_finite_hyper(lam, "lam")
    lam = positive_or_nan(lam)
    if normalize:
        a, b = prescale_rows(a), prescale_rows(b)
    return logdet_impl(a, b, lam, order, normalize=normalize, backend=backend, input_precision=input_precision)


@fp32_compute
def exact_logdet(a: Tensor, b: Tensor, lam: float | Tensor, *, normalize: bool = True) -> Tensor:
    """``log det(I + lam A^ B^T)`` exactly (slogdet in min(m, d) space); NaN where det <= 0."""
    check_pair(a, b, lam)
    check_bool(normalize, "normalize")
    if normalize:
        a, b = prescale_rows(a), prescale_rows(b)
    return _ops.exact_logdet(a, b, positive_or_nan(lam), normalize=normalize)


# --------------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------------


@fp32_compute
def mec_loss(
    z_a: Tensor,
    z_b: Tensor,
    target_a: Tensor | None = None,
    target_b: Tensor | None = None,
    *,
    eps_sq: float = 64.0,
    order: int = 4,
    scale: str = "reference",
    lam: float | Tensor | None = None,
    exact: bool = False,
    gather_distributed: bool = False, backend: str = "auto", check_finite: bool = False,
    return_components: bool = False, input_precision: str | None = None,
    check_convergence: str = "off",
) -> Tensor | MECComponents:
    """MEC loss (Liu et al., NeurIPS 2022), symmetrised over the two views::

        scale="reference":  loss = -(1/lam) (T_n(P1, Z2) + T_n(P2, Z1)) / (2m)
        scale="paper":      loss = -mu (T_n(P1, Z2) + T_n(P2, Z1)) / 2,       mu = (m + d) / 2

    with ``lam = d / (m eps_sq)`` unless given, P = targets (teacher outputs; the online outputs when
    None, not detached) and Z = online outputs, all ``(m, d)``.  ``exact=True`` uses the exact
    ``log det`` in place of T_n (for checking convergence).

    ``gather_distributed=True``: the outputs (and targets) of all ranks are gathered first, so m is
    the **global** batch size -- in ``lam = d / (m eps_sq)`` and the 1/(2m) scale alike; a ``lam``
    passed in (e.g. from :func:`mec_lambda_warmup`) must be based on the global m too.
    ``input_precision``: the fused kernel's fp32 precision (see :func:`taylor_logdet`).

    ``check_convergence``: ``"off"`` (default, no sync), ``"warn"`` or ``"raise"`` -- estimate the
    spectral radius rho of C in both directions (the power iteration of
    :func:`kernelssl.ops.taylor_logdet.convergence_diagnostics`; where it reads ``EXACT_RHO_ABOVE`` = 0.8
    or more, within its error of 1, the exact radius from the eigenvalues of the ``min(m, d)``-space
    matrix, :func:`kernelssl.ops.taylor_logdet.exact_spectral_radius`) and, when ``rho >= 1`` (the series
    no longer approximates ``log det``: the loss is silently wrong), issue a ``RuntimeWarning`` or raise a
    ``ValueError``.  Costs the diagnostics (about a third of a forward + backward on the torch tier), a
    host sync to read rho, and near 1 an O(min(m, d)^3) eigenvalue solve.  Under ``torch.compile`` leave
    it off.
    """
    dispatch.check_precision(input_precision)
    for flag, name in ((exact, "exact"), (gather_distributed, "gather_distributed"),
                       (check_finite, "check_finite"), (return_components, "return_components")):
        check_bool(flag, name)
    check_choice(check_convergence, "check_convergence", ("off", "warn", "raise"))
    check_choice(scale, "scale", ("reference", "paper"))
    check_positive(eps_sq, "eps_sq")
    order = check_int(order, "order", minimum=1)
    given = [(t, n) for t, n in zip((z_a, z_b, target_a, target_b), ("z_a", "z_b", "target_a", "target_b"))
             if t is not None]
    for t, n in given:
        check_tensor(t, n, ndim=2, min_rows=2, min_cols=1)
    check_same_shape([t for t, _ in given], [n for _, n in given])
    check_same_device([t for t, _ in given], [n for _, n in given])
    if isinstance(lam, Tensor):
        if lam.dim() != 0 or not lam.is_floating_point():
            raise ValueError(f"lam: expected a number or a 0-dim floating-point tensor, got {describe(lam)}")
        if lam.device != z_a.device:
            raise ValueError(f"lam: expected device {z_a.device} (the device of z_a), got {lam.device}")
    if gather_distributed:
        gathered = iter(_dist.gather_batch([t for t, _ in given], names=[n for _, n in given]))
        z_a, z_b = next(gathered), next(gathered)
        target_a = None if target_a is None else next(gathered)
        target_b = None if target_b is None else next(gathered)
        given = [(t, n) for t, n in zip((z_a, z_b, target_a, target_b), ("z_a", "z_b", "target_a", "target_b"))
                 if t is not None]
    if check_finite:
        assert_finite([t for t, _ in given], [n for _, n in given])
        if lam is not None:
            assert_finite_hyper(lam, "lam")
    dtype = compute_dtype(*(t for t, _ in given))
    if lam is None:
        m_, d_ = z_a.shape
        lam = d_ / (m_ * eps_sq)
        check_lambda_range(lam, dtype, f" (lam = d / (m eps_sq) = {d_} / ({m_} * {eps_sq:g}))")
    else:
        check_lambda_range(lam, dtype)
        lam = positive_or_nan(lam)
        if isinstance(lam, Tensor):  # the loss in the inputs' compute dtype, whatever lam's
            lam = lam.to(dtype)
    # all four are row-normalised inside: scale huge rows first (exact)
    z_a, z_b = prescale_rows(z_a), prescale_rows(z_b)
    target_a = None if target_a is None else prescale_rows(target_a)
    target_b = None if target_b is None else prescale_rows(target_b)
    diagnostics: list[Tensor] = []  # (rho, term_ratio), filled by the fused op when asked for (below)
    wanted = return_components or check_convergence != "off"
    loss, t_ab, t_ba, coding_length, lam = _ops.mec_loss(
        z_a, z_b, target_a, target_b, eps_sq=eps_sq, order=order, scale=scale, lam=lam, exact=exact,
        logdet=functools.partial(logdet_impl, backend=backend, input_precision=input_precision,
                                 diagnostics=diagnostics if wanted else None),
    )
    if not wanted:
        return loss
    # Diagnostics, without grad and without a host sync: a power-iteration estimate of rho(C) and
    # the ratio of the last two series terms.  The fused kernel returns them with T at negligible
    # cost; the torch tier recomputes tr(C^n) (about a third of a forward+backward, paid only when
    # components are asked for).
    if diagnostics:
        rho, ratio = diagnostics
    else:
        pa = z_a if target_a is None else target_a
        pb = z_b if target_b is None else target_b
        a, b = torch.stack(promote(pa, pb)).detach(), torch.stack(promote(z_b, z_a)).detach()
        rho, ratio = _ops.convergence_diagnostics(a, b, lam, order=order)
    if check_convergence != "off":
        def exact_rho():  # both directions, as the estimate
            pa = z_a if target_a is None else target_a
            pb = z_b if target_b is None else target_b
            a, b = torch.stack(promote(pa, pb)), torch.stack(promote(z_b, z_a))
            return _ops.exact_spectral_radius(a, b, lam)

        _report_divergence(rho, lam, check_convergence, exact_rho)
    if not return_components:
        return loss
    return MECComponents(loss=loss, t_ab=t_ab, t_ba=t_ba, coding_length=coding_length.detach(), lam=lam,
                         spectral_radius=rho.max(), term_ratio=ratio.max())


#: ``check_convergence`` computes the exact spectral radius when the power-iteration estimate is at least
#: this (the estimate has been seen 0.87x the true radius; below 0.8 the true one is < 1 with margin).
EXACT_RHO_ABOVE = 0.8


def _report_divergence(rho: Tensor, lam: float | Tensor, action: str, exact_rho) -> None:
    """Read the spectral-radius estimate (the host sync of ``check_convergence``); within its error of 1,
    ``exact_rho()`` (the eigenvalues of C); warn or raise when the series diverges."""
    r = float(rho.detach().max())
    if EXACT_RHO_ABOVE <= r < 1.0:
        r = max(r, float(exact_rho().max()))
    if not r < 1.0:  # also NaN
        lam_s = f"{lam:.4g}" if isinstance(lam, float) else "the given tensor"
        msg = (f"MEC: the truncated log-det series diverges: spectral radius of C = lam * A^ B^T is about "
               f"{r:.4g} >= 1 (lam = {lam_s}); the loss no longer approximates log det(I + C).  Raise eps_sq, "
               f"use the lambda warm-up (mec_lambda_warmup), or an even order")
        if action == "raise":
            raise ValueError(f"check_convergence: {msg}")
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
