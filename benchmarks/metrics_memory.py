"""Peak memory and time of exact Gaussian CKA on the CPU: ``kernelssl.metrics.cka`` (streamed Gram tiles)
against ckatorch's ``cka_base(kernel="rbf")`` (dense float64 Grams), each case in a fresh subprocess
(docs/metrics.md).

Per case (implementation, n) a child process builds ``x (n, 64)`` and ``y (n, 32)`` (float32, fixed
seed; ``y`` a noisy random projection of ``x``), runs the metric once at n = 256 (libraries loaded,
allocator warm), then measures one call with :func:`kernelssl.bench.measure.one_call`: the peak
resident set above the resident set just before the call (``VmHWM`` after ``/proc/self/clear_refs``)
and the wall time.  kernelssl runs ``sigma="median"`` (its stated median rule); ckatorch its own
(``torch.median`` of its float64 squared distances).  Run from the repository root::

    PYTHONPATH=. python benchmarks/metrics_memory.py --n 20000 --impl kernelssl --dtype float32 float64
    PYTHONPATH=. python benchmarks/metrics_memory.py --n 5000 --impl kernelssl ckatorch
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch
from kernelssl.bench import measure as Ms
from kernelssl.metrics import cka
impl, n, dtype, threads = sys.argv[1], int(sys.argv[2]), getattr(torch, sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
if impl == "ckatorch":
    from ckatorch.core import cka_base
    fn = lambda x, y: cka_base(x, y, kernel="rbf")
else:
    fn = lambda x, y: cka(x, y, kernel="gaussian")
def data(m):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, 64, generator=g)
    y = x @ torch.randn(64, 32, generator=g) / 8 + 0.5 * torch.randn(m, 32, generator=g)
    return x.to(dtype), y.to(dtype)
with torch.no_grad():
    fn(*data(256))
    x, y = data(n)
    s, peak, v = Ms.one_call(lambda: fn(x, y), torch.device("cpu"))
print(json.dumps({"impl": impl, "n": n, "dtype": str(dtype), "seconds": s, "peak_extra_MiB": peak / 2**20,
                  "cka": float(v), "threads": threads}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[20000])
    p.add_argument("--impl", nargs="+", default=["kernelssl"], choices=["kernelssl", "ckatorch"])
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    for n in a.n:
        for impl in a.impl:
            for dt in a.dtype:
                r = subprocess.run([sys.executable, "-c", CHILD, impl, str(n), dt, str(a.threads)],
                                   capture_output=True, text=True)
                print(r.stdout.strip() if r.returncode == 0 else json.dumps(
                    {"impl": impl, "n": n, "dtype": dt, "error": r.stderr.strip().splitlines()[-1:]}), flush=True)


if __name__ == "__main__":
    main()
