"""Wang & Isola's uniformity, the loss of the Gaussian-Gram op (docs/gaussian_gram.md): time and peak
extra memory over n, kernelssl's ``KF.uniformity`` (O(n q) memory) against their code's
``torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()`` on the normalised rows (``eager``: an
``n(n-1)/2`` distance vector) and that form under ``torch.compile`` (``eager-compiled``), plus
``torch.compile`` of the torch path and the Triton kernel on a GPU.  t = 2, q = 128 (their feature
dim), raw rows in (every implementation normalises).

Modes: ``full`` (forward+backward, a training step), ``metric`` (forward under ``torch.no_grad()``:
the uniformity of a set of embeddings as an evaluation metric), and on a GPU ``forward`` and
``backward`` at n = 16384.

* CUDA (``paper`` scale, the default there): ``full`` and ``metric`` over n = 1024 ... 131072 in fp32,
  the three modes at n = 16384 in fp32 and bf16.  The pdist form runs out of memory at the large n:
  its row then has ``status = "oom"`` and NaN times (the allocator's error is caught; the test is
  skipped), the others go on.
* CPU ``full`` scale: ``full`` and ``metric`` over n = 1024 ... 16384 in fp32.  A host out-of-memory
  would kill the process rather than raise, so a pdist-form case whose predicted peak
  (:func:`kernelssl.bench.cases.predicted_oom`: 8 x the pdist vector with the backward, 3 x without)
  exceeds a third of the available memory is not run: a row with ``status = "predicted-oom"`` and
  the prediction in ``message``.
* CPU ``smoke`` (the default, CI): n = 256, q = 32, ``full`` only -- so the benchmark never rots.

The sizes are :mod:`kernelssl.bench.cases`'s (the sweeps over n are ``python -m kernelssl.bench``'s).
Rows go to the shared results file with ``loss = "uniformity:<mode>"``; each row checks its value
against the torch path in float64 on the same inputs (a fast wrong implementation cannot look good).
"""
from __future__ import annotations

import math

import torch

from kernelssl import functional as KF
from kernelssl.bench import cases as C
from kernelssl.bench.measure import bench_device

T = C.UNIFORMITY_T
Q = C.PAPER_SHAPES["uniformity"]["q"]
TARGET_N = C.TARGET_SHAPES["cuda"]["uniformity"]["n"]
ROUNDS = {"cpu": 3, "cuda": 10}
# fp32 sums of up to ~1e10 terms: well under 1e-3 relative (the loss is a log, |L| >= ~1); bf16 inputs
# are rounded identically for every implementation and the rest is fp32.
VALUE_RTOL, VALUE_ATOL = 1e-3, 1e-5
_EXPECTED: dict = {}


def _cases(device: torch.device, scale: str):
    if scale == "smoke":
        return [(C.SUITE_SMOKE_SHAPES["uniformity"], torch.float32, "full")]
    kind = "cuda" if device.type == "cuda" else "cpu"
    sweep = C.BATCH_SWEEPS[kind]["uniformity"][0]
    cases = [({"n": n, "q": Q}, torch.float32, mode) for mode in ("full", "metric") for n in sweep]
    if kind == "cuda":
        cases += [({"n": TARGET_N, "q": Q}, torch.float32, mode) for mode in ("forward", "backward")]
        cases += [({"n": TARGET_N, "q": Q}, torch.bfloat16, mode) for mode in ("forward", "backward", "full")]
    return cases


# op_case's parametrisation (conftest.py)
SWEEP = {"loss": "uniformity", "op": "uniformity", "cases": _cases}


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


def test_uniformity_modes(op_case, bench):
    shape, dtype, mode, impl = op_case
    device = bench_device()
    n, q = shape["n"], shape["q"]
    row = {"loss": f"uniformity:{mode}", "shape": f"n={n},q={q},t={T:g}", "dtype": str(dtype)[6:], "impl": impl}
    why = C.predicted_oom("uniformity", impl, shape, dtype=dtype, device=device, grad=mode != "metric")
    if why is not None:  # recorded, not run: a host OOM kills the process instead of raising
        bench.not_run(row, "predicted-oom", message=why)
        return

    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, q, generator=g).to(device=device, dtype=dtype).requires_grad_(mode != "metric")
        return _implementation(impl), (x,)

    def check(fn, inputs):
        expected = _expected(inputs[0].detach(), (n, q, dtype))
        with torch.no_grad():
            value = float(fn(*inputs))
        assert math.isclose(value, expected, rel_tol=VALUE_RTOL, abs_tol=VALUE_ATOL), (impl, value, expected)
        return value

    bench.mode(make, mode, check=check, row=row, group=f"uniformity {mode} n={n} q={q} {str(dtype)[6:]}",
               rounds=ROUNDS[device.type] if n <= 16384 else 3)
