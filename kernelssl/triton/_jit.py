"""``@triton.jit`` helpers shared by several ops: exact roundings, program order, the Gram tile, row scales,
and the panel GEMM of the Gram ops' backward (``legendre_gram`` and ``gaussian_gram`` run on the same
tiles with different epilogues)."""
import triton
import triton.language as tl


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


# Grouped ("swizzled") program order over a (num_m, num_n) grid, for L2 reuse of row/column blocks.
@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    tm = first_m + (pid % in_group) % group_m
    tn = (pid % in_group) // group_m
    return tm, tn


# G_ij = r_i r_j (z_i . z_j) over the tile rows x cols (r = 1 / max(||z||, eps), or 1 for rows taken as
# given), and r_j: the Gram tile of the unit rows, formed from the raw rows in their dtype.
@triton.jit
def _unit_gram_tile(
    z_ptr, rinv_ptr, rows, cols, rmask, cmask,
    stride_zn, stride_zq,
    q,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    acc = _gram_tile(z_ptr, rows, cols, rmask, cmask, stride_zn, stride_zq, q,
                     BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, INPUT_PRECISION)
    r_i = tl.load(rinv_ptr + rows, mask=rmask, other=0.0)
    r_j = tl.load(rinv_ptr + cols, mask=cmask, other=0.0)
    return acc * r_i[:, None] * r_j[None, :], r_j


# The rows of a backward panel tile: program pid of the (panel_rows x n) panel grid, swizzled; panel rows
# lrows, rows of z (row0 + lrows), columns, their masks, and the column tile's index.
@triton.jit
def _panel_tile(pid, row0, panel_rows, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    tm, tn = _swizzle(pid, tl.cdiv(panel_rows, BLOCK_M), tl.cdiv(n, BLOCK_N), GROUP_M)
    lrows = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    return lrows, row0 + lrows, cols, lrows < panel_rows, cols < n, tn


# Program p of the lower triangle of T x T tiles owns tile (I, J), J <= I, p = I (I + 1)/2 + J: invert it,
# I = floor((sqrt(8p + 1) - 1) / 2) (in fp64), then fix a possible off-by-one of the square root.
@triton.jit
def _triangle_tile(pid):
    ti = ((tl.sqrt((8 * pid + 1).to(tl.float64)) - 1.0) * 0.5).to(tl.int64)
    ti = tl.where(ti * (ti + 1) // 2 > pid, ti - 1, ti)
    ti = tl.where((ti + 1) * (ti + 2) // 2 <= pid, ti + 1, ti)
    return ti, pid - ti * (ti + 1) // 2


# Tile (I, J) of program pid on the lower triangle: its row and column indices and their masks.
@triton.jit
def _triangle_rows(pid, n, BLOCK: tl.constexpr):
    ti, tj = _triangle_tile(pid)
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    return ti, tj, rows, cols, rows < n, cols < n


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
# in bf16 (2 MMAs); 2: fp16 zt (exact in TF32), p = p_hi + p_lo rounded to TF32 (2 TF32 MMAs) when
# INPUT_PRECISION is "tf32", else one fp32 product at INPUT_PRECISION (targets without TF32).
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
    elif INPUT_PRECISION != "tf32":
        acc = tl.dot(p, zt.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    else:
        zf = zt.to(tl.float32)
        p_hi = _round_tf32(p)
        p_lo = _round_tf32(p - p_hi)
        acc = tl.dot(p_lo, zf, acc, input_precision="tf32")
        acc = tl.dot(p_hi, zf, acc, input_precision="tf32")
    return acc


# Panel GEMM with the normalisation Jacobian in its epilogue (the backward's stage 2 of both Gram ops;
# panel rows k, q tile c; P[k, j] = w(G_kj) r_j, d_k = sum_j w(G_kj) G_kj, w = phi' or the Gaussian weight):
#   acc_k = sum_j P[k, j] z_j                          (= sum_j w(G_kj) zhat_j; GEMM with K = n)
#   dz_k  = (2 g / n^2) (r_k acc_k - proj_k d_k z_k),  d_k = sum_J dpart[k, J], proj_k = r_k^2 or 0
#   (SCALE_GIVEN: grad_ptr holds the whole factor; else 2 g / n^2 is formed here -- legendre_gram's)
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
