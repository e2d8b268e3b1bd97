"""Row normalisation and its Jacobian, shared by the float64 references.  NumPy only, no torch.

``normalize`` divides each non-zero row by its norm, however small (the library scales rows by an
exact power of two before ``torch.nn.functional.normalize``, so it agrees); a zero row stays zero,
as ``F.normalize``'s ``z / max(||z||, 1e-12)`` leaves it.
"""
from __future__ import annotations

import numpy as np

__all__ = ["EPS", "check_rows", "row_norms", "normalize", "normalize_backward"]

EPS = 1e-12  #: the clamp of the row norm in ``F.normalize`` (reached by zero rows only)


def check_rows(z, name: str, *, min_rows: int, min_cols: int) -> np.ndarray:
    """``z`` as a float64 ``(n, q)`` array with ``n >= min_rows`` and ``q >= min_cols``, else a ``ValueError``."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < min_rows or z.shape[1] < min_cols:
        need = f"q >= {min_cols}" if min_cols > 1 else f"n >= {min_rows}"
        raise ValueError(f"{name}: expected an (n, q) array with {need}, got shape {z.shape}")
    return z


def row_norms(z: np.ndarray) -> np.ndarray:
    """``||z_i||_2`` over the last axis, keepdims, computed as ``m sqrt(sum (z/m)^2)``, ``m = max|z_i|``:
    exact for every row a float64 holds (no underflow of the squares of a tiny row); 0 for zero rows."""
    z = np.asarray(z, dtype=np.float64)
    m = np.max(np.abs(z), axis=-1, keepdims=True)
    safe = np.where(m > 0, m, 1.0)
    return m * np.sqrt(np.sum((z / safe) ** 2, axis=-1, keepdims=True))


def normalize(z: np.ndarray) -> np.ndarray:
    """Row-wise ``z_i / ||z_i||_2`` over the last axis (any leading dims); a zero row stays zero."""
    z = np.asarray(z, dtype=np.float64)
    norms = row_norms(z)
    return np.where(norms > 0, z / np.where(norms > 0, norms, 1.0), 0.0)


def normalize_backward(z: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Vector-Jacobian product of :func:`normalize` at ``z`` with the cotangent ``g = dL/dz^``.

    Per row: ``(g - x (x . g)) / ||z||`` with ``x = z / ||z||`` for a non-zero row, else ``g / eps``
    (a zero row: ``F.normalize``'s ``z / eps``, linear)."""
    z = np.asarray(z, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    out = np.empty_like(z)
    flat_z, flat_g, flat_o = (t.reshape(-1, z.shape[-1]) for t in (z, g, out))
    norms = row_norms(flat_z)[:, 0]
    for i in range(flat_z.shape[0]):
        nrm = norms[i]
        if nrm > 0:
            x = flat_z[i] / nrm
            flat_o[i] = (flat_g[i] - x * np.dot(x, flat_g[i])) / nrm  # (I - x x^T) g / ||z||
        else:
            flat_o[i] = flat_g[i] / EPS
    return out
