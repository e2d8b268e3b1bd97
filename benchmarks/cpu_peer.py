"""Forward+backward of each loss's default call against ``torch.compile`` of the papers' form, side by
side on the CPU, with the GEMM-limit row and peak extra memory (docs/benchmarks.md).

Implementations, timed on the same inputs, interleaved (every repeat runs each once, in an order drawn
afresh each repeat, and each timed call comes right after an untimed call of the same implementation, so
that what it finds in the caches is its own: :func:`kernelssl.bench.measure.interleaved` with ``warm``),
medians:

* ``peer``    -- ``torch.compile`` (inductor) of the papers' form: the ``"eager"`` implementations of
  :mod:`kernelssl.bench.cases` (``sfrik_loss(eager=True)``, ``rff_hsic_eager``,
  ``mec_loss(eager=True)`` of :mod:`kernelssl.ops`), wrapped here.  Its compile time (the first
  call's wall time) is reported separately.
* ``default`` -- the library's default call: ``SFRIKLoss()(za, zb)``, ``HSICLoss()(views)`` (drawing
  its own features, as in a training step; the agreement check uses the peer's maps),
  ``MECLoss()(za, zb, ta, tb)``.
* ``compiled``-- ``torch.compile`` of that default call (``--compiled``).
* ``gemm``    -- the essential matrix products alone, forward+backward: the ``limit`` row of
  :func:`kernelssl.bench.cases.limit_products` (shared with ``python -m kernelssl.bench``): the fastest
  of aten, compiled and (symmetric Grams) triangle products; ``limit_fault`` marks a row where another
  implementation ran faster than it.

* ``floor`` (SSL-HSIC, ``--floor``) -- the least any implementation of the default call does on top of the
  limit's products, timed alone: ``cos`` of both maps' ``N x D`` phases (the features themselves; the
  backward's ``sin`` is left out, as if it were free) and the draw of both maps
  (``HSICLoss.draw_features``, the module's own draw).  The row then gives
  ``floor_ms = gemm_ms + features_ms + draw_ms`` and ``peer/floor``: no implementation of the default
  call can be faster than the compiled papers' form (which is handed its maps) by more than that;
  ``peer/products_cos`` is the same bound with the draw left out, as if it were free.
* ``ops``, ``ops-unscaled`` (SFRIK, ``--parts``) -- where the default call's time goes: the loss's fused
  Function entered through :func:`kernelssl.ops.sfrik_loss.sfrik_loss` as the default call enters it,
  but without the module's and the functional's checks and dispatch (``ops``), and the same without the
  rows' power-of-two prescale (``ops-unscaled``: right for these rows of moderate norm, not for rows
  whose norms over- or underflow; the default call needs the prescale).

Peak extra memory (``--memory``): RSS high-water mark above the pre-call RSS of one forward+backward
(:func:`kernelssl.bench.measure.peak_extra_bytes`), for ``default`` and the un-compiled papers' form
(``eager``).

Run from the repository root::

    PYTHONPATH=. python benchmarks/cpu_peer.py --loss sfrik --shape n=4096,q=128 --dtype float32 --repeats 11
    PYTHONPATH=. python benchmarks/cpu_peer.py --loss sfrik --sweep --threads 2 1 --json sweep.jsonl   # the docs' table

The machine is shared: read ratios, not absolute times.
"""
from __future__ import annotations

import argparse
import json

import torch

from kernelssl.bench import cases as C
from kernelssl.bench import measure as Ms
from kernelssl.losses import HSICLoss, MECLoss, SFRIKLoss
from kernelssl.ops import sfrik_loss as sfrik_ops


def parse_shape(text: str) -> dict:
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}


def default_call(loss: str, shape: dict, device, *, draw: bool = True):
    """The library's default call.  HSIC: ``HSICLoss()`` drawing its own features (``draw``; what a user's
    training step runs), or with the peer's maps (``draw=False``: the same loss value, for the agreement
    check)."""
    if loss == "sfrik":
        crit = SFRIKLoss()
        return lambda za, zb: crit(za, zb)
    if loss == "mec":
        crit = MECLoss()
        return lambda za, zb, pa, pb: crit(za, zb, pa, pb)
    crit = HSICLoss(num_features=C.hsic_features(shape))
    if draw:
        return lambda views: crit(views, view_dim=0)
    maps = C.hsic_maps(shape, device=device)
    return lambda views: crit(views, view_dim=0, features=maps)


def hsic_floor_steps(shape: dict, dtype) -> dict:
    """The work of the ``floor`` row besides the products (module docstring), as steps."""
    n, D = shape["K"] * shape["B"], C.hsic_features(shape)
    phases = torch.rand(2, n, D, dtype=dtype) * 6.0  # both maps
    crit = HSICLoss(num_features=D)
    return {"features": lambda: torch.cos(phases), "draw": lambda: crit.draw_features(shape["d"], dtype=dtype)}


def step(fn, inputs, is_loss: bool = True):
    """One forward+backward of a loss (or one call of the limit's products, which are not a loss)."""
    return (lambda: C.forward_backward(fn, inputs)) if is_loss else (lambda: fn(*inputs))


def run_case(loss: str, shape: dict, *, dtype=torch.float32, repeats: int = 11, threads: int = 2,
             peer: bool = True, compiled: bool = False, memory: bool = False, floor: bool = False,
             parts: bool = False) -> dict:
    """One row: median (and min) ms of the default call, the compiled papers' form (``peer``) and the
    limit (``gemm``), their ratios, the limit's chosen products and both loss values."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    inputs = C.make_inputs(loss, shape, dtype=dtype)
    if loss == "hsic":  # unit rows (the papers' code normalises before the loss; HSICLoss() does so
        # inside): both then compute the same loss, the default call including its normalisation
        inputs = (torch.nn.functional.normalize(inputs[0].detach(), dim=-1).requires_grad_(),)
    impls = C.implementations(loss, shape, device=device)
    fns = {"default": default_call(loss, shape, device)}
    if peer:
        fns["peer"] = torch.compile(impls["eager"])
    if compiled:
        fns["compiled"] = torch.compile(default_call(loss, shape, device))
    if parts and loss == "sfrik":
        fns["ops"] = lambda za, zb: sfrik_ops.sfrik_loss(za, zb, prescale=True)[0]
        fns["ops-unscaled"] = lambda za, zb: sfrik_ops.sfrik_loss(za, zb, prescale=False)[0]
    fns["gemm"] = C.limit_products(loss, shape)
    steps = {name: step(fn, inputs, name != "gemm") for name, fn in fns.items()}
    floor = floor and loss == "hsic"
    if floor:
        steps.update(hsic_floor_steps(shape, dtype))
    # warm-up (compiles); the first call of a compiled function is its compile time
    compile_s = {}
    for name, fn in steps.items():
        t, _ = Ms.wall(fn, device)
        if name in ("peer", "compiled"):
            compile_s[name] = t
        Ms.warm_up(fn, device)
    # agreement with the papers' form on the same maps (a fast wrong answer must not look good)
    ref = C.forward_backward(impls["eager"], inputs).item()
    got = C.forward_backward(default_call(loss, shape, device, draw=False), inputs).item()
    times = Ms.interleaved(steps, device, repeats=repeats, warm=True)
    med = {name: Ms.median(ts) * 1e3 for name, ts in times.items()}
    row = {"loss": loss, "shape": ",".join(f"{k}={v}" for k, v in shape.items()), "dtype": str(dtype)[6:],
           "threads": threads, "repeats": repeats}
    row.update({f"{k}_ms": round(v, 3) for k, v in med.items()})
    row.update({f"{k}_min_ms": round(min(ts) * 1e3, 3) for k, ts in times.items()})
    if "peer" in med:
        row["peer/default"] = round(med["peer"] / med["default"], 2)
    for name in ("compiled", "ops", "ops-unscaled"):
        if name in med and "peer" in med:
            row[f"peer/{name}"] = round(med["peer"] / med[name], 2)
    if "gemm" in med:
        row["default/gemm"] = round(med["default"] / med["gemm"], 2)
        row["limit_impl"] = fns["gemm"].chosen
        row["limit_fault"] = any(med[k] < med["gemm"] for k in fns if k != "gemm")
    if floor:
        row["floor_ms"] = round(med["gemm"] + med["features"] + med["draw"], 3)
        if "peer" in med:
            row["peer/floor"] = round(med["peer"] / row["floor_ms"], 2)
            row["peer/products_cos"] = round(med["peer"] / (med["gemm"] + med["features"]), 2)
    row.update({f"compile_{k}_s": round(v, 1) for k, v in compile_s.items()})
    row["loss_default"], row["loss_eager"] = got, ref
    for name in ("ops", "ops-unscaled"):  # their values beside the papers' form's, as the default call's
        if name in fns:
            row[f"loss_{name}"] = C.forward_backward(fns[name], inputs).item()
    if memory:
        fns_mem = {"default": fns["default"], "eager": impls["eager"]}
        for name, fn in fns_mem.items():
            b = Ms.peak_extra_bytes(step(fn, inputs), device)
            row[f"mem_{name}_MiB"] = None if b is None else round(b / 2**20, 1)
    return row


def markdown_table(rows: list[dict]) -> str:
    """The docs' CPU table: one line per (loss, shape, threads)."""
    out = ["| loss | shape | threads | default ms | compiled papers' form ms | limit ms (products) "
           "| compiled / default |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = r.get("peer/default")
        flag = " **limit fault**" if r.get("limit_fault") else ""
        peer = r.get("peer_ms", float("nan"))
        out.append(f"| {r['loss']} | {r['shape']} | {r['threads']} | {r['default_ms']:.2f} | {peer:.2f} "
                   f"| {r['gemm_ms']:.2f} ({r.get('limit_impl')}){flag} | {'' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", choices=("sfrik", "hsic", "mec"), required=True)
    p.add_argument("--shape", help="e.g. n=4096,q=128 | K=4,B=1024,d=256,D=512 | m=1024,d=256")
    p.add_argument("--sweep", action="store_true", help="every shape of kernelssl.bench.cases.CPU_SWEEP[loss]")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--threads", type=int, nargs="+", default=[2], help="one or more thread counts")
    p.add_argument("--no-peer", action="store_true", help="skip the compiled papers' form")
    p.add_argument("--compiled", action="store_true", help="also time torch.compile of the default call")
    p.add_argument("--memory", action="store_true", help="peak extra memory of default and eager (one call each)")
    p.add_argument("--floor", action="store_true", help="SSL-HSIC: the floor row (module docstring)")
    p.add_argument("--parts", action="store_true",
                   help="SFRIK: the ops and ops-unscaled rows (module docstring): where the default call's time goes")
    p.add_argument("--json", help="append each row to this JSON-lines file")
    a = p.parse_args(argv)
    if a.sweep == bool(a.shape):
        p.error("give exactly one of --shape and --sweep")
    if a.repeats < 1 or min(a.threads) < 1:
        p.error("--repeats and --threads must be >= 1")
    shapes = C.CPU_SWEEP[a.loss] if a.sweep else [parse_shape(a.shape)]
    rows = []
    for shape in shapes:
        for threads in a.threads:
            row = run_case(a.loss, shape, dtype=getattr(torch, a.dtype), repeats=a.repeats, threads=threads,
                           peer=not a.no_peer, compiled=a.compiled, memory=a.memory, floor=a.floor,
                           parts=a.parts)
            rows.append(row)
            print(row, flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    if len(rows) > 1 and not a.no_peer:
        print(markdown_table(rows))


if __name__ == "__main__":
    main()
