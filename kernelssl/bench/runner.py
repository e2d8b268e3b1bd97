"""The benchmark run: correctness first, then time and peak memory, every implementation side by side.

:func:`run` is what ``python -m kernelssl.bench`` calls; it returns the results as a dict (the JSON
written by :mod:`kernelssl.bench.report`).  Cases come from :mod:`kernelssl.bench.cases` (the same ones
``pytest benchmarks/`` runs); the shapes per device are :func:`plan_shapes`, from that module's tables.
How to read the results: docs/benchmarks.md.

Per loss and dtype:

1. **Correctness** at a small case: every implementation's loss and input gradients (upstream
   gradient 0.73, not 1) against the float64 torch path, with the tolerances of
   :mod:`kernelssl.numerics` (docs/numerics.md): :data:`FP32_TOL`; for bf16/fp16 and TF32 the error
   must be at most 2x the torch path's error in the same precision, or under a stated floor
   (:func:`_low_precision_verdict`).  An implementation that fails is reported loudly and not timed.
2. **Timing** at each shape of the batch-size sweep (the target shape among them): the first call
   (compile, JIT, autotune; its time is kept as ``first_call_s``), warm-up, then forward+backward
   repeats, interleaved across the implementations (median; CUDA events on a GPU), then the peak
   extra memory of one call (:mod:`kernelssl.bench.measure`, the timing harness).  Each timed loss
   value is also checked against the float64 torch path on the same inputs (``value_rel_err``), so
   a compiled graph that goes wrong at a new shape cannot hide.  Out of memory is a row with
   ``status="oom"`` and the run goes on; so is a ``torch.compile`` failure (``"compile-failed"``) or
   any other error (``"error"``).  On the CPU, where an out-of-memory kills the process instead of
   raising, a case whose predicted peak exceeds a share of the available memory is not tried:
   ``status="predicted-oom"``, the prediction in its message
   (:func:`kernelssl.bench.cases.predicted_oom`; the uniformity's pdist form).

Each implementation is built once per loss, so a ``torch.compile`` row keeps its graphs from the
correctness case through the sweep; it compiles with torch's defaults (a static graph for the first
shape, then, by automatic dynamic shapes, another for the other batch sizes; some losses specialise
on the batch size and recompile more).  ``first_call_s`` of a compiled row includes its compile
time.  Under ``--quick`` the compiled rows are checked and timed at the target shape only, in the
first dtype only: compiling dominates a short run on a small CPU.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..numerics import FP32_TOL, GRAD_FLOOR, LOSS_FLOOR_ULPS, VALUE_ATOL, VALUE_RTOL, bound_2x
from . import cases as C
from . import measure as Ms

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Tolerances and the 2x rule: kernelssl.numerics (one definition for the tests, this bench, the long run).
UPSTREAM = 0.73  # a non-unit upstream gradient

IMPLS = ("eager", "eager-compiled", "kernelssl", "kernelssl-compiled", "torch", "compile",
         *(f"triton-{p}" for p in C.PRECISIONS), "limit")


@dataclass
class Config:
    losses: tuple[str, ...] = C.LOSSES
    dtypes: tuple[str, ...] | None = None  # None: fp32 on CPU, fp32 + bf16 on a GPU
    device: str | None = None  # None: cuda if available
    quick: bool = False
    smoke: bool = False  # tiny shapes (tests)
    compile: bool = True  # False drops the torch.compile rows
    impls: tuple[str, ...] | None = None  # None: all for the device (see default_impls)
    extra: dict[str, Callable] = field(default_factory=dict)  # name -> factory(loss, shape, device)
    repeats: int | None = None
    progress: bool = True


def default_impls(device: torch.device, *, quick: bool, compile: bool) -> tuple[str, ...]:
    """Rows per device.  CPU: the library's default call is the torch path, so no separate torch or
    Triton rows.  GPU: the default call (Triton), the torch path, each Triton precision; the compiled
    torch path only outside ``--quick`` (one more compile per loss)."""
    names = ["eager", "eager-compiled", "kernelssl", "kernelssl-compiled"]
    if device.type == "cuda":
        names += ["torch"] + ([] if quick else ["compile"]) + [f"triton-{p}" for p in C.PRECISIONS]
    names.append("limit")
    if not compile:
        names = [n for n in names if not C.is_compiled(n)]
    return tuple(names)


def plan_shapes(loss: str, device: torch.device, *, quick: bool, smoke: bool) -> tuple[dict, dict, list[dict]]:
    """``(check_shape, target_shape, sweep_shapes)`` (from :mod:`kernelssl.bench.cases`'s tables); the
    target is one of the sweep's shapes."""
    key = C.BATCH_KEY[loss]
    if smoke:
        target, batches = C.SMOKE_SHAPES[loss]
    else:
        kind = "cuda" if device.type == "cuda" else "cpu"
        target = C.TARGET_SHAPES[kind][loss]
        full, reduced = C.BATCH_SWEEPS[kind][loss]
        batches = reduced if quick else full
        if quick and device.type != "cuda":  # CPU --quick: the largest reduced batch is the target
            target = {**target, key: max(batches)}
    sweep = [{**target, key: b} for b in sorted(set(batches) | {target[key]})]
    if quick and not smoke:
        # --quick: the correctness case is the sweep's smallest shape (one shape less to run)
        return sweep[0], target, sweep
    check = {**target, key: (C.SMOKE_CHECK_BATCH if smoke else C.CHECK_BATCH)[loss]}
    return check, target, sweep


def shape_str(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


# --------------------------------------------------------------------------------------------------
# building implementations


def _build(loss: str, names: tuple[str, ...], shape: dict, device: torch.device, extra: dict,
           compile_kwargs: dict | None = None) -> dict:
    impls = C.implementations(loss, shape, device=device, names=tuple(n for n in names if n not in extra),
                              compile_kwargs=compile_kwargs)
    for n in names:
        if n in extra:
            impls[n] = extra[n](loss, shape, device)
    return {n: impls[n] for n in names if n in impls}


def _precision_of(name: str) -> str | None:
    return name[len("triton-"):] if name.startswith("triton-") else None


def _is_compile_error(exc: BaseException) -> bool:
    mod = type(exc).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "CppCompileError" in type(exc).__name__


def _oom_types() -> tuple[type, ...]:
    return (torch.cuda.OutOfMemoryError, MemoryError)


def _grads_of(inputs) -> list[torch.Tensor]:
    return [x.grad.detach().double() for x in inputs if x.requires_grad]


def _run_once(fn, inputs, *, tf32: bool = False):
    """``(loss float64 0-dim, [input grads as float64])`` with a non-unit upstream gradient."""
    for x in inputs:
        x.grad = None
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32 or prev
    try:
        out = fn(*inputs)
        out.backward(torch.full_like(out, UPSTREAM))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return out.detach().double(), _grads_of(inputs)


# --------------------------------------------------------------------------------------------------
# correctness


def _fp32_verdict(loss_val, grads, ref_loss, ref_grads) -> dict:
    t = FP32_TOL
    loss_err = float((loss_val - ref_loss).abs())
    loss_tol = t["loss_rtol"] * float(ref_loss.abs()) + t["loss_atol"]
    ok = loss_err <= loss_tol
    worst = 0.0  # max over gradients of max(|err| / (rtol |ref| + atol_rel max|ref|))
    grad_err = 0.0
    for g, r in zip(grads, ref_grads):
        scale = float(r.abs().max())
        err = (g - r).abs()
        tol = t["grad_rtol"] * r.abs() + t["grad_atol_rel"] * scale
        worst = max(worst, float((err / tol.clamp_min(1e-300)).max()))
        grad_err = max(grad_err, float(err.max()) / max(scale, 1e-300))
    ok = ok and worst <= 1.0 and all(torch.isfinite(g).all() for g in grads)
    return {
        "verdict": "pass" if ok else "FAIL", "rule": "fp32: |err| <= rtol |ref| + atol (loss); "
        "rtol |ref| + atol_rel max|ref| (gradients)", "tolerance": dict(t),
        "loss_err": loss_err, "loss_tol": loss_tol, "grad_rel_err": grad_err, "grad_tol_used": worst,
    }


def _low_precision_verdict(loss_val, grads, ref_loss, ref_grads, torch_loss, torch_grads, fmt: str) -> dict:
    """The 2x rule (:mod:`kernelssl.numerics`): error <= max(2 x the torch tier's error in the same
    precision, floor)."""
    loss_err = float((loss_val - ref_loss).abs())
    loss_bound = bound_2x(float((torch_loss - ref_loss).abs()), LOSS_FLOOR_ULPS * float(ref_loss.abs()))
    ok = loss_err <= loss_bound
    grad_err, grad_bound = 0.0, 0.0
    for g, r, tg in zip(grads, ref_grads, torch_grads):
        scale = float(r.abs().max())
        e = float((g - r).abs().max())
        b = bound_2x(float((tg - r).abs().max()), GRAD_FLOOR[fmt] * scale)
        ok = ok and e <= b and bool(torch.isfinite(g).all())
        if scale > 0 and e / scale >= grad_err:
            grad_err, grad_bound = e / scale, b / scale
    return {
        "verdict": "pass" if ok else "FAIL",
        "rule": f"{fmt}: |err| <= max(2 x torch path's |err| in {fmt}, floor) (loss and each gradient, max abs)",
        "tolerance": {"loss_floor_rel": LOSS_FLOOR_ULPS, "grad_floor_rel": GRAD_FLOOR[fmt]},
        "loss_err": loss_err, "loss_tol": loss_bound, "grad_rel_err": grad_err, "grad_rel_tol": grad_bound,
    }


def check_correctness(loss: str, dtype_name: str, names: tuple[str, ...], impls: dict, shape: dict,
                      device: torch.device, tick: Callable[[str], None] = lambda s: None) -> dict[str, dict]:
    """``{impl: verdict dict}`` at the small case ``shape`` (``impls``: name -> fn)."""
    dtype = DTYPES[dtype_name]
    ref_impl = _build(loss, ("torch",), shape, device, {})["torch"]
    x64 = C.make_inputs(loss, shape, device=device, dtype=torch.float64)
    ref_loss, ref_grads = _run_once(ref_impl, x64)
    torch_err: dict[str, tuple] = {}

    def torch_path_in(fmt: str):  # the torch path's result in the same precision (bf16/fp16 or TF32)
        if fmt not in torch_err:
            xs = C.make_inputs(loss, shape, device=device, dtype=dtype)
            torch_err[fmt] = _run_once(ref_impl, xs, tf32=fmt == "tf32")
        return torch_err[fmt]

    out: dict[str, dict] = {}
    for name in names:
        tick(f"{loss} {dtype_name} check {name}")
        if name == "limit":
            out[name] = {"verdict": "n/a", "message": "not a loss: the essential matrix products alone"}
            continue
        prec = _precision_of(name)
        if prec is not None and dtype_name != "fp32":
            out[name] = {"verdict": "skipped", "message": "input_precision applies to fp32 inputs only"}
            continue
        status, message, res = "pass", None, None
        try:
            xs = C.make_inputs(loss, shape, device=device, dtype=dtype)
            t0 = time.perf_counter()
            res = _run_once(impls[name], xs)
            first = time.perf_counter() - t0
        except _oom_types():
            status, message = "oom", "out of memory at the correctness case"
        except Exception as exc:
            status = "compile-failed" if C.is_compiled(name) and _is_compile_error(exc) else "error"
            message = _short(exc)
        if res is None:
            xs = None
            Ms.free_gpu_memory()
            out[name] = {"verdict": status, "message": message}
            continue
        loss_val, grads = res
        if dtype_name != "fp32":
            v = _low_precision_verdict(loss_val, grads, ref_loss, ref_grads, *torch_path_in(dtype_name), dtype_name)
        elif prec == "tf32":
            v = _low_precision_verdict(loss_val, grads, ref_loss, ref_grads, *torch_path_in("tf32"), "tf32")
        else:
            v = _fp32_verdict(loss_val, grads, ref_loss, ref_grads)
        v["first_call_s"] = first
        out[name] = v
    return out


def _short(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


# --------------------------------------------------------------------------------------------------
# timing


def _value_reference(loss: str, inputs, shape: dict, device: torch.device) -> float:
    """The loss in float64 by the torch path on the same (already rounded) inputs, no gradient."""
    fn = _build(loss, ("torch",), shape, device, {})["torch"]
    with torch.no_grad():
        return float(fn(*(x.detach().double() for x in inputs)))


def time_case(loss: str, dtype_name: str, names: tuple[str, ...], impls: dict, shape: dict,
              device: torch.device, *, warmup: int, repeats: int, budget_s: float,
              tick: Callable[[str], None] = lambda s: None) -> list[dict]:
    """One row per implementation at ``shape``: time, peak memory, value check, or why not.

    Each implementation's first call (compile, JIT) and value check, then warm-up; then the timed
    repeats **interleaved** (:func:`kernelssl.bench.measure.interleaved`: one call of each
    implementation per round, so a change in the machine's load hits all rows alike), until
    ``repeats`` rounds, or at least 3 rounds and ``budget_s`` seconds per implementation; then each
    one's peak extra memory.  The case's inputs are gone when the cache is emptied at the end."""
    rows = _time_rows(loss, dtype_name, names, impls, shape, device, warmup=warmup, repeats=repeats,
                      budget_s=budget_s, tick=tick)
    Ms.free_gpu_memory()
    return rows


def _time_rows(loss: str, dtype_name: str, names: tuple[str, ...], impls: dict, shape: dict,
               device: torch.device, *, warmup: int, repeats: int, budget_s: float,
               tick: Callable[[str], None]) -> list[dict]:
    dtype = DTYPES[dtype_name]
    rows = []
    base = {"loss": loss, "dtype": dtype_name, "shape": dict(shape), "shape_str": shape_str(shape),
            "batch": shape[C.BATCH_KEY[loss]]}
    inputs = C.make_inputs(loss, shape, device=device, dtype=dtype)
    ref = None
    steps: dict[str, Callable] = {}
    by_name: dict[str, dict] = {}

    def fail(name, exc_status, message):
        # called outside the except block: its traceback held the failed call's tensors
        steps.pop(name, None)
        for x in inputs:
            x.grad = None
        Ms.free_gpu_memory()
        by_name[name].update(status=exc_status, message=message)

    def guarded(name, action):
        """``action()``; an OOM or error becomes the row's status (the run goes on) and None."""
        status = message = None
        try:
            return action()
        except _oom_types():
            status, message = "oom", "out of memory"
        except Exception as exc:
            status = "compile-failed" if C.is_compiled(name) and _is_compile_error(exc) else "error"
            message = _short(exc)
        fail(name, status, message)
        return None

    for name in names:  # first call, value check, warm-up
        tick(f"{loss} {dtype_name} {shape_str(shape)} {name}")
        row = {**base, "impl": name, "status": "ok"}
        rows.append(row)
        by_name[name] = row
        fn = impls.get(name)
        if fn is None:
            row.update(status="skipped", message="not timed (see its correctness verdict)")
            continue
        why = C.predicted_oom(loss, name, shape, dtype=dtype, device=device)
        if why is not None:  # a host OOM would kill the run instead of raising: not tried
            row.update(status="predicted-oom", message=why)
            continue
        is_loss = name != "limit"
        step = (lambda fn=fn: C.forward_backward(fn, inputs)) if is_loss else (lambda fn=fn: fn(*inputs))
        steps[name] = step
        out = guarded(name, lambda step=step: Ms.wall(step, device))
        if out is None:
            continue
        row["first_call_s"], value = out
        if is_loss:
            if ref is None:
                ref = _value_reference(loss, inputs, shape, device)
            v = float(value)
            row["loss_value"] = v
            row["value_rel_err"] = abs(v - ref) / max(abs(ref), 1e-30)
            rtol = VALUE_RTOL["tf32" if _precision_of(name) == "tf32" else "default"]
            if not abs(v - ref) <= rtol * abs(ref) + VALUE_ATOL:
                steps.pop(name)
                row.update(status="value-mismatch",
                           message=f"loss {v!r} vs float64 {ref!r} at this shape (rtol {rtol})")
                continue

        def warm(step=step):
            Ms.warm_up(step, device, warmup)
            return True

        guarded(name, warm)

    times = Ms.interleaved(steps, device, repeats=repeats, min_repeats=3, budget_s=budget_s, guard=guarded)
    for name in list(steps):
        ts = times[name]
        by_name[name].update(median_ms=Ms.median(ts) * 1e3, min_ms=min(ts) * 1e3, repeats=len(ts))
        if name == "limit" and getattr(impls[name], "chosen", None):  # which products were the fastest
            by_name[name]["limit_impl"] = impls[name].chosen
        peak = guarded(name, lambda: Ms.peak_extra_bytes(steps[name], device))
        if name in steps:
            by_name[name]["peak_extra_mb"] = None if peak is None else peak / 2**20
    for row in rows:
        if row.get("message", "") is None:
            del row["message"]
    return rows


# --------------------------------------------------------------------------------------------------
# the whole run


def environment(device: torch.device) -> dict:
    env = {
        "device": Ms.device_name(device),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "kernelssl": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    env["git_commit"] = _git_commit()
    return env


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run(cfg: Config) -> dict:
    """Run the benchmark; returns ``{"env", "config", "checks", "rows", "wall_s"}``."""
    t_start = time.perf_counter()
    load_start = _loadavg()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: expected cpu (no CUDA device is available here), got {cfg.device!r}")
        if device.index is None:  # set_device refuses a device without an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # CUDA events and peak memory are per current device
    dtypes = cfg.dtypes or (("fp32", "bf16") if device.type == "cuda" else ("fp32",))
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"--dtype: expected some of {tuple(DTYPES)}, got {d!r}")
    for n in cfg.impls or ():
        if n not in IMPLS and n not in cfg.extra:
            raise ValueError(f"--impl: expected some of {IMPLS}, got {n!r}")
    names = cfg.impls or default_impls(device, quick=cfg.quick, compile=cfg.compile)
    names = tuple(names) + tuple(n for n in cfg.extra if n not in names)
    if cfg.smoke:
        warmup, repeats, budget = 1, cfg.repeats or 2, 0.2
    elif device.type == "cuda":
        warmup, repeats, budget = 2, cfg.repeats or (10 if cfg.quick else 25), 1.0 if cfg.quick else 3.0
    else:
        warmup, repeats, budget = 1, cfg.repeats or (3 if cfg.quick else 5), 1.0 if cfg.quick else 3.0

    # --quick (and --smoke): the torch.compile rows are checked and timed at the target shape only,
    # in the first dtype only -- each new shape or dtype costs a compile (10-60 s on 2 CPU cores),
    # which would dominate the run.  Otherwise each compiled row is checked at the small case and
    # timed over the whole sweep, with torch.compile's defaults.
    reduced = cfg.quick or cfg.smoke
    plan = []  # (loss, dtype, [(names, check shape)], [(shape, names)], target)
    for loss in cfg.losses:
        if loss not in C.LOSSES:
            raise ValueError(f"--loss: expected some of {C.LOSSES}, got {loss!r}")
        check, target, sweep = plan_shapes(loss, device, quick=cfg.quick, smoke=cfg.smoke)
        for i, d in enumerate(dtypes):
            shapes = sweep if i == 0 else [target]
            plain = tuple(n for n in names if not C.is_compiled(n))
            comp = tuple(n for n in names if C.is_compiled(n)) if (i == 0 or not reduced) else ()
            if reduced:
                checks_at = [(plain, check), (comp, target)]
                timing = [(sh, names if sh == target else plain) for sh in shapes]
            else:
                checks_at = [(plain + comp, check)]
                timing = [(sh, plain + comp) for sh in shapes]
            timing = [(sh, tuple(n for n in names if n in ns)) for sh, ns in timing]  # the rows' order
            plan.append((loss, d, checks_at, timing, target))
    total = sum(sum(len(ns) for ns, _ in ca) + sum(len(ns) for _, ns in tm) for _, _, ca, tm, _ in plan)
    bar = _progress(total, cfg.progress)
    tick = _ticker(bar)

    checks, rows = [], []
    built: dict[str, dict] = {}
    for loss, dname, checks_at, timing, target in plan:
        if loss not in built:  # once per loss: a compiled row keeps its graphs across shapes and dtypes
            built = {loss: _build(loss, names, target, device, cfg.extra)}
        impls = built[loss]
        verdicts: dict[str, dict] = {}
        for ns, shape in checks_at:
            for name, v in check_correctness(loss, dname, ns, impls, shape, device, tick).items():
                verdicts[name] = v
                checks.append({"loss": loss, "dtype": dname, "impl": name, "shape": dict(shape),
                               "shape_str": shape_str(shape), **v})
                if v["verdict"] == "FAIL":
                    _loud(f"{loss} {dname}: implementation {name!r} is WRONG at {shape_str(shape)} "
                          f"(loss err {v['loss_err']:.3g} > {v['loss_tol']:.3g} or gradient err "
                          f"{v['grad_rel_err']:.3g} of max|grad|) -- it is not timed", bar)
                elif v["verdict"] in ("error", "oom"):
                    _loud(f"{loss} {dname}: implementation {name!r} failed its correctness case: "
                          f"{v.get('message')}", bar)
        timed = {n: f for n, f in impls.items() if n in verdicts and verdicts[n]["verdict"] in ("pass", "n/a")}
        for shape, ns in timing:
            here = tuple(n for n in ns if verdicts[n]["verdict"] != "skipped")  # e.g. precisions of bf16
            for _ in range(len(ns) - len(here)):
                tick("")
            case_rows = time_case(loss, dname, here, timed, shape, device, warmup=warmup, repeats=repeats,
                                  budget_s=budget, tick=tick)
            for r in case_rows:
                r["target"] = shape == target
                if r["impl"] == "kernelssl" or r["impl"] == "kernelssl-compiled":
                    r["backend"] = C.default_backend(loss, device)
                if r["status"] == "value-mismatch":
                    _loud(f"{loss} {dname} {r['shape_str']}: {r['impl']!r}: {r['message']}", bar)
            rows.extend(case_rows)
        del impls, timed
        Ms.free_gpu_memory()
    if bar is not None:
        bar.update(bar.total - bar.n)
        bar.close()
    env = environment(device)
    env["loadavg_1min"] = {"start": load_start, "end": _loadavg()}  # other jobs on the machine
    return {
        "env": env,
        "config": {"losses": list(cfg.losses), "dtypes": list(dtypes), "quick": cfg.quick, "smoke": cfg.smoke,
                   "implementations": list(names), "compiled_rows": "target shape, first dtype" if reduced
                   else "every shape and dtype", "warmup": warmup, "repeats": repeats, "budget_s": budget,
                   "fp32_tolerance": FP32_TOL, "value_rtol": VALUE_RTOL, "upstream_gradient": UPSTREAM},
        "checks": checks,
        "rows": rows,
        "wall_s": time.perf_counter() - t_start,
    }


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an install requirement; a bare environment still runs
        return None
    return tqdm(total=total, desc="kernelssl.bench", unit="step", dynamic_ncols=True)


def _ticker(bar):
    """``tick(desc)``: the previous step is done, ``desc`` starts (shown while it runs)."""
    started = [False]

    def tick(desc: str) -> None:
        if bar is None:
            return
        if started[0]:
            bar.update(1)
        started[0] = True
        bar.set_postfix_str(desc[:60], refresh=True)

    return tick


def _loud(msg: str, bar) -> None:
    line = f"!!! {msg}"
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def any_wrong(result: dict) -> bool:
    """Whether an implementation failed its correctness check or a timed value check."""
    return any(c["verdict"] == "FAIL" for c in result["checks"]) or any(
        r["status"] == "value-mismatch" for r in result["rows"])
