"""Wang & Isola's uniformity (SPEC §6.1, issue 17): time and peak extra memory over n, kernelssl's
``KF.uniformity`` (O(n q) memory) against their code's ``torch.pdist(x, p=2).pow(2).mul(-t).exp()
.mean().log()`` on the normalised rows (``eager``: an ``n(n-1)/2`` distance vector) and that form under
``torch.compile`` (``eager-compiled``), plus ``torch.compile`` of the torch path and the Triton kernel
on a GPU.  t = 2, q = 128 (their feature dim), raw rows in (every implementation normalises).

Modes: ``full`` (forward+backward, a training step), ``metric`` (forward under ``torch.no_grad()``:
the uniformity of a set of embeddings as an evaluation metric), and on a GPU ``forward`` and
``backward`` at n = 16384.

* CUDA (``paper`` scale, the default there): ``full`` and ``metric`` over n = 1024 ... 131072 in fp32,
  the three modes at n = 16384 in fp32 and bf16.  The pdist form runs out of memory at the large n:
  its row then has ``status = "oom"`` and NaN times (the allocator's error is caught), the others go
  on.
* CPU ``full`` scale: ``full`` and ``metric`` over n = 1024 ... 16384 in fp32.  A host out-of-memory
  would kill the process rather than raise, so a pdist-form case whose predicted peak
  (:func:`kernelssl._cases.predicted_oom`: 8 x the pdist vector with the backward, 3 x without)
  exceeds a third of the available memory is not run: a row with ``status = "predicted-oom"`` and the prediction in ``message``.
* CPU ``smoke`` (the default, CI): n = 256, q = 32, ``full`` only -- so the benchmark never rots.

Rows go to the shared results file with ``loss = "uniformity:<mode>"``; each row checks its value
against the torch path in float64 on the same inputs (a fast wrong implementation cannot look good).
"""
from __future__ import annotations

import math

import torch

from bench_util import bench_device, bench_scale, free_gpu_memory, mode_step, parametrize_sweep, step_peak_bytes, sync
from kernelssl import functional as KF
from kernelssl.bench import cases as C

T = C.UNIFORMITY_T
Q = 128
SWEEP = {"cuda": [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072], "cpu": [1024, 2048, 4096, 8192, 16384]}
TARGET_N = 16384
SMOKE = {"n": 256, "q": 32}
ROUNDS = {"cpu": 3, "cuda": 10}
# fp32 sums of up to ~1e10 terms: well under 1e-3 relative (the loss is a log, |L| >= ~1); bf16 inputs
# are rounded identically for every implementation and the rest is fp32.
VALUE_RTOL, VALUE_ATOL = 1e-3, 1e-5
_EXPECTED: dict = {}


def _cases(device: torch.device, scale: str):
    if scale == "smoke":
        return [(SMOKE, torch.float32, "full")]
    kind = "cuda" if device.type == "cuda" else "cpu"
    cases = [({"n": n, "q": Q}, torch.float32, mode) for mode in ("full", "metric") for n in SWEEP[kind]]
    if kind == "cuda":
        cases += [({"n": TARGET_N, "q": Q}, torch.float32, mode) for mode in ("forward", "backward")]
        cases += [({"n": TARGET_N, "q": Q}, torch.bfloat16, mode) for mode in ("forward", "backward", "full")]
    return cases


def pytest_generate_tests(metafunc):
    parametrize_sweep(metafunc, "uniformity", "uniformity", _cases(bench_device(), bench_scale(metafunc.config)))


def _implementation(name: str):
    if name == "compile":
        return torch.compile(lambda z: KF.uniformity(z, T, backend="torch"))
    if name == "eager-compiled":
        return torch.compile(C.uniformity_eager)
    return C.implementations("uniformity", {}, device=bench_device(), names=(name,))[name]


def _expected(z: torch.Tensor, key) -> float:
    """The torch path in float64 on the same (rounded) inputs; cached per (n, q, dtype)."""
    if key not in _EXPECTED:
        with torch.no_grad():
            _EXPECTED[key] = float(KF.uniformity(z.double(), T, backend="torch"))
    return _EXPECTED[key]


def _row(shape, dtype, mode, impl, **kw):
    return {"loss": f"uniformity:{mode}", "shape": f"n={shape['n']},q={shape['q']},t={T:g}",
            "dtype": str(dtype)[6:], "impl": impl, **kw}


def _metric_step(fn, x, device):
    def setup():
        sync(device)
        return (), {}

    def target():
        with torch.no_grad():
            out = fn(x)
        sync(device)
        return out

    return setup, target


def test_uniformity_modes(op_case, benchmark, results_rows):
    shape, dtype, mode, impl = op_case
    device = bench_device()
    n, q = shape["n"], shape["q"]
    why = C.predicted_oom("uniformity", impl, shape, dtype=dtype, device=device, grad=mode != "metric")
    if why is not None:  # recorded, not run: a host OOM kills the process instead of raising
        results_rows.append(_row(shape, dtype, mode, impl, median_ms=float("nan"), min_ms=float("nan"), rounds=0,
                                 peak_extra_mb=None, loss_value=None, status="predicted-oom", message=why))
        return
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, q, generator=g).to(device=device, dtype=dtype).requires_grad_(mode != "metric")
    expected = _expected(x.detach(), (n, q, dtype))
    oom = False
    try:
        fn = _implementation(impl)
        with torch.no_grad():
            value = float(fn(x))
        if mode != "metric":
            for _ in range(2):  # warm-up (compile, Triton JIT, allocator)
                x.grad = None
                fn(x).backward()
        else:
            with torch.no_grad():
                fn(x)
        sync(device)
        setup, target = _metric_step(fn, x, device) if mode == "metric" else mode_step(fn, (x,), mode, device)
        peak = step_peak_bytes(setup, target, device)
    except (torch.cuda.OutOfMemoryError, MemoryError):
        oom = True  # leave the except block first: the error's traceback holds its frames' tensors
    if oom:
        x = fn = setup = target = None
        free_gpu_memory()
        results_rows.append(_row(shape, dtype, mode, impl, median_ms=float("nan"), min_ms=float("nan"), rounds=0,
                                 peak_extra_mb=None, loss_value=None, status="oom"))
        return
    assert math.isclose(value, expected, rel_tol=VALUE_RTOL, abs_tol=VALUE_ATOL), (impl, value, expected)
    rounds = ROUNDS[device.type] if n <= 16384 else 3
    benchmark.group = f"uniformity {mode} n={n} q={q} {str(dtype)[6:]}"
    benchmark.extra_info.update(peak_extra_mb=None if peak is None else peak / 2**20, mode=mode)
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    stats = benchmark.stats.stats
    results_rows.append(_row(shape, dtype, mode, impl, median_ms=stats.median * 1e3, min_ms=stats.min * 1e3,
                             rounds=rounds, peak_extra_mb=None if peak is None else peak / 2**20,
                             loss_value=value, status="ok"))

