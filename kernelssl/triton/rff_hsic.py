"""``rff_hsic``, Triton tier, the kernels: SSL-HSIC's RFF estimator, forward and backward (docs/rff_hsic.md).
The host side (launch configuration, launchers, registration) is ``rff_hsic_op.py``.

What it computes
----------------
``views (K, B, d)`` flattened view-major (row ``n = v*B + i``, N = K*B), two random-feature maps
``(W_A (D_A, d), beta_A)``, ``(W_B (D_B, d), beta_B)``, the kernel scale c (detached).  Nothing here is
specific to a kernel: the maps may sample the IMQ, Gaussian or Laplace kernel
(:func:`kernelssl.ops.rff_hsic.sample_rff`); only the law of W differs::

    u_M   = X W_M^T / c + beta_M                 (N x D_M, never stored)
    Phi_M = s_M cos(u_M),  s_M = sqrt(2 / D_M)
    S_i   = sum_v Phi_A[v*B + i],   mu_M = (1/N) sum_n Phi_M[n]
    HSIC_ZY = (1/(B K (K-1))) sum_i ||S_i - K mu_A||^2 + ||mu_A||^2 / (K-1)     (= the direct form)
    HSIC_ZZ = ||C||_F^2 / N^2,   C = Phibar_B^T Phibar_A   (D_B x D_A),   Phibar = Phi - 1 mu^T

Backward, upstream gradients g_zy, g_zz (0-dim tensors, read in-kernel)::

    dL/dPhi_A[n] = g_zy (2 S_img(n) / (B K (K-1)) - 2 mu_A / N) + g_zz (2/N^2) (Phibar_B C)[n]
    dL/dPhi_B[n] = g_zz (2/N^2) (Phibar_A C^T)[n]
    dL/dx_n      = -(1/c) sum_M ((s_M sin(u_M[n])) * dL/dPhi_M[n]) W_M

Kernels and passes
------------------
Forward (5 launches, 4 when the cross-covariance needs no split):

1. ``_rff_features_kernel`` -- grid ``(cdiv(B, BI), cdiv(D_A, BJ) + cdiv(D_B, BJ))``.  A program owns a
   block of BI images and BJ features of one map and loops over the K views: projection GEMM
   (``tl.dot`` over d, fp32 accumulator; bf16 views under "tf32x3": W split into three bf16 parts,
   three exact bf16 MMAs, see ``_w_split``), cos epilogue, stores its Phi tile (fp32), accumulates the
   per-image sums S in registers and writes deterministic per-program partials: column sums (for mu)
   and, for map A, ``M2_p = sum_{i in p} ||S_i - m_p||^2`` about the block mean m_p.
2. ``_rff_stats_kernel`` -- grid ``(cdiv(D_A, BJ) + cdiv(D_B, BJ),)``: reduces the column-sum partials in
   a fixed order to mu_A, mu_B and the between-block part of HSIC_ZY (Chan's parallel variance
   combination ``sum_i ||S_i - K mu||^2 = sum_p M2_p + sum_p n_p ||m_p - K mu||^2``: no cancellation,
   unlike the direct ``sum_i ||S_i||^2 / (B K (K-1)) - ||mu||^2`` in fp32).
3. ``_rff_cross_cov_kernel`` -- grid ``(tiles of C, SPLIT)``: reads Phi_A, Phi_B tiles, centres them in
   registers and accumulates ``C_tile += Phibar_B^T Phibar_A`` over its share of the N rows (explicit
   centring, as in the torch path: the uncentred ``Phi_B^T Phi_A - N mu_B mu_A^T`` would cancel ~sqrt(N)
   digits' worth).  SPLIT > 1 (chosen from the SM count so the last wave is nearly full, see
   ``_wave_split``) writes per-split partials that
   ``_rff_cov_reduce_kernel`` sums in a fixed order; each also writes ``||C_tile||^2``.
4. ``_rff_finalize_kernel`` -- one program: sums the HSIC_ZY and HSIC_ZZ partials into the two 0-dim
   fp32 outputs.

Backward (2 launches):

5. ``_rff_feature_grad_kernel`` -- grid ``(cdiv(N, BM), cdiv(D_A, BJ) + cdiv(D_B, BJ))``.  A program owns
   BM rows and BJ features of one map: recomputes ``u = X W^T / c + beta`` (GEMM over d) for ``sin``,
   forms ``Phibar_other C`` (GEMM over D_other, reading the stored Phi of the other map), adds the
   HSIC_ZY term from S and mu and applies ``-s sin(u) / c``: ``T = dL/du`` (fp32, ``N x (D_A + D_B)``,
   stored).  Every (row block, feature block) is computed once, whatever d.
6. ``_rff_dx_kernel`` -- grid ``(cdiv(N, BM), cdiv(d, BN))``: ``dL/dX = T [W_A; W_B]``, one GEMM with
   K = D_A + D_B, stored in the views' dtype.
   (Why two launches: a single fused launch over ``(rows, d-column blocks)`` would recompute ``u``
   and ``Phibar_other C`` for every column block of dL/dX -- 4.8x the essential backward flops at
   d = 2048 -- with 32-wide tiles that re-read the Phi panel D/32 times.  The cost of the split is one
   write and one read of T: 64 MiB at the paper shape.)

Store Phi or recompute it?  Phi (the cos values, not the pre-activation) is stored in fp32:
``4 N (D_A + D_B)`` bytes, 64 MiB at the paper shape (N = 16384, d = 256, D = 512).  Both consumers
need whole rows or columns of Phi across all features: the centred cross-covariance needs mu first (a
second pass over N), and the backward needs full rows of the *other* map's Phi.  Recomputing instead
would redo the projection once per feature block of the other map: 8x both projections with 64-wide
tiles, ~60 extra GFLOP, against ~20 us to read 64 MiB back from HBM.  The pre-activation u is *not*
stored: the backward recomputes it (one ``2 N d D`` GEMM per map; sin cannot be recovered from the
stored cos without its sign).  Saved for backward: Phi_A, Phi_B, S (B x D_A), mu_A, mu_B, C.  Peak
extra memory at the paper shape ~ 64 + 8 + 1 MiB, plus the split partials (SPLIT x 1 MiB) in the
forward, and T (64 MiB fp32) and the gradient (16 MiB fp32) in the backward: ~155 MiB, against
~330 MiB measured for the eager form (CPU, resident set).

Work at the paper shape (GFLOP): projections 4.3 per map, cross-covariance 8.6.  Fused: forward 17.2,
backward 34.4 (u recompute 8.6, the two ``Phibar C`` products 17.2, back-projection 8.6) = 51.5; the
eager form (features of map A computed twice, autograd backward) = 51.6; the torch path 43.  The
fused kernels win on memory traffic (eager makes ~30 elementwise passes over N x D fp32 tensors) and
launches (7 instead of ~60), not on FLOPs.  Every fp32 GEMM runs at the op's ``input_precision``,
``"tf32x3"`` by default (three TF32 tensor-core products, ~fp32 accuracy); with ``"ieee"`` (FMA-based
``tl.dot``, no tensor cores) a 3x speed-up over eager is not expected.  Not measured (no GPU here).

Numerics and contracts
----------------------
* Inputs fp32 / bf16 / fp16 (views; maps in any float dtype), upcast to fp32 right after each load;
  fp32 accumulation everywhere; the two outputs are 0-dim fp32; the gradient is in the views' dtype.
* float64 views are routed to the torch tier (:mod:`kernelssl.dispatch`) and return float64:
  a float64 caller asked for float64 accuracy, which an fp32 kernel cannot give.  Likewise when a map
  (W, beta) requires grad (the fused backward gives dL/dX only): the torch path differentiates them.
* ``tl.dot`` precision: every GEMM here has an fp32 operand (the maps, Phi, C, T), so all of
  them run at the op's ``input_precision``: ``"tf32x3"`` by default, ``"ieee"``, or ``"tf32"`` (the
  default only under ``torch.backends.cuda.matmul.allow_tf32``); never a silent plain TF32.  Emulated
  on the CPU at the paper shape (tests), tf32x3's error against float64 is within 1.1x of ieee's.
* Deterministic: no atomics; every reduction is per-program partials reduced in a fixed order, so two
  runs give bitwise-equal outputs and gradients (on a given device and configuration).
* The kernel scale c is read in-kernel from a 1-element tensor (never on the host) and gets no gradient.
* No host syncs, no Python branches on tensor values; block sizes depend on shapes only.
* Block sizes are fixed heuristics (one config, no autotuning: the interpreter accepts only one, and a
  fixed config keeps reduction orders reproducible across processes).  They are not timed on a GPU:
  this module was developed without one (see the tests).
* Not done: in-kernel philox generation of the RFF maps (the maps are D x d, drawn once per step; a
  gain would have to be measured on a GPU first).

* ``tl.cos`` / ``tl.sin`` compile (sm_90, Triton 3.8) to libdevice's full-range fp32 code -- a
  three-term Cody-Waite reduction by pi/2 with a Payne-Hanek slow path for large arguments, read off
  the PTX -- not to the ``cos.approx`` instruction, whose error grows outside [-pi, pi]; ``u`` needs
  no range reduction of its own.  Still GPU-only unknowns: TF32 rounding (the interpreter computes
  every ``tl.dot`` in full fp32); the GPU tests compare against float64 at the paper shape.
* Block sizes were chosen offline: every launch the GPU path issues is compiled for sm_90 with the
  launch's own specialisation and checked for register spills (``tests/compile_targets.py``), and the
  GPU block sizes run through the interpreter at a small shape against the reference.
"""
import triton
import triton.language as tl

from ._jit import _round_bf16


# Forward tile of one map (A or B) for BI images x BJ features, looping over the K views:
#   u = x W^T / c + beta;  Phi = s cos(u), s = sqrt(2/D)  -> stored (fp32, row n = v*B + i)
#   S_i = sum_v Phi[v*B + i]  (stored for map A);  colsum_p = sum_{i in block} S_i  (partial)
#   map A: M2_p = sum_{i in block} ||S_i - colsum_p / n_p||^2  (partial of the HSIC_ZY numerator)
# Backward: see _rff_feature_grad_kernel (u is recomputed there, never stored).
@triton.jit
def _features_tile(
    x_ptr, w_ptr, beta_ptr, phi_ptr, s_ptr, colsum_ptr, m2_ptr,
    stride_xv, stride_xb, stride_xd, stride_wj, stride_wd, stride_beta,
    inv_c, pid_i, pid_j, num_j,
    K, B, d, D,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, IS_A: tl.constexpr, W_SPLIT: tl.constexpr,
):
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)  # int64 (pid_i is)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_k = tl.arange(0, BLOCK_K)
    mask_i = offs_i < B
    mask_j = offs_j < D
    tile_mask = mask_i[:, None] & mask_j[None, :]
    amp = tl.sqrt(tl.full([], 2.0, tl.float32) / D)
    beta = tl.load(beta_ptr + offs_j * stride_beta, mask=mask_j, other=0.0).to(tl.float32)
    zero64 = pid_i * 0  # int64 zero: keeps v * stride in int64
    s_acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for v in range(0, K):
        v64 = zero64 + v
        x_rows = x_ptr + v64 * stride_xv + offs_i[:, None] * stride_xb
        acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < d
            xt = tl.load(x_rows + kk[None, :] * stride_xd, mask=mask_i[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(
                w_ptr + offs_j[None, :] * stride_wj + kk[:, None] * stride_wd,
                mask=mask_k[:, None] & mask_j[None, :],
                other=0.0,
            )
            if W_SPLIT == 0:
                acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision=PRECISION)
            else:  # bf16 x exact; W = w1 + w2 + w3 (+ <= 2^-24 |W|), three exact bf16 x bf16 products
                w = wt.to(tl.float32)
                if W_SPLIT == 1:
                    w1 = w.to(tl.bfloat16)
                    r1 = w - w1.to(tl.float32)
                    w2 = r1.to(tl.bfloat16)
                    w3 = (r1 - w2.to(tl.float32)).to(tl.bfloat16)
                else:  # interpreter: the same split with integer rounding, fp32 operands
                    xt = xt.to(tl.float32)
                    w1 = _round_bf16(w)
                    r1 = w - w1
                    w2 = _round_bf16(r1)
                    w3 = _round_bf16(r1 - w2)
                acc = tl.dot(xt, w3, acc)
                acc = tl.dot(xt, w2, acc)
                acc = tl.dot(xt, w1, acc)
        phi = amp * tl.cos(acc * inv_c + beta[None, :])
        phi = tl.where(tile_mask, phi, 0.0)
        rows = v64 * B + offs_i
        tl.store(phi_ptr + rows[:, None] * D + offs_j[None, :], phi, mask=tile_mask)
        s_acc += phi
    colsum = tl.sum(s_acc, axis=0)
    tl.store(colsum_ptr + pid_i * D + offs_j, colsum, mask=mask_j)
    if IS_A:
        tl.store(s_ptr + offs_i[:, None] * D + offs_j[None, :], s_acc, mask=tile_mask)
        n_p = tl.minimum(B - pid_i * BLOCK_I, BLOCK_I).to(tl.float32)
        dev = tl.where(tile_mask, s_acc - (colsum / n_p)[None, :], 0.0)
        tl.store(m2_ptr + pid_i * num_j + pid_j, tl.sum(tl.sum(dev * dev, axis=1), axis=0))


# Forward pass 1 (both maps in one launch): program (i, j) runs _features_tile for map A when
# j < cdiv(D_A, BJ), else for map B.  Math and backward: see _features_tile.
@triton.jit
def _rff_features_kernel(
    x_ptr, wa_ptr, ba_ptr, wb_ptr, bb_ptr, c_ptr,
    phia_ptr, phib_ptr, s_ptr, colsum_a_ptr, colsum_b_ptr, m2_ptr,
    stride_xv, stride_xb, stride_xd,
    stride_waj, stride_wad, stride_ba, stride_wbj, stride_wbd, stride_bb,
    K, B, d, D_A, D_B,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    W_SPLIT: tl.constexpr,
):
    pid_i = tl.program_id(0).to(tl.int64)
    pid_j = tl.program_id(1).to(tl.int64)
    inv_c = 1.0 / tl.load(c_ptr).to(tl.float32)
    num_ja = tl.cdiv(D_A, BLOCK_J)
    if pid_j < num_ja:
        _features_tile(
            x_ptr, wa_ptr, ba_ptr, phia_ptr, s_ptr, colsum_a_ptr, m2_ptr,
            stride_xv, stride_xb, stride_xd, stride_waj, stride_wad, stride_ba,
            inv_c, pid_i, pid_j, num_ja, K, B, d, D_A,
            BLOCK_I, BLOCK_J, BLOCK_K, PRECISION, True, W_SPLIT,
        )
    else:
        _features_tile(
            x_ptr, wb_ptr, bb_ptr, phib_ptr, s_ptr, colsum_b_ptr, m2_ptr,
            stride_xv, stride_xb, stride_xd, stride_wbj, stride_wbd, stride_bb,
            inv_c, pid_i, pid_j - num_ja, num_ja, K, B, d, D_B,
            BLOCK_I, BLOCK_J, BLOCK_K, PRECISION, False, W_SPLIT,
        )


# Column statistics of one map for BJ features, over the P = cdiv(B, BI) image-block partials:
#   mu_j = (1/N) sum_p colsum_p[j]
#   map A: part = (1/(B K (K-1))) sum_p n_p sum_j (colsum_p[j]/n_p - K mu_j)^2 + sum_j mu_j^2 / (K-1)
#   (the between-block term of sum_i ||S_i - K mu||^2, plus the ||mu||^2/(K-1) term of HSIC_ZY).
# No backward of its own (the fused backward uses mu directly).
@triton.jit
def _stats_tile(
    colsum_ptr, mu_ptr, zy_part_ptr, pid_j, num_p, K, B, D,
    BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, HAS_ZY: tl.constexpr,
):
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < D
    offs_p0 = tl.arange(0, BLOCK_P)
    n_f = tl.full([], 1.0, tl.float32) * K * B
    tot = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for p0 in range(0, num_p, BLOCK_P):
        offs_p = p0 + offs_p0
        m = (offs_p < num_p)[:, None] & mask_j[None, :]
        cs = tl.load(colsum_ptr + offs_p[:, None].to(tl.int64) * D + offs_j[None, :], mask=m, other=0.0)
        tot += tl.sum(cs, axis=0)
    mu = tot / n_f
    tl.store(mu_ptr + offs_j, mu, mask=mask_j)
    if HAS_ZY:
        kmu = mu * K
        acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
        for p0 in range(0, num_p, BLOCK_P):
            offs_p = p0 + offs_p0
            mask_p = offs_p < num_p
            m = mask_p[:, None] & mask_j[None, :]
            cs = tl.load(colsum_ptr + offs_p[:, None].to(tl.int64) * D + offs_j[None, :], mask=m, other=0.0)
            n_p = tl.where(mask_p, tl.minimum(B - offs_p * BLOCK_I, BLOCK_I), 1).to(tl.float32)
            dev = tl.where(m, cs / n_p[:, None] - kmu[None, :], 0.0)
            acc += tl.sum(n_p[:, None] * dev * dev, axis=0)
        denom = n_f * (K - 1)
        part = tl.sum(acc, axis=0) / denom + tl.sum(mu * mu, axis=0) / (K - 1)
        tl.store(zy_part_ptr + pid_j, part)


# Forward pass 2 (both maps in one launch): program j runs _stats_tile for map A (j < cdiv(D_A, BJ))
# or map B.  Math: see _stats_tile.
@triton.jit
def _rff_stats_kernel(
    colsum_a_ptr, colsum_b_ptr, mu_a_ptr, mu_b_ptr, zy_part_ptr,
    num_p, K, B, D_A, D_B,
    BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_ja = tl.cdiv(D_A, BLOCK_J)
    if pid < num_ja:
        _stats_tile(colsum_a_ptr, mu_a_ptr, zy_part_ptr, pid, num_p, K, B, D_A, BLOCK_P, BLOCK_J, BLOCK_I, True)
    else:
        _stats_tile(colsum_b_ptr, mu_b_ptr, zy_part_ptr, pid - num_ja, num_p, K, B, D_B,
                    BLOCK_P, BLOCK_J, BLOCK_I, False)


# Forward pass 3: centred cross-covariance tile over one split of the rows,
#   C[jb, ja] (+)= sum_n (Phi_B[n, jb] - mu_B[jb]) (Phi_A[n, ja] - mu_A[ja])
# SPLIT_ONE: the tile is final -> store C and ||C_tile||^2; else store the split's partial tile.
# Backward: dHSIC_ZZ/dPhi_A = (2/N^2) Phibar_B C, dHSIC_ZZ/dPhi_B = (2/N^2) Phibar_A C^T (in the bwd kernel).
@triton.jit
def _rff_cross_cov_kernel(
    phia_ptr, phib_ptr, mu_a_ptr, mu_b_ptr, out_ptr, sumsq_ptr,
    N, D_A, D_B, rows_per_split,
    BLOCK_N: tl.constexpr, BLOCK_JB: tl.constexpr, BLOCK_JA: tl.constexpr,
    PRECISION: tl.constexpr, SPLIT_ONE: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    num_ja = tl.cdiv(D_A, BLOCK_JA)
    pid_jb = pid_t // num_ja
    pid_ja = pid_t % num_ja
    offs_ja = pid_ja * BLOCK_JA + tl.arange(0, BLOCK_JA)
    offs_jb = pid_jb * BLOCK_JB + tl.arange(0, BLOCK_JB)
    mask_ja = offs_ja < D_A
    mask_jb = offs_jb < D_B
    mu_a = tl.load(mu_a_ptr + offs_ja, mask=mask_ja, other=0.0)
    mu_b = tl.load(mu_b_ptr + offs_jb, mask=mask_jb, other=0.0)
    start = pid_s * rows_per_split
    end = tl.minimum(start + rows_per_split, N)
    offs_n0 = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_JB, BLOCK_JA), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        mask_n = offs_n < end
        ma = mask_n[:, None] & mask_ja[None, :]
        pa = tl.load(phia_ptr + offs_n[:, None] * D_A + offs_ja[None, :], mask=ma, other=0.0)
        pa = tl.where(ma, pa - mu_a[None, :], 0.0)
        mb = mask_jb[:, None] & mask_n[None, :]
        pbt = tl.load(phib_ptr + offs_n[None, :] * D_B + offs_jb[:, None], mask=mb, other=0.0)
        pbt = tl.where(mb, pbt - mu_b[:, None], 0.0)
        acc = tl.dot(pbt, pa, acc, input_precision=PRECISION)
    tile_mask = mask_jb[:, None] & mask_ja[None, :]
    tile = offs_jb[:, None] * D_A + offs_ja[None, :]
    if SPLIT_ONE:
        tl.store(out_ptr + tile, acc, mask=tile_mask)
        tl.store(sumsq_ptr + pid_t, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    else:
        tl.store(out_ptr + pid_s * D_B * D_A + tile, acc, mask=tile_mask)


# Forward pass 3b (SPLIT > 1): C[tile] = sum_s partial_s[tile] in split order; ||C_tile||^2 partial.
@triton.jit
def _rff_cov_reduce_kernel(
    part_ptr, cov_ptr, sumsq_ptr, D_A, D_B, SPLIT,
    BLOCK_JB: tl.constexpr, BLOCK_JA: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    num_ja = tl.cdiv(D_A, BLOCK_JA)
    offs_ja = (pid_t % num_ja) * BLOCK_JA + tl.arange(0, BLOCK_JA)
    offs_jb = (pid_t // num_ja) * BLOCK_JB + tl.arange(0, BLOCK_JB)
    tile_mask = (offs_jb < D_B)[:, None] & (offs_ja < D_A)[None, :]
    tile = offs_jb[:, None] * D_A + offs_ja[None, :]
    stride_s = (pid_t * 0 + D_B) * D_A  # int64
    acc = tl.zeros((BLOCK_JB, BLOCK_JA), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + s * stride_s + tile, mask=tile_mask, other=0.0)
    tl.store(cov_ptr + tile, acc, mask=tile_mask)
    tl.store(sumsq_ptr + pid_t, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


# Forward pass 4 (one program): HSIC_ZY = sum(M2_p) / (B K (K-1)) + sum(zy_part);
# HSIC_ZZ = sum(||C_tile||^2) / N^2.  Fixed-order sums (deterministic).
@triton.jit
def _rff_finalize_kernel(
    m2_ptr, zy_part_ptr, sumsq_ptr, zy_ptr, zz_ptr,
    num_m2, num_zy, num_sq, K, B,
    BLOCK: tl.constexpr,
):
    offs0 = tl.arange(0, BLOCK)
    n_f = tl.full([], 1.0, tl.float32) * K * B
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for o in range(0, num_m2, BLOCK):
        acc += tl.load(m2_ptr + o + offs0, mask=o + offs0 < num_m2, other=0.0)
    zy = tl.sum(acc, axis=0) / (n_f * (K - 1))
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for o in range(0, num_zy, BLOCK):
        acc += tl.load(zy_part_ptr + o + offs0, mask=o + offs0 < num_zy, other=0.0)
    zy += tl.sum(acc, axis=0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for o in range(0, num_sq, BLOCK):
        acc += tl.load(sumsq_ptr + o + offs0, mask=o + offs0 < num_sq, other=0.0)
    zz = tl.sum(acc, axis=0) / (n_f * n_f)
    tl.store(zy_ptr, zy)
    tl.store(zz_ptr, zz)


# Backward, pass 1: the gradient w.r.t. the pre-activation u of one map M, for BM rows x BJ features:
#   u = x W_M^T / c + beta_M                 (recomputed: GEMM over d; never stored by the forward)
#   G = Phibar_other C_M                     (GEMM over D_other; C_A = C, C_B = C^T via strides)
#   dL/dPhi = coef_zz G [+ coef_zy S_img - coef_mu mu_A   for map A]
#   T = dL/dPhi * (-s_M sin(u) / c)          -> stored (fp32) at columns t_col0 + j of the (N, D_A + D_B) T
# Forward: Phi_M = s_M cos(u) (see _features_tile).  Each (row block, feature block) is computed once.
@triton.jit
def _feature_grad_tile(
    x_ptr, x_rows, offs_m, img, mask_m,
    w_ptr, beta_ptr, other_ptr, mu_other_ptr, cov_ptr, s_ptr, mu_ptr, t_ptr,
    stride_xd, stride_wj, stride_wd, stride_beta, stride_cl, stride_cj,
    t_col0, stride_t, inv_c, coef_zz, coef_zy, coef_mu, pid_j,
    d, D, D_other,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr, HAS_ZY: tl.constexpr,
):
    offs_k0 = tl.arange(0, BLOCK_K)
    offs_l0 = tl.arange(0, BLOCK_L)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < D
    amp = tl.sqrt(tl.full([], 2.0, tl.float32) / D)
    # projection GEMM (recompute u)
    u = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + offs_k0
        mask_k = kk < d
        xt = tl.load(x_ptr + x_rows[:, None] + kk[None, :] * stride_xd,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_j[None, :] * stride_wj + kk[:, None] * stride_wd,
                     mask=mask_k[:, None] & mask_j[None, :], other=0.0)
        u = tl.dot(xt.to(tl.float32), wt.to(tl.float32), u, input_precision=PRECISION)
    beta = tl.load(beta_ptr + offs_j * stride_beta, mask=mask_j, other=0.0).to(tl.float32)
    sin_u = tl.sin(u * inv_c + beta[None, :])
    # cross-covariance term: Phibar_other[rows, :] @ C_M[:, j-block]
    g = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    for l0 in range(0, D_other, BLOCK_L):
        ll = l0 + offs_l0
        mask_l = ll < D_other
        mo = mask_m[:, None] & mask_l[None, :]
        po = tl.load(other_ptr + offs_m[:, None] * D_other + ll[None, :], mask=mo, other=0.0)
        mu_o = tl.load(mu_other_ptr + ll, mask=mask_l, other=0.0)
        po = tl.where(mo, po - mu_o[None, :], 0.0)
        cm = tl.load(cov_ptr + ll[:, None] * stride_cl + offs_j[None, :] * stride_cj,
                     mask=mask_l[:, None] & mask_j[None, :], other=0.0)
        g = tl.dot(po, cm, g, input_precision=PRECISION)
    gphi = coef_zz * g
    if HAS_ZY:
        st = tl.load(s_ptr + img[:, None] * D + offs_j[None, :], mask=mask_m[:, None] & mask_j[None, :], other=0.0)
        mu = tl.load(mu_ptr + offs_j, mask=mask_j, other=0.0)
        gphi += coef_zy * st - coef_mu * mu[None, :]
    tile_mask = mask_m[:, None] & mask_j[None, :]
    t = tl.where(tile_mask, gphi * sin_u * (-amp * inv_c), 0.0)
    tl.store(t_ptr + offs_m[:, None] * stride_t + (t_col0 + offs_j[None, :]), t, mask=tile_mask)


# Backward pass 1 (grid: row blocks x (feature blocks of A + feature blocks of B)): T = [T_A | T_B]
# (N x (D_A + D_B), fp32) by _feature_grad_tile, with
#   coef_zz = g_zz 2/N^2,  coef_zy = g_zy 2/(B K (K-1)),  coef_mu = g_zy 2/N
# (g_zy, g_zz: upstream gradients of HSIC_ZY, HSIC_ZZ, loaded from memory).
@triton.jit
def _rff_feature_grad_kernel(
    x_ptr, wa_ptr, ba_ptr, wb_ptr, bb_ptr, c_ptr, gzy_ptr, gzz_ptr,
    phia_ptr, phib_ptr, s_ptr, mu_a_ptr, mu_b_ptr, cov_ptr, t_ptr,
    stride_xv, stride_xb, stride_xd,
    stride_waj, stride_wad, stride_ba, stride_wbj, stride_wbd, stride_bb,
    K, B, d, D_A, D_B,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_j = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flat row n = v*B + i (int64)
    n_rows = (pid_m * 0 + K) * B
    mask_m = offs_m < n_rows
    v = offs_m // B
    img = offs_m % B
    x_rows = v * stride_xv + img * stride_xb
    inv_c = 1.0 / tl.load(c_ptr).to(tl.float32)
    g_zy = tl.load(gzy_ptr).to(tl.float32)
    g_zz = tl.load(gzz_ptr).to(tl.float32)
    n_f = tl.full([], 1.0, tl.float32) * K * B
    coef_zz = g_zz * 2.0 / (n_f * n_f)
    coef_zy = g_zy * 2.0 / (n_f * (K - 1))
    coef_mu = g_zy * 2.0 / n_f
    stride_t = D_A + D_B
    num_ja = tl.cdiv(D_A, BLOCK_J)
    if pid_j < num_ja:  # map A: other = Phi_B, C_A[l, j] = C[l, j] (C is D_B x D_A, row-major)
        _feature_grad_tile(
            x_ptr, x_rows, offs_m, img, mask_m,
            wa_ptr, ba_ptr, phib_ptr, mu_b_ptr, cov_ptr, s_ptr, mu_a_ptr, t_ptr,
            stride_xd, stride_waj, stride_wad, stride_ba, D_A, 1,
            0, stride_t, inv_c, coef_zz, coef_zy, coef_mu, pid_j,
            d, D_A, D_B,
            BLOCK_M, BLOCK_J, BLOCK_K, BLOCK_L, PRECISION, True,
        )
    else:  # map B: other = Phi_A, C_B[l, j] = C[j, l]
        _feature_grad_tile(
            x_ptr, x_rows, offs_m, img, mask_m,
            wb_ptr, bb_ptr, phia_ptr, mu_a_ptr, cov_ptr, s_ptr, mu_a_ptr, t_ptr,
            stride_xd, stride_wbj, stride_wbd, stride_bb, 1, D_A,
            D_A, stride_t, inv_c, coef_zz, coef_zy, coef_mu, pid_j - num_ja,
            d, D_B, D_A,
            BLOCK_M, BLOCK_J, BLOCK_K, BLOCK_L, PRECISION, False,
        )


# Backward pass 2 (grid: row blocks x column blocks of d):
#   dL/dX[rows, cols] = T_A[rows] W_A[:, cols] + T_B[rows] W_B[:, cols]   (one GEMM, K = D_A + D_B),
#   stored in the views' dtype.  Forward: u_M = X W_M^T / c + beta_M (the 1/c is already in T).
@triton.jit
def _rff_dx_kernel(
    t_ptr, wa_ptr, wb_ptr, grad_ptr,
    stride_waj, stride_wad, stride_wbj, stride_wbd,
    N, d, D_A, D_B,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows < N
    mask_n = cols < d
    offs_k0 = tl.arange(0, BLOCK_K)
    stride_t = D_A + D_B
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D_A, BLOCK_K):
        kk = k0 + offs_k0
        mask_k = kk < D_A
        tt = tl.load(t_ptr + rows[:, None] * stride_t + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(wa_ptr + kk[:, None] * stride_waj + cols[None, :] * stride_wad,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(tt, wt.to(tl.float32), acc, input_precision=PRECISION)
    for k0 in range(0, D_B, BLOCK_K):
        kk = k0 + offs_k0
        mask_k = kk < D_B
        tt = tl.load(t_ptr + rows[:, None] * stride_t + (D_A + kk[None, :]), mask=mask_m[:, None] & mask_k[None, :],
                     other=0.0)
        wt = tl.load(wb_ptr + kk[:, None] * stride_wbj + cols[None, :] * stride_wbd,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(tt, wt.to(tl.float32), acc, input_precision=PRECISION)
    out = grad_ptr + rows[:, None] * d + cols[None, :]
    tl.store(out, acc.to(grad_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
