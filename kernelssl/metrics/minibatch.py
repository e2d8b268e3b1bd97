"""Minibatch CKA (Nguyen, Raghu & Kornblith, ICLR 2021): the CKA matrix between two lists of layers,
accumulated over minibatches (docs/metrics.md).

For minibatch ``b`` with layers ``x_i`` (model A) and ``y_j`` (model B) on the same inputs::

    CKA_ij = sum_b HSIC_u(K_i^b, L_j^b) / sqrt(sum_b HSIC_u(K_i^b, K_i^b) * sum_b HSIC_u(L_j^b, L_j^b))

(the ratio of the minibatch means: the unbiased estimator keeps the mean over minibatches unbiased).
The sums are float64 tensors on the inputs' device; :meth:`MinibatchCKA.sync_distributed` all-reduces
them, so a run on several ranks equals one process that saw every rank's minibatches.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_int, describe
from ..ops._common import compute_dtype
from .similarity import DEFAULT_NUM_FEATURES, _estimate, _prepare, _statistics

__all__ = ["MinibatchCKA"]


def _layers(v, name: str) -> list[Tensor]:
    if isinstance(v, Tensor):
        return [v]
    if not isinstance(v, Sequence) or len(v) == 0:
        raise TypeError(f"{name}: expected a tensor or a non-empty list of tensors (one per layer), got {describe(v)}")
    return list(v)


class MinibatchCKA:
    """Accumulates the unbiased HSICs of every layer pair over minibatches; :meth:`compute` returns the
    ``(num_x_layers, num_y_layers)`` CKA matrix (float64).

    ``num_x_layers``/``num_y_layers``: the list lengths :meth:`update` expects (None: taken from the
    first update).  ``kernel``, ``sigma``, ``exact``, ``num_features``, ``generator``: as in
    :func:`kernelssl.metrics.hsic` (``sigma`` one number or ``"median"``, applied to every layer, per
    minibatch), and ``backend``.  Each minibatch needs at least 4 rows.  A constant layer gives a NaN row or column.
    """

    def __init__(self, num_x_layers: int | None = None, num_y_layers: int | None = None, *, kernel: str = "linear",
                 sigma=None, exact: bool = True, num_features: int = DEFAULT_NUM_FEATURES,
                 generator: torch.Generator | None = None, backend: str = "auto"):
        if num_x_layers is not None:
            check_int(num_x_layers, "num_x_layers", minimum=1)
        if num_y_layers is not None:
            check_int(num_y_layers, "num_y_layers", minimum=1)
        if isinstance(sigma, (tuple, list)):
            raise TypeError(f"sigma: expected None, a positive number or 'median', got {describe(sigma)}")
        self._given_layers = (num_x_layers, num_y_layers)
        self.kernel, self.sigma, self.exact = kernel, sigma, exact
        self.num_features, self.generator, self.backend = num_features, generator, backend
        self.reset()

    def reset(self) -> None:
        """Forget every minibatch, and the layer counts taken from the first update (those given to the
        constructor stay)."""
        self.num_x_layers, self.num_y_layers = self._given_layers
        self.xy: Tensor | None = None  # (na, nb) sum of HSIC_u(K_i, L_j)
        self.xx: Tensor | None = None  # (na,)   sum of HSIC_u(K_i, K_i)
        self.yy: Tensor | None = None  # (nb,)   sum of HSIC_u(L_j, L_j)
        self.num_batches: Tensor | None = None

    @torch.no_grad()
    def update(self, xs, ys) -> None:
        """Add one minibatch: ``xs`` the layers of model A (a tensor or a list of ``(n, d_i)`` tensors),
        ``ys`` those of model B, the same ``n`` rows (the same inputs)."""
        xs, ys = _layers(xs, "xs"), _layers(ys, "ys")
        for got, want, nm in ((len(xs), self.num_x_layers, "xs"), (len(ys), self.num_y_layers, "ys")):
            if want is not None and got != want:
                raise ValueError(f"{nm}: expected {want} layers, got {got}")
        self.num_x_layers, self.num_y_layers = len(xs), len(ys)
        reps, sig = [], None
        for x in xs:  # each layer checked against a partner of the other model (rows, device, n >= 4)
            a, _, sig = _prepare(x, ys[0], self.kernel, self.sigma, True, self.exact, self.num_features,
                                 self.generator, self.backend)
            reps.append(a)
        for y in ys:
            reps.append(_prepare(xs[0], y, self.kernel, self.sigma, True, self.exact, self.num_features,
                                 self.generator)[1])
        cdt = compute_dtype(*reps)
        reps = [r.to(cdt) for r in reps]
        n, na, nb = reps[0].shape[0], len(xs), len(ys)
        pairs = [(i, na + j) for i in range(na) for j in range(nb)]
        st = _statistics(reps, self.kernel, (sig[0],) * len(reps), self.exact, self.num_features, self.generator,
                         self.backend, pairs)
        dev = reps[0].device
        xy = torch.stack([torch.stack([_estimate(st, i, na + j, n, True) for j in range(nb)]) for i in range(na)])
        xx = torch.stack([_estimate(st, i, i, n, True) for i in range(na)])
        yy = torch.stack([_estimate(st, na + j, na + j, n, True) for j in range(nb)])
        if self.xy is None:
            f64 = dict(dtype=torch.float64, device=dev)
            self.xy, self.xx, self.yy = torch.zeros(na, nb, **f64), torch.zeros(na, **f64), torch.zeros(nb, **f64)
            self.num_batches = torch.zeros((), **f64)
        self.xy += xy.to(torch.float64)
        self.xx += xx.to(torch.float64)
        self.yy += yy.to(torch.float64)
        self.num_batches += 1

    def compute(self) -> Tensor:
        """The ``(num_x_layers, num_y_layers)`` CKA matrix, float64."""
        if self.xy is None:
            raise RuntimeError("compute: no minibatch yet (call update(xs, ys) first)")
        return self.xy / (torch.sqrt(self.xx)[:, None] * torch.sqrt(self.yy)[None, :])  # no underflow of the product

    def sync_distributed(self, group=None) -> None:
        """All-reduce (sum) the accumulated sums over the ranks of ``group`` (the default process
        group when None); call it once, on every rank, before :meth:`compute`."""
        import torch.distributed as dist

        if self.xy is None:
            raise RuntimeError("sync_distributed: no minibatch yet on this rank (call update first)")
        for t in (self.xy, self.xx, self.yy, self.num_batches):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
