"""Static performance model of the fused kernels and of the eager form on an H200 -- PREDICTED, never
measured (docs/perf-model.md).  Nothing here runs on a GPU; it is the tool to tune with until one is
lent, and afterwards the column that measured times go next to.

Usage, from the repository root::

    PYTHONPATH=. python benchmarks/perf_model.py [--json PATH] [--headline] [--op OP ...]

(run it with ``TRITON_INTERPRET`` unset or 0: the kernels are compiled for sm_90, not interpreted.)

This file records which launches one forward + backward issues, per op (rff_hsic = SSL-HSIC,
legendre_gram = SFRIK, taylor_logdet = MEC, gaussian_gram = Wang & Isola's uniformity), shape and
input dtype (fp32, bf16); :mod:`kernelssl.bench.launch_costs` prices each launch (the H200 ceilings,
the kernels' work, occupancy, waves, time) and the op's limit.

1. **Launches of the fused path** -- recorded as ``tests/compile_targets.py`` records them
   (:mod:`kernelssl.triton.offline`: a recorder in place of the op module's ``wrap_triton``, the
   real GPU launchers called on empty CPU tensors; nothing runs), with the arguments the public entry
   point passes: the forward op's arguments are captured from a call of the public function
   (``rff_hsic``, ``legendre_gram_mean``, ``taylor_logdet``, ``gaussian_gram_logmean``) under a
   dispatch mode, so the precision is the public default, whatever it is on this branch.  torch ops
   the launchers issue themselves (e.g. a split-K sum) are recorded too.  Each Triton launch is
   compiled for sm_90 by :func:`kernelssl.triton.offline.compile_all` (Triton's own specialisation of
   the launch, its compiler and bundled ptxas: registers, shared memory, warps; one compile per
   distinct specialisation).
2. **Eager form** (the function :mod:`kernelssl.bench.cases` times as "eager": ``rff_hsic_eager``,
   ``legendre_gram_mean_eager`` per view, ``taylor_logdet_eager``, Wang & Isola's pdist form per
   view), run on ``meta`` tensors under a dispatch mode that records every aten op of forward and
   autograd backward (one op ~ one launch): matmuls at the fp32 FMA rate (the eager form computes
   half inputs in fp32, and torch's default keeps fp32 matmuls off TF32), everything else
   bytes-bound; wave efficiency 1 (library kernels).

Shapes (:data:`kernelssl.bench.cases.PAPER_SHAPES`, and points of the op benchmarks' sweeps,
:data:`kernelssl.bench.cases.OP_SWEEPS`): SSL-HSIC K = 4, B = 4096 (N = 16384), d = 256, D = 512;
SFRIK n = 2048 per view, q = 8192, L = 3, two views (two calls); uniformity n = 4096 per view,
q = 128, two views stacked in one op call (as the loss makes it), and n = 65536 in the sweep; MEC
m = 1024, d = 2048, order 4, two directions stacked as a batch of 2 pairs, the first argument
(teacher) without grad.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from kernelssl.bench import cases as C
from kernelssl.bench import hardware as HW
from kernelssl.bench import launch_costs as LC

OPS = tuple(C.OPS.values())  # rff_hsic, legendre_gram, taylor_logdet, gaussian_gram
#: The papers' shapes per op, with what the op calls need beside them: SFRIK's L (the number of
#: Legendre coefficients) and its two views (one call each), MEC's order and its P = 2 directions,
#: the uniformity's two views (one call).
PAPER = {
    "rff_hsic": dict(C.PAPER_SHAPES["hsic"]),
    "legendre_gram": {**C.PAPER_SHAPES["sfrik"], "L": len(C.SFRIK_COEFFICIENTS), "views": 2},
    "taylor_logdet": {**C.PAPER_SHAPES["mec"], "order": C.MEC_ORDER, "P": 2},
    "gaussian_gram": {**C.PAPER_SHAPES["uniformity"], "views": 2},
}
DTYPES = ("float32", "bfloat16")
#: The sweep points priced besides the papers' shape, ``{op: {dimension: sizes}}``: points of the op
#: benchmarks' sweeps (:data:`kernelssl.bench.cases.OP_SWEEPS`; rff_hsic's N = K B, taylor_logdet's
#: n its order), a subset (each distinct launch compiles; SFRIK's largest n are left out: the
#: recording allocates (empty) CPU tensors of the real size); besides them the uniformity at q = 512.
MODEL_SWEEP = {
    "rff_hsic": {"N": (1024, 4096, 65536), "D": (128, 1024, 2048)},
    "legendre_gram": {"q": (16384, 32768), "n": (1024, 4096, 8192, 16384)},
    "gaussian_gram": {"n": (16384, 65536)},
    "taylor_logdet": {"m": (256, 512, 2048, 4096), "d": (128, 512, 4096), "n": (2, 3, 6, 8)},
}


def sweep(op: str) -> list[dict]:
    """The papers' shape first, then :data:`MODEL_SWEEP`'s points, one dimension at a time."""
    p, pts = PAPER[op], MODEL_SWEEP[op]
    if op == "rff_hsic":
        out = [{**p, "B": n // p["K"]} for n in pts["N"]] + [{**p, "D": D} for D in pts["D"]]
    elif op == "legendre_gram":
        out = [{**p, "q": q} for q in pts["q"]] + [{**p, "n": n} for n in pts["n"]]
    elif op == "gaussian_gram":  # one view per call
        out = [{**p, "n": n, "views": 1} for n in pts["n"]] + [{**p, "q": 512}]
    else:
        out = ([{**p, "m": m} for m in pts["m"]] + [{**p, "d": d} for d in pts["d"]]
               + [{**p, "order": n} for n in pts["n"]])
    return [p] + out


def _coefficients(s: dict) -> tuple[float, ...]:
    """SFRIK's Legendre coefficients b: the first ``s["L"]`` of the papers'
    (:data:`kernelssl.bench.cases.SFRIK_COEFFICIENTS`)."""
    return C.SFRIK_COEFFICIENTS[: s["L"]]


def shape_label(op: str, s: dict) -> str:
    if op == "rff_hsic":
        return f"N={s['K'] * s['B']} d={s['d']} D={s['D']}"
    if op == "legendre_gram":
        return f"n={s['n']} q={s['q']} L={s['L']} x{s['views']}"
    if op == "gaussian_gram":
        return f"n={s['n']} q={s['q']} x{s['views']}"
    return f"m={s['m']} d={s['d']} n={s['order']} P={s['P']}"


# ==================================================================================================
# recording: torch ops under a dispatch mode, the public entry's arguments
# ==================================================================================================


def _dispatch_recorder(sink: list):
    """A dispatch mode that appends the row (:func:`kernelssl.bench.launch_costs.torch_op_row`) of every
    aten op that launches work to ``sink``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            row = LC.torch_op_row(func, args, kwargs, out)
            if row is not None:
                sink.append(row)
            return out

    return Recorder()


class _Captured(Exception):
    pass


def _capture_forward_args(fn):
    """The arguments the public entry ``fn()`` passes to its first ``kernelssl`` op (not run)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Capture(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "kernelssl":
                raise _Captured(args)
            return func(*args, **(kwargs or {}))

    try:
        with Capture():
            fn()
    except _Captured as c:
        return c.args[0]
    raise AssertionError("the public entry point issued no kernelssl op")


# ==================================================================================================
# recording the fused path
# ==================================================================================================


def _record(op: str, body) -> list:
    """The launches ``body()`` makes through ``kernelssl.triton.<op>_op``, recorded (not run) by
    :func:`kernelssl.triton.offline.recording`: ``[(kernel, grid, args, kwargs)]``."""
    from kernelssl.triton import offline

    with offline.recording(op) as calls:
        body()
    return list(calls)


_COMPILED: dict = {}


def _spec_key(kernel, args, kw) -> tuple:
    """What Triton specialises a launch on (argument dtypes, 16-byte alignment of pointers, integers
    equal to 1 or divisible by 16, the keyword constexprs and options): launches with equal keys share
    one compile."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return ("T", str(v.dtype), v.data_ptr() % 16 == 0)
        if isinstance(v, bool) or not isinstance(v, int):
            return ("V", type(v).__name__, v if isinstance(v, (bool, str, float)) else None)
        return ("I", v == 1, v % 16 == 0, abs(v) >= 2 ** 31)

    return (kernel.fn.__name__, tuple(one(v) for v in args), tuple(sorted((k, repr(v)) for k, v in kw.items())))


def _compile(kernel, grid, args, kw) -> dict:
    """The sm_90 variant of one launch (:func:`kernelssl.triton.offline.compile_all`'s row), compiled once per key."""
    from kernelssl.triton import offline

    key = _spec_key(kernel, args, kw)
    if key not in _COMPILED:
        _COMPILED[key] = offline.compile_all([(kernel, grid, args, kw)])[0]
    return _COMPILED[key]


def _fused_calls(op: str, s: dict, dtype):
    """``[(phase, launch)]``: recorded Triton launches ``("triton", kernel, grid, args, kw)`` and torch
    ops ``("torch", row)`` of one forward + backward at shape ``s``."""
    from kernelssl.triton import offline

    mod = __import__(f"kernelssl.triton.{op}_op", fromlist=["_"])
    out: list = []
    state: dict = {}

    def phase(name, body):
        torch_rows: list = []

        def run():
            with _dispatch_recorder(torch_rows):
                body()

        calls = _record(op, run)
        out.extend((name, ("triton",) + tuple(c)) for c in calls)
        out.extend((name, ("torch", r)) for r in torch_rows)

    if op == "rff_hsic":
        offline.rff_hsic_gpu_config(mod)
        K, B, d, D = s["K"], s["B"], s["d"], s["D"]
        views = torch.empty(K, B, d, dtype=dtype)
        w, b = torch.empty(D, d), torch.empty(D)
        args = _capture_forward_args(lambda: mod.rff_hsic(views, w, b, w.clone(), b.clone(), 1.0))

        def fwd():
            state["out"] = mod.rff_hsic_forward(*args)

        g = torch.ones(())

        def bwd():
            mod.rff_hsic_backward(g, g, *args[:-1], *state["out"][2:], args[-1])
    elif op == "legendre_gram":
        z = torch.empty(s["n"], s["q"], dtype=dtype)
        args = _capture_forward_args(lambda: mod.legendre_gram_mean(z, _coefficients(s)))

        def fwd():
            for _ in range(s["views"]):
                mod.legendre_gram_forward(*args)

        g = torch.ones(())

        def bwd():
            for _ in range(s["views"]):
                mod.legendre_gram_backward(g, *args)
    elif op == "gaussian_gram":
        # Wang & Isola's loss (views = 2): both views in ONE op call on z (views, n, q), as
        # kernelssl.functional.align_uniform_loss makes it on the Triton backend -- its stack of the two
        # views recorded as the torch copy it is; the backward takes the forward's row scales.
        v = s["views"]
        zs = [torch.empty(s["n"], s["q"], dtype=dtype) for _ in range(v)]
        z = torch.empty(v, s["n"], s["q"], dtype=dtype) if v > 1 else zs[0]
        # (z, t, normalize, exclude, prec)
        args = _capture_forward_args(lambda: mod.gaussian_gram_logmean(z, C.UNIFORMITY_T))

        def fwd():
            if v > 1:
                torch.stack(zs)
            state["out"] = mod.gaussian_gram_forward(*args, return_scales=True)

        g = torch.ones(z.shape[:-2])

        def bwd():
            _, stats, rinv, proj = state["out"]
            mod.gaussian_gram_backward(g, args[0], stats, *args[1:], scales=(rinv, proj))
    else:
        P, m, d, order = s["P"], s["m"], s["d"], s["order"]
        a, b = torch.empty(P, m, d, dtype=dtype), torch.empty(P, m, d, dtype=dtype)
        lam = torch.full((P,), C.mec_lambda(m, d))
        args = _capture_forward_args(lambda: mod.taylor_logdet(a, b, lam, order))
        # (a3, b3, lam, order, normalize, diagnostics, precision); the teacher argument a has no grad

        def fwd():
            state["out"] = mod.taylor_logdet_forward(*args)

        g = torch.ones(P)

        def bwd():
            a3, b3, lam_t, order_, normalize, _diag, prec = args
            mod.taylor_logdet_backward(g, a3, b3, lam_t, *state["out"][2:6], order_, normalize, prec,
                                       False, True)
    phase("fwd", fwd)
    phase("bwd", bwd)
    return out, args


def _launch_row(phase, launch) -> dict:
    """The priced row (:mod:`kernelssl.bench.launch_costs`) of one recorded launch of :func:`_fused_calls`."""
    if launch[0] == "torch":
        row = dict(launch[1])
        row.update(phase=phase, source="torch", programs=None, per_sm=None, waves=None, wave_eff=1.0, sm_eff=1.0)
        return LC.priced(row)
    _, kernel, grid, args, kw = launch
    grid = tuple(grid) + (1,) * (3 - len(grid))
    bound = dict(zip(kernel.arg_names, args))
    bound.update(kw)
    return {"phase": phase, **LC.triton_launch_row(kernel.fn.__name__, bound, grid, _compile(kernel, grid, args, kw))}


# ==================================================================================================
# the eager form on meta tensors
# ==================================================================================================


def _eager_rows(op: str, s: dict, dtype) -> list[dict]:
    from kernelssl.ops import legendre_gram as S
    from kernelssl.ops import rff_hsic as H
    from kernelssl.ops import taylor_logdet as M

    meta = dict(device="meta", dtype=dtype)
    if op == "rff_hsic":
        x = torch.empty(s["K"], s["B"], s["d"], **meta, requires_grad=True)
        w, b = torch.empty(s["D"], s["d"], device="meta"), torch.empty(s["D"], device="meta")
        inputs = [x]
        fn = lambda: sum(H.rff_hsic_eager(x, w, b, w, b, 1.0))
    elif op == "legendre_gram":
        zs = [torch.empty(s["n"], s["q"], **meta, requires_grad=True) for _ in range(s["views"])]
        inputs = zs
        fn = lambda: sum(S.legendre_gram_mean_eager(z, _coefficients(s)) for z in zs)
    elif op == "gaussian_gram":  # Wang & Isola's code, per view
        zs = [torch.empty(s["n"], s["q"], **meta, requires_grad=True) for _ in range(s["views"])]
        inputs = zs
        fn = lambda: sum(torch.pdist(torch.nn.functional.normalize(z, dim=1), p=2)
                         .pow(2).mul(-C.UNIFORMITY_T).exp().mean().log() for z in zs)
    else:
        a = torch.empty(s["P"], s["m"], s["d"], **meta)
        bb = torch.empty(s["P"], s["m"], s["d"], **meta, requires_grad=True)
        inputs = [bb]
        fn = lambda: M.taylor_logdet_eager(a, bb, C.mec_lambda(s["m"], s["d"]), s["order"]).sum()
    rows: list = []
    with _dispatch_recorder(rows):
        loss = fn()
    n_fwd = len(rows)
    with _dispatch_recorder(rows):
        loss.backward()
    del inputs
    return [LC.priced(dict(r, phase="fwd" if i < n_fwd else "bwd", source="eager", wave_eff=1.0, sm_eff=1.0))
            for i, r in enumerate(rows)]


# ==================================================================================================
# the model of one case, and the table
# ==================================================================================================


def _summary(rows: list[dict]) -> dict:
    flops = sum(r["flops"] for r in rows)
    return {
        "launches": len(rows), "time_ms": 1e3 * sum(r["time"] for r in rows), "flops": flops,
        "tc_share": (sum(r["tc_flops"] for r in rows) / flops) if flops else 1.0,
        "bytes": sum(r["bytes"] for r in rows),
    }


def model_case(op: str, s: dict, dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    calls, args = _fused_calls(op, s, dtype)
    rows = [_launch_row(phase, launch) for phase, launch in calls]
    eager = _eager_rows(op, s, dtype)
    lim = LC.limit_time(op, s, dtype)
    fused = _summary(rows)
    calls = s.get("views", 1)  # SFRIK: one op call per view; the 10% is of one call's flops
    main = [r for r in rows if r["flops"] > 0.1 * fused["flops"] / calls]
    precision = next((x for x in reversed(args) if isinstance(x, (str, bool))), None)
    if isinstance(precision, bool):  # allow_tf32 flag: the fp32 products' mode
        precision = "tf32" if precision else "ieee"
    prods, floor = LC.essential(op, s, dtype)
    return {
        "op": op, "shape": s, "label": shape_label(op, s), "dtype": dtype_name, "precision": precision,
        "predicted_ms": fused["time_ms"], "limit_ms": 1e3 * lim, "ratio": fused["time_ms"] / (1e3 * lim),
        "eager_ms": _summary(eager)["time_ms"], "launches": fused["launches"], "flops": fused["flops"],
        "tc_share": fused["tc_share"], "bytes": fused["bytes"],
        "min_wave_eff_main": min((r["wave_eff"] for r in main), default=1.0),
        "waves_main": max((r["waves"] or 0.0 for r in main), default=0.0),
        "phases": {p: _summary([r for r in rows if r["phase"] == p]) for p in ("fwd", "bwd")},
        "essential": {"products": prods, "floor_bytes": floor},
        "eager": _summary(eager),
        "launch_rows": [_clean(r) for r in rows],
        "eager_rows": [_clean(r) for r in eager],
    }


def target_case(case: dict, key: str, fp32_precision: str) -> dict:
    """A modelled case (:func:`model_case`: its launches as recorded and compiled for sm_90) priced on
    target ``key`` of :data:`kernelssl.bench.hardware.TARGETS`, fp32 products at ``fp32_precision``
    (:func:`kernelssl.bench.launch_costs.on_target`): predicted, limit and eager ms, the main launches'
    worst wave efficiency, and the launches whose shared memory does not fit the target."""
    t = HW.TARGETS[key]
    rows = [LC.on_target(r, t, fp32_precision, case["precision"]) for r in case["launch_rows"]]
    eager = [LC.on_target(r, t, fp32_precision, None) for r in case["eager_rows"]]
    lim = 1e3 * LC.limit_time(case["op"], case["shape"], getattr(torch, case["dtype"]), t, fp32_precision)
    calls = case["shape"].get("views", 1)
    main = [o for o, r in zip(rows, case["launch_rows"]) if r["flops"] > 0.1 * case["flops"] / calls]
    predicted = 1e3 * sum(o["time"] for o in rows)
    return {"target": key, "name": t["name"], "arch": t["arch"], "precision": fp32_precision,
            "predicted_ms": predicted, "limit_ms": lim, "ratio": predicted / lim,
            "eager_ms": 1e3 * sum(o["time"] for o in eager),
            "min_wave_eff_main": min((o["wave_eff"] for o in main), default=1.0),
            "fits": all(o["fits"] for o in rows),
            "unfit": sorted({o["kernel"] for o in rows if not o["fits"]})}


def add_targets(cases: list[dict], targets) -> None:
    """``case["targets"]``: :func:`target_case` on each of ``targets`` at each of its fp32 precisions."""
    for c in cases:
        if "error" not in c:
            c["targets"] = [target_case(c, k, p) for k in targets for p in HW.TARGETS[k]["fp32_precisions"]]


def target_table(cases: list[dict]) -> str:
    head = ("| GPU | op | shape | dtype | fp32 products | predicted ms | limit ms | ratio | eager ms (predicted) | "
            "wave eff. (main, min) | launches fit |")
    lines = [head, "| " + " | ".join(["---"] * 11) + " |"]
    for c in cases:
        for t in c.get("targets", ()):
            fit = "yes" if t["fits"] else "NO: " + ", ".join(t["unfit"])
            lines.append(f"| {t['name']} ({t['arch']}) | {c['op']} | {c['label']} | {c['dtype']} | {t['precision']} | "
                         f"{t['predicted_ms']:.3f} | {t['limit_ms']:.3f} | {t['ratio']:.2f} | {t['eager_ms']:.3f} | "
                         f"{100 * t['min_wave_eff_main']:.0f}% | {fit} |")
    return "\n".join(lines)


def _clean(r: dict) -> dict:
    return {k: (list(map(list, v)) if k == "dots" else v) for k, v in r.items()}


def table(cases: list[dict]) -> str:
    head = ("| op | shape | dtype | fp32 products | predicted ms | limit ms | ratio | eager ms (predicted) | "
            "waves (main launches, max) | wave eff. (main, min) | tensor-core share |")
    lines = [head, "| " + " | ".join(["---"] * 11) + " |"]
    for c in cases:
        lines.append(f"| {c['op']} | {c['label']} | {c['dtype']} | {c['precision']} | {c['predicted_ms']:.3f} | "
                     f"{c['limit_ms']:.3f} | {c['ratio']:.2f} | {c['eager_ms']:.3f} | {c['waves_main']:.2f} | "
                     f"{100 * c['min_wave_eff_main']:.0f}% | {100 * c['tc_share']:.0f}% |")
    return "\n".join(lines)


def run(headline: bool = False, ops=OPS) -> list[dict]:
    cases = []
    for op in ops:
        for s in (sweep(op)[:1] if headline else sweep(op)):
            for dt in DTYPES:
                cases.append(model_case(op, s, dt))
    return cases


def run_cases(wanted: list[dict]) -> list[dict]:
    """:func:`model_case` of each ``{op, shape, dtype}`` (``shape`` completed from :data:`PAPER`); a case
    that raises is ``{op, shape, dtype, error}`` and the others go on."""
    cases = []
    for w in wanted:
        s = {**PAPER[w["op"]], **w["shape"]}
        try:
            cases.append(model_case(w["op"], s, w["dtype"]))
        except Exception as exc:  # one shape the model cannot price must not cost the others
            cases.append({"op": w["op"], "shape": s, "dtype": w["dtype"], "error": f"{type(exc).__name__}: {exc}"})
    return cases


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write every case (with its launches) to this JSON file")
    p.add_argument("--headline", action="store_true", help="the papers' shapes only")
    p.add_argument("--op", action="append", choices=OPS, help="only these ops (repeatable)")
    p.add_argument("--target", action="append", choices=tuple(HW.TARGETS) + ("all",),
                   help="also price the cases on these GPUs (repeatable; 'all': every one of "
                   "kernelssl.bench.hardware.TARGETS), datasheet ceilings, predicted")
    p.add_argument("--cases", default=None,
                   help="a JSON file [{op, shape, dtype}]: model these cases instead (shape: the op's keys, "
                   "as in the JSON this writes; a case that fails is a row with its error)")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run with TRITON_INTERPRET=0: the kernels are compiled for sm_90, not interpreted")
    if a.cases:
        with open(a.cases) as f:
            cases = run_cases(json.load(f))
    else:
        cases = run(a.headline, tuple(a.op) if a.op else OPS)
    print("PREDICTED (static model, H200 ceilings; not measured)")
    print(table([c for c in cases if "error" not in c]))
    targets = tuple(HW.TARGETS) if a.target and "all" in a.target else tuple(a.target or ())
    if targets:
        add_targets(cases, targets)
        print("\nPREDICTED on other GPUs (the same launches, compiled for sm_90; datasheet ceilings; not measured)")
        print(target_table([c for c in cases if "error" not in c]))
    for c in cases:
        if "error" in c:
            print(f"{c['op']} {c['shape']} {c['dtype']}: not modelled: {c['error']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"predicted": True, "ceilings": LC.H200, "rates": LC.RATES, "limit_rates": LC.LIMIT_RATES,
                       "targets": {k: HW.TARGETS[k] for k in targets}, "cases": cases}, f, indent=1)


if __name__ == "__main__":
    main()
