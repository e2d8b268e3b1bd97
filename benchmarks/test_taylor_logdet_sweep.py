"""MEC's batched matrix-log Taylor expansion op (issue #5): forward, backward and forward+backward time
and peak extra memory, Triton vs the torch path (min-space + trace pairing) vs eager (the reference
form: all n powers in m-space) vs ``torch.compile`` of the torch path, plus sweeps over m, d and n.
The generic harness (test_losses.py) covers the whole MEC loss forward+backward; the rows here time the
op itself on the two symmetrised directions of one step stacked as a batch of 2 pairs, ``(2, m, d)``,
as the loss calls it: the first argument the teacher outputs (no grad: an EMA teacher), the second
the online outputs (grad), ``normalize=True``, ``lam = d / (64 m)``.

* CUDA (``paper`` scale, the default there): m = 1024, d = 2048, n = 4 in fp32 and bf16, all three
  modes, plus the forward with the convergence diagnostics (Triton: ``taylor_logdet_with_diagnostics``;
  the others: the op + :func:`kernelssl.mec.convergence_diagnostics`); then forward+backward in fp32
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

import math

import pytest
import torch

from bench_util import (
    MODES,
    bench_device,
    bench_scale,
    free_gpu_memory,
    mode_step,
    parametrize_sweep,
    step_peak_bytes,
    sync,
)
from kernelssl.ops import taylor_logdet as M

PAPER = {"m": 1024, "d": 2048, "n": 4}
SWEEP_M = [256, 512, 1024, 2048, 4096, 8192]
SWEEP_D = [128, 256, 512, 1024, 2048, 4096, 8192]
SWEEP_N = [2, 3, 4, 5, 6, 7, 8]
SMOKE = {"m": 256, "d": 64, "n": 4}
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
    cases += [({"m": m, "d": 2048, "n": 4}, torch.float32, "full") for m in SWEEP_M if m != PAPER["m"]]
    cases += [({"m": 1024, "d": d, "n": 4}, torch.float32, "full") for d in SWEEP_D if d != PAPER["d"]]
    cases += [({"m": 1024, "d": 2048, "n": n}, torch.float32, "full") for n in SWEEP_N if n != PAPER["n"]]
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


def pytest_generate_tests(metafunc):
    # fp32 at the target shape also times the kernel with input_precision="tf32" (torch's TF32 opt-in).
    tf32 = [(PAPER, torch.float32, mode) for mode in MODES]
    parametrize_sweep(metafunc, "mec", "taylor_logdet", _cases(bench_device(), bench_scale(metafunc.config)),
                      tf32_variant="triton-tf32", tf32_cases=tf32)


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


def _row(shape, dtype, mode, impl, **kw):
    return {"loss": f"taylor_logdet:{mode}", "shape": f"m={shape['m']},d={shape['d']},n={shape['n']},P=2",
            "dtype": str(dtype)[6:], "impl": impl, **kw}


def test_taylor_logdet_modes(op_case, benchmark, results_rows):
    shape, dtype, mode, impl = op_case
    device = bench_device()
    m, d, n = shape["m"], shape["d"], shape["n"]
    lam = d / (64.0 * m)
    oom = False
    try:
        a, b = _inputs(shape, dtype, device)
        fn = _implementation(impl, n, mode == "diagnostics")
        expected = _expected(a, b, lam, n, (m, d, n, dtype))
        with torch.no_grad():
            value = _value(fn(a, b, lam)).float().cpu()
        torch.testing.assert_close(value, expected, rtol=VALUE_RTOL, atol=VALUE_ATOL)
        for _ in range(2):  # warm-up (compile, Triton JIT, allocator)
            b.grad = None
            _value(fn(a, b, lam)).sum().backward()
        sync(device)
        # "diagnostics" times the forward with the convergence diagnostic
        setup, target = mode_step(fn, (a, b, lam), mode, device, scalar=lambda out: _value(out).sum())
        peak = step_peak_bytes(setup, target, device)
    except torch.cuda.OutOfMemoryError:
        oom = True  # leave the except block first: the error's traceback holds its frames' tensors
    if oom:
        a = b = fn = setup = target = None
        free_gpu_memory()
        results_rows.append(_row(shape, dtype, mode, impl, median_ms=float("nan"), min_ms=float("nan"),
                                 rounds=0, peak_extra_mb=None, loss_value=None, status="oom"))
        pytest.skip(f"{impl} ran out of GPU memory at m={m}, d={d}")
    rounds = 3 if device.type == "cpu" or max(m, d) > 4096 else 20
    benchmark.group = f"taylor_logdet {mode} m={m} d={d} n={n} {str(dtype)[6:]}"
    benchmark.extra_info.update(peak_extra_mb=None if peak is None else peak / 2**20, mode=mode)
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    stats = benchmark.stats.stats
    results_rows.append(_row(
        shape, dtype, mode, impl,
        median_ms=stats.median * 1e3, min_ms=stats.min * 1e3, rounds=rounds,
        peak_extra_mb=None if peak is None else peak / 2**20, loss_value=float(value.sum()), status="ok",
        alg_tflops=_alg_flops(shape, mode) * 2 / stats.median / 1e12,  # 2 pairs
    ))
    assert math.isfinite(stats.median)
