"""``legendre_gram``, Triton tier, the kernels: SFRIK's Legendre-polynomial Gram accumulation (docs/legendre_gram.md),
forward and backward.  The host side (launch configuration, launchers, registration) is ``legendre_gram_op.py``.

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

Precision (docs/numerics.md): Gram products of fp16/bf16 rows go to the tensor cores as they are (exact
products, fp32 accumulation); fp32 rows use the op's ``input_precision``: ``"tf32x3"`` by default (three
TF32 tensor-core products per fp32 product, fp32-level error: ``tests/test_legendre_gram_triton.py``
emulates it at the paper shape), ``"ieee"`` (FMA units) or ``"tf32"`` (the default only when torch's
``torch.backends.cuda.matmul.allow_tf32`` is on).  The backward GEMM ``P @ Z`` keeps
``P`` at (near) fp32 precision on tensor cores: bf16 inputs split ``P = P_hi + P_lo`` into two bf16
parts (2 bf16 MMAs, ``|P - P_hi - P_lo| <~ 2^-17 |P|``); fp16 inputs, whose exponent range is too narrow
for the split, round ``P`` to two TF32 parts and multiply the fp16 rows converted to fp32, exact in TF32
(2 TF32 MMAs, ``<~ 2^-22 |P|``).  Both are far below the final rounding of the gradient to the input
dtype (2^-9 / 2^-12).  float64 inputs are not handled here: :mod:`kernelssl.dispatch` sends them to the
torch tier (float64 end to end).

Interpreter (``TRITON_INTERPRET=1``, CPU tests): its ``tl.dot`` on bf16 operands is wrong, so the
operands of every dot are converted to fp32 first when interpreting (``DOT_F32``); half-precision
products are exact in fp32, so this computes what the tensor cores compute.  Its fp32 -> bf16 cast
truncates where the GPU rounds to nearest even, so when interpreting, the bf16 split and the final bf16
store round with integer ops (``_round_bf16``).  Block sizes are small (32, phi' tiles 32 x 16).
"""
import triton
import triton.language as tl

from ._jit import _panel_tile, _triangle_rows, _unit_gram_tile


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
    ti, tj, rows, cols, rmask, cmask = _triangle_rows(pid, n, BLOCK)
    g, _ = _unit_gram_tile(z_ptr, rinv_ptr, rows, cols, rmask, cmask, stride_zn, stride_zq, q,
                           BLOCK, BLOCK, BLOCK_K, DOT_F32, INPUT_PRECISION)
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
    lrows, rows, cols, rmask, cmask, tn = _panel_tile(pid, row0, panel_rows, n, BLOCK_M, BLOCK_N, GROUP_M)
    g, r_j = _unit_gram_tile(z_ptr, rinv_ptr, rows, cols, rmask, cmask, stride_zn, stride_zq, q,
                             BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, INPUT_PRECISION)
    dphi = _phi_prime(g, q, COEF, L)
    if NORMALIZE:
        projected = tl.load(proj_ptr + rows, mask=rmask, other=0.0) != 0.0
        dphi = tl.where((rows[:, None] == cols[None, :]) & projected[:, None], 0.0, dphi)
    mask = rmask[:, None] & cmask[None, :]
    tl.store(p_ptr + lrows[:, None] * stride_pm + cols[None, :] * stride_pn, dphi * r_j[None, :], mask=mask)
    if NORMALIZE:
        d = tl.sum(tl.where(mask, dphi * g, 0.0), axis=1)
        tl.store(dpart_ptr + lrows * stride_dm + tn * stride_dn, d, mask=rmask)
