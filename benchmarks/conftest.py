"""Benchmark configuration and the machine-readable results file.

``pytest benchmarks`` times forward+backward of each loss for every implementation that can run here
(see ``kernelssl._cases``) on the same inputs, and measures peak extra memory.  Scales:

* ``smoke`` (default on CPU): small shapes, so the benchmarks never rot; runs in CI.
* ``full`` (CPU): the shapes of the foundation issue's CPU targets (MEC m=1024, d=256, order 4;
  SFRIK n=16384, q=64; HSIC N=4096).
* ``paper`` (default on CUDA): the papers' shapes; adds ``torch.compile`` of the torch path.

Choose with ``--bench-scale``.  Results go to ``benchmarks/results/<device>-<scale>.json``
(or ``--bench-out PATH``), one row per (loss, shape, dtype, implementation).
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import re
from pathlib import Path

import pytest
import torch

from bench_util import bench_device, bench_scale, device_name

ROWS: list[dict] = []


def pytest_addoption(parser):
    group = parser.getgroup("kernelssl benchmarks")
    group.addoption("--bench-scale", choices=("smoke", "full", "paper"), default=None,
                    help="shapes to run (default: smoke on CPU, paper on CUDA)")
    group.addoption("--bench-out", default=None, help="results JSON path")


@pytest.fixture(scope="session")
def results_rows():
    return ROWS


def pytest_sessionfinish(session, exitstatus):
    if not ROWS:
        return
    device = bench_device()
    scale = bench_scale(session.config)
    slug = re.sub(r"[^a-z0-9]+", "-", (device_name(device) if device.type == "cuda" else "cpu").lower()).strip("-")
    out = session.config.getoption("--bench-out") or Path(__file__).parent / "results" / f"{slug}-{scale}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device_name(device),
        "scale": scale,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:  # triton is optional
        meta["triton"] = None
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
    tr.write_line(f"device: {device_name(bench_device())}, scale: {bench_scale(config)}")
    tr.write_line(f"{'loss':6} {'shape':28} {'dtype':9} {'impl':14} {'median ms':>10} {'peak MB':>9} {'speed-up':>9} {'mem ratio':>9}")
    rat = {(r["loss"], r["shape"], r["dtype"], r["impl"]): r for r in ratios(ROWS)}
    for r in ROWS:
        x = rat.get((r["loss"], r["shape"], r["dtype"], r["impl"]))
        mem = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.1f}"
        sp = f"{x['speedup_vs_eager']:.2f}x" if x else ""
        mr = f"{x['memory_ratio_vs_eager']:.3f}" if x and x["memory_ratio_vs_eager"] is not None else ""
        tr.write_line(f"{r['loss']:6} {r['shape']:28} {r['dtype']:9} {r['impl']:14} {r['median_ms']:10.2f} {mem:>9} {sp:>9} {mr:>9}")
