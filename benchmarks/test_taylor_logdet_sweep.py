"""MEC's batched matrix-log Taylor expansion op (docs/taylor_logdet.md): forward, backward and forward+backward time
and peak extra memory, Triton vs the torch path (min-space + trace pairing) vs eager (the reference
form: all n powers in m-space) vs ``torch.compile`` of the torch path, plus sweeps over m, d and n.
The generic harness (test_losses.py) covers the whole MEC loss forward+backward; the rows here time the
op itself on the two symmetrised directions of one step stacked as a batch of 2 pairs, ``(2, m, d)``,
as the loss calls it: the first argument the teacher outputs (no grad: an EMA teacher), the second
the online outputs (grad), ``normalize=True``, ``lam = d / (64 m)`` (:func:`kernelssl.bench.cases.mec_lambda`).

* CUDA (``paper`` scale, the default there): m = 1024, d = 2048, n = 4 in fp32 and bf16, all three
  modes, plus the forward with the convergence diagnostics (Triton: ``taylor_logdet_with_diagnostics``;
  the others: the op + :func:`kernelssl.ops.taylor_logdet.convergence_diagnostics`); then forward+backward in fp32
  over m = 256 ... 8192 (d = 2048), d = 128 ... 8192 (m = 1024) and n = 2 ... 8.
* CPU (any scale), or ``--bench-scale smoke`` on CUDA: only the smallest case, torch path and eager
  (the Triton interpreter's timings mean nothing, so the kernel is not timed there).

Rows go to the shared results file with ``loss = "taylor_logdet:<mode>"``.  ``alg_tflops`` is the work
of the Triton algorithm (s = min(m, d), L = max(m, d), h = ceil(n/2); forward 2 s^2 L + 2 (h-1) s^3,
backward 2 s^3 [n >= 4] + 2 s^2 L for the one differentiated argument) per second, for a roofline
reading; the eager form does more work.  Each row checks the value against the torch path (a fast
wrong kernel cannot look good).  Targets (GPU, read off the rows, not asserted): forward+backward
>= 3x eager and >= 1.5x compile at m = 1024, d = 2048, n = 4.
"""
from __future__ import annotations

import torch

from kernelssl.bench import cases as C
from kernelssl.bench.measure import MODES, bench_device
from kernelssl.ops import taylor_logdet as M

PAPER = {**C.PAPER_SHAPES["mec"], "n": C.MEC_ORDER}
SIZES = C.OP_SWEEPS["taylor_logdet"]
SMOKE = {**C.SUITE_SMOKE_SHAPES["mec"], "n": C.MEC_ORDER}
# Value check against the torch path: fp32 traces of up to ~1e7-term sums, the terms of either sign
# (relative 1e-3 of the term scale; the absolute floor covers a T that cancels to ~0).
VALUE_RTOL, VALUE_ATOL = 1e-3, 1e-3
_EXPECTED: dict = {}


def _cases(device: torch.device, scale: str):
    if device.type != "cuda" or scale == "smoke":
        return [(SMOKE, torch.float32, mode) for mode in MODES]
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        cases += [(PAPER, dtype, mode) for mode in MODES + ("diagnostics",)]
    for key in ("m", "d", "n"):  # one dimension at a time, the others at the paper's
        cases += [({**PAPER, key: v}, torch.float32, "full") for v in SIZES[key] if v != PAPER[key]]
    return cases


def _implementation(name: str, order: int, diagnostics: bool):
    """``fn(a, b, lam) -> T`` (the diagnostics computed too, and returned alongside, when asked)."""
    if name in ("triton", "triton-tf32"):
        from kernelssl.triton import taylor_logdet_op as K

        prec = "tf32" if name == "triton-tf32" else None  # None: the default policy (tf32x3)
        if diagnostics:
            return lambda a, b, lam: K.taylor_logdet_with_diagnostics(a, b, lam, order, input_precision=prec)
        return lambda a, b, lam: K.taylor_logdet(a, b, lam, order, input_precision=prec)
    base = {"eager": M.taylor_logdet_eager, "eager-compiled": M.taylor_logdet_eager,
            "torch": M.taylor_logdet}.get(name, M.taylor_logdet)
    fn = lambda a, b, lam: base(a, b, lam, order)
    if name in ("compile", "eager-compiled"):
        fn = torch.compile(fn)
    if diagnostics:
        return lambda a, b, lam: (fn(a, b, lam), *M.convergence_diagnostics(a, b, lam, order=order))
    return fn


# op_case's parametrisation (conftest.py): fp32 at the target shape also times the kernel with
# input_precision="tf32" (torch's TF32 opt-in).
SWEEP = {"loss": "mec", "op": "taylor_logdet", "cases": _cases,
         "variant": "triton-tf32", "variant_shape": PAPER}


def _inputs(shape, dtype, device):
    """(teacher (2, m, d) without grad, online (2, m, d) with grad): [P1, P2] and [Z2, Z1]."""
    g = torch.Generator().manual_seed(0)
    m, d = shape["m"], shape["d"]
    z = torch.randn(2, m, d, generator=g) + 0.3 * torch.randn(2, 1, d, generator=g)
    p = z + 0.5 * torch.randn(2, m, d, generator=g)
    return p.to(device=device, dtype=dtype), z.flip(0).to(device=device, dtype=dtype).requires_grad_(True)


def _value(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _expected(a, b, lam, order, key) -> torch.Tensor:
    if key not in _EXPECTED:
        with torch.no_grad():
            _EXPECTED[key] = M.taylor_logdet(a, b, lam, order).float().cpu()
    return _EXPECTED[key]


def _alg_flops(shape, mode) -> float:
    m, d, n = shape["m"], shape["d"], shape["n"]
    s, big, h = min(m, d), max(m, d), (n + 1) // 2
    fwd = 2 * s * s * big + 2 * (h - 1) * s**3
    bwd = 2 * s**3 * (n >= 4) + 2 * s * s * big
    return {"forward": fwd, "diagnostics": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def test_taylor_logdet_modes(op_case, bench):
    shape, dtype, mode, impl = op_case
    device = bench_device()
    m, d, n = shape["m"], shape["d"], shape["n"]
    lam = C.mec_lambda(m, d)

    def make():
        return _implementation(impl, n, mode == "diagnostics"), (*_inputs(shape, dtype, device), lam)

    def check(fn, inputs):
        a, b, _ = inputs
        expected = _expected(a, b, lam, n, (m, d, n, dtype))
        with torch.no_grad():
            value = _value(fn(*inputs)).float().cpu()
        torch.testing.assert_close(value, expected, rtol=VALUE_RTOL, atol=VALUE_ATOL)
        return float(value.sum())

    row = {"loss": f"taylor_logdet:{mode}", "shape": f"m={m},d={d},n={n},P=2", "dtype": str(dtype)[6:], "impl": impl}
    # "diagnostics" times the forward with the convergence diagnostic
    bench.mode(make, "forward" if mode == "diagnostics" else mode, label=mode, check=check, row=row,
               group=f"taylor_logdet {mode} m={m} d={d} n={n} {str(dtype)[6:]}",
               rounds=3 if device.type == "cpu" or max(m, d) > 4096 else 20, scalar=lambda out: _value(out).sum(),
               rates=lambda median_s: {"alg_tflops": _alg_flops(shape, mode) * 2 / median_s / 1e12})  # 2 pairs
