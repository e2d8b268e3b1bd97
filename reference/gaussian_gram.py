"""Uniformity and alignment reference (Wang & Isola, ICML 2020), and the dot-product-kernel Gram mean
over a small family of phi (docs/gaussian_gram.md).

NumPy, float64, written to be obviously correct rather than fast.  No torch here.

Conventions (as in :mod:`reference.legendre_gram`)
------------------------------------------
* ``z`` is an ``(n, q)`` array, rows are samples.  ``normalize(z)`` divides each non-zero row by its
  norm, however small (the library's power-of-two prescale makes ``F.normalize`` agree); a zero row
  stays zero.
* A ``phi`` is a pair of elementwise functions ``(phi, phi')`` on ``s = zhat_i . zhat_j``:
  :func:`legendre_phi` (SFRIK's ``sum_l b_l P_l(q; s)``) and :func:`gaussian_phi` (the Gaussian
  potential ``exp(2t (s - 1)) = exp(-t ||zhat_i - zhat_j||^2)`` on unit rows).
* ``gram_mean(zhat, phi) = (1/n^2) sum_{i,j} phi(zhat_i . zhat_j)``, diagonal included.
* ``gaussian_gram_logmean(z, t) = log( sum_{pairs} exp(2t (s_ij - 1)) / #pairs )``, pairs i != j
  (``exclude_diagonal=True``, Wang & Isola's uniformity) or all n^2.  Evaluated with the maximum of
  the exponent factored out (``m + log sum exp(e - m)``), so large t does not underflow.
* Wang & Isola's own definitions, from pairwise distances (:func:`uniformity_wang_isola`,
  :func:`alignment_wang_isola`)::

      L_unif(X; t) = log( (2/(n(n-1))) sum_{i<j} exp(-t ||x_i - x_j||^2) )
      L_align(X, Y; alpha) = (1/n) sum_i ||x_i - y_i||^alpha

  and their training loss ``L_align + lam (L_unif(X) + L_unif(Y)) / 2`` on normalised rows.

Gradients are analytic (the tests check them against central differences); the normalisation's
Jacobian is :func:`reference._common.normalize_backward`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from . import legendre_gram as _lg
from ._common import EPS, check_rows
from ._common import normalize as _normalize
from ._common import normalize_backward as _normalize_vjp

__all__ = [
    "EPS",
    "normalize",
    "legendre_phi",
    "gaussian_phi",
    "gram_mean",
    "gram_mean_grad",
    "gaussian_gram_logmean",
    "gaussian_gram_logmean_grad",
    "uniformity_wang_isola",
    "uniformity_wang_isola_grad",
    "alignment_wang_isola",
    "alignment_wang_isola_grad",
    "align_uniform_loss",
    "align_uniform_loss_grad",
]

Phi = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _check_z(z: np.ndarray, name: str) -> np.ndarray:
    return check_rows(z, name, min_rows=2, min_cols=1)


def normalize(z: np.ndarray) -> np.ndarray:
    """Row-wise ``z_i / ||z_i||_2`` of an ``(n, q)`` array, any q >= 1 (:func:`reference._common.normalize`)."""
    return _normalize(_check_z(z, "z"))


def _check_t(t: float) -> float:
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
        raise ValueError(f"t: expected a finite number > 0, got {t!r}")
    return float(t)


def _unit_rows(z: np.ndarray, do_normalize: bool) -> np.ndarray:
    return normalize(z) if do_normalize else z


# --------------------------------------------------------------------------------------------------
# The phi family and the Gram mean
# --------------------------------------------------------------------------------------------------


def legendre_phi(q: int, coefficients: Sequence[float]) -> Phi:
    """``(phi, phi')`` of SFRIK's kernel ``phi(s) = sum_{l=1..L} b_l P_l(q; s)`` (reference.legendre_gram)."""
    return (lambda s: _lg.phi(s, q, coefficients), lambda s: _lg.phi_prime(s, q, coefficients))


def gaussian_phi(t: float) -> Phi:
    """``(phi_t, phi_t')`` of the Gaussian potential ``phi_t(s) = exp(2t (s - 1))``,
    ``phi_t'(s) = 2t exp(2t (s - 1))``."""
    t = _check_t(t)
    return (lambda s: np.exp(2.0 * t * (np.asarray(s) - 1.0)),
            lambda s: 2.0 * t * np.exp(2.0 * t * (np.asarray(s) - 1.0)))


def gram_mean(z_hat: np.ndarray, phi: Phi) -> float:
    """``(1/n^2) sum_{i,j} phi(z_hat_i . z_hat_j)`` on the rows as given, diagonal included."""
    z_hat = _check_z(z_hat, "z_hat")
    n = z_hat.shape[0]
    total = 0.0
    for i in range(n):
        total += float(np.sum(phi[0](z_hat @ z_hat[i])))
    return total / n**2


def gram_mean_grad(z: np.ndarray, phi: Phi, *, normalize: bool = True) -> np.ndarray:
    """Gradient of ``gram_mean(normalize(z), phi)`` w.r.t. the raw ``z``:
    ``g_k = (2/n^2) sum_j phi'(zhat_k . zhat_j) zhat_j``, then the normalisation's Jacobian."""
    z = _check_z(z, "z")
    zh = _unit_rows(z, normalize)
    n = zh.shape[0]
    g = np.zeros_like(zh)
    for k in range(n):
        g[k] = (2.0 / n**2) * (phi[1](zh @ zh[k]) @ zh)
    return _normalize_vjp(z, g) if normalize else g


# --------------------------------------------------------------------------------------------------
# log of the Gaussian Gram mean (stable for any t)
# --------------------------------------------------------------------------------------------------


def _exponents(zh: np.ndarray, t: float, exclude_diagonal: bool) -> np.ndarray:
    """``E_ij = 2t (zh_i . zh_j - 1)``, ``-inf`` on the diagonal when it is excluded (``(n, n)``)."""
    n = zh.shape[0]
    e = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            e[i, j] = -math.inf if (exclude_diagonal and i == j) else 2.0 * t * (float(zh[i] @ zh[j]) - 1.0)
    return e


def gaussian_gram_logmean(z: np.ndarray, t: float = 2.0, *, normalize: bool = True,
                          exclude_diagonal: bool = True) -> float:
    """``log( sum_{pairs} exp(2t (zhat_i . zhat_j - 1)) / #pairs )`` with ``#pairs = n(n-1)`` (diagonal
    excluded) or ``n^2``; computed as ``m + log sum exp(E - m)``, ``m = max E`` (no underflow)."""
    z = _check_z(z, "z")
    t = _check_t(t)
    n = z.shape[0]
    e = _exponents(_unit_rows(z, normalize), t, exclude_diagonal)
    m = float(np.max(e))
    pairs = n * (n - 1) if exclude_diagonal else n * n
    return m + math.log(float(np.sum(np.exp(e - m)))) - math.log(pairs)


def gaussian_gram_logmean_grad(z: np.ndarray, t: float = 2.0, *, normalize: bool = True,
                               exclude_diagonal: bool = True) -> np.ndarray:
    """Gradient of :func:`gaussian_gram_logmean` w.r.t. the raw ``z``.

    With ``S = sum_{pairs} exp(E_ij)``: ``dL/dzhat_k = (1/S) sum_{pairs} d exp(E_ij)/dzhat_k
    = (2/S) sum_{j: (k,j) a pair} phi_t'(zhat_k . zhat_j) zhat_j = (4t/S) sum_j exp(E_kj) zhat_j`` (the
    2: G is symmetric; a diagonal pair, when included, gives ``d exp(2t(|zhat_k|^2 - 1)) = 4t exp(E_kk)
    zhat_k``, the j = k term).  The maximum m is factored out of numerator and denominator.  Then the
    normalisation's Jacobian."""
    z = _check_z(z, "z")
    t = _check_t(t)
    zh = _unit_rows(z, normalize)
    e = _exponents(zh, t, exclude_diagonal)
    p = np.exp(e - np.max(e))
    g = (4.0 * t / float(np.sum(p))) * (p @ zh)
    return _normalize_vjp(z, g) if normalize else g


# --------------------------------------------------------------------------------------------------
# Wang & Isola's definitions, from pairwise distances
# --------------------------------------------------------------------------------------------------


def uniformity_wang_isola(x: np.ndarray, t: float = 2.0) -> float:
    """``log( mean_{i<j} exp(-t ||x_i - x_j||^2) )`` on the rows as given (their ``pdist`` form)."""
    x = _check_z(x, "x")
    t = _check_t(t)
    n = x.shape[0]
    vals = [math.exp(-t * float(np.sum((x[i] - x[j]) ** 2))) for i in range(n) for j in range(i + 1, n)]
    return math.log(sum(vals) / len(vals))


def uniformity_wang_isola_grad(x: np.ndarray, t: float = 2.0) -> np.ndarray:
    """Gradient of :func:`uniformity_wang_isola` w.r.t. ``x``:
    ``(1/S) sum_{j != k} exp(-t d_kj^2) (-2t) (x_k - x_j)``, ``S = sum_{j != k pairs counted once}``."""
    x = _check_z(x, "x")
    t = _check_t(t)
    n = x.shape[0]
    s = 0.0
    g = np.zeros_like(x)
    for i in range(n):
        for j in range(i + 1, n):
            d = x[i] - x[j]
            w = math.exp(-t * float(d @ d))
            s += w
            g[i] += w * (-2.0 * t) * d
            g[j] -= w * (-2.0 * t) * d
    return g / s


def alignment_wang_isola(x: np.ndarray, y: np.ndarray, alpha: float = 2.0) -> float:
    """``(1/n) sum_i ||x_i - y_i||^alpha`` on the rows as given."""
    x, y = _check_z(x, "x"), _check_z(y, "y")
    return float(np.mean([float(np.sqrt(np.sum((x[i] - y[i]) ** 2))) ** alpha for i in range(x.shape[0])]))


def alignment_wang_isola_grad(x: np.ndarray, y: np.ndarray, alpha: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of :func:`alignment_wang_isola` w.r.t. ``x`` and ``y``:
    ``d/dx_i = (alpha/n) ||d_i||^(alpha-2) d_i`` with ``d_i = x_i - y_i`` (0 where ``d_i = 0``, for
    alpha >= 1), and the opposite for ``y``."""
    x, y = _check_z(x, "x"), _check_z(y, "y")
    n = x.shape[0]
    gx = np.zeros_like(x)
    for i in range(n):
        d = x[i] - y[i]
        r = float(np.sqrt(d @ d))
        if r > 0:
            gx[i] = (alpha / n) * r ** (alpha - 2.0) * d
    return gx, -gx


def align_uniform_loss(z_a: np.ndarray, z_b: np.ndarray, *, alpha: float = 2.0, t: float = 2.0,
                       uniformity_weight: float = 1.0) -> float:
    """Wang & Isola's training loss on raw views (normalised here):
    ``L_align(Za^, Zb^) + w (L_unif(Za^) + L_unif(Zb^)) / 2``."""
    xa, xb = normalize(z_a), normalize(z_b)
    return alignment_wang_isola(xa, xb, alpha) + uniformity_weight * 0.5 * (
        uniformity_wang_isola(xa, t) + uniformity_wang_isola(xb, t))


def align_uniform_loss_grad(z_a: np.ndarray, z_b: np.ndarray, *, alpha: float = 2.0, t: float = 2.0,
                            uniformity_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of :func:`align_uniform_loss` w.r.t. the raw ``z_a`` and ``z_b``."""
    z_a, z_b = _check_z(z_a, "z_a"), _check_z(z_b, "z_b")
    xa, xb = normalize(z_a), normalize(z_b)
    ga, gb = alignment_wang_isola_grad(xa, xb, alpha)
    ga = ga + uniformity_weight * 0.5 * uniformity_wang_isola_grad(xa, t)
    gb = gb + uniformity_weight * 0.5 * uniformity_wang_isola_grad(xb, t)
    return _normalize_vjp(z_a, ga), _normalize_vjp(z_b, gb)
