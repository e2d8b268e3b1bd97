"""Configuration of ``pytest benchmarks``, the ``bench`` fixture every benchmark times through, and the
machine-readable results file (docs/benchmarks.md).

``pytest benchmarks`` times each loss (``test_losses.py``) and each op per mode with size sweeps
(``test_<op>_sweep.py``) for every implementation that can run here (:func:`kernelssl.bench.cases.available`),
on the same inputs, and measures peak extra memory.  Scales (``--bench-scale``; the shapes are
:mod:`kernelssl.bench.cases`'s):

* ``smoke`` (the default on a CPU; CI): small shapes, so the benchmarks never rot.
* ``full`` (CPU): the CPU sweep of :data:`kernelssl.bench.cases.CPU_SWEEP` (SFRIK n from 256 to 16384 x
  q in {128, 256, 512}, across the torch tier's size crossovers; SSL-HSIC K x B x d; MEC m x d).
* ``paper`` (the default on CUDA): the papers' shapes and the op sweeps; adds ``torch.compile`` of
  the torch path.

The step of each test and its peak memory come from :mod:`kernelssl.bench.measure` (the project's
timing harness); pytest-benchmark's ``pedantic`` repeats the step.  Results go to
``benchmarks/results/<device>-<scale>.json`` (or ``--bench-out PATH``), one row per (loss, shape,
dtype, implementation), with the environment (:func:`kernelssl.bench.runner.environment`).

Run from the repository root: ``pytest benchmarks`` (``pytest.ini`` puts the checkout on the path).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kernelssl.bench import cases as C
from kernelssl.bench import measure as Ms
from kernelssl.bench.runner import environment

ROWS: list[dict] = []


def pytest_addoption(parser):
    group = parser.getgroup("kernelssl benchmarks")
    group.addoption("--bench-scale", choices=("smoke", "full", "paper"),
                    default="paper" if Ms.bench_device().type == "cuda" else "smoke",
                    help="shapes to run (default: smoke on CPU, paper on CUDA)")
    group.addoption("--bench-out", default=None, help="results JSON path")


@pytest.fixture(scope="session")
def results_rows():
    return ROWS


def pytest_generate_tests(metafunc):
    """``op_case`` of an op sweep (``test_<op>_sweep.py``): ``(shape, dtype, mode, impl)`` from its
    module's ``SWEEP`` -- ``loss``, ``op``, ``cases(device, scale) -> [(shape, dtype, mode)]`` and
    optionally ``variant`` and ``variant_shape`` (:func:`kernelssl.bench.cases.sweep_params`)."""
    sweep = getattr(metafunc.module, "SWEEP", None)
    if sweep is None or "op_case" not in metafunc.fixturenames:
        return
    device = Ms.bench_device()
    cases = sweep["cases"](device, metafunc.config.getoption("--bench-scale"))
    metafunc.parametrize("op_case", **C.sweep_params(sweep["loss"], sweep["op"], cases, device=device,
                                                     variant=sweep.get("variant"),
                                                     variant_shape=sweep.get("variant_shape")))


class Bench:
    """One benchmark case: its step timed by pytest-benchmark, its row appended to the results."""

    def __init__(self, benchmark, rows: list[dict]):
        self.benchmark, self.rows, self.device = benchmark, rows, Ms.bench_device()

    def record(self, target: Callable, *, setup: Callable | None = None, peak: int | None, row: dict, group: str,
               rounds: int, loss_value: float, extra_info: dict | None = None,
               rates: Callable[[float], dict] | None = None) -> float:
        """Time ``target`` (``setup`` untimed before each round), ``rounds`` rounds after one warm-up
        round; append ``row`` with the median and min, ``peak`` (bytes), ``loss_value`` and
        ``rates(median seconds)``.  Returns the median in seconds."""
        mb = None if peak is None else peak / 2**20
        self.benchmark.group = group
        self.benchmark.extra_info.update(peak_extra_mb=mb, **(extra_info or {}))
        self.benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
        stats = self.benchmark.stats.stats
        assert math.isfinite(stats.median)
        self.rows.append({**row, "median_ms": stats.median * 1e3, "min_ms": stats.min * 1e3, "rounds": rounds,
                          "peak_extra_mb": mb, "loss_value": loss_value, "status": "ok",
                          **(rates(stats.median) if rates else {})})
        return stats.median

    def not_run(self, row: dict, status: str, **fields) -> None:
        """Append ``row`` for a case that was not timed (``status``: ``"oom"``, ``"predicted-oom"``)."""
        self.rows.append({**row, "median_ms": float("nan"), "min_ms": float("nan"), "rounds": 0,
                          "peak_extra_mb": None, "loss_value": None, "status": status, **fields})

    def mode(self, make: Callable[[], tuple], mode: str, *, check: Callable[..., float], row: dict, group: str,
             rounds: int, scalar=lambda out: out, rates: Callable[[float], dict] | None = None,
             label: str | None = None) -> None:
        """Time one mode (:func:`kernelssl.bench.measure.mode_step`) of ``fn(*inputs)``, ``(fn, inputs) =
        make()``: ``check(fn, inputs)`` first (the loss value, asserted against a reference: a fast
        wrong implementation cannot look good), warm-up (compile, Triton JIT, allocator), the peak
        extra memory of one step, then :meth:`record`.  Out of memory anywhere before the timing is a
        row with ``status = "oom"`` and the test is skipped.  ``label``: the mode's name in
        pytest-benchmark's ``extra_info`` (default ``mode``)."""
        oom = False
        try:
            fn, inputs = make()
            value = check(fn, inputs)
            for _ in range(1 if mode == "metric" else 2):
                Ms.mode_call(fn, inputs, mode, scalar=scalar)
            Ms.sync(self.device)
            setup, target = Ms.mode_step(fn, inputs, mode, self.device, scalar=scalar)
            peak = Ms.step_peak_bytes(setup, target, self.device)
        except (torch.cuda.OutOfMemoryError, MemoryError):
            oom = True  # leave the except block first: the error's traceback holds its frames' tensors
        if oom:
            fn = inputs = setup = target = None
            Ms.free_gpu_memory()
            self.not_run(row, "oom")
            pytest.skip(f"{row['impl']} ran out of memory at {row['shape']}")
        self.record(target, setup=setup, peak=peak, row=row, group=group, rounds=rounds, loss_value=value,
                    extra_info={"mode": label or mode}, rates=rates)


@pytest.fixture
def bench(benchmark, results_rows) -> Bench:
    return Bench(benchmark, results_rows)


def pytest_sessionfinish(session, exitstatus):
    if not ROWS:
        return
    device = Ms.bench_device()
    scale = session.config.getoption("--bench-scale")
    slug = re.sub(r"[^a-z0-9]+", "-", (Ms.device_name(device) if device.type == "cuda" else "cpu").lower()).strip("-")
    out = session.config.getoption("--bench-out") or Path(__file__).parent / "results" / f"{slug}-{scale}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    meta = {"device": env["device"], "scale": scale, **env}
    out.write_text(json.dumps({"meta": meta, "rows": ROWS, "ratios": ratios(ROWS)}, indent=1) + "\n")


def ratios(rows: list[dict]) -> list[dict]:
    """For each case, eager/impl time and memory ratios (>1 means the implementation is better)."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["loss"], r["shape"], r["dtype"]), {})[r["impl"]] = r
    out = []
    for (loss, shape, dtype), impls in by_case.items():
        eager = impls.get("eager")
        if eager is None:
            continue
        compiled = impls.get("eager-compiled")  # the papers' form under torch.compile
        for name, r in impls.items():
            if name == "eager":
                continue
            out.append({
                "loss": loss, "shape": shape, "dtype": dtype, "impl": name,
                "speedup_vs_eager": eager["median_ms"] / r["median_ms"],
                "speedup_vs_eager_compiled": compiled["median_ms"] / r["median_ms"] if compiled else None,
                "memory_ratio_vs_eager": (r["peak_extra_mb"] / eager["peak_extra_mb"])
                if r.get("peak_extra_mb") is not None and eager.get("peak_extra_mb") else None,
            })
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("kernelssl: forward+backward vs eager")
    tr.write_line(f"device: {Ms.device_name(Ms.bench_device())}, scale: {config.getoption('--bench-scale')}")
    tr.write_line(f"{'loss':6} {'shape':28} {'dtype':9} {'impl':14} {'median ms':>10} {'peak MB':>9} "
                  f"{'speed-up':>9} {'mem ratio':>9}")
    rat = {(r["loss"], r["shape"], r["dtype"], r["impl"]): r for r in ratios(ROWS)}
    for r in ROWS:
        x = rat.get((r["loss"], r["shape"], r["dtype"], r["impl"]))
        mem = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.1f}"
        sp = f"{x['speedup_vs_eager']:.2f}x" if x else ""
        mr = f"{x['memory_ratio_vs_eager']:.3f}" if x and x["memory_ratio_vs_eager"] is not None else ""
        tr.write_line(f"{r['loss']:6} {r['shape']:28} {r['dtype']:9} {r['impl']:14} {r['median_ms']:10.2f} "
                      f"{mem:>9} {sp:>9} {mr:>9}")
