"""``rff_hsic``, Triton tier, the host side: launch configuration, launchers, registration.

The kernels and their math are in ``rff_hsic.py``.  ``kernelssl::rff_hsic_fwd`` and
``kernelssl::rff_hsic_bwd`` are ``torch.library.triton_op`` s; the backward op is wired in with
``register_autograd`` (the forward op also returns what the backward needs, marked
non-differentiable), so ``torch.compile(fullgraph=True)`` traces forward and backward with no graph
break and inductor sees the kernels.  CPU kernels and the compile rule come from
:func:`kernelssl.triton._common.register`: the interpreter under ``TRITON_INTERPRET=1``, else the
torch tier (:mod:`kernelssl.ops.rff_hsic`).
"""
from __future__ import annotations

import torch
import triton
from torch.library import triton_op

from ..dispatch import resolve_precision
from ..ops import rff_hsic as _torch_tier
from ..ops._common import recorded_backward
from ._common import interpreting, num_sms, register, wrap_triton
from .offline import wave_efficiency
from .rff_hsic import (
    _rff_cov_reduce_kernel,
    _rff_cross_cov_kernel,
    _rff_dx_kernel,
    _rff_feature_grad_kernel,
    _rff_features_kernel,
    _rff_finalize_kernel,
    _rff_stats_kernel,
)
from .targets import target_of

__all__ = ["rff_hsic", "rff_hsic_forward", "rff_hsic_backward"]

Tensor = torch.Tensor

# Largest block edge used under the interpreter (tests lower it to 16 to exercise multi-block paths
# and the split cross-covariance at small shapes), and the largest SPLIT there.
_INTERP_MAX_BLOCK = 64
_INTERP_MAX_SPLIT = 2


# ==================================================================================================
# launch configuration (shapes only; no tensor values)
# ==================================================================================================


def _pow2(n) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _block(n, lo: int, hi: int) -> int:
    """Power-of-two block edge for a dimension of size n, within [lo, hi]."""
    return max(lo, min(hi, _pow2(n)))


def _fwd_config(device: torch.device, N, B, d, DA, DB, precision: str = "ieee") -> dict:
    if interpreting() and device.type != "cuda":  # interpreter: few, large programs (each op costs Python time)
        cap = _INTERP_MAX_BLOCK
        c = dict(BI=_block(B, 16, cap), BJ=_block(max(DA, DB), 16, cap), BK=_block(d, 16, cap),
                 BN=_block(N, 16, cap), BJB=_block(DB, 16, cap), BJA=_block(DA, 16, cap),
                 BP=16, BJS=_block(max(DA, DB), 16, cap), warps=4, stages=1)
        c["split"] = max(1, min(_INTERP_MAX_SPLIT, triton.cdiv(N, c["BN"])))
        return c
    # GPU (untuned, see the module docstring): 64 features per program, 8 warps; 32 images for the
    # FMA ("ieee") dots, 64 for the TF32 ones (Hopper's warp-group MMA takes >= 64 rows).  No register
    # spills in any variant (fp32/bf16/fp16, ieee/tf32/tf32x3, aligned or odd d; compiled for sm_90 by
    # tests/compile_targets.py, under Triton 3.6 and 3.8), where 64 x 64 with 4 warps spilled up to ~0.5 KB
    # per thread.  The FMA dots take 32 x 32 x 16 tiles: with 32 x 64 x 32 Triton 3.6's build spills.
    ieee = precision == "ieee"
    target = target_of(device)
    # off sm_90 (register-resident MMA accumulators, FMA dots on sm_75): 16-deep K-steps for the
    # projection (64 x 64 x 32 tf32x3 tiles spilled on sm_80/86/89); 2 stages under 160 KiB of shared memory;
    # 4 warps where Triton's dots are FMAs (sm_75: the 32 x 32 ieee features tile spilled 28 B with 8);
    # 32-image feature tiles (bf16 views' three-part W split spilled 24-32 B at 64 on sm_80/86/89) and
    # 64 x 32 ieee cross-covariance tiles with MMAs (64 x 64 spilled 8-12 B on sm_80/86)
    narrow = not (target.vendor == "nvidia" and target.arch >= 90)
    c = dict(BI=32 if (ieee or narrow) else 64, BJ=32 if ieee else 64, BK=16 if (ieee or narrow) else 32,
             BN=32, BJB=64, BJA=32 if (ieee and narrow and target.triton_mma) else 64,
             BP=32, BJS=128, warps=8 if target.triton_mma else 4,
             stages=3 if target.smem_per_block >= 160 * 1024 else 2)
    tiles = triton.cdiv(DA, c["BJA"]) * triton.cdiv(DB, c["BJB"])
    sms = num_sms(device)
    max_split = max(1, triton.cdiv(N, 8 * c["BN"]))  # >= 8 row blocks per split
    c["split"] = _wave_split(tiles, sms * _CROSS_COV_PER_SM, max_split)
    return c


# Resident cross-covariance programs per SM (64 x 64 fp32 accumulator, 8 warps: ptxas allocates
# 96-128 registers a thread under both compilers -> 2 programs of 256 threads per SM; the static model,
# benchmarks/perf_model.py, checks the wave efficiency this implies from the compiled kernel).
_CROSS_COV_PER_SM = 2


def _wave_split(tiles: int, slots: int, max_split: int) -> int:
    """SPLIT of the rows for ``tiles`` output tiles on a GPU with ``slots`` resident programs: the
    smallest split whose wave efficiency ``tiles * s / (ceil(tiles * s / slots) * slots)`` reaches 90%
    (or the best there is) over ``1 .. min(max_split, 4 * slots / tiles)``.  E.g.
    64 tiles on 132 SMs x 2: split 4 (256 of 264 slots, 97%), where the first split to reach ~2 programs
    an SM (5: 320 programs, 3 waves of which the last 21% full) wastes 39% of the machine."""
    hi = max(1, min(max_split, (4 * slots) // max(tiles, 1)))

    def eff(s: int) -> float:
        return wave_efficiency(tiles * s, slots)

    target = min(0.9, max(eff(s) for s in range(1, hi + 1)))
    return next(s for s in range(1, hi + 1) if eff(s) >= target)


def _w_split(dtype: torch.dtype, precision: str) -> int:
    """How the forward projection ``x W^T`` runs: 0 as ``tl.dot`` at ``precision`` on fp32 operands;
    for bf16 views under "tf32x3", W split into three bf16 parts, three bf16 MMAs (1 on the GPU, 2
    the same split emulated under the interpreter): x is exact in bf16 and ``|W - w1 - w2 - w3| <~
    2^-24 |W|``, so every product is fp32-exact (at least tf32x3's accuracy) at the bf16 rate, ~2x
    tf32x3's (the projection was the bf16 forward's largest cost above the performance model's limit)."""
    if dtype != torch.bfloat16 or precision != "tf32x3":
        return 0
    return 2 if interpreting() else 1


def _bwd_config(device: torch.device, N, d, DA, DB, precision: str = "tf32x3") -> dict:
    if interpreting() and device.type != "cuda":
        cap = _INTERP_MAX_BLOCK
        return dict(BM=_block(N, 16, cap), BJ=_block(max(DA, DB), 16, cap), BK=_block(d, 16, cap),
                    BL=_block(max(DA, DB), 16, cap), BM2=_block(N, 16, cap), BN2=_block(d, 16, cap),
                    BK2=_block(DA + DB, 16, cap), warps=4, stages=1, stages2=1)
    # Pass 1: 64 x 64 tiles of T (the two GEMMs over d and over D_other read X and the Phi panel once
    # per 64 features instead of once per 32), K-steps of 32; pass 2: a plain GEMM, 64 x 64 tiles.
    # FMA ("ieee") dots hold a thread's whole K slice in registers: K-steps of 16 there.
    target = target_of(device)
    narrow = not (target.vendor == "nvidia" and target.arch >= 90)  # off sm_90: 16-deep K-steps (spilled at 32)
    bk = 16 if (precision == "ieee" or narrow) else 32
    return dict(BM=64, BJ=64, BK=bk, BL=bk, BM2=64, BN2=64, BK2=bk, warps=8, stages=2,
                stages2=3 if target.smem_per_block >= 160 * 1024 else 2)


# ==================================================================================================
# launchers
# ==================================================================================================


def rff_hsic_forward(
    views: Tensor, w_a: Tensor, b_a: Tensor, w_b: Tensor, b_b: Tensor, scale: Tensor, input_precision: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward kernels.  Returns ``(hsic_zy, hsic_zz, phi_a, phi_b, s, mu_a, mu_b, cov)``:
    the two 0-dim fp32 estimators, then what the backward needs (fp32): ``phi_a (N, D_A)``,
    ``phi_b (N, D_B)``, ``s (B, D_A)``, ``mu_a (D_A,)``, ``mu_b (D_B,)``, ``cov = Phibar_B^T Phibar_A``."""
    K, B, d = views.shape
    DA, DB = w_a.shape[0], w_b.shape[0]
    N = K * B
    dev = views.device
    f32 = dict(device=dev, dtype=torch.float32)
    cfg = _fwd_config(dev, N, B, d, DA, DB, input_precision)
    num_i = triton.cdiv(B, cfg["BI"])
    num_ja, num_jb = triton.cdiv(DA, cfg["BJ"]), triton.cdiv(DB, cfg["BJ"])
    phi_a = torch.empty((N, DA), **f32)
    phi_b = torch.empty((N, DB), **f32)
    s = torch.empty((B, DA), **f32)
    colsum_a = torch.empty((num_i, DA), **f32)
    colsum_b = torch.empty((num_i, DB), **f32)
    m2 = torch.empty((num_i * num_ja,), **f32)
    w_split = _w_split(views.dtype, input_precision)
    wrap_triton(_rff_features_kernel)[(num_i, num_ja + num_jb)](
        views, w_a, b_a, w_b, b_b, scale,
        phi_a, phi_b, s, colsum_a, colsum_b, m2,
        views.stride(0), views.stride(1), views.stride(2),
        w_a.stride(0), w_a.stride(1), b_a.stride(0), w_b.stride(0), w_b.stride(1), b_b.stride(0),
        K, B, d, DA, DB,
        # the three-part W split on the GPU: K-steps of 16 (32 spilled under Triton 3.6's compiler)
        BLOCK_I=cfg["BI"], BLOCK_J=cfg["BJ"], BLOCK_K=16 if w_split == 1 else cfg["BK"], PRECISION=input_precision,
        W_SPLIT=w_split,
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    mu_a = torch.empty((DA,), **f32)
    mu_b = torch.empty((DB,), **f32)
    num_sa, num_sb = triton.cdiv(DA, cfg["BJS"]), triton.cdiv(DB, cfg["BJS"])
    zy_part = torch.empty((num_sa,), **f32)
    wrap_triton(_rff_stats_kernel)[(num_sa + num_sb,)](
        colsum_a, colsum_b, mu_a, mu_b, zy_part, num_i, K, B, DA, DB,
        BLOCK_P=cfg["BP"], BLOCK_J=cfg["BJS"], BLOCK_I=cfg["BI"], num_warps=4,
    )
    tiles = triton.cdiv(DA, cfg["BJA"]) * triton.cdiv(DB, cfg["BJB"])
    split = cfg["split"]
    rows_per_split = triton.cdiv(triton.cdiv(N, cfg["BN"]), split) * cfg["BN"]
    cov = torch.empty((DB, DA), **f32)
    sumsq = torch.empty((tiles,), **f32)
    part = cov if split == 1 else torch.empty((split, DB, DA), **f32)
    wrap_triton(_rff_cross_cov_kernel)[(tiles, split)](
        phi_a, phi_b, mu_a, mu_b, part, sumsq, N, DA, DB, rows_per_split,
        BLOCK_N=cfg["BN"], BLOCK_JB=cfg["BJB"], BLOCK_JA=cfg["BJA"], PRECISION=input_precision,
        SPLIT_ONE=split == 1, num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    if split > 1:
        wrap_triton(_rff_cov_reduce_kernel)[(tiles,)](
            part, cov, sumsq, DA, DB, split, BLOCK_JB=cfg["BJB"], BLOCK_JA=cfg["BJA"], num_warps=4,
        )
    zy = torch.empty((), **f32)
    zz = torch.empty((), **f32)
    wrap_triton(_rff_finalize_kernel)[(1,)](
        m2, zy_part, sumsq, zy, zz, num_i * num_ja, num_sa, tiles, K, B, BLOCK=1024, num_warps=4,
    )
    return zy, zz, phi_a, phi_b, s, mu_a, mu_b, cov


def rff_hsic_backward(
    g_zy: Tensor, g_zz: Tensor, views: Tensor, w_a: Tensor, b_a: Tensor, w_b: Tensor, b_b: Tensor,
    scale: Tensor, phi_a: Tensor, phi_b: Tensor, s: Tensor, mu_a: Tensor, mu_b: Tensor, cov: Tensor,
    input_precision: str,
) -> Tensor:
    """Launch the two backward kernels: ``d(g_zy HSIC_ZY + g_zz HSIC_ZZ)/d views``, (K, B, d) in the
    views' dtype (contiguous).  Extra memory: the fp32 ``(N, D_A + D_B)`` T."""
    K, B, d = views.shape
    DA, DB = w_a.shape[0], w_b.shape[0]
    N = K * B
    cfg = _bwd_config(views.device, N, d, DA, DB, input_precision)
    t = torch.empty((N, DA + DB), device=views.device, dtype=torch.float32)
    grid1 = (triton.cdiv(N, cfg["BM"]), triton.cdiv(DA, cfg["BJ"]) + triton.cdiv(DB, cfg["BJ"]))
    wrap_triton(_rff_feature_grad_kernel)[grid1](
        views, w_a, b_a, w_b, b_b, scale, g_zy, g_zz,
        phi_a, phi_b, s, mu_a, mu_b, cov, t,
        views.stride(0), views.stride(1), views.stride(2),
        w_a.stride(0), w_a.stride(1), b_a.stride(0), w_b.stride(0), w_b.stride(1), b_b.stride(0),
        K, B, d, DA, DB,
        BLOCK_M=cfg["BM"], BLOCK_J=cfg["BJ"], BLOCK_K=cfg["BK"], BLOCK_L=cfg["BL"],
        PRECISION=input_precision, num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    grad = torch.empty((K, B, d), device=views.device, dtype=views.dtype)
    grid2 = (triton.cdiv(N, cfg["BM2"]), triton.cdiv(d, cfg["BN2"]))
    wrap_triton(_rff_dx_kernel)[grid2](
        t, w_a, w_b, grad,
        w_a.stride(0), w_a.stride(1), w_b.stride(0), w_b.stride(1),
        N, d, DA, DB,
        BLOCK_M=cfg["BM2"], BLOCK_N=cfg["BN2"], BLOCK_K=cfg["BK2"], PRECISION=input_precision,
        num_warps=cfg["warps"], num_stages=cfg["stages2"],
    )
    return grad


# ==================================================================================================
# torch.library registration + autograd
# ==================================================================================================


def _rff_hsic_fwd_body(
    views: Tensor, w_a: Tensor, b_a: Tensor, w_b: Tensor, b_b: Tensor, scale: Tensor, input_precision: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return rff_hsic_forward(views, w_a, b_a, w_b, b_b, scale, input_precision)


_rff_hsic_fwd = triton_op("kernelssl::rff_hsic_fwd", mutates_args=())(_rff_hsic_fwd_body)


def _rff_hsic_bwd_body(
    g_zy: Tensor, g_zz: Tensor, views: Tensor, w_a: Tensor, b_a: Tensor, w_b: Tensor, b_b: Tensor,
    scale: Tensor, phi_a: Tensor, phi_b: Tensor, s: Tensor, mu_a: Tensor, mu_b: Tensor, cov: Tensor,
    input_precision: str,
) -> Tensor:
    return rff_hsic_backward(g_zy, g_zz, views, w_a, b_a, w_b, b_b, scale, phi_a, phi_b, s, mu_a, mu_b, cov,
                             input_precision)


_rff_hsic_bwd = triton_op("kernelssl::rff_hsic_bwd", mutates_args=())(_rff_hsic_bwd_body)


def _torch_forward(views, w_a, b_a, w_b, b_b, scale, input_precision):
    """The torch tier's two estimators (fp32); the saved intermediates only the fused backward reads
    are zeros of their shapes (the CPU backward recomputes from the inputs)."""
    K, B, _ = views.shape
    DA, DB = w_a.shape[0], w_b.shape[0]
    with torch.no_grad():
        zy, zz = _torch_tier.rff_hsic(views, w_a, b_a, w_b, b_b, scale.reshape(()))
    zeros = [views.new_zeros(shape, dtype=torch.float32)
             for shape in ((K * B, DA), (K * B, DB), (B, DA), (DA,), (DB,), (DB, DA))]
    return zy.float(), zz.float(), *zeros


def _torch_backward(g_zy, g_zz, views, w_a, b_a, w_b, b_b, scale, *_saved_and_precision):
    return _torch_tier.rff_hsic_backward(g_zy, g_zz, views, w_a, b_a, w_b, b_b, scale.reshape(()))


register(_rff_hsic_fwd, _rff_hsic_fwd_body, _torch_forward, 0)
register(_rff_hsic_bwd, _rff_hsic_bwd_body, _torch_backward, 2)


def _setup_context(ctx, inputs, output):
    views, w_a, b_a, w_b, b_b, scale, input_precision = inputs
    _, _, phi_a, phi_b, s, mu_a, mu_b, cov = output
    ctx.save_for_backward(views, w_a, b_a, w_b, b_b, scale, phi_a, phi_b, s, mu_a, mu_b, cov)
    ctx.input_precision = input_precision
    ctx.mark_non_differentiable(phi_a, phi_b, s, mu_a, mu_b, cov)
    ctx.set_materialize_grads(False)


def _backward(ctx, g_zy, g_zz, *_intermediates):
    if not ctx.needs_input_grad[0] or (g_zy is None and g_zz is None):
        return None, None, None, None, None, None, None
    views, w_a, b_a, w_b, b_b, scale, phi_a, phi_b, s, mu_a, mu_b, cov = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the torch tier's plain autograd, recorded
        def eager(v):
            return _torch_tier.rff_hsic_autograd(v, w_a, b_a, w_b, b_b, scale.reshape(()))
        return *recorded_backward(eager, (views,), (True,), (g_zy, g_zz)), None, None, None, None, None, None
    zero = torch.zeros((), device=views.device, dtype=torch.float32)
    g_zy = zero if g_zy is None else g_zy
    g_zz = zero if g_zz is None else g_zz
    grad = _rff_hsic_bwd(g_zy, g_zz, views, w_a, b_a, w_b, b_b, scale, phi_a, phi_b, s, mu_a, mu_b, cov,
                         ctx.input_precision)
    return grad, None, None, None, None, None, None


_rff_hsic_fwd.register_autograd(_backward, setup_context=_setup_context)


# ==================================================================================================
# entry point
# ==================================================================================================


def rff_hsic(views: Tensor, w_a: Tensor, b_a: Tensor, w_b: Tensor, b_b: Tensor, kernel_scale: float | Tensor, *,
             input_precision: str | None = None) -> tuple[Tensor, Tensor]:
    """``(HSIC_ZY, HSIC_ZZ)`` through the fused kernels, for checked inputs
    (:func:`kernelssl.functional.rff_hsic`): 0-dim fp32 tensors, differentiable in ``views`` (the maps take no
    gradient here: :mod:`kernelssl.dispatch` sends maps that require grad to the torch tier).  ``kernel_scale``
    (a float or a 1-element tensor) is detached and never read on the host; ``input_precision`` (None resolves
    as :func:`kernelssl.dispatch.resolve_precision`) applies to every GEMM, half-precision views included (each
    has an
    fp32 operand: the maps, Phi, C)."""
    if isinstance(kernel_scale, Tensor):
        scale = kernel_scale.detach().to(device=views.device, dtype=torch.float32).reshape(1)
    else:
        scale = torch.full((1,), float(kernel_scale), device=views.device, dtype=torch.float32)
    out = _rff_hsic_fwd(views, w_a, b_a, w_b, b_b, scale, resolve_precision(input_precision, views.device))
    return out[0], out[1]
