"""Outputs of ``python -m kernelssl.bench``: the JSON, the markdown table of ratios, the plots, the summary.

Ratios (per loss, dtype and shape, from the medians of the same run):

* ``vs eager`` = eager time / this time (> 1: faster than the papers' form as written);
* ``vs compiled`` = eager-compiled time / this time (> 1: faster than the papers' form under
  ``torch.compile``, the strongest free peer);
* ``x limit`` = this time / the limit row's time (the op's essential matrix products alone, same
  inputs, same run): how far from the matmuls an implementation is (1 would be "the products only");
* ``mem vs eager`` = this peak extra memory / eager's.

Plots need matplotlib (``pip install kernelssl[bench]``); without it they are skipped with a note.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

PEERS = ("eager", "eager-compiled")


def _key(r: dict) -> tuple:
    return (r["loss"], r["dtype"], r["shape_str"])


def add_ratios(rows: list[dict]) -> None:
    """Add ``speedup_vs_eager``, ``speedup_vs_compiled``, ``x_limit``, ``mem_vs_eager`` to ok rows."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(_key(r), {})[r["impl"]] = r
    for r in rows:
        if r.get("status") != "ok":
            continue
        case = by_case[_key(r)]

        def t(name):
            x = case.get(name)
            return x["median_ms"] if x and x.get("status") == "ok" else None

        eager, comp, lim = t("eager"), t("eager-compiled"), t("limit")
        r["speedup_vs_eager"] = eager / r["median_ms"] if eager else None
        r["speedup_vs_compiled"] = comp / r["median_ms"] if comp else None
        r["x_limit"] = r["median_ms"] / lim if lim and r["impl"] != "limit" else None
        # the limit is meant as a lower bound: a row below it shows the limit at fault, not the row fast
        r["limit_fault"] = bool(r["x_limit"] is not None and r["x_limit"] < 1.0)
        e = case.get("eager")
        em = e.get("peak_extra_mb") if e and e.get("status") == "ok" else None
        r["mem_vs_eager"] = (r["peak_extra_mb"] / em if em and r.get("peak_extra_mb") is not None
                             and r["impl"] != "limit" else None)


def write_json(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")


def _f(x, fmt: str, none: str = "—") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, fmt)


def _status_cell(r: dict) -> str:
    if r["status"] == "predicted-oom":  # "predicted OOM (X GiB: ...)": the size, not the whole reason
        return "skipped: " + r.get("message", "predicted OOM").split(":")[0] + ")"
    return {"oom": "OOM", "compile-failed": "compile failed", "error": "error", "skipped": "not timed",
            "value-mismatch": "**WRONG VALUE**"}.get(r["status"], r["status"])


def machine_label(env: dict) -> str:
    if env["device_type"] == "cuda":
        return env["device"]
    label = f"{env['cpu_count']}-core CPU, {env['torch_threads']} threads"
    loads = [x for x in (env.get("loadavg_1min") or {}).values() if x is not None]
    if loads and max(loads) > 1.5 * (env["cpu_count"] or 1):  # times are inflated and noisy: say so
        label += f", shared (load {min(loads):.0f}-{max(loads):.0f})"
    return label


def markdown(result: dict) -> str:
    env, rows, checks = result["env"], result["rows"], result["checks"]
    lines = [
        f"# kernelssl.bench — {machine_label(env)}",
        "",
        f"{env['device']}; torch {env['torch']}, triton {env['triton']}, kernelssl {env['kernelssl']}"
        + (f", commit {env['git_commit']}" if env.get("git_commit") else "")
        + f"; {env['date']}; wall {result['wall_s']:.0f} s"
        + ("; `--quick`" if result["config"]["quick"] else ""),
        "",
        "Forward+backward of each loss on the same inputs. **vs eager** / **vs compiled**: the papers' form "
        "(eager / under `torch.compile`) time ÷ this time, > 1 is faster. **× limit**: this time ÷ the "
        "time of the op's essential matrix products alone (the `limit` row: the fastest of aten, compiled and, for a "
        "symmetric Gram, triangle products), ≥ 1 — a row below 1 is marked **limit fault**. **mem vs eager**: peak "
        "extra memory ÷ eager's. `kernelssl` is the library's default call (`backend=\"auto\"`).",
        "",
        "## Correctness (small case, loss and input gradients against the float64 torch path)",
        "",
        "fp32: |loss error| ≤ 1e-4·|loss| + 1e-6 and, elementwise, |gradient error| ≤ 1e-4·|grad| + "
        "1e-4·max|grad| (the gradient column shows max|error| ÷ max|grad|). bf16/fp16 and TF32: error ≤ "
        "max(2 × the torch path's error in the same precision, a rounding floor); the bound is shown. "
        "A FAIL is not timed.",
        "",
        "| loss | dtype | implementation | verdict | loss error (bound) | gradient error, of max\\|grad\\| (bound) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in checks:
        v = c["verdict"]
        cell = {"pass": "pass", "FAIL": "**FAIL — not timed**"}.get(v, v)
        if c.get("message") and v not in ("pass",):
            cell += f" ({c['message'][:80]})"
        gb = c.get("grad_rel_tol")
        gcell = _f(c.get("grad_rel_err"), ".2e") + (f" ({gb:.2e})" if gb is not None else
                                                      (" (fp32 rule)" if "grad_rel_err" in c else ""))
        lcell = _f(c.get("loss_err"), ".2e") + (f" ({c['loss_tol']:.2e})" if "loss_tol" in c else "")
        lines.append(f"| {c['loss']} | {c['dtype']} | {c['impl']} | {cell} | {lcell} | {gcell} |")

    lines += ["", "## Target shapes", "",
              "| loss | shape | dtype | implementation | median ms (min) | peak extra MB | vs eager | vs compiled "
              "| × limit | mem vs eager |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if not r.get("target"):
            continue
        name = r["impl"] + (f" ({r['backend']})" if r.get("backend") else "") + (
            f" ({r['limit_impl']})" if r.get("limit_impl") else "")
        if r["status"] != "ok":
            lines.append(f"| {r['loss']} | {r['shape_str']} | {r['dtype']} | {name} | {_status_cell(r)} "
                         "| | | | | |")
            continue
        xlim = _f(r.get("x_limit"), ".2f") + (" **limit fault**" if r.get("limit_fault") else "")
        lines.append(
            f"| {r['loss']} | {r['shape_str']} | {r['dtype']} | {name} | {r['median_ms']:.2f} ({r['min_ms']:.2f}) "
            f"| {_f(r.get('peak_extra_mb'), '.1f')} | {_f(r.get('speedup_vs_eager'), '.2f')}× "
            f"| {_f(r.get('speedup_vs_compiled'), '.2f')}× | {xlim} "
            f"| {_f(r.get('mem_vs_eager'), '.3f')} |")

    sweeps = _sweeps(rows)
    if sweeps:
        lines += ["", "## Batch-size sweep (median ms; OOM = out of memory; predicted OOM = not tried, "
                  "see the JSON's message)", ""]
        for (loss, dtype, key), table in sweeps.items():
            batches = sorted({b for per in table.values() for b in per})
            lines += [f"**{loss}**, {dtype}, {key} = batch:", "",
                      "| implementation | " + " | ".join(str(b) for b in batches) + " |",
                      "| --- |" + " --- |" * len(batches)]
            for impl, per in table.items():
                cells = []
                for b in batches:
                    r = per.get(b)
                    cells.append("" if r is None else f"{r['median_ms']:.2f}" if r["status"] == "ok"
                                 else _status_cell(r))
                lines.append(f"| {impl} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _sweeps(rows: list[dict]) -> dict:
    """``{(loss, dtype, batch key): {impl: {batch: row}}}`` for cases with more than one batch size."""
    from .cases import BATCH_KEY

    out: dict = {}
    order = {name: i for i, name in enumerate(dict.fromkeys(r["impl"] for r in rows if r.get("target")))}
    for r in sorted(rows, key=lambda r: order.get(r["impl"], len(order))):  # the target shape's row order
        out.setdefault((r["loss"], r["dtype"], BATCH_KEY[r["loss"]]), {}).setdefault(r["impl"], {})[r["batch"]] = r
    return {k: v for k, v in out.items() if len({b for per in v.values() for b in per}) > 1}


# --------------------------------------------------------------------------------------------------
# plots


def plots(result: dict, out: Path) -> tuple[list[Path], str | None]:
    """PNG files written, and a note when they were skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: plots skipped (pip install kernelssl[bench])"
    label = machine_label(result["env"])
    files = []
    for (loss, dtype, key), table in _sweeps(result["rows"]).items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, field, ylabel in ((axes[0], "median_ms", "forward+backward time (ms)"),
                                  (axes[1], "peak_extra_mb", "peak extra memory (MB)")):
            ymax = max((r[field] for per in table.values() for r in per.values()
                        if r["status"] == "ok" and r.get(field)), default=1.0)
            for impl, per in table.items():
                if field == "peak_extra_mb" and impl == "limit":
                    continue
                pts = sorted((b, r[field]) for b, r in per.items() if r["status"] == "ok" and r.get(field))
                style = dict(linestyle="--", color="black") if impl == "limit" else {}
                line = None
                if pts:
                    (line,) = ax.plot(*zip(*pts), marker="o", label=impl, **style)
                ooms = sorted(b for b, r in per.items() if r["status"] in ("oom", "predicted-oom"))
                if ooms:
                    color = line.get_color() if line is not None else "red"
                    ax.plot(ooms, [ymax * 1.6] * len(ooms), marker="x", linestyle="none", color=color,
                            markersize=9, label=f"{impl}: OOM" if line is None else None)
                    for b in ooms:
                        text = "OOM" if per[b]["status"] == "oom" else "OOM (predicted)"
                        ax.annotate(text, (b, ymax * 1.6), textcoords="offset points", xytext=(4, 4),
                                    fontsize=7, color=color)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"batch ({key})")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        shape = next(r for per in table.values() for r in per.values())["shape"]
        fixed = ", ".join(f"{k}={v}" for k, v in shape.items() if k != key)
        fig.suptitle(f"{loss} ({fixed}), {dtype} — {label}", fontsize=11)
        fig.tight_layout()
        path = out / f"{loss}-{dtype}-sweep.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    target = [r for r in result["rows"] if r.get("target") and r["impl"] not in ("eager", "limit")]
    if target:
        cases = sorted({(r["loss"], r["dtype"]) for r in target}, key=lambda c: (c[1], c[0]))
        impls = list(dict.fromkeys(r["impl"] for r in target))
        fig, ax = plt.subplots(figsize=(max(7.5, 0.55 * len(cases) * len(impls) + 2.0), 4.4))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            xs, ys, bad = [], [], []
            for i, (loss, dtype) in enumerate(cases):
                r = next((r for r in target if (r["loss"], r["dtype"], r["impl"]) == (loss, dtype, impl)), None)
                x = i + (j - (len(impls) - 1) / 2) * width
                if r is not None and r["status"] == "ok" and r.get("speedup_vs_eager"):
                    xs.append(x)
                    ys.append(r["speedup_vs_eager"])
                elif r is not None:
                    bad.append((x, _status_cell(r)))
            bars = ax.bar(xs, ys, width, label=impl)
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:.2g}", (x, y), ha="center", va="bottom", fontsize=6)
            for x, text in bad:
                ax.annotate(text.replace("**", ""), (x, 1.0), ha="center", va="bottom", rotation=90, fontsize=6,
                            color=bars.patches[0].get_facecolor() if bars.patches else "red")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{loss}\n{dtype}" for loss, dtype in cases])
        ax.set_ylabel("speed-up vs the papers' form, eager (×)")
        ax.set_title(f"forward+backward at the target shapes — {label}", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        path = out / "speedup.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files, None


# --------------------------------------------------------------------------------------------------
# summary


def summary(result: dict) -> str:
    env, rows, checks = result["env"], result["rows"], result["checks"]
    n_pass = sum(c["verdict"] == "pass" for c in checks)
    bad = [c for c in checks if c["verdict"] not in ("pass", "n/a", "skipped")]
    out = [f"kernelssl.bench on {env['device']} (torch {env['torch']}, triton {env['triton']}): "
           f"{len(rows)} rows in {result['wall_s']:.0f} s",
           f"correctness: {n_pass} pass" + ("" if not bad else ", " + ", ".join(
               f"{c['loss']}/{c['dtype']}/{c['impl']}: {c['verdict']}" for c in bad))]
    for r in rows:
        if r.get("target") and r["impl"] in ("kernelssl", "kernelssl-compiled") and r["status"] == "ok":
            out.append(f"  {r['loss']:5} {r['dtype']} {r['shape_str']}: {r['impl']} ({r.get('backend')}) "
                       f"{r['median_ms']:.2f} ms = {_f(r.get('speedup_vs_eager'), '.2f')}x eager, "
                       f"{_f(r.get('speedup_vs_compiled'), '.2f')}x eager-compiled, "
                       f"{_f(r.get('x_limit'), '.2f')}x the limit")
    for r in rows:
        if r.get("limit_fault"):
            out.append(f"  LIMIT FAULT: {r['loss']} {r['dtype']} {r['shape_str']} {r['impl']} ran in "
                       f"{r['x_limit']:.2f}x the limit's time: the limit row is not a lower bound there")
    odd = [r for r in rows if r["status"] not in ("ok", "skipped")]
    for r in odd:
        out.append(f"  {r['loss']} {r['dtype']} {r['shape_str']} {r['impl']}: {r['status']}"
                   + (f" -- {r['message']}" if r.get("message") else ""))
    return "\n".join(out)
