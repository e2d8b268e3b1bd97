"""``gaussian_gram``, Triton tier, the kernels: the Gaussian-potential Gram log-mean (docs/gaussian_gram.md),
forward and backward -- Wang & Isola's uniformity on the same tiles as SFRIK's Legendre Gram mean
(``_jit.py``), another epilogue.  The host side is ``gaussian_gram_op.py``.

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
  removes it exactly (the reasoning of ``legendre_gram``'s ``_gram_dphi_kernel``).  Two paths, both
  recomputing the Gram tiles:
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

Precision, block sizes and the interpreter's quirks: as legendre_gram (``_common.gram_config``; fp32
Gram tiles at ``input_precision``, ``"tf32x3"`` by default; 16-bit rows on the tensor cores as they are;
the backward GEMM's bf16 / TF32 splits of ``P``; fp32 accumulation, half operands upcast right after the
load under the interpreter).  The exponent's error is ``2t`` times the Gram entry's (a few fp32 ulps of
1), so the value's absolute error and the gradient's relative error grow with t as in any fp32
computation of this formula.  float64 inputs are not handled here: :mod:`kernelssl.dispatch` sends
them to the torch tier (float64 end to end).
"""
import triton
import triton.language as tl

from ._jit import _gram_tile, _panel_dot, _panel_tile, _round_bf16, _triangle_rows, _unit_gram_tile


# Forward.  Views b = 0..P-1 stacked as rows b n .. b n + n - 1 of z (one launch for all views: grid
# axis 0 = b * num_parts + p).  Program p of view b owns Gram tile (I, J), J <= I, p = I (I + 1)/2 + J;
# over its valid entries (inside n x n, and i != j when EXCLUDE), x_ij = two_t (r_i r_j z_i . z_j - 1):
#   mpart[b, p] = max x_ij  (-inf if none),   spart[b, p] = w_IJ sum exp(x_ij - mpart[b, p])  (0 if none),
#   w = 1 on the diagonal tile, 2 off it (G = G^T).
# Backward: _gram_weights_kernel + _jit's _panel_matmul_kernel (tiles recomputed).
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
    ti, tj, rows, cols, rmask, cmask = _triangle_rows(pid, n, BLOCK)
    g, _ = _unit_gram_tile(z_ptr, rinv_ptr, rows, cols, rmask, cmask, stride_zn, stride_zq, q,
                           BLOCK, BLOCK, BLOCK_K, DOT_F32, INPUT_PRECISION)
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
#   program 0: scale = g * 2 two_t / S'  (the factor of _jit's _panel_matmul_kernel, SCALE_GIVEN).
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
    lrows, rows, cols, rmask, cmask, tn = _panel_tile(pid, row0, panel_rows, n, BLOCK_M, BLOCK_N, GROUP_M)
    g, r_j = _unit_gram_tile(z_ptr, rinv_ptr, rows, cols, rmask, cmask, stride_zn, stride_zq, q,
                             BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, INPUT_PRECISION)
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
# dtype, b = k // n the row's view (the Jacobian as in _jit's _panel_matmul_kernel).
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
