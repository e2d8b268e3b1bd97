"""Fused Triton kernels for SFRIK's Legendre-polynomial Gram accumulation (SPEC §2.2), forward and backward.

    M(Z) = (1/n^2) sum_{i,j} phi(G_ij),   G_ij = zhat_i . zhat_j,   phi(t) = sum_{l=1..L} b_l P_l(q; t)

with ``zhat_i = z_i / max(||z_i||, 1e-12)`` (``normalize=True``, fused: see below) or the rows as given,
``P_l(q; .)`` the Legendre polynomial in dimension q (``P_l(q; 1) = 1``), diagonal included.  Never an
``n x n`` matrix in the forward; in the backward a bounded row panel of ``phi'(G)`` (see "Backward").

Normalisation is fused, not done in torch: a row kernel computes ``r_i = 1/max(||z_i||, eps)`` in fp32
(O(n q) read) and every Gram tile is formed from the *raw* rows in their own dtype, ``G_ij = r_i r_j
(z_i . z_j)``.  For fp16/bf16 inputs the products in ``tl.dot`` are then exact and accumulate in fp32
(tensor cores), so the kernel sees the same rounded inputs as the torch path, which upcasts them.

Forward (``legendre_gram_forward``), 2 kernels + the row kernel:
  * ``_gram_phi_sum_kernel``: one program per lower-triangular ``(BLOCK, BLOCK)`` tile ``(I, J), J <= I``
    of the Gram matrix (``T(T+1)/2`` programs, ``T = cdiv(n, BLOCK)``; G is symmetric, so off-diagonal
    tiles are weighted by 2: ``n^2 q`` FLOPs instead of ``2 n^2 q``).  K-loop over q with ``tl.dot`` into
    an fp32 accumulator, epilogue in registers: scale by ``r_i r_j``, the Legendre recurrence for any
    degree L, a masked tile sum -> one fp32 partial per program.
  * ``_sum_partials_kernel``: one program sums the partials in a fixed order and divides by n^2.
  Deterministic (no atomics), memory O(n q + n^2 / BLOCK^2).

Backward (``legendre_gram_backward``), recomputing the Gram tiles (nothing but ``z`` is saved)::

    dM/dzhat_k = (2/n^2) sum_j phi'(G_kj) zhat_j,   dz_k = r_k (g_k - zhat_k (zhat_k . g_k))   (||z_k|| >= eps)

  Row panels of ``R`` rows (all n rows when ``n^2 <= 2^25``, else ``max(1024, 2^25 / n)`` rows):
  * ``_gram_dphi_kernel`` (grid: panel tiles x column tiles): the Gram tile again, then
    ``P_kj = phi'(G_kj) r_j`` stored to an fp32 ``(R, n)`` panel buffer, and per-(row, column-tile)
    partials of ``d_k = sum_j phi'(G_kj) G_kj`` (= ``zhat_k . g_k`` up to the factor ``2/n^2``).
  * ``_panel_matmul_kernel`` (grid: panel tiles x q tiles): ``acc = P_panel @ Z`` (a plain GEMM with
    K = n), epilogue ``dz_k = (2 g / n^2) (r_k acc_k - r_k^2 d_k z_k)`` (the normalisation Jacobian; the
    projection is dropped for rows below eps, as autograd does for ``F.normalize``), cast to the input dtype.
  Why a panel and not a fully fused flash-attention loop: the output row ``dz_k`` is q wide (8192 to
  32768), so it cannot stay in registers across the j loop as flash-attention's ``dQ`` (head dim <= 256)
  does; a fused kernel would read-modify-write a ``(BLOCK, q)`` fp32 output slab per Gram tile
  (~40 FLOP/byte), whereas the panel's extra traffic is ``8 R n`` bytes against ``4 R n q`` FLOPs
  (q/2 FLOP/byte).  Memory: ``4 R n`` bytes (16 MiB at n = 2048; 512 MiB at n = 131072): the whole
  n x n panel only while it is at most 128 MiB (n <= 5792), never beyond.  The phi' tile is 128 x 64
  (the joint value/derivative recurrence spills registers at 128 x 128); the GEMM tile 128 x 128.

Precision (SPEC §4): Gram products of fp16/bf16 rows go to the tensor cores as they are (exact
products, fp32 accumulation); fp32 rows use the op's ``input_precision``: ``"tf32x3"`` by default (three
TF32 tensor-core products per fp32 product, fp32-level error: ``tests/test_triton_legendre_gram.py``
emulates it at the paper shape), ``"ieee"`` (FMA units) or ``"tf32"`` (the default only when torch's
``torch.backends.cuda.matmul.allow_tf32`` is on).  The backward GEMM ``P @ Z`` keeps
``P`` at (near) fp32 precision on tensor cores: bf16 inputs split ``P = P_hi + P_lo`` into two bf16
parts (2 bf16 MMAs, ``|P - P_hi - P_lo| <~ 2^-17 |P|``); fp16 inputs, whose exponent range is too narrow
for the split, round ``P`` to two TF32 parts and multiply the fp16 rows converted to fp32, exact in TF32
(2 TF32 MMAs, ``<~ 2^-22 |P|``).  Both are far below the final rounding of the gradient to the input
dtype (2^-9 / 2^-12).  float64 inputs are not handled here: :func:`legendre_gram_mean` sends them to the
torch path (float64 end to end).

Interpreter (``TRITON_INTERPRET=1``, CPU tests): its ``tl.dot`` on bf16 operands is wrong, so the
operands of every dot are converted to fp32 first when interpreting (``DOT_F32``); half-precision
products are exact in fp32, so this computes what the tensor cores compute.  Its fp32 -> bf16 cast
truncates where the GPU rounds to nearest even, so when interpreting, the bf16 split and the final bf16
store round with integer ops (``_round_bf16``).  Block sizes are small (32, phi' tiles 32 x 16).

Registration: ``kernelssl::legendre_gram_mean`` and ``kernelssl::legendre_gram_mean_backward`` are
``torch.library.triton_op``s (autograd through ``register_autograd``, the backward itself an op), each
with a CPU kernel (the interpreter when ``TRITON_INTERPRET=1``, else the torch math) and an explicit
fake.  Under ``torch.compile`` on CUDA they decompose into their kernels (inductor sees them); on CPU or
under the interpreter (whose kernels cannot be captured) they stay one opaque call each.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.library import triton_op

from .. import sfrik as _sfrik
from .._backend import interpreting, resolve_precision
from .._checks import check_coefficients, check_tensor
from ._launch import wrap_triton

__all__ = [
    "legendre_gram_mean",
    "legendre_gram_forward",
    "legendre_gram_backward",
    "panel_rows_for",
]

_EPS = 1e-12  # F.normalize's default clamp of the row norm
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)

#: Backward panel: all rows when n^2 <= _PANEL_ELEMENTS, else max(_MIN_PANEL_ROWS, _PANEL_ELEMENTS // n)
#: rows (a multiple of 128), so the fp32 panel of phi'(G) is 128 MiB, or 4 KiB per row of z at most.
_PANEL_ELEMENTS = 1 << 25
_MIN_PANEL_ROWS = 1024


# ==================================================================================================
# kernels
# ==================================================================================================


# r_i = 1 / max(||z_i||, eps); proj_i = r_i^2 where ||z_i|| >= eps, else 0 (below the clamp the
# normalisation is z / eps, linear, no projection).  normalize=False: r = 1, proj = 0.
# Backward: none (r and proj are recomputed by the backward launcher; the Jacobian is applied there).
@triton.jit
def _row_scales_kernel(
    z_ptr, rinv_ptr, proj_ptr,
    stride_zn, stride_zq,
    n, q,
    EPS: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    if NORMALIZE:
        ss = tl.zeros([BLOCK_R], dtype=tl.float32)
        cols0 = tl.arange(0, BLOCK_Q)
        for q0 in range(0, q, BLOCK_Q):
            cols = q0 + cols0
            x = tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :] * stride_zq,
                        mask=rmask[:, None] & (cols[None, :] < q), other=0.0).to(tl.float32)
            ss += tl.sum(x * x, axis=1)
        norm = tl.sqrt(ss)
        rinv = 1.0 / tl.maximum(norm, EPS)
        proj = tl.where(norm >= EPS, rinv * rinv, 0.0)
    else:
        rinv = tl.full([BLOCK_R], 1.0, dtype=tl.float32)
        proj = tl.zeros([BLOCK_R], dtype=tl.float32)
    tl.store(rinv_ptr + rows, rinv, mask=rmask)
    tl.store(proj_ptr + rows, proj, mask=rmask)


# acc[a, b] = sum_k z[rows_a, k] z[cols_b, k]  (a tile of Z Z^T; raw rows, fp32 accumulation).
@triton.jit
def _gram_tile(
    z_ptr, rows, cols, rmask, cmask,
    stride_zn, stride_zq,
    q,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = z_ptr + rows[:, None] * stride_zn + ks[None, :] * stride_zq  # (BLOCK_M, BLOCK_K)
    b_ptrs = z_ptr + cols[None, :] * stride_zn + ks[:, None] * stride_zq  # (BLOCK_K, BLOCK_N) = Z[cols]^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, q, BLOCK_K):
        kmask = (k0 + ks) < q
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if DOT_F32:  # interpreter: exact upcast of half operands (its bf16 dot is wrong)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_zq
        b_ptrs += BLOCK_K * stride_zq
    return acc


# Recurrence constants of P_{l+1} = alpha_l t P_l - beta_l P_{l-1} in dimension q (computed in fp64,
# rounded once to fp32): alpha_l = (2l + q - 2)/(l + q - 2), beta_l = l/(l + q - 2).
@triton.jit
def _alpha_beta(q, l: tl.constexpr):
    qd = q.to(tl.float64)
    den = qd + (l - 2)
    alpha = ((qd + (2 * l - 2)) / den).to(tl.float32)
    beta = (l / den).to(tl.float32)
    return alpha, beta


# phi(t) = sum_{l=1..L} b_l P_l(q; t), elementwise on a register tile, by the recurrence.
# (static_range unrolls, so P_0 = 1 starts as a scalar: one register tile fewer in the epilogue.)
@triton.jit
def _phi(t, q, COEF: tl.constexpr, L: tl.constexpr):
    val = COEF[0] * t
    p_prev = 1.0
    p = t
    for l in tl.static_range(1, L):
        alpha, beta = _alpha_beta(q, l)
        p_next = alpha * t * p - beta * p_prev
        val += COEF[l] * p_next
        p_prev = p
        p = p_next
    return val


# phi'(t) = sum_{l=1..L} b_l P'_l(q; t) by the joint recurrence
# P'_{l+1} = alpha_l (P_l + t P'_l) - beta_l P'_{l-1}   (P'_0 = 0, P'_1 = 1).
# (P_0 = 1, P'_0 = 0, P'_1 = 1 start as scalars, so the l = 1 step costs no extra register tiles.)
@triton.jit
def _phi_prime(t, q, COEF: tl.constexpr, L: tl.constexpr):
    if L == 1:
        der = tl.full(t.shape, COEF[0], tl.float32)
    else:
        der = COEF[0]
        p_prev = 1.0
        p = t
        d_prev = 0.0
        d = 1.0
        for l in tl.static_range(1, L):
            alpha, beta = _alpha_beta(q, l)
            d_next = alpha * (p + t * d) - beta * d_prev
            der = der + COEF[l] * d_next
            if l + 1 < L:  # P_{l+1} is needed only by a later step
                p_next = alpha * t * p - beta * p_prev
                p_prev = p
                p = p_next
            d_prev = d
            d = d_next
    return der


# Grouped ("swizzled") program order over a (num_m, num_n) grid, for L2 reuse of row/column blocks.
@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    tm = first_m + (pid % in_group) % group_m
    tn = (pid % in_group) // group_m
    return tm, tn


# Forward.  Program p owns Gram tile (I, J), J <= I, p = I (I + 1)/2 + J:
#   part[p] = w_IJ sum_{i in I, j in J} phi(r_i r_j z_i . z_j),   w = 1 on the diagonal, 2 off it (G = G^T).
# Backward: see _gram_dphi_kernel / _panel_matmul_kernel (tiles recomputed, not stored).
@triton.jit
def _gram_phi_sum_kernel(
    z_ptr, rinv_ptr, part_ptr,
    stride_zn, stride_zq,
    n, q,
    COEF: tl.constexpr, L: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
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
    val = _phi(g, q, COEF, L)
    val = tl.where(rmask[:, None] & cmask[None, :], val, 0.0)  # phi(0) != 0: mask the padding
    s = tl.sum(tl.sum(val, axis=1), axis=0)
    w = tl.where(ti == tj, 1.0, 2.0)
    tl.store(part_ptr + pid, s * w)


# out = (sum_p part[p]) / n^2, in a fixed order (one program): the deterministic second stage.
@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, num_parts, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, num_parts, BLOCK):
        acc += tl.load(part_ptr + s + offs, mask=(s + offs) < num_parts, other=0.0)
    nf = tl.full([], 1.0, tl.float32) * n  # not n.to(): n == 1 arrives as a constant on a GPU
    tl.store(out_ptr, tl.sum(acc, axis=0) / (nf * nf))


# Backward, stage 1 (rows row0 .. row0 + panel_rows of the Gram matrix; tile (I, J)):
#   G_kj = r_k r_j z_k . z_j  (recomputed),  P[k - row0, j] = phi'(G_kj) r_j,
#   dpart[k - row0, J] = sum_{j in J} phi'(G_kj) G_kj        (-> zhat_k . dM/dzhat_k, up to 2/n^2)
#   NORMALIZE: the diagonal term j = k is dropped (P_kk = 0, no share in d_k) for rows with
#   ||z_k|| >= eps: its contribution phi'(1) zhat_k lies along zhat_k, so the Jacobian removes it
#   exactly, but computed it is r_k^2 phi'(G_kk) (1 - G_kk) z_k with G_kk = 1 +- ulps, the rounding
#   of the largest term (phi' peaks at t = 1) left over in a difference that may be tiny (q = 2, n = 2).
@triton.jit
def _gram_dphi_kernel(
    z_ptr, rinv_ptr, proj_ptr, p_ptr, dpart_ptr,
    stride_zn, stride_zq, stride_pm, stride_pn, stride_dm, stride_dn,
    n, q, row0, panel_rows,
    COEF: tl.constexpr, L: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
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
    dphi = _phi_prime(g, q, COEF, L)
    if NORMALIZE:
        projected = tl.load(proj_ptr + rows, mask=rmask, other=0.0) != 0.0
        dphi = tl.where((rows[:, None] == cols[None, :]) & projected[:, None], 0.0, dphi)
    mask = rmask[:, None] & cmask[None, :]
    tl.store(p_ptr + lrows[:, None] * stride_pm + cols[None, :] * stride_pn, dphi * r_j[None, :], mask=mask)
    if NORMALIZE:
        d = tl.sum(tl.where(mask, dphi * g, 0.0), axis=1)
        tl.store(dpart_ptr + lrows * stride_dm + tn * stride_dn, d, mask=rmask)


# Round fp32 to the nearest TF32 value (10 mantissa bits), exactly, with integer ops.
@triton.jit
def _round_tf32(x):
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)


# fp32 -> fp32 rounded to the nearest bf16 value (ties to even), with integer ops; NaN kept.  Used only
# under the interpreter, whose fp32 -> bf16 cast truncates (the GPU's rounds to nearest even).
@triton.jit
def _round_bf16(x):
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


# acc + p @ zt for an fp32 weight tile p and a tile zt of the rows in their dtype, P at (near) fp32
# precision on tensor cores -- MODE 0: fp32 zt, one dot at INPUT_PRECISION; 1: bf16 zt, p = p_hi + p_lo
# in bf16 (2 MMAs); 2: fp16 zt (exact in TF32), p = p_hi + p_lo rounded to TF32 (2 TF32 MMAs).
@triton.jit
def _panel_dot(p, zt, acc, MODE: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    if MODE == 0:
        acc = tl.dot(p, zt, acc, input_precision=INPUT_PRECISION)
    elif MODE == 1:
        if DOT_F32:  # interpreter: the same split with round-to-nearest-even, fp32 operands
            p_hi = _round_bf16(p)
            p_lo = _round_bf16(p - p_hi)
            zt = zt.to(tl.float32)
        else:
            p_hi = p.to(tl.bfloat16)
            p_lo = (p - p_hi.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(p_lo, zt, acc, input_precision=INPUT_PRECISION)
        acc = tl.dot(p_hi, zt, acc, input_precision=INPUT_PRECISION)
    else:
        zf = zt.to(tl.float32)
        p_hi = _round_tf32(p)
        p_lo = _round_tf32(p - p_hi)
        acc = tl.dot(p_lo, zf, acc, input_precision="tf32")
        acc = tl.dot(p_hi, zf, acc, input_precision="tf32")
    return acc


# Backward, stage 2 (panel rows k, q tile c):
#   acc_k = sum_j P[k, j] z_j                          (= sum_j phi'(G_kj) zhat_j; GEMM with K = n)
#   dz_k  = (2 g / n^2) (r_k acc_k - proj_k d_k z_k),  d_k = sum_J dpart[k, J], proj_k = r_k^2 or 0
#   (SCALE_GIVEN: grad_ptr holds the whole factor, here 2 g / n^2 -- gaussian_gram.py's panel writes its own)
# (the product by _panel_dot, MODE by z's dtype)
@triton.jit
def _panel_matmul_kernel(
    p_ptr, z_ptr, rinv_ptr, proj_ptr, dpart_ptr, grad_ptr, out_ptr,
    stride_pm, stride_pn, stride_zn, stride_zq, stride_dm, stride_dn, stride_on, stride_oq,
    n, q, row0, panel_rows, num_dparts,
    NORMALIZE: tl.constexpr, MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, SCALE_GIVEN: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tm, tc = _swizzle(pid, tl.cdiv(panel_rows, BLOCK_M), tl.cdiv(q, BLOCK_Q), GROUP_M)
    lrows = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row0 + lrows
    cols = tc * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rmask = lrows < panel_rows
    cmask = cols < q
    js0 = tl.arange(0, BLOCK_K)
    p_ptrs = p_ptr + lrows[:, None] * stride_pm + js0[None, :] * stride_pn
    z_ptrs = z_ptr + js0[:, None] * stride_zn + cols[None, :] * stride_zq
    acc = tl.zeros([BLOCK_M, BLOCK_Q], dtype=tl.float32)
    for j0 in range(0, n, BLOCK_K):
        jmask = (j0 + js0) < n
        p = tl.load(p_ptrs, mask=rmask[:, None] & jmask[None, :], other=0.0)
        zt = tl.load(z_ptrs, mask=jmask[:, None] & cmask[None, :], other=0.0)
        acc = _panel_dot(p, zt, acc, MODE, DOT_F32, INPUT_PRECISION)
        p_ptrs += BLOCK_K * stride_pn
        z_ptrs += BLOCK_K * stride_zn
    r_k = tl.load(rinv_ptr + rows, mask=rmask, other=0.0)
    res = acc * r_k[:, None]
    omask = rmask[:, None] & cmask[None, :]
    if NORMALIZE:
        ts0 = tl.arange(0, BLOCK_T)
        d = tl.zeros([BLOCK_M], dtype=tl.float32)
        for t0 in range(0, num_dparts, BLOCK_T):
            ts = t0 + ts0
            d += tl.sum(tl.load(dpart_ptr + lrows[:, None] * stride_dm + ts[None, :] * stride_dn,
                                mask=rmask[:, None] & (ts[None, :] < num_dparts), other=0.0), axis=1)
        proj = tl.load(proj_ptr + rows, mask=rmask, other=0.0)
        zk = tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :] * stride_zq, mask=omask,
                     other=0.0).to(tl.float32)
        res = res - (proj * d)[:, None] * zk
    if SCALE_GIVEN:
        scale = tl.load(grad_ptr).to(tl.float32)
    else:
        nf = tl.full([], 1.0, tl.float32) * n  # not n.to(): n == 1 arrives as a constant on a GPU
        scale = tl.load(grad_ptr).to(tl.float32) * (2.0 / (nf * nf))
    res = res * scale
    if DOT_F32 and MODE == 1:  # interpreter: round to nearest even before its truncating bf16 cast
        res = _round_bf16(res)
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_oq,
             res.to(out_ptr.dtype.element_ty), mask=omask)


# ==================================================================================================
# launchers
# ==================================================================================================


#: Streaming multiprocessors assumed when the launch is not on a CUDA device (the offline sm_90
#: compile of tests/sm90_compile.py records the GPU launches on CPU tensors): an H100/H200 SXM.
_DEFAULT_SMS = 132


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def _config(dtype: torch.dtype, q: int, n: int = 0, sms: int = _DEFAULT_SMS, precision: str = "tf32x3") -> dict:
    """Block sizes.  GPU: starting points for H100/H200, not tuned on a GPU (none was available);
    checked by compiling every kernel for sm_90 offline with the launch's own specialisation
    (``tests/sm90_compile.py``: no register spills in any variant, and the wave count of the headline
    forward).  Backward: 128 x 64 phi' tiles (the joint value/derivative recurrence spills registers
    at 128 x 128) and 128 x 128 GEMM tiles, 8 warps, 3 stages (wgmma for 16-bit and TF32 operands).
    K-steps of 64 for 16-bit operands, 32 where the MMA takes fp32 operands.

    Forward tiles (issue 11, finding 5): 128 x 128 Gram tiles need ~235-255 registers x 256 threads,
    one program per SM, and at the SFRIK headline shape (n = 2048) the T(T+1)/2 = 136 triangle tiles
    ran as a wave of 132 and a wave of 4 (52% wave efficiency).  64 x 64 tiles (8 warps, 76-114
    registers, two programs per SM by registers or by the 96 KiB of shared memory of the wider K-steps,
    see below) give 528 programs, two full waves of 264.  The larger tile (twice the arithmetic
    intensity) is kept where it has many waves anyway: ``T(T+1)/2 >= 8 * sms`` (tail <= 1/8).

    Rows whose length ``q`` is not a multiple of 16 (Triton then cannot assume aligned rows, so the
    loads are not vectorised and need more registers), in any dtype (finding 4: fp16/bf16 spilled
    too): 64-wide Gram tiles and 128 x 64 GEMM tiles, which at 128 x 128 spill.  The interpreter gets
    32-wide blocks so that small test shapes span several tiles and exercise every mask.

    The phi' kernel with fp32 operands takes K-steps of 16: at 32 Triton 3.6's build (128 registers)
    spills; 16 is spill-free under Triton 3.6 and 3.8."""
    if interpreting():
        return dict(block=32, block_k=32, fwd_block=32, fwd_k=32, dphi_n=16, dphi_k=32, mm_m=32, mm_q=32, mm_k=32,
                    group=2, warps=4, stages=1, row_block=32, row_q=32)
    half = dtype in (torch.float16, torch.bfloat16)
    bk = 64 if half else 32
    mm_k = 64 if dtype == torch.bfloat16 else 32  # fp16 / fp32 feed fp32 operands to the MMA
    unaligned = q % 16 != 0
    t128 = triton.cdiv(n, 128)
    many_waves = t128 * (t128 + 1) // 2 >= 8 * sms
    fwd_block = 128 if (many_waves and not unaligned) else 64
    # 64-wide forward tiles: 528 programs at n = 2048 make whole waves with 1, 2 or 4 programs per SM,
    # not 3; the K-step pins it at 2 (ptxas, sm_90, Triton 3.6 and 3.8): 16-bit rows 128-wide steps
    # (96 KiB of shared memory), fp32 "tf32" 64-wide (96 KiB), "ieee" 64-wide (104 registers; 80 with
    # 32-wide steps under Triton 3.6: 3 per SM); tf32x3 (114-120 registers) is held at 2 by its registers.
    wide_k = fwd_block == 64 and not unaligned and (half or precision != "tf32x3")
    fwd_k = 2 * bk if wide_k else bk
    return dict(block=64 if unaligned else 128, block_k=bk, fwd_block=fwd_block, fwd_k=fwd_k, dphi_n=64,
                dphi_k=bk if half else 16,
                mm_m=128, mm_q=64 if unaligned else 128, mm_k=mm_k, group=8, warps=8, stages=3, row_block=16,
                row_q=256)


def _input_precision(dtype: torch.dtype, input_precision: str) -> str:
    # fp32 operands: the op's precision (SPEC §4); half operands go to the tensor cores as they are
    # ("tf32", Triton's default, is ignored for them).
    return input_precision if dtype == torch.float32 else "tf32"


def panel_rows_for(n: int, align: int = 128) -> int:
    """Rows per backward panel: ``n`` when ``n^2 <= 2^25``, else ``max(1024, 2^25 // n)`` rounded down
    to a multiple of ``align`` (so the fp32 ``(rows, n)`` panel of ``phi'(G)`` is <= max(128 MiB, 4 KiB * n))."""
    if n * n <= _PANEL_ELEMENTS:
        return n
    rows = max(_MIN_PANEL_ROWS, _PANEL_ELEMENTS // n)
    return min(n, max(align, rows // align * align))


def _check_z(z: Tensor) -> None:
    check_tensor(z, "z", ndim=2, min_rows=1)
    if z.dtype not in _SUPPORTED:
        raise TypeError(f"z: the Triton kernel takes float32, float16 or bfloat16, got dtype {z.dtype} "
                        "(legendre_gram_mean sends float64 to the torch path)")
    if z.shape[1] < 2:
        raise ValueError(f"z: expected q >= 2 columns, got shape {tuple(z.shape)}")


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


def legendre_gram_forward(
    z: Tensor, coefficients: Sequence[float], normalize: bool = True, input_precision: str = "tf32x3"
) -> Tensor:
    """``M(Z)`` as a 0-dim fp32 tensor (no autograd; see :func:`legendre_gram_mean`)."""
    _check_z(z)
    coef = tuple(float(b) for b in coefficients)
    n, q = z.shape
    cfg = _config(z.dtype, q, n, _num_sms(z.device), input_precision)
    rinv, _ = _row_scales(z, normalize, cfg)
    tiles = triton.cdiv(n, cfg["fwd_block"])
    num_parts = tiles * (tiles + 1) // 2
    parts = torch.empty(num_parts, device=z.device, dtype=torch.float32)
    wrap_triton(_gram_phi_sum_kernel)[(num_parts,)](
        z, rinv, parts,
        z.stride(0), z.stride(1),
        n, q,
        COEF=coef, L=len(coef),
        BLOCK=cfg["fwd_block"], BLOCK_K=cfg["fwd_k"],
        DOT_F32=interpreting() and z.dtype != torch.float32,
        INPUT_PRECISION=_input_precision(z.dtype, input_precision),
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    out = torch.empty((), device=z.device, dtype=torch.float32)
    wrap_triton(_sum_partials_kernel)[(1,)](parts, out, num_parts, n, BLOCK=1024, num_warps=4)
    return out


def legendre_gram_backward(
    grad: Tensor,
    z: Tensor,
    coefficients: Sequence[float],
    normalize: bool = True,
    input_precision: str = "tf32x3",
    *,
    panel_rows: int | None = None,
) -> Tensor:
    """``grad * dM/dz`` (shape and dtype of ``z``) for a 0-dim upstream gradient ``grad``; recomputes
    the Gram tiles panel by panel (``panel_rows`` rows at a time; default :func:`panel_rows_for`)."""
    _check_z(z)
    coef = tuple(float(b) for b in coefficients)
    n, q = z.shape
    cfg = _config(z.dtype, q, n, _num_sms(z.device), input_precision)
    rinv, proj = _row_scales(z, normalize, cfg)
    rows = panel_rows_for(n, cfg["mm_m"]) if panel_rows is None else min(n, int(panel_rows))
    dot_f32 = interpreting() and z.dtype != torch.float32
    prec = _input_precision(z.dtype, input_precision)
    mode = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[z.dtype]
    num_dparts = triton.cdiv(n, cfg["dphi_n"])
    panel = torch.empty((rows, n), device=z.device, dtype=torch.float32)
    dpart = torch.empty((rows, num_dparts), device=z.device, dtype=torch.float32)
    out = torch.empty((n, q), device=z.device, dtype=z.dtype)
    grad = grad.reshape(())
    for row0 in range(0, n, rows):
        nrows = min(rows, n - row0)
        grid1 = (triton.cdiv(nrows, cfg["block"]) * num_dparts,)
        wrap_triton(_gram_dphi_kernel)[grid1](
            z, rinv, proj, panel, dpart,
            z.stride(0), z.stride(1), panel.stride(0), panel.stride(1), dpart.stride(0), dpart.stride(1),
            n, q, row0, nrows,
            COEF=coef, L=len(coef), NORMALIZE=normalize,
            BLOCK_M=cfg["block"], BLOCK_N=cfg["dphi_n"], BLOCK_K=cfg["dphi_k"], GROUP_M=cfg["group"],
            DOT_F32=dot_f32, INPUT_PRECISION=prec,
            num_warps=cfg["warps"], num_stages=cfg["stages"],
        )
        grid2 = (triton.cdiv(nrows, cfg["mm_m"]) * triton.cdiv(q, cfg["mm_q"]),)
        wrap_triton(_panel_matmul_kernel)[grid2](
            panel, z, rinv, proj, dpart, grad, out,
            panel.stride(0), panel.stride(1), z.stride(0), z.stride(1), dpart.stride(0), dpart.stride(1),
            out.stride(0), out.stride(1),
            n, q, row0, nrows, num_dparts,
            NORMALIZE=normalize, MODE=mode,
            BLOCK_M=cfg["mm_m"], BLOCK_Q=cfg["mm_q"], BLOCK_K=cfg["mm_k"], BLOCK_T=32, GROUP_M=cfg["group"],
            DOT_F32=dot_f32, INPUT_PRECISION=prec, SCALE_GIVEN=False,
            num_warps=cfg["warps"], num_stages=cfg["stages"],
        )
    return out


# ==================================================================================================
# torch math of the two ops (their CPU kernels when the interpreter is off)
# ==================================================================================================


def _torch_forward(z: Tensor, coefficients: Sequence[float], normalize: bool) -> Tensor:
    with torch.no_grad():
        return _sfrik.legendre_gram_mean(z, tuple(coefficients), normalize=normalize).to(torch.float32)


def _torch_backward(grad: Tensor, z: Tensor, coefficients: Sequence[float], normalize: bool) -> Tensor:
    b = tuple(float(c) for c in coefficients)
    zf = z.detach().float()
    n, q = zf.shape
    if normalize:
        norm = zf.norm(dim=1, keepdim=True)
        zhat = zf / norm.clamp_min(_EPS)
    else:
        zhat = zf
    consts = _sfrik.legendre_recurrence_constants(q, len(b))
    chunk = _sfrik.default_chunk_size(n)
    g = torch.empty_like(zhat)
    for s in range(0, n, chunk):
        g[s:s + chunk] = _sfrik._tile_phi_prime(zhat[s:s + chunk] @ zhat.t(), b, consts) @ zhat
    g = g * (grad.float() * (2.0 / (n * n)))
    if normalize:
        radial = (zhat * g).sum(dim=1, keepdim=True)
        g = torch.where(norm >= _EPS, (g - zhat * radial) / norm, g / _EPS)
    return g.to(z.dtype)


# ==================================================================================================
# torch.library registration and autograd
# ==================================================================================================


@triton_op("kernelssl::legendre_gram_mean", mutates_args=())
def _gram_mean_op(z: Tensor, coefficients: list[float], normalize: bool, input_precision: str) -> Tensor:
    return legendre_gram_forward(z, coefficients, normalize, input_precision)


@triton_op("kernelssl::legendre_gram_mean_backward", mutates_args=())
def _gram_mean_backward_op(
    grad: Tensor, z: Tensor, coefficients: list[float], normalize: bool, input_precision: str
) -> Tensor:
    return legendre_gram_backward(grad, z, coefficients, normalize, input_precision)


@_gram_mean_op.register_kernel("cpu")
def _gram_mean_cpu(z, coefficients, normalize, input_precision):
    if interpreting():  # wrap_triton hands interpreted kernels back unwrapped: a direct launch
        return legendre_gram_forward(z, coefficients, normalize, input_precision)
    return _torch_forward(z, coefficients, normalize)


@_gram_mean_backward_op.register_kernel("cpu")
def _gram_mean_backward_cpu(grad, z, coefficients, normalize, input_precision):
    if interpreting():
        return legendre_gram_backward(grad, z, coefficients, normalize, input_precision)
    return _torch_backward(grad, z, coefficients, normalize)


@_gram_mean_op.register_fake
def _gram_mean_fake(z, coefficients, normalize, input_precision):
    return z.new_empty((), dtype=torch.float32)


@_gram_mean_backward_op.register_fake
def _gram_mean_backward_fake(grad, z, coefficients, normalize, input_precision):
    return z.new_empty(z.shape)


def _decompose_on_cuda(fn, z_index: int):
    """Functionalisation rule (what ``torch.compile``'s AOT dispatcher sees): on CUDA tensors, not
    interpreting, decompose the op into its Triton kernels (``triton_op``'s default, so inductor
    schedules them); on CPU tensors or under the interpreter, whose kernels ``wrap_triton`` cannot
    capture, keep the op one opaque call, which runs its CPU kernel at run time."""

    def rule(mode, op, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        if any(not issubclass(t, torch._subclasses.FakeTensor) and t not in (Tensor, FunctionalTensor)
               for t in types):
            return NotImplemented
        z = args[z_index]
        if custom_triton_ops_decomposition_disabled() or interpreting() or z.device.type != "cuda":
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return fn(*args, **kwargs)

    return rule


_gram_mean_op.register_torch_dispatch(FunctionalTensorMode, _decompose_on_cuda(legendre_gram_forward, 0))
_gram_mean_backward_op.register_torch_dispatch(FunctionalTensorMode, _decompose_on_cuda(legendre_gram_backward, 1))


def _setup_context(ctx, inputs, output):
    z, coefficients, normalize, input_precision = inputs
    ctx.save_for_backward(z)
    ctx.coefficients, ctx.normalize, ctx.input_precision = coefficients, normalize, input_precision


def _backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    (z,) = ctx.saved_tensors
    dz = _gram_mean_backward_op(grad, z, ctx.coefficients, ctx.normalize, ctx.input_precision)
    return dz, None, None, None


_gram_mean_op.register_autograd(_backward, setup_context=_setup_context)


# ==================================================================================================
# entry point (called by kernelssl.functional.legendre_gram_mean)
# ==================================================================================================


def legendre_gram_mean(
    z: Tensor,
    coefficients: Sequence[float] = (1.0, 40.0, 40.0),
    *,
    normalize: bool = True,
    input_precision: str | None = None,
) -> Tensor:
    """SFRIK's ``M(Z) = (1/n^2) sum_ij phi(zhat_i . zhat_j)`` with the fused kernels (module docstring).

    Args:
        z: ``(n, q)``, float32 / float16 / bfloat16 (CUDA, or CPU under ``TRITON_INTERPRET=1``).  float64
            is computed by the torch path (``kernelssl.sfrik``) in float64 and returned as float64.
        coefficients: ``(b_1, ..., b_L)``, Python floats, any L >= 1 (each distinct tuple compiles once).
        normalize: L2-normalise the rows first (fused into the kernels).
        input_precision: the fp32 Gram tiles' and backward product's precision (SPEC §4):
            ``"tf32x3"``, ``"ieee"`` or ``"tf32"``; ``None`` (default) is ``"tf32"`` when torch's
            ``torch.backends.cuda.matmul.allow_tf32`` is on, else ``"tf32x3"``.  No effect on fp16/bf16
            inputs (their products are exact on the tensor cores).

    Returns a 0-dim float32 tensor; differentiable in ``z`` (gradient in z's dtype), deterministic.
    Double backward is not supported.
    """
    prec = resolve_precision(input_precision)
    coefficients = check_coefficients(coefficients)
    check_tensor(z, "z", ndim=2, min_rows=1)
    if z.dtype == torch.float64:
        return _sfrik.legendre_gram_mean(z, coefficients, normalize=normalize)
    return _gram_mean_op(z, [float(b) for b in coefficients], bool(normalize), prec)
