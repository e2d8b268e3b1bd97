"""``python -m kernelssl.bench [--quick] [--out DIR] [--loss hsic sfrik mec uniformity] [--dtype fp32 bf16]
[--device D]`` (docs/benchmarks.md)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .._checks import OneLineArgumentParser
from . import report
from .cases import LOSSES, is_compiled
from .runner import DTYPES, IMPLS, Config, any_wrong, default_impls, run


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineArgumentParser(
        prog="python -m kernelssl.bench",
        description="Correctness, then forward+backward time and peak memory of SSL-HSIC, SFRIK, MEC and Wang & "
        "Isola's uniformity: kernelssl vs the papers' form (eager and torch.compile), on this machine.")
    p.add_argument("--quick", action="store_true",
                   help="a reduced set: two or three batch sizes per loss (CPU: under 3 minutes on 2 cores)")
    p.add_argument("--out", default=None, help="output folder (default: kernelssl-bench-<time>)")
    # action="extend": a repeated flag adds to the list (--loss hsic --loss mec runs both)
    p.add_argument("--loss", nargs="+", action="extend", choices=LOSSES, default=None, help="losses (default: all)")
    p.add_argument("--dtype", nargs="+", action="extend", choices=tuple(DTYPES), default=None,
                   help="input dtypes (default: fp32 on CPU, fp32 bf16 on a GPU; the sweep runs in the first)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--no-compile", action="store_true", help="drop the torch.compile rows")
    p.add_argument("--impl", nargs="+", action="extend", default=None, choices=IMPLS, metavar="IMPL",
                   help="only these rows (default: all that run on the device): " + " ".join(IMPLS))
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny shapes, for the tests
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("loss", "dtype", "impl"):  # each named once, in the order given
        if getattr(args, name) is not None:
            setattr(args, name, list(dict.fromkeys(getattr(args, name))))
    if args.loss is None:
        args.loss = list(LOSSES)
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            p.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
        if device.type not in ("cpu", "cuda"):
            p.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            p.error(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    runnable = default_impls(device, quick=False, compile=True)
    cannot = [n for n in args.impl or () if n not in runnable]
    if cannot:
        p.error(f"--impl {' '.join(cannot)} cannot run on {device.type} (there: {' '.join(runnable)})")
    compiled = [n for n in args.impl or () if is_compiled(n)]
    if compiled and args.no_compile:
        p.error(f"--impl {' '.join(compiled)} contradicts --no-compile")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out!r} is a file, not a directory")
    return args


def main(argv=None, *, extra=None) -> int:
    args = parse_args(argv)
    out = Path(args.out or f"kernelssl-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    cfg = Config(losses=tuple(args.loss), dtypes=tuple(args.dtype) if args.dtype else None, device=args.device,
                 quick=args.quick, smoke=args.smoke, compile=not args.no_compile,
                 impls=tuple(args.impl) if args.impl else None, extra=dict(extra or {}),
                 progress=not args.no_progress)
    result = run(cfg)
    report.add_ratios(result["rows"])
    files, note = report.plots(result, out)
    result["plots"] = [p.name for p in files]
    report.write_json(result, out / "results.json")
    (out / "results.md").write_text(report.markdown(result))
    print(report.summary(result))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f", {len(files)} plots" if files else ""))
    if note:
        print(f"note: {note}")
    if any_wrong(result):
        print("!!! at least one implementation computed a WRONG result (see above); exit status 2", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
