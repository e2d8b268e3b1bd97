"""Test helpers (importable as ``helpers``: pytest puts tests/ on sys.path).  The tolerances' machinery,
the 2x rule and the TF32 emulation are the library's own :mod:`kernelssl.numerics`; only the finite
difference lives here."""
from __future__ import annotations

import numpy as np

from kernelssl.numerics import assert_close, assert_error_within_torch, max_abs_error, to_numpy  # noqa: F401


def central_difference(f, x: np.ndarray, *, h: float = 1e-6) -> np.ndarray:
    """Central finite-difference gradient of a scalar function of a float64 array (O(h^2) error)."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f(x)
        flat[i] = old - h
        fm = f(x)
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return g
