"""``taylor_logdet``, Triton tier, the host side: launch configuration, launchers, registration.

The kernels and their math are in ``taylor_logdet.py``.  Registered as
``torch.ops.kernelssl.taylor_logdet_fwd`` / ``taylor_logdet_bwd`` through
:func:`torch.library.triton_op` (autograd via :func:`torch.library.register_autograd`), so
``torch.compile(fullgraph=True)`` traces through; CPU kernels and the compile rule from
:func:`kernelssl.triton._common.register` (the interpreter under ``TRITON_INTERPRET=1``, else the torch
tier :mod:`kernelssl.ops.taylor_logdet`).
"""
from __future__ import annotations

import math

import torch
import triton
from torch.library import triton_op

from ..dispatch import resolve_precision
from ..ops import taylor_logdet as _torch_tier
from ..ops._common import promote, recorded_backward
from ._common import interpreting, num_sms, register, wrap_triton
from .offline import wave_efficiency
from .targets import target_of
from .taylor_logdet import (
    _gemm_kernel,
    _pair_diag_kernel,
    _power_step_kernel,
    _project_kernel,
    _rownorm_kernel,
    _series_reduce_kernel,
    _small_series_kernel,
)

__all__ = [
    "taylor_logdet",
    "taylor_logdet_with_diagnostics",
    "taylor_logdet_forward",
    "taylor_logdet_backward",
    "ONCHIP_MAX",
]

Tensor = torch.Tensor

# s = min(m, d) up to which the whole series runs on-chip, one program per pair.  32: at 64 the
# fp32 FMA dots of a 64 x 64 matrix spill registers (ptxas, sm_90); the tiled path takes over.
ONCHIP_MAX = 32
POWER_ITERS = 16  # power-iteration steps of the rho estimate (as the torch tier's convergence_diagnostics)
_TINY = torch.finfo(torch.float32).tiny
_INTERP_BLOCK = 16  # tile edge under the interpreter: small shapes still span several tiles


# ==================================================================================================
# launch configuration
# ==================================================================================================


def _gemm_config(half_dot: bool, input_precision: str, proj: int = 0, hilo: int = 0, device=None) -> dict:
    """Tile sizes of :func:`_gemm_kernel`, chosen so that ptxas (sm_90) reports no register spills
    for any variant the launchers issue.  fp32 "ieee" dots run on the FMA units, whose operand
    layout holds a thread's whole K slice in registers: BLOCK_K = 16.  fp32 tensor-core dots (tf32x3 /
    tf32) take 128 x 64 tiles, 64 x 64 when the normalisation-Jacobian epilogue is fused.  Half-input
    Grams: 128 x 128 x 64 tiles, 4 stages (one program per SM, by shared memory: at MEC's paper shape
    the 128 tiles of the two pairs fill 132 SMs without a split-K and its partials' sum).  bf16
    gradients (HILO, two bf16 dots per K-step): 64 x 128 tiles, so each split of S serves 128 columns."""
    if interpreting():
        b = _INTERP_BLOCK
        return dict(BLOCK_M=b, BLOCK_N=b, BLOCK_K=b, GROUP_M=4, num_warps=4, num_stages=1)
    if half_dot:
        # 4 stages of 128 x 64 x 2 bytes x 2 = 128 KiB: 2 stages (64 KiB) where a block has less shared memory
        stages = 4 if target_of(device).smem_per_block >= 160 * 1024 else 2
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=stages)
    if hilo:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    if input_precision != "ieee":
        # off sm_90 the MMA accumulators are register-resident: tf32x3's three products spilled 4-16 B a thread
        # with 128 x 64 x 32 tiles on sm_80/86 (and 8 B with 64 x 64 x 32 on sm_86): 64 x 64 x 16 there
        target = target_of(device)
        hopper = target.vendor == "nvidia" and target.arch >= 90
        split3 = input_precision == "tf32x3" and not hopper
        bm = 64 if (proj or split3) else 128
        return dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=16 if split3 else 32, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3)


def _row_block() -> int:
    return _INTERP_BLOCK if interpreting() else 16


def _col_block(n: int) -> int:
    return _INTERP_BLOCK if interpreting() else min(128, max(16, triton.next_power_of_2(n)))


_PROJ_IN_TILE_MAX = 128  # d-space gradients: rows up to this width are projected in the GEMM epilogue


def _gemm_per_sm(half_dot: bool, input_precision: str) -> int:
    """Resident programs per SM of the plain (no projection) :func:`_gemm_kernel` launches of
    :func:`_gemm_config` on sm_90, from ptxas' registers and shared memory (256 threads a program):
    half-input dots, 128 x 128 tiles with 4 stages of 64-deep K slices -> 128 KiB of shared memory
    (and ~150 registers) -> 1; fp32 dots (tf32x3 / tf32 / ieee) > 128 registers -> 1.  The static model
    (benchmarks/perf_model.py) reads the real figure from the compiled kernel and checks the waves."""
    return 1


def _split_k(tiles: int, batch: int, k: int, block_k: int, slots: int = 264) -> int:
    """Contraction chunks so that a small output fills the GPU's ``slots`` resident programs (SMs x
    programs per SM): the smallest split (each chunk >= 4 K-steps) whose wave efficiency
    ``p / (ceil(p / slots) * slots)``, ``p = tiles * batch * split``, reaches 90%, or the best there
    is; 1 when the output alone does (e.g. MEC's fp32 Gram at the paper shape: 256 programs on 132 SMs
    x 1, 97%, where a split of 2 only adds the partials' sum).  At most 2 under the interpreter (it
    exercises the path)."""
    steps = triton.cdiv(k, block_k)
    if interpreting():
        return 2 if steps >= 2 and tiles * batch <= 16 else 1
    hi = max(1, steps // 4)
    base = max(1, tiles * batch)

    def eff(sp: int) -> float:
        return wave_efficiency(base * sp, slots)

    target = min(0.9, max(eff(sp) for sp in range(1, hi + 1)))
    return next(sp for sp in range(1, hi + 1) if eff(sp) >= target)


_MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis 0 (axes 1 and 2: 65535)


def _programs(tiles: int, pairs: int) -> int:
    """Grid axis 0 of a launch over ``pairs`` pairs of ``tiles`` programs each (see ``_pair_split``)."""
    n = tiles * pairs
    if n > _MAX_GRID_X:
        raise ValueError(f"a, b: a batch of {pairs} pairs needs {n} programs of one launch, more than CUDA's "
                         f"{_MAX_GRID_X}: split the batch")
    return n


def _pair_diag_group(nb: int, pairs: int, sms: int) -> int:
    """Column blocks per :func:`_pair_diag_kernel` program (its J loop): the fewest partials per row
    (so the one-program-per-pair series reduction reads little) whose ``nb x groups x pairs``
    programs still keep >= 90% of the SMs streaming (the kernel is bytes-bound), else one block each.
    2 under the interpreter (the loop is exercised)."""
    if interpreting():
        return min(2, nb)
    for groups in range(1, nb + 1):
        p = nb * groups * pairs
        if p / (triton.cdiv(p, sms) * sms) >= 0.9:
            return triton.cdiv(nb, groups)
    return 1


def _vec_stride(v: Tensor) -> int:
    return v.stride(0) if v.dim() >= 1 and v.numel() > 0 else 0


def _gemm(x, y, out, alpha, *, sx, sy, so, m, n, k, z=None, sz=(0, 0, 0), rs=None, cs=None, ks=None,
          ks2=None, own=None, ownn=None, rdot=None, g=None, proj=0, half_dot=False,
          input_precision="tf32x3", split=1, k_split=None, block_n=None, has_alpha=True, series=0,
          eye_z=False, hilo=0):
    """Launch :func:`_gemm_kernel`; ``sx, sy, sz`` are (batch, row, col) strides of the operands as
    used (transposes are stride swaps), ``so`` the (split, batch, row, col) strides of ``out``.
    ``alpha`` (P,) is also the batch size when ``has_alpha`` is False (then not read)."""
    cfg = _gemm_config(half_dot, input_precision, proj, hilo, x.device)
    if series and not interpreting():
        # the S_n epilogue reads a tile of X too: 128-row tf32x3 tiles spilled (unaligned s, sm_90)
        cfg["BLOCK_M"] = 64
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
        if block_n > 64 and input_precision == "tf32x3" and not half_dot and not hilo:
            cfg["BLOCK_K"] = 16  # 64 x 128 tiles with the fused projection: K-steps of 32 spilled (sm_90)
    k_split = k if k_split is None else k_split
    batch = alpha.shape[0]
    dummy = alpha
    own_t = own if own is not None else x
    sw = (own.stride(0), own.stride(1), own.stride(2)) if own is not None else (0, 0, 0)
    grid = (_programs(triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), batch), split)
    wrap_triton(_gemm_kernel)[grid](
        x, y, z if z is not None else dummy, out,
        alpha,
        rs if rs is not None else dummy, cs if cs is not None else dummy,
        ks if ks is not None else dummy, ks2 if ks2 is not None else dummy,
        own_t, ownn if ownn is not None else dummy,
        rdot if rdot is not None else dummy, g if g is not None else dummy,
        sx[0], sx[1], sx[2],
        sy[0], sy[1], sy[2],
        sz[0], sz[1], sz[2],
        so[0], so[1], so[2], so[3],
        sw[0], sw[1], sw[2],
        _vec_stride(rs) if rs is not None else 0, _vec_stride(cs) if cs is not None else 0,
        _vec_stride(ks) if ks is not None else 0, _vec_stride(ks2) if ks2 is not None else 0,
        _vec_stride(ownn) if ownn is not None else 0, _vec_stride(rdot) if rdot is not None else 0,
        m, n, k, k_split,
        HAS_ALPHA=has_alpha, ALPHA_G=g is not None and has_alpha, HAS_RS=rs is not None, HAS_CS=cs is not None,
        KS_COUNT=(ks is not None) + (ks2 is not None), HAS_Z=z is not None, SERIES=series, EYE_Z=eye_z,
        PROJ=proj, HALF_DOT=half_dot, HILO=hilo, DOT_F32=bool(hilo) and interpreting(), PRECISION=input_precision,
        ROUND_BF16=_round_bf16_here(out), **cfg,
    )


def _strides3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _t3(t: Tensor) -> tuple[int, int, int]:
    """Strides of the transpose of the trailing two dims."""
    return t.stride(0), t.stride(2), t.stride(1)


def _so(t: Tensor) -> tuple[int, int, int, int]:
    """(split, batch, row, col) strides of a GEMM output: a (SPLIT, P, r, c) buffer or a (P, r, c) one."""
    if t.dim() == 4:
        return t.stride(0), t.stride(1), t.stride(2), t.stride(3)
    return 0, t.stride(0), t.stride(1), t.stride(2)


def _round_bf16_here(out: Tensor) -> bool:
    """Round bf16 stores by hand: only under the interpreter, whose fp32 -> bf16 cast truncates."""
    return interpreting() and out.dtype == torch.bfloat16


def _half(t: Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


# ==================================================================================================
# launchers
# ==================================================================================================


def taylor_logdet_forward(a3: Tensor, b3: Tensor, lam: Tensor, order: int, normalize: bool,
                          diagnostics: bool, input_precision: str):
    """Forward of the op on ``a3, b3: (P, m, d)`` (fp32/fp16/bf16, same dtype) and ``lam: (P,)`` fp32.

    Returns ``(T, U, nrm, q, r, mats, rho, ratio)``:
    ``T (P,)`` the series; ``U (P,)`` = ``lam dT/dlam``; ``nrm (2, P, m)`` the row norms of a and b
    (``(2, P, 0)`` without normalisation); ``q (P, m)`` = ``A^_i . B^_i`` (order 1; else ``(P, 0)``);
    ``r (P, s)`` = ``diag(M S_n)`` (``(P, 0)`` for order 1 without diagnostics); ``mats`` what the
    backward needs: ``S_n`` as ``(1, P, s, s)`` on the on-chip path, the powers ``M^1..M^h`` as
    ``(h, P, s, s)`` otherwise, ``(0, P, s, s)`` for order 1; ``rho, ratio (P,)`` the diagnostics
    (zeros unless ``diagnostics``).
    """
    P, m, d = a3.shape
    s = min(m, d)
    mspace = m <= d
    dev, f32 = a3.device, torch.float32
    need_rows = normalize or order == 1
    series = order >= 2 or diagnostics
    nt = max(order, 2) if diagnostics else order
    onchip = s <= ONCHIP_MAX

    nrm = torch.empty((2, P, m if normalize else 0), device=dev, dtype=f32)
    q = torch.empty((P, m if order == 1 else 0), device=dev, dtype=f32)
    q_buf = q if order == 1 else torch.empty((P, m if need_rows else 0), device=dev, dtype=f32)
    if need_rows:
        br, bd = _row_block(), _col_block(d)
        wrap_triton(_rownorm_kernel)[(_programs(triton.cdiv(m, br), P),)](
            a3, b3, nrm, q_buf,
            *_strides3(a3), *_strides3(b3),
            nrm.stride(0), nrm.stride(1), q_buf.stride(0),
            m, d,
            NORMALIZE=normalize, BLOCK_R=br, BLOCK_D=bd,
            num_warps=4,
        )
    # rho, ratio: written by the series kernels (zeros without diagnostics), zeros here for order 1
    fill = torch.empty if series else torch.zeros
    rho, ratio = fill((P,), device=dev, dtype=f32), fill((P,), device=dev, dtype=f32)
    r = torch.empty((P, s if series else 0), device=dev, dtype=f32)
    t_ser = torch.empty((P,), device=dev, dtype=f32)
    u_ser = torch.empty((P,), device=dev, dtype=f32)
    mats = torch.empty((0, P, s, s), device=dev, dtype=f32)
    if series:
        h = (nt + 1) // 2
        half_dot = (not interpreting()) and _half(a3) and (mspace or not normalize)
        cfg = _gemm_config(half_dot, input_precision, device=dev)
        L = d if mspace else m
        tiles = triton.cdiv(s, cfg["BLOCK_M"]) * triton.cdiv(s, cfg["BLOCK_N"])
        split = _split_k(tiles, P, L, cfg["BLOCK_K"], num_sms(dev) * _gemm_per_sm(half_dot, input_precision))
        k_split = triton.cdiv(triton.cdiv(L, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        split = triton.cdiv(L, k_split)
        if onchip or split > 1:
            gbuf = torch.empty((split, P, s, s), device=dev, dtype=f32)
        else:
            pw = torch.empty((h, P, s, s), device=dev, dtype=f32)
            gbuf = pw[:1]
        na, nb = (nrm[0], nrm[1]) if normalize else (None, None)
        if mspace:  # M = lam diag(1/|a|) A B^T diag(1/|b|)
            _gemm(a3, b3, gbuf, lam, sx=_strides3(a3), sy=_t3(b3), so=_so(gbuf), m=s, n=s, k=L,
                  rs=na, cs=nb, half_dot=half_dot, input_precision=input_precision, split=split, k_split=k_split)
        else:  # M = lam B^T diag(1/(|a||b|)) A
            _gemm(b3, a3, gbuf, lam, sx=_t3(b3), sy=_strides3(a3), so=_so(gbuf), m=s, n=s, k=L,
                  ks=na, ks2=nb, half_dot=half_dot, input_precision=input_precision, split=split, k_split=k_split)
        if onchip:
            store_s = order >= 2
            mats = torch.empty((1 if store_s else 0, P, s, s), device=dev, dtype=f32)
            s_out = mats[0] if store_s else gbuf[0]
            bs = max(16, triton.next_power_of_2(s))
            wrap_triton(_small_series_kernel)[(P,)](
                gbuf, t_ser, u_ser, r, s_out, rho, ratio,
                gbuf.stride(0), gbuf.stride(1), gbuf.stride(2), gbuf.stride(3),
                s_out.stride(0), s_out.stride(1), s_out.stride(2), r.stride(0),
                s, split,
                ORDER=order, NT=nt, STORE_S=store_s, DIAG=diagnostics,
                ITERS=POWER_ITERS, BURN=POWER_ITERS // 2, GOLDEN=_torch_tier.GOLDEN_ANGLE, TINY=_TINY,
                # s <= 32: products of at most 32 x 32 x 32, latency-bound, on the FMA units
                # whatever the op's precision (full fp32); tf32x3 there spilled 40-48 B under
                # Triton 3.6 (255 registers with 4 or 8 warps).
                PRECISION="ieee", BLOCK_S=bs,
                num_warps=4 if bs <= 32 else 16,
            )
        else:
            if split > 1:
                pw = torch.empty((h, P, s, s), device=dev, dtype=f32)
                torch.sum(gbuf, 0, out=pw[0])  # fixed order; no copy
            for k in range(2, h + 1):  # M^k = M^(k-1) M
                _gemm(pw[k - 2], pw[0], pw[k - 1], lam, sx=_strides3(pw[k - 2]), sy=_strides3(pw[0]),
                      so=_so(pw[k - 1]), m=s, n=s, k=s, input_precision=input_precision, has_alpha=False)
            blk = _INTERP_BLOCK if interpreting() else 64
            nb = triton.cdiv(s, blk)
            jg = _pair_diag_group(nb, P, num_sms(dev))
            nj = triton.cdiv(nb, jg)
            part = torch.empty((nt, P, nj, s), device=dev, dtype=f32)
            wrap_triton(_pair_diag_kernel)[(_programs(nb * nj, P),)](
                pw, part,
                pw.stride(0), pw.stride(1), pw.stride(2), pw.stride(3),
                part.stride(0), part.stride(1), part.stride(2),
                s, jg,
                H=h, NT=nt, BLOCK=blk,
                num_warps=8,
            )
            rblk = _INTERP_BLOCK if interpreting() else 256
            wrap_triton(_series_reduce_kernel)[(P,)](
                part, t_ser, u_ser, r, rho, ratio,
                part.stride(0), part.stride(1), part.stride(2), r.stride(0),
                s, nj,
                ORDER=order, NT=nt, DIAG=diagnostics, NT_PAD=triton.next_power_of_2(nt), BLOCK=rblk,
                num_warps=4,
            )
            if diagnostics:
                rho = _power_iteration(pw[0])
            if order >= 2:
                mats = pw
    if order == 1:
        t_out = lam * q.sum(-1)
        u_out = t_out.clone()
    else:
        t_out, u_out = t_ser, u_ser
    return t_out, u_out, nrm, q, r, mats, rho, ratio


def _power_iteration(mat: Tensor) -> Tensor:
    """rho estimate of ``mat (P, s, s)``: POWER_ITERS launches of :func:`_power_step_kernel`; the
    same iteration as :func:`kernelssl.ops.taylor_logdet.convergence_diagnostics` (geometric mean of the growth
    over the second half)."""
    P, s, _ = mat.shape
    dev, f32 = mat.device, torch.float32
    br = _INTERP_BLOCK if interpreting() else 32
    bc = _INTERP_BLOCK if interpreting() else 128
    nr = triton.cdiv(s, br)
    v0 = torch.cos(torch.arange(s, dtype=f32, device=dev) * _torch_tier.GOLDEN_ANGLE) + 1.5
    v0 = v0 / v0.norm()
    vs = [v0.expand(P, s).contiguous(), torch.empty((P, s), device=dev, dtype=f32)]
    sq = torch.zeros((POWER_ITERS + 1, P, nr), device=dev, dtype=f32)
    sq[0, :, 0] = 1.0  # ||v0|| = 1
    for it in range(POWER_ITERS):
        vin, vout = vs[it % 2], vs[(it + 1) % 2]
        wrap_triton(_power_step_kernel)[(_programs(nr, P),)](
            mat, vin, sq[it], vout, sq[it + 1],
            mat.stride(0), mat.stride(1), mat.stride(2), vin.stride(0), sq.stride(1),
            s, nr,
            TINY=_TINY, NR_PAD=triton.next_power_of_2(nr), BLOCK_R=br, BLOCK_C=bc,
            num_warps=4,
        )
    burn = POWER_ITERS // 2
    growth = sq[burn + 1:].sum(-1).sqrt()  # (iters - burn, P): ||M v^_t|| for t >= burn
    return torch.exp(torch.log(growth).sum(0) / (POWER_ITERS - burn))


def _s_from_powers(pw: Tensor, order: int, input_precision: str = "tf32x3") -> Tensor:
    """``S_n = sum_{j<n} (-M)^j = Q_h + (-M)^h Q_(n-h)`` from the powers ``M^1..M^h``, with
    ``Q_r = sum_{j<r} (-M)^j = I - R_r``, ``R_r = sum_{1<=j<r} (-1)^(j+1) M^j``: for n >= 4 one GEMM,
    ``S_n = (-1)^h (M^h - M^h R_(n-h)) + I - R_h``, whose identity and ``M^h`` term are added in the
    epilogue (``R_2 = M`` is the stored power: no other launch at n = 4; one add per further term);
    orders 2 and 3 elementwise."""
    _, P, s, _ = pw.shape
    h = (order + 1) // 2  # a Python int (pw.shape[0] would be symbolic under dynamic shapes)
    if order - h <= 1:  # n = 2: I - M;  n = 3: I - M + M^2
        eye = torch.eye(s, device=pw.device, dtype=pw.dtype)
        out = torch.add(eye, pw[0], alpha=-1.0)  # one launch (alpha = +-1 is exact), (P, s, s)
        return out if h == 1 else out + pw[1]

    def r_(r):
        out = pw[0]
        for j in range(2, r):
            out = torch.add(out, pw[j - 1], alpha=(-1.0) ** (j + 1))
        return out

    rh = r_(h)
    r2 = rh if order - h == h else r_(order - h)
    s_mat = torch.empty((P, s, s), device=pw.device, dtype=pw.dtype)
    _gemm(pw[h - 1], r2, s_mat, pw[0, :, 0, 0], sx=_strides3(pw[h - 1]), sy=_strides3(r2), so=_so(s_mat),
          m=s, n=s, k=s, z=rh, sz=_strides3(rh), input_precision=input_precision, has_alpha=False,
          series=1 if h % 2 == 0 else -1, eye_z=True)
    return s_mat


def taylor_logdet_backward(g: Tensor, a3: Tensor, b3: Tensor, lam: Tensor, nrm: Tensor, q: Tensor,
                           r: Tensor, mats: Tensor, order: int, normalize: bool, input_precision: str,
                           need_a: bool, need_b: bool):
    """``(dL/da, dL/db)`` from ``g = dL/dT (P,)`` and the forward's saved tensors (shapes as the
    inputs, in their dtype; a side not needed comes back as an empty tensor)."""
    P, m, d = a3.shape
    s = min(m, d)
    mspace = m <= d
    dev, f32 = a3.device, torch.float32
    ga = torch.empty_like(a3, memory_format=torch.contiguous_format) if need_a else a3.new_empty((0,))
    gb = torch.empty_like(b3, memory_format=torch.contiguous_format) if need_b else b3.new_empty((0,))
    gsc = g.contiguous()
    na, nb = (nrm[0], nrm[1]) if normalize else (None, None)
    # (own input, its norms, the other input, its norms, output) for the two sides
    sides = [(a3, na, b3, nb, ga)] if need_a else []
    sides += [(b3, nb, a3, na, gb)] if need_b else []
    if order == 1:  # dT_1/da^ = lam b^, dT_1/db^ = lam a^ (row dot reduced in the kernel)
        alpha = (g * lam).contiguous()  # dL/dT * lam, per pair
        br, bc = _row_block(), _col_block(d)
        for own, ownn, oth, othn, out in sides:
            wrap_triton(_project_kernel)[(_programs(triton.cdiv(m, br), P),)](
                out, oth, othn if othn is not None else alpha, own, ownn if ownn is not None else alpha,
                alpha, out,
                *_strides3(out), *_strides3(oth), *_strides3(own), *_strides3(out),
                _vec_stride(nrm[0]) if normalize else 0,
                m, d,
                V_FROM_OTHER=True, NORMALIZE=normalize,
                ROUND_BF16=_round_bf16_here(out), BLOCK_R=br, BLOCK_C=bc,
                num_warps=4,
            )
        return ga, gb
    s_mat = mats[0] if s <= ONCHIP_MAX else _s_from_powers(mats, order, input_precision)
    # bf16 inputs: S (fp32) times the raw bf16 rows as two bf16 products (_gemm_kernel's HILO); fp16
    # keeps the fp32 products of input_precision (its exponent range is too narrow for the split)
    hilo = a3.dtype == torch.bfloat16
    if mspace:
        # side a: g lam S^T B^ (contraction over the m rows of b, scaled by 1/|b_j|); side b: g lam S A^
        # (alpha = g lam formed in the epilogue: ALPHA_G)
        for (own, ownn, oth, othn, out), sx in zip(sides, [_t3(s_mat)] * need_a + [_strides3(s_mat)] * need_b):
            _gemm(s_mat, oth, out, lam, sx=sx, sy=_strides3(oth), so=_so(out), m=m, n=d, k=m,
                  ks=othn, own=own, ownn=ownn, rdot=r, g=gsc, proj=1 if normalize else 0,
                  input_precision=input_precision, hilo=1 if hilo else 0)
        return ga, gb
    # d-space: side a: g lam B^ S'^T; side b: g lam A^ S' (rows of the other input scaled by 1/|.|)
    in_tile = d <= _PROJ_IN_TILE_MAX
    block_n = max(16, triton.next_power_of_2(d)) if (normalize and in_tile) else None
    for (own, ownn, oth, othn, out), sy in zip(sides, [_t3(s_mat)] * need_a + [_strides3(s_mat)] * need_b):
        if normalize and not in_tile:
            dst = out if out.dtype == f32 else torch.empty(out.shape, device=dev, dtype=f32)
            _gemm(oth, s_mat, dst, lam, sx=_strides3(oth), sy=sy, so=_so(dst), m=m, n=d, k=d,
                  rs=othn, g=gsc, input_precision=input_precision, hilo=2 if hilo else 0)
            br, bc = _row_block(), _col_block(d)
            wrap_triton(_project_kernel)[(_programs(triton.cdiv(m, br), P),)](
                dst, dst, lam, own, ownn, lam, out,  # lam: placeholders, unread (V_FROM_OTHER=False)
                *_strides3(dst), *_strides3(dst), *_strides3(own), *_strides3(out),
                ownn.stride(0),
                m, d,
                V_FROM_OTHER=False, NORMALIZE=True,
                ROUND_BF16=_round_bf16_here(out), BLOCK_R=br, BLOCK_C=bc,
                num_warps=4,
            )
        else:
            _gemm(oth, s_mat, out, lam, sx=_strides3(oth), sy=sy, so=_so(out), m=m, n=d, k=d,
                  rs=othn, g=gsc, own=own, ownn=ownn, proj=2 if normalize else 0, input_precision=input_precision,
                  block_n=block_n, hilo=2 if hilo else 0)
    return ga, gb


# ==================================================================================================
# torch.library registration and autograd
# ==================================================================================================


def _fwd_op_body(a3: Tensor, b3: Tensor, lam: Tensor, order: int, normalize: bool, diagnostics: bool,
            input_precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return taylor_logdet_forward(a3, b3, lam, order, normalize, diagnostics, input_precision)


_fwd_op = triton_op("kernelssl::taylor_logdet_fwd", mutates_args=())(_fwd_op_body)


def _bwd_op_body(g: Tensor, a3: Tensor, b3: Tensor, lam: Tensor, nrm: Tensor, q: Tensor, r: Tensor,
            mats: Tensor, order: int, normalize: bool, input_precision: str, need_a: bool,
            need_b: bool) -> tuple[Tensor, Tensor]:
    return taylor_logdet_backward(g, a3, b3, lam, nrm, q, r, mats, order, normalize, input_precision, need_a, need_b)


_bwd_op = triton_op("kernelssl::taylor_logdet_bwd", mutates_args=())(_bwd_op_body)


def _torch_forward(a3, b3, lam, order, normalize, diagnostics, input_precision):
    """The torch tier's T, ``U = lam dT/dlam`` and diagnostics (fp32); the buffers only the fused
    backward reads (row norms, ``q``, ``r``, the stored matrices) are zeros of their shapes (the CPU
    backward recomputes from the inputs)."""
    P, m, d = a3.shape
    s = min(m, d)
    with torch.no_grad():
        ah, bh, lam_b, lam_m = _torch_tier._prepare(a3, b3, lam, normalize)
        nt = max(order, 2) if diagnostics else order
        if order == 1 and not diagnostics:
            traces = [lam_b * (ah * bh).sum(dim=(-2, -1))]
        else:
            traces = _torch_tier._power_traces(_torch_tier._min_space_matrix(ah, bh, lam_m), nt)
        signs = [(-1.0) ** k for k in range(order)]  # (-1)^(k+1), k = 1..order
        t = sum(signs[k] * traces[k] / (k + 1) for k in range(order))
        u = sum(signs[k] * traces[k] for k in range(order))
        rho, ratio = torch.zeros_like(t), torch.zeros_like(t)
        if diagnostics:
            rho, ratio = _torch_tier.convergence_diagnostics(ah, bh, lam, order=order, normalize=False,
                                                            iters=POWER_ITERS)
    series = order >= 2 or diagnostics
    stored = 0 if order == 1 else (1 if s <= ONCHIP_MAX else (order + 1) // 2)  # S_n on-chip, else M^1..M^h
    zeros = [a3.new_zeros(shape, dtype=torch.float32) for shape in (
        (2, P, m if normalize else 0), (P, m if order == 1 else 0), (P, s if series else 0), (stored, P, s, s))]
    return t.float(), u.float(), *zeros, rho.float(), ratio.float()


def _torch_backward(g, a3, b3, lam, nrm, q, r, mats, order, normalize, input_precision, need_a, need_b):
    return _torch_tier.taylor_logdet_backward(g, a3, b3, lam, order, normalize, need_a, need_b)


register(_fwd_op, _fwd_op_body, _torch_forward, 1)
register(_bwd_op, _bwd_op_body, _torch_backward, 1)


def _setup_context(ctx, inputs, output):
    a3, b3, lam, order, normalize, diagnostics, input_precision = inputs
    _, u, nrm, q, r, mats, _, _ = output
    ctx.save_for_backward(a3, b3, lam, u, nrm, q, r, mats)
    ctx.order, ctx.normalize, ctx.input_precision = order, normalize, input_precision


def _backward(ctx, g_t, *_unused):
    a3, b3, lam, u, nrm, q, r, mats = ctx.saved_tensors
    need_a, need_b, need_lam = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph=True: the torch tier's plain autograd, recorded
        def eager(a, b, lam_):
            return _torch_tier.taylor_logdet_autograd(a, b, lam_, ctx.order, normalize=ctx.normalize)
        return *recorded_backward(eager, (a3, b3, lam), (need_a, need_b, need_lam), (g_t,)), None, None, None, None
    ga = gb = glam = None
    if need_a or need_b:
        ga, gb = torch.ops.kernelssl.taylor_logdet_bwd(
            g_t.contiguous(), a3, b3, lam, nrm, q, r, mats, ctx.order, ctx.normalize, ctx.input_precision,
            need_a, need_b)
    if need_lam:  # dT/dlam = (1/lam) sum_k (-1)^(k+1) tr(C^k)
        glam = g_t * u / lam
    return (ga if need_a else None), (gb if need_b else None), glam, None, None, None, None


torch.library.register_autograd("kernelssl::taylor_logdet_fwd", _backward, setup_context=_setup_context)


# ==================================================================================================
# entry points
# ==================================================================================================


def _prepare(a: Tensor, b: Tensor, lam):
    batch = a.shape[:-2]
    m, d = a.shape[-2:]
    P = math.prod(batch)
    a, b = promote(a, b)
    if isinstance(lam, Tensor):
        lam_t = lam.to(torch.float32).broadcast_to(batch).reshape(P).contiguous()
    else:
        lam_t = torch.full((P,), float(lam), device=a.device, dtype=torch.float32)
    return a.reshape(P, m, d), b.reshape(P, m, d), lam_t, batch


def _forward(a, b, lam, order, normalize, diagnostics, input_precision):
    a3, b3, lam_t, batch = _prepare(a, b, lam)
    if a3.shape[0] == 0:
        zero = torch.zeros(batch, device=a.device, dtype=torch.float32)
        return zero + 0.0 * (a.sum() + b.sum()), zero.clone(), zero.clone()
    out = torch.ops.kernelssl.taylor_logdet_fwd(a3, b3, lam_t, order, normalize, diagnostics,
                                                resolve_precision(input_precision, a.device))
    return out[0].reshape(batch), out[6].detach().reshape(batch), out[7].detach().reshape(batch)


def taylor_logdet(a: Tensor, b: Tensor, lam: float | Tensor, order: int = 4, *, normalize: bool = True,
                  input_precision: str | None = None) -> Tensor:
    """``T_n(a, b) = sum_{k=1..n} (-1)^(k+1) tr(C^k) / k``, ``C = lam A^ B^T``, by the fused kernels, for
    checked inputs (:func:`kernelssl.functional.taylor_logdet`): ``a, b (..., m, d)`` fp32 / fp16 / bf16,
    ``lam`` a number or a tensor broadcastable to the batch shape (never read on the host),
    ``order >= 1``.  Returns ``a.shape[:-2]`` in float32, differentiable in a, b and lam (``dT/dlam`` is
    ``(1/lam) sum_k (-1)^(k+1) tr(C^k)``: lam must be nonzero).  ``input_precision``: the fp32 GEMMs'
    precision, ``None`` resolved by :func:`kernelssl.dispatch.resolve_precision`.  Twice differentiable
    (the second derivative through the torch tier's plain autograd form,
    :func:`kernelssl.ops._common.recorded_backward`)."""
    return _forward(a, b, lam, order, normalize, False, input_precision)[0]


def taylor_logdet_with_diagnostics(a: Tensor, b: Tensor, lam: float | Tensor, order: int = 4, *,
                                   normalize: bool = True, input_precision: str | None = None):
    """``(T, rho_estimate, term_ratio)``, each of shape ``a.shape[:-2]``, from ONE fused forward.

    ``T`` is :func:`taylor_logdet` (differentiable, bitwise the same value); the two diagnostics are
    those of :func:`kernelssl.ops.taylor_logdet.convergence_diagnostics` (no grad, no host sync):

    * ``term_ratio = |tr(C^n)/n| / |tr(C^(n-1))/(n-1)|`` from the traces the forward computes anyway
      (for order 1 the forward also evaluates ``tr(C^2)``).  Free.
    * ``rho_estimate``: 16 power-iteration steps on the s x s matrix M the forward has built (same
      start vector, normalisation and geometric mean over the last 8 steps as the torch tier, so the same
      estimate up to fp32 rounding).  For ``s <= ONCHIP_MAX`` it runs inside the single on-chip series
      program (free).  Above, 16 matrix-vector launches each read M once: ``16 s^2`` floats per pair
      (m = 1024, d = 2048: 64 MB per pair, ~20 us of HBM bandwidth per pair on an H100, plus 16 launch
      latencies) against the forward's ``2 s^2 max(m, d) + 2 (h-1) s^3`` flops -- a few percent of a
      forward + backward at the paper shape, more at small shapes.  When rho is not used (e.g. only T
      is differentiated under ``torch.compile``) the launches are dead code and disappear.
    """
    return _forward(a, b, lam, order, normalize, True, input_precision)
