"""``gram_hsic``, torch tier: the sufficient statistics of HSIC/CKA for exact Gaussian and IMQ Grams,
streamed over Gram tiles, forward and backward, without an ``n x n`` matrix (docs/metrics.md).

For ``m`` representations ``x_a (n, d_a)`` (columns centred by the caller; HSIC does not change), each
with its bandwidth ``s_a`` (a 0-d tensor) and its shift ``c_a`` (a 0-d tensor: 0, or a power of two
``f_a > 0``; :func:`gram_shift`), Grams ``K_a,ij = k(||x_a,i - x_a,j||^2; s_a)``::

    gaussian  k(d2; s) = exp(-d2 / (2 s^2))        imq  k(d2; s) = s / sqrt(d2 + s^2)
    E_a,ij    = K_a,ij (c_a = 0),  f_a (K_a,ij - 1) (c_a = f_a > 0)  for i != j;   0 for i = j
    tr[a, b]  = sum_ij E_a,ij E_b,ij   (m, m)       rows[a, i] = sum_j E_a,ij   (m, n)

Both HSIC estimators are unchanged by adding a constant to a kernel and scale with it, so they follow
from these, ``n`` and the diagonal of ``K_a`` (1) or of ``f_a (K_a - 11^T)`` (0), divided by ``f_a f_b``
(:mod:`kernelssl.metrics.similarity`).  The shift, its scale and the missing diagonal keep the
information in numbers of order 1: a Gram whose entries are all near 1 (a bandwidth far above the data's
scale) is carried as ``f (K - 1)``, ``K - 1`` computed directly (``expm1``; for imq ``-d2 / (r (s + r))``,
``r = sqrt(d2 + s^2)``), where ``K`` itself would round to 1 in float32 (measured before: a float32
Gaussian CKA of -0.957 for 0.601 at a bandwidth 1000x the data's spread), and ``f`` keeps the products
of two such entries (~``(d2 / s^2)^2``) from underflowing; a Gram near the identity keeps its tiny
off-diagonal entries out of a sum with the diagonal's ``n`` (an unbiased ``HSIC(K, K)`` of 6e-216 came
out 0).  Squared distances by the expansion
``||a_i||^2 + ||a_j||^2 - 2 a_i . a_j`` (one GEMM per tile), clamped at 0, exactly 0 on the diagonal.

Forward: the upper triangle of ``(tile, tile)`` blocks; a block above the diagonal stands for its
transpose too (twice in ``tr``, its column sums to the column block's rows).  Kernel values in the
compute dtype, every sum in float64: the estimators are differences of these sums (``tr(KL)`` and
``(2/n) k.l`` agree to a few digits when the bandwidth is wide), so the rounding of a float32 sum,
amplified by that cancellation, would be most of a float32 HSIC's error (measured: a float32 Gaussian
CKA at n = 1000 with the median bandwidth 1.3e-5 relative from float64 with float32 sums, 5e-8 with
float64 sums).  The statistics are float64 for every input dtype.

Backward, for upstream ``T = dF/dtr`` and ``g_a = dF/drows[a]``: with ``S = T + T^T`` and
``Gamma_a,ij = 2 sum_b S_ab E_b,ij + g_a,i + g_a,j`` (``dF = 1/2 sum_a sum_{i != j} Gamma_a,ij dE_a,ij``
over the symmetric Grams; ``dE_a = f_a dK_a``, ``f_a = 1`` for an unshifted Gram)::

    dx_a,k = sum_j W_kj (x_a,k - x_a,j),   W = 2 f_a Gamma_a dK_a/dd2    (dx_a = diag(W 1) x_a - W x_a)
    ds_a   = 1/2 f_a sum_ij Gamma_a,ij dK_a,ij/ds
    dK/dd2 = -K / (2 s^2) (gaussian),  -K^3 / (2 s^2) (imq);   dK/ds = K d2 / s^3,  K^3 d2 / s^3

(``W_ii = 0``: the diagonal is not in the statistics, and its term ``x_i - x_i`` is exactly 0)

over the same blocks, recomputed (memory ``O(tile^2 + n d)`` with a gradient too).  Under
``create_graph=True`` the backward is the plain-autograd form (:func:`gram_hsic_stats_eager`, the same
blocks recorded), so second derivatives are correct.  The fused kernels are ``kernelssl/triton/gram_hsic.py``;
the NumPy reference of the statistics is :func:`reference.metrics.gram_hsic_stats`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._common import recorded_backward

__all__ = ["gram_hsic_stats", "gram_hsic_stats_forward", "gram_hsic_stats_eager", "gram_hsic_backward", "gram_shift",
           "gram_scale", "GRAM_KERNELS", "TILE"]

GRAM_KERNELS = ("gaussian", "imq")
#: Block edge (two float64 blocks: 16 MiB).
TILE = 1024


def _sq_dist(a: Tensor, b: Tensor, sa: Tensor, sb: Tensor, diagonal: bool) -> Tensor:
    # ||a_i - b_j||^2 = ||a_i||^2 + ||b_j||^2 - 2 a_i.b_j, clamped at 0 (rounding); a diagonal block gets
    # the exact 0 of ||a_i - a_i||^2 (out of place: autograd)
    d2 = torch.addmm(sa[:, None] + sb[None, :], a, b.T, alpha=-2.0).clamp_min(0.0)
    if diagonal:
        eye = torch.eye(d2.shape[0], dtype=torch.bool, device=d2.device)
        d2 = torch.where(eye, torch.zeros((), dtype=d2.dtype, device=d2.device), d2)
    return d2


def _kernel(d2: Tensor, kernel: str, s: Tensor) -> Tensor:
    if kernel == "gaussian":
        return torch.exp(d2 / (-2.0 * s * s))
    return s / torch.sqrt(d2 + s * s)  # imq; exactly 1 at d2 = 0 (sqrt(s * s) rounds back to s)


def _shifted(d2: Tensor, kernel: str, s: Tensor, c: Tensor, k: Tensor | None = None) -> Tensor:
    """``E``: ``K`` for ``c = 0``, ``c (K - 1)`` for ``c > 0`` without the cancellation of ``K - 1`` (``k``:
    ``K`` if already formed)."""
    if kernel == "gaussian":
        t = d2 / (-2.0 * s * s)
        near_one = torch.expm1(t)
        k = torch.exp(t) if k is None else k
    else:
        r = torch.sqrt(d2 + s * s)
        near_one = -d2 / (r * (s + r))
        k = s / r if k is None else k
    return torch.where(c != 0, near_one * c, k)


def _off_diagonal(e: Tensor) -> Tensor:
    # out of place (autograd): a diagonal block without its diagonal (not in the statistics)
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return torch.where(eye, torch.zeros((), dtype=e.dtype, device=e.device), e)


def gram_shift(x: Tensor, s: Tensor) -> Tensor:
    """The shift ``c`` (0-d, in ``x``'s dtype) of the Gram of ``x`` (columns centred) at bandwidth ``s``.
    With ``r = median_i ||x_i||^2 / s^2`` (for spread-out rows about half of the typical ``d2 / s^2``; the
    median, so that a few far rows do not decide it): 0 (the Gram as given) unless ``r < 1/4``; then
    ``2^-e`` for ``r = m 2^e``, ``m`` in ``[0.5, 1)`` (the Gram carried as ``2^-e (K - 1)``, its entries of
    order 1).  ``r < 1/4`` puts at least a quarter of the Gram's entries (the pairs of rows with
    ``||x_i||^2 <= median``) above ``exp(-1/2)`` for gaussian, ``sqrt(1/2)`` for imq, and typically most
    above ``exp(-1/4)``.  The factor is capped at ``2^59`` (float32; ``2^507`` for float64) so that the
    product of two entries of far rows, about ``-f`` each, stays finite; 1 where ``r`` is 0.  A tensor:
    no host sync."""
    r = (x * x).sum(1).median() / (s * s)
    _, e = torch.frexp(r)
    cap = int(math.log2(torch.finfo(x.dtype).max)) // 2 - 4  # f^2 n^2 finite
    f = torch.ldexp(torch.ones((), dtype=x.dtype, device=x.device), (-e).clamp(max=cap))
    return torch.where(r < 0.25, f, torch.zeros((), dtype=x.dtype, device=x.device))


def gram_scale(c: Tensor) -> Tensor:
    """The factor ``f`` that a Gram's statistics carry for its shift ``c`` (:func:`gram_shift`): ``c``, or 1
    for a Gram as given."""
    return torch.where(c != 0, c, torch.ones_like(c))


def _tile(tile: int | None) -> int:
    return TILE if tile is None else int(tile)


def _blocks(n: int, tile: int | None):
    """``(i0, i1, j0, j1, diagonal)`` over the upper block triangle (``tile`` None: :data:`TILE`)."""
    tile = _tile(tile)
    for i0 in range(0, n, tile):
        for j0 in range(i0, n, tile):
            yield i0, min(i0 + tile, n), j0, min(j0 + tile, n), i0 == j0


def gram_hsic_stats_forward(xs: Sequence[Tensor], kernel: str, sigmas: Sequence[Tensor], shifts: Sequence[Tensor],
                            tile: int | None = None) -> tuple[Tensor, Tensor]:
    """``(tr, rows)`` of the module docstring, no autograd (the forward of :func:`gram_hsic_stats`)."""
    m, n = len(xs), xs[0].shape[0]
    sqs = [(x * x).sum(1) for x in xs]
    tr = xs[0].new_zeros((m, m), dtype=torch.float64)
    rows = xs[0].new_zeros((m, n), dtype=torch.float64)
    for i0, i1, j0, j1, diag in _blocks(n, tile):
        es = [_shifted(_sq_dist(x[i0:i1], x[j0:j1], sq[i0:i1], sq[j0:j1], diag), kernel, s, c)
              for x, sq, s, c in zip(xs, sqs, sigmas, shifts)]
        if diag:
            for e in es:
                e.fill_diagonal_(0.0)
        w = 1.0 if diag else 2.0
        for a in range(m):
            rows[a, i0:i1] += es[a].sum(1, dtype=torch.float64)
            if not diag:
                rows[a, j0:j1] += es[a].sum(0, dtype=torch.float64)
            for b in range(a, m):
                tr[a, b] += w * (es[a] * es[b]).sum(dtype=torch.float64)
    return torch.triu(tr) + torch.triu(tr, 1).T, rows


def gram_hsic_stats_eager(xs: Sequence[Tensor], kernel: str, sigmas: Sequence[Tensor], shifts: Sequence[Tensor],
                          tile: int | None = None) -> tuple[Tensor, Tensor]:
    """``(tr, rows)`` of the module docstring in plain autograd, on the same blocks (differentiable to
    any order; memory O(n^2) when a gradient is wanted: autograd keeps every block)."""
    m, n = len(xs), xs[0].shape[0]
    sqs = [(x * x).sum(1) for x in xs]
    tr = {(a, b): [] for a in range(m) for b in range(a, m)}
    tile = _tile(tile)
    rows = [[[] for _ in range(0, n, tile)] for _ in range(m)]  # per row block, its parts
    for i0, i1, j0, j1, diag in _blocks(n, tile):
        es = [_shifted(_sq_dist(x[i0:i1], x[j0:j1], sq[i0:i1], sq[j0:j1], diag), kernel, s, c)
              for x, sq, s, c in zip(xs, sqs, sigmas, shifts)]
        if diag:
            es = [_off_diagonal(e) for e in es]
        w = 1.0 if diag else 2.0
        for a in range(m):
            rows[a][i0 // tile].append(es[a].sum(1, dtype=torch.float64))
            if not diag:
                rows[a][j0 // tile].append(es[a].sum(0, dtype=torch.float64))
            for b in range(a, m):
                tr[a, b].append(w * (es[a] * es[b]).sum(dtype=torch.float64))
    sums = {ab: torch.stack(p).sum() for ab, p in tr.items()}
    tr = torch.stack([torch.stack([sums[min(a, b), max(a, b)] for b in range(m)]) for a in range(m)])
    rows = torch.stack([torch.cat([torch.stack(p).sum(0) for p in rp]) for rp in rows])
    return tr, rows


@torch.no_grad()
def gram_hsic_backward(gtr: Tensor | None, grows: Tensor | None, xs: Sequence[Tensor], kernel: str,
                       sigmas: Sequence[Tensor], shifts: Sequence[Tensor],
                       tile: int | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """``([dx_a], [ds_a])`` for the upstream gradients of ``(tr, rows)`` (module docstring; ``None``: 0),
    the blocks recomputed: memory O(tile^2 + n d)."""
    m, n = len(xs), xs[0].shape[0]
    dt = xs[0].dtype
    S = (gtr + gtr.T).to(dt) if gtr is not None else xs[0].new_zeros((m, m))
    g = grows.to(dt) if grows is not None else xs[0].new_zeros((m, n))
    sqs = [(x * x).sum(1) for x in xs]
    dxs = [torch.zeros_like(x) for x in xs]
    dss = [xs[0].new_zeros(()) for _ in xs]
    scales = [gram_scale(c) for c in shifts]
    for i0, i1, j0, j1, diag in _blocks(n, tile):
        d2s = [_sq_dist(x[i0:i1], x[j0:j1], sq[i0:i1], sq[j0:j1], diag) for x, sq in zip(xs, sqs)]
        ks = [_kernel(d2, kernel, s) for d2, s in zip(d2s, sigmas)]
        es = [_shifted(d2, kernel, s, c, k) for d2, s, c, k in zip(d2s, sigmas, shifts, ks)]
        for a, (x, d2, k, s) in enumerate(zip(xs, d2s, ks, sigmas)):  # in place: a few blocks live at once
            w = g[a, i0:i1, None] + g[a, None, j0:j1]  # Gamma_a, then W
            for b in range(m):
                w.addcmul_(es[b], 2.0 * S[a, b])
            w.mul_(k * scales[a])  # dE_a = f_a dK_a
            if kernel == "imq":
                w.mul_(k).mul_(k)  # Gamma K^3
            dss[a] += (1.0 if diag else 2.0) * 0.5 * (w.view(-1) @ d2.reshape(-1)) / (s * s * s)
            w.div_(-s * s)  # W = 2 Gamma dK/dd2
            if diag:  # W_ii = 0: the diagonal is not in the statistics (and its term is exactly 0)
                w.fill_diagonal_(0.0)
            xi, xj = x[i0:i1], x[j0:j1]
            dxs[a][i0:i1] += w.sum(1)[:, None] * xi - w @ xj
            if not diag:
                dxs[a][j0:j1] += w.sum(0)[:, None] * xj - w.T @ xi
    return dxs, dss


class _GramHSICStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: str, tile: int, m: int, *tensors: Tensor):  # type: ignore[override]
        xs, sigmas, shifts = tensors[:m], tensors[m:2 * m], tensors[2 * m:]
        ctx.save_for_backward(*tensors)
        ctx.kernel, ctx.tile, ctx.m = kernel, tile, m
        ctx.set_materialize_grads(False)
        return gram_hsic_stats_forward(xs, kernel, sigmas, shifts, tile)

    @staticmethod
    def backward(ctx, gtr, grows):  # type: ignore[override]
        tensors = ctx.saved_tensors
        m = ctx.m
        shifts = tensors[2 * m:]
        needs = ctx.needs_input_grad[3:3 + 2 * m]
        none = (None,) * m  # the shifts: no gradient
        if torch.is_grad_enabled():  # create_graph=True: the plain-autograd form, recorded
            def eager(*t):
                return gram_hsic_stats_eager(t[:m], ctx.kernel, t[m:], shifts, ctx.tile)
            return None, None, None, *recorded_backward(eager, tensors[:2 * m], needs, (gtr, grows)), *none
        if gtr is None and grows is None:
            return (None,) * (3 + len(tensors))
        dxs, dss = gram_hsic_backward(gtr, grows, tensors[:m], ctx.kernel, tensors[m:2 * m], shifts, ctx.tile)
        return None, None, None, *(d if need else None for d, need in zip([*dxs, *dss], needs)), *none


def gram_hsic_stats(xs: Sequence[Tensor], kernel: str, sigmas: Sequence[Tensor], shifts: Sequence[Tensor],
                    tile: int | None = None) -> tuple[Tensor, Tensor]:
    """``(tr (m, m), rows (m, n))``, float64, of the module docstring for ``m`` representations ``xs``
    (``(n, d_a)``, one float dtype, columns centred), their bandwidths ``sigmas`` and shifts ``shifts``
    (0-d tensors of that dtype: 0, or the scale of a Gram carried as ``f (K - 1)``; :func:`gram_shift`),
    ``kernel`` in :data:`GRAM_KERNELS`; differentiable in ``xs`` and ``sigmas`` with the streamed backward
    (memory ``O(tile^2 + n d)`` either way)."""
    return _GramHSICStats.apply(kernel, _tile(tile), len(xs), *xs, *sigmas, *shifts)
