"""Peak memory and time of exact Gaussian CKA on the CPU: ``kernelssl.metrics.cka`` (the streamed
``gram_hsic`` op; ``kernelssl-grad``: forward and backward) against ckatorch's ``cka_base(kernel="rbf")``
eager and compiled, and Kornblith et al.'s dense form (``eager``, ``eager-compiled``, float64,
:mod:`kernelssl.bench.metrics_cases`), each case in a fresh subprocess under an address-space cap
(``--limit-gib``; past it a dense form reports MemoryError) (docs/metrics.md).

Per case (implementation, n) a child process builds ``x (n, 64)`` and ``y (n, 32)`` (float32, fixed
seed; ``y`` a noisy random projection of ``x``), runs the metric once at n = 256 (libraries loaded,
allocator warm), then measures one call with :func:`kernelssl.bench.measure.one_call`: the peak
resident set above the resident set just before the call (``VmHWM`` after ``/proc/self/clear_refs``)
and the wall time (a compiled implementation is called once at n first: the measured call runs compiled
code).  kernelssl runs ``sigma="median"`` (its stated median rule), the dense form the
same bandwidths as numbers; ckatorch its own (``torch.median`` of its float64 squared distances, inside
the call).  Run from the repository root::

    PYTHONPATH=. python benchmarks/metrics_memory.py --n 20000 --impl kernelssl --dtype float32 float64
    PYTHONPATH=. python benchmarks/metrics_memory.py --n 5000 --impl kernelssl ckatorch ckatorch-compiled eager
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
from kernelssl.bench import measure as Ms
from kernelssl.bench import metrics_cases as MC
from kernelssl.metrics import cka
impl, n, dtype = sys.argv[1], int(sys.argv[2]), getattr(torch, sys.argv[3])
threads, limit = int(sys.argv[4]), int(sys.argv[5])
if limit:  # an address-space cap: a dense form past it fails with MemoryError instead of swapping the machine
    resource.setrlimit(resource.RLIMIT_AS, (limit << 30, limit << 30))
torch.set_num_threads(threads)
grad = impl == "kernelssl-grad"
def make(m):
    x, y = MC.make_inputs(m, "cpu", dtype)
    if grad:
        x.requires_grad_()
        y.requires_grad_()
        return (lambda: cka(x, y, kernel="gaussian").backward()), x, y
    if impl == "kernelssl":
        return (lambda: cka(x, y, kernel="gaussian")), x, y
    if impl.startswith("ckatorch"):
        from ckatorch.core import cka_base
        f = lambda a, b: cka_base(a, b, kernel="rbf")  # its own median rule (threshold 1)
        f = torch.compile(f) if impl.endswith("compiled") else f
    elif impl == "eager":  # Kornblith's form with kernelssl's median rule: no n x n median here
        f = lambda a, b: MC.kornblith_cka(a, b, *bw)
    else:
        f = torch.compile(lambda a, b: MC.kornblith_cka(a, b, *bw))
    return (lambda: f(x, y)), x, y
bw = None
try:
    with torch.enable_grad() if grad else torch.no_grad():
        from kernelssl.metrics import median_sigma
        call, x, y = make(256)
        bw = (float(median_sigma(x)), float(median_sigma(y)))
        call()  # warm-up: libraries, allocator, compile
        call, x, y = make(n)
        bw = (float(median_sigma(x)), float(median_sigma(y)))
        if impl.endswith("compiled"):
            call()  # compiled for this shape first: the measured call runs the compiled code, not a recompile
        s, peak, v = Ms.one_call(call, torch.device("cpu"))
    value = float(cka(x.detach(), y.detach(), kernel="gaussian")) if grad else float(v)
    print(json.dumps({"impl": impl, "n": n, "dtype": str(dtype), "seconds": s, "peak_extra_MiB": peak / 2**20,
                      "cka": value, "threads": threads}))
except MemoryError:
    print(json.dumps({"impl": impl, "n": n, "dtype": str(dtype), "error": f"MemoryError under a {limit} GiB cap"}))
"""

IMPLS = ["kernelssl", "kernelssl-grad", "ckatorch", "ckatorch-compiled", "eager", "eager-compiled"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[20000])
    p.add_argument("--impl", nargs="+", default=["kernelssl"], choices=IMPLS)
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit-gib", type=int, default=20, help="address-space cap of each child (0: none)")
    a = p.parse_args()
    for n in a.n:
        for impl in a.impl:
            for dt in a.dtype:
                r = subprocess.run([sys.executable, "-c", CHILD, impl, str(n), dt, str(a.threads), str(a.limit_gib)],
                                   capture_output=True, text=True)
                print(r.stdout.strip() if r.returncode == 0 else json.dumps(
                    {"impl": impl, "n": n, "dtype": dt, "error": r.stderr.strip().splitlines()[-1:]}), flush=True)


if __name__ == "__main__":
    main()
