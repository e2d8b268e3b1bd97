"""``gaussian_gram``, torch tier: the Gaussian-potential Gram log-mean, Wang & Isola's uniformity and
alignment on it (ICML 2020; docs/gaussian_gram.md).

Differentiable, any device; the inputs are checked, and the rows prescaled
(:func:`kernelssl.ops._common.prescale_rows`), by :mod:`kernelssl.functional`, which calls these.  On unit rows
``zhat_i`` (``z`` is ``(n, q)``) the Gaussian potential is a dot-product kernel, ``phi_t(s) = exp(-t ||zhat_i -
zhat_j||^2) = exp(2t (s - 1))`` with ``s = zhat_i . zhat_j``, and Wang & Isola's uniformity is the log of its
mean over the pairs i != j::

    L_unif(Z; t) = log( S / (n (n - 1)) ),      S = sum_{i != j} exp(2t (s_ij - 1))

(``exclude_diagonal=False``: ``log( sum_{i,j} exp(2t (s_ij - 1)) / n^2 )``, the log of the Gram mean of
:func:`gram_mean`'s Gaussian member).  Their code computes the same number as
``torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()`` (:func:`uniformity_pdist`), which stores the
``n (n - 1) / 2`` distances (and autograd keeps several such vectors alive).

* :func:`gaussian_gram_logmean` -- the library path, O(n q) extra memory, never an ``n x n`` tensor.
  Eager: one custom autograd Function walks the upper triangle of the Gram ``G = Zhat Zhat^T`` in
  square ``(T, T)`` blocks of ~16 MiB (:func:`kernelssl.ops._common.default_block_size`; G is symmetric, so
  an off-diagonal block stands for itself and its transpose).  Per block: ``E = 2t (G_IJ - 1)`` in the
  GEMM's epilogue (``addmm``), the block maximum, ``P = exp(E - m)`` against the running maximum ``m``
  of the exponent (an online log-sum-exp: earlier partial sums are rescaled by ``exp(m_old - m_new)``),
  its sum, and -- when a gradient is wanted -- ``grad_I += P Zhat_J``, ``grad_J += P^T Zhat_I`` in the
  same pass.  So any t works: at t = 1e4 in fp32 every ``exp(E)`` underflows to 0, but
  ``exp(E - m)`` does not, and the result is ``m + log(sum P) - log(n(n-1))``, finite and right.  The
  gradient ``dL/dzhat_k = (4t / S) sum_{j != k} exp(E_kj) zhat_j = 4t (sum_j P_kj zhat_j) / (sum P)``
  (the maximum cancels) is formed in the forward and saved (``(n, q)``); the backward only scales it.
  No host syncs (the running maximum stays on the device).  Distances come from the Gram of unit
  rows, ``||zhat_i - zhat_j||^2 = 2 - 2 s_ij`` (never from un-normalised norms).
  Under ``torch.compile`` the same pass runs as one opaque ``torch.library`` op
  (``kernelssl::gaussian_gram_logmean_torch``, autograd through ``register_autograd``): the compiled
  graph calls it as it is, so a compiled training step keeps the blocked path's speed and memory.
* :func:`gaussian_gram_logmean_eager` -- the plain-autograd form (materialised ``n x n`` Gram,
  ``torch.logsumexp``); what runs under ``torch.func`` transforms (same value, O(n^2) memory).
* :func:`uniformity_pdist`, :func:`alignment_wang_isola` -- Wang & Isola's code, verbatim (tests and
  benchmark peers).
* :func:`alignment` -- ``mean_i ||zhat_a_i - zhat_b_i||^alpha``, plain autograd (O(n q)).
* :func:`gaussian_gram_logmean_stats`, :func:`gaussian_gram_logmean_backward` -- the blocked pass
  without autograd, in the fused op's terms: the CPU kernels of :mod:`kernelssl.triton.gaussian_gram_op`.

Numerics: float16/bfloat16 inputs are upcast to float32 at entry; float32 and float64 are kept.  The
scalars come back in float32 (float64 for float64 inputs); gradients in the input dtype.  NaN/Inf
inputs propagate to a NaN result.  Duplicate
rows are fine (their pair has ``s = 1``, ``phi_t = 1``; the gradient is finite).  A zero row
normalises to zero (``F.normalize``), i.e. ``s = 0`` with every other row: its pairs count at squared
distance ``2 - 2s = 2`` (as if orthogonal), where Wang & Isola's ``pdist`` of the zero vector would
use ``||x_j||^2 = 1`` -- a zero row has no direction on the sphere; all tiers (reference, torch,
Triton) use the Gram form.  Its gradient is ``g / 1e-12`` (the Jacobian of ``z / eps``), finite.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_int
from ._common import (
    NORM_EPS,
    buffer_view,
    default_block_size,
    gradient_in_forward,
    promote,
    unit_rows,
    unit_rows_backward,
    upcast,
)

__all__ = [
    "gaussian_gram_logmean",
    "gaussian_gram_logmean_eager",
    "gaussian_gram_logmean_stats",
    "gaussian_gram_logmean_backward",
    "uniformity_pdist",
    "alignment",
    "alignment_wang_isola",
]


def _pairs(n: int, exclude_diagonal: bool) -> int:
    return n * (n - 1) if exclude_diagonal else n * n


# --------------------------------------------------------------------------------------------------
# Eager blocked path: value and gradient in one pass over the upper triangle
# --------------------------------------------------------------------------------------------------


def _blocked_logmean(
    zhat: Tensor, t: float, exclude_diagonal: bool, block: int, want_grad: bool, normalized: bool = False,
    stats: list | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(L, dL/dzhat)`` (the gradient only when ``want_grad``) over ``(block, block)`` blocks of the
    upper triangle of the Gram, with an online maximum of the exponent.  No host sync.

    ``normalized`` (the rows were normalised just before, and the normalisation's Jacobian follows):
    the exponent is clamped to ``<= 0`` (``s <= 1`` on unit rows; a rounded ``s = 1 + ulp`` times a
    huge t would otherwise give a positive log-mean), and the diagonal pairs (kept when
    ``exclude_diagonal=False``) are left out of the gradient: ``d/dzhat_k phi(zhat_k . zhat_k)`` is
    radial, which the Jacobian ``(I - zhat zhat^T)/||z||`` removes -- exactly, instead of by a
    cancellation that loses every digit when the diagonal dominates (large t).  ``stats``: a list that
    receives ``[m, S']``, the running maximum of the exponent and ``sum exp(E - m)``."""
    n, q = zhat.shape
    dt, dev = zhat.dtype, zhat.device
    two_t = 2.0 * t
    shift = torch.full((), -two_t, dtype=dt, device=dev)  # E = 2t G - 2t: the GEMM's epilogue
    run_max = torch.full((), torch.finfo(dt).min, dtype=dt, device=dev)  # finite: exp(min - m) = 0
    total = torch.zeros((), dtype=dt, device=dev)
    grad = torch.zeros_like(zhat) if want_grad else None
    t_eff = min(block, n)
    gbuf = zhat.new_empty(t_eff * t_eff)  # one block buffer, reused (a fresh one per block costs page faults)
    starts = list(range(0, n, t_eff))
    for bi, s0 in enumerate(starts):
        zi = zhat[s0 : s0 + t_eff]
        for s1 in starts[bi:]:
            zj = zhat[s1 : s1 + t_eff]
            r, c = zi.shape[0], zj.shape[0]
            e = torch.addmm(shift, zi, zj.t(), alpha=two_t, out=buffer_view(gbuf, r, c))
            if normalized:
                e.clamp_(max=0.0)
            if s1 == s0 and exclude_diagonal:
                e.diagonal().fill_(-math.inf)
            new_max = torch.maximum(run_max, e.amax())
            rescale = torch.exp(run_max - new_max)  # 1 when the maximum did not move, 0 at the start
            p = e.sub_(new_max).exp_()
            w = 1.0 if s1 == s0 else 2.0  # an off-diagonal block stands for its transpose too
            total = total * rescale + p.sum() * w
            if want_grad:
                if normalized and s1 == s0 and not exclude_diagonal:
                    p.diagonal().zero_()  # radial: removed by the normalisation Jacobian (above)
                grad.mul_(rescale)
                grad[s0 : s0 + r].addmm_(p, zj)
                if s1 != s0:
                    grad[s1 : s1 + c].addmm_(p.t(), zi)
            run_max = new_max
    value = run_max + torch.log(total) - math.log(_pairs(n, exclude_diagonal))
    if want_grad:
        grad.mul_((2.0 * two_t) / total)  # 4t sum_j P_kj zhat_j / sum P
    if stats is not None:
        stats[:] = [run_max, total]
    return value, grad


# --------------------------------------------------------------------------------------------------
# Compiled path: the same blocked pass as one opaque torch.library op
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("kernelssl::gaussian_gram_logmean_torch", mutates_args=())
def _blocked_op(zhat: Tensor, t: float, exclude_diagonal: bool, block: int, want_grad: bool,
                normalized: bool) -> tuple[Tensor, Tensor]:
    """:func:`_blocked_logmean` as one op that ``torch.compile`` does not trace into (its in-place
    block buffers and running maximum stay eager code): returns ``(L, dL/dzhat)``, the gradient an
    empty ``(0,)`` tensor unless ``want_grad``.  Autograd: ``register_autograd`` scales the saved
    gradient, as :func:`kernelssl.ops._common.gradient_in_forward` does in eager mode."""
    value, grad = _blocked_logmean(zhat, t, exclude_diagonal, block, want_grad, normalized)
    return value, (grad if grad is not None else zhat.new_empty((0,)))


@_blocked_op.register_fake
def _blocked_op_fake(zhat, t, exclude_diagonal, block, want_grad, normalized):
    return zhat.new_empty(()), zhat.new_empty(tuple(zhat.shape) if want_grad else (0,))


def _blocked_op_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _blocked_op_backward(ctx, grad_value, grad_grad):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "gaussian_gram_logmean: double backward (create_graph=True) is not supported by the blocked "
            "Gram; use kernelssl.ops.gaussian_gram.gaussian_gram_logmean_eager (plain autograd) for higher "
            "derivatives"
        )
    (grad,) = ctx.saved_tensors
    return grad * grad_value, None, None, None, None, None


_blocked_op.register_autograd(_blocked_op_backward, setup_context=_blocked_op_setup_context)


# --------------------------------------------------------------------------------------------------
# Public torch-path functions
# --------------------------------------------------------------------------------------------------


def gaussian_gram_logmean(
    z: Tensor,
    t: float = 2.0,
    *,
    normalize: bool = True,
    exclude_diagonal: bool = True,
    block_size: int | None = None,
) -> Tensor:
    """``log( sum_{i != j} exp(2t (zhat_i . zhat_j - 1)) / (n (n - 1)) )`` (``exclude_diagonal=False``:
    over all ``n^2`` pairs), blocked, O(n q + T^2) extra memory (module docstring).

    Args:
        z: ``(n, q)``, n >= 2, floating point, rows prescaled when ``normalize``.
        t: t > 0 (Python number).
        normalize: L2-normalise the rows first (``F.normalize``, outside the autograd Function, so
            autograd applies its Jacobian); ``False``: the rows as given (unit rows expected).
        exclude_diagonal: leave out the n pairs ``(i, i)`` (Wang & Isola's uniformity) or include them.
        block_size: edge T of the Gram blocks; None: ~16 MiB blocks (T = 2048 in fp32, 1440 in float64).

    Returns:
        0-dim tensor, float32 for float16/bfloat16/float32 inputs, float64 for float64.
    """
    # rows prescaled by the caller: every non-zero row normalises to a unit row (none below
    # F.normalize's eps), so the radial diagonal term the blocked pass drops is exactly what the
    # Jacobian removes
    if block_size is not None:
        block_size = check_int(block_size, "block_size", minimum=1)  # the torch tier's own argument
    zhat = unit_rows(z) if normalize else upcast(z)
    n = zhat.shape[0]
    want_grad = torch.is_grad_enabled() and zhat.requires_grad
    block = min(block_size if block_size is not None else default_block_size(n, zhat.dtype), n)
    if torch.compiler.is_compiling():
        return _blocked_op(zhat, t, exclude_diagonal, block, want_grad, normalize)[0]
    return gradient_in_forward(
        lambda x, want: _blocked_logmean(x, t, exclude_diagonal, block, want, normalize), zhat,
        lambda x: gaussian_gram_logmean_eager(x, t, normalize=False, exclude_diagonal=exclude_diagonal))


def gaussian_gram_logmean_eager(
    z: Tensor, t: float = 2.0, *, normalize: bool = True, exclude_diagonal: bool = True
) -> Tensor:
    """Plain-autograd form of :func:`gaussian_gram_logmean`: materialise ``G = Zhat Zhat^T``
    (``n x n``), ``torch.logsumexp`` of ``2t (G - 1)`` over the pairs.  O(n^2) memory; twice
    differentiable; what runs under ``torch.func`` transforms.  Same arguments and result."""
    zhat = unit_rows(z) if normalize else upcast(z)
    n = zhat.shape[0]
    g = zhat @ zhat.t()
    e = ((g.clamp_max(1.0) if normalize else g) - 1.0) * (2.0 * t)  # s <= 1 on unit rows, as the blocked pass
    if exclude_diagonal:
        eye = torch.eye(n, dtype=torch.bool, device=zhat.device)
        e = e.masked_fill(eye, -math.inf)
    return torch.logsumexp(e.reshape(-1), dim=0) - math.log(_pairs(n, exclude_diagonal))


def _rows(z: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """``(zhat, ||z||)`` of one view, detached, in the compute dtype."""
    zf = upcast(z.detach())
    norm = torch.linalg.vector_norm(zf, dim=-1, keepdim=True)
    return (zf / norm.clamp_min(NORM_EPS) if normalize else zf), norm


def gaussian_gram_logmean_stats(z: Tensor, t: float, normalize: bool, exclude_diagonal: bool
                                ) -> tuple[Tensor, Tensor]:
    """``(L, [m, S'])`` of one view without autograd: the log-mean of :func:`gaussian_gram_logmean` and
    the statistics of its online log-sum-exp (the running maximum ``m`` of the exponent and
    ``S' = sum exp(E - m)``, so ``L = m + log S' - log(pairs)``)."""
    zhat, _ = _rows(z, normalize)
    stats: list = []
    value, _ = _blocked_logmean(zhat, t, exclude_diagonal, default_block_size(zhat.shape[0], zhat.dtype), False,
                                normalize, stats)
    return value, torch.stack(stats)


def gaussian_gram_logmean_backward(grad: Tensor, z: Tensor, t: float, normalize: bool, exclude_diagonal: bool
                                   ) -> Tensor:
    """``grad * dL/dz`` of one view (shape and dtype of ``z``) without autograd: the blocked pass's
    gradient and, with ``normalize``, the normalisation Jacobian."""
    zhat, norm = _rows(z, normalize)
    _, g = _blocked_logmean(zhat, t, exclude_diagonal, default_block_size(zhat.shape[0], zhat.dtype), True,
                            normalize)
    g = g * grad.to(g.dtype)
    return (unit_rows_backward(g, zhat, norm) if normalize else g).to(z.dtype)


def uniformity_pdist(x: Tensor, t: float = 2.0) -> Tensor:
    """Wang & Isola's uniformity, their code verbatim (``x``: unit rows ``(n, q)``)::

        torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()

    Stores the ``n (n - 1) / 2`` distances; underflows to ``-inf`` at large t in fp32."""
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()


def alignment_wang_isola(x: Tensor, y: Tensor, alpha: float = 2.0) -> Tensor:
    """Wang & Isola's alignment, their code verbatim (``x``, ``y``: unit rows ``(n, q)``)::

        (x - y).norm(p=2, dim=1).pow(alpha).mean()
    """
    return (x - y).norm(p=2, dim=1).pow(alpha).mean()


def alignment(z_a: Tensor, z_b: Tensor, alpha: float = 2.0, normalize: bool = True) -> Tensor:
    """``mean_i ||zhat_a_i - zhat_b_i||^alpha`` (Wang & Isola's L_align), plain autograd, on rows
    prescaled by the caller (:func:`kernelssl.functional.alignment` prescales once for both terms of
    the loss).

    ``alpha = 2`` (the default) is the mean of the squared distances, ``sum((zhat_a - zhat_b)^2) / n``
    (smooth everywhere; its gradient at equal rows is 0).  Other alphas take ``(||d||^2)^(alpha/2)``, with
    the subgradient 0 at a perfect match ``d = 0`` (their ``||d||.pow(alpha)`` gives a NaN gradient row
    there for ``alpha < 1``: one duplicated image would poison the step).  Mixed dtypes are promoted."""
    za, zb = promote(upcast(z_a), upcast(z_b))
    if normalize:
        za, zb = unit_rows(za), unit_rows(zb)
    d = za - zb
    if alpha == 2.0:
        return d.square().sum() / float(d.shape[0])
    r2 = d.square().sum(dim=1)
    hit = r2 > 0  # the double where: no inf * 0 in the backward at d = 0
    return torch.where(hit, torch.where(hit, r2, 1.0).pow(alpha / 2.0), 0.0).mean()
