"""HSIC and CKA between two representations, float64 NumPy reference: the direct ``n x n`` formulas
(docs/metrics.md).  NumPy only, no torch.

For ``x (n, dx)``, ``y (n, dy)``, Gram matrices K (of x) and L (of y), ``H = I - 11^T/n``::

    HSIC_b = tr(K H L H) / (n - 1)^2                                                (Gretton et al. 2005)
    HSIC_u = [tr(Kt Lt) + (1^T Kt 1)(1^T Lt 1)/((n-1)(n-2)) - (2/(n-2)) 1^T Kt Lt 1] / (n (n-3))
                                                     Kt, Lt: K, L with zeroed diagonals (Song et al. 2012)
    CKA    = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))                               (Kornblith et al. 2019)

Kernels: ``"linear"`` ``a . b``; ``"gaussian"`` ``exp(-||a-b||^2 / (2 s^2))``; ``"imq"``
``s / sqrt(||a-b||^2 + s^2)``.  ``sigma="median"``: ``s^2`` = the median (``np.median``: the mean of the
two middle values when the count is even) of all ``n^2`` squared distances, diagonal included; for
``n > MEDIAN_ROWS`` the same over the rows ``i_k = (k (n - 1)) // (MEDIAN_ROWS - 1)``, ``k < MEDIAN_ROWS``.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "MEDIAN_ROWS", "sq_distances", "median_sigma", "gram", "hsic_biased", "hsic_unbiased", "hsic", "cka",
    "minibatch_cka", "shifted_gram", "gram_hsic_stats",
]


def sq_distances(x) -> np.ndarray:
    """``||x_i - x_j||^2``, ``(n, n)``, by direct differences (no Gram cancellation)."""
    x = np.asarray(x, dtype=np.float64)
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


MEDIAN_ROWS = 2048


def median_sigma(x) -> float:
    """``sqrt(median of all n^2 squared distances)``, diagonal included (evenly spaced rows past
    ``MEDIAN_ROWS``)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n > MEDIAN_ROWS:
        x = x[(np.arange(MEDIAN_ROWS) * (n - 1)) // (MEDIAN_ROWS - 1)]
    return float(np.sqrt(np.median(sq_distances(x))))


def gram(x, kernel: str = "linear", sigma=None) -> np.ndarray:
    """The ``(n, n)`` Gram of ``x`` (``sigma`` None or ``"median"``: :func:`median_sigma`)."""
    x = np.asarray(x, dtype=np.float64)
    if kernel == "linear":
        return x @ x.T
    s = median_sigma(x) if sigma is None or sigma == "median" else float(sigma)
    d2 = sq_distances(x)
    if kernel == "gaussian":
        return np.exp(-d2 / (2.0 * s * s))
    if kernel == "imq":
        return s / np.sqrt(d2 + s * s)
    raise ValueError(f"kernel: unknown {kernel!r}")


def hsic_biased(K, L) -> float:
    """``tr(K H L H) / (n - 1)^2``."""
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(K @ H @ L @ H)) / (n - 1) ** 2


def hsic_unbiased(K, L) -> float:
    """Song et al.'s unbiased estimator (``n >= 4``)."""
    n = K.shape[0]
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    one = np.ones(n)
    val = (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
           - (2.0 / (n - 2)) * (one @ Kt @ Lt @ one))
    return float(val) / (n * (n - 3))


def _sigmas(sigma):
    return tuple(sigma) if isinstance(sigma, (tuple, list)) else (sigma, sigma)


def hsic(x, y, kernel: str = "linear", sigma=None, unbiased: bool = False) -> float:
    sx, sy = _sigmas(sigma)
    K, L = gram(x, kernel, sx), gram(y, kernel, sy)
    return (hsic_unbiased if unbiased else hsic_biased)(K, L)


def cka(x, y, kernel: str = "linear", sigma=None, unbiased: bool = False) -> float:
    sx, sy = _sigmas(sigma)
    K, L = gram(x, kernel, sx), gram(y, kernel, sy)
    f = hsic_unbiased if unbiased else hsic_biased
    return f(K, L) / np.sqrt(f(K, K) * f(L, L))


def minibatch_cka(xs, ys, kernel: str = "linear", sigma=None) -> np.ndarray:
    """Nguyen et al.'s minibatch CKA: ``xs[b][i]`` is layer i of model A on minibatch b (likewise
    ``ys``); the unbiased HSIC per minibatch, summed over minibatches, then the CKA ratio of the sums.
    Returns the ``(len(xs[0]), len(ys[0]))`` matrix."""
    sx, sy = _sigmas(sigma)
    na, nb = len(xs[0]), len(ys[0])
    xy, xx, yy = np.zeros((na, nb)), np.zeros(na), np.zeros(nb)
    for lx, ly in zip(xs, ys):
        Ks = [gram(a, kernel, sx) for a in lx]
        Ls = [gram(b, kernel, sy) for b in ly]
        for i, K in enumerate(Ks):
            xx[i] += hsic_unbiased(K, K)
            for j, L in enumerate(Ls):
                xy[i, j] += hsic_unbiased(K, L)
        for j, L in enumerate(Ls):
            yy[j] += hsic_unbiased(L, L)
    return xy / np.sqrt(xx[:, None] * yy[None, :])


def shifted_gram(x, kernel: str, sigma: float, shift: float) -> np.ndarray:
    """The exact Gaussian or IMQ Gram ``K`` of ``x`` for ``shift`` 0, or ``shift * (K - 1)`` for ``shift > 0``
    (``K - 1`` formed directly: ``expm1``; imq ``-d2 / (r (s + r))``, ``r = sqrt(d2 + s^2)``), with its
    diagonal set to 0.  Both HSIC estimators are unchanged by adding a constant to the kernel and scale
    with it: with the diagonal put back (1, or 0 for a shifted Gram) and divided by the shifts, they give
    those of ``K``."""
    d2 = sq_distances(x)
    s = float(sigma)
    if kernel == "gaussian":
        e = shift * np.expm1(-d2 / (2.0 * s * s)) if shift else np.exp(-d2 / (2.0 * s * s))
    elif kernel == "imq":
        r = np.sqrt(d2 + s * s)
        e = shift * (-d2 / (r * (s + r))) if shift else s / r
    else:
        raise ValueError(f"kernel: unknown {kernel!r}")
    np.fill_diagonal(e, 0.0)
    return e


def gram_hsic_stats(xs, kernel: str, sigmas, shifts) -> tuple[np.ndarray, np.ndarray]:
    """The ``gram_hsic`` op's statistics from the dense shifted Grams ``E_a`` of :func:`shifted_gram`
    (bandwidths ``sigmas``, shifts ``shifts``: numbers): ``tr[a, b] = sum_ij E_a,ij E_b,ij`` ``(m, m)`` and
    ``rows[a] = E_a 1`` ``(m, n)``."""
    Es = [shifted_gram(x, kernel, s, c) for x, s, c in zip(xs, sigmas, shifts)]
    tr = np.array([[float((Ea * Eb).sum()) for Eb in Es] for Ea in Es])
    return tr, np.stack([E.sum(1) for E in Es])
