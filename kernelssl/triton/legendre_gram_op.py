"""``legendre_gram``, Triton tier, the host side: launch configuration, launchers, registration.

The kernels and their math are in ``legendre_gram.py``.  ``kernelssl::legendre_gram_mean`` and
``kernelssl::legendre_gram_mean_backward`` are ``torch.library.triton_op`` s (autograd through
``register_autograd``, the backward itself an op).  Their CPU kernels, ``torch.compile`` rule and fake
implementation come from :func:`kernelssl.triton._common.register`: the interpreter under
``TRITON_INTERPRET=1``, else the torch tier (:mod:`kernelssl.ops.legendre_gram`); decomposed into the
kernels on CUDA.  :func:`legendre_gram_mean` is what :mod:`kernelssl.functional` calls once
:mod:`kernelssl.dispatch` has picked this tier (fp32 / fp16 / bf16 inputs; float64 runs on the torch tier).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
from torch import Tensor
from torch.library import triton_op

from ..dispatch import resolve_precision
from ..ops import legendre_gram as _torch_tier
from ..ops._common import recorded_backward
from ._common import (
    gram_config,
    gram_precision,
    interpreting,
    panel_matmul,
    panel_rows_for,
    register,
    row_scales,
    wrap_triton,
)
from .legendre_gram import _gram_dphi_kernel, _gram_phi_sum_kernel, _sum_partials_kernel
from .targets import target_of

__all__ = ["legendre_gram_mean", "legendre_gram_forward", "legendre_gram_backward"]


# ==================================================================================================
# launchers
# ==================================================================================================


def legendre_gram_forward(
    z: Tensor, coefficients: Sequence[float], normalize: bool = True, input_precision: str = "tf32x3"
) -> Tensor:
    """``M(Z)`` as a 0-dim fp32 tensor (no autograd; see :func:`legendre_gram_mean`)."""
    coef = tuple(float(b) for b in coefficients)
    n, q = z.shape
    cfg = gram_config(z.dtype, q, n, target_of(z.device), input_precision)
    rinv, _ = row_scales(z, normalize, cfg)
    tiles = triton.cdiv(n, cfg["fwd_block"])
    num_parts = tiles * (tiles + 1) // 2
    parts = torch.empty(num_parts, device=z.device, dtype=torch.float32)
    wrap_triton(_gram_phi_sum_kernel)[(num_parts,)](
        z, rinv, parts,
        z.stride(0), z.stride(1),
        n, q,
        COEF=coef, L=len(coef),
        BLOCK=cfg["fwd_block"], BLOCK_K=cfg["fwd_k"],
        DOT_F32=interpreting() and z.dtype != torch.float32,
        INPUT_PRECISION=gram_precision(z.dtype, input_precision, target_of(z.device)),
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    out = torch.empty((), device=z.device, dtype=torch.float32)
    wrap_triton(_sum_partials_kernel)[(1,)](parts, out, num_parts, n, BLOCK=1024, num_warps=4)
    return out


def legendre_gram_backward(
    grad: Tensor,
    z: Tensor,
    coefficients: Sequence[float],
    normalize: bool = True,
    input_precision: str = "tf32x3",
    *,
    panel_rows: int | None = None,
) -> Tensor:
    """``grad * dM/dz`` (shape and dtype of ``z``) for a 0-dim upstream gradient ``grad``; recomputes
    the Gram tiles panel by panel (``panel_rows`` rows at a time; default :func:`panel_rows_for`)."""
    coef = tuple(float(b) for b in coefficients)
    n, q = z.shape
    cfg = gram_config(z.dtype, q, n, target_of(z.device), input_precision)
    rinv, proj = row_scales(z, normalize, cfg)
    rows = panel_rows_for(n, cfg["mm_m"]) if panel_rows is None else min(n, int(panel_rows))
    dot_f32 = interpreting() and z.dtype != torch.float32
    prec = gram_precision(z.dtype, input_precision, target_of(z.device))
    num_dparts = triton.cdiv(n, cfg["dphi_n"])
    panel = torch.empty((rows, n), device=z.device, dtype=torch.float32)
    dpart = torch.empty((rows, num_dparts), device=z.device, dtype=torch.float32)
    out = torch.empty((n, q), device=z.device, dtype=z.dtype)
    grad = grad.reshape(())
    for row0 in range(0, n, rows):
        nrows = min(rows, n - row0)
        grid1 = (triton.cdiv(nrows, cfg["block"]) * num_dparts,)
        wrap_triton(_gram_dphi_kernel)[grid1](
            z, rinv, proj, panel, dpart,
            z.stride(0), z.stride(1), panel.stride(0), panel.stride(1), dpart.stride(0), dpart.stride(1),
            n, q, row0, nrows,
            COEF=coef, L=len(coef), NORMALIZE=normalize,
            BLOCK_M=cfg["block"], BLOCK_N=cfg["dphi_n"], BLOCK_K=cfg["dphi_k"], GROUP_M=cfg["group"],
            DOT_F32=dot_f32, INPUT_PRECISION=prec,
            num_warps=cfg["warps"], num_stages=cfg["stages"],
        )
        panel_matmul(panel, z, rinv, proj, dpart, grad, out, row0, nrows, normalize, False, cfg, dot_f32, prec)
    return out


# ==================================================================================================
# torch.library registration and autograd
# ==================================================================================================


def _gram_mean_op_body(z: Tensor, coefficients: list[float], normalize: bool, input_precision: str) -> Tensor:
    return legendre_gram_forward(z, coefficients, normalize, input_precision)


_gram_mean_op = triton_op("kernelssl::legendre_gram_mean", mutates_args=())(_gram_mean_op_body)


def _gram_mean_backward_op_body(
    grad: Tensor, z: Tensor, coefficients: list[float], normalize: bool, input_precision: str
) -> Tensor:
    return legendre_gram_backward(grad, z, coefficients, normalize, input_precision)


_gram_mean_backward_op = triton_op("kernelssl::legendre_gram_mean_backward",
                                   mutates_args=())(_gram_mean_backward_op_body)


def _torch_forward(z: Tensor, coefficients: list[float], normalize: bool, input_precision: str) -> Tensor:
    with torch.no_grad():
        return _torch_tier.legendre_gram_mean(z, tuple(coefficients), normalize=normalize).to(torch.float32)


def _torch_backward(grad: Tensor, z: Tensor, coefficients: list[float], normalize: bool, input_precision: str):
    return _torch_tier.legendre_gram_mean_backward(grad, z, coefficients, normalize)


register(_gram_mean_op, _gram_mean_op_body, _torch_forward, 0)
register(_gram_mean_backward_op, _gram_mean_backward_op_body, _torch_backward, 1)


def _setup_context(ctx, inputs, output):
    z, coefficients, normalize, input_precision = inputs
    ctx.save_for_backward(z)
    ctx.coefficients, ctx.normalize, ctx.input_precision = coefficients, normalize, input_precision


def _backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    (z,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the torch tier's plain autograd, recorded
        def eager(x):
            return _torch_tier.legendre_gram_mean_eager(x, tuple(ctx.coefficients), normalize=ctx.normalize)
        return *recorded_backward(eager, (z,), (True,), (grad,)), None, None, None
    dz = _gram_mean_backward_op(grad, z, ctx.coefficients, ctx.normalize, ctx.input_precision)
    return dz, None, None, None


_gram_mean_op.register_autograd(_backward, setup_context=_setup_context)


# ==================================================================================================
# entry point
# ==================================================================================================


def legendre_gram_mean(z: Tensor, coefficients: Sequence[float] = (1.0, 40.0, 40.0), *, normalize: bool = True,
                       input_precision: str | None = None) -> Tensor:
    """SFRIK's ``M(Z) = (1/n^2) sum_ij phi(zhat_i . zhat_j)`` with the fused kernels, for checked inputs
    (:func:`kernelssl.functional.legendre_gram_mean`): ``z (n, q)`` fp32 / fp16 / bf16 on CUDA (or on the
    CPU under ``TRITON_INTERPRET=1``), ``coefficients`` ``(b_1, ..., b_L)`` (each distinct tuple
    compiles once); ``input_precision`` None resolves as
    :func:`kernelssl.dispatch.resolve_precision`.  Returns a 0-dim float32 tensor, differentiable in
    ``z`` (gradient in z's dtype), deterministic.  Twice differentiable (the second derivative through
    the torch tier's plain autograd form, :func:`kernelssl.ops._common.recorded_backward`)."""
    return _gram_mean_op(z, [float(b) for b in coefficients], bool(normalize),
                         resolve_precision(input_precision, z.device))
