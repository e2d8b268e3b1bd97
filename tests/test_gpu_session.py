"""``benchmarks/gpu_session.py --dry-run``: the GPU session's own code, run on the CPU at tiny shapes (the
kernels through the Triton interpreter), so that it cannot fail on its first run on a lent GPU.

Two runs in subprocesses (the session sets ``TRITON_INTERPRET`` itself, before Triton is imported): a
whole dry run, every step of which must succeed and leave its rows and files; and one with a budget too
small for the rows, whose time guard must cut the tests short, skip what does not fit and still write
the files.  (~30 s of CPU on two cores, most of it the interpreter and the pytest start.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

SESSION = os.path.join(ROOT, "benchmarks", "gpu_session.py")
LOSSES = ("hsic", "sfrik", "mec", "uniformity")
IMPLS = ("eager", "eager-compiled", "triton", "limit")


def _run(out, *args, timeout=600):
    path = [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(path)
    proc = subprocess.run([sys.executable, SESSION, "--dry-run", "--out", str(out), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    data = json.loads((out / "session.json").read_text())
    return data, files, (out / "session.md").read_text()


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("gpu_session"))


def test_dry_run_every_step_succeeds(dry):
    data, files, md = dry
    assert data["dry_run"] is True and data.get("finished") is True
    bad = {k: v for k, v in data["steps"].items() if v.get("status") != "ok"}
    assert not bad, bad
    assert {"session.json", "session.md", "tests.log"} <= set(files)
    assert data["env"]["triton_interpret"] == "1" and data["env"]["device_type"] == "cpu"
    assert "DRY RUN" in md


def test_dry_run_runs_the_tests(dry):
    data, _, _ = dry
    t = data["tests"]
    assert t["passed"] > 0 and t["failed"] == 0 and t["error"] == 0 and t["returncode"] == 0, t
    assert not t["killed_by_time_guard"]


def test_dry_run_times_every_headline_row(dry):
    """Each loss, fp32 and bf16, each implementation: timed, its value checked against float64."""
    data, _, md = dry
    rows = {(r["loss"], r["dtype"], r["impl"]): r for r in data["rows"] if r["case"] == "headline"}
    assert set(rows) == {(loss, dt, impl) for loss in LOSSES for dt in ("fp32", "bf16") for impl in IMPLS}
    for key, r in rows.items():
        assert r["status"] == "ok" and r["median_ms"] > 0, (key, r)
        if r["impl"] != "limit":
            assert r["value_rel_err"] < 1e-3, (key, r)
        assert f"| {r['loss']} |" in md
    big = [r for r in data["rows"] if r["case"] == "big-sfrik"]
    assert {(r["dtype"], r["impl"], r["status"]) for r in big} == {
        (dt, impl, status) for dt in ("fp32", "bf16") for impl, status in
        (("triton", "ok"), ("eager", "not-run"), ("limit", "not-run"))}
    assert data["cka"]["status"] in ("ok", "not available")


def test_dry_run_puts_the_model_beside_the_rows(dry):
    """The model's predictions stand beside the rows it prices (the dry run prices one loss: the
    uniformity), and only beside those."""
    from kernelssl.triton.offline import tools_available

    data, files, _ = dry
    if not tools_available():
        assert data["steps"]["model start"]["status"] == "error"
        pytest.skip("Triton's bundled ptxas is not available: the model cannot compile")
    assert "model.json" in files and not data["model"]["errors"]
    for r in data["rows"]:
        priced = r["case"] == "headline" and r["loss"] == "uniformity" and r["impl"] in ("eager", "triton", "limit")
        assert (r.get("predicted_ms") is not None) == priced, r
        if priced:
            assert r["predicted_ms"] > 0 and r["measured_over_predicted"] > 0


def test_time_guard_cuts_and_still_writes(tmp_path):
    """With a budget too small for the rows the tests are killed at their limit, what does not fit is
    recorded as skipped by the time guard, and the files are still written."""
    data, files, md = _run(tmp_path, "--budget-s", "14", "--tests-s", "0.5")
    assert data.get("finished") is True and {"session.json", "session.md"} <= set(files)
    assert data["tests"]["killed_by_time_guard"] is True
    skipped = [k for k, v in data["steps"].items() if v.get("status") == "skipped: time budget"]
    skipped += [r for r in data["rows"] if r.get("status") == "skipped: time budget"]
    assert skipped, data["steps"]
    assert "skipped: time budget" in md
