"""MEC reference (Liu, Wang, Li, Wang -- "Self-Supervised Learning via Maximum Entropy Coding",
NeurIPS 2022; docs/taylor_logdet.md).

NumPy, float64, written to be obviously correct rather than fast.  No torch here.

Conventions
-----------
* ``a`` and ``b`` are ``(m, d)`` arrays (rows are samples), or ``(..., m, d)`` with identical leading
  batch dims (the batched wrappers loop over them).  ``a`` is the FIRST argument: the teacher /
  target branch; ``b`` is the student (online) branch.
* ``normalize(z)`` divides each non-zero row by its norm, however small (the library prescales rows by
  an exact power of two before ``F.normalize``, so it agrees); a zero row stays zero.
  ``A^ = normalize(a)``, ``B^ = normalize(b)``.
* ``C = lam * A^ B^T`` is ``(m, m)`` and NOT symmetric.
* The truncated matrix-log series of order n >= 1::

      T_n(a, b) = sum_{k=1..n} (-1)^(k+1) tr(C^k) / k          (-> log det(I + C) iff rho(C) < 1)

  Since ``tr((A^ B^T)^k) = tr((B^T A^)^k)`` it can also be evaluated with the ``(d, d)`` matrix
  ``lam * B^T A^`` (:func:`taylor_logdet_dspace`).
* Gradient: with ``S_n = sum_{j=0..n-1} (-C)^j``, ``dT_n/dC = S_n^T``, hence
  ``dT_n/dA^ = lam S_n^T B^`` and ``dT_n/dB^ = lam S_n A^``, followed by the Jacobian of the row
  normalisation, ``g -> (I - x x^T) g / ||z||`` for ``||z|| > eps`` (x = z/||z||) and ``g / eps``
  below (what autograd gives for ``F.normalize``).
* MEC loss (two views, symmetrised; P1, P2 = target outputs of views a, b; Z1, Z2 = online
  outputs; m = batch size, d = feature dim; default ``lam = d / (m * eps_sq)``, ``eps_sq = 64``)::

      t_ab = T_n(P1, Z2),  t_ba = T_n(P2, Z1),  mu = (m + d) / 2
      scale="reference" (default):  loss = -(1/lam) (t_ab + t_ba) / (2m)
      scale="paper":                loss = -mu (t_ab + t_ba) / 2
      coding_length (both scales) = mu (t_ab + t_ba) / (2m)

  When a target is None the online output of the same view is used in its place (NOT detached:
  the gradient flows through both arguments).  The k = 1 term of the reference-scale loss is exactly
  minus the mean cosine similarity of the paired rows.
"""
from __future__ import annotations

import numpy as np

from ._common import EPS, normalize, normalize_backward

__all__ = [
    "EPS",
    "normalize",
    "normalize_backward",
    "taylor_logdet",
    "taylor_logdet_dspace",
    "exact_logdet",
    "taylor_logdet_grad",
    "default_lam",
    "mec_loss",
    "mec_loss_grad",
    "lambda_warmup",
]



# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _check_pair(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim < 2 or a.shape != b.shape:
        raise ValueError(f"a, b: expected identical shapes (..., m, d), got {a.shape} and {b.shape}")
    return a, b


def _prep(a2, b2, do_norm):
    """The rows actually multiplied: normalised (default) or as given."""
    return (normalize(a2), normalize(b2)) if do_norm else (a2, b2)


def _check_order(order):
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"order: expected an int >= 1, got {order!r}")
    return int(order)


def _batched(fn_2d, a, b, lam, n_out):
    """Apply ``fn_2d(a2, b2, lam_scalar)`` over the leading dims of ``a``/``b`` (lam broadcast)."""
    batch = a.shape[:-2]
    lam_arr = np.broadcast_to(np.asarray(lam, dtype=np.float64), batch)
    if n_out == 0:  # scalar per batch element
        res = np.empty(batch, dtype=np.float64)
        for idx in np.ndindex(*batch):
            res[idx] = fn_2d(a[idx], b[idx], float(lam_arr[idx]))
        return res if batch else float(res)
    outs = [np.empty_like(a) for _ in range(n_out)]
    for idx in np.ndindex(*batch):
        parts = fn_2d(a[idx], b[idx], float(lam_arr[idx]))
        for o, p in zip(outs, parts):
            o[idx] = p
    return tuple(outs)


# --------------------------------------------------------------------------------------------------
# the truncated series, its exact limit and its gradient
# --------------------------------------------------------------------------------------------------


def _series_trace(mat: np.ndarray, order: int) -> float:
    """``sum_{k=1..n} (-1)^(k+1) tr(mat^k) / k`` with an explicit loop over powers."""
    total = 0.0
    power = np.eye(mat.shape[0])
    for k in range(1, order + 1):
        power = power @ mat
        total += (-1.0) ** (k + 1) * np.trace(power) / k
    return total


def taylor_logdet(a, b, lam, order: int, *, normalize: bool = True):
    """``T_n(a, b)`` evaluated with the ``(m, m)`` matrix ``C = lam A^ B^T`` (explicit power loop).

    ``a, b``: ``(..., m, d)``; ``lam``: scalar or array broadcastable to the batch shape.
    Returns a float (2-D input) or an array of shape ``a.shape[:-2]``.
    """
    return _series_of(lambda ah, bh: ah @ bh.T, a, b, lam, order, normalize)


def taylor_logdet_dspace(a, b, lam, order: int, *, normalize: bool = True):
    """``T_n(a, b)`` evaluated with the ``(d, d)`` matrix ``lam B^T A^`` (same traces as C)."""
    return _series_of(lambda ah, bh: bh.T @ ah, a, b, lam, order, normalize)


def _series_of(product, a, b, lam, order: int, do_norm: bool):
    """The truncated series of ``lam * product(A^, B^)``, batched over the leading dims."""
    a, b = _check_pair(a, b)
    order = _check_order(order)
    return _batched(lambda a2, b2, lam_s: _series_trace(lam_s * product(*_prep(a2, b2, do_norm)), order),
                    a, b, lam, 0)


def exact_logdet(a, b, lam, *, normalize: bool = True):
    """``log det(I_m + C)`` via ``numpy.linalg.slogdet``; NaN where the determinant is <= 0."""
    a, b = _check_pair(a, b)
    do_norm = normalize

    def one(a2, b2, lam_s):
        ah, bh = _prep(a2, b2, do_norm)
        c = lam_s * ah @ bh.T
        sign, logabs = np.linalg.slogdet(np.eye(c.shape[0]) + c)
        return float(logabs) if sign > 0 else float("nan")

    return _batched(one, a, b, lam, 0)


def taylor_logdet_grad(a, b, lam, order: int, *, normalize: bool = True):
    """Analytic ``(dT_n/da, dT_n/db)`` for RAW ``a, b`` (shapes as the inputs).

    ``dT/dA^ = lam S_n^T B^``, ``dT/dB^ = lam S_n A^`` with ``S_n = sum_{j=0..n-1} (-C)^j``, then the
    normalisation Jacobian (:func:`normalize_backward`) when ``normalize`` is True.
    """
    a, b = _check_pair(a, b)
    order = _check_order(order)
    do_norm = normalize

    def one(a2, b2, lam_s):
        ah, bh = _prep(a2, b2, do_norm)
        c = lam_s * ah @ bh.T
        m = c.shape[0]
        s = np.zeros((m, m))
        power = np.eye(m)  # (-C)^j
        for _ in range(order):
            s += power
            power = power @ (-c)
        g_ah = lam_s * s.T @ bh
        g_bh = lam_s * s @ ah
        if do_norm:
            return normalize_backward(a2, g_ah), normalize_backward(b2, g_bh)
        return g_ah, g_bh

    return _batched(one, a, b, lam, 2)


# --------------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------------


def default_lam(m: int, d: int, eps_sq: float = 64.0) -> float:
    """``lam = d / (m * eps_sq)``."""
    return d / (m * eps_sq)


def _loss_setup(z_a, z_b, target_a, target_b, eps_sq, order, scale, lam):
    z_a = np.asarray(z_a, dtype=np.float64)
    z_b = np.asarray(z_b, dtype=np.float64)
    p_a = z_a if target_a is None else np.asarray(target_a, dtype=np.float64)
    p_b = z_b if target_b is None else np.asarray(target_b, dtype=np.float64)
    for x in (z_b, p_a, p_b):
        if x.shape != z_a.shape:
            raise ValueError(f"expected all inputs of shape {z_a.shape}, got {x.shape}")
    if z_a.ndim != 2 or z_a.shape[0] < 2:
        raise ValueError(f"z_a: expected an (m, d) array with m >= 2, got shape {z_a.shape}")
    if scale not in ("reference", "paper"):
        raise ValueError(f"scale: expected 'reference' or 'paper', got {scale!r}")
    _check_order(order)
    m, d = z_a.shape
    lam = default_lam(m, d, eps_sq) if lam is None else float(lam)
    mu = (m + d) / 2.0
    # d loss / d (t_ab + t_ba)
    coef = -1.0 / (lam * 2.0 * m) if scale == "reference" else -mu / 2.0
    return z_a, z_b, p_a, p_b, m, d, lam, mu, coef


def mec_loss(z_a, z_b, target_a=None, target_b=None, eps_sq: float = 64.0, order: int = 4,
             scale: str = "reference", lam=None):
    """MEC loss on ``(m, d)`` arrays.  Returns ``(loss, t_ab, t_ba, coding_length)`` (floats) with
    ``t_ab = T_n(target_a, z_b)`` and ``t_ba = T_n(target_b, z_a)`` (see the module docstring)."""
    z_a, z_b, p_a, p_b, m, d, lam, mu, coef = _loss_setup(
        z_a, z_b, target_a, target_b, eps_sq, order, scale, lam)
    t_ab = taylor_logdet(p_a, z_b, lam, order)
    t_ba = taylor_logdet(p_b, z_a, lam, order)
    loss = coef * (t_ab + t_ba)
    coding_length = mu * (t_ab + t_ba) / (2.0 * m)
    return loss, t_ab, t_ba, coding_length


def mec_loss_grad(z_a, z_b, target_a=None, target_b=None, eps_sq: float = 64.0, order: int = 4,
                  scale: str = "reference", lam=None):
    """Analytic gradient of :func:`mec_loss`'s ``loss``: ``(g_z_a, g_z_b, g_target_a, g_target_b)``.

    A target passed as None gets None: its contribution is folded into the gradient of the online
    output that stood in for it (as autograd does when the same tensor is used twice).
    """
    z_a, z_b, p_a, p_b, m, d, lam, mu, coef = _loss_setup(
        z_a, z_b, target_a, target_b, eps_sq, order, scale, lam)
    g_pa, g_zb = taylor_logdet_grad(p_a, z_b, lam, order)
    g_pb, g_za = taylor_logdet_grad(p_b, z_a, lam, order)
    g_za, g_zb, g_pa, g_pb = coef * g_za, coef * g_zb, coef * g_pa, coef * g_pb
    if target_a is None:
        g_za, g_pa = g_za + g_pa, None
    if target_b is None:
        g_zb, g_pb = g_zb + g_pb, None
    return g_za, g_zb, g_pa, g_pb


def lambda_warmup(step: int, *, steps_per_epoch: int, base_lam: float, warmup_epochs: float = 10,
                  start_factor: float = 8.0) -> float:
    """The reference lambda warm-up: ``1/lam`` goes linearly (per iteration) from
    ``start_factor / base_lam`` at step 0 to ``1 / base_lam`` at step ``W = warmup_epochs *
    steps_per_epoch``, then stays at ``1 / base_lam``.  Returns lam (a float)."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, (int, np.integer)) \
            or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch: expected an int >= 1, got {steps_per_epoch!r}")
    if not base_lam > 0 or not start_factor > 0 or not warmup_epochs >= 0:
        raise ValueError("base_lam, start_factor: expected > 0; warmup_epochs: expected >= 0")
    total = warmup_epochs * steps_per_epoch
    inv_start = start_factor / base_lam
    inv_end = 1.0 / base_lam
    if step >= total:
        return float(base_lam)
    frac = step / total
    return 1.0 / (inv_start + (inv_end - inv_start) * frac)
