"""SFRIK reference (Zheng, Puy, Riccietti, Perez, Gribonval -- ICLR 2023; docs/legendre_gram.md).

NumPy, float64, written to be obviously correct rather than fast.  No torch here.

Conventions
-----------
* ``z`` is an ``(n, q)`` array, rows are samples, q >= 2 is the dimension of the ambient space of the
  sphere S^(q-1).  ``normalize(z)`` divides each non-zero row by its norm, however small
  (the library prescales rows by an exact power of two before ``torch.nn.functional.normalize``, so
  it agrees); a zero row stays zero.
* ``P_l(q; t)`` is the Legendre (ultraspherical) polynomial of degree l in dimension q, normalised so
  that ``P_l(q; 1) = 1``, evaluated by the three-term recurrence (valid for every q >= 2)::

      P_0 = 1,  P_1 = t,
      P_{l+1} = [(2l + q - 2) t P_l - l P_{l-1}] / (l + q - 2)                      (l >= 1)
      P'_0 = 0, P'_1 = 1,
      P'_{l+1} = [(2l + q - 2) (P_l + t P'_l) - l P'_{l-1}] / (l + q - 2)          (l >= 1)

* ``coefficients = (b_1, ..., b_L)``, L >= 1 (b_0 cancels in the MMD and is not passed);
  ``phi(t) = sum_{l=1..L} b_l P_l(q; t)``.
* ``M(Z) = (1/n^2) sum_{i,j} phi(zhat_i . zhat_j)``, the V-statistic (diagonal included).
* SFRIK loss = ``sim_weight * R + mmd_weight * (M(Zhat_a) + M(Zhat_b)) / 2`` with
  ``R = mean over the n*q entries of (zhat_a - zhat_b)^2``.

Gradients are analytic (the tests check them against central differences).  The Jacobian of the
normalisation is ``(I - zhat zhat^T) / ||z||`` for a non-zero row and ``I / eps`` for a zero row (what
autograd gives for ``F.normalize`` after the library's prescale).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._common import EPS, check_rows, row_norms  # noqa: F401  (row_norms: part of this module's API)
from ._common import normalize as _normalize
from ._common import normalize_backward as _normalize_vjp

__all__ = [
    "EPS",
    "normalize",
    "legendre",
    "legendre_derivative",
    "phi",
    "phi_prime",
    "gram_mean",
    "gram_mean_grad",
    "sfrik_loss",
    "sfrik_loss_grad",
]



def _check_q(q: int) -> int:
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or q < 2:
        raise ValueError(f"q: expected an int >= 2, got {q!r}")
    return int(q)


def _check_coefficients(coefficients: Sequence[float]) -> np.ndarray:
    b = np.asarray(coefficients, dtype=np.float64).reshape(-1)
    if b.size < 1:
        raise ValueError("coefficients: expected at least one coefficient (b_1, ..., b_L), got none")
    return b


def _check_z(z: np.ndarray, name: str) -> np.ndarray:
    return check_rows(z, name, min_rows=1, min_cols=2)


def normalize(z: np.ndarray) -> np.ndarray:
    """Row-wise ``z_i / ||z_i||_2`` of an ``(n, q)`` array, q >= 2 (:func:`reference._common.normalize`)."""
    return _normalize(_check_z(z, "z"))


_normalize_rows = normalize  # reachable where a ``normalize=`` flag shadows the name


def legendre(q: int, t: np.ndarray, degree: int) -> np.ndarray:
    """``P_0(q; t), ..., P_degree(q; t)`` by the recurrence; returns ``(degree + 1, *t.shape)``."""
    q = _check_q(q)
    if degree < 0:
        raise ValueError(f"degree: expected an int >= 0, got {degree!r}")
    t = np.asarray(t, dtype=np.float64)
    p = np.empty((degree + 1,) + t.shape)
    p[0] = 1.0
    if degree >= 1:
        p[1] = t
    for l in range(1, degree):
        p[l + 1] = ((2 * l + q - 2) * t * p[l] - l * p[l - 1]) / (l + q - 2)
    return p


def legendre_derivative(q: int, t: np.ndarray, degree: int) -> np.ndarray:
    """``P'_0(q; t), ..., P'_degree(q; t)`` by the derivative recurrence; ``(degree + 1, *t.shape)``."""
    t = np.asarray(t, dtype=np.float64)
    p = legendre(q, t, degree)
    d = np.empty_like(p)
    d[0] = 0.0
    if degree >= 1:
        d[1] = 1.0
    for l in range(1, degree):
        d[l + 1] = ((2 * l + q - 2) * (p[l] + t * d[l]) - l * d[l - 1]) / (l + q - 2)
    return d


def _combine(basis, t: np.ndarray, q: int, coefficients: Sequence[float]) -> np.ndarray:
    """``sum_{l=1..L} b_l basis_l(q; t)`` for ``basis`` :func:`legendre` or :func:`legendre_derivative`."""
    b = _check_coefficients(coefficients)
    p = basis(q, t, b.size)
    out = np.zeros(np.shape(t))
    for l in range(1, b.size + 1):
        out = out + b[l - 1] * p[l]
    return out


def phi(t: np.ndarray, q: int, coefficients: Sequence[float]) -> np.ndarray:
    """``phi(t) = sum_{l=1..L} b_l P_l(q; t)``, elementwise (shape of t)."""
    return _combine(legendre, t, q, coefficients)


def phi_prime(t: np.ndarray, q: int, coefficients: Sequence[float]) -> np.ndarray:
    """``phi'(t) = sum_{l=1..L} b_l P'_l(q; t)``, elementwise (shape of t)."""
    return _combine(legendre_derivative, t, q, coefficients)


def gram_mean(z_hat: np.ndarray, coefficients: Sequence[float]) -> float:
    """``M = (1/n^2) sum_{i,j} phi(z_hat_i . z_hat_j)`` on the rows as given (already unit rows in the
    loss; not re-normalised here), diagonal included.  ``q = z_hat.shape[1]``.  Returns a float."""
    z_hat = _check_z(z_hat, "z_hat")
    n, q = z_hat.shape
    total = 0.0
    for i in range(n):  # row i of the Gram matrix at a time
        g_i = z_hat @ z_hat[i]
        total += float(np.sum(phi(g_i, q, coefficients)))
    return total / n**2


def gram_mean_grad(z: np.ndarray, coefficients: Sequence[float], *, normalize: bool = True) -> np.ndarray:
    """Analytic gradient of ``M(normalize(z))`` with respect to the raw ``z`` (``(n, q)``).

    ``g_k = (2/n^2) sum_j phi'(zhat_k . zhat_j) zhat_j`` (j = k included; the 2 is the symmetry of the
    Gram matrix), then through the normalisation ``(I - zhat_k zhat_k^T) g_k / ||z_k||``.  With
    ``normalize=False`` this is the gradient of ``gram_mean(z)`` itself (no normalisation step).
    """
    z = _check_z(z, "z")
    zh = _normalize_rows(z) if normalize else z
    n, q = zh.shape
    g = np.zeros_like(zh)
    for k in range(n):
        g_k = zh @ zh[k]
        g[k] = (2.0 / n**2) * (phi_prime(g_k, q, coefficients) @ zh)
    return _normalize_vjp(z, g) if normalize else g


def sfrik_loss(
    z_a: np.ndarray,
    z_b: np.ndarray,
    *,
    coefficients: Sequence[float] = (1.0, 40.0, 40.0),
    sim_weight: float = 4000.0,
    mmd_weight: float = 1.0,
) -> tuple[float, float, float, float]:
    """SFRIK loss on raw ``(n, q)`` views: returns ``(loss, mse, mmd_a, mmd_b)``::

        loss = sim_weight * mse + mmd_weight * (mmd_a + mmd_b) / 2
        mse  = (1/(n q)) sum_i ||zhat_a_i - zhat_b_i||^2,   mmd_v = M(zhat_v)
    """
    z_a, z_b = _check_z(z_a, "z_a"), _check_z(z_b, "z_b")
    if z_a.shape != z_b.shape:
        raise ValueError(f"z_b: expected the shape of z_a {z_a.shape}, got {z_b.shape}")
    za, zb = normalize(z_a), normalize(z_b)
    mse = float(np.mean((za - zb) ** 2))
    mmd_a = gram_mean(za, coefficients)
    mmd_b = gram_mean(zb, coefficients)
    loss = sim_weight * mse + mmd_weight * 0.5 * (mmd_a + mmd_b)
    return loss, mse, mmd_a, mmd_b


def sfrik_loss_grad(
    z_a: np.ndarray,
    z_b: np.ndarray,
    *,
    coefficients: Sequence[float] = (1.0, 40.0, 40.0),
    sim_weight: float = 4000.0,
    mmd_weight: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Analytic ``(dloss/dz_a, dloss/dz_b)`` of :func:`sfrik_loss` for the raw inputs.

    On the unit rows: ``dloss/dzhat_a = sim_weight * 2 (zhat_a - zhat_b) / (n q)
    + mmd_weight / 2 * dM/dzhat_a`` (and symmetrically for b), then the normalisation Jacobian.
    """
    z_a, z_b = _check_z(z_a, "z_a"), _check_z(z_b, "z_b")
    if z_a.shape != z_b.shape:
        raise ValueError(f"z_b: expected the shape of z_a {z_a.shape}, got {z_b.shape}")
    n, q = z_a.shape
    za, zb = normalize(z_a), normalize(z_b)
    d_mse = sim_weight * 2.0 * (za - zb) / (n * q)
    g_a = d_mse + mmd_weight * 0.5 * gram_mean_grad(za, coefficients, normalize=False)
    g_b = -d_mse + mmd_weight * 0.5 * gram_mean_grad(zb, coefficients, normalize=False)
    return _normalize_vjp(z_a, g_a), _normalize_vjp(z_b, g_b)
