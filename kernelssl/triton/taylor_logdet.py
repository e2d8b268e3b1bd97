"""``taylor_logdet``, Triton tier, the kernels: MEC's batched matrix-log Taylor expansion (docs/taylor_logdet.md),
forward and backward.  The host side (launch configuration, launchers, registration) is ``taylor_logdet_op.py``.

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

Backward: ``dT/dA^ = lam S_n^T B^``, ``dT/dB^ = lam S_n A^``; in d-space equivalently
``lam B^ S'^T`` and ``lam A^ S'`` with ``S' = sum_{j<n} (-M)^j`` (``C^j A^ = A^ M^j``).
``S_n`` is formed ONCE in s-space from the stored powers, ``S_n = Q_h + (-M)^h Q_{n-h}`` with
``Q_r = sum_{j<r} (-M)^j`` -- one s^3 GEMM for n >= 4 (the identities and the ``M^h`` term in its
epilogue: no other launch at n = 4), none for n <= 3 -- and then applied once per
side (one GEMM on (m, d) blocks each, ``g lam`` formed in its epilogue).  This replaces the Horner recursion
``X - C (X - C (...))``, which costs ``n - 1`` GEMMs on (m, d) blocks per side: forming S costs
``2 s^3 + 4 s^2 max(m, d)`` flops against Horner's ``4 (n - 1) s^2 max(m, d)``, fewer for every
n >= 3 (equal at n = 2) because s <= max(m, d).  The normalisation Jacobian
``g -> (g - x^ (x^ . g)) / ||x||`` is the GEMM epilogue: its row dot is known in advance in
m-space, ``x^_i . (dT/dx^)_i = g diag(C S_n)_i = g r_i`` for BOTH arguments (C and S_n commute), so
the gradient is written in one pass; in d-space the row dot is reduced in-tile when the row fits
one tile (d <= 128), else a row-owning ``_project_kernel`` finishes it (one extra read/write of
the fp32 gradient).  ``dT/dlam = (1/lam) sum_k (-1)^(k+1) tr(C^k)`` comes from the forward.

Numerics: inputs are loaded in their dtype (fp32/fp16/bf16) and upcast to fp32 right after the load; every
product accumulates in fp32; fp32 ``tl.dot`` (the Gram of fp32 inputs, every power, ``S_n`` and the gradient
products, whose operands include an fp32 matrix whatever the input dtype) uses the op's ``input_precision``:
``"tf32x3"`` by default (three TF32 tensor-core products, fp32-level error, emulated at the paper shape in
``tests/test_taylor_logdet_triton.py``), ``"ieee"`` (FMA units), or ``"tf32"`` (the default only under torch's
``torch.backends.cuda.matmul.allow_tf32``).  Exception: the on-chip series of step 3 (s <= 32) multiplies its
tiny s x s matrices on the FMA units in full fp32 whatever the precision (latency-bound; tf32x3 there spilled
registers under Triton 3.6). On a GPU, fp16/bf16 Gram tiles without a contraction weight go to the tensor cores
as they are (products of two half values are exact in fp32; accumulation is fp32) -- the same error level as
upcasting first.  bf16 gradients: the products of the fp32 ``S_n`` with the raw bf16 rows run as two bf16
tensor-core products, ``S`` split into ``bf16(S) + bf16(S - bf16(S))`` (``_gemm_kernel``'s HILO; error <= 2^-18
of ``sum_k |S_ik| |x_kj|``, 2^-9 below the bf16 rounding of the gradient), the row weights ``1/|x_k|`` moved
onto S's columns so the bf16 operand stays exact -- whatever ``input_precision`` (it governs fp32 x fp32
products); fp16 keeps the fp32 products (its exponent range is too narrow for the split).  float64 inputs run on
the torch tier (:func:`kernelssl.ops.taylor_logdet.taylor_logdet`, :mod:`kernelssl.dispatch`), which keeps
float64 end to end (Triton's fp64 ``tl.dot`` would give no speed-up).  Deterministic: fixed reduction orders, no
atomics, so two runs are bitwise equal.  No host syncs.  Memory: the stored powers (``ceil(n/2)`` s x s fp32
matrices per pair; one, ``S_n``, on the small path) plus O(P m) vectors -- never an m x m matrix in d-space.
"""
import triton
import triton.language as tl

from ._jit import _round_bf16


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
