"""Wang & Isola's uniformity and alignment, and the Gram means on the ``gaussian_gram`` op
(docs/gaussian_gram.md)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import dispatch
from .. import distributed as _dist
from .._checks import check_bool, check_coefficients, check_positive, check_same_device, check_same_shape, check_tensor
from .._checks import check_finite as assert_finite
from ..ops import gaussian_gram as _ops
from ..ops._common import prescale_rows
from ._common import fp32_compute
from .sfrik import legendre_gram_mean

__all__ = [
    "LegendreSeries",
    "GaussianPotential",
    "AlignUniformComponents",
    "gaussian_gram_logmean",
    "gram_mean",
    "uniformity",
    "alignment",
    "align_uniform_loss",
]

Tensor = torch.Tensor


def check_t(t: object, name: str = "t") -> float:
    """t: a finite Python number > 0 (the Gaussian potential's inverse squared length scale), at most
    float32's largest (the kernels and the fp32 torch tier take t in float32)."""
    return check_positive(t, name, maximum=torch.finfo(torch.float32).max, why="float32's largest: t is taken in fp32")


def check_alpha(alpha: object) -> float:
    """alpha: a finite Python number > 0 (the alignment's exponent)."""
    return check_positive(alpha, "alpha")


def check_z(z: object, name: str) -> Tensor:
    """``(n, q)``, n >= 2 (a pair is needed), q >= 1, floating point."""
    return check_tensor(z, name, ndim=2, min_rows=2, min_cols=1)


@dataclass(frozen=True)
class LegendreSeries:
    """``phi(s) = sum_{l=1..L} b_l P_l(q; s)`` (SFRIK's kernel); ``coefficients = (b_1..b_L)``.

    ``KF.gram_mean(z, LegendreSeries((1.0, 40.0, 40.0)))`` is ``KF.legendre_gram_mean(z, (1, 40, 40))``.
    """

    coefficients: tuple[float, ...] = (1.0, 40.0, 40.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "coefficients", check_coefficients(self.coefficients))


@dataclass(frozen=True)
class GaussianPotential:
    """``phi_t(s) = exp(2t (s - 1)) = exp(-t ||u - v||^2)`` on unit vectors, t > 0 (Wang & Isola's).

    ``KF.gram_mean(z, GaussianPotential(t))`` is ``exp(KF.gaussian_gram_logmean(z, t,
    exclude_diagonal=False))``: the mean over all n^2 pairs, diagonal included.
    """

    t: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "t", check_t(self.t))


@dataclass
class AlignUniformComponents:
    """Terms of Wang & Isola's alignment + uniformity loss, for logging (0-dim tensors)."""

    loss: Tensor  #: alignment + uniformity_weight * (uniformity_a + uniformity_b) / 2
    alignment: Tensor  #: L_align = mean_i ||z_a^_i - z_b^_i||^alpha
    uniformity_a: Tensor  #: L_unif(Z_a; t) = log mean_{i != j} exp(-t ||z_a^_i - z_a^_j||^2)
    uniformity_b: Tensor  #: L_unif(Z_b; t)


def logmean_impl(z: Tensor, t: float, *, normalize: bool, exclude_diagonal: bool, backend: str,
                 input_precision: str | None, impl: str | None = None) -> Tensor:
    """:func:`gaussian_gram_logmean` on checked (and, with ``normalize``, prescaled) rows: the
    implementation :mod:`kernelssl.dispatch` picks (``impl``: already picked)."""
    impl = impl or dispatch.implementation("gaussian_gram", backend, z)
    if impl == "triton":
        out = dispatch.triton_op("gaussian_gram").gaussian_gram_logmean(
            z, t, normalize=normalize, exclude_diagonal=exclude_diagonal,
            input_precision=dispatch.resolve_precision(input_precision, z.device))
    elif impl == "autograd":
        out = _ops.gaussian_gram_logmean_eager(z, t, normalize=normalize, exclude_diagonal=exclude_diagonal)
    else:
        out = _ops.gaussian_gram_logmean(z, t, normalize=normalize, exclude_diagonal=exclude_diagonal)
    if not normalize:
        # ||z_i - z_j||^2 = 2 - 2 z_i . z_j holds on the sphere only: rows given off it make the value NaN
        # (a tensor test, no host sync), never a silently different number
        norm2 = z.detach().float().square().sum(dim=-1)
        off = (norm2 - 1.0).abs().amax(dim=-1) > UNIT_ROW_TOL
        out = torch.where(off, torch.full_like(out, float("nan")), out)
    return out


#: ``normalize=False`` takes the rows as unit rows: ``| ||z_i||^2 - 1 | <= UNIT_ROW_TOL`` for every row (rows
#: normalised in bf16 are within ~4e-3), else the Gaussian potential's value is NaN.
UNIT_ROW_TOL = 1e-2


@fp32_compute
def gaussian_gram_logmean(
    z: Tensor,
    t: float = 2.0,
    *,
    normalize: bool = True, exclude_diagonal: bool = True, backend: str = "auto", check_finite: bool = False,
    input_precision: str | None = None,
) -> Tensor:
    """Log of the Gram mean of the Gaussian potential on the sphere::

        exclude_diagonal=True:   log( sum_{i != j} exp(2t (z_i^ . z_j^ - 1)) / (n (n - 1)) )
        exclude_diagonal=False:  log( sum_{i, j}   exp(2t (z_i^ . z_j^ - 1)) / n^2 )

    ``exp(2t (s - 1)) = exp(-t ||z_i^ - z_j^||^2)`` for unit rows ``z^``: with the diagonal excluded this
    is Wang & Isola's uniformity (:func:`uniformity`).  Computed as an online log-sum-exp (a running
    maximum of the exponent), so it is finite and right for any t: at t = 1e4 in fp32, where every
    ``exp`` underflows and their ``pdist`` code returns ``-inf``, it returns the log to fp32 accuracy.

    Args:
        z: ``(n, q)``, n >= 2, q >= 1, floating point (fp16/bf16 upcast to fp32).  Rows are
            L2-normalised first unless ``normalize=False`` (then they must be unit rows already: a row with
            ``| ||z_i||^2 - 1 | > UNIT_ROW_TOL`` (1e-2) makes the value NaN).
        t: t > 0, a Python number (default 2, Wang & Isola's).
        exclude_diagonal: leave out the n pairs (i, i) (default) or include them.
        backend: ``"auto" | "triton" | "torch"`` (and ``KERNELSSL_BACKEND``; :mod:`kernelssl.dispatch`).
        check_finite: raise a ``ValueError`` on NaN/Inf input (one host sync); by default NaN/Inf
            propagate to a NaN result.
        input_precision: the fused kernel's fp32 GEMM precision, as in
            :func:`kernelssl.functional.rff_hsic`; the torch tier ignores it.

    Returns a 0-dim float32 tensor (float64 for float64 input), differentiable w.r.t. ``z``.  The torch
    tier walks the upper triangle of the Gram in ~16 MiB blocks and forms the gradient in the same
    pass (:mod:`kernelssl.ops.gaussian_gram`): extra memory O(n q), never n x n, no host sync.  Under a
    ``torch.func`` transform it is the plain-autograd form instead (O(n^2) memory).
    """
    check_z(z, "z")
    t = check_t(t)
    dispatch.check_precision(input_precision)
    for flag, name in ((normalize, "normalize"), (exclude_diagonal, "exclude_diagonal"),
                       (check_finite, "check_finite")):
        check_bool(flag, name)
    if check_finite:
        assert_finite([z], ["z"])
    if normalize:
        z = prescale_rows(z)
    return logmean_impl(z, t, normalize=normalize, exclude_diagonal=exclude_diagonal, backend=backend,
                        input_precision=input_precision)


@fp32_compute
def gram_mean(
    z: Tensor,
    phi: LegendreSeries | GaussianPotential,
    *,
    normalize: bool = True, backend: str = "auto", check_finite: bool = False, input_precision: str | None = None,
) -> Tensor:
    """The dot-product-kernel Gram mean ``(1/n^2) sum_{i,j} phi(z_i^ . z_j^)`` (diagonal included) for
    a member of a small family of ``phi``:

    * ``LegendreSeries(coefficients=(b_1, ..., b_L))``: ``phi(s) = sum_l b_l P_l(q; s)`` -- SFRIK's
      M(Z), the same number as :func:`legendre_gram_mean` (q >= 2).
    * ``GaussianPotential(t=2.0)``: ``phi_t(s) = exp(2t (s - 1))`` -- ``exp`` of
      :func:`gaussian_gram_logmean` with ``exclude_diagonal=False`` (>= 1/n: no underflow).

    Args:
        z: ``(n, q)``, n >= 2, floating point; L2-normalised first unless ``normalize=False``.
        phi: a :class:`LegendreSeries` or :class:`GaussianPotential` (frozen dataclasses, validated
            when built).
        backend, check_finite, input_precision: as in :func:`gaussian_gram_logmean`.

    Returns a 0-dim float32 tensor (float64 for float64 input), differentiable w.r.t. ``z``.

    Example::

        m = KF.gram_mean(z, KF.LegendreSeries((1.0, 40.0, 40.0)))     # SFRIK's uniformity term
        g = KF.gram_mean(z, KF.GaussianPotential(t=2.0))             # mean Gaussian potential
    """
    if isinstance(phi, LegendreSeries):
        return legendre_gram_mean(z, phi.coefficients, normalize=normalize, backend=backend,
                                  check_finite=check_finite, input_precision=input_precision)
    if isinstance(phi, GaussianPotential):
        return torch.exp(gaussian_gram_logmean(z, phi.t, normalize=normalize, exclude_diagonal=False,
                                               backend=backend, check_finite=check_finite,
                                               input_precision=input_precision))
    raise TypeError(
        f"phi: expected a kernelssl.functional.LegendreSeries or GaussianPotential, got {type(phi).__name__} {phi!r}"
    )


@fp32_compute
def uniformity(
    z: Tensor,
    t: float = 2.0,
    *,
    normalize: bool = True, gather_distributed: bool = False, backend: str = "auto", check_finite: bool = False,
    input_precision: str | None = None,
) -> Tensor:
    """Wang & Isola's uniformity loss / metric (ICML 2020)::

        L_unif(Z; t) = log( (1/(n (n - 1))) sum_{i != j} exp(-t ||z_i^ - z_j^||^2) )

    the same number as their ``torch.pdist(z^, p=2).pow(2).mul(-t).exp().mean().log()``
    (:func:`kernelssl.ops.gaussian_gram.uniformity_pdist`) without its ``n (n - 1) / 2`` distances, and
    finite for any t (online log-sum-exp; see :func:`gaussian_gram_logmean`, which this is with
    ``exclude_diagonal=True``).  Lower is more uniform; ``>= -2t n / (n - 1)`` (n unit vectors:
    ``sum_{i != j} ||z_i^ - z_j^||^2 <= 2 n^2``, and exp is convex).  Rows of any finite non-zero
    magnitude are normalised exactly (power-of-two prescale); an exactly zero row has no direction:
    it counts at squared distance ``2 - 2 * 0 = 2`` from every row (their pdist of the zero vector
    would give 1), see :mod:`kernelssl.ops.gaussian_gram`.

    As a metric (no training), call it under ``torch.no_grad()``: nothing is stored beyond two
    ``(n, q)`` copies of ``z`` (the power-of-two prescaled and the normalised rows) and one ~16 MiB
    Gram block -- O(n q), where Wang & Isola's ``pdist`` form stores ``n (n - 1) / 2`` distances
    (20 GB in fp32 at n = 10^5).  Measured on this project's 2-core CPU (torch 2.14, 2 threads, fp32,
    otherwise idle), q = 128: n = 100 000 in 11.5 s with a peak-RSS increase of 119 MiB over the
    49 MiB of ``z`` itself; n = 16 384 in 0.34 s, +35 MiB (their pdist form: 1.58 s, +1032 MiB)
    (``benchmarks/uniformity_memory.py``: each case in a fresh process, peak RSS above the RSS just
    before the call; docs/gaussian_gram.md).

    Args:
        z: ``(n, q)``, n >= 2, floating point; raw rows are L2-normalised first (``normalize=True``).
        t: t > 0 (default 2).
        gather_distributed: compute it on the batch gathered from all ranks (n global; every rank
            returns the same value, see :mod:`kernelssl.distributed`).
        backend, check_finite, input_precision: as in :func:`gaussian_gram_logmean`.

    Returns a 0-dim float32 tensor (float64 for float64 input), differentiable w.r.t. ``z``.

    Example (the uniformity of a set of test-set features)::

        with torch.no_grad():
            feats = torch.cat([encoder(x) for x, _ in test_loader])     # (50000, q)
            u = KF.uniformity(feats, t=2.0).item()
    """
    check_z(z, "z")
    t = check_t(t)
    dispatch.check_precision(input_precision)
    for flag, name in ((normalize, "normalize"), (gather_distributed, "gather_distributed"),
                       (check_finite, "check_finite")):
        check_bool(flag, name)
    if gather_distributed:
        (z,) = _dist.gather_batch([z], names=["z"])
    if check_finite:
        assert_finite([z], ["z"])
    if normalize:
        z = prescale_rows(z)
    return logmean_impl(z, t, normalize=normalize, exclude_diagonal=True, backend=backend,
                        input_precision=input_precision)


def _check_pair(z_a, z_b) -> None:
    check_z(z_a, "z_a")
    check_z(z_b, "z_b")
    check_same_shape([z_a, z_b], ["z_a", "z_b"])
    check_same_device([z_a, z_b], ["z_a", "z_b"])


@fp32_compute
def alignment(
    z_a: Tensor,
    z_b: Tensor,
    alpha: float = 2.0,
    *,
    normalize: bool = True, check_finite: bool = False,
) -> Tensor:
    """Wang & Isola's alignment (ICML 2020)::

        L_align(Z_a, Z_b; alpha) = (1/n) sum_i ||z_a^_i - z_b^_i||^alpha

    their ``(x - y).norm(p=2, dim=1).pow(alpha).mean()`` on the normalised rows (``alpha = 2``, the
    default, is computed as the sum of squares: smooth, zero gradient at equal rows).

    Args:
        z_a, z_b: ``(n, q)``, same shape and device, n >= 2; row i of each is image i (two views).
        alpha: alpha > 0 (default 2).
        normalize: L2-normalise the rows first (default); ``False``: the rows as given.
        check_finite: raise on NaN/Inf inputs (one host sync) instead of propagating them.

    Returns a 0-dim float32 tensor (float64 if either input is float64).
    """
    _check_pair(z_a, z_b)
    alpha = check_alpha(alpha)
    check_bool(normalize, "normalize")
    check_bool(check_finite, "check_finite")
    if check_finite:
        assert_finite([z_a, z_b], ["z_a", "z_b"])
    if normalize:
        z_a, z_b = prescale_rows(z_a), prescale_rows(z_b)
    return _ops.alignment(z_a, z_b, alpha, normalize)


@fp32_compute
def align_uniform_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    alpha: float = 2.0,
    t: float = 2.0,
    uniformity_weight: float = 1.0,
    normalize: bool = True, gather_distributed: bool = False, backend: str = "auto", check_finite: bool = False,
    return_components: bool = False, input_precision: str | None = None,
) -> Tensor | AlignUniformComponents:
    """Wang & Isola's training loss (ICML 2020) on two views ``(n, q)``::

        loss = L_align(Z_a, Z_b; alpha) + uniformity_weight * (L_unif(Z_a; t) + L_unif(Z_b; t)) / 2

    with :func:`alignment` and :func:`uniformity` (rows L2-normalised inside unless
    ``normalize=False``).  Defaults alpha = 2, t = 2, uniformity_weight (their lambda) = 1.

    ``gather_distributed=True``: both terms on the batch gathered from all ranks (n global): every
    rank returns the single-process loss of the global batch.  ``return_components=True`` returns an
    :class:`AlignUniformComponents` (the loss and its three terms) instead of the loss.
    """
    dispatch.check_precision(input_precision)
    for flag, name in ((normalize, "normalize"), (gather_distributed, "gather_distributed"),
                       (check_finite, "check_finite"), (return_components, "return_components")):
        check_bool(flag, name)
    _check_pair(z_a, z_b)
    alpha = check_alpha(alpha)
    t = check_t(t)
    uniformity_weight = check_positive(uniformity_weight, "uniformity_weight", allow_zero=True)
    if check_finite:  # before the scaling below, which would spread a NaN over its row
        assert_finite([z_a, z_b], ["z_a", "z_b"])
    impl = dispatch.implementation("gaussian_gram", backend, z_a, z_b)
    fused = impl == "triton"
    zz = None
    if fused and not gather_distributed:  # the views stacked first: one prescale for both (row-wise: same bits)
        zz = torch.stack([z_a, z_b])
        if normalize:
            zz = prescale_rows(zz)
        z_a, z_b = zz[0], zz[1]
    elif normalize:
        z_a, z_b = prescale_rows(z_a), prescale_rows(z_b)
    if gather_distributed:
        z_a, z_b = _dist.gather_batch([z_a, z_b], names=["z_a", "z_b"])
    align = _ops.alignment(z_a, z_b, alpha, normalize)
    if fused:
        # both views in ONE fused call (one launch per stage), bitwise each view's own call;
        # w * (0.5 * (u_a + u_b)) == w * 0.5 * (u_a + u_b) exactly (scalings by 1/2)
        zz = torch.stack([z_a, z_b]) if zz is None else zz
        u = logmean_impl(zz, t, normalize=normalize, exclude_diagonal=True, backend=backend,
                         input_precision=input_precision, impl=impl)
        u_a, u_b = u[0], u[1]
        loss = align + uniformity_weight * (0.5 * u.sum())
    else:
        kw = dict(normalize=normalize, exclude_diagonal=True, backend=backend, input_precision=input_precision,
                  impl=impl)
        u_a, u_b = logmean_impl(z_a, t, **kw), logmean_impl(z_b, t, **kw)
        loss = align + uniformity_weight * 0.5 * (u_a + u_b)
    if return_components:
        return AlignUniformComponents(loss=loss, alignment=align, uniformity_a=u_a, uniformity_b=u_b)
    return loss

