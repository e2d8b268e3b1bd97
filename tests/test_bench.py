"""``python -m kernelssl.bench`` at tiny shapes (its hidden ``--smoke`` mode): the outputs and their
contents, a wrong implementation flagged and not timed, out of memory recorded as a row while the run
goes on, and (once, on one loss) the ``torch.compile`` rows."""
from __future__ import annotations

import json

import pytest
import torch

from kernelssl import _cases as C
from kernelssl.bench import __main__ as cli
from kernelssl.bench import report, runner


def _torch_path(loss, shape, device):
    return C.implementations(loss, shape, device=device, names=("torch",))["torch"]


def wrong_factory(loss, shape, device):
    """The torch path's loss, 1% too large: a scaling bug."""
    fn = _torch_path(loss, shape, device)
    return lambda *xs: fn(*xs) * 1.01


def oom_factory(error):
    """Correct at the correctness case, out of memory at every timed shape."""
    def factory(loss, shape, device):
        fn = _torch_path(loss, shape, device)
        check_batch = runner.SMOKE_CHECK_BATCH[loss]

        def impl(*xs):
            batch = xs[0].shape[-2] if loss == "hsic" else xs[0].shape[0]
            if batch > check_batch:
                raise error("simulated: tried to allocate 80 GiB")
            return fn(*xs)

        return impl

    return factory


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    extra = {"wrong": wrong_factory, "oom-cuda": oom_factory(torch.cuda.OutOfMemoryError),
             "oom-host": oom_factory(MemoryError)}
    rc = cli.main(["--smoke", "--no-compile", "--no-progress", "--dtype", "fp32", "bf16", "--out", str(out)],
                  extra=extra)
    return rc, out, json.loads((out / "results.json").read_text())


def test_outputs_and_environment(smoke):
    rc, out, res = smoke
    assert rc == 2  # a wrong implementation makes the exit status non-zero
    env = res["env"]
    for key in ("device", "torch", "triton", "kernelssl", "git_commit", "date"):
        assert key in env
    assert env["torch"] == torch.__version__
    md = (out / "results.md").read_text()
    assert "## Correctness" in md and "## Target shapes" in md and "## Batch-size sweep" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert res["plots"] == []
    else:
        assert set(res["plots"]) == {f"{loss}-fp32-sweep.png" for loss in C.LOSSES} | {"speedup.png"}
        for name in res["plots"]:
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_implementation_checked_and_the_real_ones_pass(smoke):
    _, _, res = smoke
    verdicts = {(c["loss"], c["dtype"], c["impl"]): c["verdict"] for c in res["checks"]}
    for loss in C.LOSSES:
        for dtype in ("fp32", "bf16"):
            assert verdicts[(loss, dtype, "eager")] == "pass"
            assert verdicts[(loss, dtype, "kernelssl")] == "pass"
            assert verdicts[(loss, dtype, "limit")] == "n/a"
            assert verdicts[(loss, dtype, "oom-cuda")] == "pass"


def test_wrong_implementation_is_flagged_and_not_timed(smoke):
    _, out, res = smoke
    wrong = [c for c in res["checks"] if c["impl"] == "wrong"]
    assert len(wrong) == 6 and all(c["verdict"] == "FAIL" for c in wrong)
    for c in wrong:
        assert c["loss_err"] > c["loss_tol"]
    rows = [r for r in res["rows"] if r["impl"] == "wrong"]
    assert rows and all(r["status"] == "skipped" and "median_ms" not in r for r in rows)
    assert "FAIL" in (out / "results.md").read_text()


def test_out_of_memory_is_a_row_and_the_run_goes_on(smoke):
    _, out, res = smoke
    for name in ("oom-cuda", "oom-host"):
        rows = [r for r in res["rows"] if r["impl"] == name]
        assert rows and all(r["status"] == "oom" for r in rows)
    for loss in C.LOSSES:  # every shape after the first OOM was still timed for the others
        ok = [r for r in res["rows"] if r["loss"] == loss and r["impl"] == "kernelssl" and r["status"] == "ok"]
        assert len(ok) == len(runner.SMOKE[loss][1]) + 1  # fp32 sweep + bf16 target
        assert all(r["median_ms"] > 0 and r["value_rel_err"] < 1e-3 for r in ok)
    assert "OOM" in (out / "results.md").read_text()


def test_ratios(smoke):
    _, _, res = smoke
    for r in res["rows"]:
        if r["status"] == "ok" and r["impl"] == "kernelssl":
            eager = next(e for e in res["rows"] if e["impl"] == "eager" and e["loss"] == r["loss"]
                         and e["dtype"] == r["dtype"] and e["shape_str"] == r["shape_str"])
            assert r["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / r["median_ms"])
            assert r["x_limit"] is not None and r["x_limit"] > 0


def test_low_precision_rule_flags_an_error_twice_the_torch_paths():
    ref = torch.tensor(1.0, dtype=torch.float64)
    g = [torch.ones(3, dtype=torch.float64)]
    torch_loss, torch_g = ref + 1e-3, [g[0] + 1e-3]
    ok = runner._low_precision_verdict(ref + 1.9e-3, [g[0] + 1e-3], ref, g, torch_loss, torch_g, "bf16")
    bad = runner._low_precision_verdict(ref + 2.1e-3, [g[0] + 1e-3], ref, g, torch_loss, torch_g, "bf16")
    bad_g = runner._low_precision_verdict(ref, [g[0] + 2.1e-3], ref, g, torch_loss, torch_g, "bf16")
    assert (ok["verdict"], bad["verdict"], bad_g["verdict"]) == ("pass", "FAIL", "FAIL")


def test_compiled_rows_once():
    """torch.compile of the papers' form and of kernelssl at a tiny shape (one loss: compiling is slow)."""
    res = runner.run(runner.Config(losses=("mec",), smoke=True, progress=False,
                                   impls=("eager", "eager-compiled", "kernelssl", "kernelssl-compiled", "limit")))
    verdicts = {c["impl"]: c["verdict"] for c in res["checks"]}
    assert verdicts == {**dict.fromkeys(("eager", "eager-compiled", "kernelssl", "kernelssl-compiled"), "pass"),
                        "limit": "n/a"}
    rows = [r for r in res["rows"] if r["impl"].endswith("compiled")]
    # smoke, like --quick: compiled rows at the target shape only (each shape would compile again)
    assert rows and all(r["status"] == "ok" and r["target"] for r in rows), rows
    report.add_ratios(res["rows"])
    target = [r for r in res["rows"] if r["target"]]
    assert all(r["speedup_vs_compiled"] is not None for r in target), target
    assert len([r for r in res["rows"] if not r["target"]]) == 3  # eager, kernelssl, limit at the other batch


def test_triton_precision_rows():
    """Each input_precision row runs the kernel (the CPU interpreter here) and is checked."""
    names = tuple(f"triton-{p}" for p in C.PRECISIONS)
    res = runner.run(runner.Config(losses=("hsic", "mec"), smoke=True, progress=False, dtypes=("fp32",),
                                   impls=("eager",) + names))
    verdicts = {(c["loss"], c["impl"]): c["verdict"] for c in res["checks"]}
    for loss in ("hsic", "mec"):
        assert verdicts[(loss, "triton-ieee")] == "pass"
        assert verdicts[(loss, "triton-tf32")] == "pass"
        assert verdicts[(loss, "triton-tf32x3")] == "pass"
    ok = {(r["loss"], r["impl"]) for r in res["rows"] if r["status"] == "ok"}
    assert {(loss, n) for loss, n in verdicts if verdicts[(loss, n)] == "pass"} <= ok
