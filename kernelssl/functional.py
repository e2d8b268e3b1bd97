"""Functional forms of the three losses and their three core ops (SPEC §5).

Each entry point validates its input (SPEC §4: a ``ValueError``/``TypeError`` naming the argument,
what was expected and what came), picks a backend (``backend="auto" | "triton" | "torch"``, plus the
``KERNELSSL_BACKEND`` environment variable) and calls the implementation.  The torch implementations
live in :mod:`kernelssl.hsic`, :mod:`kernelssl.sfrik` and :mod:`kernelssl.mec`; the fused Triton ops
in :mod:`kernelssl.triton`.

Core ops:

* :func:`rff_hsic` -- ``(HSIC(Z,Y), HSIC(Z,Z))`` of SSL-HSIC with random Fourier features.
* :func:`legendre_gram_mean` -- SFRIK's ``M(Z) = (1/n^2) sum_ij phi(z_i . z_j)``.
* :func:`taylor_logdet` -- MEC's ``T_n(A, B) = tr sum_k (-1)^(k+1) (lam A B^T)^k / k``.
* :func:`gaussian_gram_logmean` -- ``log mean_{i != j} exp(2t (z_i . z_j - 1))`` (SPEC §6.1), and
  :func:`gram_mean`, the dot-product-kernel Gram mean over a small family of phi
  (:class:`LegendreSeries`, :class:`GaussianPotential`).

Losses: :func:`ssl_hsic_loss`, :func:`sfrik_loss`, :func:`mec_loss`, and Wang & Isola's
:func:`align_uniform_loss` (with :func:`alignment` and :func:`uniformity`, also a metric) -- the
modules in :mod:`kernelssl.losses` wrap these.

Non-finite inputs: NaN/Inf propagate to the outputs (never a silent finite number); pass
``check_finite=True`` to raise a ``ValueError`` instead (costs one host sync per input).

Huge finite rows: wherever rows are L2-normalised, each row whose largest magnitude is >= 1 is
first scaled by an exact power of two (``2^-floor(log2 max|z_i|)``, detached: the normalised row and
its gradient do not depend on the scale) so that the sum of squares cannot overflow; fp32 rows with
entries up to the dtype's maximum then normalise correctly on every backend (before, a norm of
~1e19 overflowed ``sum z^2`` and the torch path returned a wrong finite loss, the kernels NaN).  The
scaling is exact, so results are bitwise unchanged for every row that did not overflow.

Tensor-valued hyper-parameters (``kernel_scale`` c, MEC's ``lam``): their values are never read on
the host (that would sync).  A value <= 0 (or NaN) makes the result NaN -- via ``torch.where``, no
sync -- instead of a silent number from a meaningless kernel; ``check_finite=True`` raises on it
(one host sync).  Python numbers are checked eagerly, as always.

``torch.func`` (``grad``, ``vmap``, ``jvp``, ...): every op works under the transforms.  SFRIK's
chunked Gram mean is a custom autograd Function, which the transforms cannot see through; under a
transform it is replaced by the plain-autograd form (:func:`kernelssl.sfrik.legendre_gram_mean_eager`,
same value, O(n^2) memory); so is the blocked Gaussian Gram of the uniformity
(:func:`kernelssl.uniformity.gaussian_gram_logmean_eager`).  Meta tensors: shapes and dtypes propagate through every entry point.

Autocast: every entry point computes in float32 (float64 for float64 inputs) even inside
``torch.autocast``: autocast is switched off for the inputs' device type for the duration of the
call (:func:`_fp32_compute`), so no matmul of the loss silently runs in bf16/fp16.  Inputs may be
fp16/bf16 (they are upcast at entry); the scalar comes back in float32, gradients in the input dtype.

Distributed: the three losses take ``gather_distributed=True`` to compute every term on the batch
gathered from all ranks (:mod:`kernelssl.distributed`).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from . import distributed as _dist
from . import hsic as _hsic
from . import mec as _mec
from . import sfrik as _sfrik
from . import uniformity as _unif
from ._backend import ENV_VAR, resolve_backend, resolve_precision
from ._prescale import prescale_rows as _prescale_rows
from ._checks import (
    check_bool,
    check_choice,
    check_coefficients,
    check_finite as _assert_finite,
    check_int,
    check_positive,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from .mec import lambda_warmup as mec_lambda_warmup
from .rff import (  # noqa: F401 (re-exports)
    KERNELS, rff_features, sample_gaussian_rff, sample_imq_rff, sample_laplace_rff, sample_rff,
)
from .uniformity import GaussianPotential, LegendreSeries

__all__ = [
    "rff_hsic",
    "exact_hsic",
    "ssl_hsic_loss",
    "kernel_scale_objective",
    "sample_rff",
    "sample_imq_rff",
    "sample_gaussian_rff",
    "sample_laplace_rff",
    "KERNELS",
    "rff_features",
    "HSICComponents",
    "legendre_gram_mean",
    "sfrik_loss",
    "SFRIKComponents",
    "taylor_logdet",
    "exact_logdet",
    "mec_loss",
    "mec_lambda_warmup",
    "MECComponents",
    "gaussian_gram_logmean",
    "gram_mean",
    "LegendreSeries",
    "GaussianPotential",
    "uniformity",
    "alignment",
    "align_uniform_loss",
    "AlignUniformComponents",
]

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------------
# shared validation
# --------------------------------------------------------------------------------------------------


def _as_views(views: Sequence[Tensor] | Tensor, name: str = "views") -> Tensor:
    """Stack K >= 2 views ``(B, d)`` (or take one ``(K, B, d)`` tensor) into ``(K, B, d)``."""
    if isinstance(views, Tensor):
        check_tensor(views, name, ndim=3)
        stacked = views
    else:
        views = list(views)
        if len(views) == 1 and isinstance(views[0], Tensor) and views[0].dim() == 3:
            return _as_views(views[0], name)
        if len(views) < 2:
            raise ValueError(
                f"{name}: expected K >= 2 views of shape (B, d) or one (K, B, d) tensor, got {len(views)} view(s)"
            )
        names = [f"{name}[{i}]" for i in range(len(views))]
        for v, n in zip(views, names):
            check_tensor(v, n, ndim=2)
        check_same_shape(views, names)
        check_same_device(views, names)
        dtype = functools.reduce(torch.promote_types, (v.dtype for v in views))
        stacked = torch.stack([v.to(dtype) for v in views])
    if stacked.shape[0] < 2:
        raise ValueError(f"{name}: expected K >= 2 views, got shape {tuple(stacked.shape)} (K = {stacked.shape[0]})")
    if stacked.shape[1] < 2:
        raise ValueError(
            f"{name}: expected a batch of B >= 2 images per view, got shape {tuple(stacked.shape)} (B = {stacked.shape[1]})"
        )
    if stacked.shape[2] < 1:
        raise ValueError(f"{name}: expected embedding dim d >= 1, got shape {tuple(stacked.shape)}")
    return stacked


def _first_tensor(args, kwargs) -> Tensor | None:
    """The first tensor among the arguments, looking into (nested) lists and tuples."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            return a
        if isinstance(a, (list, tuple)):
            t = _first_tensor(a, {})
            if t is not None:
                return t
    return None


# Device types torch.autocast knows; asking about any other (``meta``) raises, so a meta tensor is
# treated as "autocast off" and its shapes propagate.
_AUTOCAST_DEVICE_TYPES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu", "privateuseone"})


def _fp32_compute(fn):
    """Run ``fn`` with autocast disabled for its inputs' device type (the library's autocast policy).

    Inside ``torch.autocast`` a matmul would otherwise be re-cast to bf16/fp16 even after the torch
    path upcast its inputs to float32, breaking the "compute and accumulate in fp32" contract
    (SPEC §4, "Numerics").  Outside autocast it adds nothing; it traces under ``torch.compile``.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = _first_tensor(args, kwargs)
        if (t is not None and t.device.type in _AUTOCAST_DEVICE_TYPES
                and torch.is_autocast_enabled(t.device.type)):
            with torch.autocast(t.device.type, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def _positive_or_nan(x: float | Tensor) -> float | Tensor:
    """A tensor hyper-parameter (c, lam) with every value <= 0 or NaN replaced by NaN -- so that a
    meaningless value turns the loss into NaN instead of a silent number -- without reading it on the
    host.  Python numbers pass through (they are validated eagerly)."""
    if isinstance(x, Tensor) and x.is_floating_point():
        return torch.where(x > 0, x, torch.full_like(x, float("nan")))
    return x


def _assert_finite_hyper(x: float | Tensor, name: str) -> None:
    """``check_finite=True`` on a tensor hyper-parameter: raise unless every value is finite and > 0."""
    if isinstance(x, Tensor) and not bool(((x > 0) & torch.isfinite(x)).all()):
        raise ValueError(f"{name}: expected finite values > 0 (check_finite=True), got {x.detach().cpu().tolist()}")


def _functorch_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, ...) is running."""
    return torch._C._are_functorch_transforms_active()


def gather_views(views: Tensor, generator: torch.Generator | None | bool = False) -> Tensor:
    """HSIC's ``(K, B, d)`` views gathered over the ranks along the image dim (identity without a
    process group).  ``generator``: the generator that will draw the random features after the gather
    (None: the default CPU generator), whose state must agree on every rank; ``False``: no check."""
    if _dist.world_size() == 1:
        return views
    consensus = () if generator is False else (("generator", _dist.generator_fingerprint(generator)),)
    (views,) = _dist.gather_batch([views], dim=1, names=["views"], consensus=consensus)
    return views


def _check_scale_arg(kernel_scale: float | Tensor) -> None:
    """c > 0 as a Python number, or a one-element floating tensor (its value is not read)."""
    _hsic._scale(kernel_scale, None, None, detach=True)


# --------------------------------------------------------------------------------------------------
# SSL-HSIC
# --------------------------------------------------------------------------------------------------


@dataclass
class HSICComponents:
    """Terms of the SSL-HSIC loss, for logging.  All are 0-dim tensors (no host sync)."""

    loss: Tensor  #: what the loss returned (including ``scale_objective`` when the scale is learned)
    hsic_zy: Tensor  #: HSIC(Z, Y), the identity term (maximised)
    hsic_zz: Tensor  #: HSIC(Z, Z), the redundancy term (its square root is penalised)
    kernel_scale: Tensor  #: the kernel scale c used this step
    scale_objective: Tensor | None = None  #: side objective of c when it is learned, else None


@_fp32_compute
def rff_hsic(
    views: Tensor,
    w_a: Tensor,
    b_a: Tensor,
    w_b: Tensor,
    b_b: Tensor,
    kernel_scale: float | Tensor,
    *,
    backend: str = "auto",
    check_finite: bool = False,
    input_precision: str | None = None,
) -> tuple[Tensor, Tensor]:
    """SSL-HSIC's two estimators with random Fourier features (SPEC §1.3).

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
        input_precision: the fused kernel's fp32 GEMM precision (SPEC §4): ``"tf32x3"``, ``"ieee"``,
            ``"tf32"``, or ``None`` (``"tf32"`` under torch's TF32 flag, else ``"tf32x3"``).  The torch
            path ignores it (its matmuls follow torch's own flag).

    Returns:
        ``(hsic_zy, hsic_zz)``, 0-dim tensors, float32 (float64 for float64 views).  Cost
        O(N d D + N D^2), memory O(N D + D^2): never an N x N matrix.
    """
    views = _as_views(views)
    d = views.shape[-1]
    names = ("views", "w_a", "b_a", "w_b", "b_b")
    _hsic._check_map(w_a, b_a, d, views.device, "w_a", "b_a")
    _hsic._check_map(w_b, b_b, d, views.device, "w_b", "b_b")
    _check_scale_arg(kernel_scale)
    resolve_precision(input_precision)
    check_bool(check_finite, "check_finite")
    if check_finite:
        _assert_finite([views, w_a, b_a, w_b, b_b], names)
        _assert_finite_hyper(kernel_scale, "kernel_scale")
    kernel_scale = _positive_or_nan(kernel_scale)
    if resolve_backend(backend, "rff_hsic", views.device) == "triton":  # pragma: no cover - lands with the kernel
        from .triton import rff_hsic as _k

        return _k.rff_hsic(views, w_a, b_a, w_b, b_b, kernel_scale, input_precision=input_precision)
    return _hsic.rff_hsic(views, w_a, b_a, w_b, b_b, kernel_scale)


@_fp32_compute
def exact_hsic(
    views: Tensor, kernel_scale: float | Tensor, *, kernel: str = "imq", check_finite: bool = False
) -> tuple[Tensor, Tensor]:
    """The exact-kernel estimators that :func:`rff_hsic` converges to as D grows (SPEC §1.3, §6.2).

    ``k_c(x, y)`` in place of ``phi(x)^T phi(y)``, HSIC(Z, Z) = ``||H K H||_F^2 / N^2``, for ``kernel``
    "imq" (``c / sqrt(||x - y||^2 + c^2)``, default), "gaussian" (``exp(-||x - y||^2 / (2 c^2))``) or
    "laplace" (``exp(-||x - y||_1 / c)``; gradient with the subgradient sign(0) = 0 at tied
    coordinates).  A check path: it materialises the N x N kernel (torch only).  The kernel is
    evaluated on ``x/c`` from direct differences, so ``k(x, x) = 1`` exactly and no ``c^2`` can
    overflow or underflow (see :func:`kernelssl.hsic.exact_hsic`).
    """
    views = _as_views(views)
    _check_scale_arg(kernel_scale)
    _hsic.check_kernel(kernel)
    check_bool(check_finite, "check_finite")
    if check_finite:
        _assert_finite([views], ["views"])
        _assert_finite_hyper(kernel_scale, "kernel_scale")
    return _hsic.exact_hsic(views, _positive_or_nan(kernel_scale), kernel=kernel)


@_fp32_compute
def kernel_scale_objective(
    views: Tensor,
    kernel_scale: Tensor,
    *,
    num_pairs: int = 1024,
    generator: torch.Generator | None = None,
    kernel: str = "imq",
) -> Tensor:
    """Side objective that learns the kernel scale c (SPEC §1.2), differentiable in c only: minus
    ``mean 1/2 log (dk/drho)^2`` over sampled pairs (no gradient to the embeddings)::

        "imq"       -log(c/2) + (3/2) mean_ij log(rho_ij + c^2)      rho_ij = ||z_i - z_j||^2
        "gaussian"  log(2 c^2) + mean_ij rho_ij / (2 c^2)            (minimum at c^2 = mean rho / 2)
        "laplace"   log(c) + mean_ij r_ij / c                        r_ij = ||z_i - z_j||_1 (minimum at c = mean r)

    See :func:`kernelssl.hsic.kernel_scale_objective`.
    """
    views = _as_views(views)
    check_int(num_pairs, "num_pairs", minimum=1)
    _check_scale_arg(kernel_scale)
    _hsic.check_kernel(kernel)
    return _hsic.kernel_scale_objective(views, kernel_scale, num_pairs=num_pairs, generator=generator, kernel=kernel)


@_fp32_compute
def ssl_hsic_loss(
    views: Sequence[Tensor] | Tensor,
    *,
    num_features: int = 512,
    gamma: float = 3.0,
    kernel_scale: float | Tensor = 1.0,
    kernel: str = "imq",
    exact: bool = False,
    generator: torch.Generator | None = None,
    gather_distributed: bool = False,
    backend: str = "auto",
    check_finite: bool = False,
    return_components: bool = False,
    input_precision: str | None = None,
) -> Tensor | HSICComponents:
    """SSL-HSIC loss ``gamma * sqrt(HSIC(Z, Z)) - HSIC(Z, Y)`` (Li et al., NeurIPS 2021; SPEC §1).

    ``kernel`` names the family: "imq" (the paper's, default), "gaussian" or "laplace" (SPEC §6.2).
    Draws two fresh independent RFF maps (A, B) of that kernel from ``generator`` (``exact=False``,
    :func:`sample_rff`) or uses the exact kernel (``exact=True``, O(N^2) memory, for checking).  The
    legacy ``kernel="rff"`` / ``kernel="exact"`` still work with a ``FutureWarning``: they mean
    ``kernel="imq"`` with ``exact=False`` / ``exact=True``.  The views are used as given
    (the reference L2-normalises them before the loss; :class:`kernelssl.losses.HSICLoss` offers
    ``normalize=True``).  The square root is guarded: ``sqrt(max(x, 0) + 1e-12)``, so a collapsed
    batch (HSIC(Z,Z) -> 0) keeps a finite gradient.

    ``gather_distributed=True``: the views of all ranks are gathered along the image dim (B = the
    global batch, N = K * B) and the maps drawn after the gather, so ``generator`` must be in the
    same state on every rank (seeded alike, never by rank); a differing state raises a ``ValueError``
    (its checksum is compared across ranks in the gather's metadata exchange, see
    :mod:`kernelssl.distributed`).
    """
    views = _as_views(views)
    check_int(num_features, "num_features", minimum=1)
    check_positive(gamma, "gamma", allow_zero=True)
    kernel, exact = _hsic.resolve_kernel(kernel, exact, stacklevel=4)  # user -> _fp32_compute -> here
    _check_scale_arg(kernel_scale)
    resolve_precision(input_precision)  # the fused kernel's, see rff_hsic
    for flag, name in ((gather_distributed, "gather_distributed"), (check_finite, "check_finite"),
                       (return_components, "return_components")):
        check_bool(flag, name)
    if gather_distributed:
        views = gather_views(views, generator if not exact else False)
    if check_finite:
        _assert_finite([views], ["views"])
        _assert_finite_hyper(kernel_scale, "kernel_scale")
    kernel_scale = _positive_or_nan(kernel_scale)
    if not exact:
        # Maps in the compute dtype (fp32 for half views: rounding W and beta to half precision would
        # add ~1e-3 rad phase error), drawn on the generator's device and moved to the views'.
        d, dt = views.shape[-1], torch.float64 if views.dtype == torch.float64 else torch.float32
        w_a, b_a = sample_rff(kernel, d, num_features, generator=generator, device=views.device, dtype=dt)
        w_b, b_b = sample_rff(kernel, d, num_features, generator=generator, device=views.device, dtype=dt)
        zy, zz = rff_hsic(views, w_a, b_a, w_b, b_b, kernel_scale, backend=backend, input_precision=input_precision)
    else:
        resolve_backend(backend, "exact_hsic", views.device)  # validates; exact is torch-only
        zy, zz = _hsic.exact_hsic(views, kernel_scale, kernel=kernel)
    loss = _hsic.hsic_loss(zy, zz, gamma=gamma)
    if not return_components:
        return loss
    c = kernel_scale.detach().reshape(()) if isinstance(kernel_scale, Tensor) else torch.tensor(kernel_scale)
    return HSICComponents(loss=loss, hsic_zy=zy, hsic_zz=zz, kernel_scale=c)


# --------------------------------------------------------------------------------------------------
# SFRIK
# --------------------------------------------------------------------------------------------------


@dataclass
class SFRIKComponents:
    """Terms of the SFRIK loss, for logging (0-dim tensors)."""

    loss: Tensor
    mse: Tensor  #: R, the mean squared difference of the normalised views (over n*q entries)
    mmd_a: Tensor  #: M(Z_a), MMD^2 of view a to the uniform distribution on the sphere
    mmd_b: Tensor  #: M(Z_b)


@_fp32_compute
def legendre_gram_mean(
    z: Tensor,
    coefficients: Sequence[float] = (1.0, 40.0, 40.0),
    *,
    normalize: bool = True,
    backend: str = "auto",
    check_finite: bool = False,
    input_precision: str | None = None,
) -> Tensor:
    """SFRIK's uniformity term, the V-statistic MMD^2 to the uniform law on the sphere (SPEC §2.2)::

        M(Z) = (1/n^2) sum_{i,j} phi(z_i . z_j)       phi(t) = sum_{l=1..L} b_l P_l(q; t)

    with ``P_l(q; .)`` the Legendre polynomial in dimension q (``P_l(q; 1) = 1``), diagonal included.

    Args:
        z: ``(n, q)``, n >= 2, q >= 2.  Rows are L2-normalised first unless ``normalize=False``
            (then they must already be unit rows).
        coefficients: ``(b_1, ..., b_L)``, Python floats, any degree L >= 1.
        input_precision: the fused kernel's fp32 GEMM precision (SPEC §4), as in :func:`rff_hsic`;
            the torch path ignores it.

    Returns a 0-dim float32 tensor (float64 for float64 input).  The torch path streams the Gram in
    row chunks: peak extra memory O(n * chunk), never n x n.  Under a ``torch.func`` transform it is
    the plain-autograd form instead (O(n^2) memory; see the module docstring).

    Precision at high degree L (fp32): the value stays within ~1e-7 * sum(b) of float64, but the
    gradient's relative error grows about as L^2 (the recurrence amplifies the rounding of Gram
    entries near +-1 by ``P'_L(1) = L (L + q - 2) / (q - 1)``).  Measured at n = 256 (max-abs error
    of the gradient over its max-abs, b_l = 1): L = 10: ~5e-6, L = 50: ~5e-5, L = 100: ~5e-4,
    L = 200: ~3e-3 (q from 2 to 128).  The paper's L = 3 is far from this; for L beyond ~50, pass
    float64 embeddings if the gradient must be exact to fp32 precision.
    """
    _sfrik._check_z(z, "z")
    coefficients = check_coefficients(coefficients)
    resolve_precision(input_precision)
    check_bool(normalize, "normalize")
    check_bool(check_finite, "check_finite")
    if check_finite:
        _assert_finite([z], ["z"])
    if normalize:
        z = _prescale_rows(z)
    if _functorch_active():
        if (os.environ.get(ENV_VAR, "auto") if backend == "auto" else backend) == "triton":
            raise RuntimeError(
                "backend='triton' cannot run legendre_gram_mean under a torch.func transform (the fused "
                "op has no vmap/jvp rule); use backend='torch' or 'auto' (the plain-autograd form)"
            )
        return _sfrik.legendre_gram_mean_eager(z, coefficients, normalize=normalize)
    if resolve_backend(backend, "legendre_gram_mean", z.device) == "triton":  # pragma: no cover
        from .triton import legendre_gram as _k

        return _k.legendre_gram_mean(z, coefficients, normalize=normalize, input_precision=input_precision)
    return _sfrik.legendre_gram_mean(z, coefficients, normalize=normalize)


@_fp32_compute
def sfrik_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    coefficients: Sequence[float] = (1.0, 40.0, 40.0),
    sim_weight: float = 4000.0,
    mmd_weight: float = 1.0,
    gather_distributed: bool = False,
    backend: str = "auto",
    check_finite: bool = False,
    return_components: bool = False,
    input_precision: str | None = None,
) -> Tensor | SFRIKComponents:
    """SFRIK loss (Zheng et al., ICLR 2023; SPEC §2.3) on raw projector outputs ``(n, q)``::

        L = sim_weight * R + mmd_weight * (M(Z_a) + M(Z_b)) / 2      R = mean((z_a^ - z_b^)^2)

    ``gather_distributed=True``: both M and R on the batch gathered from all ranks (n global).
    ``input_precision``: the fused Gram kernel's fp32 precision (see :func:`legendre_gram_mean`).
    """
    resolve_precision(input_precision)
    for flag, name in ((gather_distributed, "gather_distributed"), (check_finite, "check_finite"),
                       (return_components, "return_components")):
        check_bool(flag, name)
    _sfrik._check_z(z_a, "z_a")
    _sfrik._check_z(z_b, "z_b")
    if check_finite:  # before the scaling below, which would spread a NaN over its row
        _assert_finite([z_a, z_b], ["z_a", "z_b"])
    z_a, z_b = _prescale_rows(z_a), _prescale_rows(z_b)  # both terms normalise the rows
    if gather_distributed:
        _sfrik._check_z(z_a, "z_a")
        _sfrik._check_z(z_b, "z_b")
        check_same_shape([z_a, z_b], ["z_a", "z_b"])
        z_a, z_b = _dist.gather_batch([z_a, z_b], names=["z_a", "z_b"])
    loss, mse, mmd_a, mmd_b = _sfrik.sfrik_loss(
        z_a,
        z_b,
        coefficients=coefficients,
        sim_weight=sim_weight,
        mmd_weight=mmd_weight,
        # torch backend outside torch.func transforms: None selects the torch path's fused loss (one
        # autograd Function for the normalisation, R and both M's); otherwise the dispatched op (the
        # fused kernel, or the plain-autograd form under a transform) computes M.
        gram_mean=None
        if (isinstance(z_a, Tensor) and not _functorch_active()
            and resolve_backend(backend, "legendre_gram_mean", z_a.device) == "torch")
        else functools.partial(legendre_gram_mean, normalize=True, backend=backend, input_precision=input_precision),
    )
    if return_components:
        return SFRIKComponents(loss=loss, mse=mse, mmd_a=mmd_a, mmd_b=mmd_b)
    return loss


# --------------------------------------------------------------------------------------------------
# MEC
# --------------------------------------------------------------------------------------------------


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


@_fp32_compute
def taylor_logdet(
    a: Tensor,
    b: Tensor,
    lam: float | Tensor,
    order: int = 4,
    *,
    normalize: bool = True,
    backend: str = "auto",
    check_finite: bool = False,
    input_precision: str | None = None,
) -> Tensor:
    """MEC's truncated matrix-log series, batched over leading dims (SPEC §3.1)::

        T_n(A, B) = tr sum_{k=1..n} (-1)^(k+1) C^k / k        C = lam * A^ B^T   (m x m)

    ``T_n -> log det(I + C)`` when the spectral radius of C is < 1 (see :func:`mec_loss`'s
    diagnostics).  Evaluated in min(m, d) space with powers up to ceil(n/2) only.

    Args:
        a, b: ``(..., m, d)``, same shape, m >= 2; rows L2-normalised unless ``normalize=False``.
        lam: lambda > 0 (float, or a tensor broadcastable to the batch shape).  A float below what
            the compute dtype resolves (:func:`min_lambda`) is refused; a tensor's values are not
            read (no sync): a value <= 0 gives NaN.
        order: n >= 1.
        input_precision: the fused kernel's fp32 GEMM precision (SPEC §4), as in :func:`rff_hsic`;
            the torch path ignores it.

    Returns a tensor of shape ``a.shape[:-2]``, float32 (float64 for float64 input).
    """
    _mec._check_inputs(a, b, lam, min_rows=2)
    check_int(order, "order", minimum=1)
    resolve_precision(input_precision)
    check_bool(normalize, "normalize")
    check_bool(check_finite, "check_finite")
    _check_lambda_range(lam, _mec._compute_dtype(a, b))
    if check_finite:
        _assert_finite([a, b], ["a", "b"])
        _assert_finite_hyper(lam, "lam")
    lam = _positive_or_nan(lam)
    if normalize:
        a, b = _prescale_rows(a), _prescale_rows(b)
    if resolve_backend(backend, "taylor_logdet", a.device) == "triton":  # pragma: no cover
        from .triton import taylor_logdet as _k

        return _k.taylor_logdet(a, b, lam, order, normalize=normalize, input_precision=input_precision)
    return _mec.taylor_logdet(a, b, lam, order, normalize=normalize)


@_fp32_compute
def exact_logdet(a: Tensor, b: Tensor, lam: float | Tensor, *, normalize: bool = True) -> Tensor:
    """``log det(I + lam A^ B^T)`` exactly (slogdet in min(m, d) space); NaN where det <= 0."""
    _mec._check_inputs(a, b, lam, min_rows=2)
    check_bool(normalize, "normalize")
    if normalize:
        a, b = _prescale_rows(a), _prescale_rows(b)
    return _mec.exact_logdet(a, b, _positive_or_nan(lam), normalize=normalize)


def min_lambda(dtype: torch.dtype) -> float:
    """The smallest Python-float lambda MEC accepts for a compute dtype (float32 or float64):
    ``finfo.tiny / finfo.eps`` (about 9.9e-32 in float32), so that every entry ``lam * a^_i . b^_j``
    of C that matters at the dtype's precision is a normal number.  Below it C's entries become
    subnormal or zero and the loss silently loses its digits (in fp32, eps_sq = 1e45 returned 0).
    The reference-scaled loss hardly depends on lambda there (it tends to minus the mean cosine
    similarity): use a larger lambda, or float64 embeddings."""
    fi = torch.finfo(dtype)
    return fi.tiny / fi.eps


def _check_lambda_range(lam: float | Tensor | None, dtype: torch.dtype, hint: str = "") -> None:
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


@_fp32_compute
def mec_loss(
    z_a: Tensor,
    z_b: Tensor,
    target_a: Tensor | None = None,
    target_b: Tensor | None = None,
    *,
    eps_sq: float = 64.0,
    order: int = 4,
    scale: str = "reference",
    lam: float | None = None,
    exact: bool = False,
    gather_distributed: bool = False,
    backend: str = "auto",
    check_finite: bool = False,
    return_components: bool = False,
    input_precision: str | None = None,
    check_convergence: str = "off",
) -> Tensor | MECComponents:
    """MEC loss (Liu et al., NeurIPS 2022; SPEC §3.2), symmetrised over the two views::

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
    :func:`kernelssl.mec.convergence_diagnostics`) and, when ``rho >= 1`` (the series no longer
    approximates ``log det``: the loss is silently wrong), issue a ``RuntimeWarning`` or raise a
    ``ValueError``.  Costs the diagnostics (about a third of a forward + backward on the torch path)
    and ONE host sync to read rho.  Under ``torch.compile`` leave it off.
    """
    resolve_precision(input_precision)
    for flag, name in ((exact, "exact"), (gather_distributed, "gather_distributed"),
                       (check_finite, "check_finite"), (return_components, "return_components")):
        check_bool(flag, name)
    check_choice(check_convergence, "check_convergence", ("off", "warn", "raise"))
    if gather_distributed:
        given = [(t, n) for t, n in zip((z_a, z_b, target_a, target_b), ("z_a", "z_b", "target_a", "target_b"))
                 if t is not None]
        for t, n in given:
            check_tensor(t, n, ndim=2, min_rows=2, min_cols=1)
        check_same_shape([t for t, _ in given], [n for _, n in given])
        gathered = iter(_dist.gather_batch([t for t, _ in given], names=[n for _, n in given]))
        z_a, z_b = next(gathered), next(gathered)
        target_a = None if target_a is None else next(gathered)
        target_b = None if target_b is None else next(gathered)
    given = [(t, n) for t, n in zip((z_a, z_b, target_a, target_b), ("z_a", "z_b", "target_a", "target_b"))
             if t is not None]
    for t, n in given:
        check_tensor(t, n, ndim=2, min_rows=2, min_cols=1)
    if check_finite:
        _assert_finite([t for t, _ in given], [n for _, n in given])
        if lam is not None:
            _assert_finite_hyper(lam, "lam")
    check_positive(eps_sq, "eps_sq")
    if lam is None:
        m_, d_ = z_a.shape
        lam = d_ / (m_ * eps_sq)
        _check_lambda_range(lam, _mec._compute_dtype(*(t for t, _ in given)),
                            f" (lam = d / (m eps_sq) = {d_} / ({m_} * {eps_sq:g}))")
    else:
        _check_lambda_range(lam, _mec._compute_dtype(*(t for t, _ in given)))
        lam = _positive_or_nan(lam)
    # all four are row-normalised inside: scale huge rows first (exact; see the module docstring)
    z_a, z_b = _prescale_rows(z_a), _prescale_rows(z_b)
    target_a = None if target_a is None else _prescale_rows(target_a)
    target_b = None if target_b is None else _prescale_rows(target_b)
    diagnostics: list[Tensor] = []  # (rho, term_ratio), filled by the fused op when asked for (below)
    loss, t_ab, t_ba, coding_length, lam = _mec.mec_loss(
        z_a,
        z_b,
        target_a,
        target_b,
        eps_sq=eps_sq,
        order=order,
        scale=scale,
        lam=lam,
        exact=exact,
        logdet=functools.partial(_logdet_keeping_diagnostics, backend=backend, input_precision=input_precision,
                                 diagnostics=diagnostics if return_components or check_convergence != "off" else None),
    )
    if not return_components and check_convergence == "off":
        return loss
    # Diagnostics, without grad and without a host sync: a power-iteration estimate of rho(C) and
    # the ratio of the last two series terms.  The fused kernel returns them with T at negligible
    # cost; the torch path recomputes tr(C^n) (about a third of a forward+backward, paid only when
    # components are asked for).
    if diagnostics:
        rho, ratio = diagnostics
    else:
        pa = z_a if target_a is None else target_a
        pb = z_b if target_b is None else target_b
        a, b = torch.stack(_promote(pa, pb)).detach(), torch.stack(_promote(z_b, z_a)).detach()
        rho, ratio = _mec.convergence_diagnostics(a, b, lam, order=order)
    if check_convergence != "off":
        _report_divergence(rho, lam, check_convergence)
    if not return_components:
        return loss
    return MECComponents(
        loss=loss,
        t_ab=t_ab,
        t_ba=t_ba,
        coding_length=coding_length.detach(),
        lam=lam,
        spectral_radius=rho.max(),
        term_ratio=ratio.max(),
    )


def _report_divergence(rho: Tensor, lam: float | Tensor, action: str) -> None:
    """Read the spectral-radius estimate (the one host sync of ``check_convergence``) and warn or raise
    when the series diverges."""
    r = float(rho.detach().max())
    if not r < 1.0:  # also NaN
        lam_s = f"{lam:.4g}" if isinstance(lam, float) else "the given tensor"
        msg = (f"MEC: the truncated log-det series diverges: spectral radius of C = lam * A^ B^T is about "
               f"{r:.4g} >= 1 (lam = {lam_s}); the loss no longer approximates log det(I + C).  Raise eps_sq, "
               f"use the lambda warm-up (mec_lambda_warmup), or an even order")
        if action == "raise":
            raise ValueError(f"check_convergence: {msg}")
        import warnings

        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _logdet_keeping_diagnostics(a, b, lam, order, *, diagnostics: list | None, backend: str,
                                input_precision: str | None = None) -> Tensor:
    """:func:`taylor_logdet`; when it runs the fused kernel and ``diagnostics`` is a list, also keep the
    kernel's diagnostics there (``None``: not asked for, so not computed -- for s > ONCHIP_MAX they
    cost 16 power-iteration launches)."""
    _mec._check_inputs(a, b, lam, min_rows=2)
    if resolve_backend(backend, "taylor_logdet", a.device) == "triton":
        from .triton import taylor_logdet as _k

        if diagnostics is None:
            return _k.taylor_logdet(a, b, lam, order, input_precision=input_precision)
        t, rho, ratio = _k.taylor_logdet_with_diagnostics(a, b, lam, order, input_precision=input_precision)
        diagnostics[:] = [rho, ratio]
        return t
    return taylor_logdet(a, b, lam, order, backend="torch")


def _promote(*xs: Tensor) -> list[Tensor]:
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in xs))
    return [x.to(dtype) for x in xs]


# --------------------------------------------------------------------------------------------------
# Uniformity and alignment (Wang & Isola, ICML 2020), the Gaussian-potential Gram (SPEC §6.1)
# --------------------------------------------------------------------------------------------------


@dataclass
class AlignUniformComponents:
    """Terms of Wang & Isola's alignment + uniformity loss, for logging (0-dim tensors)."""

    loss: Tensor  #: alignment + uniformity_weight * (uniformity_a + uniformity_b) / 2
    alignment: Tensor  #: L_align = mean_i ||z_a^_i - z_b^_i||^alpha
    uniformity_a: Tensor  #: L_unif(Z_a; t) = log mean_{i != j} exp(-t ||z_a^_i - z_a^_j||^2)
    uniformity_b: Tensor  #: L_unif(Z_b; t)


def _triton_under_transform(backend: str) -> bool:
    return (os.environ.get(ENV_VAR, "auto") if backend == "auto" else backend) == "triton"


def _gaussian_dispatch(z: Tensor, t: float, normalize: bool, exclude_diagonal: bool, backend: str,
                       input_precision: str | None) -> Tensor:
    """The validated op: plain autograd under torch.func, the fused kernel, or the blocked torch path.
    ``z``: prescaled rows when ``normalize``."""
    if _functorch_active():
        if _triton_under_transform(backend):
            raise RuntimeError(
                "backend='triton' cannot run gaussian_gram_logmean under a torch.func transform (the fused "
                "op has no vmap/jvp rule); use backend='torch' or 'auto' (the plain-autograd form)"
            )
        return _unif.gaussian_gram_logmean_eager(z, t, normalize=normalize, exclude_diagonal=exclude_diagonal)
    if resolve_backend(backend, "gaussian_gram_logmean", z.device) == "triton":  # pragma: no cover
        from .triton import gaussian_gram as _k

        return _k.gaussian_gram_logmean(z, t, normalize=normalize, exclude_diagonal=exclude_diagonal,
                                        input_precision=input_precision)
    return _unif.gaussian_gram_logmean(z, t, normalize=normalize, exclude_diagonal=exclude_diagonal)


@_fp32_compute
def gaussian_gram_logmean(
    z: Tensor,
    t: float = 2.0,
    *,
    normalize: bool = True,
    exclude_diagonal: bool = True,
    backend: str = "auto",
    check_finite: bool = False,
    input_precision: str | None = None,
) -> Tensor:
    """Log of the Gram mean of the Gaussian potential on the sphere (SPEC §6.1)::

        exclude_diagonal=True:   log( sum_{i != j} exp(2t (z_i^ . z_j^ - 1)) / (n (n - 1)) )
        exclude_diagonal=False:  log( sum_{i, j}   exp(2t (z_i^ . z_j^ - 1)) / n^2 )

    ``exp(2t (s - 1)) = exp(-t ||z_i^ - z_j^||^2)`` for unit rows ``z^``: with the diagonal excluded this
    is Wang & Isola's uniformity (:func:`uniformity`).  Computed as an online log-sum-exp (a running
    maximum of the exponent), so it is finite and right for any t: at t = 1e4 in fp32, where every
    ``exp`` underflows and their ``pdist`` code returns ``-inf``, it returns the log to fp32 accuracy.

    Args:
        z: ``(n, q)``, n >= 2, q >= 1, floating point (fp16/bf16 upcast to fp32).  Rows are
            L2-normalised first unless ``normalize=False`` (then they must be unit rows already).
        t: t > 0, a Python number (default 2, Wang & Isola's).
        exclude_diagonal: leave out the n pairs (i, i) (default) or include them.
        backend: ``"auto" | "triton" | "torch"`` (and ``KERNELSSL_BACKEND``).
        check_finite: raise a ``ValueError`` on NaN/Inf input (one host sync); by default NaN/Inf
            propagate to a NaN result.
        input_precision: the fused kernel's fp32 GEMM precision (SPEC §4), as in :func:`rff_hsic`;
            the torch path ignores it.

    Returns a 0-dim float32 tensor (float64 for float64 input), differentiable w.r.t. ``z``.  The torch
    path walks the upper triangle of the Gram in ~16 MiB blocks and forms the gradient in the same
    pass (:mod:`kernelssl.uniformity`): extra memory O(n q), never n x n, no host sync.  Under a
    ``torch.func`` transform it is the plain-autograd form instead (O(n^2) memory).
    """
    _unif._check_z(z, "z")
    t = _unif.check_t(t)
    resolve_precision(input_precision)
    for flag, name in ((normalize, "normalize"), (exclude_diagonal, "exclude_diagonal"),
                       (check_finite, "check_finite")):
        check_bool(flag, name)
    if check_finite:
        _assert_finite([z], ["z"])
    if normalize:
        z = _prescale_rows(z)
    return _gaussian_dispatch(z, t, normalize, exclude_diagonal, backend, input_precision)


@_fp32_compute
def gram_mean(
    z: Tensor,
    phi: LegendreSeries | GaussianPotential,
    *,
    normalize: bool = True,
    backend: str = "auto",
    check_finite: bool = False,
    input_precision: str | None = None,
) -> Tensor:
    """The dot-product-kernel Gram mean ``(1/n^2) sum_{i,j} phi(z_i^ . z_j^)`` (diagonal included;
    SPEC §6.1) for a member of a small family of ``phi``:

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


@_fp32_compute
def uniformity(
    z: Tensor,
    t: float = 2.0,
    *,
    normalize: bool = True,
    gather_distributed: bool = False,
    backend: str = "auto",
    check_finite: bool = False,
    input_precision: str | None = None,
) -> Tensor:
    """Wang & Isola's uniformity loss / metric (ICML 2020; SPEC §6.1)::

        L_unif(Z; t) = log( (1/(n (n - 1))) sum_{i != j} exp(-t ||z_i^ - z_j^||^2) )

    the same number as their ``torch.pdist(z^, p=2).pow(2).mul(-t).exp().mean().log()``
    (:func:`kernelssl.uniformity.uniformity_pdist`) without its ``n (n - 1) / 2`` distances, and
    finite for any t (online log-sum-exp; see :func:`gaussian_gram_logmean`, which this is with
    ``exclude_diagonal=True``).  Lower is more uniform; ``>= -2t n / (n - 1)`` (n unit vectors:
    ``sum_{i != j} ||z_i^ - z_j^||^2 <= 2 n^2``, and exp is convex).  Rows of any finite non-zero
    magnitude are normalised exactly (power-of-two prescale); an exactly zero row has no direction:
    it counts at squared distance ``2 - 2 * 0 = 2`` from every row (their pdist of the zero vector
    would give 1), see :mod:`kernelssl.uniformity`.

    As a metric (no training), call it under ``torch.no_grad()``: nothing is stored beyond two
    ``(n, q)`` copies of ``z`` (the power-of-two prescaled and the normalised rows) and one ~16 MiB
    Gram block -- O(n q), where Wang & Isola's ``pdist`` form stores ``n (n - 1) / 2`` distances
    (20 GB in fp32 at n = 10^5).  Measured on this project's 2-core CPU (torch 2.14, 2 threads, fp32,
    otherwise idle), q = 128: n = 100 000 in 11.5 s with a peak-RSS increase of 119 MiB over the
    49 MiB of ``z`` itself; n = 16 384 in 0.34 s, +35 MiB (their pdist form: 1.58 s, +1032 MiB).
    (``benchmarks/uniformity_memory.py``: each case in a fresh process, peak RSS above the RSS just
    before the call; README, "Uniformity and alignment".)

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
    check_bool(gather_distributed, "gather_distributed")
    _unif._check_z(z, "z")
    if gather_distributed:
        (z,) = _dist.gather_batch([z], names=["z"])
    return gaussian_gram_logmean(z, t, normalize=normalize, exclude_diagonal=True, backend=backend,
                                 check_finite=check_finite, input_precision=input_precision)


@_fp32_compute
def alignment(
    z_a: Tensor,
    z_b: Tensor,
    alpha: float = 2.0,
    *,
    normalize: bool = True,
    check_finite: bool = False,
) -> Tensor:
    """Wang & Isola's alignment (ICML 2020; SPEC §6.1)::

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
    _unif._check_z(z_a, "z_a")
    _unif._check_z(z_b, "z_b")
    check_same_shape([z_a, z_b], ["z_a", "z_b"])
    check_same_device([z_a, z_b], ["z_a", "z_b"])
    alpha = _unif.check_alpha(alpha)
    check_bool(normalize, "normalize")
    check_bool(check_finite, "check_finite")
    if check_finite:
        _assert_finite([z_a, z_b], ["z_a", "z_b"])
    if normalize:
        z_a, z_b = _prescale_rows(z_a), _prescale_rows(z_b)
    return _unif._alignment(z_a, z_b, alpha, normalize)


@_fp32_compute
def align_uniform_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    alpha: float = 2.0,
    t: float = 2.0,
    uniformity_weight: float = 1.0,
    normalize: bool = True,
    gather_distributed: bool = False,
    backend: str = "auto",
    check_finite: bool = False,
    return_components: bool = False,
    input_precision: str | None = None,
) -> Tensor | AlignUniformComponents:
    """Wang & Isola's training loss (ICML 2020; SPEC §6.1) on two views ``(n, q)``::

        loss = L_align(Z_a, Z_b; alpha) + uniformity_weight * (L_unif(Z_a; t) + L_unif(Z_b; t)) / 2

    with :func:`alignment` and :func:`uniformity` (rows L2-normalised inside unless
    ``normalize=False``).  Defaults alpha = 2, t = 2, uniformity_weight (their lambda) = 1.

    ``gather_distributed=True``: both terms on the batch gathered from all ranks (n global): every
    rank returns the single-process loss of the global batch.  ``return_components=True`` returns an
    :class:`AlignUniformComponents` (the loss and its three terms) instead of the loss.
    """
    resolve_precision(input_precision)
    for flag, name in ((normalize, "normalize"), (gather_distributed, "gather_distributed"),
                       (check_finite, "check_finite"), (return_components, "return_components")):
        check_bool(flag, name)
    _unif._check_z(z_a, "z_a")
    _unif._check_z(z_b, "z_b")
    check_same_shape([z_a, z_b], ["z_a", "z_b"])
    check_same_device([z_a, z_b], ["z_a", "z_b"])
    alpha = _unif.check_alpha(alpha)
    t = _unif.check_t(t)
    uniformity_weight = check_positive(uniformity_weight, "uniformity_weight", allow_zero=True)
    if check_finite:  # before the scaling below, which would spread a NaN over its row
        _assert_finite([z_a, z_b], ["z_a", "z_b"])
    fused = not _functorch_active() and resolve_backend(backend, "gaussian_gram_logmean", z_a.device) == "triton"
    zz = None
    if fused and not gather_distributed:  # the views stacked first: one prescale for both (row-wise: same bits)
        zz = torch.stack([z_a, z_b])
        if normalize:
            zz = _prescale_rows(zz)
        z_a, z_b = zz[0], zz[1]
    elif normalize:
        z_a, z_b = _prescale_rows(z_a), _prescale_rows(z_b)
    if gather_distributed:
        z_a, z_b = _dist.gather_batch([z_a, z_b], names=["z_a", "z_b"])
    align = _unif._alignment(z_a, z_b, alpha, normalize)
    if fused:
        # both views in ONE fused call (one launch per stage), bitwise each view's own call;
        # w * (0.5 * (u_a + u_b)) == w * 0.5 * (u_a + u_b) exactly (scalings by 1/2)
        from .triton import gaussian_gram as _k

        zz = torch.stack([z_a, z_b]) if zz is None else zz
        u = _k.gaussian_gram_logmean(zz, t, normalize=normalize, exclude_diagonal=True,
                                     input_precision=input_precision)
        u_a, u_b = u[0], u[1]
        loss = align + uniformity_weight * (0.5 * u.sum())
    else:
        u_a = _gaussian_dispatch(z_a, t, normalize, True, backend, input_precision)
        u_b = _gaussian_dispatch(z_b, t, normalize, True, backend, input_precision)
        loss = align + uniformity_weight * 0.5 * (u_a + u_b)
    if return_components:
        return AlignUniformComponents(loss=loss, alignment=align, uniformity_a=u_a, uniformity_b=u_b)
    return loss
