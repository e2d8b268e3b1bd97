"""The SFRIK loss (Zheng, Puy, Riccietti, Perez, Gribonval -- ICLR 2023), torch tier, on the Gram mean of
:mod:`kernelssl.ops.legendre_gram`: :func:`sfrik_loss` on two raw views, and :class:`_SFRIKLoss`, the
whole loss of the eager path as one autograd Function (docs/legendre_gram.md).

Differentiable, any device; the inputs are checked by :mod:`kernelssl.functional`, which calls these.
Numerics as in :mod:`kernelssl.ops.legendre_gram`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._common import (
    NORM_EPS,
    norms_in_plain_range,
    prescale_rows,
    promote,
    recorded_backward,
    row_prescale,
    still_written,
    unit_rows,
    unit_rows_backward,
    upcast,
    workspace,
    workspace_stamp,
)
from .legendre_gram import (
    _block_gram_mean,
    _check_chunk_size,
    legendre_gram_mean,
    legendre_gram_mean_eager,
    sfrik_block_size,
)

__all__ = ["sfrik_loss"]

_DIFF_SLOT, _Y_SLOT = 3, 4  # the workspace slots of y_a - y_b and of the stacked unit rows y


class _SFRIKLoss(torch.autograd.Function):
    """The whole SFRIK loss of the eager path in one Function: normalisation, R and both M's, and the
    gradient of ``loss`` itself taken in the forward, where every weight is a number (folded into the
    GEMMs and the ``(n, q)`` ops: the backward of the usual step, ``loss.backward()``, is one multiply by
    its upstream scalar).  Outputs ``(loss, mse, mmd_a, mmd_b)``.  With ``y = z / max(||z||, eps)`` and
    ``g_y`` the gradient reaching ``y`` (``2 w_R (y_a - y_b) / (n q)`` plus ``w_M dM/dy``)::

        dz = (g_y - y (y . g_y)) / ||z||       (||z|| >= eps)
        dz = g_y / eps                          (||z|| < eps: the clamp is active, as in F.normalize)

    The two views are stacked and go through every op together (half the op count).  The gradient
    starts as the Gram-mean gradients R (:func:`_block_gram_mean`) and is turned into ``dloss/dz`` in
    place: one fresh ``(2, n, q)`` tensor per step (fresh pages fault on first touch, ~2 us per 4 KiB on
    this project's VM), kept as ``ctx.grad``.  A backward that finds it spent (``retain_graph=True``) or
    that gets upstream gradients of the components (``mse``, ``mmd_a``, ``mmd_b``) forms R again from the
    saved row norms and scales (:meth:`_general_backward`).  Under ``create_graph=True`` the backward is
    :func:`~kernelssl.ops._common.recorded_backward` of the plain-autograd loss (``sfrik_loss(...,
    eager=True)``, which materialises the Gram), so second derivatives are correct.
    """

    @staticmethod
    def forward(ctx, za, zb, b, block, sim_weight, mmd_weight, want_a, want_b, prescale):  # type: ignore[override]
        n, q = za.shape
        k_r, k_m = _SFRIKLoss._factors(n, q)
        y, scale, norm = _SFRIKLoss._unit_views(za, zb, prescale)
        want = want_a or want_b  # one view frozen: its gradient is formed too (rare; the ops stay batched)
        # R, scaled to d(loss)/dy's share: mmd_weight / 2 * dM/dy
        m, grad = _block_gram_mean(y, b, block, want, grad_scale=mmd_weight * 0.5 * k_m)
        diff = torch.sub(y[0], y[1], out=workspace((n, q), y, _DIFF_SLOT))
        mse = torch.linalg.vector_norm(diff).square_().div_(float(n * q))
        loss = torch.add(mse * sim_weight, m.sum(), alpha=mmd_weight * 0.5)
        if want:
            ctx.save_for_backward(norm, scale, za, zb)
            # y and y_a - y_b stay in their scratch tensors: a later backward reads them there unless
            # another call took those slots in between (then it forms them again)
            ctx.kept = [(t, slot, workspace_stamp(t, slot)) for t, slot in ((y, _Y_SLOT), (diff, _DIFF_SLOT))]
            grad[0].add_(diff, alpha=sim_weight * k_r)
            grad[1].sub_(diff, alpha=sim_weight * k_r)
            grad = _SFRIKLoss._through_unit_rows(grad, y, norm, scale, prescale)
        ctx.grad = grad  # dloss/dz (both views); the first backward scales it in place
        ctx.wants = (want_a, want_b)
        ctx.weights = (sim_weight, mmd_weight)
        ctx.b, ctx.block, ctx.prescale = b, block, prescale
        ctx.set_materialize_grads(False)  # outputs nothing depends on (mse, mmd_a, mmd_b) cost no op
        return loss, mse, m[0], m[1]

    @staticmethod
    def backward(ctx, g_loss, g_mse, g_a, g_b):  # type: ignore[override]
        want_a, want_b = ctx.wants
        if torch.is_grad_enabled():  # create_graph=True: a recorded (differentiable) gradient
            norm, scale, za, zb = ctx.saved_tensors
            sim_weight, mmd_weight = ctx.weights

            def eager(a, b):  # the forward's function, its prescale included (rows of tiny or huge norm)
                return sfrik_loss(a, b, coefficients=ctx.b, sim_weight=sim_weight, mmd_weight=mmd_weight, eager=True,
                                  prescale=ctx.prescale)
            grads = recorded_backward(eager, (za, zb), ctx.wants, (g_loss, g_mse, g_a, g_b))
            return *grads, None, None, None, None, None, None, None
        with torch.no_grad():
            dz, ctx.grad = ctx.grad, None
            if g_mse is not None or g_a is not None or g_b is not None or dz is None:
                dz = _SFRIKLoss._general_backward(ctx, g_loss, g_mse, g_a, g_b)
            elif g_loss is None:
                return (None,) * 9
            else:  # the usual step: only the loss is used
                _ = ctx.saved_tensors  # autograd's check: an input changed in place since the forward raises
                dz.mul_(g_loss)
        return (dz[0] if want_a else None), (dz[1] if want_b else None), None, None, None, None, None, None, None

    @staticmethod
    def _factors(n, q):
        """``(dmse/d(diff), dM/dy per unit of R)``: ``2 / (n q)`` and ``2 / n^2``."""
        return 2.0 / float(n * q), 2.0 / float(n * n)

    @staticmethod
    def _unit_views(za, zb, prescale=False, saved=None):
        """``(y, scale, norm)``: both views stacked, prescaled (``prescale``) and normalised, in a scratch
        tensor (workspace).  ``norm`` holds the prescaled rows' norms, clamped to ``NORM_EPS`` if
        ``prescale`` (no row is below it but a zero one), as they are otherwise (the clamp's mask needs
        them).  On the CPU the norms come first, and rows whose norms all lie in
        :data:`~kernelssl.ops._common.PLAIN_NORM_RANGE` (all above ``NORM_EPS``) are not prescaled
        (``scale`` None): on them the prescale would change ``y`` by nothing but rounding far below the
        dtype's epsilon, and it costs nine ops.  ``saved``: the forward's ``(scale, norm)``, from which a
        backward forms the same ``y`` again."""
        n, q = za.shape
        z = torch.stack([za, zb], out=workspace((2, n, q), za, _Y_SLOT))  # both views through every op
        if saved is not None:
            scale, norm = saved
        elif prescale and z.device.type == "cpu":  # the norms first: rows in range need no prescale
            norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
            if norms_in_plain_range(norm):
                return z.div_(norm), None, norm  # every norm above NORM_EPS: no clamp
            scale, norm = row_prescale(z), None
        else:
            scale, norm = (row_prescale(z) if prescale else None), None
        if scale is not None:
            z.mul_(scale)  # exact powers of two (prescale_rows)
        if norm is None:
            norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
            if scale is not None:
                norm.clamp_min_(NORM_EPS)
        return z.div_(norm if scale is not None else norm.clamp_min(NORM_EPS)), scale, norm

    @staticmethod
    def _through_unit_rows(gy, y, norm, scale, prescale):
        """``dloss/dz`` from ``gy = dloss/dy``, written over ``gy``."""
        if not prescale:  # rows as given: those of norm < eps keep F.normalize's clamp
            return unit_rows_backward(gy, y, norm, inplace=True)
        # prescaled (or every norm in range, scale None): no row is below eps but a zero one, whose
        # y . g_y is 0; dz = (g_y - y (y . g_y)) s / ||z s||
        gy.addcmul_(y, torch.linalg.vecdot(y, gy).unsqueeze_(-1), value=-1.0)
        return gy.div_(norm) if scale is None else gy.mul_(scale / norm)

    @staticmethod
    def _general_backward(ctx, g_loss, g_mse, g_a, g_b):
        """The gradient for any upstream gradients of the four outputs, with R formed again from the
        saved row norms and scales (and ``y``, ``y_a - y_b`` read from their scratch tensors if no other
        call took them)."""
        norm, scale, za, zb = ctx.saved_tensors
        sim_weight, mmd_weight = ctx.weights
        n, q = za.shape
        k_r, k_m = _SFRIKLoss._factors(n, q)
        y, diff = (t if stamp is not None and still_written(t, slot, stamp) else None for t, slot, stamp in ctx.kept)
        if y is None:
            y = _SFRIKLoss._unit_views(za, zb, saved=(scale, norm))[0]  # bitwise the forward's
        gy = _block_gram_mean(y, ctx.b, ctx.block, True)[1]  # R
        zero = next(g for g in (g_loss, g_mse, g_a, g_b) if g is not None).new_zeros(())
        c_m = torch.stack([g_a if g_a is not None else zero, g_b if g_b is not None else zero])
        if g_loss is not None:
            c_m = c_m + g_loss * (mmd_weight * 0.5)
        gy.mul_((c_m * k_m).view(2, 1, 1))
        c_diff = None if g_loss is None else g_loss * (sim_weight * k_r)  # upstream of mse, times dmse/d(diff)
        if g_mse is not None:
            c_diff = g_mse * k_r if c_diff is None else c_diff + g_mse * k_r
        if c_diff is not None:
            if diff is None:
                diff = torch.sub(y[0], y[1], out=workspace((n, q), y, _DIFF_SLOT))
            gy[0].addcmul_(diff, c_diff)
            gy[1].addcmul_(diff, c_diff, value=-1.0)
        return _SFRIKLoss._through_unit_rows(gy, y, norm, scale, ctx.prescale)


def sfrik_loss(z_a: Tensor, z_b: Tensor, *, coefficients: Sequence[float] = (1.0, 40.0, 40.0),
               sim_weight: float = 4000.0, mmd_weight: float = 1.0, eager: bool = False,
               chunk_size: int | None = None, gram_mean: Callable[[Tensor, tuple[float, ...]], Tensor] | None = None,
               prescale: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SFRIK loss on two raw ``(n, q)`` views, normalised inside::

        loss = sim_weight * mse + mmd_weight * (mmd_a + mmd_b) / 2
        mse  = (1/(n q)) sum_i ||zhat_a_i - zhat_b_i||^2,   mmd_v = M(Zhat_v)   (V-statistic)

    Only pairs within one view enter M (views are not concatenated).

    Args:
        z_a, z_b: ``(n, q)`` each, same shape and device, n >= 2, q >= 2, floating point.  If their
            dtypes differ, both are computed in float64 if either is float64, else float32.
        coefficients: ``(b_1, ..., b_L)``, default ``(1, 40, 40)``.
        sim_weight: lambda_sim >= 0 (default 4000: the reference's q = 8192 setting).
        mmd_weight: lambda_mmd >= 0 (default 1).
        eager: compute M with :func:`legendre_gram_mean_eager` (materialised Gram; the baseline).
        chunk_size: Gram block edge of the library path (see :func:`legendre_gram_mean`).
        gram_mean: ``fn(z, coefficients) -> M`` on the RAW rows (it normalises them itself), used in
            place of the blocked torch path: :func:`kernelssl.functional.sfrik_loss` passes the
            implementation :mod:`kernelssl.dispatch` picked (the fused kernel reads the rows in their
            own dtype, bf16/fp16 on tensor cores).
        prescale: first multiply every row by an exact power of two
            (:func:`~kernelssl.ops._common.prescale_rows`: no overflow or underflow in the norms; the
            result is otherwise bitwise the same), inside the fused Function on both views at once.  On
            the CPU the fused Function skips it when no row needs it
            (:func:`~kernelssl.ops._common.norms_in_plain_range`: reading the norms there is no device sync).

    Returns:
        ``(loss, mse, mmd_a, mmd_b)``, 0-dim tensors in float32 (float64 for float64 inputs).

    Without ``gram_mean`` and ``eager``, outside ``torch.compile``, the whole loss is one autograd
    Function (:class:`_SFRIKLoss`: the gradient of ``loss`` is formed in the forward, O(n q) kept).
    """
    b = tuple(coefficients)
    chunk = _check_chunk_size(chunk_size)
    za, zb = promote(upcast(z_a), upcast(z_b))
    if gram_mean is None and not eager and not torch.compiler.is_compiling():
        grad_on = torch.is_grad_enabled()
        block = chunk if chunk is not None else sfrik_block_size(*za.shape, za.dtype)
        return _SFRIKLoss.apply(
            za, zb, b, min(block, za.shape[0]), float(sim_weight), float(mmd_weight),
            grad_on and za.requires_grad, grad_on and zb.requires_grad, prescale,
        )
    if prescale:
        za, zb = prescale_rows(za), prescale_rows(zb)
        z_a, z_b = za, zb
    za, zb = unit_rows(za), unit_rows(zb)
    mse = (za - zb).pow(2).mean()
    if gram_mean is not None:
        mmd_a, mmd_b = gram_mean(z_a, b), gram_mean(z_b, b)
    elif eager:
        mmd_a = legendre_gram_mean_eager(za, b, normalize=False)
        mmd_b = legendre_gram_mean_eager(zb, b, normalize=False)
    else:
        mmd_a = legendre_gram_mean(za, b, normalize=False, chunk_size=chunk)
        mmd_b = legendre_gram_mean(zb, b, normalize=False, chunk_size=chunk)
    loss = sim_weight * mse + mmd_weight * 0.5 * (mmd_a + mmd_b)
    return loss, mse, mmd_a, mmd_b
