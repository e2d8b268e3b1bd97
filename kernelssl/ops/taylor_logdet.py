"""``taylor_logdet``, torch tier: MEC's truncated matrix-log series (Maximum Entropy Coding -- Liu, Wang,
Li, Wang, NeurIPS 2022; docs/taylor_logdet.md) and the MEC loss on it.

Differentiable PyTorch, any device; the inputs are checked by :mod:`kernelssl.functional`, which calls
these.  The NumPy float64 reference is ``reference/taylor_logdet.py``; the tests hold the two (and the
eager baseline below) to each other.

Conventions
-----------
* ``a, b``: ``(..., m, d)`` with identical leading batch dims.  ``a`` is the FIRST argument, the
  teacher / target branch; ``b`` the student (online) branch.  Rows are samples.
* ``A^ = F.normalize(a, dim=-1)`` (``z / max(||z||, 1e-12)``), same for b; ``normalize=False`` uses
  the rows as given.
* ``C = lam * A^ B^T`` (``m x m``, NOT symmetric) and the truncated matrix-log series of order n::

      T_n(a, b) = sum_{k=1..n} (-1)^(k+1) tr(C^k) / k          (-> log det(I + C) iff rho(C) < 1)

  ``tr((A^ B^T)^k) = tr((B^T A^)^k)``, so the library path works with whichever of the ``m x m``
  matrix ``lam A^ B^T`` and the ``d x d`` matrix ``lam B^T A^`` is smaller.
* ``lam``: a Python number > 0, or a floating tensor broadcastable to the batch shape ``a.shape[:-2]``
  (its values are never read on the host).
* Numerics: float16/bfloat16 inputs are upcast to float32 at entry, float32 and float64 are kept
  (mixed inputs promote); results are float32 (float64 for float64 input) and autograd returns the
  gradients in each input's own dtype.  Nothing here reads tensor values on the host (no ``.item()``,
  no Python branch on a tensor), so every op is free of host syncs.
* Non-finite inputs propagate: NaN/Inf in gives NaN/Inf out.

Convergence: the series converges iff every eigenvalue of C has modulus < 1.  At the
default ``eps_sq = 64`` a collapsed batch has ``rho(C) = lam m = d / eps_sq`` (32 at d = 2048), where
``T_n`` is a polynomial that no longer approximates ``log det`` -- silently (no NaN).  Use
:func:`exact_logdet` to check and :func:`convergence_diagnostics` to monitor.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .._checks import check_int, check_positive
from ._common import NORM_EPS, compute_dtype, recorded_backward, unit_rows_backward

__all__ = [
    "taylor_logdet",
    "taylor_logdet_autograd",
    "taylor_logdet_eager",
    "taylor_logdet_backward",
    "exact_logdet",
    "convergence_diagnostics",
    "exact_spectral_radius",
    "mec_loss",
    "lambda_warmup",
]

Tensor = torch.Tensor

# Start vector of the power iteration: cos(k * golden angle) + 1.5 -- strictly positive, not
# periodic in k, so (generically) not orthogonal to the dominant eigenvector; no RNG involved.
GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


# --------------------------------------------------------------------------------------------------
# shared preparation
# --------------------------------------------------------------------------------------------------


def _prepare(a, b, lam, normalize: bool):
    """Upcast and normalise rows; return ``(a^, b^, lam_b, lam_m)``.

    ``lam_b`` broadcasts against the batch shape, ``lam_m`` against ``(..., s, s)`` matrices; both
    are the same Python float when lam is a number.
    """
    dtype = compute_dtype(a, b)
    if isinstance(lam, Tensor):
        lam_b = lam.to(dtype)
        lam_m = lam_b[..., None, None]
    else:
        lam_b = lam_m = float(lam)
    a = a.to(dtype)
    b = b.to(dtype)
    if normalize:
        a = F.normalize(a, dim=-1)
        b = F.normalize(b, dim=-1)
    return a, b, lam_b, lam_m


def _min_space_matrix(a: Tensor, b: Tensor, lam_m) -> Tensor:
    """``lam A B^T`` (m x m) when m <= d, else ``lam B^T A`` (d x d): same nonzero spectrum."""
    m, d = a.shape[-2], a.shape[-1]
    if m <= d:
        return lam_m * (a @ b.mT)
    return lam_m * (b.mT @ a)


def _power_traces(c: Tensor, order: int) -> list[Tensor]:
    """``[tr(C^1), ..., tr(C^n)]`` with powers up to ``h = ceil(n/2)`` only (h - 1 products)."""
    h = (order + 1) // 2
    powers = [c]
    for _ in range(h - 1):
        powers.append(powers[-1] @ c)
    return _power_traces_from(powers, order)


def _power_traces_from(powers: list[Tensor], order: int) -> list[Tensor]:
    """``[tr(C^1), ..., tr(C^n)]`` from ``powers = [C, ..., C^h]``: for ``k > h``,
    ``tr(C^k) = tr(C^h C^(k-h)) = sum_ij (C^h)_ij (C^(k-h))_ji`` (k - h <= h)."""
    h = len(powers)
    traces = []
    for k in range(1, order + 1):
        if k <= h:
            traces.append(powers[k - 1].diagonal(dim1=-2, dim2=-1).sum(-1))
        else:
            traces.append((powers[h - 1] * powers[k - h - 1].mT).sum(dim=(-2, -1)))
    return traces


def _series(traces: list[Tensor]) -> Tensor:
    """``sum_k (-1)^(k+1) traces[k-1] / k``."""
    total = traces[0]
    for k in range(2, len(traces) + 1):
        total = total + ((-1.0) ** (k + 1) / k) * traces[k - 1]
    return total


def _series_undivided(traces: list[Tensor]) -> Tensor:
    """``sum_k (-1)^(k+1) traces[k-1]`` (``lam dT/dlam``)."""
    total = traces[0]
    for k in range(2, len(traces) + 1):
        total = total + ((-1.0) ** (k + 1)) * traces[k - 1]
    return total


# --------------------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------------------


def taylor_logdet(a: Tensor, b: Tensor, lam: float | Tensor, order: int, *, normalize: bool = True) -> Tensor:
    """MEC's batched matrix-log Taylor expansion (THE LIBRARY PATH)::

        T_n(a, b) = sum_{k=1..n} (-1)^(k+1) tr(C^k) / k,     C = lam * A^ B^T

    Args:
        a: ``(..., m, d)`` teacher / target rows (first argument).
        b: ``(..., m, d)`` student rows, same shape and device.
        lam: number > 0, or a floating tensor broadcastable to ``a.shape[:-2]``.
        order: n >= 1.
        normalize: L2-normalise the rows first (default); False uses them as given.

    Returns:
        ``T_n`` of shape ``a.shape[:-2]`` (float32; float64 for float64 input).

    Cost: with ``s = min(m, d)`` and ``h = ceil(n/2)``: one ``s x s`` product of the inputs
    (``O(s^2 max(m, d))``), ``h - 1`` products ``s x s`` (``O(s^3)`` each), and ``O(s^2)`` elementwise
    work per trace ``tr(C^k) = sum_ij (C^h)_ij (C^(k-h))_ji`` for k > h.  Order 1 needs no product:
    ``T_1 = lam sum_i <a^_i, b^_i>``.  No host sync.

    For order >= 2, outside ``torch.compile``, one autograd Function (:class:`_TaylorLogdet`): the
    normalisation is folded into ``C`` and the hand-written backward (one more ``s x s`` product for
    n >= 4, then one ``s x s`` by ``s x max(m, d)`` product per input that needs a gradient); under
    ``create_graph=True`` it differentiates :func:`taylor_logdet_autograd`.  Otherwise (and for order 1)
    :func:`taylor_logdet_autograd`.
    """
    if order == 1 or torch.compiler.is_compiling():
        return taylor_logdet_autograd(a, b, lam, order, normalize=normalize)
    dtype = compute_dtype(a, b)
    batch, (m, d) = a.shape[:-2], a.shape[-2:]
    lam3 = lam.to(dtype).broadcast_to(batch).reshape(-1) if isinstance(lam, Tensor) else float(lam)
    out = _TaylorLogdet.apply(a.reshape(-1, m, d), b.reshape(-1, m, d), lam3, order, normalize)
    return out.reshape(batch)


def taylor_logdet_autograd(a: Tensor, b: Tensor, lam: float | Tensor, order: int, *,
                           normalize: bool = True) -> Tensor:
    """:func:`taylor_logdet` in plain autograd (``torch.func`` transforms, ``torch.compile``, higher
    derivatives).  Same arguments and result."""
    a, b, lam_b, lam_m = _prepare(a, b, lam, normalize)
    if order == 1:
        return lam_b * (a * b).sum(dim=(-2, -1))
    return _series(_power_traces(_min_space_matrix(a, b, lam_m), order))


def _series_matrix(powers: list[Tensor], order: int) -> Tensor:
    """``S_n = sum_{j<n} (-C)^j`` from ``powers = [C, ..., C^h]``, ``h = ceil(n/2)``: the terms up to
    ``j = min(h, n - 1)`` directly, those above as ``(-1)^h C^h R`` with ``R = sum_{i=1..n-1-h} (-C)^i``
    (``n - 1 - h < h``): at most one product."""
    h = len(powers)
    top = min(h, order - 1)
    acc = powers[0].neg()
    for j in range(2, top + 1):
        acc.add_(powers[j - 1], alpha=(-1.0) ** j)
    rest = order - 1 - h
    if rest >= 1:
        if rest == 1:  # R = -C
            acc = torch.baddbmm(acc, powers[h - 1], powers[0], alpha=-((-1.0) ** h))
        else:
            r = powers[0].neg()
            for i in range(2, rest + 1):
                r.add_(powers[i - 1], alpha=(-1.0) ** i)
            acc = torch.baddbmm(acc, powers[h - 1], r, alpha=(-1.0) ** h)
    acc.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return acc


class _TaylorLogdet(torch.autograd.Function):
    """``T_n`` of ``a, b (P, m, d)`` (``lam``: a number or ``(P,)``), order >= 2, with the normalisation
    folded in: ``r_a = 1 / max(||a_i||, eps)`` (same for b) and, in min(m, d) space::

        m-space:  C = lam diag(r_a) A B^T diag(r_b)          d-space:  C = lam B^T diag(r_a r_b) A

    so no normalised ``(m, d)`` copy is formed.  Backward, with ``S = sum_{j<n} (-C)^j`` (``dT/dC = S^T``)
    and the upstream gradient g::

        m-space:  W = g lam S^T o (r_a r_b^T),   e_i = g sum_j S_ji C_ij
                  dA = W B - diag(r_a^2 e) A,           dB = W^T A - diag(r_b^2 e') B,   e'_j = g sum_i S_ji C_ij
        d-space:  k = g lam r_a r_b,   V = B S^T,   U = A S,   t_i = a_i . V_i = b_i . U_i
                  dA = diag(k) (V - diag(r_a^2 t) A),   dB = diag(k) (U - diag(r_b^2 t) B)

    (the ``r^2`` terms are the Jacobian of the normalisation; zero for a row whose norm is below eps,
    where the clamp is active, and absent with ``normalize=False``: ``r = 1``).  ``dT/dlam = (1/lam)
    sum_k (-1)^(k+1) tr(C^k)``.  Under ``create_graph=True``: :func:`recorded_backward` of
    :func:`taylor_logdet_autograd`."""

    @staticmethod
    def forward(ctx, a, b, lam3, order: int, normalize: bool):  # type: ignore[override]
        dtype = compute_dtype(a, b)
        af, bf = a.to(dtype), b.to(dtype)
        m, d = af.shape[-2:]
        lam_p = lam3 if isinstance(lam3, float) else lam3[:, None]  # against (P, m) row factors
        if normalize:
            na, nb = torch.linalg.vector_norm(af, dim=-1), torch.linalg.vector_norm(bf, dim=-1)
            ra, rb = na.clamp_min(NORM_EPS).reciprocal(), nb.clamp_min(NORM_EPS).reciprocal()
        else:
            na = nb = ra = rb = None
        if m <= d:
            if normalize:
                outer = (ra * lam_p)[:, :, None] * rb[:, None, :]  # lam r_a r_b^T
                c = torch.bmm(af, bf.mT).mul_(outer)
            else:
                outer = None
                c = torch.bmm(af, bf.mT).mul_(lam_p[:, :, None] if isinstance(lam_p, Tensor) else lam_p)
        else:
            outer = None
            k = (ra * rb) * lam_p if normalize else lam_p  # lam r_a r_b per row
            ak = af * (k[:, :, None] if isinstance(k, Tensor) else k)
            c = torch.bmm(bf.mT, ak)
        h = (order + 1) // 2
        powers = [c]
        for _ in range(h - 1):
            powers.append(torch.bmm(powers[-1], c))
        traces = _power_traces_from(powers, order)
        ctx.save_for_backward(a, b, lam3 if isinstance(lam3, Tensor) else None, na, nb, ra, rb, outer, *powers)
        ctx.lam = lam3 if isinstance(lam3, float) else None
        ctx.order, ctx.normalize, ctx.dtype = order, normalize, dtype
        ctx.u = _series_undivided(traces) if ctx.needs_input_grad[2] else None  # lam dT/dlam
        return _series(traces)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        a, b, lam3, na, nb, ra, rb, outer, *powers = ctx.saved_tensors
        need_a, need_b, need_lam = ctx.needs_input_grad[:3]
        lam = lam3 if lam3 is not None else ctx.lam
        if torch.is_grad_enabled():  # create_graph=True: plain autograd, recorded
            ga, gb, glam = recorded_backward(
                lambda x, y, lam_: taylor_logdet_autograd(x, y, lam_, ctx.order, normalize=ctx.normalize),
                (a, b, lam), (need_a, need_b, need_lam), (g,))
            return ga, gb, glam, None, None
        dtype = ctx.dtype
        g = g.to(dtype)
        lam_p = lam if lam3 is None else lam3[:, None]
        ga = gb = glam = None
        if need_a or need_b:
            af, bf = a.to(dtype), b.to(dtype)
            c = powers[0]
            s_mat = _series_matrix(powers, ctx.order)
            m, d = af.shape[-2:]
            if m <= d:
                if outer is None:  # normalize=False: W = g lam S^T
                    w = s_mat.mT * (g[:, None] * lam_p)[:, :, None]
                else:
                    w = s_mat.mT * (outer * g[:, None, None])
                    e = s_mat.mT * c  # e_ij = S_ji C_ij
                if need_a:
                    ga = torch.bmm(w, bf)
                    if outer is not None:
                        coef = (e.sum(-1) * g[:, None] * ra * ra).masked_fill_(na < NORM_EPS, 0.0)
                        ga.addcmul_(af, coef[:, :, None], value=-1.0)
                if need_b:
                    gb = torch.bmm(w.mT, af)
                    if outer is not None:
                        coef = (e.sum(-2) * g[:, None] * rb * rb).masked_fill_(nb < NORM_EPS, 0.0)
                        gb.addcmul_(bf, coef[:, :, None], value=-1.0)
            else:
                k = g[:, None] * ((ra * rb) * lam_p if ctx.normalize else lam_p)  # g lam r_a r_b per row
                t = None
                if need_a:
                    v = torch.bmm(bf, s_mat.mT)
                    if ctx.normalize:
                        t = torch.linalg.vecdot(af, v)
                        v.addcmul_(af, (ra * ra * t).masked_fill_(na < NORM_EPS, 0.0)[:, :, None], value=-1.0)
                    ga = v.mul_(k[:, :, None])
                if need_b:
                    u = torch.bmm(af, s_mat)
                    if ctx.normalize:
                        t = torch.linalg.vecdot(bf, u) if t is None else t
                        u.addcmul_(bf, (rb * rb * t).masked_fill_(nb < NORM_EPS, 0.0)[:, :, None], value=-1.0)
                    gb = u.mul_(k[:, :, None])
        if need_lam:  # dT/dlam = (1/lam) sum_k (-1)^(k+1) tr(C^k)
            glam = g * ctx.u / lam3
        return (None if ga is None else ga.to(a.dtype)), (None if gb is None else gb.to(b.dtype)), glam, None, None


def taylor_logdet_eager(a: Tensor, b: Tensor, lam: float | Tensor, order: int, *, normalize: bool = True) -> Tensor:
    """``T_n(a, b)`` computed the way the MEC reference code does (THE BENCHMARK BASELINE).

    ``C = lam A^ B^T`` in m-space whatever the shapes; ``power = power @ C`` for every k up to n
    (n - 1 products of ``m x m`` matrices); a sum matrix accumulates ``(-1)^(k+1) C^k / k``; one trace
    at the end.  Batched over leading dims via ``matmul``.  Same arguments and result as
    :func:`taylor_logdet`.
    """
    a, b, _, lam_m = _prepare(a, b, lam, normalize)
    c = lam_m * (a @ b.mT)
    power = c
    sum_matrix = torch.zeros_like(c)
    for k in range(order):
        if k > 0:
            power = power @ c
        sum_matrix = sum_matrix + ((-1.0) ** k / (k + 1)) * power
    return sum_matrix.diagonal(dim1=-2, dim2=-1).sum(-1)


def exact_logdet(a: Tensor, b: Tensor, lam: float | Tensor, *, normalize: bool = True) -> Tensor:
    """``log det(I_m + lam A^ B^T)`` exactly, batched; NaN where the determinant is <= 0.

    Evaluated in min(m, d) space by Sylvester's identity ``det(I_m + lam A^ B^T) = det(I_d + lam B^T A^)``
    with ``torch.linalg.slogdet``; the NaN comes from ``torch.where`` (no host sync).  Differentiable
    (``d log det(I + C) / dC = (I + C)^-T``); at a singular ``I + C`` the value is NaN and so may be
    the gradient.  Same arguments and result dtype/shape as :func:`taylor_logdet`.
    """
    a, b, _, lam_m = _prepare(a, b, lam, normalize)
    c = _min_space_matrix(a, b, lam_m)
    eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
    sign, logabs = torch.linalg.slogdet(eye + c)
    return torch.where(sign > 0, logabs, torch.full_like(logabs, float("nan")))


@torch.no_grad()
def taylor_logdet_backward(g: Tensor, a: Tensor, b: Tensor, lam: Tensor, order: int, normalize: bool,
                           need_a: bool = True, need_b: bool = True) -> tuple[Tensor, Tensor]:
    """``(g dT/da, g dT/db)`` for ``a, b (P, m, d)``, ``lam, g (P,)``, without autograd; an unrequested
    side is an empty ``(0,)`` tensor.  The CPU kernel of the fused op's backward
    (:mod:`kernelssl.triton.taylor_logdet_op`).

    With ``S_n = sum_{j<n} (-M)^j`` in min(m, d) space (``M = lam A^ B^T`` or ``lam B^T A^``)::

        m-space:  dT/dA^ = lam S_n^T B^,   dT/dB^ = lam S_n A^
        d-space:  dT/dA^ = lam B^ S_n^T,   dT/dB^ = lam A^ S_n

    then the normalisation Jacobian (:func:`kernelssl.ops._common.unit_rows_backward`)."""
    dtype = compute_dtype(a, b)
    af, bf = a.to(dtype), b.to(dtype)
    na, nb = (torch.linalg.vector_norm(x, dim=-1, keepdim=True) for x in (af, bf))
    ah, bh = (af / na.clamp_min(NORM_EPS), bf / nb.clamp_min(NORM_EPS)) if normalize else (af, bf)
    alpha = (g.to(dtype) * lam.to(dtype))[:, None, None]
    m, d = a.shape[-2:]
    if order == 1:
        va, vb = alpha * bh, alpha * ah
    else:
        mat = _min_space_matrix(ah, bh, lam.to(dtype)[:, None, None])
        s_mat = torch.eye(mat.shape[-1], dtype=dtype, device=mat.device).expand_as(mat)
        power = s_mat
        for j in range(1, order):
            power = power @ mat
            s_mat = s_mat + ((-1.0) ** j) * power
        if m <= d:
            va, vb = alpha * (s_mat.mT @ bh), alpha * (s_mat @ ah)
        else:
            va, vb = alpha * (bh @ s_mat.mT), alpha * (ah @ s_mat)
    if normalize:
        va, vb = unit_rows_backward(va, ah, na), unit_rows_backward(vb, bh, nb)
    empty = a.new_empty((0,))
    return (va.to(a.dtype) if need_a else empty), (vb.to(b.dtype) if need_b else empty)


@torch.no_grad()
def convergence_diagnostics(
    a: Tensor,
    b: Tensor,
    lam: float | Tensor,
    *,
    order: int = 4,
    normalize: bool = True,
    iters: int = 16,
) -> tuple[Tensor, Tensor]:
    """Is the series of :func:`taylor_logdet` converging?  ``(rho_estimate, term_ratio)``, both of
    shape ``a.shape[:-2]``, computed under ``torch.no_grad()`` with no host sync.

    The series converges iff ``rho(C) < 1`` (every eigenvalue of C inside the unit disc).

    * ``rho_estimate``: power iteration on C, applied implicitly in min(m, d) space
      (``v -> lam A^ (B^T v)`` or ``v -> lam B^T (A^ v)``, never forming C), from the deterministic
      start ``cos(k * golden angle) + 1.5`` (normalised).  After each step ``v`` is renormalised; the
      estimate is the geometric mean of the growth factors ``||C v_k|| / ||v_k||`` over the last
      ``iters - iters // 2`` of the ``iters`` iterations (the first half is burn-in, which removes the
      start vector's transient).  The geometric mean of norm growth is robust to a complex dominant
      pair (whose single-step ratios oscillate).  It approaches rho from the dominant-eigenvalue gap:
      the error decays like ``(|lambda_2| / |lambda_1|)^(iters/2)``.  A zero C gives 0.
    * ``term_ratio``: ``|tr(C^n)/n| / |tr(C^(n-1))/(n-1)|``, the magnitude of the last series term over
      the previous one (> 1 means the terms still grow).  For ``order = 1`` it is the first omitted
      term over the kept one, ``|tr(C^2)/2| / |tr(C)|``.  0 when the numerator is 0, inf when only the
      denominator is.  A heuristic: a trace can vanish by cancellation; rho is the real criterion.

    Cost: ``rho_estimate`` is ``iters`` pairs of matrix-vector products, ``O(iters m d)`` -- small
    next to the forward's ``O(min(m,d)^2 max(m,d))``.  ``term_ratio`` needs ``tr(C^n)``, i.e. the
    forward's own products (one input product + ``ceil(n/2) - 1`` min-space products) without
    autograd, about a third of a forward + backward -- call the diagnostics every few steps if that
    matters.
    """
    iters = check_int(iters, "iters", minimum=1)
    a, b, _, lam_m = _prepare(a, b, lam, normalize)
    m, d = a.shape[-2], a.shape[-1]
    dtype, device = a.dtype, a.device
    batch = a.shape[:-2]

    if m <= d:
        def apply(v):
            return lam_m * (a @ (b.mT @ v))
        s = m
    else:
        def apply(v):
            return lam_m * (b.mT @ (a @ v))
        s = d

    v = torch.cos(torch.arange(s, dtype=dtype, device=device) * GOLDEN_ANGLE) + 1.5
    v = (v / v.norm()).expand(*batch, s).unsqueeze(-1)
    tiny = torch.finfo(dtype).tiny
    burn = iters // 2
    log_growth = torch.zeros(batch, dtype=dtype, device=device)
    for i in range(iters):
        w = apply(v)
        growth = w.norm(dim=(-2, -1))
        if i >= burn:
            log_growth = log_growth + torch.log(growth)
        v = w / growth.clamp_min(tiny)[..., None, None]
    rho = torch.exp(log_growth / (iters - burn))

    n = max(order, 2)
    traces = _power_traces(_min_space_matrix(a, b, lam_m), n)
    num = traces[n - 1].abs() / n
    den = traces[n - 2].abs() / (n - 1)
    ratio = torch.where(num == 0, torch.zeros_like(num), num / den)
    return rho, ratio


def exact_spectral_radius(a: Tensor, b: Tensor, lam: float | Tensor, *, normalize: bool = True) -> Tensor:
    """``rho(C)``, ``C = lam A^ B^T``, from the eigenvalues of the ``min(m, d)``-space matrix in float64
    (``torch.linalg.eigvals``: O(s^3), and a host sync on a GPU).  What ``check_convergence`` reads when
    the power-iteration estimate of :func:`convergence_diagnostics` is within its error of 1 (it runs up
    to ~13% low on a non-normal C with a close second eigenvalue).  Shape ``a.shape[:-2]``."""
    a, b, _, lam_m = _prepare(a.detach().double(), b.detach().double(),
                              lam.detach().double() if isinstance(lam, Tensor) else lam, normalize)
    return torch.linalg.eigvals(_min_space_matrix(a, b, lam_m)).abs().amax(dim=-1)


# --------------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------------


def mec_loss(z_a: Tensor, z_b: Tensor, target_a: Tensor | None = None, target_b: Tensor | None = None, *,
             eps_sq: float = 64.0, order: int = 4, scale: str = "reference", lam: float | Tensor | None = None,
             eager: bool = False, exact: bool = False,
             logdet: Callable[[Tensor, Tensor, float | Tensor, int], Tensor] | None = None,
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, float | Tensor]:
    """MEC loss, symmetrised over two views::

        t_ab = T_n(P1, Z2),   t_ba = T_n(P2, Z1),   mu = (m + d) / 2,   lam = d / (m eps_sq)
        scale="reference" (default):  loss = -(1/lam) (t_ab + t_ba) / (2m)
        scale="paper":                loss = -mu (t_ab + t_ba) / 2       (the paper's -mu log det form)
        coding_length = mu (t_ab + t_ba) / (2m)                           (both scales)

    Args:
        z_a, z_b: ``(m, d)`` online (student) outputs Z1, Z2 of the two views, m >= 2.
        target_a, target_b: ``(m, d)`` target (teacher) outputs P1, P2; None uses ``z_a`` / ``z_b``
            themselves -- NOT detached, the gradient flows through both arguments of T_n.  For a
            stop-gradient target pass ``target_a=z_a.detach()`` (the reference's EMA teacher is run
            under no_grad).
        eps_sq: epsilon^2 of the coding length (default 64); ignored when ``lam`` is given.
        order: n >= 1 of the series (default 4; even orders self-stabilise, docs/taylor_logdet.md).
        scale: "reference" or "paper" (see above).
        lam: override lambda (number > 0, or a 0-dim tensor), e.g. from :func:`lambda_warmup`.
        eager: use :func:`taylor_logdet_eager` (the benchmark baseline) instead of the library path.
        exact: use :func:`exact_logdet` in place of T_n (checking convergence; NaN if a det <= 0).
        logdet: ``fn(a, b, lam, order) -> T_n`` on the stacked ``(2, m, d)`` pairs, used in place of
            :func:`taylor_logdet` (the public API passes its backend-dispatched op here).

    Returns:
        ``(loss, t_ab, t_ba, coding_length, lam_used)``: 0-dim tensors (float32; float64 for float64
        input; all differentiable) and the lambda used (a Python float unless a tensor was passed).

    Both directions are ONE batched call of the op on stacked ``(2, m, d)`` tensors
    ``[P1, P2]`` and ``[Z2, Z1]``.  The k = 1 term of the reference scale is minus the mean cosine
    similarity of the paired rows.

    Example::

        loss, t_ab, t_ba, coding_length, lam = mec_loss(predictor(online(x1)), predictor(online(x2)),
                                                        teacher(x1).detach(), teacher(x2).detach())
        loss.backward()
    """
    target_a = z_a if target_a is None else target_a
    target_b = z_b if target_b is None else target_b
    tensors = (z_a, z_b, target_a, target_b)
    m, d = z_a.shape
    if lam is None:
        lam = d / (m * eps_sq)
    dtype = compute_dtype(*tensors)
    a = torch.stack([target_a.to(dtype), target_b.to(dtype)])
    b = torch.stack([z_b.to(dtype), z_a.to(dtype)])
    if exact:
        t = exact_logdet(a, b, lam)
    elif eager:
        t = taylor_logdet_eager(a, b, lam, order)
    else:
        t = (logdet or taylor_logdet)(a, b, lam, order)
    t_ab, t_ba = t[0], t[1]
    total = t_ab + t_ba
    mu = (m + d) / 2.0
    if scale == "reference":
        loss = -total / (2.0 * m * lam)
    else:
        loss = -mu * total / 2.0
    coding_length = mu * total / (2.0 * m)
    return loss, t_ab, t_ba, coding_length, lam


def lambda_warmup(
    step: int,
    *,
    steps_per_epoch: int,
    base_lam: float,
    warmup_epochs: float = 10,
    start_factor: float = 8.0,
) -> float:
    """The reference lambda warm-up (pure Python): ``1/lam`` goes linearly, per iteration, from
    ``start_factor / base_lam`` at step 0 to ``1 / base_lam`` at step ``W = warmup_epochs *
    steps_per_epoch``, then stays at ``1 / base_lam``.  It keeps the series convergent early
    (lam starts ``start_factor`` times smaller).  Returns lam for this step; ``warmup_epochs = 0``
    gives ``base_lam`` from the start.

    Example: ``lam = lambda_warmup(it, steps_per_epoch=len(loader), base_lam=d / (m * 64.0))``.
    """
    step = check_int(step, "step", minimum=0)
    steps_per_epoch = check_int(steps_per_epoch, "steps_per_epoch", minimum=1)
    base_lam = check_positive(base_lam, "base_lam")
    warmup_epochs = check_positive(warmup_epochs, "warmup_epochs", allow_zero=True)
    start_factor = check_positive(start_factor, "start_factor")
    total = warmup_epochs * steps_per_epoch
    if step >= total:
        return base_lam
    inv_start = start_factor / base_lam
    inv_end = 1.0 / base_lam
    return 1.0 / (inv_start + (inv_end - inv_start) * (step / total))
