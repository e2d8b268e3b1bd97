"""Fused Triton kernels for the Gaussian-potential Gram log-mean (SPEC §6.1), forward and backward:
Wang & Isola's uniformity on the same tiles as SFRIK's Legendre Gram mean (``legendre_gram.py``),
another epilogue.

    L(Z; t) = log( (1/c) sum_{(i,j) in V} exp(x_ij) ),   x_ij = 2t (G_ij - 1),   G_ij = zhat_i . zhat_j

with ``V`` the pairs ``i != j`` and ``c = n(n-1)`` (``exclude_diagonal=True``: Wang & Isola's
``torch.pdist(x).pow(2).mul(-t).exp().mean().log()``, as ``||zhat_i - zhat_j||^2 = 2 - 2 G_ij``) or all
pairs and ``c = n^2``; ``zhat_i = z_i / max(||z_i||, 1e-12)`` (``normalize=True``, fused as in
legendre_gram: Gram tiles of the raw rows scaled by ``r_i r_j``) or the rows as given.  Never an
``n x n`` matrix: memory O(n q) (rows up to q = 256), or legendre_gram's bounded row panel (wider rows).

Stable for any t (an online log-sum-exp): at large t every ``exp(x_ij)`` may underflow in fp32 (t = 1e3
and rows 0.1 apart already give exp(-20)... exp(-4000)), so each program keeps the maximum exponent of
its tile, ``m_p``, and ``s_p = sum exp(x - m_p)``; the reduce takes ``m = max_p m_p``,
``S' = sum_p s_p exp(m_p - m)`` (>= 1: the maximal entry contributes exp(0)), and
``L = m + log S' - log c``.  A tile without a valid pair (the diagonal tile of a last row block of one
row, diagonal excluded) contributes ``m_p = -inf, s_p = 0`` and is skipped by the reduce (no NaN); a
tile whose valid entries are all NaN has ``m_p = -inf`` too (the max skips NaN) but ``s_p = NaN``, which
the reduce keeps: NaN in ``z`` always reaches the value.

Views: ``z`` is one view ``(n, q)`` or ``P`` views ``(P, n, q)`` (Wang & Isola's loss: P = 2), stacked as
the rows of one ``(P n, q)`` matrix; every launch below covers all views (the view on grid axis 0), so
the loss's two uniformities cost one launch per stage, each view's value and gradient bitwise its own
call's (the same tiles in the same order).

Forward (``gaussian_gram_forward``), the row kernel of legendre_gram + 2 kernels:
  * ``_gram_lse_kernel``: one program per lower-triangular ``(BLOCK, BLOCK)`` Gram tile (legendre_gram's
    tiles and K-loop, ``_gram_tile``); epilogue: the masked tile max and sum above; off-diagonal tiles
    count twice (G is symmetric: ``n^2 q`` FLOPs instead of ``2 n^2 q``).
  * ``_lse_reduce_kernel``: one program per view combines its partials in a fixed order: the value and
    the statistics ``(m, S')`` saved for the backward (a tensor: no host sync), as are the row scales
    (the backward does not recompute them).
  Deterministic (no atomics), memory O(n q + n^2 / BLOCK^2).

Backward (``gaussian_gram_backward``), with ``w_kj = exp(x_kj - m)`` (so ``exp(x_kj) / S = w_kj / S'``)::

    dL/dzhat_k = (4t / S') sum_{j: (k,j) in V} w_kj zhat_j,   dz_k = r_k (g_k - zhat_k (zhat_k . g_k))

  (both roles of row k in the symmetric sum give the factor 2 of 4t = 2 * 2t), ``m`` and ``S'`` read
  from the forward's statistics on the device.  For normalised rows (``||z_k|| >= eps``) the diagonal
  weight is dropped also when the diagonal is included: its term lies along ``zhat_k`` and the Jacobian
  removes it exactly (legendre_gram's issue 16 reasoning).  Two paths, both recomputing the Gram tiles:
  * rows resident (default for q <= 128, and q <= 256 when q % 16 == 0: :func:`resident_ok`), the
    uniformity case: ``_resident_backward_kernel`` keeps a ``(64, q)`` fp32 accumulator of
    ``sum_j (w_kj r_j) z_j`` in registers while it runs over the column tiles (as flash-attention's dQ),
    so nothing n x n is ever stored; when the row tiles alone are too few to fill the GPU (n below
    ~34k, counting the rows of all views) the columns are split over ``resident_splits`` programs, each
    writing an ``(n, q)`` fp32 partial; ``_split_reduce_kernel`` sums the splits in a fixed order and
    applies the Jacobian and ``g 4t / S'``.  With one split (the row tiles of all views fill whole waves
    of the SMs at >= 90%: two views of 4096 rows, one of 65536) the kernel applies them itself
    (``FUSED``): one launch, no partials.  Products ``(w r_j) Z_J`` by legendre_gram's ``_panel_dot``
    (the weights at near-fp32 precision on tensor cores: bf16 / TF32 hi-lo splits for 16-bit rows).
  * wider rows: legendre_gram's row panels (its docstring says why: a q-wide output row does not fit in
    registers): ``_gram_weights_kernel`` writes ``P_kj = w_kj r_j`` and the per-(row, column tile)
    partials of ``d_k = sum_j w_kj G_kj``; legendre_gram's ``_panel_matmul_kernel`` (the GEMM ``P Z``
    with the Jacobian in its epilogue) finishes, with the factor ``g 4t / S'`` that program 0 of the
    weights kernel writes (``SCALE_GIVEN``).

Precision (SPEC §4), block sizes and the interpreter's quirks: as legendre_gram (its ``_config``; fp32
Gram tiles at ``input_precision``, ``"tf32x3"`` by default; 16-bit rows on the tensor cores as they are;
the backward GEMM's bf16 / TF32 splits of ``P``; fp32 accumulation, half operands upcast right after the
load under the interpreter).  The exponent's error is ``2t`` times the Gram entry's (a few fp32 ulps of
1), so the value's absolute error and the gradient's relative error grow with t as in any fp32
computation of this formula.  float64 inputs go to a float64 torch computation (same algorithm).

Registration: ``kernelssl::gaussian_gram_logmean`` (returns the value, the statistics ``(m, S')`` and
the row scales ``(r, proj)``, the latter non-differentiable) and ``kernelssl::gaussian_gram_logmean_backward`` are
``torch.library.triton_op``s wired like legendre_gram's (CPU kernels: the interpreter when
``TRITON_INTERPRET=1``, else the torch math; explicit fakes; decomposed into the kernels under
``torch.compile`` on CUDA, opaque on CPU).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op

from .._backend import interpreting, resolve_precision
from .._checks import check_bool, check_positive, check_tensor
from ._launch import wrap_triton
from .legendre_gram import (  # noqa: F401  (jit helpers: globals of the kernels below)
    _EPS,
    _SUPPORTED,
    _config,
    _decompose_on_cuda,
    _gram_tile,
    _input_precision,
    _num_sms,
    _panel_dot,
    _panel_matmul_kernel,
    _round_bf16,
    _row_scales_kernel,
    _swizzle,
    panel_rows_for,
)

__all__ = ["gaussian_gram_logmean", "gaussian_gram_forward", "gaussian_gram_backward"]

_NEG_INF = float("-inf")


# ==================================================================================================
# kernels (_row_scales_kernel, _gram_tile, _swizzle and _panel_matmul_kernel: legendre_gram.py)
# ==================================================================================================


# Forward.  Views b = 0..P-1 stacked as rows b n .. b n + n - 1 of z (one launch for all views: grid
# axis 0 = b * num_parts + p).  Program p of view b owns Gram tile (I, J), J <= I, p = I (I + 1)/2 + J;
# over its valid entries (inside n x n, and i != j when EXCLUDE), x_ij = two_t (r_i r_j z_i . z_j - 1):
#   mpart[b, p] = max x_ij  (-inf if none),   spart[b, p] = w_IJ sum exp(x_ij - mpart[b, p])  (0 if none),
#   w = 1 on the diagonal tile, 2 off it (G = G^T).
# Backward: _gram_weights_kernel + legendre_gram's _panel_matmul_kernel (tiles recomputed).
@triton.jit
def _gram_lse_kernel(
    z_ptr, rinv_ptr, mpart_ptr, spart_ptr,
    stride_zn, stride_zq,
    n, q, two_t, num_parts,
    EXCLUDE: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    gid = tl.program_id(0).to(tl.int64)
    b = gid // num_parts
    pid = gid % num_parts
    z_ptr += b * n * stride_zn  # this program's view: rows b n .. of z and rinv
    rinv_ptr += b * n
    # invert p = I (I + 1)/2 + J: I = floor((sqrt(8p + 1) - 1) / 2), then fix a possible off-by-one
    ti = ((tl.sqrt((8 * pid + 1).to(tl.float64)) - 1.0) * 0.5).to(tl.int64)
    ti = tl.where(ti * (ti + 1) // 2 > pid, ti - 1, ti)
    ti = tl.where((ti + 1) * (ti + 2) // 2 <= pid, ti + 1, ti)
    tj = pid - ti * (ti + 1) // 2
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < n
    cmask = cols < n
    acc = _gram_tile(z_ptr, rows, cols, rmask, cmask, stride_zn, stride_zq, q,
                     BLOCK, BLOCK, BLOCK_K, DOT_F32, INPUT_PRECISION)
    r_i = tl.load(rinv_ptr + rows, mask=rmask, other=0.0)
    r_j = tl.load(rinv_ptr + cols, mask=cmask, other=0.0)
    g = acc * r_i[:, None] * r_j[None, :]
    if NORMALIZE:  # s <= 1 on unit rows: a rounded 1 + ulp times a huge t must not make x > 0
        g = tl.where(g > 1.0, 1.0, g)  # not tl.minimum: that drops NaN (min.f32 returns the other operand)
    x = two_t * (g - 1.0)
    valid = rmask[:, None] & cmask[None, :]
    if EXCLUDE:
        valid = valid & (rows[:, None] != cols[None, :])
    x = tl.where(valid, x, float("-inf"))
    m = tl.max(tl.max(x, axis=1), axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # no valid entry: exp(-inf - 0) = 0, no NaN
    s = tl.sum(tl.sum(tl.where(valid, tl.exp(x - m_safe), 0.0), axis=1), axis=0)
    w = tl.where(ti == tj, 1.0, 2.0)
    tl.store(mpart_ptr + gid, m)
    tl.store(spart_ptr + gid, s * w)


# Reduce, one program per view b, fixed order (the deterministic second stage):
#   m = max_p mpart[b, p],   S' = sum_p spart[b, p] exp(mpart[b, p] - m)   (parts with mpart = -inf
#   skipped),  out[b] = m + log S' - log c,  c = n (n - 1) (EXCLUDE) or n^2;  stats[b] = (m, S') for the
#   backward.
@triton.jit
def _lse_reduce_kernel(mpart_ptr, spart_ptr, out_ptr, stats_ptr, num_parts, n,
                       EXCLUDE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    mpart_ptr += b * num_parts
    spart_ptr += b * num_parts
    out_ptr += b
    stats_ptr += 2 * b
    offs = tl.arange(0, BLOCK)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    for s0 in range(0, num_parts, BLOCK):
        mx = tl.maximum(mx, tl.load(mpart_ptr + s0 + offs, mask=(s0 + offs) < num_parts, other=float("-inf")))
    m = tl.max(mx, axis=0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s0 in range(0, num_parts, BLOCK):
        pmask = (s0 + offs) < num_parts
        mp = tl.load(mpart_ptr + s0 + offs, mask=pmask, other=float("-inf"))
        sp = tl.load(spart_ptr + s0 + offs, mask=pmask, other=0.0)
        # skip only empty parts: a part of NaN entries has mp = -inf (the max skips NaN) and sp = NaN,
        # which must reach the sum (NaN * exp(-inf) = NaN)
        acc += tl.where((mp == float("-inf")) & (sp == 0.0), 0.0, sp * tl.exp(mp - m))
    total = tl.sum(acc, axis=0)
    nf = tl.full([], 1.0, tl.float32) * n  # not n.to(): n == 1 arrives as a constant on a GPU
    if EXCLUDE:
        log_c = tl.log(nf) + tl.log(nf - 1.0)
    else:
        log_c = 2.0 * tl.log(nf)
    # m = -inf: no tile had a comparable exponent (every row non-finite, NaN skipped by the max): NaN,
    # never a silent -inf (a finite z always has m >= -4t)
    tl.store(out_ptr, tl.where(m == float("-inf"), float("nan"), m + tl.log(total) - log_c))
    tl.store(stats_ptr, m)
    tl.store(stats_ptr + 1, total)


# Backward, stage 1 (rows row0 .. row0 + panel_rows; tile (I, J)), with (m, S') = stats:
#   x_kj = two_t (r_k r_j z_k . z_j - 1) (recomputed),  w_kj = exp(x_kj - m) on valid pairs, else 0
#   (NORMALIZE: also 0 at j = k for rows with ||z_k|| >= eps: that term lies along zhat_k, which the
#   Jacobian removes exactly -- carried in fp32 it would leave its rounding behind),
#   P[k - row0, j] = w_kj r_j,   dpart[k - row0, J] = sum_{j in J} w_kj G_kj   (-> zhat_k . g_k),
#   program 0: scale = g * 2 two_t / S'  (the factor of legendre_gram's _panel_matmul_kernel, SCALE_GIVEN).
@triton.jit
def _gram_weights_kernel(
    z_ptr, rinv_ptr, proj_ptr, stats_ptr, grad_ptr, scale_ptr, p_ptr, dpart_ptr,
    stride_zn, stride_zq, stride_pm, stride_pn, stride_dm, stride_dn,
    n, q, row0, panel_rows, two_t,
    EXCLUDE: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    m = tl.load(stats_ptr)
    if pid == 0:
        tl.store(scale_ptr, tl.load(grad_ptr).to(tl.float32) * (2.0 * two_t) / tl.load(stats_ptr + 1))
    tm, tn = _swizzle(pid, tl.cdiv(panel_rows, BLOCK_M), tl.cdiv(n, BLOCK_N), GROUP_M)
    lrows = tm * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of the panel
    rows = row0 + lrows  # rows of z
    cols = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = lrows < panel_rows
    cmask = cols < n
    acc = _gram_tile(z_ptr, rows, cols, rmask, cmask, stride_zn, stride_zq, q,
                     BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, INPUT_PRECISION)
    r_i = tl.load(rinv_ptr + rows, mask=rmask, other=0.0)
    r_j = tl.load(rinv_ptr + cols, mask=cmask, other=0.0)
    g = acc * r_i[:, None] * r_j[None, :]
    mask = rmask[:, None] & cmask[None, :]
    valid = mask
    diag = rows[:, None] == cols[None, :]
    if EXCLUDE:
        valid = valid & (~diag)
    elif NORMALIZE:
        projected = tl.load(proj_ptr + rows, mask=rmask, other=0.0) != 0.0
        valid = valid & ~(diag & projected[:, None])
    gx = tl.where(g > 1.0, 1.0, g) if NORMALIZE else g  # the forward's clamp (NaN kept)
    w = tl.exp(tl.where(valid, two_t * (gx - 1.0), float("-inf")) - m)  # 0 off the valid pairs
    tl.store(p_ptr + lrows[:, None] * stride_pm + cols[None, :] * stride_pn, w * r_j[None, :], mask=mask)
    if NORMALIZE:
        d = tl.sum(w * g, axis=1)  # w = 0 outside the valid pairs
        tl.store(dpart_ptr + lrows * stride_dm + tn * stride_dn, d, mask=rmask)


# Backward, rows resident (q <= MAX_RESIDENT_Q: a whole row of dL/dzhat fits in registers, as
# flash-attention's dQ).  Program (row tile I, column split c) runs over the column tiles J of its split
# (tiles c * tiles_per_split ...): the Gram tile recomputed, w_kj as in _gram_weights_kernel, and
#   part[c, k, :] = sum_j (w_kj r_j) z_j      (all q columns, _panel_dot: P at near-fp32 precision),
#   dpart[c, k]   = sum_j w_kj G_kj,
# no n x n panel in memory.  _split_reduce_kernel sums the splits in a fixed order.  Views b stacked as
# in _gram_lse_kernel (rows b n ..; grid axis 0 = b * (row tiles * splits) + c * row tiles + I;
# BATCHED = P > 1: one view compiles without the view arithmetic, as registers are tight at q = 256).
# FUSED (one split): no partials; _split_reduce_kernel's epilogue applied here (the same operations in
# the same order: the same bits), dz written directly.
@triton.jit
def _resident_backward_kernel(
    z_ptr, rinv_ptr, proj_ptr, stats_ptr, part_ptr, dpart_ptr, grad_ptr, out_ptr,
    stride_zn, stride_zq, stride_ps, stride_pm, stride_pq, stride_ds, stride_dm, stride_g, stride_on, stride_oq,
    n, q, two_t, tiles_per_split,
    EXCLUDE: tl.constexpr, NORMALIZE: tl.constexpr, MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, FUSED: tl.constexpr, ROUND_BF16: tl.constexpr,
    BATCHED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(n, BLOCK_M)
    b = 0
    if BATCHED:  # this program's view: rows b n .. of z, rinv, proj, part, dpart, out (pointers moved)
        per_view = num_m * tl.cdiv(tl.cdiv(n, BLOCK_N), tiles_per_split)
        b = pid // per_view
        pid = pid % per_view
        z_ptr += b * n * stride_zn
        rinv_ptr += b * n
        proj_ptr += b * n
    tm = pid % num_m  # row tiles fastest: the programs of one split share its column tiles in L2
    c = pid // num_m
    rows = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    qs = tl.arange(0, BLOCK_Q)
    qmask = qs < q
    m = tl.load(stats_ptr + 2 * b)
    r_i = tl.load(rinv_ptr + rows, mask=rmask, other=0.0)
    if NORMALIZE and not EXCLUDE:
        projected = tl.load(proj_ptr + rows, mask=rmask, other=0.0) != 0.0
    acc = tl.zeros([BLOCK_M, BLOCK_Q], dtype=tl.float32)
    d = tl.zeros([BLOCK_M], dtype=tl.float32)
    t0 = c * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(n, BLOCK_N))
    for tn in range(t0, t1):
        cols = tn * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < n
        g = _gram_tile(z_ptr, rows, cols, rmask, cmask, stride_zn, stride_zq, q,
                       BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, INPUT_PRECISION)
        r_j = tl.load(rinv_ptr + cols, mask=cmask, other=0.0)
        g = g * r_i[:, None] * r_j[None, :]
        valid = rmask[:, None] & cmask[None, :]
        diag = rows[:, None] == cols[None, :]
        if EXCLUDE:
            valid = valid & (~diag)
        elif NORMALIZE:
            valid = valid & ~(diag & projected[:, None])
        gx = tl.where(g > 1.0, 1.0, g) if NORMALIZE else g  # the forward's clamp (NaN kept)
        w = tl.exp(tl.where(valid, two_t * (gx - 1.0), float("-inf")) - m)  # 0 off the valid pairs
        if NORMALIZE:
            d += tl.sum(w * g, axis=1)
        zt = tl.load(z_ptr + cols[:, None] * stride_zn + qs[None, :] * stride_zq,
                     mask=cmask[:, None] & qmask[None, :], other=0.0)
        acc = _panel_dot(w * r_j[None, :], zt, acc, MODE, DOT_F32, INPUT_PRECISION)
    omask = rmask[:, None] & qmask[None, :]
    lr = tl.arange(0, BLOCK_M)  # the row tile's pointers moved once (int64), offsets in it in int32
    if FUSED:  # dz_k = (g_b 2 two_t / S'_b) (r_k acc_k - proj_k d_k z_k), as _split_reduce_kernel
        res = acc * r_i[:, None]
        if NORMALIZE:
            proj = tl.load(proj_ptr + rows, mask=rmask, other=0.0)
            zk = tl.load(z_ptr + tm * BLOCK_M * stride_zn + (lr[:, None] * stride_zn + qs[None, :] * stride_zq),
                         mask=omask, other=0.0).to(tl.float32)
            res = res - (proj * d)[:, None] * zk
        res = res * (tl.load(grad_ptr + b * stride_g).to(tl.float32) * (2.0 * two_t) / tl.load(stats_ptr + 2 * b + 1))
        if ROUND_BF16:  # interpreter: round to nearest even before its truncating bf16 cast
            res = _round_bf16(res)
        out_ptr += (b * n + tm * BLOCK_M) * stride_on
        tl.store(out_ptr + (lr[:, None] * stride_on + qs[None, :] * stride_oq), res.to(out_ptr.dtype.element_ty),
                 mask=omask)
    else:
        if BATCHED:
            part_ptr += b * n * stride_pm
            dpart_ptr += b * n * stride_dm
        tl.store(part_ptr + c * stride_ps + rows[:, None] * stride_pm + qs[None, :] * stride_pq, acc, mask=omask)
        if NORMALIZE:
            tl.store(dpart_ptr + c * stride_ds + rows * stride_dm, d, mask=rmask)


# Backward, rows resident, stage 2 (rows k of all P n stacked rows, q tile): acc_k = sum_c part[c, k],
# d_k = sum_c dpart[c, k] (fixed order), dz_k = (g_b 2 two_t / S'_b) (r_k acc_k - proj_k d_k z_k) in z's
# dtype, b = k // n the row's view (the Jacobian as in legendre_gram's _panel_matmul_kernel).
@triton.jit
def _split_reduce_kernel(
    part_ptr, dpart_ptr, z_ptr, rinv_ptr, proj_ptr, stats_ptr, grad_ptr, out_ptr,
    stride_ps, stride_pm, stride_pq, stride_ds, stride_dm, stride_zn, stride_zq, stride_on, stride_oq, stride_g,
    n, q, splits, two_t, n_view,
    NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_q = tl.cdiv(q, BLOCK_Q)
    rows = (pid // num_q) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % num_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rmask = rows < n
    omask = rmask[:, None] & (cols[None, :] < q)
    acc = tl.zeros([BLOCK_R, BLOCK_Q], dtype=tl.float32)
    d = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c in range(0, splits):
        acc += tl.load(part_ptr + c * stride_ps + rows[:, None] * stride_pm + cols[None, :] * stride_pq,
                       mask=omask, other=0.0)
        if NORMALIZE:
            d += tl.load(dpart_ptr + c * stride_ds + rows * stride_dm, mask=rmask, other=0.0)
    res = acc * tl.load(rinv_ptr + rows, mask=rmask, other=0.0)[:, None]
    if NORMALIZE:
        proj = tl.load(proj_ptr + rows, mask=rmask, other=0.0)
        zk = tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :] * stride_zq, mask=omask,
                     other=0.0).to(tl.float32)
        res = res - (proj * d)[:, None] * zk
    b = rows // n_view  # each row's view
    fac = (tl.load(grad_ptr + b * stride_g, mask=rmask, other=0.0).to(tl.float32) * (2.0 * two_t)
           / tl.load(stats_ptr + 2 * b + 1, mask=rmask, other=1.0))
    res = res * fac[:, None]
    if ROUND_BF16:  # interpreter: round to nearest even before its truncating bf16 cast
        res = _round_bf16(res)
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_oq, res.to(out_ptr.dtype.element_ty),
             mask=omask)


# ==================================================================================================
# launchers
# ==================================================================================================

#: Widest rows for the rows-resident backward (a (BLOCK_M, q) fp32 accumulator per program): 256 when q
#: is a multiple of 16, else 128 (unaligned rows of 129..255 spill registers: sm90_compile); wider rows
#: take legendre_gram's panel backward (its GEMM tiles q, at the price of an (R, n) fp32 panel in HBM).
MAX_RESIDENT_Q = 256


def resident_ok(q: int) -> bool:
    """Whether rows of length ``q`` take the rows-resident backward by default (see MAX_RESIDENT_Q)."""
    return q <= 128 or (q <= MAX_RESIDENT_Q and q % 16 == 0)
#: Programs the rows-resident backward aims at (4 per SM of an H100/H200): few row tiles (small n) are
#: split over the columns, each split writing an (n, q) fp32 partial (at most ~35 MiB at q = 256).
_RESIDENT_TARGET_PROGRAMS = 4 * 132


def _resident_config(dtype: torch.dtype, q: int) -> dict:
    """Blocks of the rows-resident backward (sm_90 compiles, tests/sm90_compile.py: spill-free under
    Triton 3.6 and 3.8, one program of 8 warps per SM): 64-row tiles, the (64, q) fp32 accumulator over
    8 warps; 64-wide column tiles up to q = 128, 16-wide at q = 256 (wider ones spill); K-steps over q
    of 64 for 16-bit rows (32 at q = 256), 16 for fp32 (tf32x3 spills at 32).  Interpreter: 32-wide, so test shapes
    span several tiles."""
    bq = max(16, triton.next_power_of_2(q))
    if interpreting():
        return dict(bm=32, bn=32, bk=32, bq=bq, warps=4, stages=1, red_r=32, red_q=min(bq, 64))
    half = dtype in (torch.float16, torch.bfloat16)
    return dict(bm=64, bn=64 if bq <= 128 else 16, bk=(64 if bq <= 128 else 32) if half else 16, bq=bq,
                warps=8 if bq > 64 else 4,
                stages=2, red_r=32, red_q=min(bq, 128))


def resident_splits(n: int, block_m: int, block_n: int, views: int = 1, slots: int = 0) -> tuple[int, int]:
    """``(splits, column tiles per split)`` of the rows-resident backward of ``views`` stacked views of
    ``n`` rows: one split (no partials, no split reduce) when the row tiles alone fill ``slots``
    program slots (the SMs, where a program takes a whole SM: 8 warps of > 128 registers) at >= 90%
    wave efficiency, else enough programs for ``_RESIDENT_TARGET_PROGRAMS`` (whole splits of equal
    length but the last)."""
    num_m, num_n = views * triton.cdiv(n, block_m), triton.cdiv(n, block_n)
    if slots and num_m >= 0.9 * triton.cdiv(num_m, slots) * slots:
        return 1, num_n
    want = max(1, min(num_n, triton.cdiv(_RESIDENT_TARGET_PROGRAMS, num_m)))
    per = triton.cdiv(num_n, want)
    return triton.cdiv(num_n, per), per


def _check_z(z: Tensor, exclude_diagonal: bool) -> None:
    check_tensor(z, "z", min_ndim=2, min_rows=2 if exclude_diagonal else 1, min_cols=1)
    if z.dim() > 3 or (z.dim() == 3 and z.shape[0] < 1):
        raise ValueError(f"z: expected one view (n, q) or a batch of views (P, n, q) with P >= 1, got shape "
                         f"{tuple(z.shape)}")
    if z.dtype not in _SUPPORTED:
        raise TypeError(f"z: the Triton kernel takes float32, float16 or bfloat16, got dtype {z.dtype} "
                        "(gaussian_gram_logmean computes float64 with torch)")


def _flat(z: Tensor) -> tuple[Tensor, int, int, int]:
    """``(zf, P, n, q)``: the views stacked as the rows of one ``(P n, q)`` matrix (a view of ``z`` when
    its strides allow, else a copy; a single ``(n, q)`` view is taken as it is)."""
    if z.dim() == 2:
        return z, 1, z.shape[0], z.shape[1]
    P, n, q = z.shape
    return z.reshape(P * n, q), P, n, q


def _row_scales(z: Tensor, normalize: bool, cfg: dict) -> tuple[Tensor, Tensor]:
    n, q = z.shape
    rinv = torch.empty(n, device=z.device, dtype=torch.float32)
    proj = torch.empty(n, device=z.device, dtype=torch.float32)
    wrap_triton(_row_scales_kernel)[(triton.cdiv(n, cfg["row_block"]),)](
        z, rinv, proj,
        z.stride(0), z.stride(1),
        n, q,
        EPS=_EPS, NORMALIZE=normalize, BLOCK_R=cfg["row_block"], BLOCK_Q=cfg["row_q"],
        num_warps=4,
    )
    return rinv, proj


def gaussian_gram_forward(
    z: Tensor, t: float, normalize: bool = True, exclude_diagonal: bool = True, input_precision: str = "tf32x3",
    *, return_scales: bool = False,
) -> tuple[Tensor, ...]:
    """``(L, stats)``: the log-mean as fp32 (0-dim for ``z`` of shape ``(n, q)``, ``(P,)`` for ``P``
    views ``(P, n, q)``, all views in one launch per stage) and the fp32 statistics ``(m, S')`` of the
    module docstring, shape ``(2,)`` or ``(P, 2)``; ``return_scales=True`` appends the row scales
    ``(r, proj)``, each ``(P n,)`` fp32, which :func:`gaussian_gram_backward` takes as ``scales``
    instead of recomputing them.  No autograd (see :func:`gaussian_gram_logmean`)."""
    _check_z(z, exclude_diagonal)
    zf, P, n, q = _flat(z)
    cfg = _config(z.dtype, q, n, _num_sms(z.device), input_precision)
    rinv, proj = _row_scales(zf, normalize, cfg)
    tiles = triton.cdiv(n, cfg["fwd_block"])
    num_parts = tiles * (tiles + 1) // 2
    mpart = torch.empty(P * num_parts, device=z.device, dtype=torch.float32)
    spart = torch.empty(P * num_parts, device=z.device, dtype=torch.float32)
    wrap_triton(_gram_lse_kernel)[(P * num_parts,)](
        zf, rinv, mpart, spart,
        zf.stride(0), zf.stride(1),
        n, q, 2.0 * float(t), num_parts,
        EXCLUDE=exclude_diagonal, NORMALIZE=normalize, BLOCK=cfg["fwd_block"], BLOCK_K=cfg["fwd_k"],
        DOT_F32=interpreting() and z.dtype != torch.float32,
        INPUT_PRECISION=_input_precision(z.dtype, input_precision),
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    out = torch.empty(z.shape[:-2], device=z.device, dtype=torch.float32)
    stats = torch.empty((*z.shape[:-2], 2), device=z.device, dtype=torch.float32)
    wrap_triton(_lse_reduce_kernel)[(P,)](mpart, spart, out, stats, num_parts, n, EXCLUDE=exclude_diagonal,
                                         BLOCK=1024, num_warps=4)
    return (out, stats, rinv, proj) if return_scales else (out, stats)


def gaussian_gram_backward(
    grad: Tensor,
    z: Tensor,
    stats: Tensor,
    t: float,
    normalize: bool = True,
    exclude_diagonal: bool = True,
    input_precision: str = "tf32x3",
    *,
    panel_rows: int | None = None,
    resident: bool | None = None,
    scales: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``grad * dL/dz`` (shape and dtype of ``z``) for the upstream gradient ``grad`` (0-dim, or ``(P,)``
    for ``P`` views) and the forward's ``stats``, recomputing the Gram tiles: rows resident (the
    default ``resident=None`` where :func:`resident_ok`; all views in one launch per stage), else panel
    by panel (``panel_rows`` rows at a time, view by view; default legendre_gram's
    :func:`panel_rows_for`).  ``scales``: the forward's row scales (``return_scales=True``); ``None``
    recomputes them (one launch)."""
    _check_z(z, exclude_diagonal)
    zf, P, n, q = _flat(z)
    cfg = _config(z.dtype, q, n, _num_sms(z.device), input_precision)
    rinv, proj = _row_scales(zf, normalize, cfg) if scales is None else scales
    dot_f32 = interpreting() and z.dtype != torch.float32
    prec = _input_precision(z.dtype, input_precision)
    mode = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[z.dtype]
    grad = grad.reshape(P)
    stats = stats.reshape(P, 2).contiguous()
    if resident is None:
        resident = resident_ok(q) and panel_rows is None
    if resident:
        if q > MAX_RESIDENT_Q:
            raise ValueError(f"resident: rows of q <= {MAX_RESIDENT_Q} only, got q = {q}")
        rc = _resident_config(z.dtype, q)
        slots = _num_sms(z.device) if rc["warps"] == 8 else 0  # 8 warps: one program per SM
        splits, per = resident_splits(n, rc["bm"], rc["bn"], P, slots)
        fused = splits == 1
        out = torch.empty((P * n, q), device=z.device, dtype=z.dtype)
        # one split: dz written by the kernel itself (part / dpart unused: placeholders)
        part = out if fused else torch.empty((splits, P * n, q), device=z.device, dtype=torch.float32)
        dpart = rinv if fused else torch.empty((splits, P * n), device=z.device, dtype=torch.float32)
        pst = (0, out.stride(0), out.stride(1)) if fused else part.stride()
        dst = (0, 1) if fused else dpart.stride()
        round_bf16 = dot_f32 and z.dtype == torch.bfloat16
        wrap_triton(_resident_backward_kernel)[(P * triton.cdiv(n, rc["bm"]) * splits,)](
            zf, rinv, proj, stats, part, dpart, grad, out,
            zf.stride(0), zf.stride(1), pst[0], pst[1], pst[2], dst[0], dst[1], grad.stride(0), out.stride(0),
            out.stride(1),
            n, q, 2.0 * float(t), per,
            EXCLUDE=exclude_diagonal, NORMALIZE=normalize, MODE=mode,
            BLOCK_M=rc["bm"], BLOCK_N=rc["bn"], BLOCK_K=rc["bk"], BLOCK_Q=rc["bq"],
            DOT_F32=dot_f32, INPUT_PRECISION=prec, FUSED=fused, ROUND_BF16=round_bf16, BATCHED=P > 1,
            num_warps=rc["warps"], num_stages=rc["stages"],
        )
        if fused:
            return out.reshape(z.shape)
        grid = (triton.cdiv(P * n, rc["red_r"]) * triton.cdiv(q, rc["red_q"]),)
        wrap_triton(_split_reduce_kernel)[grid](
            part, dpart, zf, rinv, proj, stats, grad, out,
            part.stride(0), part.stride(1), part.stride(2), dpart.stride(0), dpart.stride(1),
            zf.stride(0), zf.stride(1), out.stride(0), out.stride(1), grad.stride(0),
            P * n, q, splits, 2.0 * float(t), n,
            NORMALIZE=normalize, BLOCK_R=rc["red_r"], BLOCK_Q=rc["red_q"],
            ROUND_BF16=round_bf16,
            num_warps=4,
        )
        return out.reshape(z.shape)
    rows = panel_rows_for(n, cfg["mm_m"]) if panel_rows is None else min(n, int(panel_rows))
    num_dparts = triton.cdiv(n, cfg["dphi_n"])
    panel = torch.empty((rows, n), device=z.device, dtype=torch.float32)
    dpart = torch.empty((rows, num_dparts), device=z.device, dtype=torch.float32)
    scale = torch.empty((), device=z.device, dtype=torch.float32)
    out = torch.empty((P * n, q), device=z.device, dtype=z.dtype)
    for b in range(P):  # view by view (rows wider than MAX_RESIDENT_Q: the products dominate)
        zb, rb, pb, ob = zf[b * n:(b + 1) * n], rinv[b * n:(b + 1) * n], proj[b * n:(b + 1) * n], out[b * n:(b + 1) * n]
        sb, gb = stats[b], grad[b]
        for row0 in range(0, n, rows):
            nrows = min(rows, n - row0)
            grid1 = (triton.cdiv(nrows, cfg["block"]) * num_dparts,)
            wrap_triton(_gram_weights_kernel)[grid1](
                zb, rb, pb, sb, gb, scale, panel, dpart,
                zb.stride(0), zb.stride(1), panel.stride(0), panel.stride(1), dpart.stride(0), dpart.stride(1),
                n, q, row0, nrows, 2.0 * float(t),
                EXCLUDE=exclude_diagonal, NORMALIZE=normalize,
                BLOCK_M=cfg["block"], BLOCK_N=cfg["dphi_n"], BLOCK_K=cfg["dphi_k"], GROUP_M=cfg["group"],
                DOT_F32=dot_f32, INPUT_PRECISION=prec,
                num_warps=cfg["warps"], num_stages=cfg["stages"],
            )
            grid2 = (triton.cdiv(nrows, cfg["mm_m"]) * triton.cdiv(q, cfg["mm_q"]),)
            wrap_triton(_panel_matmul_kernel)[grid2](
                panel, zb, rb, pb, dpart, scale, ob,
                panel.stride(0), panel.stride(1), zb.stride(0), zb.stride(1), dpart.stride(0), dpart.stride(1),
                ob.stride(0), ob.stride(1),
                n, q, row0, nrows, num_dparts,
                NORMALIZE=normalize, MODE=mode,
                BLOCK_M=cfg["mm_m"], BLOCK_Q=cfg["mm_q"], BLOCK_K=cfg["mm_k"], BLOCK_T=32, GROUP_M=cfg["group"],
                DOT_F32=dot_f32, INPUT_PRECISION=prec, SCALE_GIVEN=True,
                num_warps=cfg["warps"], num_stages=cfg["stages"],
            )
    return out.reshape(z.shape)


# ==================================================================================================
# torch math of the two ops (their CPU kernels when the interpreter is off; float64 inputs)
# ==================================================================================================


def _unit_rows(z: Tensor, normalize: bool) -> tuple[Tensor, Tensor | None]:
    if not normalize:
        return z, None
    norm = z.norm(dim=1, keepdim=True)
    return z / norm.clamp_min(_EPS), norm


def _chunk(n: int) -> int:
    return max(1, min(n, (1 << 22) // max(n, 1)))  # row blocks of <= 4 Mi Gram entries


def _torch_forward(z: Tensor, t: float, normalize: bool, exclude_diagonal: bool) -> tuple[Tensor, Tensor]:
    """The forward's math in torch, blocked over rows (O(n q + 4 Mi) memory), in fp32 (float64 for
    float64 inputs): the same (m, S') statistics."""
    cd = torch.float64 if z.dtype == torch.float64 else torch.float32
    zh, _ = _unit_rows(z.detach().to(cd), normalize)
    n = zh.shape[0]
    c = _chunk(n)
    ms, ss = [], []
    for s in range(0, n, c):
        gb = zh[s:s + c] @ zh.t()
        x = (2.0 * t) * ((gb.clamp_max(1.0) if normalize else gb) - 1.0)
        if exclude_diagonal:
            idx = torch.arange(x.shape[0], device=x.device)
            x[idx, s + idx] = _NEG_INF
        mp = x.max()
        ms.append(mp)
        ss.append(torch.exp(x - mp).sum())
    mpart, spart = torch.stack(ms), torch.stack(ss)
    m = mpart.max()
    total = (spart * torch.exp(mpart - m)).sum()
    log_c = math.log(n) + math.log(n - 1) if exclude_diagonal else 2.0 * math.log(n)
    value = torch.where(m == _NEG_INF, torch.full_like(m, math.nan), m + torch.log(total) - log_c)
    return value, torch.stack([m, total])


def _torch_backward(grad: Tensor, z: Tensor, stats: Tensor, t: float, normalize: bool,
                    exclude_diagonal: bool) -> Tensor:
    cd = torch.float64 if z.dtype == torch.float64 else torch.float32
    zh, norm = _unit_rows(z.detach().to(cd), normalize)
    n = zh.shape[0]
    m, total = stats.to(cd)[0], stats.to(cd)[1]
    c = _chunk(n)
    g = torch.empty_like(zh)
    for s in range(0, n, c):
        gb = zh[s:s + c] @ zh.t()
        w = torch.exp((2.0 * t) * ((gb.clamp_max(1.0) if normalize else gb) - 1.0) - m)
        if exclude_diagonal:
            idx = torch.arange(w.shape[0], device=w.device)
            w[idx, s + idx] = 0.0
        g[s:s + c] = w @ zh
    g = g * (grad.to(cd) * (4.0 * t) / total)
    if normalize:
        radial = (zh * g).sum(dim=1, keepdim=True)
        g = torch.where(norm >= _EPS, (g - zh * radial) / norm, g / _EPS)
    return g.to(z.dtype)


def _torch_scales(z: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """The row scales ``(r, proj)`` of ``_row_scales_kernel`` over the ``(P n,)`` stacked rows, in torch."""
    zf = _flat(z)[0].detach().float()
    if not normalize:
        return torch.ones(zf.shape[0], device=z.device), torch.zeros(zf.shape[0], device=z.device)
    norm = zf.norm(dim=1)
    rinv = 1.0 / norm.clamp_min(_EPS)
    return rinv, torch.where(norm >= _EPS, rinv * rinv, torch.zeros_like(rinv))


def _torch_forward_views(z: Tensor, t: float, normalize: bool, exclude_diagonal: bool) -> tuple[Tensor, Tensor]:
    """:func:`_torch_forward` of one view ``(n, q)`` or of each view of ``(P, n, q)`` (stacked)."""
    if z.dim() == 2:
        return _torch_forward(z, t, normalize, exclude_diagonal)
    vals, stats = zip(*(_torch_forward(zb, t, normalize, exclude_diagonal) for zb in z.unbind(0)))
    return torch.stack(vals), torch.stack(stats)


def _torch_backward_views(grad: Tensor, z: Tensor, stats: Tensor, t: float, normalize: bool,
                          exclude_diagonal: bool) -> Tensor:
    if z.dim() == 2:
        return _torch_backward(grad, z, stats, t, normalize, exclude_diagonal)
    return torch.stack([_torch_backward(grad.reshape(-1)[b], z[b], stats.reshape(-1, 2)[b], t, normalize,
                                        exclude_diagonal) for b in range(z.shape[0])])


# ==================================================================================================
# torch.library registration and autograd
# ==================================================================================================


# The op takes one view (n, q) or P views (P, n, q) and returns (value, stats, r, proj): the row scales
# are saved for the backward (no second row-scales launch there).
def _forward_impl(z: Tensor, t: float, normalize: bool, exclude_diagonal: bool,
                  input_precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return gaussian_gram_forward(z, t, normalize, exclude_diagonal, input_precision, return_scales=True)


def _backward_impl(grad: Tensor, z: Tensor, stats: Tensor, rinv: Tensor, proj: Tensor, t: float, normalize: bool,
                   exclude_diagonal: bool, input_precision: str) -> Tensor:
    return gaussian_gram_backward(grad, z, stats, t, normalize, exclude_diagonal, input_precision,
                                  scales=(rinv, proj))


@triton_op("kernelssl::gaussian_gram_logmean", mutates_args=())
def _logmean_op(z: Tensor, t: float, normalize: bool, exclude_diagonal: bool,
                input_precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(z, t, normalize, exclude_diagonal, input_precision)


@triton_op("kernelssl::gaussian_gram_logmean_backward", mutates_args=())
def _logmean_backward_op(grad: Tensor, z: Tensor, stats: Tensor, rinv: Tensor, proj: Tensor, t: float,
                         normalize: bool, exclude_diagonal: bool, input_precision: str) -> Tensor:
    return _backward_impl(grad, z, stats, rinv, proj, t, normalize, exclude_diagonal, input_precision)


@_logmean_op.register_kernel("cpu")
def _logmean_cpu(z, t, normalize, exclude_diagonal, input_precision):
    if interpreting():  # wrap_triton hands interpreted kernels back unwrapped: a direct launch
        return _forward_impl(z, t, normalize, exclude_diagonal, input_precision)
    return (*_torch_forward_views(z, t, normalize, exclude_diagonal), *_torch_scales(z, normalize))


@_logmean_backward_op.register_kernel("cpu")
def _logmean_backward_cpu(grad, z, stats, rinv, proj, t, normalize, exclude_diagonal, input_precision):
    if interpreting():
        return _backward_impl(grad, z, stats, rinv, proj, t, normalize, exclude_diagonal, input_precision)
    return _torch_backward_views(grad, z, stats, t, normalize, exclude_diagonal)


@_logmean_op.register_fake
def _logmean_fake(z, t, normalize, exclude_diagonal, input_precision):
    rows = z.shape[0] * z.shape[1] if z.dim() == 3 else z.shape[0]
    return (z.new_empty(z.shape[:-2], dtype=torch.float32), z.new_empty((*z.shape[:-2], 2), dtype=torch.float32),
            z.new_empty((rows,), dtype=torch.float32), z.new_empty((rows,), dtype=torch.float32))


@_logmean_backward_op.register_fake
def _logmean_backward_fake(grad, z, stats, rinv, proj, t, normalize, exclude_diagonal, input_precision):
    return z.new_empty(z.shape)


_logmean_op.register_torch_dispatch(FunctionalTensorMode, _decompose_on_cuda(_forward_impl, 0))
_logmean_backward_op.register_torch_dispatch(FunctionalTensorMode, _decompose_on_cuda(_backward_impl, 1))


def _setup_context(ctx, inputs, output):
    z, t, normalize, exclude_diagonal, input_precision = inputs
    _, stats, rinv, proj = output
    ctx.save_for_backward(z, stats, rinv, proj)
    ctx.mark_non_differentiable(stats, rinv, proj)
    ctx.set_materialize_grads(False)
    ctx.t, ctx.normalize, ctx.exclude_diagonal, ctx.input_precision = t, normalize, exclude_diagonal, input_precision


_NO_DOUBLE_BACKWARD = (
    "gaussian_gram_logmean (backend='triton'): double backward (create_graph=True) is not supported by "
    "the fused kernels; use backend='torch' under torch.func, or kernelssl.uniformity."
    "gaussian_gram_logmean_eager (plain autograd), for higher derivatives"
)


def _backward(ctx, grad, _grad_stats, _grad_rinv, _grad_proj):
    if torch.is_grad_enabled():
        raise RuntimeError(_NO_DOUBLE_BACKWARD)
    if not ctx.needs_input_grad[0] or grad is None:
        return None, None, None, None, None
    z, stats, rinv, proj = ctx.saved_tensors
    dz = _logmean_backward_op(grad, z, stats, rinv, proj, ctx.t, ctx.normalize, ctx.exclude_diagonal,
                              ctx.input_precision)
    return dz, None, None, None, None


_logmean_op.register_autograd(_backward, setup_context=_setup_context)


class _Float64(torch.autograd.Function):
    """float64 inputs: the same algorithm in torch, float64 end to end (no Triton kernel)."""

    @staticmethod
    def forward(ctx, z, t, normalize, exclude_diagonal):
        value, stats = _torch_forward(z, t, normalize, exclude_diagonal)
        ctx.save_for_backward(z, stats)
        ctx.args = (t, normalize, exclude_diagonal)
        return value

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # the saved (m, S') are constants: a second derivative would be wrong
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        z, stats = ctx.saved_tensors
        return _torch_backward(grad, z, stats, *ctx.args), None, None, None


# ==================================================================================================
# entry point (called by kernelssl.functional.gaussian_gram_logmean / uniformity, backend="triton")
# ==================================================================================================


def gaussian_gram_logmean(
    z: Tensor,
    t: float = 2.0,
    *,
    normalize: bool = True,
    exclude_diagonal: bool = True,
    input_precision: str | None = None,
) -> Tensor:
    """``log( mean_{i != j} exp(2t (zhat_i . zhat_j - 1)) )`` with the fused kernels (module docstring);
    Wang & Isola's uniformity ``log mean_{i<j} exp(-t ||zhat_i - zhat_j||^2)`` when
    ``exclude_diagonal=True`` (default), else the mean over all ``n^2`` pairs.

    Args:
        z: ``(n, q)``, float32 / float16 / bfloat16 (CUDA, or CPU under ``TRITON_INTERPRET=1``); n >= 2
            (n >= 1 with the diagonal included), q >= 1.  float64 is computed by the same algorithm in
            torch, float64 end to end, and returned as float64.  Or ``P`` views of equal shape stacked,
            ``(P, n, q)``: the ``P`` log-means, each view's own (bitwise the per-view calls' on the
            Triton path), all views in one launch per stage (Wang & Isola's loss: P = 2).
        t: the potential's scale, a finite number > 0 (Wang & Isola's default 2).
        normalize: L2-normalise the rows first (fused into the kernels); False: the rows are taken as
            given (unit rows expected: the formula is ``exp(2t(z_i . z_j - 1))`` either way).
        exclude_diagonal: average over the ``n(n-1)`` pairs ``i != j`` (True) or all ``n^2``.
        input_precision: the fp32 Gram tiles' and backward product's precision (SPEC §4):
            ``"tf32x3"``, ``"ieee"`` or ``"tf32"``; ``None`` (default) is ``"tf32"`` when torch's
            ``torch.backends.cuda.matmul.allow_tf32`` is on, else ``"tf32x3"``.  No effect on fp16/bf16.

    Returns a 0-dim float32 tensor (``(P,)`` for ``(P, n, q)``; float64 for float64 ``z``);
    differentiable in ``z`` (gradient in z's dtype), deterministic, finite for any t > 0 (log-sum-exp).
    Double backward is not supported.
    NaN in ``z`` propagates to the value and the gradient.
    """
    prec = resolve_precision(input_precision)
    t = check_positive(t, "t")
    normalize = check_bool(normalize, "normalize")
    exclude_diagonal = check_bool(exclude_diagonal, "exclude_diagonal")
    check_tensor(z, "z", min_ndim=2, min_rows=2 if exclude_diagonal else 1, min_cols=1)
    if z.dim() > 3 or (z.dim() == 3 and z.shape[0] < 1):
        raise ValueError(f"z: expected one view (n, q) or a batch of views (P, n, q) with P >= 1, got shape "
                         f"{tuple(z.shape)}")
    if z.dtype == torch.float64:
        if z.dim() == 3:
            return torch.stack([_Float64.apply(zb, t, normalize, exclude_diagonal) for zb in z.unbind(0)])
        return _Float64.apply(z, t, normalize, exclude_diagonal)
    return _logmean_op(z, t, normalize, exclude_diagonal, prec)[0]
