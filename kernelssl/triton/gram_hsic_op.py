"""``gram_hsic``, Triton tier, the host side: launch configuration, launchers, registration.

The kernels and their math are in ``gram_hsic.py``.  ``kernelssl::gram_hsic_stats`` (returns the float64
``tr (2, 2)`` and ``rows (2, n)`` of two shifted exact Gaussian or IMQ Grams) and
``kernelssl::gram_hsic_stats_backward`` are ``torch.library.triton_op`` s wired by
:func:`kernelssl.triton._common.register` (CPU kernels: the interpreter under ``TRITON_INTERPRET=1``, else
the torch tier :mod:`kernelssl.ops.gram_hsic`).
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import triton_op

from ..dispatch import resolve_precision
from ..ops import gram_hsic as _torch_tier
from ..ops._common import recorded_backward
from ._common import interpreting, num_sms, register, wrap_triton
from .gram_hsic import _grad_kernel, _stats_kernel
from .targets import target_of

__all__ = ["gram_hsic_stats", "gram_hsic_forward", "gram_hsic_backward", "KERNEL_CODES"]

KERNEL_CODES = {"gaussian": 0, "imq": 1}
#: Programs the launches aim at per SM: few row tiles (small n) are split over the columns.
_PROGRAMS_PER_SM = 4


def _config(device: torch.device, d: int = 0) -> dict:
    """Blocks (checked by compiling every target offline, ``tests/compile_targets.py gram_hsic``: no
    spills, within shared memory).  Forward: 64 x 64 tiles of both Grams on sm_90, 64 x 32 elsewhere (the
    register-resident MMA accumulators of sm_80/86/89 spilled at 64 wide with tf32x3); K-steps of 32 on
    sm_90, 16 elsewhere; 8 warps (4 where the dots are FMAs, sm_70/75: 8 capped the registers at 128
    and spilled).  Backward: 32-wide column tiles, K-steps of 16, column chunks ``bd`` of up to 128 rows
    on sm_90 (64-row tiles); elsewhere 32-row tiles and chunks of up to 64 (64-row tiles spilled on sm_86
    for unaligned rows); 8 warps.  On NVIDIA off sm_90 the launches ask for up to 255 registers
    (``maxnreg``): left to itself, ptxas held some variants at 128 registers and spilled 4-24 bytes on
    sm_75/80/86 (under Triton 3.6 and 3.8 alike).
    Interpreter: 16-wide, so test shapes span several tiles, splits and chunks."""
    bd = max(16, triton.next_power_of_2(max(d, 1)))
    if interpreting():
        return dict(bm=16, bn=16, bk=16, bd=min(bd, 32), warps=4, stages=1, gbm=16, gbn=16, gbk=16, gwarps=4)
    t = target_of(device)
    if t.vendor == "nvidia" and t.arch >= 90:
        return dict(bm=64, bn=64, bk=32, bd=min(bd, 128), warps=8, stages=2, gbm=64, gbn=32, gbk=16, gwarps=8)
    return dict(bm=64, bn=32, bk=16, bd=min(bd, 64), warps=8 if t.triton_mma else 4, stages=2, gbm=32, gbn=32,
                gbk=16, gwarps=8, maxnreg=255 if t.vendor == "nvidia" else None)


def _regs(cfg: dict) -> dict:
    """``maxnreg`` where the config sets it (NVIDIA off sm_90), not while ``torch.compile`` traces: inductor
    takes only ``num_warps``/``num_stages``-like launch options, and without the cap ptxas's own choice
    spills a few bytes, nothing worse."""
    return {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") and not torch.compiler.is_compiling() else {}


def _splits(n: int, cfg: dict, device: torch.device, chunks: int = 0) -> tuple[int, int]:
    """``(splits, column tiles per split)`` of the forward (``chunks=0``) or of the backward with
    ``chunks`` column chunks: enough programs for ``_PROGRAMS_PER_SM`` per SM."""
    bm, bn = (cfg["gbm"], cfg["gbn"]) if chunks else (cfg["bm"], cfg["bn"])
    num_m, num_n = triton.cdiv(n, bm), triton.cdiv(n, bn)
    want = max(1, min(num_n, triton.cdiv(_PROGRAMS_PER_SM * num_sms(device), num_m * max(chunks, 1))))
    per = triton.cdiv(num_n, want)
    return triton.cdiv(num_n, per), per


def gram_hsic_forward(x: Tensor, y: Tensor, sig: Tensor, shift: Tensor, kernel: str,
                      input_precision: str = "tf32x3") -> tuple[Tensor, Tensor]:
    """``(tr (2, 2), rows (2, n))``, float64, for fp32 ``x (n, dx)``, ``y (n, dy)`` (columns centred),
    ``sig (2,)`` fp32 the two bandwidths and ``shift (2,)`` fp32 the two shifts.  No autograd (see
    :func:`gram_hsic_stats`)."""
    n = x.shape[0]
    cfg = _config(x.device)
    splits, per = _splits(n, cfg, x.device)
    num_m = triton.cdiv(n, cfg["bm"])
    rowpart = torch.empty((splits, 2, n), device=x.device, dtype=torch.float64)
    trpart = torch.empty((num_m * splits, 3), device=x.device, dtype=torch.float64)
    wrap_triton(_stats_kernel)[(num_m * splits,)](
        x, y, (x * x).sum(1), (y * y).sum(1), sig, shift, rowpart, trpart,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), rowpart.stride(0), rowpart.stride(1),
        n, x.shape[1], y.shape[1], per,
        KERNEL=KERNEL_CODES[kernel], BLOCK_M=cfg["bm"], BLOCK_N=cfg["bn"], BLOCK_K=cfg["bk"],
        INPUT_PRECISION=input_precision, num_warps=cfg["warps"], num_stages=cfg["stages"], **_regs(cfg),
    )
    t = trpart.sum(0)
    return torch.stack([t[0], t[1], t[1], t[2]]).reshape(2, 2), rowpart.sum(0)


def _side_grad(a: Tensor, b: Tensor, sqa: Tensor, sqb: Tensor, sig: Tensor, shift: Tensor, coef: Tensor, g: Tensor,
               kernel: str, input_precision: str) -> tuple[Tensor, Tensor]:
    n, da = a.shape
    cfg = _config(a.device, da)
    chunks = triton.cdiv(da, cfg["bd"])
    splits, per = _splits(n, cfg, a.device, chunks)
    num_m = triton.cdiv(n, cfg["gbm"])
    part = torch.empty((splits, n, da), device=a.device, dtype=torch.float32)
    dspart = torch.empty((num_m * splits,), device=a.device, dtype=torch.float32)
    wrap_triton(_grad_kernel)[(num_m * splits * chunks,)](
        a, b, sqa, sqb, sig, shift, coef, g, part, dspart,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), part.stride(0), part.stride(1), part.stride(2),
        n, da, b.shape[1], per, splits,
        KERNEL=KERNEL_CODES[kernel], BLOCK_M=cfg["gbm"], BLOCK_N=cfg["gbn"], BLOCK_K=cfg["gbk"], BLOCK_D=cfg["bd"],
        INPUT_PRECISION=input_precision, num_warps=cfg["gwarps"], num_stages=cfg["stages"], **_regs(cfg),
    )
    return part.sum(0), dspart.sum()


def gram_hsic_backward(gtr: Tensor, grows: Tensor, x: Tensor, y: Tensor, sig: Tensor, shift: Tensor, kernel: str,
                       input_precision: str = "tf32x3") -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dy, dsig)`` for the upstream gradients ``gtr (2, 2)`` and ``grows (2, n)`` (any float
    dtype), the Gram tiles recomputed (``gram_hsic.py``): one launch per side."""
    s = (gtr + gtr.T).float()
    g = grows.float()
    sqx, sqy = (x * x).sum(1), (y * y).sum(1)  # the squared row norms, once for both sides
    dx, dsx = _side_grad(x, y, sqx, sqy, sig, shift, torch.stack([s[0, 0], s[0, 1]]), g[0].contiguous(), kernel,
                         input_precision)
    dy, dsy = _side_grad(y, x, sqy, sqx, sig.flip(0).contiguous(), shift.flip(0).contiguous(),
                         torch.stack([s[1, 1], s[1, 0]]), g[1].contiguous(), kernel, input_precision)
    return dx, dy, torch.stack([dsx, dsy])


# ==================================================================================================
# torch.library registration and autograd
# ==================================================================================================


def _stats_op_body(x: Tensor, y: Tensor, sig: Tensor, shift: Tensor, kernel: str,
                   input_precision: str) -> tuple[Tensor, Tensor]:
    return gram_hsic_forward(x, y, sig, shift, kernel, input_precision)


_stats_op = triton_op("kernelssl::gram_hsic_stats", mutates_args=())(_stats_op_body)


def _stats_backward_op_body(gtr: Tensor, grows: Tensor, x: Tensor, y: Tensor, sig: Tensor, shift: Tensor, kernel: str,
                            input_precision: str) -> tuple[Tensor, Tensor, Tensor]:
    return gram_hsic_backward(gtr, grows, x, y, sig, shift, kernel, input_precision)


_stats_backward_op = triton_op("kernelssl::gram_hsic_stats_backward", mutates_args=())(_stats_backward_op_body)


def _torch_forward(x, y, sig, shift, kernel, input_precision):
    return _torch_tier.gram_hsic_stats_forward([x, y], kernel, [sig[0], sig[1]], [shift[0], shift[1]])


def _torch_backward(gtr, grows, x, y, sig, shift, kernel, input_precision):
    (dx, dy), (dsx, dsy) = _torch_tier.gram_hsic_backward(gtr, grows, [x, y], kernel, [sig[0], sig[1]],
                                                          [shift[0], shift[1]])
    return dx, dy, torch.stack([dsx, dsy])


register(_stats_op, _stats_op_body, _torch_forward, 0)
register(_stats_backward_op, _stats_backward_op_body, _torch_backward, 2)


def _setup_context(ctx, inputs, output):
    x, y, sig, shift, kernel, input_precision = inputs
    ctx.save_for_backward(x, y, sig, shift)
    ctx.set_materialize_grads(False)
    ctx.kernel, ctx.input_precision = kernel, input_precision


def _backward(ctx, gtr, grows):
    x, y, sig, shift = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if not any(needs) or (gtr is None and grows is None):
        return None, None, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: the torch tier's plain autograd, recorded
        def eager(a, b, s):
            return _torch_tier.gram_hsic_stats_eager([a, b], ctx.kernel, [s[0], s[1]], [shift[0], shift[1]])
        return *recorded_backward(eager, (x, y, sig), needs, (gtr, grows)), None, None, None
    gtr = torch.zeros((2, 2), device=x.device, dtype=torch.float64) if gtr is None else gtr
    grows = torch.zeros((2, x.shape[0]), device=x.device, dtype=torch.float64) if grows is None else grows
    dx, dy, dsig = _stats_backward_op(gtr, grows, x, y, sig, shift, ctx.kernel, ctx.input_precision)
    return (dx if needs[0] else None), (dy if needs[1] else None), (dsig if needs[2] else None), None, None, None


_stats_op.register_autograd(_backward, setup_context=_setup_context)


# ==================================================================================================
# entry point
# ==================================================================================================


def gram_hsic_stats(x: Tensor, y: Tensor, sig: Tensor, kernel: str, shift: Tensor,
                    input_precision: str | None = None) -> tuple[Tensor, Tensor]:
    """``(tr (2, 2), rows (2, n))``, float64, of the exact ``kernel`` (``"gaussian"``/``"imq"``) Grams of
    ``x (n, dx)`` and ``y (n, dy)`` (fp32, columns centred, on CUDA or on the CPU under
    ``TRITON_INTERPRET=1``) with bandwidths ``sig (2,)`` and shifts ``shift (2,)``
    (:func:`kernelssl.ops.gram_hsic.gram_shift`; fp32, never read on the host), by the fused
    kernels; differentiable in ``x``, ``y`` and ``sig`` (the fused backward; twice through the torch
    tier's plain autograd form).  ``input_precision`` None resolves as
    :func:`kernelssl.dispatch.resolve_precision`."""
    return _stats_op(x, y, sig, shift, kernel, resolve_precision(input_precision, x.device))
