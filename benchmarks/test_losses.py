"""Forward+backward time and peak extra memory of each loss: every implementation, same inputs.

The question is always the same loss, same inputs, side by side: the torch path vs the eager form
written as the papers' code computes it, eager and under ``torch.compile`` (``eager-compiled``, on
every device), vs Triton and ``torch.compile`` of the torch path on a GPU.  One test per
(loss, shape, dtype, implementation), grouped by case in pytest-benchmark's table; each also records
peak extra memory and appends a row to the results file.  Speed targets are read off the results,
never asserted here; what is asserted is that every implementation computes the eager form's loss
(so a fast wrong implementation cannot look good).
"""
from __future__ import annotations

import torch

from bench_util import bench_device, bench_scale, peak_extra_bytes
from kernelssl.bench.cases import available, forward_backward, implementations, make_inputs

SHAPES = {
    "smoke": {
        "hsic": [{"K": 2, "B": 256, "d": 64, "D": 256}],
        "sfrik": [{"n": 256, "q": 64}],
        "mec": [{"m": 256, "d": 64}],
    },
    "full": {
        "hsic": [{"K": 4, "B": 1024, "d": 128, "D": 512}],
        "sfrik": [{"n": 2048, "q": 256}, {"n": 16384, "q": 64}],
        "mec": [{"m": 1024, "d": 256}],
    },
    "paper": {
        "hsic": [{"K": 4, "B": 4096, "d": 256, "D": 512}],
        "sfrik": [{"n": 2048, "q": 8192}],
        "mec": [{"m": 1024, "d": 2048}],
    },
}
DTYPES = {"smoke": [torch.float32], "full": [torch.float32], "paper": [torch.float32, torch.bfloat16]}
ROUNDS = {"smoke": 3, "full": 3, "paper": 20}

# Equal-loss tolerance against the eager form: fp32 sums of up to ~1e8 terms keep a relative error
# well under 1e-3; bf16 inputs are rounded identically for every implementation and the rest is fp32.
LOSS_RTOL, LOSS_ATOL = 1e-3, 1e-5


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    scale = bench_scale(metafunc.config)
    device = bench_device()
    cases, ids = [], []
    for loss, shapes in SHAPES[scale].items():
        for shape in shapes:
            for dtype in DTYPES[scale]:
                for impl in available(loss, device, compile=device.type == "cuda"):
                    cases.append((loss, shape, dtype, impl))
                    dims = "-".join(f"{k}{v}" for k, v in shape.items())
                    ids.append(f"{loss}-{dims}-{str(dtype)[6:]}-{impl}")
    metafunc.parametrize("case", cases, ids=ids)


def _step(fn, inputs, device):
    def run():
        out = forward_backward(fn, inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def test_forward_backward(case, benchmark, results_rows, request):
    loss, shape, dtype, impl = case
    device = bench_device()
    scale = bench_scale(request.config)
    inputs = make_inputs(loss, shape, device=device, dtype=dtype)
    impls = implementations(loss, shape, device=device, compile=impl == "compile")
    value = forward_backward(impls[impl], inputs)
    expected = value if impl == "eager" else forward_backward(impls["eager"], inputs)
    torch.testing.assert_close(value.float(), expected.float(), rtol=LOSS_RTOL, atol=LOSS_ATOL)

    step = _step(impls[impl], inputs, device)
    peak = peak_extra_bytes(step, device)
    shape_s = ",".join(f"{k}={v}" for k, v in shape.items())
    benchmark.group = f"{loss} {shape_s} {str(dtype)[6:]}"
    benchmark.extra_info.update(peak_extra_mb=None if peak is None else peak / 2**20, loss=float(value))
    benchmark.pedantic(step, rounds=ROUNDS[scale], warmup_rounds=1, iterations=1)
    stats = benchmark.stats.stats
    results_rows.append({
        "loss": loss, "shape": shape_s, "dtype": str(dtype)[6:], "impl": impl,
        "median_ms": stats.median * 1e3, "min_ms": stats.min * 1e3, "rounds": ROUNDS[scale],
        "peak_extra_mb": None if peak is None else peak / 2**20, "loss_value": float(value),
    })
