"""SFRIK's Legendre Gram mean op (docs/legendre_gram.md): forward, backward and forward+backward time, peak extra
memory and achieved Gram TFLOP/s, Triton vs the torch (chunked) path vs eager (materialised Gram, the
paper's form) vs ``torch.compile`` of the torch path, plus a sweep over n.  The generic harness
(test_losses.py) covers the whole SFRIK loss forward+backward; the rows here time the op itself on raw
``(n, q)`` embeddings (``normalize=True``: the Triton op fuses the normalisation and keeps 16-bit inputs
on tensor cores), per mode, and the sweep.

* CUDA (``paper`` scale, the default there): n = 2048, q in {8192, 16384, 32768}, L = 3
  (b = (1, 40, 40)), fp32 / bf16 / fp16, all three modes; forward+backward at n = 4096 (both views
  concatenated), q = 8192; then forward+backward over n = 1024 ... 131072 at q = 8192, bf16 -- eager
  and compile drop out where they run out of memory (a row with ``status = "oom"`` and NaN time says
  where), the torch path and Triton go on.
* CPU (any scale), or ``--bench-scale smoke`` on CUDA: only the smallest case, torch path and eager
  (the Triton interpreter's timings mean nothing, so the kernel is not timed there).

Rows go to the shared results file with ``loss = "legendre_gram:<mode>"``.  ``tflops`` is the Gram
work of the un-symmetrised computation (forward 2 n^2 q, backward 4 n^2 q) divided by the
time, ``pct_peak`` the same against the device's dense tensor-core peak for the dtype (bf16/fp16; TF32
for fp32 is not used by default, so fp32 rows are against the fp32 FMA peak).  The Triton forward does
half of that work (symmetric tiles), so its executed rate is tflops / 2 there.  Each row checks the
value against the torch path (a fast wrong kernel cannot look good).  Targets (read off the rows, not
asserted): forward+backward >= 2x eager and >= 1.3x compile at n = 2048, q = 8192; >= 60% of the bf16
peak at n = 8192, q = 8192; n = 131072, q = 8192 runs on one 80 GB H100.
"""
from __future__ import annotations

import math

import torch

from kernelssl.bench import cases as C
from kernelssl.bench.measure import MODES, bench_device, device_name
from kernelssl.ops import legendre_gram as S

B3 = C.SFRIK_COEFFICIENTS  # L = 3
PAPER_N = C.PAPER_SHAPES["sfrik"]["n"]
PAPER_Q = C.PAPER_SHAPES["sfrik"]["q"]
SIZES = C.OP_SWEEPS["legendre_gram"]
SMOKE = C.SUITE_SMOKE_SHAPES["sfrik"]
VALUE_RTOL = 1e-3  # fp32 sums of up to ~1e10 terms; half inputs are rounded identically for every impl

# Dense peak TFLOP/s (vendor figures, SXM): {dtype: peak}; fp32 = non-tensor-core FMA peak.
_PEAKS = {
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
}
_EXPECTED: dict = {}


def _peak(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda":
        return None
    name = device_name(device)
    for key, peaks in _PEAKS.items():
        if key in name:
            return peaks[str(dtype)[6:]]
    return None


def _cases(device: torch.device, scale: str):
    if device.type != "cuda" or scale == "smoke":
        return [(SMOKE, torch.float32, mode) for mode in MODES]
    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for q in SIZES["q"]:
            cases += [({"n": PAPER_N, "q": q}, dtype, mode) for mode in MODES]
        cases.append(({"n": 2 * PAPER_N, "q": PAPER_Q}, dtype, "full"))  # both views concatenated
    cases += [({"n": n, "q": PAPER_Q}, torch.bfloat16, "full") for n in SIZES["n"] if n not in (PAPER_N, 2 * PAPER_N)]
    cases.append(({"n": 8192, "q": PAPER_Q}, torch.bfloat16, "forward"))  # the roofline target
    return cases


def _implementation(name: str):
    if name == "eager":
        return lambda z: S.legendre_gram_mean_eager(z, B3)
    if name == "torch":
        return lambda z: S.legendre_gram_mean(z, B3)
    if name == "compile":
        return torch.compile(lambda z: S.legendre_gram_mean(z, B3))
    if name == "eager-compiled":
        return torch.compile(lambda z: S.legendre_gram_mean_eager(z, B3))
    from kernelssl.triton import legendre_gram_op as LG

    prec = "tf32" if name == "triton-tf32" else None  # None: the default policy (tf32x3)
    return lambda z: LG.legendre_gram_mean(z, B3, input_precision=prec)


# op_case's parametrisation (conftest.py): fp32 at the target shape also times the kernel with
# input_precision="tf32" (torch's TF32 opt-in).
SWEEP = {"loss": "sfrik", "op": "legendre_gram", "cases": _cases,
         "variant": "triton-tf32", "variant_shape": {"n": PAPER_N, "q": PAPER_Q}}


def _expected(z: torch.Tensor, key) -> float:
    """M from the torch (chunked) path: never out of memory; cached per (shape, dtype)."""
    if key not in _EXPECTED:
        with torch.no_grad():
            _EXPECTED[key] = float(S.legendre_gram_mean(z, B3))
    return _EXPECTED[key]


def test_legendre_gram_modes(op_case, bench):
    shape, dtype, mode, impl = op_case
    device = bench_device()
    n, q = shape["n"], shape["q"]

    def make():
        g = torch.Generator().manual_seed(0)
        return _implementation(impl), (torch.randn(n, q, generator=g).to(device=device, dtype=dtype).requires_grad_(),)

    def check(fn, inputs):
        expected = _expected(inputs[0].detach(), (n, q, dtype))
        with torch.no_grad():
            value = float(fn(*inputs))
        assert math.isclose(value, expected, rel_tol=VALUE_RTOL), (value, expected)
        return value

    def rates(median_s):
        tflops = {"forward": 2, "backward": 4, "full": 6}[mode] * n * n * q / median_s / 1e12
        peak_tf = _peak(device, dtype)
        return {"tflops": tflops, "pct_peak": None if peak_tf is None else 100.0 * tflops / peak_tf}

    row = {"loss": f"legendre_gram:{mode}", "shape": f"n={n},q={q},L={len(B3)}", "dtype": str(dtype)[6:], "impl": impl}
    bench.mode(make, mode, check=check, row=row, group=f"legendre_gram {mode} n={n} q={q} {str(dtype)[6:]}",
               rounds=3 if device.type == "cpu" or n > 8192 else 20, rates=rates)
