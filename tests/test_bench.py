"""``python -m kernelssl.bench`` at tiny shapes (its hidden ``--smoke`` mode): the outputs and their
contents, a wrong implementation flagged and not timed, out of memory recorded as a row while the run
goes on, and (once, on one loss) the ``torch.compile`` rows; the timing harness's interleaved repeats.

The whole-bench runs take seconds to tens of seconds each: they are the slow tier (``pytest tests -m
slow``); the verdict rules, the OOM prediction and the harness are the fast one."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import load_benchmark
from kernelssl.bench import __main__ as cli
from kernelssl.bench import cases as C
from kernelssl.bench import measure as Ms
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
        check_batch = C.SMOKE_CHECK_BATCH[loss]

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_every_implementation_checked_and_the_real_ones_pass(smoke):
    _, _, res = smoke
    verdicts = {(c["loss"], c["dtype"], c["impl"]): c["verdict"] for c in res["checks"]}
    for loss in C.LOSSES:
        for dtype in ("fp32", "bf16"):
            assert verdicts[(loss, dtype, "eager")] == "pass"
            assert verdicts[(loss, dtype, "kernelssl")] == "pass"
            assert verdicts[(loss, dtype, "limit")] == "n/a"
            assert verdicts[(loss, dtype, "oom-cuda")] == "pass"


@pytest.mark.slow
def test_wrong_implementation_is_flagged_and_not_timed(smoke):
    _, out, res = smoke
    wrong = [c for c in res["checks"] if c["impl"] == "wrong"]
    assert len(wrong) == 2 * len(C.LOSSES) and all(c["verdict"] == "FAIL" for c in wrong)
    for c in wrong:
        assert c["loss_err"] > c["loss_tol"]
    rows = [r for r in res["rows"] if r["impl"] == "wrong"]
    assert rows and all(r["status"] == "skipped" and "median_ms" not in r for r in rows)
    assert "FAIL" in (out / "results.md").read_text()


@pytest.mark.slow
def test_out_of_memory_is_a_row_and_the_run_goes_on(smoke):
    _, out, res = smoke
    for name in ("oom-cuda", "oom-host"):
        rows = [r for r in res["rows"] if r["impl"] == name]
        assert rows and all(r["status"] == "oom" for r in rows)
    for loss in C.LOSSES:  # every shape after the first OOM was still timed for the others
        ok = [r for r in res["rows"] if r["loss"] == loss and r["impl"] == "kernelssl" and r["status"] == "ok"]
        assert len(ok) == len(C.SMOKE_SHAPES[loss][1]) + 1  # fp32 sweep + bf16 target
        assert all(r["median_ms"] > 0 and r["value_rel_err"] < 1e-3 for r in ok)
    assert "OOM" in (out / "results.md").read_text()


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_predicted_oom_of_the_pdist_form():
    """The uniformity's pdist form beyond the memory cap is predicted, never tried; nothing else is."""
    shape = {"n": 65536, "q": 128}
    cap = 2**30  # 1 GiB
    why = C.predicted_oom("uniformity", "eager", shape, cap=cap)
    # 8 x the n(n-1)/2 fp32 vector: 8 x 65536 x 65535 / 2 x 4 B = 64.0 GiB
    assert why is not None and why.startswith("predicted OOM (64.0 GiB"), why
    assert C.predicted_oom("uniformity", "eager-compiled", shape, cap=cap) is not None
    assert C.predicted_oom("uniformity", "eager", shape, dtype=torch.bfloat16, cap=cap).startswith(
        "predicted OOM (64.0 GiB")  # pdist runs in fp32 on 16-bit inputs (as under autocast)
    assert C.predicted_oom("uniformity", "kernelssl", shape, cap=cap) is None
    assert C.predicted_oom("uniformity", "eager", {"n": 4096, "q": 128}, cap=cap) is None  # 0.25 GiB
    assert C.predicted_oom("sfrik", "eager", {"n": 65536, "q": 128}, cap=cap) is None
    assert C.predicted_oom("uniformity", "eager", shape, device="meta") is None  # no cap: tried, OOM caught
    # without the backward (the metric's use): 3 vectors instead of 8
    assert C.predicted_oom("uniformity", "eager", shape, cap=cap, grad=False).startswith("predicted OOM (24.0 GiB")


@pytest.mark.slow
def test_predicted_oom_is_a_row_and_the_sweep_goes_on(monkeypatch):
    # cap between the smoke sweep's two sizes: 8 x 24 x 23 / 2 x 4 B = 8832 B runs, n = 48 (36096 B) does not
    monkeypatch.setattr(C, "memory_cap_bytes", lambda device: 20000)
    res = runner.run(runner.Config(losses=("uniformity",), smoke=True, progress=False, dtypes=("fp32",),
                                   impls=("eager", "kernelssl", "limit")))
    assert {c["impl"]: c["verdict"] for c in res["checks"]} == {"eager": "pass", "kernelssl": "pass", "limit": "n/a"}
    status = {(r["impl"], r["batch"]): r["status"] for r in res["rows"]}
    assert status == {("eager", 24): "ok", ("eager", 48): "predicted-oom", ("kernelssl", 24): "ok",
                      ("kernelssl", 48): "ok", ("limit", 24): "ok", ("limit", 48): "ok"}
    row = next(r for r in res["rows"] if r["status"] == "predicted-oom")
    assert "median_ms" not in row and "first_call_s" not in row
    assert report._status_cell(row) == "skipped: predicted OOM (35 KiB)"
    assert "skipped: predicted OOM" in report.markdown(res)


def test_interleaved_repeats_round_robin_and_drop_a_failed_step():
    """:func:`kernelssl.bench.measure.interleaved`: one call of each step per round, in an order drawn
    afresh each round (seeded: the same seed, the same calls), so every step runs after every other; a
    step whose guarded call fails leaves the rounds; ``budget_s`` stops after ``min_repeats`` rounds;
    ``warm`` calls each step once more, untimed, right before its timed call."""
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}

    def guard(name, call):
        return None if name == "b" and calls.count("b") == 1 else call()

    times = Ms.interleaved(steps, torch.device("cpu"), repeats=3, guard=guard)
    # b's second call failed (in the guard): rounds of three calls, then of a and c alone
    assert sorted(calls[:3]) == ["a", "b", "c"] and sorted(calls[3:5]) == sorted(calls[5:]) == ["a", "c"]
    assert set(times) == {"a", "c"} and all(len(ts) == 3 and min(ts) >= 0 for ts in times.values())
    calls.clear()
    Ms.interleaved(steps, torch.device("cpu"), repeats=40, seed=3)
    rounds = [tuple(calls[i : i + 3]) for i in range(0, len(calls), 3)]
    assert len(rounds) == 40 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert {(x, y) for x, y in zip(calls, calls[1:])} >= {(x, y) for x in "abc" for y in "abc" if x != y}
    again = calls.copy()
    calls.clear()
    Ms.interleaved(steps, torch.device("cpu"), repeats=40, seed=3)
    assert calls == again
    calls.clear()  # warm: each timed call right after an untimed one of the same step
    warm = Ms.interleaved(steps, torch.device("cpu"), repeats=4, warm=True)
    assert len(calls) == 24 and all(calls[i] == calls[i + 1] for i in range(0, 24, 2))
    assert all(len(ts) == 4 for ts in warm.values())
    few = Ms.interleaved(steps, torch.device("cpu"), repeats=50, min_repeats=2, budget_s=0.0)
    assert [len(ts) for ts in few.values()] == [2, 2, 2]


def test_mode_steps():
    """The steps :func:`kernelssl.bench.measure.mode_step` times: gradients cleared in the setup, the
    backward's forward in the setup, the metric under ``torch.no_grad()``."""
    x = torch.ones(3, requires_grad=True)
    fn = lambda x: (2 * x).sum()
    for mode, grad in (("forward", None), ("full", 2.0), ("backward", 2.0), ("metric", None)):
        x.grad = torch.zeros(3)
        setup, target = Ms.mode_step(fn, (x,), mode, torch.device("cpu"))
        args, kwargs = setup()
        assert x.grad is None
        out = target(*args, **kwargs)
        assert (x.grad is None) if grad is None else bool((x.grad == grad).all()), mode
        if mode == "metric":
            assert not out.requires_grad
    with pytest.raises(ValueError, match="mode"):
        Ms.mode_step(fn, (x,), "sideways", torch.device("cpu"))


# --------------------------------------------------------------------------------------------------
# the limit row: the fastest of several implementations of the essential products


def test_limit_picks_the_fastest_candidate_per_shape_and_drops_a_failing_one():
    import time

    calls = []

    def slow(x):
        calls.append(("slow", x.shape[0]))
        time.sleep(0.002 if x.shape[0] == 4 else 0.0)
        return x

    def fast_at_4(x):
        calls.append(("fast", x.shape[0]))
        time.sleep(0.0 if x.shape[0] == 4 else 0.002)
        return x

    def broken(x):
        raise RuntimeError("simulated compile failure")

    lim = C.FastestOf({"slow": slow, "fast": fast_at_4, "broken": broken})
    lim(torch.zeros(4))
    assert lim.chosen == "fast" and set(lim.trial_ms) == {"slow", "fast"}
    lim(torch.zeros(8))  # a new shape: chosen again
    assert lim.chosen == "slow"
    calls.clear()
    lim(torch.zeros(4))  # a known shape: the winner only, no trials
    assert calls == [("fast", 4)] and lim.chosen == "fast"
    with pytest.raises(RuntimeError, match="simulated"):
        C.FastestOf({"broken": broken})(torch.zeros(2))


@pytest.mark.parametrize("n", [2, 7, 8])
def test_halves_gram_products_equal_the_full_ones(n):
    zs = torch.randn(2, n, 3, dtype=torch.float64)
    torch.testing.assert_close(C.halves_gram_products(zs), zs @ zs.mT @ zs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,block", [(7, 3), (8, 4), (5, 16)])
def test_symmetric_gram_products_equal_the_full_ones(n, block):
    z = torch.randn(n, 3, dtype=torch.float64)
    torch.testing.assert_close(C.symmetric_gram_products(z, block), (z @ z.T) @ z, rtol=1e-12, atol=1e-12)
    zs = torch.stack([z, 2.0 * z.flip(0)])  # two sets, batched
    torch.testing.assert_close(C.symmetric_gram_products(zs, block), zs @ zs.mT @ zs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["sfrik", "uniformity", "mec", "hsic"])
def test_limit_candidates_compute_the_same_products(loss):
    shape = C.SMOKE_SHAPES[loss][0]
    lim = C.limit_products(loss, shape)
    inputs = C.make_inputs(loss, shape, dtype=torch.float64)
    outs = {name: fn(*inputs) for name, fn in lim.candidates.items()}
    symmetric = {f"symmetric-{t}" for t in C.LIMIT_BLOCKS} if loss in ("sfrik", "uniformity") else set()
    if symmetric and shape["n"] <= C.LIMIT_HALVES_MAX_ROWS:
        symmetric.add("halves")
    assert set(outs) == {"aten", "compiled"} | symmetric
    ref = outs.pop("aten")
    # every product comes back (a compiled candidate cannot drop a view's as dead code)
    # (mec: per direction C^2 and the gradient product of the online outputs; the teacher's need none)
    assert len(ref) == {"sfrik": 2, "uniformity": 1, "mec": 4}[loss] if loss != "hsic" else ref.dim() == 2
    for name, out in outs.items():
        for a, b in zip(ref if isinstance(ref, tuple) else (ref,), out if isinstance(out, tuple) else (out,)):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=f"{loss} {name}")


def test_a_row_faster_than_its_limit_is_a_fault_of_the_limit():
    def row(impl, ms):
        return {"loss": "sfrik", "dtype": "fp32", "shape_str": "n=8,q=4", "impl": impl, "status": "ok",
                "median_ms": ms, "min_ms": ms, "peak_extra_mb": None, "target": True, "shape": {"n": 8, "q": 4},
                "batch": 8}

    rows = [row("eager", 4.0), row("kernelssl", 1.0), row("eager-compiled", 3.0), row("limit", 2.0)]
    report.add_ratios(rows)
    faults = {r["impl"]: r["limit_fault"] for r in rows}
    assert faults == {"eager": False, "kernelssl": True, "eager-compiled": False, "limit": False}
    result = {"env": {"device": "cpu", "device_type": "cpu", "cpu_count": 2, "torch_threads": 2, "torch": "x",
                      "triton": None, "kernelssl": "x", "date": "d"},
              "rows": rows, "checks": [], "wall_s": 1.0, "config": {"quick": True}}
    assert "LIMIT FAULT: sfrik fp32 n=8,q=4 kernelssl" in report.summary(result)
    assert "**limit fault**" in report.markdown(result)


def test_readme_install_gives_the_bench_its_plots():
    """README's install command names extras of setup.py that include matplotlib (python -m kernelssl.bench's
    plots)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    extras = re.search(r'pip install -e "\.\[([a-z,]+)\]"', (root / "README.md").read_text()).group(1).split(",")
    setup = (root / "setup.py").read_text()
    block = setup[setup.index("extras_require"):]
    named = {m.group(1): m.group(2) for m in re.finditer(r'"(\w+)": \[(.*?)\]', block, re.S)}
    assert any("matplotlib" in named[e] for e in extras), (extras, named)


def test_cpu_peer_parts_rows_compute_the_default_calls_loss():
    """``benchmarks/cpu_peer.py --parts``: the Function entered without the wrappers' checks (``ops``) and
    without the prescale (``ops-unscaled``) are timed beside the default call, and their loss values (on
    the same rows of moderate norm) are the papers' form's to fp32 rounding (numerics.FP32_TOL)."""
    from kernelssl.numerics import FP32_TOL

    peer = load_benchmark("cpu_peer")
    threads = torch.get_num_threads()  # run_case sets the thread count: the current one
    row = peer.run_case("sfrik", {"n": 17, "q": 8}, repeats=2, threads=threads, peer=False, parts=True)
    for name in ("default", "ops", "ops-unscaled", "gemm"):
        assert row[f"{name}_ms"] > 0
    ref = row["loss_eager"]
    for name in ("default", "ops", "ops-unscaled"):
        got = row[f"loss_{name}"]
        assert abs(got - ref) <= FP32_TOL["loss_rtol"] * abs(ref) + FP32_TOL["loss_atol"], (name, got, ref)
    assert "ops_ms" not in peer.run_case("sfrik", {"n": 17, "q": 8}, repeats=1, threads=threads, peer=False)


def test_cpu_peer_floor_row_reports_both_bounds():
    """SSL-HSIC ``--floor``: ``peer/floor`` (the products, the features' cos and the module's draw) and
    ``peer/products_cos`` (the same with the draw left out) are the peer's time over those sums.  The row
    rounds its times to 1 us and its ratios to 0.01, which at these tiny times is up to a few percent:
    rel = 5%."""
    peer = load_benchmark("cpu_peer")
    threads = torch.get_num_threads()
    row = peer.run_case("hsic", {"K": 2, "B": 9, "d": 4, "D": 8}, repeats=2, threads=threads, floor=True)
    assert row["floor_ms"] == pytest.approx(row["gemm_ms"] + row["features_ms"] + row["draw_ms"], abs=2e-3)
    assert row["peer/floor"] == pytest.approx(row["peer_ms"] / row["floor_ms"], rel=0.05)
    products_cos = row["gemm_ms"] + row["features_ms"]
    assert row["peer/products_cos"] == pytest.approx(row["peer_ms"] / products_cos, rel=0.05)
    assert row["peer/products_cos"] > row["peer/floor"]  # the draw takes time
