"""``gaussian_gram``, Triton tier, the host side: launch configuration, launchers, registration.

The kernels and their math are in ``gaussian_gram.py`` (the Gram tiles and the panel GEMM they share
with ``legendre_gram`` in ``_jit.py``, their block sizes in :func:`kernelssl.triton._common.gram_config`).
``kernelssl::gaussian_gram_logmean`` (returns the value, the statistics ``(m, S')`` and the row scales
``(r, proj)``, the latter non-differentiable) and ``kernelssl::gaussian_gram_logmean_backward`` are
``torch.library.triton_op`` s wired by :func:`kernelssl.triton._common.register` (CPU kernels: the
interpreter under ``TRITON_INTERPRET=1``, else the torch tier :mod:`kernelssl.ops.gaussian_gram`;
decomposed into the kernels under ``torch.compile`` on CUDA, opaque on CPU).
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import triton_op

from ..dispatch import resolve_precision
from ..ops import gaussian_gram as _torch_tier
from ..ops._common import recorded_backward
from ._common import (
    gram_config,
    gram_precision,
    interpreting,
    num_sms,
    panel_matmul,
    panel_rows_for,
    register,
    row_scales,
    wrap_triton,
)
from .gaussian_gram import (
    _gram_lse_kernel,
    _gram_weights_kernel,
    _lse_reduce_kernel,
    _resident_backward_kernel,
    _split_reduce_kernel,
)
from .targets import target_of

__all__ = ["gaussian_gram_logmean", "gaussian_gram_forward", "gaussian_gram_backward", "resident_ok"]


# ==================================================================================================
# launch configuration and launchers
# ==================================================================================================

#: Widest rows for the rows-resident backward (a (BLOCK_M, q) fp32 accumulator per program): 256 when q
#: is a multiple of 16, else 128 (unaligned rows of 129..255 spill registers on sm_90); wider rows
#: take the panel backward (its GEMM tiles q, at the price of an (R, n) fp32 panel in HBM).
MAX_RESIDENT_Q = 256


def resident_ok(q: int) -> bool:
    """Whether rows of length ``q`` take the rows-resident backward by default (see MAX_RESIDENT_Q)."""
    return q <= 128 or (q <= MAX_RESIDENT_Q and q % 16 == 0)
#: Programs the rows-resident backward aims at (4 per SM of an H100/H200): few row tiles (small n) are
#: split over the columns, each split writing an (n, q) fp32 partial (at most ~35 MiB at q = 256).
_RESIDENT_TARGET_PROGRAMS = 4 * 132


def _resident_config(dtype: torch.dtype, q: int, device: torch.device | None = None) -> dict:
    """Blocks of the rows-resident backward (sm_90 compiles, tests/compile_targets.py: spill-free under
    Triton 3.6 and 3.8, one program of 8 warps per SM): 64-row tiles, the (64, q) fp32 accumulator over
    8 warps; 64-wide column tiles up to q = 128, 16-wide at q = 256 (wider ones spill); K-steps over q
    of 64 for 16-bit rows (32 at q = 256), 16 for fp32 (tf32x3 spills at 32).  Interpreter: 32-wide, so test shapes
    span several tiles."""
    bq = max(16, triton.next_power_of_2(q))
    if interpreting():
        return dict(bm=32, bn=32, bk=32, bq=bq, warps=4, stages=1, red_r=32, red_q=min(bq, 64))
    half = dtype in (torch.float16, torch.bfloat16)
    target = target_of(device)
    if not (target.vendor == "nvidia" and target.arch >= 90):
        # off sm_90 (register-resident MMA accumulators; FMA dots on sm_75): 32-wide column tiles,
        # 16-deep K-steps where the dots are FMAs or the precision splits fp32 operands; 32-row tiles
        # where the dots are FMAs (64 rows spilled 16 B a thread at q = 128 on sm_75)
        fma = not target.triton_mma
        return dict(bm=32 if fma else 64, bn=32 if bq <= 128 else 16,
                    bk=16 if (fma or not half) else (64 if bq <= 128 else 32), bq=bq, warps=8 if bq > 64 else 4,
                    stages=2, red_r=32, red_q=min(bq, 128))
    return dict(bm=64, bn=64 if bq <= 128 else 16, bk=(64 if bq <= 128 else 32) if half else 16, bq=bq,
                warps=8 if bq > 64 else 4,
                stages=2, red_r=32, red_q=min(bq, 128))


def resident_splits(n: int, block_m: int, block_n: int, views: int = 1, slots: int = 0) -> tuple[int, int]:
    """``(splits, column tiles per split)`` of the rows-resident backward of ``views`` stacked views of
    ``n`` rows: one split (no partials, no split reduce) when the row tiles alone fill ``slots``
    program slots (the SMs, where a program takes a whole SM: 8 warps of > 128 registers) at >= 90%
    wave efficiency, else enough programs for ``_RESIDENT_TARGET_PROGRAMS`` (whole splits of equal
    length but the last)."""
    num_m, num_n = views * triton.cdiv(n, block_m), triton.cdiv(n, block_n)
    if slots and num_m >= 0.9 * triton.cdiv(num_m, slots) * slots:
        return 1, num_n
    want = max(1, min(num_n, triton.cdiv(_RESIDENT_TARGET_PROGRAMS, num_m)))
    per = triton.cdiv(num_n, want)
    return triton.cdiv(num_n, per), per


def _flat(z: Tensor) -> tuple[Tensor, int, int, int]:
    """``(zf, P, n, q)``: the views stacked as the rows of one ``(P n, q)`` matrix (a view of ``z`` when
    its strides allow, else a copy; a single ``(n, q)`` view is taken as it is)."""
    if z.dim() == 2:
        return z, 1, z.shape[0], z.shape[1]
    P, n, q = z.shape
    return z.reshape(P * n, q), P, n, q


def gaussian_gram_forward(
    z: Tensor, t: float, normalize: bool = True, exclude_diagonal: bool = True, input_precision: str = "tf32x3",
    *, return_scales: bool = False,
) -> tuple[Tensor, ...]:
    """``(L, stats)``: the log-mean as fp32 (0-dim for ``z`` of shape ``(n, q)``, ``(P,)`` for ``P``
    views ``(P, n, q)``, all views in one launch per stage) and the fp32 statistics ``(m, S')`` of the
    module docstring, shape ``(2,)`` or ``(P, 2)``; ``return_scales=True`` appends the row scales
    ``(r, proj)``, each ``(P n,)`` fp32, which :func:`gaussian_gram_backward` takes as ``scales``
    instead of recomputing them.  No autograd (see :func:`gaussian_gram_logmean`)."""
    zf, P, n, q = _flat(z)
    cfg = gram_config(z.dtype, q, n, target_of(z.device), input_precision)
    rinv, proj = row_scales(zf, normalize, cfg)
    tiles = triton.cdiv(n, cfg["fwd_block"])
    num_parts = tiles * (tiles + 1) // 2
    mpart = torch.empty(P * num_parts, device=z.device, dtype=torch.float32)
    spart = torch.empty(P * num_parts, device=z.device, dtype=torch.float32)
    wrap_triton(_gram_lse_kernel)[(P * num_parts,)](
        zf, rinv, mpart, spart,
        zf.stride(0), zf.stride(1),
        n, q, 2.0 * float(t), num_parts,
        EXCLUDE=exclude_diagonal, NORMALIZE=normalize, BLOCK=cfg["fwd_block"], BLOCK_K=cfg["fwd_k"],
        DOT_F32=interpreting() and z.dtype != torch.float32,
        INPUT_PRECISION=gram_precision(z.dtype, input_precision, target_of(z.device)),
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    out = torch.empty(z.shape[:-2], device=z.device, dtype=torch.float32)
    stats = torch.empty((*z.shape[:-2], 2), device=z.device, dtype=torch.float32)
    wrap_triton(_lse_reduce_kernel)[(P,)](mpart, spart, out, stats, num_parts, n, EXCLUDE=exclude_diagonal,
                                         BLOCK=1024, num_warps=4)
    return (out, stats, rinv, proj) if return_scales else (out, stats)


def gaussian_gram_backward(
    grad: Tensor,
    z: Tensor,
    stats: Tensor,
    t: float,
    normalize: bool = True,
    exclude_diagonal: bool = True,
    input_precision: str = "tf32x3",
    *,
    panel_rows: int | None = None,
    resident: bool | None = None,
    scales: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``grad * dL/dz`` (shape and dtype of ``z``) for the upstream gradient ``grad`` (0-dim, or ``(P,)``
    for ``P`` views) and the forward's ``stats``, recomputing the Gram tiles: rows resident (the default
    ``resident=None`` where :func:`resident_ok`; all views in one launch per stage), else panel by panel
    (``panel_rows`` rows at a time, view by view; default :func:`kernelssl.triton._common.panel_rows_for`).
    ``scales``: the forward's row scales (``return_scales=True``); ``None``
    recomputes them (one launch)."""
    zf, P, n, q = _flat(z)
    cfg = gram_config(z.dtype, q, n, target_of(z.device), input_precision)
    rinv, proj = row_scales(zf, normalize, cfg) if scales is None else scales
    dot_f32 = interpreting() and z.dtype != torch.float32
    prec = gram_precision(z.dtype, input_precision, target_of(z.device))
    mode = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[z.dtype]
    grad = grad.reshape(P)
    stats = stats.reshape(P, 2).contiguous()
    if resident is None:
        resident = resident_ok(q) and panel_rows is None
    if resident:
        if q > MAX_RESIDENT_Q:
            raise ValueError(f"resident: rows of q <= {MAX_RESIDENT_Q} only, got q = {q}")
        rc = _resident_config(z.dtype, q, z.device)
        slots = num_sms(z.device) if rc["warps"] == 8 else 0  # 8 warps: one program per SM
        splits, per = resident_splits(n, rc["bm"], rc["bn"], P, slots)
        fused = splits == 1
        out = torch.empty((P * n, q), device=z.device, dtype=z.dtype)
        # one split: dz written by the kernel itself (part / dpart unused: placeholders)
        part = out if fused else torch.empty((splits, P * n, q), device=z.device, dtype=torch.float32)
        dpart = rinv if fused else torch.empty((splits, P * n), device=z.device, dtype=torch.float32)
        pst = (0, out.stride(0), out.stride(1)) if fused else part.stride()
        dst = (0, 1) if fused else dpart.stride()
        round_bf16 = dot_f32 and z.dtype == torch.bfloat16
        wrap_triton(_resident_backward_kernel)[(P * triton.cdiv(n, rc["bm"]) * splits,)](
            zf, rinv, proj, stats, part, dpart, grad, out,
            zf.stride(0), zf.stride(1), pst[0], pst[1], pst[2], dst[0], dst[1], grad.stride(0), out.stride(0),
            out.stride(1),
            n, q, 2.0 * float(t), per,
            EXCLUDE=exclude_diagonal, NORMALIZE=normalize, MODE=mode,
            BLOCK_M=rc["bm"], BLOCK_N=rc["bn"], BLOCK_K=rc["bk"], BLOCK_Q=rc["bq"],
            DOT_F32=dot_f32, INPUT_PRECISION=prec, FUSED=fused, ROUND_BF16=round_bf16, BATCHED=P > 1,
            num_warps=rc["warps"], num_stages=rc["stages"],
        )
        if fused:
            return out.reshape(z.shape)
        grid = (triton.cdiv(P * n, rc["red_r"]) * triton.cdiv(q, rc["red_q"]),)
        wrap_triton(_split_reduce_kernel)[grid](
            part, dpart, zf, rinv, proj, stats, grad, out,
            part.stride(0), part.stride(1), part.stride(2), dpart.stride(0), dpart.stride(1),
            zf.stride(0), zf.stride(1), out.stride(0), out.stride(1), grad.stride(0),
            P * n, q, splits, 2.0 * float(t), n,
            NORMALIZE=normalize, BLOCK_R=rc["red_r"], BLOCK_Q=rc["red_q"],
            ROUND_BF16=round_bf16,
            num_warps=4,
        )
        return out.reshape(z.shape)
    rows = panel_rows_for(n, cfg["mm_m"]) if panel_rows is None else min(n, int(panel_rows))
    num_dparts = triton.cdiv(n, cfg["dphi_n"])
    panel = torch.empty((rows, n), device=z.device, dtype=torch.float32)
    dpart = torch.empty((rows, num_dparts), device=z.device, dtype=torch.float32)
    scale = torch.empty((), device=z.device, dtype=torch.float32)
    out = torch.empty((P * n, q), device=z.device, dtype=z.dtype)
    for b in range(P):  # view by view (rows wider than MAX_RESIDENT_Q: the products dominate)
        zb, rb, pb, ob = zf[b * n:(b + 1) * n], rinv[b * n:(b + 1) * n], proj[b * n:(b + 1) * n], out[b * n:(b + 1) * n]
        sb, gb = stats[b], grad[b]
        for row0 in range(0, n, rows):
            nrows = min(rows, n - row0)
            grid1 = (triton.cdiv(nrows, cfg["block"]) * num_dparts,)
            wrap_triton(_gram_weights_kernel)[grid1](
                zb, rb, pb, sb, gb, scale, panel, dpart,
                zb.stride(0), zb.stride(1), panel.stride(0), panel.stride(1), dpart.stride(0), dpart.stride(1),
                n, q, row0, nrows, 2.0 * float(t),
                EXCLUDE=exclude_diagonal, NORMALIZE=normalize,
                BLOCK_M=cfg["block"], BLOCK_N=cfg["dphi_n"], BLOCK_K=cfg["dphi_k"], GROUP_M=cfg["group"],
                DOT_F32=dot_f32, INPUT_PRECISION=prec,
                num_warps=cfg["warps"], num_stages=cfg["stages"],
            )
            panel_matmul(panel, zb, rb, pb, dpart, scale, ob, row0, nrows, normalize, True, cfg, dot_f32, prec)
    return out.reshape(z.shape)


# ==================================================================================================
# torch.library registration and autograd
# ==================================================================================================


# The op takes one view (n, q) or P views (P, n, q) and returns (value, stats, r, proj): the row scales
# are saved for the backward (no second row-scales launch there).
def _forward_impl(z: Tensor, t: float, normalize: bool, exclude_diagonal: bool,
                  input_precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return gaussian_gram_forward(z, t, normalize, exclude_diagonal, input_precision, return_scales=True)


def _backward_impl(grad: Tensor, z: Tensor, stats: Tensor, rinv: Tensor, proj: Tensor, t: float, normalize: bool,
                   exclude_diagonal: bool, input_precision: str) -> Tensor:
    return gaussian_gram_backward(grad, z, stats, t, normalize, exclude_diagonal, input_precision,
                                  scales=(rinv, proj))


def _logmean_op_body(z: Tensor, t: float, normalize: bool, exclude_diagonal: bool,
                input_precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(z, t, normalize, exclude_diagonal, input_precision)


_logmean_op = triton_op("kernelssl::gaussian_gram_logmean", mutates_args=())(_logmean_op_body)


def _logmean_backward_op_body(grad: Tensor, z: Tensor, stats: Tensor, rinv: Tensor, proj: Tensor, t: float,
                         normalize: bool, exclude_diagonal: bool, input_precision: str) -> Tensor:
    return _backward_impl(grad, z, stats, rinv, proj, t, normalize, exclude_diagonal, input_precision)


_logmean_backward_op = triton_op("kernelssl::gaussian_gram_logmean_backward",
                                 mutates_args=())(_logmean_backward_op_body)


def _torch_forward(z: Tensor, t: float, normalize: bool, exclude_diagonal: bool, input_precision: str):
    """The torch tier's values and statistics; the row scales are not computed (the CPU backward
    recomputes from ``z``), zeros of their shape."""
    views = z.unsqueeze(0) if z.dim() == 2 else z
    vals, stats = zip(*(_torch_tier.gaussian_gram_logmean_stats(zb, t, normalize, exclude_diagonal)
                        for zb in views.unbind(0)))
    value, stats = torch.stack(vals).float(), torch.stack(stats).float()
    if z.dim() == 2:
        value, stats = value[0], stats[0]
    rows = views.shape[0] * views.shape[1]
    return value, stats, z.new_zeros((rows,), dtype=torch.float32), z.new_zeros((rows,), dtype=torch.float32)


def _torch_backward(grad, z, stats, rinv, proj, t, normalize, exclude_diagonal, input_precision) -> Tensor:
    if z.dim() == 2:
        return _torch_tier.gaussian_gram_logmean_backward(grad, z, t, normalize, exclude_diagonal)
    return torch.stack([_torch_tier.gaussian_gram_logmean_backward(g, zb, t, normalize, exclude_diagonal)
                        for g, zb in zip(grad.reshape(-1).unbind(0), z.unbind(0))])


register(_logmean_op, _logmean_op_body, _torch_forward, 0)
register(_logmean_backward_op, _logmean_backward_op_body, _torch_backward, 1)


def _setup_context(ctx, inputs, output):
    z, t, normalize, exclude_diagonal, input_precision = inputs
    _, stats, rinv, proj = output
    ctx.save_for_backward(z, stats, rinv, proj)
    ctx.mark_non_differentiable(stats, rinv, proj)
    ctx.set_materialize_grads(False)
    ctx.t, ctx.normalize, ctx.exclude_diagonal, ctx.input_precision = t, normalize, exclude_diagonal, input_precision


def _backward(ctx, grad, _grad_stats, _grad_rinv, _grad_proj):
    if not ctx.needs_input_grad[0] or grad is None:
        return None, None, None, None, None
    z, stats, rinv, proj = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the torch tier's plain autograd, recorded
        def eager(x):  # one view (n, q) or P stacked views (P, n, q)
            views = x.unbind(0) if x.dim() == 3 else (x,)
            out = [_torch_tier.gaussian_gram_logmean_eager(v, ctx.t, normalize=ctx.normalize,
                                                           exclude_diagonal=ctx.exclude_diagonal) for v in views]
            return torch.stack(out) if x.dim() == 3 else out[0]
        return *recorded_backward(eager, (z,), (True,), (grad,)), None, None, None, None
    dz = _logmean_backward_op(grad, z, stats, rinv, proj, ctx.t, ctx.normalize, ctx.exclude_diagonal,
                              ctx.input_precision)
    return dz, None, None, None, None


_logmean_op.register_autograd(_backward, setup_context=_setup_context)


# ==================================================================================================
# entry point
# ==================================================================================================


def gaussian_gram_logmean(z: Tensor, t: float = 2.0, *, normalize: bool = True, exclude_diagonal: bool = True,
                          input_precision: str | None = None) -> Tensor:
    """``log( mean_{i != j} exp(2t (zhat_i . zhat_j - 1)) )`` (all ``n^2`` pairs when not
    ``exclude_diagonal``) with the fused kernels, for checked inputs
    (:func:`kernelssl.functional.gaussian_gram_logmean`): ``z`` one view ``(n, q)`` or ``P`` views of
    equal shape stacked ``(P, n, q)`` (Wang & Isola's loss: P = 2; all views in one launch per stage,
    each view's value bitwise its own call's), fp32 / fp16 / bf16 on CUDA (or on the CPU under
    ``TRITON_INTERPRET=1``); ``input_precision`` None resolves as
    :func:`kernelssl.dispatch.resolve_precision`.  Returns a 0-dim (or ``(P,)``) float32
    tensor, differentiable in ``z``, deterministic, finite for any t > 0 (log-sum-exp); NaN in ``z``
    reaches the value and the gradient.  Twice differentiable (the second derivative through the torch
    tier's plain autograd form, :func:`kernelssl.ops._common.recorded_backward`)."""
    return _logmean_op(z, float(t), normalize, exclude_diagonal, resolve_precision(input_precision, z.device))[0]
