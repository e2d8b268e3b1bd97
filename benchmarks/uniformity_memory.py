"""Peak memory of Wang & Isola's uniformity on the CPU: kernelssl's ``KF.uniformity`` against their code's
pdist form (:func:`kernelssl.bench.cases.uniformity_eager`), each case in a fresh subprocess (docs/benchmarks.md).

Per case (implementation, n, mode) a child process builds ``z`` (n, q) fp32 from a fixed seed, runs the
op once at n = 64 (libraries loaded, allocator warm), then measures one call: the peak resident set
above the resident set just before the call (``VmHWM`` reset through ``/proc/self/clear_refs`` after
``malloc_trim``: :func:`kernelssl.bench.measure.one_call`), the process's whole peak (``VmHWM``,
inputs and libraries included) and the wall time.  Modes: ``metric`` (forward under
``torch.no_grad()``: the uniformity of a set of embeddings) and ``train`` (forward+backward, raw rows
with ``requires_grad``).  The pdist form is not started where its predicted peak exceeds a third of
the available memory (:func:`kernelssl.bench.cases.predicted_oom`), unless ``--force``.  Run from the
repository root::

    PYTHONPATH=. python benchmarks/uniformity_memory.py --n 16384 100000 --impl kernelssl eager --mode metric train
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from kernelssl.bench import cases as C

CHILD = r"""
import json, sys, torch
from kernelssl import functional as KF
from kernelssl.bench import cases as C
from kernelssl.bench import measure as Ms
impl, n, q, mode, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
fn = C.uniformity_eager if impl == "eager" else (lambda z: KF.uniformity(z, C.UNIFORMITY_T))

def call(z):
    if mode == "metric":
        with torch.no_grad():
            return fn(z)
    z.grad = None
    out = fn(z)
    out.backward()
    return out.detach()

call(torch.randn(64, q).requires_grad_(mode == "train"))  # load and warm up at a tiny size
z = torch.randn(n, q, generator=torch.Generator().manual_seed(0)).requires_grad_(mode == "train")
seconds, extra, value = Ms.one_call(lambda: float(call(z)), torch.device("cpu"))
print(json.dumps({"value": value, "seconds": seconds, "extra_mib": None if extra is None else extra / 2**20,
                  "process_peak_mib": Ms.process_peak_bytes() / 2**20, "input_mib": z.numel() * 4 / 2**20}))
"""


def run_case(impl: str, n: int, q: int, mode: str, threads: int, force: bool) -> dict:
    row = {"impl": impl, "n": n, "q": q, "mode": mode, "dtype": "fp32", "threads": threads}
    if impl == "eager":
        why = C.predicted_oom("uniformity", "eager", {"n": n, "q": q}, grad=mode == "train")
        if why is not None and not force:
            return {**row, "status": "predicted-oom", "message": why}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, impl, str(n), str(q), mode, str(threads)],
                          capture_output=True, text=True, env=env)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        return {**row, "status": "oom-killed" if proc.returncode in (-9, 137) else "error",
                "message": proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]}
    return {**row, "status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", required=True)
    p.add_argument("--q", type=int, default=C.PAPER_SHAPES["uniformity"]["q"])
    p.add_argument("--impl", nargs="+", choices=("kernelssl", "eager"), default=["kernelssl", "eager"])
    p.add_argument("--mode", nargs="+", choices=("metric", "train"), default=["metric", "train"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true", help="run the pdist form even beyond the predicted cap")
    p.add_argument("--json", default=None, help="append the rows (one JSON object a line) to this file")
    a = p.parse_args(argv)
    for n in a.n:
        for mode in a.mode:
            for impl in a.impl:
                row = run_case(impl, n, a.q, mode, a.threads, a.force)
                print(json.dumps(row), flush=True)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
