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


def max_abs_error(actual, expected) -> float:
    """``max |actual - expected|`` in float64 (NaN if either holds a NaN where the other does not)."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    return float(np.abs(a - e).max()) if a.size else 0.0


def assert_error_within_torch(actual, torch_actual, expected, *, floor: float, name: str, factor: float = 2.0,
                              rtol: float | None = None, atol: float | None = None) -> None:
    """SPEC §4's rule: the error of a kernel against float64 is at most ``factor`` (2) times the error
    of the torch path in the same dtype, on the same input, plus a stated ``floor``::

        max|actual - expected| <= factor * max|torch_actual - expected| + floor

    ``floor`` is the level below which a ratio of two roundoff errors is noise (each caller states
    it: a few fp32 ulps of the quantity's scale, or the half ulp of rounding to the output dtype).

    With ``rtol``/``atol`` (the fp32 tier's stated tolerance, elementwise ``atol + rtol |expected|``)
    the result passes when every element is within that tolerance, and otherwise falls back to the
    rule above: at cancellation points (a gradient through the normalisation Jacobian whose exact
    value is ~0, a difference of nearly equal terms) no fp32 computation reaches a tolerance scaled
    by the result, the torch path misses it too, and the rule asks that the kernel be no worse than
    twice the torch path there.  The rule is the same for the loss and for every gradient.
    """
    a, t, e = to_numpy(actual), to_numpy(torch_actual), to_numpy(expected)
    assert a.shape == e.shape == t.shape, f"{name}: shapes {a.shape}, torch {t.shape}, expected {e.shape}"
    if a.size == 0:
        return
    err = np.abs(a - e)
    if rtol is not None or atol is not None:
        if bool((err <= (atol or 0.0) + (rtol or 0.0) * np.abs(e)).all()):
            return
    err_k = float(err.max())  # NaN if any element is NaN: fails below
    err_t = float(np.abs(t - e).max())
    bound = factor * err_t + floor
    if not err_k <= bound:
        idx = tuple(int(i) for i in np.unravel_index(np.nanargmax(err), a.shape)) if a.ndim and not np.isnan(err).all() else ()
        stated = f", and beyond the stated rtol={rtol}, atol={atol}" if rtol is not None or atol is not None else ""
        raise AssertionError(
            f"{name}: kernel error {err_k:.3e} > {factor:g} x torch error {err_t:.3e} + floor {floor:.3e} "
            f"(ratio {err_k / err_t if err_t else float('inf'):.2f}){stated}; worst at {idx}: kernel {float(a[idx])!r}, "
            f"torch {float(t[idx])!r}, float64 {float(e[idx])!r}"
        )
