"""Exact Gaussian CKA (``kernelssl.metrics.cka``) against the dense forms, side by side: time and peak
extra memory of one call under ``torch.no_grad()`` (mode ``metric``) for every implementation of
:mod:`kernelssl.bench.metrics_cases` that can run here -- Kornblith et al.'s form eager and compiled,
ckatorch eager and compiled when installed, kernelssl -- on the same inputs and bandwidths.  Each value
is asserted equal to the float64 dense form's before it is timed.  Shapes per ``--bench-scale``:
``metrics_cases.SHAPES`` (dense forms past 10 000 rows are left out: a row ``predicted-oom``, as several
``n x n`` float64 matrices would not fit this machine's memory).
"""
from __future__ import annotations

import pytest
import torch

from kernelssl.bench import metrics_cases as MC
from kernelssl.bench.measure import bench_device

ROUNDS = {"smoke": 3, "full": 3, "paper": 5}


def pytest_generate_tests(metafunc):
    if "metric_case" not in metafunc.fixturenames:
        return
    scale = metafunc.config.getoption("--bench-scale")
    device = bench_device()
    cases = [(n, impl) for n in MC.SHAPES[scale] for impl in MC.available(device)]
    metafunc.parametrize("metric_case", cases, ids=[f"cka-n{n}-{impl}" for n, impl in cases])


def test_exact_gaussian_cka(metric_case, bench, request):
    n, impl = metric_case
    device = bench_device()
    row = {"loss": "cka", "shape": f"n={n},dx=64,dy=32", "dtype": "float32", "impl": impl}
    if impl in MC.DENSE and n > MC.DENSE_MAX_ROWS:
        bench.not_run(row, "predicted-oom")
        pytest.skip(f"{impl} at n = {n}: several n x n float64 matrices ({8 * n * n / 2**30:.1f} GiB each)")
    x, y = MC.make_inputs(n, device)
    fns, (sx, sy) = MC.implementations(x, y, (impl,))
    reference = float(MC.kornblith_cka(x, y, sx, sy)) if n <= MC.DENSE_MAX_ROWS else None

    def check(fn, inputs):
        with torch.no_grad():
            value = float(fn(*inputs))
        if reference is not None:
            MC.check(value, reference, torch.float32)
        return value

    bench.mode(lambda: (fns[impl], (x, y)), "metric", check=check, row=row, group=f"cka n={n}",
               rounds=ROUNDS[request.config.getoption("--bench-scale")])
