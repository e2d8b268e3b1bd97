"""The first command of a session with a lent GPU: everything a short session should bring back, in one
run that cannot stop half-way (docs/benchmarks.md, "When a GPU is lent").

Usage, from the repository root::

    PYTHONPATH=. python benchmarks/gpu_session.py --out DIR [--budget-s 480] [--tests-s 150]
    PYTHONPATH=. python benchmarks/gpu_session.py --dry-run --out DIR      # the same code on the CPU

Steps, in order, each in its own ``try``: a step that fails is recorded with its error and the run goes
on; ``session.json`` and ``session.md`` are rewritten after every step, so a run cut off anywhere leaves
what it had:

1. **device and stack**: the device's name, compute capability, SMs and memory, the versions
   (:func:`kernelssl.bench.runner.environment`), ``nvidia-smi``;
2. **the performance model** at the shapes this run times (``benchmarks/perf_model.py --cases``, in a
   subprocess with the kernels compiled, ``TRITON_INTERPRET=0``, started first so that it compiles
   while the tests run);
3. **the kernels' GPU tests** (:data:`GPU_TESTS`: the Triton tiers' test files, which run the kernels on
   CUDA when it is there -- ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` only without CUDA) in a
   pytest subprocess with a timeout, its output streamed to ``tests.log``;
4. **the headline rows**: each loss (SSL-HSIC, SFRIK, MEC, uniformity) forward + backward at the papers'
   shapes, fp32 and bf16: the papers' form eager and under ``torch.compile``, the fused kernel
   (``backend="triton"``) and the limit (the essential products alone), timed by
   :func:`kernelssl.bench.runner.time_case` (value check against float64, interleaved repeats, peak
   memory) with the model's prediction beside each;
5. **SFRIK at n = 131072** (q = 8192, both views), the fused kernel alone: the papers' form and the
   limit would hold the 64 GiB n x n Gram;
6. **the exact Gaussian CKA of 100 000 rows** (64 against 32 features) through ``kernelssl.metrics.cka``
   where that module exists ("not available" otherwise): the fused ``gram_hsic`` kernels, and the torch
   tier once beside them (time and value);
7. a PNG of the speed-ups, where matplotlib is installed.

A **time guard**: the run has ``--budget-s`` seconds (default 480: 8 minutes); before each step and each
row it checks what is left, and a row that does not fit is recorded as ``skipped: time budget``.  The
tests get at most ``--tests-s`` of it.  At most 5 files: ``session.json``, ``session.md``, ``tests.log``,
``model.json``, ``speedup.png``.

``--dry-run`` runs the same code on the CPU at tiny shapes, the kernels through the Triton interpreter
(``TRITON_INTERPRET=1``, set before any Triton module is imported) and ``torch.compile`` with its
``eager`` backend (Dynamo traces, nothing is code-generated: minutes of CPU compile saved); the tests
step runs one quick test file.  ``tests/test_gpu_session.py`` runs it in CI, once in full and once with
a budget too small for the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The test files that run the kernels on the GPU when CUDA is there.
GPU_TESTS = ("tests/test_rff_hsic_triton.py", "tests/test_legendre_gram_triton.py",
             "tests/test_taylor_logdet_triton.py", "tests/test_gaussian_gram_triton.py",
             "tests/test_gram_hsic_triton.py", "tests/test_triton_common.py", "tests/test_gaussian_gram_tiers.py",
             "tests/test_amp.py", "tests/test_determinism.py")
DRY_TESTS = ("tests/test_triton_common.py", "-k", "mixed_float32")
IMPLS = ("eager", "eager-compiled", "triton", "limit")
DTYPES = ("fp32", "bf16")
#: the performance model's op and its extra shape keys, per loss (the losses' inputs: SFRIK's and MEC's
#: two views or directions, one set of embeddings for the uniformity)
MODEL_OP = {"hsic": ("rff_hsic", {}), "sfrik": ("legendre_gram", {"views": 2}), "mec": ("taylor_logdet", {"P": 2}),
            "uniformity": ("gaussian_gram", {"views": 1})}
BIG_SFRIK = {"n": 131072, "q": 8192}
CKA_SHAPE = {"n": 100_000, "dx": 64, "dy": 32}
#: dry-run shapes (the interpreter's time is per program: one program per op where the tiles allow), and
#: the one loss whose cases the dry run's model prices (one compile per distinct variant)
DRY_SHAPES = {"hsic": {"K": 2, "B": 8, "d": 4, "D": 8}, "sfrik": {"n": 12, "q": 4}, "mec": {"m": 6, "d": 4},
              "uniformity": {"n": 12, "q": 4}}
DRY_BIG_SFRIK = {"n": 24, "q": 4}
DRY_MODEL_LOSS = "uniformity"
DRY_CKA_SHAPE = {"n": 96, "dx": 8, "dy": 4}
RESERVE_S = 10.0  # kept for writing the files at the end
MODEL_WAIT_S = 120.0  # the most the rows wait for the model after the tests (its big SFRIK case: ~15 s)
FILES = ("session.json", "session.md", "tests.log", "model.json", "speedup.png")


class Session:
    """The results so far, the deadline, and :meth:`step`: run one part, record its error, write the files."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool):
        self.out, self.dry_run = out, dry_run
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + budget_s
        self.data: dict = {"dry_run": dry_run, "budget_s": budget_s, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                           time.gmtime()), "steps": {}, "rows": [], "files": []}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def fits(self, need_s: float) -> bool:
        """Whether ``need_s`` seconds and the final writing still fit the budget."""
        return self.left() - RESERVE_S >= need_s

    def step(self, name: str, fn, *, need_s: float = 0.0):
        """``fn()`` recorded as step ``name`` (status, seconds, its result or error); skipped when
        ``need_s`` does not fit the budget.  Never raises."""
        rec = self.data["steps"].setdefault(name, {})
        if not self.fits(need_s):
            rec.update(status="skipped: time budget", left_s=round(self.left(), 1))
            self.write()
            return None
        t = time.perf_counter()
        try:
            value = fn()
            rec.update(status="ok")
        except Exception as exc:
            value = None
            rec.update(status="error", error=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc(limit=8)[-3000:])
        rec["seconds"] = round(time.perf_counter() - t, 2)
        self.write()
        return value

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        self.data["files"] = sorted(p.name for p in self.out.iterdir() if p.name in FILES)
        text = json.dumps(self.data, indent=1, default=str)
        tmp = self.out / "session.json.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(self.out / "session.json")
        try:
            (self.out / "session.md").write_text(markdown(self.data))
        except Exception as exc:  # the JSON is the record; the markdown is a view of it
            (self.out / "session.md").write_text(f"# GPU session\n\nmarkdown failed: {exc!r}\n")


# ==================================================================================================
# steps
# ==================================================================================================


def device_and_stack(device) -> dict:
    import torch

    from kernelssl.bench.runner import environment

    env = environment(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), cuda_devices=torch.cuda.device_count(),
                   hip=getattr(torch.version, "hip", None))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = (smi.stdout or smi.stderr).strip()
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = f"not run: {exc}"
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    return env


def model_cases(shapes: dict, big: dict | None) -> list[dict]:
    """The performance model's cases for the headline shapes and the big SFRIK case (``big``: None, none)."""
    out = []
    for loss, shape in list(shapes.items()) + ([("sfrik", big)] if big else []):
        op, extra = MODEL_OP[loss]
        for dt in DTYPES:
            out.append({"op": op, "shape": {**shape, **extra}, "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dt],
                        "loss": loss})
    return out


def start_model(s: Session, cases: list[dict], tmp: Path):
    """The model in a subprocess (kernels compiled for sm_90: ``TRITON_INTERPRET=0``); None when
    Triton's ptxas is not installed."""
    from kernelssl.triton.offline import tools_available

    if not tools_available():
        raise RuntimeError("Triton's bundled ptxas is not installed: no model")
    spec = tmp / "cases.json"
    spec.write_text(json.dumps(cases))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    log = open(tmp / "model.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "perf_model.py"), "--cases", str(spec),
                             "--json", str(s.out / "model.json")], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    return proc, log


def finish_model(s: Session, started, tmp: Path) -> dict:
    """Wait for the model (within the budget) and read its predictions: ``{(loss, shape key, dtype): case}``."""
    proc, log = started
    try:
        rc = proc.wait(timeout=max(1.0, min(MODEL_WAIT_S, s.left() - RESERVE_S)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError("the model did not finish in time: no predictions") from None
    finally:
        log.close()
    if rc != 0:
        raise RuntimeError(f"perf_model.py exited {rc}: {(tmp / 'model.log').read_text()[-1500:]}")
    data = json.loads((s.out / "model.json").read_text())
    cases = data["cases"]
    s.data["model"] = {"predicted": data.get("predicted"), "ceilings": data.get("ceilings"),
                       "errors": [c for c in cases if "error" in c]}
    return {(c["op"], _key(c["shape"]), c["dtype"]): c for c in cases if "error" not in c}


def _key(shape: dict) -> str:
    return json.dumps(shape, sort_keys=True)


def run_tests(s: Session, files, limit_s: float) -> dict:
    """pytest on ``files`` in a subprocess, ``-v`` streamed to ``tests.log``, killed after ``limit_s``; the
    counts from the log (complete even when it was killed: one line per test as it finishes)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # conftest.py sets it where there is no CUDA
    if s.dry_run:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "pytest", *files, "-v", "-p", "no:cacheprovider", "--durations=10", "-rfE"]
    killed = False
    with open(s.out / "tests.log", "w") as log:
        log.write("$ " + " ".join(cmd) + f"\n(limit {limit_s:.0f} s)\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc, killed = proc.wait(), True
            log.write(f"\n!!! killed after {limit_s:.0f} s (time guard)\n")
    text = (s.out / "tests.log").read_text()
    counts = {k: 0 for k in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")}
    failed = []
    for line in text.splitlines():
        if "::" in line and not line.startswith(("FAILED ", "ERROR ")):
            for k in counts:
                if f" {k}" in line:
                    counts[k] += 1
                    if k in ("FAILED", "ERROR"):
                        failed.append(line.split(" ")[0])
                    break
    return {"returncode": rc, "killed_by_time_guard": killed, "limit_s": limit_s, "args": list(files),
            **{k.lower(): v for k, v in counts.items()}, "failed_tests": failed[:50],
            "summary": next((ln for ln in reversed(text.splitlines()) if ln.startswith("=")), "")}


def headline(s: Session, device, shapes: dict, compile_kwargs: dict, timing: dict, models: dict) -> None:
    """The headline rows: each loss, fp32 and bf16, :data:`IMPLS`, one case at a time within the budget."""
    from kernelssl.bench import cases as C
    from kernelssl.bench import runner as R

    for loss, shape in shapes.items():
        impls = None
        for dt in DTYPES:
            label = f"headline {loss} {dt}"
            need = timing["case_s"]
            if impls is None:  # built once per loss: the compiled form keeps its graphs across dtypes
                impls = s.step(f"build {loss}", lambda: C.implementations(loss, shape, device=device, names=IMPLS,
                                                                          compile_kwargs=compile_kwargs), need_s=need)
                if impls is None:
                    status = s.data["steps"][f"build {loss}"]["status"]
                    s.data["rows"].extend({"loss": loss, "dtype": d, "shape": shape, "impl": n, "case": "headline",
                                           "status": status} for d in DTYPES for n in IMPLS)
                    break

            def one(loss=loss, dt=dt, shape=shape, impls=impls):
                rows = R.time_case(loss, dt, IMPLS, impls, shape, device, warmup=timing["warmup"],
                                   repeats=timing["repeats"], budget_s=timing["budget_s"])
                _predictions(rows, loss, shape, dt, models)
                return rows

            rows = s.step(label, one, need_s=need)
            if rows is None:
                status = s.data["steps"][label]["status"]
                rows = [{"loss": loss, "dtype": dt, "shape": shape, "impl": n, "status": status} for n in IMPLS]
            s.data["rows"].extend({**r, "case": "headline"} for r in rows)
            s.write()
        del impls


def _predictions(rows: list[dict], loss: str, shape: dict, dt: str, models: dict) -> None:
    """The model's prediction beside each row: the fused path beside ``triton``, its price of the eager
    form beside ``eager``, the limit beside ``limit`` (none for the compiled form: not modelled)."""
    op, extra = MODEL_OP[loss]
    case = models.get((op, _key({**_model_shape(op, shape), **extra}), {"fp32": "float32", "bf16": "bfloat16"}[dt]))
    field = {"triton": "predicted_ms", "eager": "eager_ms", "limit": "limit_ms"}
    for r in rows:
        r["predicted_ms"] = case[field[r["impl"]]] if case and r["impl"] in field else None
        if case and r.get("median_ms") and r["predicted_ms"]:
            r["measured_over_predicted"] = r["median_ms"] / r["predicted_ms"]


def _model_shape(op: str, shape: dict) -> dict:
    """``shape`` completed as the model completes it (its PAPER keys), for the lookup."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("perf_model_shapes", ROOT / "benchmarks" / "perf_model.py")
    if not hasattr(_model_shape, "paper"):
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _model_shape.paper = mod.PAPER
    return {**_model_shape.paper[op], **shape}


def big_sfrik(s: Session, device, shape: dict, timing: dict, models: dict) -> None:
    """SFRIK at ``shape`` (n = 131072 on the GPU): the fused kernel alone, fp32 and bf16."""
    from kernelssl.bench import cases as C
    from kernelssl.bench import runner as R

    impls = C.implementations("sfrik", shape, device=device, names=("triton",))
    why = f"not run: its n x n Gram is {shape['n'] ** 2 * 4 / 2**30:.0f} GiB in fp32"
    for dt in DTYPES:
        label = f"sfrik n={shape['n']} {dt}"

        def one(dt=dt):
            rows = R.time_case("sfrik", dt, ("triton",), impls, shape, device, warmup=0, repeats=timing["repeats"],
                               budget_s=timing["budget_s"])
            _predictions(rows, "sfrik", shape, dt, models)
            return rows

        rows = s.step(label, one, need_s=timing["big_s"])
        if rows is None:
            rows = [{"loss": "sfrik", "dtype": dt, "shape": shape, "impl": "triton",
                     "status": s.data["steps"][label]["status"]}]
        rows += [{"loss": "sfrik", "dtype": dt, "shape": shape, "impl": n, "status": "not-run", "message": why}
                 for n in ("eager", "limit")]
        s.data["rows"].extend({**r, "case": "big-sfrik"} for r in rows)
        s.write()


def cka_case(s: Session, device, shape: dict) -> dict:
    """The exact Gaussian CKA of ``n`` rows (``dx`` against ``dy`` features): first call, repeats, peak memory."""
    import importlib.util

    import torch

    from kernelssl.bench import measure as Ms

    if importlib.util.find_spec("kernelssl.metrics") is None:
        return {"status": "not available", "message": "kernelssl.metrics does not exist in this checkout"}
    from kernelssl import metrics

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape["n"], shape["dx"], generator=g).to(device)
    y = (x[:, : shape["dy"]] + 0.5 * torch.randn(shape["n"], shape["dy"], generator=g).to(device)).contiguous()
    sigma = float(shape["dx"]) ** 0.5  # a fixed bandwidth: the timing is of the kernel sum, not of a median
    call = lambda: metrics.cka(x, y, kernel="gaussian", sigma=sigma, exact=True)
    first, value = Ms.wall(call, device)
    times = Ms.interleaved({"cka": call}, device, repeats=3, min_repeats=1, budget_s=1.0)["cka"]
    peak = Ms.peak_extra_bytes(call, device)
    out = {"status": "ok", "shape": shape, "sigma": sigma, "value": float(value), "first_call_s": first,
           "median_ms": Ms.median(times) * 1e3, "repeats": len(times),
           "peak_extra_mb": None if peak is None else peak / 2**20}
    from kernelssl import dispatch

    out["implementation"] = dispatch.implementation("gram_hsic", "auto", x, y)
    if out["implementation"] == "triton":  # the torch tier (cuBLAS tiles) beside the fused kernels, once
        torch_s, torch_value = Ms.wall(lambda: metrics.cka(x, y, kernel="gaussian", sigma=sigma, backend="torch"),
                                       device)
        out.update(torch_tier_s=torch_s, torch_tier_value=float(torch_value))
    return out


def plot(s: Session) -> str:
    """``speedup.png``: eager / fused and eager-compiled / fused per headline case (matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    by = {}
    for r in s.data["rows"]:
        if r.get("case") == "headline" and r.get("median_ms"):
            by.setdefault((r["loss"], r["dtype"]), {})[r["impl"]] = r["median_ms"]
    labels = [f"{loss}\n{dt}" for (loss, dt), v in by.items() if "triton" in v]
    if not labels:
        return "no timed fused rows: no plot"
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(labels))
    for peer, off in (("eager", -0.2), ("eager-compiled", 0.2)):
        ys = [v.get(peer, float("nan")) / v["triton"] for v in by.values() if "triton" in v]
        ax.bar([x + off for x in xs], ys, width=0.4, label=f"{peer} / kernelssl")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("speed-up (forward + backward)")
    ax.set_title(f"{s.data.get('env', {}).get('device', '?')}" + (" (dry run, CPU)" if s.dry_run else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(s.out / "speedup.png", dpi=110)
    plt.close(fig)
    return "speedup.png"


# ==================================================================================================
# the report
# ==================================================================================================


def _f(x, fmt=".3f") -> str:
    return "—" if x is None else format(x, fmt)


def markdown(d: dict) -> str:
    env = d.get("env", {})
    lines = [f"# GPU session{' (DRY RUN on the CPU: tiny shapes, the Triton interpreter)' if d['dry_run'] else ''}",
             "", f"device: {env.get('device', '?')} (capability {env.get('capability', '—')}, "
             f"{env.get('sms', '—')} SMs, {env.get('memory_gib', '—')} GiB); torch {env.get('torch', '?')}, "
             f"triton {env.get('triton', '?')}, python {env.get('python', '?')}; commit {env.get('git_commit', '?')}",
             f"started {d['started']}, {d.get('elapsed_s', 0):.0f} s of a {d['budget_s']:.0f} s budget", "",
             "## Steps", "", "| step | status | seconds |", "| --- | --- | --- |"]
    for name, st in d["steps"].items():
        status = st.get("status", "?") + (f": {st['error'][:200]}" if "error" in st else "")
        lines.append(f"| {name} | {status.replace('|', '/')} | {st.get('seconds', '—')} |")
    t = d.get("tests")
    if t:
        lines += ["", "## GPU tests", "", f"{t['passed']} passed, {t['failed']} failed, {t['error']} errors, "
                  f"{t['skipped']} skipped (pytest exit {t['returncode']}"
                  f"{', killed by the time guard' if t['killed_by_time_guard'] else ''}); log: tests.log"]
        lines += [f"- FAILED {x}" for x in t["failed_tests"]]
    lines += ["", "## Forward + backward (ms; predicted: the static model, docs/perf-model.md)", "",
              "| case | loss | shape | dtype | impl | status | median ms | predicted ms | measured / predicted |"
              " peak extra MB | value rel. err |", "| " + " | ".join(["---"] * 11) + " |"]
    for r in d["rows"]:
        shape = ",".join(f"{k}={v}" for k, v in (r.get("shape") or {}).items())
        status = r.get("status", "?") + (f" ({r['message'][:80]})" if r.get("message") else "")
        lines.append(f"| {r.get('case')} | {r['loss']} | {shape} | {r['dtype']} | {r['impl']} | "
                     f"{status.replace('|', '/')} | {_f(r.get('median_ms'))} | {_f(r.get('predicted_ms'))} | "
                     f"{_f(r.get('measured_over_predicted'), '.2f')} | {_f(r.get('peak_extra_mb'), '.1f')} | "
                     f"{_f(r.get('value_rel_err'), '.1e')} |")
    cka = d.get("cka")
    if cka:
        lines += ["", "## Exact Gaussian CKA", "", json.dumps(cka)]
    return "\n".join(lines) + "\n"


# ==================================================================================================
# the run
# ==================================================================================================


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--budget-s", type=float, default=480.0, help="seconds for the whole run (default 480)")
    p.add_argument("--tests-s", type=float, default=150.0, help="at most this many seconds of GPU tests")
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny shapes (interpreter)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.dry_run:  # before any Triton module is imported: the kernels run through the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    import torch

    from kernelssl.bench import cases as C

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    s = Session(out, a.budget_s, a.dry_run)
    s.write()
    if not a.dry_run and not torch.cuda.is_available():
        s.data["steps"]["device"] = {"status": "error", "error": "no CUDA device (use --dry-run on a CPU)"}
        s.write()
        return 1
    device = torch.device("cpu") if a.dry_run else torch.device("cuda", torch.cuda.current_device())
    if a.dry_run:
        shapes = {loss: dict(DRY_SHAPES[loss]) for loss in C.LOSSES}
        big, cka_shape, tests = DRY_BIG_SFRIK, DRY_CKA_SHAPE, DRY_TESTS
        compile_kwargs = {"backend": "eager"}
        timing = {"warmup": 0, "repeats": 1, "budget_s": 0.0, "case_s": 1.0, "big_s": 1.0}
        modelled = model_cases({DRY_MODEL_LOSS: shapes[DRY_MODEL_LOSS]}, None)
    else:
        torch.cuda.set_device(device)
        shapes = {loss: dict(C.PAPER_SHAPES[loss]) for loss in C.LOSSES}
        big, cka_shape, tests = BIG_SFRIK, CKA_SHAPE, GPU_TESTS
        compile_kwargs = {}
        timing = {"warmup": 2, "repeats": 10, "budget_s": 0.5, "case_s": 15.0, "big_s": 40.0}
        modelled = model_cases(shapes, big)
    s.data["plan"] = {"shapes": shapes, "big_sfrik": big, "cka": cka_shape, "tests": list(tests),
                      "compile_kwargs": compile_kwargs, "timing": timing, "impls": list(IMPLS)}
    s.data["env"] = s.step("device", lambda: device_and_stack(device))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = s.step("model start", lambda: start_model(s, modelled, tmp))
        s.data["tests"] = s.step("tests", lambda: run_tests(s, tests, max(1.0, min(a.tests_s, s.left() - 60.0))),
                                 need_s=1.0)
        models = (s.step("model", lambda: finish_model(s, started, tmp)) if started else None) or {}
        if started and started[0].poll() is None:  # skipped by the guard: not left running
            started[0].kill()
            started[0].wait()
        headline(s, device, shapes, compile_kwargs, timing, models)
        s.step("big sfrik", lambda: big_sfrik(s, device, big, timing, models), need_s=timing["big_s"])
        s.data["cka"] = s.step("cka", lambda: cka_case(s, device, cka_shape), need_s=timing["case_s"])
        s.step("plot", lambda: plot(s), need_s=0.0)
    s.data["finished"] = True
    s.write()
    print(f"wrote {', '.join(s.data['files'])} to {out} in {s.data['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
