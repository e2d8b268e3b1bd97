"""RFF-HSIC op (issue #3): forward, backward and forward+backward time and peak extra memory, Triton vs
the torch path vs eager (the paper's form) vs ``torch.compile`` of the torch path, plus sweeps over N
and D.  The generic harness (test_losses.py) already covers forward+backward at the paper shape; the
rows here add the per-mode split and the sweeps.

* CUDA (``paper`` scale, the default there): the paper shape N = 16384 (K = 4, B = 4096), d = 256,
  D = 512 in all three modes, then forward+backward over N = 1024 ... 65536 (D = 512) and
  D = 128 ... 2048 (N = 16384); fp32 and bf16; impls eager, torch, compile, triton.
* CPU (any scale), or ``--bench-scale smoke`` on CUDA: only the smallest case (on CPU: torch path and
  eager -- the Triton interpreter's timings mean nothing, so the kernel is not timed there), so the
  benchmark code never rots.

Rows go to the shared results file with ``loss = "rff_hsic:<mode>"``; the summary's speed-up and memory
ratio columns are then against eager in the same mode.  Each row also checks that the implementation
computes eager's loss (a fast wrong kernel cannot look good).  Targets (read off the rows, not
asserted): forward+backward >= 3x eager and >= 1.5x compile at the paper shape, peak extra memory
<= 0.5x eager.
"""
from __future__ import annotations

import torch

from bench_util import MODES, bench_device, bench_scale, mode_step, parametrize_sweep, step_peak_bytes, sync
from kernelssl.bench.cases import hsic_maps, implementations, make_inputs

PAPER = {"K": 4, "B": 4096, "d": 256, "D": 512}
SWEEP_N = [1024, 4096, 16384, 65536]  # N = K B with K = 4
SWEEP_D = [128, 256, 512, 1024, 2048]
SMOKE = {"K": 2, "B": 64, "d": 32, "D": 64}
ROUNDS = {"cpu": 3, "cuda": 20}
LOSS_RTOL, LOSS_ATOL = 1e-3, 1e-5  # as in test_losses.py: same inputs, fp32 accumulation everywhere


def _cases(device: torch.device, scale: str):
    if device.type != "cuda" or scale == "smoke":
        return [(SMOKE, torch.float32, mode) for mode in MODES]
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        cases += [(PAPER, dtype, mode) for mode in MODES]
        for n in SWEEP_N:
            if n != PAPER["K"] * PAPER["B"]:
                cases.append(({**PAPER, "B": n // PAPER["K"]}, dtype, "full"))
        for D in SWEEP_D:
            if D != PAPER["D"]:
                cases.append(({**PAPER, "D": D}, dtype, "full"))
    return cases


def pytest_generate_tests(metafunc):
    # The fp32 paper-shape rows also time the kernel with input_precision="tf32x3" (three TF32
    # tensor-core products, ~fp32 accuracy), the SPEC's alternative to the IEEE default.
    tf32 = [(PAPER, torch.float32, mode) for mode in MODES]
    parametrize_sweep(metafunc, "hsic", "rff_hsic", _cases(bench_device(), bench_scale(metafunc.config)),
                      tf32_variant="triton-tf32x3", tf32_cases=tf32)


def _implementation(impl, shape, device):
    """``fn(views) -> loss`` of ``impl``; ``triton-tf32x3`` on the same random features as the rest."""
    if impl != "triton-tf32x3":
        return implementations("hsic", shape, device=device, compile=impl == "compile")[impl]
    from kernelssl.ops import rff_hsic as H
    from kernelssl.triton import rff_hsic_op as RK

    maps = hsic_maps(shape, device=device)
    return lambda views: H.hsic_loss(*RK.rff_hsic(views, *maps, 1.0, input_precision="tf32x3"), gamma=3.0)


def test_rff_hsic_modes(op_case, benchmark, results_rows):
    shape, dtype, mode, impl = op_case
    device = bench_device()
    inputs = make_inputs("hsic", shape, device=device, dtype=dtype)
    fn = _implementation(impl, shape, device)
    with torch.no_grad():
        value = fn(*inputs).detach()
        expected = value if impl == "eager" else implementations("hsic", shape, device=device)["eager"](*inputs)
    torch.testing.assert_close(value.float(), expected.float(), rtol=LOSS_RTOL, atol=LOSS_ATOL)
    for _ in range(2):  # warm-up (compile, autotune caches, allocator)
        inputs[0].grad = None
        fn(*inputs).backward()
    sync(device)

    setup, target = mode_step(fn, inputs, mode, device)
    peak = step_peak_bytes(setup, target, device)
    shape_s = ",".join(f"{k}={v}" for k, v in shape.items())
    benchmark.group = f"rff_hsic {mode} {shape_s} {str(dtype)[6:]}"
    benchmark.extra_info.update(peak_extra_mb=None if peak is None else peak / 2**20, mode=mode)
    rounds = ROUNDS[device.type]
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    stats = benchmark.stats.stats
    results_rows.append({
        "loss": f"rff_hsic:{mode}", "shape": shape_s, "dtype": str(dtype)[6:], "impl": impl,
        "median_ms": stats.median * 1e3, "min_ms": stats.min * 1e3, "rounds": rounds,
        "peak_extra_mb": None if peak is None else peak / 2**20, "loss_value": float(value),
    })
