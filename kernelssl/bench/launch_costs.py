"""The pricing half of the static performance model (``benchmarks/perf_model.py`` records the launches;
docs/perf-model.md): what one launch costs on an H200 -- PREDICTED, never measured.

Per launch:

* **Triton launches**: the work comes from the kernel's math (:data:`KERNELS`, one cost function per
  kernel, integrating the kernel's loops over its programs with the launch's block sizes, padding
  included; the work is derived from the arguments, the grid only gives the programs and waves):

  * product flops per ``tl.dot`` call, by unit: two fp16/bf16 operands -> tensor cores (bf16 rate);
    fp32 operands -> by ``input_precision``: ``"ieee"`` FMA units, ``"tf32"`` tensor cores (TF32
    rate), ``"tf32x3"`` three TF32 tensor-core products (a third of the TF32 rate per useful flop);
    a product the kernel writes as two ``tl.dot`` calls (legendre's split backward) counts twice;
  * auxiliary flops (epilogues: cos/sin ~20 flops an element -- libdevice's full-range code --, the
    Legendre recurrence, centring, scalings) on the FMA pipe;
  * HBM bytes, a LOWER BOUND: every tensor the launch reads is read once and every tensor it
    writes is written once (compulsory traffic; re-reads of operand tiles by other programs are
    assumed to hit L2 -- 50 MB on an H200 -- which holds each op's re-read operands at the papers'
    shapes);
  * programs, occupancy (:func:`occupancy`: programs per SM from the compiled variant's registers per
    thread -- allocated per warp in units of 256 --, 64 K registers, 2048 threads, 228 KB shared
    memory with 1 KB reserved per block, 32 blocks), waves on 132 SMs (``programs / (132 * per SM)``)
    and wave efficiency ``programs / (ceil(waves) * 132 * per SM)``.

* **torch ops** (:func:`torch_op_row`; the fused path's own, and the eager form's): one aten op ~ one
  launch; matmuls at the rate of their operands (fp32: FMA, or TF32 where torch allows it), pdist's
  flops on the FMA units, everything else bytes-bound (inputs read once, outputs written once); wave
  efficiency 1 (library kernels).

Predicted time (:func:`launch_time`) = ``overhead + max(compute / wave_efficiency, bytes /
(bandwidth * sm_share))`` with ``compute = sum over units of flops / rate`` (no overlap between the
tensor-core and FMA pipes is assumed) and ``sm_share = programs / (132 * ceil(programs / 132))``: an
SM is assumed to need all its resident programs for its peak arithmetic rate, but not for streaming
memory.

**Limit** of an op (:func:`essential`, :func:`limit_time`): its essential products at the best rate
for their operands, and a bytes floor (inputs read once, gradient written once): ``max`` of the two,
no overhead.  Rates by operand class (:data:`LIMIT_RATES`): two fp16/bf16 operands -> bf16
tensor-core rate; one 16-bit operand and one fp32 operand -> the fp32 operand split into 16-bit
parts, one product each: two parts (half the bf16 rate) where the result is rounded to 16 bits anyway
(a 16-bit gradient, as legendre's backward does), three (24 bits: a third of the bf16 rate) where it
must be fp32-exact; two fp32 operands -> a third of the TF32 rate (tf32x3, the fp32 default policy:
docs/numerics.md).  "Essential": what the math needs under the project's memory contract (no n x n
matrix kept between forward and backward): SSL-HSIC the projections, the cross-covariance, the two
``Phibar C`` products and the back-projections (u = X W^T may be stored: no recompute); SFRIK the
symmetric Gram (n(n+1)q), its symmetric recompute in the backward and ``phi'(G) Zhat`` (2 n^2 q); MEC
the Gram, the stored powers, the one ``S_n`` product (order >= 4) and the gradient product per
differentiated argument.

Ceilings (:data:`H200`): bf16 dense 790 TFLOP/s and copy 4.3 TB/s counting read + write (measured on
an H200), TF32 half of bf16, fp32 FMA 67 TFLOP/s (datasheet), 132 SMs, 3 us per launch (GPU-side
gap and ramp; the host is assumed to keep ahead).

Other GPUs (:func:`on_target`, :func:`limit_rates`): a priced row moved to a target of
:data:`kernelssl.bench.hardware.TARGETS` (datasheet ceilings), its products at the target's rates and
fp32 precision, its programs per SM from its sm_90 resources under the target's limits.

The cost functions follow the kernels in :mod:`kernelssl.triton`: a kernel change that changes its
work changes its function here (``tests/test_perf_model.py`` checks the flops against an independent
count and the units against the compiled PTX).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..triton.offline import SM90, occupancy, wave_efficiency
from . import hardware

#: H200 ceilings (see the module doc; :data:`kernelssl.bench.hardware.TARGETS`' ``"h200"``): rates in
#: flop/s, bandwidth in byte/s (read + write); the limits on resident programs are sm_90's
#: (:data:`kernelssl.triton.offline.SM90`).
H200 = {k: hardware.TARGETS["h200"][k] for k in ("bf16", "tf32", "fma", "bandwidth", "sms", "overhead", *SM90)}

#: rate (flop/s) of a product by how it is executed
RATES = {
    "bf16": H200["bf16"], "fp16": H200["bf16"], "tf32": H200["tf32"], "tf32x3": H200["tf32"] / 3,
    "ieee": H200["fma"],
}
TENSOR_CORE = ("bf16", "fp16", "tf32", "tf32x3")
#: limit rates by operand class (module doc)
LIMIT_RATES = {"half": H200["bf16"], "mixed16": H200["bf16"] / 2, "mixed32": H200["bf16"] / 3,
               "fp32": H200["tf32"] / 3}


# ==================================================================================================
# per-launch work of the Triton kernels
# ==================================================================================================


@dataclass
class Work:
    dots: list = field(default_factory=list)  # [(unit, flops)]
    aux: float = 0.0  # FMA-pipe flops of epilogues / elementwise work
    reads: list = field(default_factory=list)  # tensors read (each once)
    writes: list = field(default_factory=list)  # tensors written (each once)


def _cdiv(a, b):
    return -(-int(a) // int(b))


def _pad(a, b):
    return _cdiv(a, b) * int(b)


def _half_name(dtype) -> str | None:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)


def _unit(operand_dtype, precision) -> str:
    """How a ``tl.dot`` executes: 16-bit operands as they are -> tensor cores; fp32 -> by precision."""
    half = _half_name(operand_dtype)
    if half is not None:
        return half
    if precision not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"unknown input_precision {precision!r}")
    return precision


def _f32():
    return torch.float32


# ---- rff_hsic ------------------------------------------------------------------------------------


def _rff_features_kernel(a, grid):
    bi, bj, bk = a["BLOCK_I"], a["BLOCK_J"], a["BLOCK_K"]
    # (image block, feature block of either map) x views
    tiles = _cdiv(a["B"], bi) * (_cdiv(a["D_A"], bj) + _cdiv(a["D_B"], bj)) * a["K"]
    flops = 2.0 * tiles * bi * bj * _pad(a["d"], bk)
    if a.get("W_SPLIT", 0):  # bf16 x, W split into three bf16 parts: three bf16 tl.dot calls
        dots = [("bf16", 3.0 * flops)]
    else:
        dots = [(_unit(_f32(), a["PRECISION"]), flops)]  # operands upcast to fp32 before tl.dot
    return Work(dots=dots, aux=25.0 * tiles * bi * bj,
                reads=[a[k] for k in ("x_ptr", "wa_ptr", "ba_ptr", "wb_ptr", "bb_ptr")],
                writes=[a[k] for k in ("phia_ptr", "phib_ptr", "s_ptr", "colsum_a_ptr", "colsum_b_ptr", "m2_ptr")])


def _rff_stats_kernel(a, grid):
    return Work(aux=4.0 * (a["colsum_a_ptr"].numel() + a["colsum_b_ptr"].numel()),
                reads=[a["colsum_a_ptr"], a["colsum_b_ptr"]], writes=[a["mu_a_ptr"], a["mu_b_ptr"], a["zy_part_ptr"]])


def _rff_cross_cov_kernel(a, grid):
    bn, bjb, bja = a["BLOCK_N"], a["BLOCK_JB"], a["BLOCK_JA"]
    rows = _pad(a["N"], bn)  # the splits together cover the rows once (rows_per_split is a multiple of BN)
    tiles = _cdiv(a["D_A"], bja) * _cdiv(a["D_B"], bjb)
    unit = _unit(_f32(), a["PRECISION"])
    return Work(dots=[(unit, 2.0 * tiles * bjb * bja * rows)], aux=2.0 * tiles * rows * (bja + bjb),
                reads=[a["phia_ptr"], a["phib_ptr"], a["mu_a_ptr"], a["mu_b_ptr"]],
                writes=[a["out_ptr"], a["sumsq_ptr"]])


def _rff_cov_reduce_kernel(a, grid):
    return Work(aux=float(a["part_ptr"].numel()), reads=[a["part_ptr"]], writes=[a["cov_ptr"], a["sumsq_ptr"]])


def _rff_finalize_kernel(a, grid):
    return Work(reads=[a["m2_ptr"], a["zy_part_ptr"], a["sumsq_ptr"]], writes=[a["zy_ptr"], a["zz_ptr"]])


def _rff_feature_grad_kernel(a, grid):
    # backward pass 1: T = dL/du for BM rows x BJ features of one map: u recomputed (GEMM over d),
    # Phibar_other C (GEMM over D_other), stored to T (N x (D_A + D_B), fp32)
    bm, bj, bk, bl = a["BLOCK_M"], a["BLOCK_J"], a["BLOCK_K"], a["BLOCK_L"]
    rows = _cdiv(a["K"] * a["B"], bm)
    unit = _unit(_f32(), a["PRECISION"])
    flops = aux = 0.0
    for D, D_other in ((a["D_A"], a["D_B"]), (a["D_B"], a["D_A"])):
        programs = rows * _cdiv(D, bj)
        flops += 2.0 * programs * bm * bj * (_pad(a["d"], bk) + _pad(D_other, bl))
        aux += programs * bm * (30.0 * bj + 2.0 * _pad(D_other, bl))  # sin, scalings; centring
    return Work(dots=[(unit, flops)], aux=aux,
                reads=[a[k] for k in ("x_ptr", "wa_ptr", "ba_ptr", "wb_ptr", "bb_ptr", "phia_ptr", "phib_ptr", "s_ptr",
                                      "mu_a_ptr", "mu_b_ptr", "cov_ptr")],
                writes=[a["t_ptr"]])


def _rff_dx_kernel(a, grid):
    # backward pass 2: dL/dX = T [W_A; W_B] (GEMM over D_A + D_B)
    bm, bn, bk = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    programs = _cdiv(a["N"], bm) * _cdiv(a["d"], bn)
    unit = _unit(_f32(), a["PRECISION"])
    return Work(dots=[(unit, 2.0 * programs * bm * bn * (_pad(a["D_A"], bk) + _pad(a["D_B"], bk)))],
                aux=2.0 * programs * bm * bn, reads=[a["t_ptr"], a["wa_ptr"], a["wb_ptr"]], writes=[a["grad_ptr"]])


# ---- legendre_gram -------------------------------------------------------------------------------


def _gram_unit(a):
    z = a["z_ptr"]
    return _unit(_f32() if a["DOT_F32"] else z.dtype, a["INPUT_PRECISION"])


def _row_scales_kernel(a, grid):
    z = a["z_ptr"]
    return Work(aux=2.0 * z.numel() if a["NORMALIZE"] else 0.0, reads=[z] if a["NORMALIZE"] else [],
                writes=[a["rinv_ptr"], a["proj_ptr"]])


def _gram_phi_sum_kernel(a, grid):
    blk, L = a["BLOCK"], a["L"]
    t = _cdiv(a["n"], blk)
    programs = t * (t + 1) // 2  # lower-triangular tiles
    return Work(dots=[(_gram_unit(a), 2.0 * programs * blk * blk * _pad(a["q"], a["BLOCK_K"]))],
                aux=programs * blk * blk * (4.0 + 5.0 * (L - 1)),
                reads=[a["z_ptr"], a["rinv_ptr"]], writes=[a["part_ptr"]])


def _sum_partials_kernel(a, grid):
    return Work(reads=[a["part_ptr"]], writes=[a["out_ptr"]])


def _gram_dphi_kernel(a, grid):
    bm, bn, L = a["BLOCK_M"], a["BLOCK_N"], a["L"]
    rows, n = a["panel_rows"], a["n"]
    programs = _cdiv(rows, bm) * _cdiv(n, bn)
    return Work(dots=[(_gram_unit(a), 2.0 * programs * bm * bn * _pad(a["q"], a["BLOCK_K"]))],
                aux=programs * bm * bn * (5.0 + 8.0 * (L - 1)),
                reads=[a["z_ptr"], a["rinv_ptr"]],
                writes=[(rows * n * 4, "panel"), (rows * _cdiv(n, bn) * 4, "dpart") if a["NORMALIZE"] else (0, "")])


def _panel_matmul_kernel(a, grid):
    bm, bq, bk = a["BLOCK_M"], a["BLOCK_Q"], a["BLOCK_K"]
    rows, n, q = a["panel_rows"], a["n"], a["q"]
    programs = _cdiv(rows, bm) * _cdiv(q, bq)
    one = 2.0 * programs * bm * bq * _pad(n, bk)
    mode = a["MODE"]
    if mode == 0:  # fp32 P @ fp32 Z
        dots = [(_unit(_f32(), a["INPUT_PRECISION"]), one)]
    elif mode == 1:  # bf16 Z, P split into two bf16 parts: two tl.dot calls
        dots = [("bf16" if not a["DOT_F32"] else _unit(_f32(), a["INPUT_PRECISION"]), one)] * 2
    else:  # fp16 Z, P split into two TF32 parts: two TF32 tl.dot calls
        dots = [("tf32", one)] * 2
    z = a["z_ptr"]
    return Work(dots=dots, aux=(3.0 if mode else 0.0) * programs * bm * _pad(n, bk) + 6.0 * programs * bm * bq,
                reads=[(rows * n * 4, "panel"), z, a["rinv_ptr"], a["proj_ptr"],
                       (rows * a["num_dparts"] * 4, "dpart")],
                writes=[(rows * q * z.element_size(), "out")])


# ---- gaussian_gram (its row kernel and backward GEMM are legendre_gram's, priced above) -----------


def _gram_lse_kernel(a, grid):
    blk = a["BLOCK"]
    programs = grid[0]  # the lower-triangular tiles of every view (views stacked on grid axis 0)
    # epilogue per entry: scale, exponent, mask, max, exp, sum (exp ~ 4 FMA-pipe flops)
    return Work(dots=[(_gram_unit(a), 2.0 * programs * blk * blk * _pad(a["q"], a["BLOCK_K"]))],
                aux=programs * blk * blk * 10.0, reads=[a["z_ptr"], a["rinv_ptr"]],
                writes=[a["mpart_ptr"], a["spart_ptr"]])


def _lse_reduce_kernel(a, grid):
    return Work(aux=6.0 * a["num_parts"] * grid[0], reads=[a["mpart_ptr"], a["spart_ptr"]],
                writes=[a["out_ptr"], a["stats_ptr"]])


def _resident_backward_kernel(a, grid):
    bm, bn, bq, n = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_Q"], a["n"]
    views = grid[0] // (_cdiv(n, bm) * _cdiv(_cdiv(n, bn), a["tiles_per_split"]))  # stacked on grid axis 0
    tiles = views * _cdiv(n, bm) * _cdiv(n, bn)  # every (row tile, column tile) of each view once
    gram = 2.0 * tiles * bm * bn * _pad(a["q"], a["BLOCK_K"])
    one = 2.0 * tiles * bm * bn * bq  # (w r_j) @ Z_J, all q columns
    mode = a["MODE"]
    if mode == 0:
        prods = [(_unit(_f32(), a["INPUT_PRECISION"]), one)]
    elif mode == 1:  # the weights split into two bf16 parts: two tl.dot calls
        prods = [("bf16" if not a["DOT_F32"] else _unit(_f32(), a["INPUT_PRECISION"]), one)] * 2
    else:  # two TF32 parts
        prods = [("tf32", one)] * 2
    part, dpart = a["part_ptr"], a["dpart_ptr"]
    aux = tiles * bm * bn * (10.0 + (3.0 if mode else 0.0))
    if a["FUSED"]:  # one split: the Jacobian epilogue here (z re-read), dz written
        return Work(dots=[(_gram_unit(a), gram)] + prods, aux=aux + 6.0 * a["out_ptr"].numel(),
                    reads=[a["z_ptr"], a["z_ptr"], a["rinv_ptr"], a["proj_ptr"], a["stats_ptr"]],
                    writes=[a["out_ptr"]])
    return Work(dots=[(_gram_unit(a), gram)] + prods, aux=aux,
                reads=[a["z_ptr"], a["rinv_ptr"], a["proj_ptr"], a["stats_ptr"]],
                writes=[part, dpart] if a["NORMALIZE"] else [part])


def _split_reduce_kernel(a, grid):
    part = a["part_ptr"]
    return Work(aux=float(part.numel()) + 6.0 * a["out_ptr"].numel(),
                reads=[part, a["dpart_ptr"], a["z_ptr"], a["rinv_ptr"], a["proj_ptr"], a["stats_ptr"]],
                writes=[a["out_ptr"]])


def _gram_weights_kernel(a, grid):
    bm, bn = a["BLOCK_M"], a["BLOCK_N"]
    rows, n = a["panel_rows"], a["n"]
    programs = _cdiv(rows, bm) * _cdiv(n, bn)
    return Work(dots=[(_gram_unit(a), 2.0 * programs * bm * bn * _pad(a["q"], a["BLOCK_K"]))],
                aux=programs * bm * bn * 10.0, reads=[a["z_ptr"], a["rinv_ptr"], a["stats_ptr"]],
                writes=[(rows * n * 4, "panel"), (rows * _cdiv(n, bn) * 4, "dpart") if a["NORMALIZE"] else (0, "")])


# ---- taylor_logdet -------------------------------------------------------------------------------


def _rownorm_kernel(a, grid):
    x = a["a_ptr"]
    return Work(aux=6.0 * x.numel(), reads=[a["a_ptr"], a["b_ptr"]], writes=[a["nrm_ptr"], a["q_ptr"]])


def _gemm_kernel(a, grid):
    bm, bn, bk = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    tiles = _cdiv(a["M"], bm) * _cdiv(a["N"], bn)
    batch = grid[0] // tiles  # grid axis 0: tiles x pairs (alpha_ptr may be a dummy: HAS_ALPHA)
    K, ks = a["K"], a["K_SPLIT"]
    split = _cdiv(K, ks)
    steps = sum(_pad(min(ks, K - s * ks), bk) for s in range(split))
    flops = 2.0 * batch * tiles * bm * bn * steps
    hilo = a.get("HILO", 0)
    if hilo:  # fp32 operand split into bf16 hi + lo against a bf16 input: two bf16 tl.dot calls
        dots = [(_unit(a["y_ptr" if hilo == 1 else "x_ptr"].dtype, a["PRECISION"]), flops)] * 2
    else:
        dots = [(_unit(a["x_ptr"].dtype if a["HALF_DOT"] else _f32(), a["PRECISION"]), flops)]
    reads = [a["x_ptr"], a["y_ptr"]] + ([a["alpha_ptr"]] if a.get("HAS_ALPHA", True) else [])
    reads += [a["z_ptr"]] if a["HAS_Z"] else []
    reads += [a["own_ptr"], a["ownn_ptr"]] if a["PROJ"] else []
    reads += [a[k] for k, on in (("rs_ptr", a["HAS_RS"]), ("cs_ptr", a["HAS_CS"]), ("ks_ptr", a["KS_COUNT"] >= 1),
                                 ("ks2_ptr", a["KS_COUNT"] == 2)) if on]
    # contraction weights scale Y's rows (X's columns under HILO = 1), per program and K-step
    kw_edge = bm if hilo == 1 else bn
    aux = batch * tiles * bm * bn * (4.0 + (6.0 if a["PROJ"] else 0.0)) + (
        batch * tiles * kw_edge * steps * 2.0 * a["KS_COUNT"])
    if hilo:  # the split of the fp32 operand (convert, subtract, convert) per program and K-step
        aux += batch * tiles * (bm if hilo == 1 else bn) * steps * 3.0
    if a.get("SERIES", 0):  # SERIES (X_ij - acc): one more tile of X read (from L2: X is an operand)
        aux += batch * tiles * bm * bn * 2.0
    return Work(dots=dots, aux=aux, reads=reads, writes=[a["out_ptr"]])


def _small_series_kernel(a, grid):
    bs, nt = a["BLOCK_S"], a["NT"]
    P = a["t_ptr"].numel()
    return Work(dots=[(_unit(_f32(), a["PRECISION"]), 2.0 * P * (nt - 1) * bs ** 3)], aux=4.0 * P * nt * bs * bs,
                reads=[a["g_ptr"]], writes=[a["s_ptr"], a["r_ptr"], a["t_ptr"], a["u_ptr"]])


def _pair_diag_kernel(a, grid):
    P = a["pw_ptr"].shape[1]
    return Work(aux=2.0 * a["NT"] * P * a["S"] ** 2, reads=[a["pw_ptr"]], writes=[a["out_ptr"]])


def _series_reduce_kernel(a, grid):
    return Work(aux=float(a["part_ptr"].numel()), reads=[a["part_ptr"]], writes=[a["r_ptr"], a["t_ptr"], a["u_ptr"]])


def _power_step_kernel(a, grid):
    return Work(aux=2.0 * a["m_ptr"].numel(), reads=[a["m_ptr"], a["vin_ptr"]], writes=[a["vout_ptr"]])


def _project_kernel(a, grid):
    elems = a["alpha_ptr"].numel() * a["M"] * a["N"]  # pairs x rows x columns
    reads = [a["oth_ptr"]] if a["V_FROM_OTHER"] else [a["v_ptr"]]
    if a["NORMALIZE"]:  # the row dot is taken from the same v in a first pass (lower bound: v read once)
        reads.append(a["own_ptr"])
    return Work(aux=6.0 * elems, reads=reads, writes=[a["out_ptr"]])


KERNELS = {f.__name__: f for f in (
    _rff_features_kernel, _rff_stats_kernel, _rff_cross_cov_kernel, _rff_cov_reduce_kernel, _rff_finalize_kernel,
    _rff_feature_grad_kernel, _rff_dx_kernel,
    _row_scales_kernel, _gram_phi_sum_kernel, _sum_partials_kernel, _gram_dphi_kernel, _panel_matmul_kernel,
    _rownorm_kernel, _gemm_kernel, _small_series_kernel, _pair_diag_kernel, _series_reduce_kernel,
    _power_step_kernel, _project_kernel, _gram_lse_kernel, _lse_reduce_kernel, _gram_weights_kernel,
    _resident_backward_kernel, _split_reduce_kernel)}


def tensor_bytes(items) -> float:
    """Bytes of the tensors (each distinct tensor once) and of explicit ``(bytes, name)`` entries."""
    seen, total = set(), 0.0
    for t in items:
        if isinstance(t, tuple):
            total += t[0]
            continue
        if not hasattr(t, "numel") or t.numel() == 0:
            continue
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


# ==================================================================================================
# torch ops (the fused path's own, and the eager form's): one aten op ~ one launch
# ==================================================================================================


_NO_LAUNCH = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach",
              "_to_copy_meta", "alias", "view", "_unsafe_view", "expand", "t", "transpose", "permute", "select",
              "slice", "unsqueeze", "squeeze", "as_strided", "reshape", "unbind", "split", "split_with_sizes",
              "diagonal", "_reshape_alias", "resize_", "set_", "is_same_size", "sym_size", "sym_stride", "size",
              "stride", "numel", "dim", "lift_fresh_copy_meta")
_MATMULS = ("mm", "bmm", "addmm", "baddbmm", "addbmm")
#: pdist's flops per (pair, feature): forward a difference and an FMA; backward the difference, its
#: scaling and the two accumulations into both rows
_PDIST = {"_pdist_forward": 2.0, "_pdist_backward": 4.0}


def torch_op_row(func, args, kwargs, out) -> dict | None:
    """The row of one aten op (``func`` called on ``args``, ``kwargs`` gave ``out``): ``kernel``, product
    ``dots``, ``aux`` flops, ``bytes``; None for an op that launches nothing (views, allocations)."""
    from torch.utils._pytree import tree_flatten

    name = func.overloadpacket.__name__
    if func.is_view or name in _NO_LAUNCH:
        return None
    ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    reads = tensor_bytes(ins)
    writes = tensor_bytes(outs)
    dots = []
    if name in _MATMULS:
        x, y = (args[1], args[2]) if name.startswith(("add", "badd")) else (args[0], args[1])
        k = x.shape[-1]
        flops = 2.0 * outs[0].numel() * k
        unit = _half_name(x.dtype) or ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")
        dots = [(unit, flops)]
    elif name in _PDIST:  # Wang & Isola's pdist on the FMA units (_PDIST: flops per pair and feature)
        x = args[1] if name == "_pdist_backward" else args[0]
        dots = [("ieee", _PDIST[name] * x.shape[0] * (x.shape[0] - 1) / 2 * x.shape[1])]
    aux = float(max([t.numel() for t in outs] + [0]))
    return {"kernel": f"aten.{name}", "dots": dots, "aux": aux, "bytes": reads + writes}


# ==================================================================================================
# occupancy, waves, time
# ==================================================================================================


def launch_time(dots, aux, nbytes, eff, sm_eff) -> float:
    """``overhead + max(compute / eff, bytes / (bandwidth * sm_eff))``: the compute term scaled by the
    wave efficiency over the SMs' program slots, the bytes term by the share of SMs busy (streaming
    needs SMs, not every warp slot, busy)."""
    compute = sum(f / RATES[u] for u, f in dots) + aux / H200["fma"]
    return H200["overhead"] + max(compute / eff, nbytes / (H200["bandwidth"] * sm_eff))


def triton_launch_row(name: str, bound: dict, grid: tuple, info: dict) -> dict:
    """The row of one Triton launch of kernel ``name`` with its arguments ``bound`` by name, on ``grid``
    (3 axes), ``info`` its compiled sm_90 variant (:func:`kernelssl.triton.offline.compile_all`'s row:
    registers, warps, shared memory, tensor-core instructions, spills); priced (:func:`priced`)."""
    if name not in KERNELS:
        raise KeyError(f"no cost function for kernel {name}: add one to kernelssl/bench/launch_costs.py KERNELS")
    work = KERNELS[name](bound, grid)
    programs = grid[0] * grid[1] * grid[2]
    per_sm = occupancy(info["registers"], info["num_warps"], info["shared"])
    slots = per_sm * H200["sms"]
    waves = programs / slots
    sms = H200["sms"]
    row = dict(source="triton", kernel=name, dots=work.dots, aux=work.aux,
               bytes=tensor_bytes(work.reads) + tensor_bytes(work.writes), programs=programs, per_sm=per_sm,
               waves=waves, wave_eff=wave_efficiency(programs, slots), sm_eff=wave_efficiency(programs, sms),
               registers=info["registers"],
               warps=info["num_warps"], shared=info["shared"], mma=info["wgmma"] + info["mma_sync"],
               constexprs=info["constexprs"], spills=info["spill_stores"] + info["spill_loads"])
    return priced(row)


def priced(row: dict) -> dict:
    """``row`` (``dots``, ``aux``, ``bytes``, ``wave_eff``, ``sm_eff``) with its product ``flops``, their
    tensor-core and FMA shares and its predicted ``time`` (:func:`launch_time`) added."""
    row["flops"] = sum(f for _, f in row["dots"])
    row["tc_flops"] = sum(f for u, f in row["dots"] if u in TENSOR_CORE)
    row["fma_dot_flops"] = sum(f for u, f in row["dots"] if u not in TENSOR_CORE)
    row["time"] = launch_time(row["dots"], row["aux"], row["bytes"], row["wave_eff"], row["sm_eff"])
    return row


# ==================================================================================================
# the limit: essential products at the best rate for their operands, bytes floor
# ==================================================================================================


def essential(op: str, s: dict, dtype) -> tuple[list, float]:
    """``([(operand class, flops)], floor bytes)`` of one forward + backward of ``op`` at shape ``s``
    (module doc: the limit)."""
    half = dtype in (torch.float16, torch.bfloat16)
    es = torch.tensor([], dtype=dtype).element_size()
    h_or_f = "half" if half else "fp32"
    grad16 = "mixed16" if half else "fp32"  # 16-bit x fp32, result rounded to the 16-bit gradient
    exact16 = "mixed32" if half else "fp32"  # 16-bit x fp32, result needed at fp32 accuracy
    if op == "rff_hsic":
        N, d, D = s["K"] * s["B"], s["d"], s["D"]
        prods = [(exact16, 2.0 * N * d * 2 * D),  # projections X W^T, both maps (W is fp32; u feeds cos)
                 ("fp32", 2.0 * N * D * D),  # C = Phibar_B^T Phibar_A
                 ("fp32", 2 * 2.0 * N * D * D),  # Phibar_B C, Phibar_A C^T
                 ("fp32", 2.0 * N * 2 * D * d)]  # back-projections T_M W_M
        return prods, 2.0 * N * d * es + 2 * 4.0 * D * (d + 1)
    if op in ("legendre_gram", "gaussian_gram"):
        n, q, v = s["n"], s["q"], s["views"]
        prods = [(h_or_f, v * 1.0 * n * (n + 1) * q),  # forward Gram, symmetric
                 (h_or_f, v * 1.0 * n * (n + 1) * q),  # its recompute in the backward, symmetric
                 (grad16, v * 2.0 * n * n * q)]  # phi'(G) Zhat -> the gradient
        return prods, v * 2.0 * n * q * es
    P, m, d, order = s["P"], s["m"], s["d"], s["order"]
    sm, L = min(m, d), max(m, d)
    h = (order + 1) // 2
    if order == 1:  # T_1 = lam sum_i A^_i . B^_i: no product at all
        return [], 3.0 * P * m * d * es
    prods = [(h_or_f, 2.0 * P * sm * sm * L),  # the Gram M
             ("fp32", (h - 1) * 2.0 * P * sm ** 3),  # powers M^2..M^h
             ("fp32", (1 if order - h >= 2 else 0) * 2.0 * P * sm ** 3),  # S_n = Q_h + (-M)^h Q_(n-h)
             (grad16, 2.0 * P * sm * m * d)]  # gradient of the differentiated argument
    return prods, 3.0 * P * m * d * es


def limit_rates(t: dict, fp32_precision: str) -> dict:
    """:data:`LIMIT_RATES` on target ``t`` (:data:`kernelssl.bench.hardware.TARGETS`), the fp32 class at
    ``fp32_precision``'s rate."""
    return {"half": t["bf16"], "mixed16": t["bf16"] / 2, "mixed32": t["bf16"] / 3,
            "fp32": hardware.rates(t, fp32_precision)["fp32"]}


def limit_time(op, s, dtype, t: dict | None = None, fp32_precision: str = "tf32x3") -> float:
    """Seconds of the op's limit: its essential products at their best rates, or its bytes floor (on the
    H200 of :data:`LIMIT_RATES`, or on target ``t`` with fp32 products at ``fp32_precision``)."""
    prods, nbytes = essential(op, s, dtype)
    lim, bandwidth = (LIMIT_RATES, H200["bandwidth"]) if t is None else (limit_rates(t, fp32_precision),
                                                                         t["bandwidth"])
    return max(sum(f / lim[c] for c, f in prods), nbytes / bandwidth)


# ==================================================================================================
# other GPUs: a priced row moved to another target (its launches and compiled resources kept)
# ==================================================================================================


def on_target(row: dict, t: dict, fp32_precision: str, recorded: str | None) -> dict:
    """``row`` (a priced launch: :func:`triton_launch_row` or a torch op) priced on target ``t``: its
    products executed as ``t`` executes them, the ones recorded at the default fp32 precision
    ``recorded`` at ``fp32_precision`` instead (None: none moved -- the eager form's fp32 matmuls stay
    "ieee"); a Triton launch's programs per SM from its sm_90 registers, warps and shared memory under
    ``t``'s limits (:func:`kernelssl.bench.hardware.occupancy`), ``fits`` False where its shared memory
    exceeds ``t``'s per block (then priced at one program per SM: the launch as recorded cannot run
    there).  Returns ``{time, wave_eff, per_sm, fits, kernel}``."""
    unit_rates = hardware.rates(t, fp32_precision)
    dots = [(fp32_precision if u == recorded else u, f) for u, f in row["dots"]]
    out = {"kernel": row["kernel"], "fits": True, "per_sm": None, "wave_eff": row["wave_eff"],
           "sm_eff": row["sm_eff"]}
    if row["source"] == "triton":
        per_sm = hardware.occupancy(t, row["registers"], row["warps"], row["shared"])
        slots = max(per_sm, 1) * t["sms"]
        out.update(fits=per_sm > 0, per_sm=per_sm, wave_eff=wave_efficiency(row["programs"], slots),
                   sm_eff=wave_efficiency(row["programs"], t["sms"]))
    compute = sum(f / unit_rates[u] for u, f in dots) + row["aux"] / t["fma"]
    out["time"] = t["overhead"] + max(compute / out["wave_eff"], row["bytes"] / (t["bandwidth"] * out["sm_eff"]))
    return out
