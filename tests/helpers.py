"""Assertion helpers shared by the tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import numpy as np
import torch


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close(actual, expected, *, rtol: float, atol: float, name: str = "value") -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, with a report that says how
    many elements mismatch, the worst one, and where."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return
    err = np.abs(a - e)
    tol = atol + rtol * np.abs(e)
    bad = ~(err <= tol)  # NaN counts as a mismatch
    if bad.any():
        idx = np.unravel_index(np.nanargmax(np.where(bad, err - tol, -np.inf)), a.shape) if a.ndim else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.size} elements mismatch (rtol={rtol}, atol={atol}); "
            f"worst at {idx}: actual {a[idx]!r}, expected {e[idx]!r}, |diff| {err[idx]!r}; "
            f"max |diff| {np.nanmax(err)!r}"
        )


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
