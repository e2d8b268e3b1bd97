"""Forward+backward time and peak extra memory of each loss: every implementation, same inputs.

The question is always the same loss, same inputs, side by side: the torch path vs the eager form
written as the papers' code computes it, eager and under ``torch.compile`` (``eager-compiled``, on
every device), vs Triton and ``torch.compile`` of the torch path on a GPU.  One test per
(loss, shape, dtype, implementation), grouped by case in pytest-benchmark's table; each also records
peak extra memory and appends a row to the results file.  Speed targets are read off the results,
never asserted here; what is asserted is that every implementation computes the eager form's loss
(so a fast wrong implementation cannot look good).  The shapes are :mod:`kernelssl.bench.cases`'s.
"""
from __future__ import annotations

import torch

from kernelssl.bench import cases as C
from kernelssl.bench.measure import bench_device, peak_extra_bytes, sync

_THREE = ("hsic", "sfrik", "mec")
SHAPES = {
    # small shapes, and SFRIK on each side of the torch tier's size crossovers
    "smoke": {loss: [C.SUITE_SMOKE_SHAPES[loss]] + (C.SFRIK_CROSSOVER_SMOKE if loss == "sfrik" else [])
              for loss in _THREE},
    # the CPU sweep (docs/benchmarks.md's CPU table): from small batches up, across the crossovers
    "full": {loss: C.CPU_SWEEP[loss] for loss in _THREE},
    "paper": {loss: [C.PAPER_SHAPES[loss]] for loss in _THREE},
}
DTYPES = {"smoke": [torch.float32], "full": [torch.float32], "paper": [torch.float32, torch.bfloat16]}
ROUNDS = {"smoke": 3, "full": 3, "paper": 20}

# Equal-loss tolerance against the eager form: fp32 sums of up to ~1e8 terms keep a relative error
# well under 1e-3; bf16 inputs are rounded identically for every implementation and the rest is fp32.
LOSS_RTOL, LOSS_ATOL = 1e-3, 1e-5


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    scale = metafunc.config.getoption("--bench-scale")
    device = bench_device()
    cases, ids = [], []
    for loss, shapes in SHAPES[scale].items():
        for shape in shapes:
            for dtype in DTYPES[scale]:
                for impl in C.available(loss, device, compile=device.type == "cuda"):
                    cases.append((loss, shape, dtype, impl))
                    ids.append(f"{loss}-{C.case_id(shape, dtype)}-{impl}")
    metafunc.parametrize("case", cases, ids=ids)


def test_forward_backward(case, bench, request):
    loss, shape, dtype, impl = case
    device = bench_device()
    scale = request.config.getoption("--bench-scale")
    inputs = C.make_inputs(loss, shape, device=device, dtype=dtype)
    impls = C.implementations(loss, shape, device=device, compile=impl == "compile")
    value = C.forward_backward(impls[impl], inputs)
    expected = value if impl == "eager" else C.forward_backward(impls["eager"], inputs)
    torch.testing.assert_close(value.float(), expected.float(), rtol=LOSS_RTOL, atol=LOSS_ATOL)

    def step():  # gradients cleared inside the step (forward_backward), as in a training step
        out = C.forward_backward(impls[impl], inputs)
        sync(device)
        return out

    shape_s = ",".join(f"{k}={v}" for k, v in shape.items())
    row = {"loss": loss, "shape": shape_s, "dtype": str(dtype)[6:], "impl": impl}
    bench.record(step, peak=peak_extra_bytes(step, device), row=row, group=f"{loss} {shape_s} {str(dtype)[6:]}",
                 rounds=ROUNDS[scale], loss_value=float(value), extra_info={"loss": float(value)})
