"""HSIC and CKA between two representations (docs/metrics.md), without an ``n x n`` matrix.

For ``x (n, dx)``, ``y (n, dy)``, Gram matrices K (of x) and L (of y), ``H = I - 11^T/n``, row sums
``k = K 1``, ``l = L 1`` and diagonals ``dK``, ``dL``, both estimators need only ``tr(KL)``, ``k``, ``l``,
``dK``, ``dL``::

    HSIC_b = [tr(KL) - (2/n) k.l + (1^T k)(1^T l)/n^2] / (n-1)^2                      (= tr(KHLH)/(n-1)^2)
    HSIC_u = [tr(Kt Lt) + (1^T kt)(1^T lt)/((n-1)(n-2)) - (2/(n-2)) kt.lt] / (n(n-3))
             tr(Kt Lt) = tr(KL) - dK.dL,  kt = k - dK,  lt = l - dL                (Kt: K, zeroed diagonal)
    CKA    = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

* ``"linear"`` (and random features, ``exact=False``): from the column-centred features x~, y~
  (HSIC is unchanged by centring the columns; it removes cancellation): ``tr(KL) = ||y~^T x~||_F^2``,
  ``k = x~ (x~^T 1) = 0``, ``dK_i = ||x~_i||^2``.  Memory ``O((dx + dy)^2 + n (dx + dy))``.
* ``"gaussian"`` ``exp(-||a-b||^2/(2 s^2))`` and ``"imq"`` ``s/sqrt(||a-b||^2 + s^2)``, ``exact=True``:
  the ``gram_hsic`` op (:mod:`kernelssl.ops.gram_hsic`: the statistics in float64, streamed over Gram
  tiles, forward and backward; the fused kernels of ``kernelssl/triton/gram_hsic.py`` on a GPU).  Memory
  ``O(TILE^2 + n (dx + dy))`` with or without a gradient; no ``n x n``.  Each Gram comes as ``K``, or as
  ``f (K - 11^T)`` when most entries are near 1 (``f`` a power of two,
  :func:`~kernelssl.ops.gram_hsic.gram_shift`; the estimators are unchanged by the shift and divide ``f``
  out exactly), by its off-diagonal sums, ``tr(Kt Lt)`` and ``kt``, beside its constant diagonal (1, or
  0): no digit of a wide-bandwidth Gram or of a near-identity one is lost to the sums.  CKA divides by
  ``sqrt(HSIC(K, K)) sqrt(HSIC(L, L))`` (their product can underflow).
* ``exact=False`` with ``"gaussian"``/``"imq"``: the random features of :mod:`kernelssl.ops.rff_hsic`
  (``phi(x) = sqrt(2/D) cos(W x / s + b)``, ``E phi(a).phi(b) = k(a, b)``), then the linear identities.

Bandwidth ``sigma="median"`` (Kornblith et al.'s convention): ``s^2`` = the median of all squared
distances ``||x_i - x_j||^2`` over ``i, j`` (``n^2`` values, diagonal zeros included; the mean of the
two middle values when their count is even, like ``numpy.median``).  Exact for ``n <= MEDIAN_ROWS``;
for larger ``n`` the same rule over the ``MEDIAN_ROWS`` rows ``i_k = (k (n - 1)) // (MEDIAN_ROWS - 1)``,
``k = 0 .. MEDIAN_ROWS - 1`` (evenly spaced, first and last included): deterministic, ``O(MEDIAN_ROWS^2)``
memory.

Degenerate input (never a silent finite number): a constant representation (every row equal) has
HSIC exactly 0 -- returned as 0, not rounding noise -- and CKA 0/0, returned as NaN.  An unbiased HSIC of
a representation with itself can be negative on tiny or badly scaled samples; CKA is then NaN (the square
root of a negative number).  The unbiased estimator needs ``n >= 4`` (ValueError naming ``x``).  NaN/Inf
inputs propagate.  No host sync: all checks read shapes and dtypes only.

Precision: float16/bfloat16/float32 inputs are computed (and returned) in float32, float64 in float64;
the exact Gaussian/IMQ statistics and estimators are float64 sums for every input dtype.  ``backend``:
as every op (:mod:`kernelssl.dispatch`): ``"auto"`` runs the fused kernels on a GPU they serve.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .. import dispatch
from .._checks import check_bool, check_choice, check_int, check_positive, check_same_device, check_tensor, describe
from ..ops import gram_hsic as _gram
from ..ops._common import compute_dtype
from ..ops.rff_hsic import rff_features, sample_rff

__all__ = ["hsic", "cka", "median_sigma", "KERNELS", "MEDIAN_ROWS", "DEFAULT_NUM_FEATURES"]

KERNELS = ("linear", "gaussian", "imq")
#: Rows the median bandwidth looks at, at most (module docstring).
MEDIAN_ROWS = 2048
DEFAULT_NUM_FEATURES = 2048


# --------------------------------------------------------------------------------------------------
# checks


def _check_pair(x, y, unbiased: bool) -> tuple[Tensor, Tensor]:
    check_tensor(x, "x", ndim=2, min_rows=2)
    check_tensor(y, "y", ndim=2)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y: expected {x.shape[0]} rows (the rows of x), got shape {tuple(y.shape)}")
    check_same_device([x, y], ["x", "y"])
    if unbiased and x.shape[0] < 4:
        raise ValueError(
            f"x: the unbiased estimator needs at least 4 rows (samples), got shape {tuple(x.shape)}"
        )
    cdt = compute_dtype(x, y)
    return x.to(cdt), y.to(cdt)


def _sigma_names(sigma) -> tuple[str, str]:
    """The names of ``sigma``'s parts in messages: ``sigma[0]``, ``sigma[1]`` for a pair."""
    return ("sigma[0]", "sigma[1]") if isinstance(sigma, (tuple, list)) else ("sigma", "sigma")


def _check_sigma(sigma, kernel: str) -> tuple:
    """``(sx, sy)``: each None (linear), ``"median"`` or a positive float."""
    if kernel == "linear":
        if sigma is not None:
            raise ValueError(f"sigma: expected None for kernel='linear', got {describe(sigma)}")
        return None, None
    if sigma is None:
        sigma = "median"
    pair = tuple(sigma) if isinstance(sigma, (tuple, list)) else (sigma, sigma)
    if len(pair) != 2:
        raise ValueError(f"sigma: expected a number, 'median' or a pair (sigma_x, sigma_y), got {describe(sigma)}")
    names = _sigma_names(sigma)
    out = []
    for s, nm in zip(pair, names):
        if isinstance(s, str):
            check_choice(s, nm, ("median",))
            out.append(s)
        elif isinstance(s, numbers.Real) and not isinstance(s, bool):
            out.append(check_positive(s, nm))
        else:
            raise TypeError(f"{nm}: expected a positive number or 'median', got {describe(s)}")
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# pieces


def _sq_dist(a: Tensor, b: Tensor, sa: Tensor, sb: Tensor) -> Tensor:
    # ||a_i - b_j||^2 = ||a_i||^2 + ||b_j||^2 - 2 a_i.b_j, clamped at 0 (rounding)
    return (sa[:, None] + sb[None, :] - 2.0 * (a @ b.T)).clamp_min(0.0)


def _zero_diagonal(d2: Tensor) -> Tensor:
    # out of place (autograd): the exact 0 of ||a_i - a_i||^2 in place of its rounding
    eye = torch.eye(d2.shape[0], dtype=torch.bool, device=d2.device)
    return torch.where(eye, torch.zeros((), dtype=d2.dtype, device=d2.device), d2)


def median_sigma(x: Tensor) -> Tensor:
    """The median bandwidth ``s`` of ``x (n, d)`` (module docstring: exact up to :data:`MEDIAN_ROWS`
    rows, then the evenly spaced rows), a 0-d tensor in the compute dtype (no host sync)."""
    check_tensor(x, "x", ndim=2, min_rows=1)
    x = x.to(compute_dtype(x))
    n = x.shape[0]
    if n > MEDIAN_ROWS:
        idx = (torch.arange(MEDIAN_ROWS, device=x.device) * (n - 1)) // (MEDIAN_ROWS - 1)
        x = x[idx]
    x = x - x.mean(0)
    sq = (x * x).sum(1)
    flat = _zero_diagonal(_sq_dist(x, x, sq, sq)).reshape(-1)
    N = flat.numel()
    lo = torch.kthvalue(flat, (N + 1) // 2).values
    hi = torch.kthvalue(flat, N // 2 + 1).values
    return torch.sqrt(0.5 * (lo + hi))


def _sigma_value(sig, x: Tensor) -> Tensor:
    if isinstance(sig, str):
        # The median of a constant x is 0, and k(0; 0) is 0/0; but every distance is 0 there, so any
        # bandwidth gives the same all-ones Gram: 1 keeps the value finite, and the median's own
        # derivative (sqrt at 0) is kept out of the gradient by selecting a detached x (no host sync)
        constant = _constant(x)
        s = median_sigma(torch.where(constant, x.detach(), x))
        return torch.where(constant, torch.ones_like(s), s)
    return torch.full((), sig, dtype=x.dtype, device=x.device)  # a fill: no host-to-device copy


def _stats_features(fs: list[Tensor]) -> dict:
    """Sufficient statistics from feature maps (K_a = f_a f_a^T), columns centred: traces ``tr(K_a K_b)``
    for a <= b, row sums (zero) and diagonals."""
    fs = [f - f.mean(0) for f in fs]
    tr = {}
    for a in range(len(fs)):
        for b in range(a, len(fs)):
            tr[a, b] = torch.linalg.matrix_norm(fs[b].T @ fs[a]) ** 2
    return {"tr": tr, "diag": [(f * f).sum(1) for f in fs]}


def _stats_gram(xs: list[Tensor], kernel: str, sigmas: list[Tensor], backend: str, pairs) -> dict:
    """The statistics (float64) of exact ``"gaussian"``/``"imq"`` Grams, shifted and without their
    diagonals (:mod:`kernelssl.ops.gram_hsic`), by the ``gram_hsic`` op (fused kernels where
    :mod:`kernelssl.dispatch` picks them, one launch per pair of ``pairs``): O(TILE^2 + n d) memory, with a
    gradient too."""
    xs = [x - x.mean(0) for x in xs]
    m = len(xs)
    shifts = [_gram.gram_shift(x, s) for x, s in zip(xs, sigmas)]
    impl = dispatch.implementation("gram_hsic", backend, *xs)
    if impl == "triton":
        fused = dispatch.triton_op("gram_hsic")
        tr, rows = {}, [None] * m
        for a, b in pairs:
            t, r = fused.gram_hsic_stats(xs[a], xs[b], torch.stack([sigmas[a], sigmas[b]]), kernel,
                                         torch.stack([shifts[a], shifts[b]]))
            tr[a, a], tr[a, b], tr[b, b] = t[0, 0], t[0, 1], t[1, 1]
            rows[a], rows[b] = r[0], r[1]
    else:
        stats = _gram.gram_hsic_stats_eager if impl == "autograd" else _gram.gram_hsic_stats
        t, r = stats(xs, kernel, sigmas, shifts)
        tr = {(a, b): t[a, b] for a in range(m) for b in range(a, m)}
        rows = list(r.unbind(0))
    # the Gram K (diagonal k(a, a) = 1 for both kernels), or f (K - 11^T) (diagonal 0) for a shift f > 0
    return {"tr_off": tr, "row_off": rows, "diag": [(c == 0).to(torch.float64) for c in shifts],
            "scale": [_gram.gram_scale(c).to(torch.float64) for c in shifts]}


def _estimate(st: dict, a: int, b: int, n: int, unbiased: bool) -> Tensor:
    """HSIC_b or HSIC_u of Grams a and b from the statistics (module docstring): the features' full traces
    (``"tr"``), or a Gram's off-diagonal sums (``"tr_off"``, ``"row_off"``) beside its constant diagonal,
    divided by the Grams' scales (powers of two: exact)."""
    da, db = st["diag"][a], st["diag"][b]
    if "tr_off" in st:
        t_off = st["tr_off"][min(a, b), max(a, b)]
        ra, rb = st["row_off"][a], st["row_off"][b]
        if not unbiased:  # k = row_off + diag; tr(KL) = tr_off + n da db
            ka, kb = ra + da, rb + db
            val = (t_off + n * (da * db) - (2.0 / n) * (ka @ kb) + ka.sum() * kb.sum() / n**2) / (n - 1) ** 2
        else:
            val = _unbiased(t_off, ra, rb, n)
        return val / (st["scale"][a] * st["scale"][b])
    t = st["tr"][min(a, b), max(a, b)]
    if not unbiased:  # centred features: k = 0
        return t / (n - 1) ** 2
    return _unbiased(t - da @ db, -da, -db, n)


def _unbiased(t_off: Tensor, kta: Tensor, ktb: Tensor, n: int) -> Tensor:
    """HSIC_u from ``tr(Kt Lt)`` and the row sums of the zero-diagonal Grams."""
    return (t_off + kta.sum() * ktb.sum() / ((n - 1) * (n - 2)) - (2.0 / (n - 2)) * (kta @ ktb)) / (n * (n - 3))


def _constant(x: Tensor) -> Tensor:
    """0-d bool: every row of ``x`` equal (a tensor, no host sync)."""
    return (x == x[:1]).all()


def _statistics(reps: list[Tensor], kernel: str, sigmas: tuple, exact: bool, num_features: int,
                generator, backend: str = "auto", pairs=((0, 1),)) -> dict:
    """The statistics of :func:`_estimate` for the Grams of ``reps``; ``pairs``: the ``(a, b)`` whose
    ``HSIC(a, b)`` (and ``HSIC(a, a)``, ``HSIC(b, b)``) will be asked for (every index in one)."""
    if kernel == "linear":
        return _stats_features(reps)
    svals = [_sigma_value(s, r) for s, r in zip(sigmas, reps)]
    if exact:
        return _stats_gram(reps, kernel, svals, backend, pairs)
    feats = []
    for r, s in zip(reps, svals):
        w, b = sample_rff(kernel, r.shape[1], num_features, generator=generator, device=r.device, dtype=r.dtype)
        feats.append(rff_features(r, w, b, s))
    return _stats_features(feats)


def _prepare(x, y, kernel, sigma, unbiased, exact, num_features, generator, backend="auto"):
    check_choice(kernel, "kernel", KERNELS)
    check_choice(backend, "backend", dispatch.BACKENDS)
    check_bool(unbiased, "unbiased")
    check_bool(exact, "exact")
    check_int(num_features, "num_features", minimum=1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {describe(generator)}")
    sigmas = _check_sigma(sigma, kernel)
    x, y = _check_pair(x, y, unbiased)
    _check_sigma_range(sigmas, sigma, x.dtype)
    return x, y, sigmas


def _check_sigma_range(sigmas: tuple, given, dtype: torch.dtype) -> None:
    """A numeric bandwidth whose square the compute dtype holds as a normal number (else ``k`` is 0/0)."""
    info = torch.finfo(dtype)
    lo, hi = math.sqrt(info.tiny), math.sqrt(info.max)
    for s, nm in zip(sigmas, _sigma_names(given)):
        if isinstance(s, float) and not lo <= s <= hi:
            raise ValueError(f"{nm}: expected a bandwidth in [{lo:.3g}, {hi:.3g}] for {dtype} inputs (its square "
                             f"must be a normal {dtype} number), got {s!r}")


# --------------------------------------------------------------------------------------------------
# public


def hsic(x: Tensor, y: Tensor, *, kernel: str = "linear", sigma=None, unbiased: bool = False, exact: bool = True,
         num_features: int = DEFAULT_NUM_FEATURES, generator: torch.Generator | None = None,
         backend: str = "auto") -> Tensor:
    """HSIC between ``x (n, dx)`` and ``y (n, dy)`` (rows are paired samples), a 0-d tensor.

    ``kernel``: ``"linear"``, ``"gaussian"`` or ``"imq"``; ``sigma`` (not for linear): a positive number,
    a pair ``(sigma_x, sigma_y)`` or ``"median"`` (the default; module docstring); ``unbiased``: Song et
    al.'s estimator (``n >= 4``) instead of Gretton et al.'s biased ``tr(KHLH)/(n-1)^2``; ``exact=False``:
    ``num_features`` random Fourier features (drawn from ``generator``) instead of the exact kernel.
    ``backend``: ``"auto"``, ``"triton"`` or ``"torch"`` (:mod:`kernelssl.dispatch`; the fused kernels
    serve the exact Gaussian/IMQ kernels).  A constant ``x`` or ``y`` gives exactly 0.  Differentiable
    (the exact kernels' backward streams the tiles too: no ``n x n``)."""
    x, y, sigmas = _prepare(x, y, kernel, sigma, unbiased, exact, num_features, generator, backend)
    st = _statistics([x, y], kernel, sigmas, exact, num_features, generator, backend)
    val = _estimate(st, 0, 1, x.shape[0], unbiased).to(x.dtype)
    return torch.where(_constant(x) | _constant(y), torch.zeros_like(val), val)


def cka(x: Tensor, y: Tensor, *, kernel: str = "linear", sigma=None, unbiased: bool = False, exact: bool = True,
        num_features: int = DEFAULT_NUM_FEATURES, generator: torch.Generator | None = None,
        backend: str = "auto") -> Tensor:
    """CKA ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with the estimator and kernel of :func:`hsic`
    (same arguments), a 0-d tensor; one pass over the data for the three HSICs.  NaN when ``x`` or
    ``y`` is constant (0/0) or when an unbiased self-HSIC comes out negative."""
    x, y, sigmas = _prepare(x, y, kernel, sigma, unbiased, exact, num_features, generator, backend)
    st = _statistics([x, y], kernel, sigmas, exact, num_features, generator, backend)
    n = x.shape[0]
    xy = _estimate(st, 0, 1, n, unbiased)
    xx = _estimate(st, 0, 0, n, unbiased)
    yy = _estimate(st, 1, 1, n, unbiased)
    constant = _constant(x) | _constant(y)
    # sqrt(xx) sqrt(yy): the product of two tiny self-HSICs (a Gram near the identity) would underflow; and a
    # negative (unbiased) self-HSIC gives NaN even when both are; 0/0 kept out of the gradient too
    one = torch.ones_like(xx)
    den = torch.sqrt(torch.where(constant, one, xx)) * torch.sqrt(torch.where(constant, one, yy))
    val = (xy / den).to(x.dtype)
    return torch.where(constant, torch.full_like(val, math.nan), val)
