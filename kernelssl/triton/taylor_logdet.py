"""Fused Triton kernels: MEC's batched matrix-log Taylor expansion (SPEC §3), forward and backward.

For ``a, b`` of shape ``(..., m, d)`` (a batch of P pairs), ``A^ = a / max(||a_i||, 1e-12)`` row-wise::

    T_n(a, b) = sum_{k=1..n} (-1)^(k+1) tr(C^k) / k          C = lam A^ B^T   (m x m)

The kernels work in the smaller space, ``s = min(m, d)``: ``M = C`` (m-space, m <= d) or
``M = lam B^T A^`` (d-space, m > d); both have the traces ``tr(M^k) = tr(C^k)``.

Forward (order n >= 2; ``h = ceil(n/2)``)
-----------------------------------------
1. ``_rownorm_kernel``: one read of a and b -> row norms (and ``q_i = A^_i . B^_i``).  The
   normalisation is never materialised: it is fused as scalings of the Gram GEMM (m-space: an
   epilogue ``lam / (|a_i| |b_j|)``; d-space: a weight ``1 / (|a_i| |b_i|)`` on the contraction rows).
2. ``_gemm_kernel``: the Gram ``M`` (s x s, fp32 accumulation), split-K when its tiles alone do not
   fill the GPU (fp16/bf16 Grams take 128 x 128 tiles: MEC's paper shape needs no split).
3. small s (``s <= ONCHIP_MAX``, default 32): ``_small_series_kernel``, one program per pair, keeps
   M on-chip: all powers, their diagonals, T, ``r = diag(M S_n)``, ``S_n = sum_{j<n} (-M)^j`` (stored
   for the backward) and, on request, the convergence diagnostics -- one launch.
   large s: ``h - 1`` GEMMs for ``M^2..M^h`` (stored for the backward), then ``_pair_diag_kernel``
   reads the powers once and produces the diagonals of every power by trace pairing,
   ``diag(M^k)_i = sum_j (M^p)_ij (M^q)_ji`` (p + q = k, p, q <= h; one partial per group of column
   blocks, as few groups as keep the SMs streaming), and ``_series_reduce_kernel`` turns them into T,
   ``dT/dlam`` and r (deterministic partials, no atomics), and writes the diagnostics' zeros when
   they were not asked for (no separate fills).
Order 1 needs no s x s matrix: ``T_1 = lam sum_i q_i``.

Backward (SPEC §3.1): ``dT/dA^ = lam S_n^T B^``, ``dT/dB^ = lam S_n A^``; in d-space equivalently
``lam B^ S'^T`` and ``lam A^ S'`` with ``S' = sum_{j<n} (-M)^j`` (``C^j A^ = A^ M^j``).
``S_n`` is formed ONCE in s-space from the stored powers, ``S_n = Q_h + (-M)^h Q_{n-h}`` with
``Q_r = sum_{j<r} (-M)^j`` -- one s^3 GEMM for n >= 4 (the identities and the ``M^h`` term in its
epilogue: no other launch at n = 4), none for n <= 3 -- and then applied once per
side (one GEMM on (m, d) blocks each, ``g lam`` formed in its epilogue).  This replaces SPEC §3.1's Horner recursion
``X - C (X - C (...))``, which costs ``n - 1`` GEMMs on (m, d) blocks per side: forming S costs
``2 s^3 + 4 s^2 max(m, d)`` flops against Horner's ``4 (n - 1) s^2 max(m, d)``, fewer for every
n >= 3 (equal at n = 2) because s <= max(m, d).  The normalisation Jacobian
``g -> (g - x^ (x^ . g)) / ||x||`` is the GEMM epilogue: its row dot is known in advance in
m-space, ``x^_i . (dT/dx^)_i = g diag(C S_n)_i = g r_i`` for BOTH arguments (C and S_n commute), so
the gradient is written in one pass; in d-space the row dot is reduced in-tile when the row fits
one tile (d <= 128), else a row-owning ``_project_kernel`` finishes it (one extra read/write of
the fp32 gradient).  ``dT/dlam = (1/lam) sum_k (-1)^(k+1) tr(C^k)`` comes from the forward.

Numerics: inputs are loaded in their dtype (fp32/fp16/bf16) and upcast to fp32 right after the load;
every product accumulates in fp32; fp32 ``tl.dot`` (the Gram of fp32 inputs, every power, ``S_n`` and
the gradient products, whose operands include an fp32 matrix whatever the input dtype) uses the op's
``input_precision`` (SPEC §4): ``"tf32x3"`` by default (three TF32 tensor-core products, fp32-level
error, emulated at the paper shape in ``tests/test_triton_taylor_logdet.py``), ``"ieee"`` (FMA units),
or ``"tf32"`` (the default only under torch's ``torch.backends.cuda.matmul.allow_tf32``).  Exception:
the on-chip series of step 3 (s <= 32) multiplies its tiny s x s matrices on the FMA units in full
fp32 whatever the precision (latency-bound; tf32x3 there spilled registers under Triton 3.6).
On a GPU, fp16/bf16 Gram tiles without a contraction weight go to the tensor
cores as they are (products of two half values are exact in fp32; accumulation is fp32) -- the same
error level as upcasting first.  bf16 gradients: the products of the fp32 ``S_n`` with the raw bf16
rows run as two bf16 tensor-core products, ``S`` split into ``bf16(S) + bf16(S - bf16(S))``
(``_gemm_kernel``'s HILO; error <= 2^-18 of ``sum_k |S_ik| |x_kj|``, 2^-9 below the bf16 rounding of
the gradient), the row weights ``1/|x_k|`` moved onto S's columns so the bf16 operand stays exact --
whatever ``input_precision`` (it governs fp32 x fp32 products); fp16 keeps the fp32 products (its
exponent range is too narrow for the split).  float64 inputs fall back to the torch path
(:func:`kernelssl.mec.taylor_logdet`), which keeps float64 end to end (Triton's fp64 ``tl.dot``
would give no speed-up).  Deterministic: fixed reduction orders, no atomics, so two runs are
bitwise equal.  No host syncs.  Memory: the stored powers (``ceil(n/2)`` s x s fp32 matrices per
pair; one, ``S_n``, on the small path) plus O(P m) vectors -- never an m x m matrix in d-space.

Registered as ``torch.ops.kernelssl.taylor_logdet_fwd`` / ``taylor_logdet_bwd`` through
:func:`torch.library.triton_op` (autograd via :func:`torch.library.register_autograd`), so
``torch.compile(fullgraph=True)`` traces through.  On CPU tensors the ops run the kernels through
the Triton interpreter when ``TRITON_INTERPRET=1``, else a torch mirror of the same math.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.library import triton_op

from .. import mec as _mec
from .._backend import interpreting, resolve_precision
from .._checks import check_int
from ._launch import wrap_triton

__all__ = [
    "taylor_logdet",
    "taylor_logdet_with_diagnostics",
    "taylor_logdet_forward",
    "taylor_logdet_backward",
    "ONCHIP_MAX",
]

Tensor = torch.Tensor

EPS = 1e-12  # F.normalize's eps: x / max(||x||, EPS)
# s = min(m, d) up to which the whole series runs on-chip, one program per pair.  32: at 64 the
# fp32 FMA dots of a 64 x 64 matrix spill registers (ptxas, sm_90); the tiled path takes over.
ONCHIP_MAX = 32
POWER_ITERS = 16  # power-iteration steps of the rho estimate (kernelssl.mec.convergence_diagnostics)
_GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))  # start vector cos(k * golden angle) + 1.5, as mec.py
_TINY = torch.finfo(torch.float32).tiny
_INTERP_BLOCK = 16  # tile edge under the interpreter: small shapes still span several tiles


# ==================================================================================================
# kernels
# ==================================================================================================


# The batch of pairs shares grid axis 0 with the tiles of one pair (pair-major: a pair's tiles run
# together), since axes 1 and 2 are limited to 65535: program id -> (tile, pair), both int64.
@triton.jit
def _pair_split(pid, tiles):
    pid = pid.to(tl.int64)
    return pid % tiles, pid // tiles


@triton.jit
def _inv_norm(nrm):
    # 1 / max(||x||, eps): the scale of F.normalize
    return 1.0 / tl.maximum(nrm, 1e-12)


@triton.jit
def _unit_rows(x, nrm):
    # x^ = x / ||x|| (rows of a tile, norms per row) by a correctly rounded division, as F.normalize
    # divides: x * (1/||x||) is off by up to 1.5 ulps, and x^ (x^ . v) then no longer cancels v's
    # component along x^ to rounding of the result (d = 1: x^ = +-1 exactly, the gradient exactly 0).
    # Rows below eps get 0 (F.normalize's Jacobian has no projection there).
    return tl.where(nrm[:, None] > 1e-12, tl.div_rn(x, tl.maximum(nrm, 1e-12)[:, None]), 0.0)


@triton.jit
def _round_bf16(x):
    # fp32 -> nearest-even bf16 value, still in fp32 (its low 16 bits zero, so the cast is exact).
    # Only under the interpreter, whose fp32 -> bf16 cast truncates (Triton 3.8); a GPU's cast rounds.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


# acc + F H (F_FIRST) or acc + H F, F fp32 and H a bf16 tile (exact), as two bf16 tensor-core products
# F = F_hi + F_lo (see _gemm_kernel's HILO), the small part first.  DOT_F32 (interpreter, whose bf16
# dot and fp32 -> bf16 cast are not the GPU's): the same split rounded to nearest even with integer ops
# and the operands in fp32 -- products of bf16 values are exact in fp32 either way.
@triton.jit
def _split_dot(f, h, acc, F_FIRST: tl.constexpr, DOT_F32: tl.constexpr):
    if DOT_F32:
        f_hi = _round_bf16(f)
        f_lo = _round_bf16(f - f_hi)
        h = h.to(tl.float32)
        if F_FIRST:
            acc = tl.dot(f_lo, h, acc, input_precision="ieee")
            acc = tl.dot(f_hi, h, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, f_lo, acc, input_precision="ieee")
            acc = tl.dot(h, f_hi, acc, input_precision="ieee")
    else:
        f_hi = f.to(tl.bfloat16)
        f_lo = (f - f_hi.to(tl.float32)).to(tl.bfloat16)
        if F_FIRST:
            acc = tl.dot(f_lo, h, acc)
            acc = tl.dot(f_hi, h, acc)
        else:
            acc = tl.dot(h, f_lo, acc)
            acc = tl.dot(h, f_hi, acc)
    return acc


# Row statistics, one read of a and b.
#   forward:  na_i = ||a_i||, nb_i = ||b_i||, q_i = <a_i, b_i> / (max(na_i, eps) max(nb_i, eps))
#             (q_i = <a_i, b_i> without normalisation);  T_1 = lam sum_i q_i.
#   backward: none (the norms feed the scalings and the normalisation Jacobian of the other kernels).
@triton.jit
def _rownorm_kernel(
    a_ptr, b_ptr, nrm_ptr, q_ptr,
    stride_ap, stride_am, stride_ad,
    stride_bp, stride_bm, stride_bd,
    stride_nw, stride_np, stride_qp,
    M, D,
    NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r, p = _pair_split(tl.program_id(0), tl.cdiv(M, BLOCK_R))
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < M
    sa = tl.zeros((BLOCK_R,), dtype=tl.float32)
    sb = tl.zeros((BLOCK_R,), dtype=tl.float32)
    ab = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(a_ptr + p * stride_ap + rows[:, None] * stride_am + cols[None, :] * stride_ad,
                    mask=mask, other=0.0).to(tl.float32)
        y = tl.load(b_ptr + p * stride_bp + rows[:, None] * stride_bm + cols[None, :] * stride_bd,
                    mask=mask, other=0.0).to(tl.float32)
        sa += tl.sum(x * x, axis=1)
        sb += tl.sum(y * y, axis=1)
        ab += tl.sum(x * y, axis=1)
    if NORMALIZE:
        na = tl.sqrt(sa)
        nb = tl.sqrt(sb)
        tl.store(nrm_ptr + p * stride_np + rows, na, mask=rmask)
        tl.store(nrm_ptr + stride_nw + p * stride_np + rows, nb, mask=rmask)
        ab = ab * _inv_norm(na) * _inv_norm(nb)
    tl.store(q_ptr + p * stride_qp + rows, ab, mask=rmask)


# Batched scaled GEMM with fused epilogues (every product of the op goes through it):
#   out[s, p] = alpha_p * diag(rs) X'_p diag(ks) Y'_p diag(cs) (+ Z'_p),  contraction split in chunks s,
#   rs / cs / ks = 1 / max(norm, eps) of the given norm vectors (ks: product of one or two);
#   alpha_p = 1 without HAS_ALPHA, times g_p (the upstream gradient) with ALPHA_G; Z' = Z, or I - Z
#   with EYE_Z (the identity added in the epilogue, never stored).
#   SERIES = +-1 (square products only): out = SERIES (X_ij - (X Y)_ij) + Z'_ij, i.e. SERIES X (I - Y) + Z'
#   with the identity outside the K loop.
#   Uses:  Gram m-space  M = lam diag(1/|a|) A B^T diag(1/|b|)         (rs, cs)
#          Gram d-space  M = lam B^T diag(1/(|a||b|)) A                 (ks, two vectors)
#          powers        M^k = M^(k-1) M;   S_n = (-1)^h M^h (I - R_(n-h)) + (I - R_h)   (SERIES, EYE_Z)
#          gradients     g lam S^T B^ (m-space, ks) or g lam B^ S'^T (d-space, rs), then the
#                        normalisation Jacobian  out = (v - x^ (x^ . v)) / |x|  with the row dot
#                        given (PROJ = 1: g r_i, m-space) or reduced in-tile (PROJ = 2: N <= BLOCK_N).
#   HILO (bf16 inputs, gradients): the fp32 operand F (X = S diag(ks) when HILO = 1, Y = S' when
#   HILO = 2) times the other, a bf16 input kept exact, as two bf16 tensor-core products,
#   F = F_hi + F_lo + e with F_hi = bf16(F), F_lo = bf16(F - F_hi): |e| <= 2^-9 |F - F_hi| <= 2^-18 |F|
#   elementwise (round to nearest), each product exact in fp32, fp32 accumulation; so the result is
#   the fp32 product up to 2^-18 sum_k |F_ik| |Y_kj| besides the fp32 accumulation -- 2^-9 below the
#   rounding of the bf16 gradient it becomes.  The contraction weights (1/|x_k|) go onto F's columns
#   so that the bf16 operand is the raw input, exact.
#   (This GEMM is itself the backward of the products above; it has no autograd of its own.)
@triton.jit
def _gemm_kernel(
    x_ptr, y_ptr, z_ptr, out_ptr,
    alpha_ptr, rs_ptr, cs_ptr, ks_ptr, ks2_ptr,
    own_ptr, ownn_ptr, rdot_ptr, g_ptr,
    stride_xp, stride_xm, stride_xk,
    stride_yp, stride_yk, stride_yn,
    stride_zp, stride_zm, stride_zn,
    stride_os, stride_op, stride_om, stride_on,
    stride_wp, stride_wm, stride_wn,
    stride_rsp, stride_csp, stride_ksp, stride_ks2p, stride_onp, stride_rdp,
    M, N, K, K_SPLIT,
    HAS_ALPHA: tl.constexpr, ALPHA_G: tl.constexpr, HAS_RS: tl.constexpr, HAS_CS: tl.constexpr, KS_COUNT: tl.constexpr,
    HAS_Z: tl.constexpr, SERIES: tl.constexpr, EYE_Z: tl.constexpr,
    PROJ: tl.constexpr, HALF_DOT: tl.constexpr, HILO: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_s = tl.program_id(1).to(tl.int64)
    # grouped ordering of the output tiles (L2 reuse of the X row panels)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)  # int32 tile arithmetic (int64 here costs registers: Triton 3.6 then spills)
    p = (pid // (num_pid_m * num_pid_n)).to(tl.int64)  # the batch shares axis 0 (see _pair_split)
    pid = pid % (num_pid_m * num_pid_n)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_size)
    pid_n = (pid % num_in_group) // group_size

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    x_base = x_ptr + p * stride_xp
    y_base = y_ptr + p * stride_yp
    k_lo = pid_s * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < k_hi
        x = tl.load(x_base + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        y = tl.load(y_base + ks[:, None] * stride_yk + cols[None, :] * stride_yn,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        if HALF_DOT:
            # fp16/bf16 tiles straight to the tensor cores: exact products, fp32 accumulation
            acc = tl.dot(x, y, acc)
        elif HILO == 1:
            tl.static_assert(KS_COUNT <= 1, "HILO == 1 applies one K-weight vector (ks) only")
            x = x.to(tl.float32)
            if KS_COUNT >= 1:
                kw = _inv_norm(tl.load(ks_ptr + p * stride_ksp + ks, mask=kmask, other=1.0))
                x = x * kw[None, :]
            acc = _split_dot(x, y, acc, True, DOT_F32)
        elif HILO == 2:
            tl.static_assert(KS_COUNT == 0, "HILO == 2 takes no K-weight vector")
            acc = _split_dot(y.to(tl.float32), x, acc, False, DOT_F32)
        else:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
            if KS_COUNT >= 1:
                kw = _inv_norm(tl.load(ks_ptr + p * stride_ksp + ks, mask=kmask, other=1.0))
                if KS_COUNT == 2:
                    kw = kw * _inv_norm(tl.load(ks2_ptr + p * stride_ks2p + ks, mask=kmask, other=1.0))
                y = y * kw[:, None]
            acc = tl.dot(x, y, acc, input_precision=PRECISION)

    # ---- epilogue, in fp32 registers ----
    if HAS_RS:
        acc = acc * _inv_norm(tl.load(rs_ptr + p * stride_rsp + rows, mask=rmask, other=1.0))[:, None]
    if HAS_CS:
        acc = acc * _inv_norm(tl.load(cs_ptr + p * stride_csp + cols, mask=cmask, other=1.0))[None, :]
    if HAS_ALPHA:
        alpha = tl.load(alpha_ptr + p)
        if ALPHA_G:
            alpha = tl.load(g_ptr + p) * alpha  # g lam, as torch's g * lam
        acc = acc * alpha
    omask = rmask[:, None] & cmask[None, :]
    if SERIES != 0:
        xt = tl.load(x_base + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=omask, other=0.0)
        acc = SERIES * (xt.to(tl.float32) - acc)
    if HAS_Z:
        zt = tl.load(z_ptr + p * stride_zp + rows[:, None] * stride_zm + cols[None, :] * stride_zn,
                     mask=omask, other=0.0).to(tl.float32)
        if EYE_Z:
            zt = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0) - zt
        acc += zt
    if PROJ > 0:
        on = tl.load(ownn_ptr + p * stride_onp + rows, mask=rmask, other=1.0)
        inv = _inv_norm(on)
        xw = tl.load(own_ptr + p * stride_wp + rows[:, None] * stride_wm + cols[None, :] * stride_wn,
                     mask=omask, other=0.0).to(tl.float32)
        if PROJ == 2 and BLOCK_N <= 64:
            # the row dot is reduced here from this x^: divide, as _project_kernel (_unit_rows).  Rows
            # up to 64 wide only: at 128 the division's registers spill (sm_90, ptxas); wide rows keep
            # the reciprocal, whose 1.5-ulp x^ matters at d = 1-like cancellations, not at d > 64.
            xw = _unit_rows(xw, on)
        else:
            xw = xw * tl.where(on > 1e-12, inv, 0.0)[:, None]  # no projection below eps (F.normalize)
        if PROJ == 1:
            rd = tl.load(rdot_ptr + p * stride_rdp + rows, mask=rmask, other=0.0) * tl.load(g_ptr + p)
        else:
            rd = tl.sum(xw * acc, axis=1)
        acc = inv[:, None] * (acc - xw * rd[:, None])
    if ROUND_BF16:
        acc = _round_bf16(acc)
    out_ptrs = out_ptr + pid_s * stride_os + p * stride_op + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


# Whole series for a small s x s matrix, on-chip, one program per pair (s <= ONCHIP_MAX):
#   forward:  M = sum of the split-K Gram partials; M^k by tl.dot for k <= NT;
#             T = sum_{k<=n} (-1)^(k+1) tr(M^k)/k,  U = sum_{k<=n} (-1)^(k+1) tr(M^k)  (= lam dT/dlam),
#             r = sum_{k<=n} (-1)^(k+1) diag(M^k) = diag(M S_n),  S_n = sum_{j<n} (-M)^j (stored);
#             diagnostics: term ratio |tr(M^NT)/NT| / |tr(M^(NT-1))/(NT-1)| and the power-iteration
#             estimate of rho(M) (ITERS steps, geometric mean of the growth after BURN steps);
#             without diagnostics, rho = ratio = 0 (stored here, no separate zero fill).
#   backward: S_n and r are what the gradient GEMMs consume.
@triton.jit
def _small_series_kernel(
    g_ptr, t_ptr, u_ptr, r_ptr, s_ptr, rho_ptr, ratio_ptr,
    stride_gs, stride_gp, stride_gm, stride_gn,
    stride_sp, stride_sm, stride_sn, stride_rp,
    S, SPLIT,
    ORDER: tl.constexpr, NT: tl.constexpr, STORE_S: tl.constexpr, DIAG: tl.constexpr,
    ITERS: tl.constexpr, BURN: tl.constexpr, GOLDEN: tl.constexpr, TINY: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_S: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK_S)
    imask = idx < S
    mask = imask[:, None] & imask[None, :]
    eye = (idx[:, None] == idx[None, :]) & mask
    offs = idx[:, None] * stride_gm + idx[None, :] * stride_gn
    m_mat = tl.zeros((BLOCK_S, BLOCK_S), dtype=tl.float32)
    for sp in range(0, SPLIT):
        m_mat += tl.load(g_ptr + sp * stride_gs + p * stride_gp + offs, mask=mask, other=0.0)

    t_val = tl.sum(tl.zeros((BLOCK_S,), dtype=tl.float32), axis=0)
    u_val = t_val
    tr_prev = t_val
    tr_last = t_val
    r_vec = tl.zeros((BLOCK_S,), dtype=tl.float32)
    s_mat = tl.where(eye, 1.0, 0.0)
    pk = m_mat
    for k in tl.static_range(1, NT + 1):
        if k > 1:
            pk = tl.dot(pk, m_mat, input_precision=PRECISION)
        dk = tl.sum(tl.where(eye, pk, 0.0), axis=1)
        trk = tl.sum(dk, axis=0)
        tr_prev = tr_last
        tr_last = trk
        if k <= ORDER:
            sign = 1.0 - 2.0 * ((k + 1) % 2)  # (-1)^(k+1)
            t_val += sign * trk / k
            u_val += sign * trk
            r_vec += sign * dk
            if k < ORDER:
                s_mat += -sign * pk  # (-M)^k = -(-1)^(k+1) M^k
    tl.store(t_ptr + p, t_val)
    tl.store(u_ptr + p, u_val)
    tl.store(r_ptr + p * stride_rp + idx, r_vec, mask=imask)
    if STORE_S:
        tl.store(s_ptr + p * stride_sp + idx[:, None] * stride_sm + idx[None, :] * stride_sn, s_mat, mask=mask)
    if DIAG:
        num = tl.abs(tr_last) / NT
        den = tl.abs(tr_prev) / (NT - 1)
        tl.store(ratio_ptr + p, tl.where(num == 0.0, 0.0, num / den))
        v = tl.where(imask, tl.cos(idx.to(tl.float32) * GOLDEN) + 1.5, 0.0)
        v = v / tl.sqrt(tl.sum(v * v, axis=0))
        log_growth = tl.sum(tl.zeros((BLOCK_S,), dtype=tl.float32), axis=0)
        for it in range(ITERS):
            w = tl.sum(m_mat * v[None, :], axis=1)
            growth = tl.sqrt(tl.sum(w * w, axis=0))
            log_growth += tl.where(it >= BURN, tl.log(growth), 0.0)
            v = w / tl.maximum(growth, TINY)
        tl.store(rho_ptr + p, tl.exp(log_growth / (ITERS - BURN)))
    else:
        tl.store(rho_ptr + p, 0.0)
        tl.store(ratio_ptr + p, 0.0)


# Diagonals of every power by trace pairing, for large s (powers M^1..M^H stored, H = ceil(NT/2)):
#   diag(M)_i from the diagonal tiles; for k >= 2, with p = min(k-1, H), q = k - p <= H:
#   diag(M^k)_i = sum_j (M^p)_ij (M^q)_ji  -> partial sums over the column blocks J of this program's
#   group (JG consecutive blocks, summed in order), one partial per group.
#   forward only (the backward needs r = sum_k (-1)^(k+1) diag(M^k), reduced from these).
@triton.jit
def _pair_diag_kernel(
    pw_ptr, out_ptr,
    stride_pk, stride_pp, stride_pm, stride_pn,
    stride_ok, stride_op, stride_oj,
    S, JG,
    H: tl.constexpr, NT: tl.constexpr, BLOCK: tl.constexpr,
):
    nb = tl.cdiv(S, BLOCK)
    ng = tl.cdiv(nb, JG)
    pid_ig, p = _pair_split(tl.program_id(0), nb * ng)
    pid_i = pid_ig % nb
    pid_g = pid_ig // nb
    rows = pid_i * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < S
    base = pw_ptr + p * stride_pp
    j_lo = pid_g * JG
    j_hi = tl.minimum(j_lo + JG, nb)
    for k in tl.static_range(1, NT + 1):
        dk = tl.zeros((BLOCK,), dtype=tl.float32)
        for pid_j in range(j_lo, j_hi):
            cols = pid_j * BLOCK + tl.arange(0, BLOCK)
            mask = rmask[:, None] & (cols < S)[None, :]
            ij = rows[:, None] * stride_pm + cols[None, :] * stride_pn  # tile (I, J)
            if k == 1:
                t = tl.load(base + ij, mask=mask, other=0.0)
                dk += tl.sum(tl.where(rows[:, None] == cols[None, :], t, 0.0), axis=1)
            else:
                ji = cols[None, :] * stride_pm + rows[:, None] * stride_pn  # tile (J, I), transposed in place
                pp = k - 1 if k - 1 <= H else H
                qq = k - pp
                x = tl.load(base + (pp - 1) * stride_pk + ij, mask=mask, other=0.0)
                y = tl.load(base + (qq - 1) * stride_pk + ji, mask=mask, other=0.0)
                dk += tl.sum(x * y, axis=1)
        tl.store(out_ptr + (k - 1) * stride_ok + p * stride_op + pid_g * stride_oj + rows, dk, mask=rmask)


# Series reduction for large s: sums the pair-diagonal partials in a fixed order (deterministic):
#   diag(M^k) = sum_J partial_k,J;  tr_k = sum_i diag(M^k)_i;  T = sum_{k<=n} (-1)^(k+1) tr_k / k,
#   U = sum_{k<=n} (-1)^(k+1) tr_k (= lam dT/dlam),  r = sum_{k<=n} (-1)^(k+1) diag(M^k);
#   diagnostics: term ratio |tr_NT/NT| / |tr_(NT-1)/(NT-1)|; without, rho = ratio = 0 (stored here, no
#   separate zero fill).
@triton.jit
def _series_reduce_kernel(
    part_ptr, t_ptr, u_ptr, r_ptr, rho_ptr, ratio_ptr,
    stride_ok, stride_op, stride_oj, stride_rp,
    S, NJ,
    ORDER: tl.constexpr, NT: tl.constexpr, DIAG: tl.constexpr, NT_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, NT_PAD)
    trv = tl.zeros((NT_PAD,), dtype=tl.float32)
    for i0 in range(0, S, BLOCK):
        rows = i0 + tl.arange(0, BLOCK)
        rmask = rows < S
        rv = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(1, NT + 1):
            dk = tl.zeros((BLOCK,), dtype=tl.float32)
            for j in range(0, NJ):
                dk += tl.load(part_ptr + (k - 1) * stride_ok + p * stride_op + j * stride_oj + rows,
                              mask=rmask, other=0.0)
            trv += tl.where(kk == k - 1, tl.sum(dk, axis=0), 0.0)
            if k <= ORDER:
                rv += (1.0 - 2.0 * ((k + 1) % 2)) * dk
        tl.store(r_ptr + p * stride_rp + rows, rv, mask=rmask)
    kf = (kk + 1).to(tl.float32)
    sign = 1.0 - 2.0 * ((kk + 2) % 2).to(tl.float32)  # (-1)^(k+1), k = kk + 1
    keep = kk < ORDER
    tl.store(t_ptr + p, tl.sum(tl.where(keep, sign * trv / kf, 0.0), axis=0))
    tl.store(u_ptr + p, tl.sum(tl.where(keep, sign * trv, 0.0), axis=0))
    if DIAG:
        num = tl.abs(tl.sum(tl.where(kk == NT - 1, trv, 0.0), axis=0)) / NT
        den = tl.abs(tl.sum(tl.where(kk == NT - 2, trv, 0.0), axis=0)) / (NT - 1)
        tl.store(ratio_ptr + p, tl.where(num == 0.0, 0.0, num / den))
    else:
        tl.store(rho_ptr + p, 0.0)
        tl.store(ratio_ptr + p, 0.0)


# One power-iteration step on M (large s), forward-only diagnostics:
#   w = M v / max(||v||, tiny)  with ||v||^2 the sum of the previous step's per-block partials;
#   stores w and the partial sums of w^2 of this row block (growth = ||w|| = ||M v^||).
@triton.jit
def _power_step_kernel(
    m_ptr, vin_ptr, sqin_ptr, vout_ptr, sqout_ptr,
    stride_mp, stride_mm, stride_mn, stride_vp, stride_qp,
    S, NR,
    TINY: tl.constexpr, NR_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r, p = _pair_split(tl.program_id(0), NR)
    jj = tl.arange(0, NR_PAD)
    sq = tl.sum(tl.load(sqin_ptr + p * stride_qp + jj, mask=jj < NR, other=0.0), axis=0)
    inv = 1.0 / tl.maximum(tl.sqrt(sq), TINY)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < S
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, S, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < S
        v = tl.load(vin_ptr + p * stride_vp + cols, mask=cmask, other=0.0)
        t = tl.load(m_ptr + p * stride_mp + rows[:, None] * stride_mm + cols[None, :] * stride_mn,
                    mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(t * v[None, :], axis=1)
    w = acc * inv
    tl.store(vout_ptr + p * stride_vp + rows, w, mask=rmask)
    tl.store(sqout_ptr + p * stride_qp + pid_r, tl.sum(w * w, axis=0))


# Row-owning normalisation Jacobian (backward), for rows that do not fit one GEMM tile and for n = 1:
#   v = dT/dx^ (fp32 scratch, or alpha * y^ for order 1: dT_1/da^ = lam b^),
#   out = (v - x^ (x^ . v)) / max(|x|, eps)  (x^ . v reduced over the row first, from the same v and
#   x^ that the second pass subtracts, so the two cancel to the rounding of the result);
#   without normalisation out = v.  In place when v and out are the same fp32 buffer.
@triton.jit
def _project_load_v(v_ptr, oth_ptr, onrm, alpha, p, rows, cols, mask,
                    stride_vp, stride_vm, stride_vn, stride_tp, stride_tm, stride_tn,
                    V_FROM_OTHER: tl.constexpr, NORMALIZE: tl.constexpr):
    if V_FROM_OTHER:
        v = tl.load(oth_ptr + p * stride_tp + rows[:, None] * stride_tm + cols[None, :] * stride_tn,
                    mask=mask, other=0.0).to(tl.float32)
        if NORMALIZE:
            v = tl.div_rn(v, onrm[:, None])  # y^ = y / max(|y|, eps), correctly rounded (_unit_rows)
        v = v * alpha
    else:
        v = tl.load(v_ptr + p * stride_vp + rows[:, None] * stride_vm + cols[None, :] * stride_vn,
                    mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _project_kernel(
    v_ptr, oth_ptr, othn_ptr, own_ptr, ownn_ptr, alpha_ptr, out_ptr,
    stride_vp, stride_vm, stride_vn,
    stride_tp, stride_tm, stride_tn,
    stride_wp, stride_wm, stride_wn,
    stride_op, stride_om, stride_on,
    stride_np,
    M, N,
    V_FROM_OTHER: tl.constexpr, NORMALIZE: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r, p = _pair_split(tl.program_id(0), tl.cdiv(M, BLOCK_R))
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < M
    alpha = tl.load(alpha_ptr + p)
    onrm = tl.zeros((BLOCK_R,), dtype=tl.float32)  # max(|y|, eps) of the other input (order 1)
    if NORMALIZE:
        on = tl.load(ownn_ptr + p * stride_np + rows, mask=rmask, other=1.0)
        inv = _inv_norm(on)
        if V_FROM_OTHER:
            onrm = tl.maximum(tl.load(othn_ptr + p * stride_np + rows, mask=rmask, other=1.0), 1e-12)
        rd = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, N, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = rmask[:, None] & (cols < N)[None, :]
            v = _project_load_v(v_ptr, oth_ptr, onrm, alpha, p, rows, cols, mask,
                                stride_vp, stride_vm, stride_vn, stride_tp, stride_tm, stride_tn,
                                V_FROM_OTHER, NORMALIZE)
            xw = _unit_rows(tl.load(own_ptr + p * stride_wp + rows[:, None] * stride_wm + cols[None, :] * stride_wn,
                                    mask=mask, other=0.0).to(tl.float32), on)
            rd += tl.sum(xw * v, axis=1)
    for c0 in range(0, N, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols < N)[None, :]
        v = _project_load_v(v_ptr, oth_ptr, onrm, alpha, p, rows, cols, mask,
                            stride_vp, stride_vm, stride_vn, stride_tp, stride_tm, stride_tn,
                            V_FROM_OTHER, NORMALIZE)
        if NORMALIZE:
            xw = _unit_rows(tl.load(own_ptr + p * stride_wp + rows[:, None] * stride_wm + cols[None, :] * stride_wn,
                                    mask=mask, other=0.0).to(tl.float32), on)
            v = inv[:, None] * (v - xw * rd[:, None])
        if ROUND_BF16:
            v = _round_bf16(v)
        tl.store(out_ptr + p * stride_op + rows[:, None] * stride_om + cols[None, :] * stride_on,
                 v.to(out_ptr.dtype.element_ty), mask=mask)


# ==================================================================================================
# launch configuration
# ==================================================================================================


def _gemm_config(half_dot: bool, input_precision: str, proj: int = 0, hilo: int = 0) -> dict:
    """Tile sizes of :func:`_gemm_kernel`, chosen so that ptxas (sm_90) reports no register spills
    for any variant the launchers issue.  fp32 "ieee" dots run on the FMA units, whose operand
    layout holds a thread's whole K slice in registers: BLOCK_K = 16.  fp32 tensor-core dots (tf32x3 /
    tf32) take 128 x 64 tiles, 64 x 64 when the normalisation-Jacobian epilogue is fused.  Half-input
    Grams: 128 x 128 x 64 tiles, 4 stages (one program per SM, by shared memory: at MEC's paper shape
    the 128 tiles of the two pairs fill 132 SMs without a split-K and its partials' sum).  bf16
    gradients (HILO, two bf16 dots per K-step): 64 x 128 tiles, so each split of S serves 128 columns."""
    if interpreting():
        b = _INTERP_BLOCK
        return dict(BLOCK_M=b, BLOCK_N=b, BLOCK_K=b, GROUP_M=4, num_warps=4, num_stages=1)
    if half_dot:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    if hilo:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    if input_precision != "ieee":
        bm = 64 if proj else 128
        return dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3)


def _row_block() -> int:
    return _INTERP_BLOCK if interpreting() else 16


def _col_block(n: int) -> int:
    return _INTERP_BLOCK if interpreting() else min(128, max(16, triton.next_power_of_2(n)))


_PROJ_IN_TILE_MAX = 128  # d-space gradients: rows up to this width are projected in the GEMM epilogue


def _gemm_per_sm(half_dot: bool, input_precision: str) -> int:
    """Resident programs per SM of the plain (no projection) :func:`_gemm_kernel` launches of
    :func:`_gemm_config` on sm_90, from ptxas' registers and shared memory (256 threads a program):
    half-input dots, 128 x 128 tiles with 4 stages of 64-deep K slices -> 128 KiB of shared memory
    (and ~150 registers) -> 1; fp32 dots (tf32x3 / tf32 / ieee) > 128 registers -> 1.  The static model
    (benchmarks/perf_model.py) reads the real figure from the compiled kernel and checks the waves."""
    return 1


def _num_sms(dev: torch.device) -> int:
    """SM count of ``dev``; 132 (H100 / H200) off CUDA, where only the offline sm_90 recording of
    tests/sm90_compile.py and benchmarks/perf_model.py reaches the GPU launchers."""
    if dev.type != "cuda":
        return 132
    return _cuda_sms(dev.index if dev.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_k(tiles: int, batch: int, k: int, block_k: int, slots: int = 264) -> int:
    """Contraction chunks so that a small output fills the GPU's ``slots`` resident programs (SMs x
    programs per SM): the smallest split (each chunk >= 4 K-steps) whose wave efficiency
    ``p / (ceil(p / slots) * slots)``, ``p = tiles * batch * split``, reaches 90%, or the best there
    is; 1 when the output alone does (e.g. MEC's fp32 Gram at the paper shape: 256 programs on 132 SMs
    x 1, 97%, where a split of 2 only adds the partials' sum).  At most 2 under the interpreter (it
    exercises the path)."""
    steps = triton.cdiv(k, block_k)
    if interpreting():
        return 2 if steps >= 2 and tiles * batch <= 16 else 1
    hi = max(1, steps // 4)
    base = max(1, tiles * batch)

    def eff(sp: int) -> float:
        p = base * sp
        return p / (triton.cdiv(p, slots) * slots)

    target = min(0.9, max(eff(sp) for sp in range(1, hi + 1)))
    return next(sp for sp in range(1, hi + 1) if eff(sp) >= target)


_MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis 0 (axes 1 and 2: 65535)


def _programs(tiles: int, pairs: int) -> int:
    """Grid axis 0 of a launch over ``pairs`` pairs of ``tiles`` programs each (see ``_pair_split``)."""
    n = tiles * pairs
    if n > _MAX_GRID_X:
        raise ValueError(f"a, b: a batch of {pairs} pairs needs {n} programs of one launch, more than CUDA's "
                         f"{_MAX_GRID_X}: split the batch")
    return n


def _pair_diag_group(nb: int, pairs: int, sms: int) -> int:
    """Column blocks per :func:`_pair_diag_kernel` program (its J loop): the fewest partials per row
    (so the one-program-per-pair series reduction reads little) whose ``nb x groups x pairs``
    programs still keep >= 90% of the SMs streaming (the kernel is bytes-bound), else one block each.
    2 under the interpreter (the loop is exercised)."""
    if interpreting():
        return min(2, nb)
    for groups in range(1, nb + 1):
        p = nb * groups * pairs
        if p / (triton.cdiv(p, sms) * sms) >= 0.9:
            return triton.cdiv(nb, groups)
    return 1


def _vec_stride(v: Tensor) -> int:
    return v.stride(0) if v.dim() >= 1 and v.numel() > 0 else 0


def _gemm(x, y, out, alpha, *, sx, sy, so, m, n, k, z=None, sz=(0, 0, 0), rs=None, cs=None, ks=None,
          ks2=None, own=None, ownn=None, rdot=None, g=None, proj=0, half_dot=False,
          input_precision="tf32x3", split=1, k_split=None, block_n=None, has_alpha=True, series=0,
          eye_z=False, hilo=0):
    """Launch :func:`_gemm_kernel`; ``sx, sy, sz`` are (batch, row, col) strides of the operands as
    used (transposes are stride swaps), ``so`` the (split, batch, row, col) strides of ``out``.
    ``alpha`` (P,) is also the batch size when ``has_alpha`` is False (then not read)."""
    cfg = _gemm_config(half_dot, input_precision, proj, hilo)
    if series and not interpreting():
        # the S_n epilogue reads a tile of X too: 128-row tf32x3 tiles spilled (unaligned s, sm_90)
        cfg["BLOCK_M"] = 64
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
        if block_n > 64 and input_precision == "tf32x3" and not half_dot and not hilo:
            cfg["BLOCK_K"] = 16  # 64 x 128 tiles with the fused projection: K-steps of 32 spilled (sm_90)
    k_split = k if k_split is None else k_split
    batch = alpha.shape[0]
    dummy = alpha
    own_t = own if own is not None else x
    sw = (own.stride(0), own.stride(1), own.stride(2)) if own is not None else (0, 0, 0)
    grid = (_programs(triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), batch), split)
    if not _launch(x):
        return
    wrap_triton(_gemm_kernel)[grid](
        x, y, z if z is not None else dummy, out,
        alpha,
        rs if rs is not None else dummy, cs if cs is not None else dummy,
        ks if ks is not None else dummy, ks2 if ks2 is not None else dummy,
        own_t, ownn if ownn is not None else dummy,
        rdot if rdot is not None else dummy, g if g is not None else dummy,
        sx[0], sx[1], sx[2],
        sy[0], sy[1], sy[2],
        sz[0], sz[1], sz[2],
        so[0], so[1], so[2], so[3],
        sw[0], sw[1], sw[2],
        _vec_stride(rs) if rs is not None else 0, _vec_stride(cs) if cs is not None else 0,
        _vec_stride(ks) if ks is not None else 0, _vec_stride(ks2) if ks2 is not None else 0,
        _vec_stride(ownn) if ownn is not None else 0, _vec_stride(rdot) if rdot is not None else 0,
        m, n, k, k_split,
        HAS_ALPHA=has_alpha, ALPHA_G=g is not None and has_alpha, HAS_RS=rs is not None, HAS_CS=cs is not None,
        KS_COUNT=(ks is not None) + (ks2 is not None), HAS_Z=z is not None, SERIES=series, EYE_Z=eye_z,
        PROJ=proj, HALF_DOT=half_dot, HILO=hilo, DOT_F32=bool(hilo) and interpreting(), PRECISION=input_precision,
        ROUND_BF16=_round_bf16_here(out), **cfg,
    )


def _strides3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _t3(t: Tensor) -> tuple[int, int, int]:
    """Strides of the transpose of the trailing two dims."""
    return t.stride(0), t.stride(2), t.stride(1)


def _so(t: Tensor) -> tuple[int, int, int, int]:
    """(split, batch, row, col) strides of a GEMM output: a (SPLIT, P, r, c) buffer or a (P, r, c) one."""
    if t.dim() == 4:
        return t.stride(0), t.stride(1), t.stride(2), t.stride(3)
    return 0, t.stride(0), t.stride(1), t.stride(2)


def _launch(t: Tensor) -> bool:
    """False only while shapes are traced with fake tensors under the interpreter: ``wrap_triton``
    cannot wrap an interpreted kernel, and there is nothing to compute.  (On a GPU the launch is
    always issued; ``wrap_triton`` records it for ``torch.compile``.)"""
    return not (interpreting() and is_fake(t))


def _round_bf16_here(out: Tensor) -> bool:
    """Round bf16 stores by hand: only under the interpreter, whose fp32 -> bf16 cast truncates."""
    return interpreting() and out.dtype == torch.bfloat16


def _half(t: Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


# ==================================================================================================
# launchers
# ==================================================================================================


def taylor_logdet_forward(a3: Tensor, b3: Tensor, lam: Tensor, order: int, normalize: bool,
                          diagnostics: bool, input_precision: str):
    """Forward of the op on ``a3, b3: (P, m, d)`` (fp32/fp16/bf16, same dtype) and ``lam: (P,)`` fp32.

    Returns ``(T, U, nrm, q, r, mats, rho, ratio)``:
    ``T (P,)`` the series; ``U (P,)`` = ``lam dT/dlam``; ``nrm (2, P, m)`` the row norms of a and b
    (``(2, P, 0)`` without normalisation); ``q (P, m)`` = ``A^_i . B^_i`` (order 1; else ``(P, 0)``);
    ``r (P, s)`` = ``diag(M S_n)`` (``(P, 0)`` for order 1 without diagnostics); ``mats`` what the
    backward needs: ``S_n`` as ``(1, P, s, s)`` on the on-chip path, the powers ``M^1..M^h`` as
    ``(h, P, s, s)`` otherwise, ``(0, P, s, s)`` for order 1; ``rho, ratio (P,)`` the diagnostics
    (zeros unless ``diagnostics``).
    """
    P, m, d = a3.shape
    s = min(m, d)
    mspace = m <= d
    dev, f32 = a3.device, torch.float32
    need_rows = normalize or order == 1
    series = order >= 2 or diagnostics
    nt = max(order, 2) if diagnostics else order
    onchip = s <= ONCHIP_MAX

    nrm = torch.empty((2, P, m if normalize else 0), device=dev, dtype=f32)
    q = torch.empty((P, m if order == 1 else 0), device=dev, dtype=f32)
    q_buf = q if order == 1 else torch.empty((P, m if need_rows else 0), device=dev, dtype=f32)
    if need_rows and _launch(a3):
        br, bd = _row_block(), _col_block(d)
        wrap_triton(_rownorm_kernel)[(_programs(triton.cdiv(m, br), P),)](
            a3, b3, nrm, q_buf,
            *_strides3(a3), *_strides3(b3),
            nrm.stride(0), nrm.stride(1), q_buf.stride(0),
            m, d,
            NORMALIZE=normalize, BLOCK_R=br, BLOCK_D=bd,
            num_warps=4,
        )
    # rho, ratio: written by the series kernels (zeros without diagnostics), zeros here for order 1
    fill = torch.empty if series else torch.zeros
    rho, ratio = fill((P,), device=dev, dtype=f32), fill((P,), device=dev, dtype=f32)
    r = torch.empty((P, s if series else 0), device=dev, dtype=f32)
    t_ser = torch.empty((P,), device=dev, dtype=f32)
    u_ser = torch.empty((P,), device=dev, dtype=f32)
    mats = torch.empty((0, P, s, s), device=dev, dtype=f32)
    if series:
        h = (nt + 1) // 2
        half_dot = (not interpreting()) and _half(a3) and (mspace or not normalize)
        cfg = _gemm_config(half_dot, input_precision)
        L = d if mspace else m
        tiles = triton.cdiv(s, cfg["BLOCK_M"]) * triton.cdiv(s, cfg["BLOCK_N"])
        split = _split_k(tiles, P, L, cfg["BLOCK_K"], _num_sms(dev) * _gemm_per_sm(half_dot, input_precision))
        k_split = triton.cdiv(triton.cdiv(L, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        split = triton.cdiv(L, k_split)
        if onchip or split > 1:
            gbuf = torch.empty((split, P, s, s), device=dev, dtype=f32)
        else:
            pw = torch.empty((h, P, s, s), device=dev, dtype=f32)
            gbuf = pw[:1]
        na, nb = (nrm[0], nrm[1]) if normalize else (None, None)
        if mspace:  # M = lam diag(1/|a|) A B^T diag(1/|b|)
            _gemm(a3, b3, gbuf, lam, sx=_strides3(a3), sy=_t3(b3), so=_so(gbuf), m=s, n=s, k=L,
                  rs=na, cs=nb, half_dot=half_dot, input_precision=input_precision, split=split, k_split=k_split)
        else:  # M = lam B^T diag(1/(|a||b|)) A
            _gemm(b3, a3, gbuf, lam, sx=_t3(b3), sy=_strides3(a3), so=_so(gbuf), m=s, n=s, k=L,
                  ks=na, ks2=nb, half_dot=half_dot, input_precision=input_precision, split=split, k_split=k_split)
        if onchip:
            store_s = order >= 2
            mats = torch.empty((1 if store_s else 0, P, s, s), device=dev, dtype=f32)
            s_out = mats[0] if store_s else gbuf[0]
            bs = max(16, triton.next_power_of_2(s))
            if _launch(gbuf):
                wrap_triton(_small_series_kernel)[(P,)](
                    gbuf, t_ser, u_ser, r, s_out, rho, ratio,
                    gbuf.stride(0), gbuf.stride(1), gbuf.stride(2), gbuf.stride(3),
                    s_out.stride(0), s_out.stride(1), s_out.stride(2), r.stride(0),
                    s, split,
                    ORDER=order, NT=nt, STORE_S=store_s, DIAG=diagnostics,
                    ITERS=POWER_ITERS, BURN=POWER_ITERS // 2, GOLDEN=_GOLDEN_ANGLE, TINY=_TINY,
                    # s <= 32: products of at most 32 x 32 x 32, latency-bound, on the FMA units
                    # whatever the op's precision (full fp32); tf32x3 there spilled 40-48 B under
                    # Triton 3.6 (255 registers with 4 or 8 warps).
                    PRECISION="ieee", BLOCK_S=bs,
                    num_warps=4 if bs <= 32 else 16,
                )
        else:
            if split > 1:
                pw = torch.empty((h, P, s, s), device=dev, dtype=f32)
                torch.sum(gbuf, 0, out=pw[0])  # fixed order; no copy
            for k in range(2, h + 1):  # M^k = M^(k-1) M
                _gemm(pw[k - 2], pw[0], pw[k - 1], lam, sx=_strides3(pw[k - 2]), sy=_strides3(pw[0]),
                      so=_so(pw[k - 1]), m=s, n=s, k=s, input_precision=input_precision, has_alpha=False)
            blk = _INTERP_BLOCK if interpreting() else 64
            nb = triton.cdiv(s, blk)
            jg = _pair_diag_group(nb, P, _num_sms(dev))
            nj = triton.cdiv(nb, jg)
            part = torch.empty((nt, P, nj, s), device=dev, dtype=f32)
            if _launch(pw):
                wrap_triton(_pair_diag_kernel)[(_programs(nb * nj, P),)](
                    pw, part,
                    pw.stride(0), pw.stride(1), pw.stride(2), pw.stride(3),
                    part.stride(0), part.stride(1), part.stride(2),
                    s, jg,
                    H=h, NT=nt, BLOCK=blk,
                    num_warps=8,
                )
            rblk = _INTERP_BLOCK if interpreting() else 256
            if _launch(part):
                wrap_triton(_series_reduce_kernel)[(P,)](
                    part, t_ser, u_ser, r, rho, ratio,
                    part.stride(0), part.stride(1), part.stride(2), r.stride(0),
                    s, nj,
                    ORDER=order, NT=nt, DIAG=diagnostics, NT_PAD=triton.next_power_of_2(nt), BLOCK=rblk,
                    num_warps=4,
                )
            if diagnostics:
                rho = _power_iteration(pw[0])
            if order >= 2:
                mats = pw
    if order == 1:
        t_out = lam * q.sum(-1)
        u_out = t_out.clone()
    else:
        t_out, u_out = t_ser, u_ser
    return t_out, u_out, nrm, q, r, mats, rho, ratio


def _power_iteration(mat: Tensor) -> Tensor:
    """rho estimate of ``mat (P, s, s)``: POWER_ITERS launches of :func:`_power_step_kernel`; the
    same iteration as :func:`kernelssl.mec.convergence_diagnostics` (geometric mean of the growth
    over the second half)."""
    P, s, _ = mat.shape
    dev, f32 = mat.device, torch.float32
    br = _INTERP_BLOCK if interpreting() else 32
    bc = _INTERP_BLOCK if interpreting() else 128
    nr = triton.cdiv(s, br)
    v0 = torch.cos(torch.arange(s, dtype=f32, device=dev) * _GOLDEN_ANGLE) + 1.5
    v0 = v0 / v0.norm()
    vs = [v0.expand(P, s).contiguous(), torch.empty((P, s), device=dev, dtype=f32)]
    sq = torch.zeros((POWER_ITERS + 1, P, nr), device=dev, dtype=f32)
    sq[0, :, 0] = 1.0  # ||v0|| = 1
    for it in range(POWER_ITERS):
        vin, vout = vs[it % 2], vs[(it + 1) % 2]
        if _launch(mat):
            wrap_triton(_power_step_kernel)[(_programs(nr, P),)](
                mat, vin, sq[it], vout, sq[it + 1],
                mat.stride(0), mat.stride(1), mat.stride(2), vin.stride(0), sq.stride(1),
                s, nr,
                TINY=_TINY, NR_PAD=triton.next_power_of_2(nr), BLOCK_R=br, BLOCK_C=bc,
                num_warps=4,
            )
    burn = POWER_ITERS // 2
    growth = sq[burn + 1:].sum(-1).sqrt()  # (iters - burn, P): ||M v^_t|| for t >= burn
    return torch.exp(torch.log(growth).sum(0) / (POWER_ITERS - burn))


def _s_from_powers(pw: Tensor, order: int, input_precision: str = "tf32x3") -> Tensor:
    """``S_n = sum_{j<n} (-M)^j = Q_h + (-M)^h Q_(n-h)`` from the powers ``M^1..M^h``, with
    ``Q_r = sum_{j<r} (-M)^j = I - R_r``, ``R_r = sum_{1<=j<r} (-1)^(j+1) M^j``: for n >= 4 one GEMM,
    ``S_n = (-1)^h (M^h - M^h R_(n-h)) + I - R_h``, whose identity and ``M^h`` term are added in the
    epilogue (``R_2 = M`` is the stored power: no other launch at n = 4; one add per further term);
    orders 2 and 3 elementwise."""
    _, P, s, _ = pw.shape
    h = (order + 1) // 2  # a Python int (pw.shape[0] would be symbolic under dynamic shapes)
    if order - h <= 1:  # n = 2: I - M;  n = 3: I - M + M^2
        eye = torch.eye(s, device=pw.device, dtype=pw.dtype)
        out = torch.add(eye, pw[0], alpha=-1.0)  # one launch (alpha = +-1 is exact), (P, s, s)
        return out if h == 1 else out + pw[1]

    def r_(r):
        out = pw[0]
        for j in range(2, r):
            out = torch.add(out, pw[j - 1], alpha=(-1.0) ** (j + 1))
        return out

    rh = r_(h)
    r2 = rh if order - h == h else r_(order - h)
    s_mat = torch.empty((P, s, s), device=pw.device, dtype=pw.dtype)
    _gemm(pw[h - 1], r2, s_mat, pw[0, :, 0, 0], sx=_strides3(pw[h - 1]), sy=_strides3(r2), so=_so(s_mat),
          m=s, n=s, k=s, z=rh, sz=_strides3(rh), input_precision=input_precision, has_alpha=False,
          series=1 if h % 2 == 0 else -1, eye_z=True)
    return s_mat


def taylor_logdet_backward(g: Tensor, a3: Tensor, b3: Tensor, lam: Tensor, nrm: Tensor, q: Tensor,
                           r: Tensor, mats: Tensor, order: int, normalize: bool, input_precision: str,
                           need_a: bool, need_b: bool):
    """``(dL/da, dL/db)`` from ``g = dL/dT (P,)`` and the forward's saved tensors (shapes as the
    inputs, in their dtype; a side not needed comes back as an empty tensor)."""
    P, m, d = a3.shape
    s = min(m, d)
    mspace = m <= d
    dev, f32 = a3.device, torch.float32
    ga = torch.empty_like(a3, memory_format=torch.contiguous_format) if need_a else a3.new_empty((0,))
    gb = torch.empty_like(b3, memory_format=torch.contiguous_format) if need_b else b3.new_empty((0,))
    gsc = g.contiguous()
    na, nb = (nrm[0], nrm[1]) if normalize else (None, None)
    # (own input, its norms, the other input, its norms, output) for the two sides
    sides = [(a3, na, b3, nb, ga)] if need_a else []
    sides += [(b3, nb, a3, na, gb)] if need_b else []
    if order == 1:  # dT_1/da^ = lam b^, dT_1/db^ = lam a^ (row dot reduced in the kernel)
        alpha = (g * lam).contiguous()  # dL/dT * lam, per pair
        br, bc = _row_block(), _col_block(d)
        for own, ownn, oth, othn, out in sides:
            if _launch(out):
                wrap_triton(_project_kernel)[(_programs(triton.cdiv(m, br), P),)](
                    out, oth, othn if othn is not None else alpha, own, ownn if ownn is not None else alpha,
                    alpha, out,
                    *_strides3(out), *_strides3(oth), *_strides3(own), *_strides3(out),
                    _vec_stride(nrm[0]) if normalize else 0,
                    m, d,
                    V_FROM_OTHER=True, NORMALIZE=normalize,
                    ROUND_BF16=_round_bf16_here(out), BLOCK_R=br, BLOCK_C=bc,
                    num_warps=4,
                )
        return ga, gb
    s_mat = mats[0] if s <= ONCHIP_MAX else _s_from_powers(mats, order, input_precision)
    # bf16 inputs: S (fp32) times the raw bf16 rows as two bf16 products (_gemm_kernel's HILO); fp16
    # keeps the fp32 products of input_precision (its exponent range is too narrow for the split)
    hilo = a3.dtype == torch.bfloat16
    if mspace:
        # side a: g lam S^T B^ (contraction over the m rows of b, scaled by 1/|b_j|); side b: g lam S A^
        # (alpha = g lam formed in the epilogue: ALPHA_G)
        for (own, ownn, oth, othn, out), sx in zip(sides, [_t3(s_mat)] * need_a + [_strides3(s_mat)] * need_b):
            _gemm(s_mat, oth, out, lam, sx=sx, sy=_strides3(oth), so=_so(out), m=m, n=d, k=m,
                  ks=othn, own=own, ownn=ownn, rdot=r, g=gsc, proj=1 if normalize else 0,
                  input_precision=input_precision, hilo=1 if hilo else 0)
        return ga, gb
    # d-space: side a: g lam B^ S'^T; side b: g lam A^ S' (rows of the other input scaled by 1/|.|)
    in_tile = d <= _PROJ_IN_TILE_MAX
    block_n = max(16, triton.next_power_of_2(d)) if (normalize and in_tile) else None
    for (own, ownn, oth, othn, out), sy in zip(sides, [_t3(s_mat)] * need_a + [_strides3(s_mat)] * need_b):
        if normalize and not in_tile:
            dst = out if out.dtype == f32 else torch.empty(out.shape, device=dev, dtype=f32)
            _gemm(oth, s_mat, dst, lam, sx=_strides3(oth), sy=sy, so=_so(dst), m=m, n=d, k=d,
                  rs=othn, g=gsc, input_precision=input_precision, hilo=2 if hilo else 0)
            br, bc = _row_block(), _col_block(d)
            if _launch(out):
                wrap_triton(_project_kernel)[(_programs(triton.cdiv(m, br), P),)](
                    dst, dst, lam, own, ownn, lam, out,  # lam: placeholders, unread (V_FROM_OTHER=False)
                    *_strides3(dst), *_strides3(dst), *_strides3(own), *_strides3(out),
                    ownn.stride(0),
                    m, d,
                    V_FROM_OTHER=False, NORMALIZE=True,
                    ROUND_BF16=_round_bf16_here(out), BLOCK_R=br, BLOCK_C=bc,
                    num_warps=4,
                )
        else:
            _gemm(oth, s_mat, out, lam, sx=_strides3(oth), sy=sy, so=_so(out), m=m, n=d, k=d,
                  rs=othn, g=gsc, own=own, ownn=ownn, proj=2 if normalize else 0, input_precision=input_precision,
                  block_n=block_n, hilo=2 if hilo else 0)
    return ga, gb


# ==================================================================================================
# torch mirror of the same math (CPU tensors without the interpreter)
# ==================================================================================================


def _torch_forward(a3, b3, lam, order, normalize, diagnostics, input_precision):
    P, m, d = a3.shape
    s = min(m, d)
    mspace = m <= d
    a, b = a3.float(), b3.float()
    series = order >= 2 or diagnostics
    nt = max(order, 2) if diagnostics else order
    dev, f32 = a3.device, torch.float32
    if normalize:
        na, nb = a.norm(dim=-1), b.norm(dim=-1)
        ah, bh = a / na.clamp_min(EPS)[..., None], b / nb.clamp_min(EPS)[..., None]
        nrm = torch.stack([na, nb])
    else:
        ah, bh = a, b
        nrm = a.new_empty((2, P, 0))
    q = (ah * bh).sum(-1) if order == 1 else a.new_empty((P, 0))
    rho = torch.zeros((P,), device=dev, dtype=f32)
    ratio = torch.zeros((P,), device=dev, dtype=f32)
    r = a.new_empty((P, s if series else 0))
    mats = a.new_empty((0, P, s, s))
    t_out = u_out = None
    if series:
        mat = lam[:, None, None] * (ah @ bh.mT if mspace else bh.mT @ ah)
        h = (nt + 1) // 2
        powers = [mat]
        for _ in range(nt - 1):
            powers.append(powers[-1] @ mat)
        diags = [pk.diagonal(dim1=-2, dim2=-1) for pk in powers]
        signs = [(-1.0) ** k for k in range(nt)]  # (-1)^(k+1) for k = 1..nt
        t_out = sum(signs[k] * diags[k].sum(-1) / (k + 1) for k in range(order))
        u_out = sum(signs[k] * diags[k].sum(-1) for k in range(order))
        r = sum(signs[k] * diags[k] for k in range(order))
        if diagnostics:
            num = diags[nt - 1].sum(-1).abs() / nt
            den = diags[nt - 2].sum(-1).abs() / (nt - 1)
            ratio = torch.where(num == 0, torch.zeros_like(num), num / den)
            rho, _ = _mec.convergence_diagnostics(ah, bh, lam, order=order, normalize=False, iters=POWER_ITERS)
        if order >= 2:
            if s <= ONCHIP_MAX:
                eye = torch.eye(s, device=dev, dtype=f32).expand(P, s, s)
                mats = (eye + sum(((-1.0) ** j) * powers[j - 1] for j in range(1, order)))[None]
            else:
                mats = torch.stack(powers[:h])
    if order == 1:
        t_out = lam * q.sum(-1)
        u_out = t_out.clone()
    return t_out, u_out, nrm, q, r, mats, rho, ratio


def _torch_backward(g, a3, b3, lam, nrm, q, r, mats, order, normalize, input_precision, need_a, need_b):
    P, m, d = a3.shape
    s = min(m, d)
    mspace = m <= d
    a, b = a3.float(), b3.float()
    if normalize:
        inv = 1.0 / nrm.clamp_min(EPS)
        ah, bh = a / nrm[0].clamp_min(EPS)[..., None], b / nrm[1].clamp_min(EPS)[..., None]  # as the kernels
    else:
        ah, bh = a, b
    alpha = (g * lam)[:, None, None]
    if order == 1:
        va, vb = alpha * bh, alpha * ah
    else:
        s_mat = mats[0] if s <= ONCHIP_MAX else _s_from_powers_torch(mats, order)
        if mspace:
            va, vb = alpha * (s_mat.mT @ bh), alpha * (s_mat @ ah)
        else:
            va, vb = alpha * (bh @ s_mat.mT), alpha * (ah @ s_mat)

    def project(v, x, i):
        if not normalize:
            return v
        xw = torch.where(nrm[i][..., None] > EPS, (ah, bh)[i], 0.0)  # _unit_rows
        return inv[i][..., None] * (v - xw * (xw * v).sum(-1, keepdim=True))

    ga = project(va, a, 0).to(a3.dtype) if need_a else a3.new_empty((0,))
    gb = project(vb, b, 1).to(b3.dtype) if need_b else b3.new_empty((0,))
    return ga, gb


def _s_from_powers_torch(pw, order):
    _, P, s, _ = pw.shape
    out = torch.eye(s, device=pw.device, dtype=pw.dtype).expand(P, s, s)
    power = out
    for j in range(1, order):
        power = power @ pw[0]
        out = out + ((-1.0) ** j) * power
    return out


# ==================================================================================================
# torch.library registration and autograd
# ==================================================================================================


@triton_op("kernelssl::taylor_logdet_fwd", mutates_args=())
def _fwd_op(a3: Tensor, b3: Tensor, lam: Tensor, order: int, normalize: bool, diagnostics: bool,
            input_precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return taylor_logdet_forward(a3, b3, lam, order, normalize, diagnostics, input_precision)


@triton_op("kernelssl::taylor_logdet_bwd", mutates_args=())
def _bwd_op(g: Tensor, a3: Tensor, b3: Tensor, lam: Tensor, nrm: Tensor, q: Tensor, r: Tensor,
            mats: Tensor, order: int, normalize: bool, input_precision: str, need_a: bool,
            need_b: bool) -> tuple[Tensor, Tensor]:
    return taylor_logdet_backward(g, a3, b3, lam, nrm, q, r, mats, order, normalize, input_precision, need_a, need_b)


@_fwd_op.register_kernel("cpu")
def _fwd_cpu(a3, b3, lam, order, normalize, diagnostics, input_precision):
    if interpreting():
        return taylor_logdet_forward(a3, b3, lam, order, normalize, diagnostics, input_precision)
    return _torch_forward(a3, b3, lam, order, normalize, diagnostics, input_precision)


@_bwd_op.register_kernel("cpu")
def _bwd_cpu(g, a3, b3, lam, nrm, q, r, mats, order, normalize, input_precision, need_a, need_b):
    if interpreting():
        return taylor_logdet_backward(g, a3, b3, lam, nrm, q, r, mats, order, normalize, input_precision, need_a, need_b)
    return _torch_backward(g, a3, b3, lam, nrm, q, r, mats, order, normalize, input_precision, need_a, need_b)


_DECOMPOSE_DEVICES = ("cuda",)  # where torch.compile sees the kernels (a test traces the rule on CPU)


def _decompose_on_cuda(fn):
    """``torch.compile`` rule of a triton_op under functionalisation: on CUDA (not interpreting) the
    op is decomposed into its Triton kernels, so Inductor sees and schedules them (what
    ``triton_op`` does by default); on CPU tensors, or under the interpreter (whose kernels cannot be
    captured in a graph), the op stays one opaque call and runs its CPU kernel at run time."""

    def rule(mode, op, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        if any(not issubclass(t, torch._subclasses.FakeTensor) and t not in (Tensor, FunctionalTensor)
               for t in types):
            return NotImplemented
        if (custom_triton_ops_decomposition_disabled() or interpreting()
                or args[1].device.type not in _DECOMPOSE_DEVICES):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return fn(*args, **kwargs)

    return rule


_fwd_op.register_torch_dispatch(FunctionalTensorMode, _decompose_on_cuda(taylor_logdet_forward))
_bwd_op.register_torch_dispatch(FunctionalTensorMode, _decompose_on_cuda(taylor_logdet_backward))


def _setup_context(ctx, inputs, output):
    a3, b3, lam, order, normalize, diagnostics, input_precision = inputs
    _, u, nrm, q, r, mats, _, _ = output
    ctx.save_for_backward(a3, b3, lam, u, nrm, q, r, mats)
    ctx.order, ctx.normalize, ctx.input_precision = order, normalize, input_precision


def _backward(ctx, g_t, *_unused):
    a3, b3, lam, u, nrm, q, r, mats = ctx.saved_tensors
    need_a, need_b, need_lam = ctx.needs_input_grad[:3]
    ga = gb = glam = None
    if need_a or need_b:
        ga, gb = torch.ops.kernelssl.taylor_logdet_bwd(
            g_t.contiguous(), a3, b3, lam, nrm, q, r, mats, ctx.order, ctx.normalize, ctx.input_precision,
            need_a, need_b)
    if need_lam:  # dT/dlam = (1/lam) sum_k (-1)^(k+1) tr(C^k)
        glam = g_t * u / lam
    return (ga if need_a else None), (gb if need_b else None), glam, None, None, None, None


torch.library.register_autograd("kernelssl::taylor_logdet_fwd", _backward, setup_context=_setup_context)


# ==================================================================================================
# public entry points
# ==================================================================================================


def _prepare(a: Tensor, b: Tensor, lam, order: int):
    _mec._check_inputs(a, b, lam)
    check_int(order, "order", minimum=1)
    batch = a.shape[:-2]
    m, d = a.shape[-2:]
    P = math.prod(batch)
    dtype = torch.promote_types(a.dtype, b.dtype)
    if a.dtype != dtype:
        a = a.to(dtype)
    if b.dtype != dtype:
        b = b.to(dtype)
    if isinstance(lam, Tensor):
        lam_t = lam.to(torch.float32).broadcast_to(batch).reshape(P).contiguous()
    else:
        lam_t = torch.full((P,), float(lam), device=a.device, dtype=torch.float32)
    return a.reshape(P, m, d), b.reshape(P, m, d), lam_t, batch, dtype


def taylor_logdet(a: Tensor, b: Tensor, lam: float | Tensor, order: int = 4, *, normalize: bool = True,
                  input_precision: str | None = None) -> Tensor:
    """``T_n(a, b) = sum_{k=1..n} (-1)^(k+1) tr(C^k) / k``, ``C = lam A^ B^T``, by the fused kernels.

    Same contract as :func:`kernelssl.mec.taylor_logdet`: ``a, b (..., m, d)``, ``lam`` a number or a
    tensor broadcastable to the batch shape (its values are never read on the host), ``order >= 1``;
    returns ``a.shape[:-2]`` in float32, differentiable in a, b and lam (``dT/dlam`` is
    ``(1/lam) sum_k (-1)^(k+1) tr(C^k)``: lam must be nonzero).  float64 inputs use the torch path
    (float64 result).  ``input_precision``: the fp32 GEMMs' precision (SPEC §4), ``"tf32x3"``,
    ``"ieee"`` or ``"tf32"``; ``None`` (default) is ``"tf32"`` under torch's
    ``torch.backends.cuda.matmul.allow_tf32`` (``torch.set_float32_matmul_precision("high")``), else
    ``"tf32x3"`` (fp32-level error on the tensor cores).  Double backward
    is not supported.
    """
    prec = resolve_precision(input_precision)
    if torch.promote_types(a.dtype, b.dtype) == torch.float64:
        return _mec.taylor_logdet(a, b, lam, order, normalize=normalize)
    a3, b3, lam_t, batch, _ = _prepare(a, b, lam, order)
    if a3.shape[0] == 0:
        return torch.zeros(batch, device=a.device, dtype=torch.float32) + 0.0 * (a.sum() + b.sum())
    t = torch.ops.kernelssl.taylor_logdet_fwd(a3, b3, lam_t, order, normalize, False, prec)[0]
    return t.reshape(batch)


def taylor_logdet_with_diagnostics(a: Tensor, b: Tensor, lam: float | Tensor, order: int = 4, *,
                                   normalize: bool = True, input_precision: str | None = None):
    """``(T, rho_estimate, term_ratio)``, each of shape ``a.shape[:-2]``, from ONE fused forward.

    ``T`` is :func:`taylor_logdet` (differentiable, bitwise the same value); the two diagnostics are
    those of :func:`kernelssl.mec.convergence_diagnostics` (no grad, no host sync):

    * ``term_ratio = |tr(C^n)/n| / |tr(C^(n-1))/(n-1)|`` from the traces the forward computes anyway
      (for order 1 the forward also evaluates ``tr(C^2)``).  Free.
    * ``rho_estimate``: 16 power-iteration steps on the s x s matrix M the forward has built (same
      start vector, normalisation and geometric mean over the last 8 steps as mec.py, so the same
      estimate up to fp32 rounding).  For ``s <= ONCHIP_MAX`` it runs inside the single on-chip series
      program (free).  Above, 16 matrix-vector launches each read M once: ``16 s^2`` floats per pair
      (m = 1024, d = 2048: 64 MB per pair, ~20 us of HBM bandwidth per pair on an H100, plus 16 launch
      latencies) against the forward's ``2 s^2 max(m, d) + 2 (h-1) s^3`` flops -- a few percent of a
      forward + backward at the paper shape, more at small shapes.  When rho is not used (e.g. only T
      is differentiated under ``torch.compile``) the launches are dead code and disappear.

    Signature: ``taylor_logdet_with_diagnostics(a, b, lam, order=4, *, normalize=True,
    input_precision=None) -> (T, rho_estimate, term_ratio)``; float64 inputs use the torch path and
    :func:`kernelssl.mec.convergence_diagnostics`.
    """
    prec = resolve_precision(input_precision)
    if torch.promote_types(a.dtype, b.dtype) == torch.float64:
        t = _mec.taylor_logdet(a, b, lam, order, normalize=normalize)
        rho, ratio = _mec.convergence_diagnostics(a, b, lam, order=order, normalize=normalize)
        return t, rho, ratio
    a3, b3, lam_t, batch, _ = _prepare(a, b, lam, order)
    if a3.shape[0] == 0:
        z = torch.zeros(batch, device=a.device, dtype=torch.float32)
        return z + 0.0 * (a.sum() + b.sum()), z.clone(), z.clone()
    out = torch.ops.kernelssl.taylor_logdet_fwd(a3, b3, lam_t, order, normalize, True, prec)
    return out[0].reshape(batch), out[6].detach().reshape(batch), out[7].detach().reshape(batch)
