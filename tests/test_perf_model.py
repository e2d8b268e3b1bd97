"""The static performance model (``benchmarks/perf_model.py`` records the launches,
:mod:`kernelssl.bench.launch_costs` prices them; PREDICTED times, never measured; docs/perf-model.md) at
the papers' shapes, fp32 and bf16, forward + backward.

The model records the launches the GPU path issues (as ``tests/compile_targets.py`` does), compiles them
for sm_90 and prices them against H200 ceilings.  These tests hold the kernels
to what the model says a fast design needs, and hold the model to the math:

* every launch that carries > 10% of one op call's product flops fills its waves >= 80%;
* no fp32 product under the default precision runs on the FMA units;
* predicted forward + backward within 1.5x of the op's limit (essential products at the best rate
  for their operands, or the bytes floor);
* the model's product flops equal an independent count from the shapes, for the fused path and for
  the eager form, and the model's tensor-core / FMA split agrees with the compiled PTX.

Runs the model in a subprocess (the kernels must be compiled, not interpreted; pytest runs the
interpreter).  Needs Triton's bundled ptxas, like the sm_90 compile tests; those tests are the slow
tier (``pytest tests -m slow``).  The model's arithmetic and its sweep points are checked in the fast
tier, without a compile.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, load_benchmark
from kernelssl.bench import cases as C
from kernelssl.bench import hardware as HW
from kernelssl.bench import launch_costs as LC
from kernelssl.triton.offline import tools_available

PERF_MODEL = os.path.join(ROOT, "benchmarks", "perf_model.py")


PM = load_benchmark("perf_model")
CASES = [(op, dt) for op in PM.OPS for dt in PM.DTYPES]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    if not tools_available():
        pytest.skip("Triton's bundled ptxas is not available")
    out = tmp_path_factory.mktemp("perf_model") / "model.json"
    path = [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, PERF_MODEL, "--headline", "--target", "all", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "PREDICTED" in proc.stdout
    data = json.loads(out.read_text())
    assert data["predicted"] is True
    return {(c["op"], c["dtype"]): c for c in data["cases"]}


def _calls(case) -> int:
    if case["op"] == "gaussian_gram":  # the views stacked in one op call
        return 1
    return case["shape"].get("views", 1)  # SFRIK: one op call per view


@pytest.mark.slow
@pytest.mark.parametrize("op,dtype", CASES)
def test_main_launches_fill_their_waves(model, op, dtype):
    """(a) No launch carrying > 10% of one op call's product flops has wave efficiency < 80% on 132 SMs
    (occupancy from ptxas registers and shared memory)."""
    case = model[(op, dtype)]
    per_call = case["flops"] / _calls(case)
    main = [r for r in case["launch_rows"] if r["flops"] > 0.1 * per_call]
    assert main, "no launch carries 10% of the flops"
    bad = [(r["kernel"], r["phase"], r["programs"], r["per_sm"], round(r["wave_eff"], 3)) for r in main
           if r["wave_eff"] < 0.8]
    assert not bad, f"{op} {dtype}: (kernel, phase, programs, programs per SM, wave efficiency) {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("op,dtype", CASES)
def test_no_default_fp32_product_on_fma_units(model, op, dtype):
    """(b) Under the public default precision, no product with fp32 operands runs on the FMA units
    (input_precision "ieee"): the fp32 default is tf32x3 on the tensor cores (docs/numerics.md)."""
    case = model[(op, dtype)]
    fma = [(r["kernel"], r["phase"], r["flops"]) for r in case["launch_rows"] if r["fma_dot_flops"] > 0]
    assert not fma, f"{op} {dtype} (default precision {case['precision']!r}): FMA products {fma}"


#: Cases not yet within 1.5x of the limit, each held at the ratio it has now so that it can only
#: improve.  Uniformity in bf16 at its headline shape (n = 4096 per view, q = 128; both views in one
#: call: 4 launches and the loss's stack of the views, was 6 launches per view at 1.73 fp32 / 2.93 bf16):
#: ~10 + 40 us of products, so the model's 3 us per launch still weighs, and the backward recomputes
#: the whole Gram (not its triangle) and splits the weights into two bf16 products; fp32 is within 1.5x
#: (1.49), the larger shapes of the sweep too.
KNOWN_GAPS = {("gaussian_gram", "bfloat16"): 2.02}


@pytest.mark.slow
@pytest.mark.parametrize("op,dtype", CASES)
def test_predicted_within_limit(model, op, dtype):
    """(c) Predicted forward + backward within 1.5x of the op's limit (``KNOWN_GAPS``: within today's
    ratio, until fixed)."""
    case = model[(op, dtype)]
    bound = KNOWN_GAPS.get((op, dtype), 1.5)
    assert case["ratio"] >= 1.0 - 1e-9, "the limit must be a lower bound"
    assert case["ratio"] <= bound, (f"{op} {dtype}: predicted {case['predicted_ms']:.3f} ms, limit "
                                    f"{case['limit_ms']:.3f} ms, ratio {case['ratio']:.2f} > {bound}")


def _analytic_fused(case) -> dict:
    """Product flops of the fused algorithm (module docstrings), from the shapes: {phase: flops}."""
    s, op, dtype = case["shape"], case["op"], case["dtype"]
    if op == "rff_hsic":
        N, d, D = s["K"] * s["B"], s["d"], s["D"]
        assert d <= 256  # one gradient column block: the features are recomputed once per map
        # forward: both projections, the cross-covariance; backward per map: u recomputed,
        # Phibar_other C, back-projection.  bf16 views under tf32x3: the forward projection is three
        # bf16 products (W split into three bf16 parts), counted three times like legendre's split.
        proj = 3 if (dtype == "bfloat16" and case["precision"] == "tf32x3") else 1
        return {"fwd": proj * 2 * N * d * 2 * D + 2 * N * D * D,
                "bwd": 2 * (2 * N * D * d + 2 * N * D * D + 2 * N * D * d)}
    if op in ("legendre_gram", "gaussian_gram"):
        n, q, v = s["n"], s["q"], s["views"]
        name = "_gram_phi_sum_kernel" if op == "legendre_gram" else "_gram_lse_kernel"
        gram = [r for r in case["launch_rows"] if r["kernel"] == name]
        block = gram[0]["constexprs"]["BLOCK"]
        assert n % block == 0
        # forward: the T(T+1)/2 lower-triangular tiles of the Gram, T = n / block: n (n + block) q;
        # backward: phi'(G) panel 2 n^2 q, then P Zhat, as two products when P is split (bf16)
        split = 2 if dtype == "bfloat16" else 1
        return {"fwd": v * n * (n + block) * q, "bwd": v * (2 * n * n * q + split * 2 * n * n * q)}
    P, m, d, order = s["P"], s["m"], s["d"], s["order"]
    assert m <= d and order == 4  # m-space, h = 2 stored powers, one S_n product
    # forward: Gram M = A^ B^T, M^2; backward: S_4 = Q_2 + M^2 Q_2, gradient of b (S A^), as two
    # bf16 products when S is split into bf16 hi + lo (bf16 inputs)
    split = 2 if dtype == "bfloat16" else 1
    return {"fwd": P * (2 * m * m * d + 2 * m ** 3), "bwd": P * (2 * m ** 3 + split * 2 * m * m * d)}


def _analytic_eager(case) -> int:
    s, op = case["shape"], case["op"]
    if op == "rff_hsic":
        N, d, D = s["K"] * s["B"], s["d"], s["D"]
        # map A's features per view and again on the concatenation, map B once; C; autograd: each
        # projection's dX, and C's two operands
        return 3 * 2 * N * d * D + 2 * N * D * D + 3 * 2 * N * d * D + 2 * 2 * N * D * D
    if op == "legendre_gram":
        n, q, v = s["n"], s["q"], s["views"]
        return v * (2 * n * n * q + 2 * 2 * n * n * q)  # G = Zhat Zhat^T; its backward, both operands
    if op == "gaussian_gram":  # Wang & Isola's pdist: 2 flops per pair and feature forward, 4 backward
        n, q, v = s["n"], s["q"], s["views"]
        return v * (2 + 4) * n * (n - 1) // 2 * q
    P, m, d, order = s["P"], s["m"], s["d"], s["order"]
    # C = lam A^ B^T, order - 1 products C^k = C^(k-1) C; backward: both operands of every power
    # product, B's side of the Gram
    return P * (2 * m * m * d + (order - 1) * 2 * m ** 3 + (order - 1) * 2 * 2 * m ** 3 + 2 * m * m * d)


@pytest.mark.slow
@pytest.mark.parametrize("op,dtype", CASES)
def test_model_flops_match_the_math(model, op, dtype):
    """The model's product flops, summed over the recorded launches, equal an independent count from
    the shapes (the papers' shapes divide every tile, so no padding), for the fused path per phase and
    for the eager form."""
    case = model[(op, dtype)]
    for phase, flops in _analytic_fused(case).items():
        assert case["phases"][phase]["flops"] == pytest.approx(flops, rel=1e-12), phase
    assert case["eager"]["flops"] == pytest.approx(_analytic_eager(case), rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("op,dtype", CASES)
def test_model_units_match_the_compiled_code(model, op, dtype):
    """A launch the model puts on the tensor cores has tensor-core instructions (wgmma / mma.sync) in
    its sm_90 PTX, and one it puts wholly on the FMA units has none; no launch spills registers."""
    case = model[(op, dtype)]
    for r in case["launch_rows"]:
        if r["source"] != "triton":
            continue
        assert (r["tc_flops"] > 0) == (r["mma"] > 0), (r["kernel"], r["constexprs"], r["tc_flops"], r["mma"])
        assert r["spills"] == 0, (r["kernel"], r["constexprs"])


def test_occupancy_and_wave_arithmetic():
    """The model's occupancy and wave arithmetic on hand-checked cases (no compile needed)."""
    # 237 registers x 256 threads = 60672 of 65536 registers: one program per SM; SFRIK's 136 forward
    # programs then need 2 waves on 132 SMs, the second with 4 programs: 136 / 264 busy
    assert LC.occupancy(237, 8, 98304) == 1
    assert LC.occupancy(128, 8, 49152) == 2  # 32768 registers a program
    assert LC.occupancy(32, 4, 64) == 16  # 128 threads: 2048 / 128
    assert LC.occupancy(64, 4, 100 * 1024) == 2  # shared memory: 2 x (100 KiB + 1 KiB) <= 228 KiB
    assert LC.occupancy(255, 8, 0) == 1 and LC.occupancy(255, 16, 0) == 0  # 256 x 512 > 64 K registers
    # a tensor-core launch of 790 GFLOP with full waves takes 1 ms + the launch overhead; with half its
    # slots idle, twice that; a bytes-bound one 4.3 GB -> 1 ms
    assert LC.launch_time([("bf16", 790e9)], 0.0, 0.0, 1.0, 1.0) == pytest.approx(1e-3 + 3e-6)
    assert LC.launch_time([("bf16", 790e9)], 0.0, 0.0, 0.5, 1.0) == pytest.approx(2e-3 + 3e-6)
    assert LC.launch_time([("tf32x3", 395e9 / 3)], 0.0, 0.0, 1.0, 1.0) == pytest.approx(1e-3 + 3e-6)
    assert LC.launch_time([("ieee", 67e9)], 0.0, 4.3e9, 1.0, 1.0) == pytest.approx(1e-3 + 3e-6)
    assert LC.launch_time([], 0.0, 4.3e9, 0.1, 0.5) == pytest.approx(2e-3 + 3e-6)


def test_limit_rates_follow_the_precision_policy():
    """Limit rates by operand class: 16-bit x 16-bit at the bf16 rate; 16-bit x fp32 as two (result
    rounded to 16 bits) or three (fp32-exact) 16-bit products; fp32 x fp32 at tf32x3's (a third of
    TF32).  Plain TF32 is faster than the fp32 class, so a kernel using it silently would come out
    below the limit (test_predicted_within_limit asserts ratio >= 1)."""
    assert LC.LIMIT_RATES["half"] == LC.RATES["bf16"]
    assert LC.LIMIT_RATES["mixed16"] == LC.RATES["bf16"] / 2
    assert LC.LIMIT_RATES["mixed32"] == LC.RATES["bf16"] / 3
    assert LC.LIMIT_RATES["fp32"] == LC.RATES["tf32x3"] < LC.RATES["tf32"]
    assert LC.RATES["ieee"] < LC.RATES["tf32x3"]


def test_model_sweep_points_are_benchmark_points():
    """The model prices the papers' shapes (:data:`kernelssl.bench.cases.PAPER_SHAPES`) and points of the
    op benchmarks' sweeps (:data:`kernelssl.bench.cases.OP_SWEEPS`), so that predicted and measured
    times can stand side by side."""
    assert PM.OPS == tuple(C.OPS.values())
    loss_of = {op: loss for loss, op in C.OPS.items()}
    for op in PM.OPS:
        paper = PM.sweep(op)[0]
        assert {k: paper[k] for k in C.PAPER_SHAPES[loss_of[op]]} == C.PAPER_SHAPES[loss_of[op]]
        for dim, sizes in PM.MODEL_SWEEP[op].items():
            assert set(sizes) <= set(C.OP_SWEEPS[op][dim]), (op, dim)


# ==================================================================================================
# other GPUs (kernelssl.bench.hardware.TARGETS): the same launches priced on each target
# ==================================================================================================


@pytest.mark.slow
@pytest.mark.parametrize("op,dtype", CASES)
def test_every_target_is_priced(model, op, dtype):
    """Each case is priced on every target at each of its fp32 precisions; on the H200 the per-target
    pricing reproduces the model's own numbers (one arithmetic, not two); everywhere the limit stays a
    lower bound; on both sm_90 targets every launch fits."""
    case = model[(op, dtype)]
    got = {(t["target"], t["precision"]): t for t in case["targets"]}
    assert set(got) == {(k, p) for k, t in HW.TARGETS.items() for p in t["fp32_precisions"]}
    h200 = got[("h200", "tf32x3")]
    for field in ("predicted_ms", "limit_ms", "eager_ms", "min_wave_eff_main"):
        assert h200[field] == pytest.approx(case[field], rel=1e-12), field
    for (key, prec), t in got.items():
        assert t["ratio"] >= 1.0 - 1e-9, (key, prec, t)
        if HW.TARGETS[key]["arch"] == "sm_90":
            assert t["fits"], (key, t["unfit"])


def test_target_table_is_complete():
    """Every target names its architecture and source and has the ceilings and limits the model reads."""
    need = {"name", "arch", "source", "bf16", "tf32", "fma", "fp32_matrix", "bandwidth", "sms", "overhead",
            "smem_per_sm", "warp_size", "fp32_precisions"}
    assert {"h200", "h100", "a100", "rtx4090", "mi300x"} <= set(HW.TARGETS)
    for key, t in HW.TARGETS.items():
        assert need <= set(t), (key, need - set(t))
        assert t["bf16"] > 0 and t["fma"] > 0 and t["bandwidth"] > 0 and t["sms"] > 0, key
        for p in t["fp32_precisions"]:  # every precision the model prices exists there
            assert HW.rates(t, p)["fp32"] > 0, (key, p)
    assert {t["arch"] for t in HW.TARGETS.values()} == {"sm_90", "sm_80", "sm_89", "gfx942"}


def test_target_occupancy():
    """Programs per SM / CU on hand-checked cases: per-block shared memory (sm_89: 99 KB, gfx942: 64 KB),
    threads (sm_89: 1536), and AMD's wave64 registers."""
    a100, ada, mi = HW.TARGETS["a100"], HW.TARGETS["rtx4090"], HW.TARGETS["mi300x"]
    assert HW.occupancy(HW.TARGETS["h200"], 237, 8, 98304) == LC.occupancy(237, 8, 98304) == 1
    assert HW.occupancy(a100, 64, 4, 100 * 1024) == 1  # 2 x (100 KiB + 1 KiB) > 164 KiB
    assert HW.occupancy(a100, 64, 4, 64 * 1024) == 2
    assert HW.occupancy(ada, 64, 4, 100 * 1024) == 0  # over the 99 KiB a block may have
    assert HW.occupancy(ada, 64, 4, 98 * 1024) == 1
    assert HW.occupancy(ada, 32, 4, 0) == 12  # 1536 threads / 128
    assert HW.occupancy(mi, 128, 8, 0) == 4  # 64 VGPRs a lane: 8 waves a SIMD, 4 SIMDs, 8 waves a program
    assert HW.occupancy(mi, 255, 4, 0) == 4  # 128 VGPRs: 4 waves a SIMD
    assert HW.occupancy(mi, 64, 4, 40 * 1024) == 1  # the LDS: 64 KiB a CU
    assert HW.occupancy(mi, 64, 4, 65 * 1024) == 0


def test_target_occupancy_on_sm90_is_the_kernels_own():
    """On the sm_90 targets the model's occupancy is the one the launch configurations use
    (:func:`kernelssl.triton.offline.occupancy`), over registers, warps and shared memory up to past
    the per-block limit (the arithmetic is written in both places; this holds them together)."""
    for key in ("h200", "h100"):
        for regs in (1, 32, 64, 96, 128, 168, 200, 255):
            for warps in (1, 2, 4, 8, 16):
                for shared in (0, 1024, 49152, 98304, 116736, 232448, 232449, 240000):
                    assert HW.occupancy(HW.TARGETS[key], regs, warps, shared) == LC.occupancy(regs, warps, shared), (
                        key, regs, warps, shared)


def test_target_rates_and_limits():
    """Per target: tf32x3 a third of TF32, bf16x3 / bf16x6 a third / a sixth of bf16, "ieee" on the fp32
    matrix units where there are some (MI300X), else the FMA units; a precision the target lacks raises
    naming the target; the limit on the H200 target is the model's own limit, and on another target it
    moves with its rates."""
    h200, mi = HW.TARGETS["h200"], HW.TARGETS["mi300x"]
    r = HW.rates(h200, "tf32x3")
    assert r["fp32"] == r["tf32x3"] == h200["tf32"] / 3 == LC.RATES["tf32x3"] and r["ieee"] == h200["fma"]
    r = HW.rates(mi, "bf16x6")
    assert r["fp32"] == mi["bf16"] / 6 and r["bf16x3"] == mi["bf16"] / 3 and r["ieee"] == mi["fp32_matrix"]
    with pytest.raises(ValueError, match="no-tf32-card"):
        HW.rates({**h200, "tf32": None, "name": "no-tf32-card"}, "tf32x3")
    for op in PM.OPS:
        s = PM.PAPER[op]
        for dt in (torch.float32, torch.bfloat16):
            assert LC.limit_time(op, s, dt, h200, "tf32x3") == LC.limit_time(op, s, dt)
    # SFRIK in fp32 is product-bound: its limit scales with the fp32 class's rate
    s = PM.PAPER["legendre_gram"]
    ratio = LC.limit_time("legendre_gram", s, torch.float32, mi, "ieee") / LC.limit_time(
        "legendre_gram", s, torch.float32)
    assert ratio == pytest.approx((h200["tf32"] / 3) / mi["fp32_matrix"])


def test_on_target_prices_a_launch():
    """One Triton launch moved to another target: its fp32 products at the target's precision, its
    programs per SM under the target's limits, its waves on the target's SMs; it does not fit where its
    shared memory exceeds the target's per block."""
    row = {"source": "triton", "kernel": "k", "dots": [("tf32x3", 3e9), ("bf16", 1e9)], "aux": 1e6, "bytes": 1e6,
           "programs": 432, "registers": 128, "warps": 8, "shared": 64 * 1024, "wave_eff": 1.0, "sm_eff": 1.0}
    h200, a100, ada, mi = (HW.TARGETS[k] for k in ("h200", "a100", "rtx4090", "mi300x"))
    on = LC.on_target(row, h200, "tf32x3", "tf32x3")
    per_sm = LC.occupancy(128, 8, 64 * 1024)
    eff = LC.wave_efficiency(432, per_sm * 132)
    assert on["per_sm"] == per_sm and on["fits"] and on["wave_eff"] == eff
    assert on["time"] == pytest.approx(LC.launch_time(row["dots"], 1e6, 1e6, eff, LC.wave_efficiency(432, 132)))
    on = LC.on_target(row, a100, "tf32x3", "tf32x3")  # 2 programs an SM (registers), 216 slots: 2 waves
    assert on["per_sm"] == 2 and on["wave_eff"] == 1.0
    compute = 3e9 / (a100["tf32"] / 3) + 1e9 / a100["bf16"] + 1e6 / a100["fma"]
    assert on["time"] == pytest.approx(3e-6 + compute)
    on = LC.on_target(row, mi, "bf16x3", "tf32x3")  # the recorded tf32x3 products become bf16x3
    compute = 3e9 / (mi["bf16"] / 3) + 1e9 / mi["bf16"] + 1e6 / mi["fma"]
    assert on["fits"] and on["time"] == pytest.approx(3e-6 + compute / on["wave_eff"])
    assert not LC.on_target({**row, "shared": 100 * 1024}, ada, "tf32x3", "tf32x3")["fits"]
