"""``legendre_gram``, torch tier: SFRIK's Legendre-polynomial Gram mean (Zheng, Puy, Riccietti, Perez,
Gribonval -- ICLR 2023; docs/legendre_gram.md).  The SFRIK loss on it: :mod:`kernelssl.ops.sfrik_loss`.

Differentiable, any device; the inputs are checked by :mod:`kernelssl.functional`, which calls these.
Two ways to compute the uniformity term

    M(Z) = (1/n^2) sum_{i=1..n} sum_{j=1..n} phi(zhat_i . zhat_j),   phi(t) = sum_{l=1..L} b_l P_l(q; t)

(V-statistic, diagonal included; ``zhat_i = z_i / max(||z_i||, 1e-12)``; ``z`` is ``(n, q)``):

* :func:`legendre_gram_mean` -- the library path, O(n q) extra memory, never an ``n x n`` tensor.
  Eager: an autograd Function walks the upper triangle of ``G = Zhat Zhat^T`` in ``(T, T)`` blocks
  (:func:`sfrik_block_size`; an off-diagonal block stands for itself and its transpose) and forms
  ``dM/dzhat_k = (2/n^2) sum_j phi'(G_kj) zhat_j`` in the same pass, while the block is in cache; the
  backward only scales it (:func:`_block_gram_mean` has the algebra: power basis, ``q x q`` space,
  one block).  Under ``torch.compile`` the Function
  streams ``(chunk, n)`` row tiles instead and recomputes each tile in the backward.
* :func:`legendre_gram_mean_eager` -- the benchmark baseline, written as the paper's code computes it:
  materialise the ``n x n`` Gram, evaluate the polynomials on it, take the mean, plain autograd
  (which keeps several ``n x n`` tensors alive for the backward).

``P_l(q; .)`` is the Legendre (ultraspherical) polynomial of degree l in dimension q, normalised
``P_l(q; 1) = 1``, evaluated by the three-term recurrence (valid for every q >= 2)::

    P_0 = 1,  P_1 = t,  P_{l+1} = alpha_l t P_l - beta_l P_{l-1}
    P'_0 = 0, P'_1 = 1, P'_{l+1} = alpha_l (P_l + t P'_l) - beta_l P'_{l-1}
    alpha_l = (2l + q - 2) / (l + q - 2),  beta_l = l / (l + q - 2)                    (l >= 1)

(:func:`legendre_recurrence_constants` returns the ``(alpha_l, beta_l)``).

Numerics: float16/bfloat16 inputs are upcast to float32; the scalars come back in float32 (float64 for float64
inputs), gradients in the input dtype.  No host syncs.  NaN/Inf inputs propagate.  A zero row normalises to zero
(``F.normalize``; the loss stays finite) and its gradient is ``g / 1e-12`` (the Jacobian of ``z / eps``).

Coefficients are Python numbers (no gradient with respect to them).  Any finite real ``b_l`` is
accepted; the kernel is positive definite, and M an MMD^2 (>= 0), iff every ``b_l >= 0``.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_coefficients, check_int, check_tensor
from ._common import (
    NORM_EPS,
    buffer_view,
    gradient_in_forward,
    unit_rows,
    unit_rows_backward,
    upcast,
    workspace,
)

__all__ = [
    "DEFAULT_TILE_ELEMENTS", "legendre_recurrence_constants", "legendre", "legendre_series", "default_chunk_size",
    "legendre_gram_mean", "legendre_gram_mean_eager", "legendre_gram_mean_backward", "sfrik_block_size", "split_gram",
    "gram_by_halves",
]

#: Target number of elements of one ``(chunk, n)`` Gram tile of the chunked path (8 Mi: 32 MiB in
#: float32; forward keeps ~4 tiles alive at once, backward ~6).
DEFAULT_TILE_ELEMENTS = 1 << 23

#: Largest growth of the rounding error of Horner's rule in the power basis over the recurrence's
#: that the eager path accepts (see :func:`_power_basis`); beyond it, it uses the recurrence.
POWER_BASIS_MAX_GROWTH = 16.0

#: The torch tier's size crossovers, measured on the CPU (docs/benchmarks.md): the degree-2 term goes into
#: ``q x q`` space at ``n >= 16 q`` (:func:`use_qspace`); the Gram is one block up to n = 256, 256-row blocks above.
QSPACE_MIN_ROWS_PER_COLUMN = 16
SINGLE_BLOCK_MAX_ROWS = 256
SFRIK_BLOCK_ROWS = 256

def _check_chunk_size(chunk_size: object) -> int | None:
    if chunk_size is None:
        return None
    return check_int(chunk_size, "chunk_size", minimum=1)


# -------------------- Polynomials ----------------------------------------------------------------


def legendre_recurrence_constants(q: int, degree: int) -> tuple[tuple[float, float], ...]:
    """Scalar constants of the three-term recurrence in dimension ``q`` up to degree ``degree``.

    Returns ``((alpha_1, beta_1), ..., (alpha_{degree-1}, beta_{degree-1}))`` (empty for degree <= 1)
    (the recurrences of the module docstring); entry ``l - 1`` is the step l -> l + 1.  Plain Python floats
    (for kernels that bake them in as constants).
    """
    q = check_int(q, "q", minimum=2)
    degree = check_int(degree, "degree", minimum=0)
    return tuple(((2 * l + q - 2) / (l + q - 2), l / (l + q - 2)) for l in range(1, degree))


def legendre(t: Tensor, q: int, degree: int) -> Tensor:
    """``P_0(q; t), ..., P_degree(q; t)`` stacked: ``(degree + 1, *t.shape)``, in the dtype of ``t``.

    Elementwise, by the recurrence of the module docstring; differentiable.
    """
    check_tensor(t, "t")
    consts = legendre_recurrence_constants(q, degree)
    out = [torch.ones_like(t)]
    if degree >= 1:
        out.append(t)
    for a, c in consts:
        out.append(a * t * out[-1] - c * out[-2])
    return torch.stack(out)


def legendre_series(
    t: Tensor, q: int, coefficients: Sequence[float], *, derivative: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """``phi(t) = sum_{l=1..L} b_l P_l(q; t)`` elementwise (and ``phi'(t)`` when ``derivative=True``,
    returned as ``(phi, phi')``), in the dtype of ``t``; ``coefficients = (b_1, ..., b_L)``.

    The value and derivative recurrences run together; differentiable (out-of-place ops only).
    """
    check_tensor(t, "t")
    return _series(t, q, check_coefficients(coefficients), derivative=derivative)


def _series(t: Tensor, q: int, b: tuple[float, ...], *, derivative: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`legendre_series` on checked arguments."""
    consts = legendre_recurrence_constants(q, len(b))
    # P_{l-1}, P_l and P'_{l-1}, P'_l; P_0 = 1, P'_0 = 0, P'_1 = 1 are kept as Python scalars.
    p_prev: Tensor | float = 1.0
    p: Tensor = t
    d_prev: Tensor | float = 0.0
    d: Tensor | float = 1.0
    val = b[0] * t
    der: Tensor | float = b[0]
    for l, (a, c) in enumerate(consts, start=1):
        p_next = a * t * p - c * p_prev
        if derivative:
            d_next = a * (p + t * d) - c * d_prev
            der = der + b[l] * d_next
            d_prev, d = d, d_next
        val = val + b[l] * p_next
        p_prev, p = p, p_next
    if not derivative:
        return val
    if not isinstance(der, Tensor):  # L == 1: phi' = b_1 everywhere
        der = torch.full_like(t, der)
    return val, der


def _tile_phi_sum(g: Tensor, b: tuple[float, ...], consts) -> Tensor:
    """``sum(phi(g))`` over a Gram tile (0-dim), with in-place ops to keep ~4 tiles alive at most."""
    total = g.sum() * b[0]
    p_prev: Tensor | None = None  # None stands for P_0 = 1
    p = g
    for l, (a, c) in enumerate(consts, start=1):
        p_next = torch.mul(g, p).mul_(a)
        if p_prev is None:
            p_next.sub_(c)
        else:
            p_next.sub_(p_prev, alpha=c)
        total = total + p_next.sum() * b[l]
        p_prev, p = p, p_next
    return total


def _tile_phi_prime(g: Tensor, b: tuple[float, ...], consts) -> Tensor:
    """``phi'(g)`` over a Gram tile, by the joint value/derivative recurrence, in place where safe."""
    L = len(b)
    if L == 1:
        return torch.full_like(g, b[0])
    # l = 1 -> 2 by hand: P_2 = a_1 g^2 - c_1, P'_2 = 2 a_1 g (P_0 = 1, P'_0 = 0, P'_1 = 1).
    a, c = consts[0]
    dphi = torch.mul(g, 2.0 * a * b[1]).add_(b[0])
    if L == 2:
        return dphi
    p_prev, p = g, torch.mul(g, g).mul_(a).sub_(c)  # P_1, P_2
    d_prev: Tensor | float = 1.0
    d = torch.mul(g, 2.0 * a)  # P'_1 = 1, P'_2
    for l in range(2, L):
        a, c = consts[l - 1]
        d_next = torch.mul(g, d).add_(p).mul_(a)  # alpha (P_l + t P'_l) - beta P'_{l-1}
        if isinstance(d_prev, Tensor):
            d_next.sub_(d_prev, alpha=c)
        else:
            d_next.sub_(c * d_prev)
        dphi.add_(d_next, alpha=b[l])
        if l + 1 < L:  # P_{l+1} is needed only by a later step
            p_next = torch.mul(g, p).mul_(a).sub_(p_prev, alpha=c)
            p_prev, p = p, p_next
        d_prev, d = d, d_next
    return dphi


# -------------------- M(Z): chunked autograd Function (library path) and the eager baseline ------


def default_chunk_size(n: int) -> int:
    """Rows per Gram tile when ``chunk_size=None``: ``clamp(DEFAULT_TILE_ELEMENTS // n, 1, n)``, i.e.
    tiles of about 8 Mi elements (a single tile, the whole Gram, when n <= 2896)."""
    return max(1, min(n, DEFAULT_TILE_ELEMENTS // max(n, 1)))


@functools.lru_cache(maxsize=64)  # pure Python, per call otherwise: ~20 us of a 0.6 ms small-batch step
def _power_basis(q: int, b: tuple[float, ...]) -> tuple[float, ...] | None:
    """``(c_0, ..., c_L)`` with ``phi(t) = sum_k c_k t^k`` (float64 arithmetic), or None where Horner's
    rule in that basis could be much less accurate than the recurrence.

    On ``[-1, 1]`` Horner's rounding error is bounded by ``~2L u sum_k |c_k| |t|^k`` for phi (and by
    ``~2L u sum_k k |c_k|`` for phi'), the recurrence's by ``~2L u sum_l |b_l|`` (``|P_l| <= 1``; for
    phi', ``|P'_l| <= P'_l(1)``).  The power basis is used when both ratios are at most
    ``POWER_BASIS_MAX_GROWTH``: always for the paper's degree 3 at q >= 3 (ratio < 3; at q = 2 the
    Chebyshev case, ratio < 6), and for large q at any degree (``P_l -> t^l``).
    """
    consts = legendre_recurrence_constants(q, len(b))
    prev, cur = [1.0], [0.0, 1.0]  # P_0, P_1 in powers of t
    d_prev, d_cur = 0.0, 1.0  # P'_0(1), P'_1(1)
    coeffs = [0.0] * (len(b) + 1)
    coeffs[1] = b[0]
    scale_val, scale_der = abs(b[0]), abs(b[0])
    for l, (a, c) in enumerate(consts, start=1):
        nxt = [0.0] + [a * x for x in cur]
        for k, x in enumerate(prev):
            nxt[k] -= c * x
        d_prev, d_cur = d_cur, a * (1.0 + d_cur) - c * d_prev
        for k, x in enumerate(nxt):
            coeffs[k] += b[l] * x
        scale_val += abs(b[l])
        scale_der += abs(b[l]) * d_cur
        prev, cur = cur, nxt
    growth_val = sum(abs(x) for x in coeffs) / scale_val if scale_val > 0 else 1.0
    growth_der = sum(k * abs(x) for k, x in enumerate(coeffs)) / scale_der if scale_der > 0 else 1.0
    if max(growth_val, growth_der) > POWER_BASIS_MAX_GROWTH:
        return None
    return tuple(coeffs)


def _t_poly(g: Tensor, coeffs: Sequence[float], out: Tensor) -> Tensor:
    """``g * sum_k coeffs[k] g^k`` elementwise into ``out`` by Horner's rule: two in-place passes per degree
    (a multiply by a Python-float coefficient and an add beat ``addcmul`` with 0-dim tensors on the CPU)."""
    torch.mul(g, coeffs[-1], out=out)
    for ck in reversed(coeffs[:-1]):
        out.add_(ck).mul_(g)
    return out


def use_qspace(n: int, q: int) -> bool:
    """Whether :func:`_block_gram_mean` carries the degree-2 term in ``q x q`` space (two ``n q^2`` GEMMs)
    rather than in the blocks (more elementwise passes): at ``n >= QSPACE_MIN_ROWS_PER_COLUMN * q``."""
    return n >= QSPACE_MIN_ROWS_PER_COLUMN * q


def sfrik_block_size(n: int, q: int, dtype: torch.dtype = torch.float32) -> int:
    """Edge T of the eager path's ``(T, T)`` Gram blocks: n up to ``SINGLE_BLOCK_MAX_ROWS``, else
    ``SFRIK_BLOCK_ROWS`` (a block of both views stays in cache for its elementwise passes)."""
    return n if n <= SINGLE_BLOCK_MAX_ROWS else SFRIK_BLOCK_ROWS


def _block_gram_mean(
    zhat: Tensor, b: tuple[float, ...], block: int, want_grad: bool, qspace: bool | None = None,
    grad_scale: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """``(M, R)`` with ``R = k phi'(G) Zhat = k (n^2 / 2) dM/dzhat``, k = ``grad_scale`` (only if
    ``want_grad``, else None; the callers fold ``2 / n^2`` into k or into their upstream scalar), for
    ``zhat`` of shape ``(n, q)`` or ``(V, n, q)`` (V independent views, batched through every op:
    ``M (V,)``, ``R (V, n, q)``).  The ``n x n`` work runs over
    the upper triangle of the Gram matrix in ``(block, block)`` blocks; off-diagonal blocks count twice
    (G is symmetric): ``grad_I += phi'(G_IJ) Zhat_J`` and ``grad_J += phi'(G_IJ)^T Zhat_I``.  Fixed
    block order, no atomics: deterministic.

    In the power basis ``phi(t) = sum_k c_k t^k`` (when :func:`_power_basis` allows it) the degree-1 term
    never needs a block: with ``s = Zhat^T 1``, ``sum_ij G_ij = ||s||^2`` and ``sum_j c_1 zhat_j = c_1 s``.
    The degree-2 term goes one of two ways (``qspace``; None: :func:`use_qspace`):

    * in the blocks (small n per q): each block forms ``d = phi'(G) - c_1`` by Horner's rule (L = 3: as
      ``2 c_2 (G + (3 c_3 / 2 c_2) G o G)``, one addcmul, ``2 c_2`` in the GEMM) and adds ``d Zhat_J`` to
      R; for L <= 3 with a gradient the value comes from ``d`` once it is spent,
      ``sum_{k>=2} c_k S_k = sum(G o (d + c_2 G)) / 3`` (``S_k = sum_ij G_ij^k``): three more passes.
    * in ``q x q`` space (large n per q): with ``Q = Zhat^T Zhat``, ``S_2 = ||Q||_F^2`` and
      ``sum_j 2 c_2 G_kj zhat_j = 2 c_2 Q zhat_k``, so the blocks carry only
      ``phi'_3(t) = sum_{k>=3} k c_k t^(k-1)`` (``3 c_3 G o G`` for the paper's degree 3: one elementwise
      pass per block); with a gradient and degree 3, ``S_3 = <Zhat, (G o G) Zhat>``.  ``S_2`` is split as
      ``n^2/q + ||E||_F^2 + 2 (n/q) tr E``, ``E = Q - (n/q) I``, so that its large part cancels against
      ``c_0 n^2`` in float64 on the host (M is an MMD: ~0 for a uniform batch).

    With a gradient, one block and a cubic phi: :func:`_one_block_cubic`.  Otherwise (ill-conditioned power
    basis) every block evaluates the recurrence
    (:func:`_tile_phi_sum`, :func:`_tile_phi_prime`).
    """
    if zhat.dim() == 2:
        m, grad = _block_gram_mean(zhat.unsqueeze(0), b, block, want_grad, qspace, grad_scale)
        return m[0], (None if grad is None else grad[0])
    V, n, q = zhat.shape  # V views, batched through every op
    dt, dev = zhat.dtype, zhat.device
    L = len(b)
    power = _power_basis(q, b)
    if power is None:
        outs = [_block_gram_mean_recurrence(z, b, block, want_grad) for z in zhat.unbind(0)]
        ms = torch.stack([o[0] for o in outs])
        return ms, (torch.stack([o[1] for o in outs]).mul_(grad_scale) if want_grad else None)
    c = power
    qspace = (use_qspace(n, q) if qspace is None else qspace) and L >= 2
    if want_grad and L == 3 and not qspace and block >= n and c[2] != 0.0:
        return _one_block_cubic(zhat, c, grad_scale)

    def diag(x):
        return x.diagonal(dim1=-2, dim2=-1)

    s = zhat.sum(dim=-2)  # (V, q)
    low = s.square().sum(dim=-1) * c[1]
    const = c[0]
    if qspace:
        # S_2 = ||Q||_F^2 is ~n^2/q and cancels against c_0 n^2 (M is an MMD, ~0 for a uniform batch),
        # so it is split exactly as S_2 = n^2/q + ||E||_F^2 + 2 (n/q) tr E with E = Q - (n/q) I, and
        # (c_0 + c_2/q) n^2 is formed in float64 on the host.
        gq = torch.bmm(zhat.mT, zhat)  # (V, q, q)
        e = gq.clone()
        diag(e).sub_(n / q)
        low = low + (e.square().sum(dim=(-2, -1)) + diag(e).sum(dim=-1) * (2.0 * n / q)) * c[2]
        const = c[0] + c[2] / q
        first = 3  # the blocks carry the degrees >= 3
    else:
        first = 2
    grad = None
    written = set()  # row blocks of grad already written (the first write uses beta = 0: no fill)
    total, vscale = None, 1.0
    if L >= first:
        # d = sum_{k>=first} k c_k t^(k-1) = t^(first-1) poly(dcoef);  sum_{k>=first} c_k t^k = t^first poly(vcoef)
        dcoef = [k * c[k] for k in range(first, L + 1)]
        vcoef = [c[k] for k in range(first, L + 1)]
        value_from_dots = want_grad and not qspace and L <= 3
        value_from_grad = want_grad and qspace and L == 3
        block_value = not (value_from_dots or value_from_grad)
        # L = 3 in the blocks: d = 2 c_2 d', d' = G + (3 c_3 / (2 c_2)) G o G (one addcmul; 2 c_2 is the GEMM's
        # alpha), and sum(G o (d + c_2 G)) = c_2 sum(G o (2 d' + G)); vscale: the factor of the block sums
        scaled = value_from_dots and L == 3 and c[2] != 0.0
        alpha, vscale = (2.0 * c[2], c[2] / 3.0) if scaled else (1.0, 1.0 / 3.0 if value_from_dots else 1.0)
        starts = list(range(0, n, block))
        nb = len(starts)
        parts, weights = [], []  # per block: the (V,) sums, weight 2 off the diagonal (G is symmetric)
        # two block buffers for every block, kept between calls on the CPU (workspace: no page faults)
        gbuf, pbuf = (workspace(V * block * block, zhat, slot) for slot in (0, 1))
        for bi, s0 in enumerate(starts):
            zi = zhat[:, s0 : s0 + block]
            for s1_ in starts[bi:]:
                zj = zhat[:, s1_ : s1_ + block]
                r, cc = zi.shape[1], zj.shape[1]
                g = torch.bmm(zi, zj.mT, out=buffer_view(gbuf, V * r, cc).view(V, r, cc))
                p = buffer_view(pbuf, V * r, cc).view(V, r, cc)
                weights.append(1.0 if s1_ == s0 else 2.0)
                if block_value:
                    # sum_{k>=first} c_k G^k = sum(G^first poly(vcoef)); torch.sum's cascade keeps fp32
                    # sums of ~1e5 terms accurate (a GEMV-style dot loses ~1e-4 here)
                    _t_poly(g, vcoef, p)
                    for _ in range(first - 1):
                        p.mul_(g)
                    parts.append(p.sum(dim=(-2, -1)))
                if want_grad:
                    if grad is None:
                        grad = torch.empty_like(zhat)
                    if qspace:
                        d = torch.mul(g, g, out=p) if L == 3 else _t_poly(g, dcoef, p).mul_(g)
                    else:
                        d = torch.addcmul(g, g, g, value=1.5 * c[3] / c[2], out=p) if scaled else _t_poly(g, dcoef, p)
                    for rows, dd, zz in ((s0, d, zj),) + (((s1_, d.mT, zi),) if s1_ != s0 else ()):
                        grad[:, rows : rows + block].baddbmm_(dd, zz, beta=float(rows in written), alpha=alpha)
                        written.add(rows)
                    if value_from_dots:  # d is spent: sum_{k=2..3} c_k S_k = sum(G o (d + c_2 G)) / 3
                        parts.append((torch.add(g, d, alpha=2.0, out=d) if scaled else d.add_(g, alpha=c[2]))
                                     .mul_(g).sum(dim=(-2, -1)))
        if value_from_grad:
            # L = 3: R_3 = (G o G) Zhat, so <Zhat, R_3> = sum_ij G_ij^3 = S_3 (~n: no cancellation)
            total = (zhat * grad).sum(dim=(-2, -1)) * c[3]
        elif nb == 1:
            total = parts[0]
        else:
            total = (torch.stack(parts) * torch.tensor(weights, dtype=dt, device=dev)[:, None]).sum(dim=0)
    if want_grad:
        # R = block part (scaled by 3 c_3 in q-space at L = 3) [+ 2 c_2 Zhat Q in q-space] + c_1 s
        if grad is None:  # no blocks: L <= 1, or L = 2 in q-space
            if qspace:
                grad = torch.baddbmm(s.mul(c[1]).unsqueeze(-2).expand(V, n, q), zhat, gq, alpha=2.0 * c[2])
            else:
                grad = s.mul(c[1]).unsqueeze(-2).expand(V, n, q).clone()
        else:
            if qspace:
                grad.baddbmm_(zhat, gq, beta=3.0 * c[3] if L == 3 else 1.0, alpha=2.0 * c[2])
            grad.add_(s.unsqueeze(-2), alpha=c[1])
        if grad_scale != 1.0:
            grad.mul_(grad_scale)
    total = low if total is None else torch.add(low, total, alpha=vscale)
    m = total / float(n * n) + const
    return m, grad

#: Rows from which :func:`split_gram` may form one Gram block by halves.
SPLIT_GRAM_MIN_ROWS = 128


def split_gram(n: int, q: int) -> bool:
    """Whether the one-block pass forms ``G = Z Z^T`` (``n x q`` rows) as its lower half by two GEMMs,
    ``G[:, :h] = Z Z_0^T`` and ``G[h:, h:] = Z_1 Z_1^T``, and the upper half as their mirror: 3/4 of the
    products, in three calls where one ``bmm`` does all.  Measured on this project's 2-core EPYC (fp32,
    both views, n = 192 and 256): 10-20% faster on 1 thread at q = 128...512; on 2 threads 4.5% faster at
    q = 256, 14% at q = 512 and 8-9% slower at q = 128 (too little work per thread).  So: n >= 128 and
    q >= 128 x threads (the threads of ``torch.get_num_threads()``; unmeasured beyond 2)."""
    return n >= SPLIT_GRAM_MIN_ROWS and q >= 128 * torch.get_num_threads()


def gram_by_halves(z: Tensor, out: Tensor) -> Tensor:
    """``out = Z Z^T`` for ``z`` of shape ``(V, n, q)``: the lower half by two GEMMs, ``[:, :h] = Z Z_0^T`` and
    ``[h:, h:] = Z_1 Z_1^T`` (3/4 of the products), the upper half its mirror (exactly symmetric)."""
    h = z.shape[1] // 2
    out[:, :, :h].baddbmm_(z, z[:, :h].mT, beta=0.0)
    out[:, h:, h:].baddbmm_(z[:, h:], z[:, h:].mT, beta=0.0)
    out[:, :h, h:].copy_(out[:, h:, :h].mT)
    return out


def _one_block_cubic(zhat: Tensor, c: tuple[float, ...], grad_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """:func:`_block_gram_mean` with a gradient, one block, cubic phi, ``c_2 != 0`` (the paper's small
    batches) in eleven ops.  With ``s = Zhat^T 1``, ``D = G + (3 c_3 / 2 c_2) G o G``:
    ``R = k (c_1 1 s^T + 2 c_2 D Zhat)`` (k = ``grad_scale``, folded into the GEMM) and
    ``sum_ij phi(G_ij) = c_0 n^2 + c_1 ||s||^2 + (c_2/3) sum G o (2D + G)``."""
    V, n, q = zhat.shape
    s = zhat.sum(dim=-2)  # (V, q)
    g = workspace((V, n, n), zhat, 0)
    if split_gram(n, q):
        gram_by_halves(zhat, g)
    else:
        torch.bmm(zhat, zhat.mT, out=g)
    d = torch.addcmul(g, g, g, value=1.5 * c[3] / c[2], out=workspace((V, n, n), zhat, 1))
    r = torch.baddbmm(s.unsqueeze(-2), d, zhat, beta=c[1] * grad_scale, alpha=2.0 * c[2] * grad_scale)
    cubic = torch.add(g, d, alpha=2.0, out=d).mul_(g).sum(dim=(-2, -1))  # d is spent
    m = torch.add(cubic, torch.linalg.vecdot(s, s), alpha=3.0 * c[1] / c[2]).mul_(c[2] / (3.0 * n * n))
    return m.add_(c[0]), r


def _block_gram_mean_recurrence(
    zhat: Tensor, b: tuple[float, ...], block: int, want_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """:func:`_block_gram_mean` with the three-term recurrence on every block (no power basis)."""
    n, q = zhat.shape
    consts = legendre_recurrence_constants(q, len(b))
    starts = list(range(0, n, block))
    nb = len(starts)
    sums = zhat.new_empty(nb * (nb + 1) // 2)
    weights = []
    grad = torch.zeros_like(zhat) if want_grad else None
    k = 0
    for bi, s0 in enumerate(starts):
        zi = zhat[s0 : s0 + block]
        for s1 in starts[bi:]:
            zj = zhat[s1 : s1 + block]
            g = torch.mm(zi, zj.t())
            weights.append(1.0 if s1 == s0 else 2.0)
            sums[k] = _tile_phi_sum(g, b, consts)
            k += 1
            if want_grad:
                d = _tile_phi_prime(g, b, consts)
                grad[s0 : s0 + block].addmm_(d, zj)
                if s1 != s0:
                    grad[s1 : s1 + block].addmm_(d.t(), zi)
                del d
            del g
    total = torch.dot(sums, torch.tensor(weights, dtype=zhat.dtype, device=zhat.device))
    return total / float(n * n), grad


class _LegendreGramMean(torch.autograd.Function):
    """``M = (1/n^2) sum_ij phi(zhat_i . zhat_j)`` on the rows as given, streamed over row chunks.

    Saves only ``zhat`` for the backward; tiles are recomputed there.  Not twice differentiable:
    the backward raises under ``create_graph=True``.
    """

    @staticmethod
    def forward(ctx, zhat: Tensor, b: tuple[float, ...], chunk: int) -> Tensor:  # type: ignore[override]
        n, q = zhat.shape
        consts = legendre_recurrence_constants(q, len(b))
        total = zhat.new_zeros(())
        zt = zhat.t()
        for s in range(0, n, chunk):
            g = torch.mm(zhat[s : s + chunk], zt)  # (chunk, n) tile of the Gram matrix
            total = total + _tile_phi_sum(g, b, consts)
            del g
        ctx.save_for_backward(zhat)
        ctx.b, ctx.chunk = b, chunk
        return total / float(n * n)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            # create_graph=True.  The tiles below are not recorded, so the gradient would be silently
            # treated as a constant (a wrong second derivative); refuse instead.
            raise RuntimeError(
                "legendre_gram_mean: double backward (create_graph=True) is not supported by the "
                "chunked Gram mean; use legendre_gram_mean_eager (plain autograd) for higher derivatives"
            )
        (zhat,) = ctx.saved_tensors
        b, chunk = ctx.b, ctx.chunk
        n, q = zhat.shape
        consts = legendre_recurrence_constants(q, len(b))
        grad = torch.empty_like(zhat)
        zt = zhat.t()
        for s in range(0, n, chunk):
            g = torch.mm(zhat[s : s + chunk], zt)
            dphi = _tile_phi_prime(g, b, consts)
            del g
            torch.mm(dphi, zhat, out=grad[s : s + chunk])  # sum_j phi'(G_kj) zhat_j (G symmetric)
            del dphi
        grad.mul_(grad_out * (2.0 / float(n * n)))
        return grad, None, None


def legendre_gram_mean(
    z: Tensor,
    coefficients: Sequence[float] = (1.0, 40.0, 40.0),
    *,
    normalize: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """SFRIK's uniformity term, blocked, O(n q + chunk^2) extra memory::

        M(Z) = (1/n^2) sum_{i,j} phi(zhat_i . zhat_j),   phi(t) = sum_{l=1..L} b_l P_l(q; t)

    Args:
        z: ``(n, q)``, n >= 2, q >= 2, floating point.  q is taken from ``z.shape[-1]``.
        coefficients: ``(b_1, ..., b_L)`` as Python numbers, any L >= 1 (b_0 cancels and is not passed).
        normalize: L2-normalise the rows first (``F.normalize``, outside the autograd Function, so
            autograd applies its Jacobian).  ``False``: use the rows as given (M is then the same
            polynomial sum on raw inner products).
        chunk_size: edge of the ``(chunk, chunk)`` Gram blocks (eager) or rows of the ``(chunk, n)``
            tiles (under ``torch.compile``); ``None`` -> :func:`default_block_size` (eager, ~16 MiB
            blocks) or :func:`default_chunk_size` (compiled, ~8 Mi-element tiles).  Any value >= 1;
            values >= n mean one block.

    Returns:
        0-dim tensor, float32 for float16/bfloat16/float32 inputs, float64 for float64.

    Eager: when a gradient is wanted (grad mode on and ``z`` requires grad) the forward also forms
    ``dM/dzhat = (2/n^2) phi'(G) Zhat`` block by block and saves that ``(n, q)`` tensor; the backward
    only scales it (no block is computed twice).  Under ``torch.compile`` the backward recomputes the
    tiles instead.  No ``n x n`` tensor is ever kept alive.  A backward with ``create_graph=True``
    recomputes the value with :func:`legendre_gram_mean_eager` (materialised Gram) and differentiates
    that, so second derivatives are correct (under ``torch.compile`` it raises instead).
    Deterministic: fixed block order, no atomics.
    """
    b = tuple(coefficients)
    chunk = _check_chunk_size(chunk_size)
    zhat = unit_rows(z) if normalize else upcast(z)
    n = zhat.shape[0]
    if torch.compiler.is_compiling():
        return _LegendreGramMean.apply(zhat, b, chunk if chunk is not None else default_chunk_size(n))
    block = min(chunk if chunk is not None else sfrik_block_size(n, zhat.shape[1], zhat.dtype), n)

    def one_pass(x, want_grad):  # R = phi'(G) Zhat is (n^2 / 2) dM/dzhat
        m, r = _block_gram_mean(x, b, block, want_grad)
        return m, (None if r is None else r * (2.0 / float(n * n)))

    return gradient_in_forward(one_pass, zhat, lambda x: legendre_gram_mean_eager(x, b, normalize=False))


def legendre_gram_mean_eager(
    z: Tensor,
    coefficients: Sequence[float] = (1.0, 40.0, 40.0),
    *,
    normalize: bool = True,
) -> Tensor:
    """Benchmark baseline for :func:`legendre_gram_mean`, as the paper's code computes it:
    materialise ``G = Zhat Zhat^T`` (``n x n``), evaluate ``phi`` on it with the recurrence
    (:func:`legendre_series`), take the mean.  Plain autograd: memory O(n^2 L).  Same arguments,
    dtypes and result as :func:`legendre_gram_mean`.
    """
    zhat = unit_rows(z) if normalize else upcast(z)
    gram = zhat @ zhat.t()
    return _series(gram, zhat.shape[1], tuple(coefficients)).mean()  # type: ignore[union-attr]


def legendre_gram_mean_backward(grad: Tensor, z: Tensor, coefficients: Sequence[float], normalize: bool) -> Tensor:
    """``grad * dM/dz`` (shape and dtype of ``z``) without autograd: the blocked pass's gradient
    ``(2/n^2) phi'(G) Zhat`` and, with ``normalize``, the normalisation Jacobian.  The CPU kernel of
    the fused op's backward (:mod:`kernelssl.triton.legendre_gram_op`)."""
    zf = upcast(z.detach())
    n = zf.shape[-2]
    norm = torch.linalg.vector_norm(zf, dim=-1, keepdim=True)
    zhat = zf / norm.clamp_min(NORM_EPS) if normalize else zf
    _, r = _block_gram_mean(zhat, tuple(coefficients), sfrik_block_size(n, zhat.shape[-1], zhat.dtype), True)
    g = r * (grad.to(zhat.dtype) * (2.0 / float(n * n)))
    return (unit_rows_backward(g, zhat, norm) if normalize else g).to(z.dtype)
