"""``python -m kernelssl.bench``: is kernelssl correct on this machine, and how much faster is it than what
a user would write?  One command, minutes, with plots.

Per loss (SSL-HSIC, SFRIK, MEC, Wang & Isola's uniformity) and dtype: every implementation is first
checked against the float64 torch path on a small case (loss and input gradients, the tolerances of
docs/numerics.md; a wrong one is reported loudly and not timed), then forward+backward time and peak
extra memory are measured side by side at the device's target shapes and a batch-size sweep: the
papers' form eager and under ``torch.compile``, kernelssl's default call and its ``torch.compile``,
on a GPU the torch path and the Triton kernel at each ``input_precision``, and the ``limit`` (the
op's essential matrix products alone).  Outputs in ``--out``: ``results.json``, ``results.md`` (the
ratios), PNG plots.

The cases are :mod:`kernelssl.bench.cases` -- the same ones ``pytest benchmarks/`` runs.

Modules: :mod:`.runner` (the run), :mod:`.report` (JSON, markdown, plots, summary), :mod:`.measure`
(the timing harness: time and peak extra memory of a call, interleaved repeats), :mod:`.cases` (the
implementations and every benchmark shape), :mod:`.launch_costs` (the performance model's pricing,
used by ``benchmarks/perf_model.py``).  docs/benchmarks.md, docs/perf-model.md.
"""
from .runner import Config, run  # noqa: F401
