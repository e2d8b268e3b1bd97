"""``gram_hsic``, Triton tier, the kernels: the HSIC/CKA statistics of two exact Gaussian or IMQ Grams,
forward and backward, never an ``n x n`` matrix (docs/metrics.md).  The host side is ``gram_hsic_op.py``;
the torch tier, with the derivation, is :mod:`kernelssl.ops.gram_hsic`.

For ``x (n, dx)``, ``y (n, dy)`` (fp32, columns centred by the caller), bandwidths ``(s_x, s_y)`` and
shifts ``(c_x, c_y)`` (each 0, or a power of two ``f``; the torch tier says why)::

    K_ij = k(d2x_ij; s_x),  L_ij = k(d2y_ij; s_y),  d2x_ij = ||x_i||^2 + ||x_j||^2 - 2 x_i . x_j  (>= 0, 0 at i = j)
    k(d2; s) = exp(-d2 / (2 s^2))  (gaussian)  or  s / sqrt(d2 + s^2)  (imq)
    E = K (c_x = 0) or c_x (K - 1) (K - 1 formed without cancellation), F likewise; 0 on the diagonal
    tr = [[sum E.E, sum E.F], [sum E.F, sum F.F]],   rows = [E 1, F 1]

Forward (``_stats_kernel``): program (row tile I, column split c) runs over the column tiles J of its
split, recomputing both Gram tiles (a ``tl.dot`` per K-step over the columns of x and of y), and keeps
its rows' sums and its three trace sums: per tile in fp32, across tiles in fp64 (the estimators are
differences of these sums).  Full rows, not the triangle: every row sum stays in its program (no
atomics, deterministic; the symmetric half would need an ``(n / BLOCK, n)`` buffer of column sums).  It
writes ``rowpart[c, :, rows]`` and ``trpart[program, :]``; the host sums the splits in a fixed order.

Backward (``_grad_kernel``), for one side (``SIDE`` 0: x, 1: y; written for x), with ``S = T + T^T`` from
the upstream ``T = dF/dtr`` and ``g = dF/drows[x]``::

    Gamma_ij = 2 (S_xx E_ij + S_xy F_ij) + g_i + g_j
    W_ij     = 2 f Gamma_ij dK/dd2 = -f Gamma_ij K_ij / s^2  (gaussian),  -f Gamma_ij K_ij^3 / s^2  (imq)
    dx_i     = (sum_j W_ij) x_i - sum_j W_ij x_j,        ds_x = 1/2 f sum_ij Gamma_ij d2_ij K_ij (^3) / s^3
    (f = c_x, or 1 for c_x = 0: dE = f dK)

Program (row tile I, column split c, column chunk of x) recomputes both Gram tiles per column tile and
accumulates ``W X_J`` for its chunk (``tl.dot``, fp32 accumulator) and the row sums of ``W``; it writes
``part[c, rows, chunk]`` (the host sums the splits) and, for the first chunk, its part of ``ds``.

Precision: the Gram tiles' products at ``INPUT_PRECISION`` (``"tf32x3"`` by default: fp32-level error);
the distances by the expansion, so a distance far below the rows' norms loses digits as in any fp32
computation of it.  float64 and half inputs are not handled here (the metrics cast half to fp32, and
:mod:`kernelssl.dispatch` sends float64 to the torch tier).
"""
import triton
import triton.language as tl

from ._jit import _gram_tile


# d2_ij = sq_i + sq_j - 2 x_i . x_j over rows x cols, clamped at 0, exactly 0 where i == j.
@triton.jit
def _sq_dist_tile(x_ptr, sq_ptr, rows, cols, rmask, cmask, stride_n, stride_d, d,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    g = _gram_tile(x_ptr, rows, cols, rmask, cmask, stride_n, stride_d, d, BLOCK_M, BLOCK_N, BLOCK_K,
                   False, INPUT_PRECISION)
    sa = tl.load(sq_ptr + rows, mask=rmask, other=0.0)
    sb = tl.load(sq_ptr + cols, mask=cmask, other=0.0)
    d2 = sa[:, None] + sb[None, :] - 2.0 * g
    d2 = tl.where(d2 < 0.0, 0.0, d2)  # not tl.maximum: NaN must stay NaN
    return tl.where(rows[:, None] == cols[None, :], 0.0, d2)


# k(d2; s): exp(-d2 / (2 s^2)) (KERNEL 0, gaussian) or s / sqrt(d2 + s^2) (KERNEL 1, imq).
@triton.jit
def _kernel_value(d2, s, KERNEL: tl.constexpr):
    if KERNEL == 0:
        return tl.exp(d2 * (-0.5 / (s * s)))
    return tl.where(d2 == 0.0, 1.0, s / tl.sqrt(d2 + s * s))  # k(0) exactly 1 (fast sqrt and division)


# E for the shift c and k = K: K for c = 0, c (K - 1) for c > 0, K - 1 without its cancellation,
#   gaussian  expm1(-d2 / (2 s^2))          imq  (s - r) / r = -d2 / (r (s + r)),  r = sqrt(d2 + s^2)
@triton.jit
def _shifted_value(d2, s, k, c, KERNEL: tl.constexpr):
    if KERNEL == 0:
        near_one = _expm1(d2 * (-0.5 / (s * s)))
    else:
        r = tl.sqrt(d2 + s * s)
        near_one = -d2 / (r * (s + r))
    return tl.where(c != 0.0, near_one * c, k)


# expm1(t) for t <= 0: below |t| = 0.35 the Taylor series to t^8 / 8! by Horner's rule (its truncation
# t^9 / 9! is under 7e-10 of t there, below fp32's rounding); above, exp(t) - 1 (|exp(t) - 1| > 0.29:
# exp's relative error grows at most 2.4x).  Not libdevice's: one form for every target.
@triton.jit
def _expm1(t):
    p = 1.0 + t * (1.0 / 8.0)
    p = 1.0 + t * (1.0 / 7.0) * p
    p = 1.0 + t * (1.0 / 6.0) * p
    p = 1.0 + t * (1.0 / 5.0) * p
    p = 1.0 + t * (1.0 / 4.0) * p
    p = 1.0 + t * (1.0 / 3.0) * p
    p = 1.0 + t * 0.5 * p
    return tl.where(tl.abs(t) < 0.35, t * p, tl.exp(t) - 1.0)


# Forward: program (I, c) over its split's column tiles J (module docstring).
#   rowpart[c, 0, i] = sum_{j in split} E_ij,  rowpart[c, 1, i] = sum F_ij       (fp64)
#   trpart[p, :] = (sum E E, sum E F, sum F F) over rows I x its columns            (fp64)
@triton.jit
def _stats_kernel(
    x_ptr, y_ptr, sqx_ptr, sqy_ptr, sig_ptr, shift_ptr, rowpart_ptr, trpart_ptr,
    stride_xn, stride_xd, stride_yn, stride_yd, stride_rs, stride_rm,
    n, dx, dy, tiles_per_split,
    KERNEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(n, BLOCK_M)
    tm = pid % num_m  # row tiles fastest: the programs of one split share its column tiles in L2
    c = pid // num_m
    rows = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    sx = tl.load(sig_ptr)
    sy = tl.load(sig_ptr + 1)
    cx = tl.load(shift_ptr)
    cy = tl.load(shift_ptr + 1)
    rx = tl.zeros([BLOCK_M], dtype=tl.float64)
    ry = tl.zeros([BLOCK_M], dtype=tl.float64)
    txx = tl.zeros([], dtype=tl.float64)  # scalars: fp64 vectors beside both tiles spilled on sm_75/86 (Triton 3.6)
    txy = tl.zeros([], dtype=tl.float64)
    tyy = tl.zeros([], dtype=tl.float64)
    t0 = c * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(n, BLOCK_N))
    for tn in range(t0, t1):
        cols = tn * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < n
        off = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])  # valid, off the diagonal
        d2 = _sq_dist_tile(x_ptr, sqx_ptr, rows, cols, rmask, cmask, stride_xn, stride_xd, dx,
                           BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        k = tl.where(off, _shifted_value(d2, sx, _kernel_value(d2, sx, KERNEL), cx, KERNEL), 0.0)
        d2 = _sq_dist_tile(y_ptr, sqy_ptr, rows, cols, rmask, cmask, stride_yn, stride_yd, dy,
                           BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        ky = tl.where(off, _shifted_value(d2, sy, _kernel_value(d2, sy, KERNEL), cy, KERNEL), 0.0)
        rx += tl.sum(k, axis=1).to(tl.float64)
        ry += tl.sum(ky, axis=1).to(tl.float64)
        txx += tl.sum(tl.sum(k * k, axis=1), axis=0).to(tl.float64)
        txy += tl.sum(tl.sum(k * ky, axis=1), axis=0).to(tl.float64)
        tyy += tl.sum(tl.sum(ky * ky, axis=1), axis=0).to(tl.float64)
    tl.store(rowpart_ptr + c * stride_rs + rows, rx, mask=rmask)
    tl.store(rowpart_ptr + c * stride_rs + stride_rm + rows, ry, mask=rmask)
    tl.store(trpart_ptr + 3 * pid, txx)
    tl.store(trpart_ptr + 3 * pid + 1, txy)
    tl.store(trpart_ptr + 3 * pid + 2, tyy)


# Backward for one side (SIDE 0: a = x, b = y; SIDE 1: a = y, b = x): program (I, c, chunk) over its
# split's column tiles J (module docstring):
#   part[c, i, chunk] = (sum_j W_ij) a_i - sum_j W_ij a_j,   W = -f_a Gamma K_a (^3) / s_a^2
#   dspart[I + c num_m] = 1/2 f_a sum_ij Gamma_ij d2_ij K_a,ij (^3) / s_a^3           (chunk 0 only)
# Gamma = 2 (S_aa E_a + S_ab E_b) + g_i + g_j (E: the shifted Grams), W and ds times f_a (dE = f_a dK);
# coef = (S_aa, S_ab): the side's entries of S = T + T^T; g = dF/drows[a].
@triton.jit
def _grad_kernel(
    a_ptr, b_ptr, sqa_ptr, sqb_ptr, sig_ptr, shift_ptr, coef_ptr, g_ptr, part_ptr, dspart_ptr,
    stride_an, stride_ad, stride_bn, stride_bd, stride_ps, stride_pn, stride_pd,
    n, da, db, tiles_per_split, splits,
    KERNEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(n, BLOCK_M)
    tm = pid % num_m
    c = (pid // num_m) % splits
    chunk = pid // (num_m * splits)
    rows = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    dcols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < da
    sa = tl.load(sig_ptr)
    sb = tl.load(sig_ptr + 1)
    ca = tl.load(shift_ptr)
    cb = tl.load(shift_ptr + 1)
    fa = tl.where(ca != 0.0, ca, 1.0)
    s_aa = tl.load(coef_ptr)
    s_ab = tl.load(coef_ptr + 1)
    g_i = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    wsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    t0 = c * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(n, BLOCK_N))
    for tn in range(t0, t1):
        cols = tn * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < n
        valid = rmask[:, None] & cmask[None, :]
        d2 = _sq_dist_tile(a_ptr, sqa_ptr, rows, cols, rmask, cmask, stride_an, stride_ad, da,
                           BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        k = _kernel_value(d2, sa, KERNEL)
        d2b = _sq_dist_tile(b_ptr, sqb_ptr, rows, cols, rmask, cmask, stride_bn, stride_bd, db,
                            BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        eb = _shifted_value(d2b, sb, _kernel_value(d2b, sb, KERNEL), cb, KERNEL)
        g_j = tl.load(g_ptr + cols, mask=cmask, other=0.0)
        gam = 2.0 * (s_aa * _shifted_value(d2, sa, k, ca, KERNEL) + s_ab * eb) + g_i[:, None] + g_j[None, :]
        kk = k if KERNEL == 0 else k * k * k
        wk = tl.where(valid, gam * kk * fa, 0.0)
        dsum += tl.sum(wk * d2, axis=1)
        # W_ii = 0: the diagonal is not in the statistics, and its term (a_i - a_i) is exactly 0
        w = tl.where(rows[:, None] == cols[None, :], 0.0, wk * (-1.0 / (sa * sa)))
        wsum += tl.sum(w, axis=1)
        aj = tl.load(a_ptr + cols[:, None] * stride_an + dcols[None, :] * stride_ad,
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(w, aj, acc, input_precision=INPUT_PRECISION)
    ai = tl.load(a_ptr + rows[:, None] * stride_an + dcols[None, :] * stride_ad,
                 mask=rmask[:, None] & dmask[None, :], other=0.0)
    res = wsum[:, None] * ai - acc
    tl.store(part_ptr + c * stride_ps + rows[:, None] * stride_pn + dcols[None, :] * stride_pd, res,
             mask=rmask[:, None] & dmask[None, :])
    if chunk == 0:
        tl.store(dspart_ptr + tm + c * num_m, 0.5 * tl.sum(dsum, axis=0) / (sa * sa * sa))
