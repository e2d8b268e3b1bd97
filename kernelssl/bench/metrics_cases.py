"""Benchmark cases of the representation-similarity metrics (``kernelssl.metrics``; docs/metrics.md):
exact Gaussian CKA of ``x (n, 64)`` against ``y (n, 32)``, the implementations side by side.

* ``eager``          -- Kornblith et al.'s published form (``gram_rbf``, ``center_gram``, ``cka`` of their
  ``representation_similarity`` code) transcribed to torch, float64 like their NumPy code: two dense
  ``n x n`` Grams, centred, their Frobenius inner product.
* ``eager-compiled`` -- that form under ``torch.compile``.
* ``ckatorch`` / ``ckatorch-compiled`` -- ``ckatorch.core.cka_base(kernel="rbf")`` (the package on the
  index; dense float64), eager and compiled, when it is installed (it is not a dependency).
* ``kernelssl``      -- ``kernelssl.metrics.cka(x, y, kernel="gaussian", sigma=s)``, the default
  backend (the fused kernels on a GPU, the streamed torch tier on a CPU).
* ``kernelssl-torch`` -- the same with ``backend="torch"`` (on a GPU, beside the kernels).

Every implementation computes the same kernel: ckatorch takes ``threshold`` times its own median
distance, so the common bandwidths are that median's (:func:`dense_median_sigma`, computed once,
untimed), passed to the others as numbers.  The values then agree (METRICS_TOL of the inputs' dtype),
which :func:`check` asserts against the float64 dense form before anything is timed.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

__all__ = ["SHAPES", "IMPLS", "DENSE", "available", "make_inputs", "kornblith_cka", "dense_median_sigma",
           "implementations", "check"]

#: ``n`` per scale (64 against 32 features); ``full`` stops where the dense forms need ~1 GiB per Gram.
SHAPES = {"smoke": [512], "full": [2000, 5000, 10000], "paper": [20000, 100000]}
IMPLS = ("eager", "eager-compiled", "ckatorch", "ckatorch-compiled", "kernelssl", "kernelssl-torch")
#: The dense implementations (several ``n x n`` float64 matrices live at once).
DENSE = ("eager", "eager-compiled", "ckatorch", "ckatorch-compiled")


def available(device: torch.device) -> tuple[str, ...]:
    """The implementations that can run on ``device`` (ckatorch only when installed; the ``-torch`` row
    only where the default is not already the torch tier)."""
    out = ["eager", "eager-compiled"]
    if importlib.util.find_spec("ckatorch") is not None:
        out += ["ckatorch", "ckatorch-compiled"]
    out.append("kernelssl")
    if device.type == "cuda":
        out.append("kernelssl-torch")
    return tuple(out)


def make_inputs(n: int, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (n, 64)``, ``y (n, 32)`` (``y`` a noisy projection of ``x``), fixed seed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=g)
    y = x @ torch.randn(64, 32, generator=g) / 8 + 0.5 * torch.randn(n, 32, generator=g)
    return x.to(device, dtype), y.to(device, dtype)


def _gram_rbf(x: torch.Tensor, s: float) -> torch.Tensor:
    dot = x @ x.T
    sq = torch.diagonal(dot)
    return torch.exp(-(sq[:, None] + sq[None, :] - 2.0 * dot) / (2.0 * s * s))


def _center_gram(gram: torch.Tensor) -> torch.Tensor:
    means = gram.mean(0)
    means = means - means.mean() / 2
    return gram - means[:, None] - means[None, :]


def kornblith_cka(x: torch.Tensor, y: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """Kornblith et al.'s biased CKA with RBF Grams of bandwidths ``sx``, ``sy``, float64, dense."""
    kx = _center_gram(_gram_rbf(x.double(), sx))
    ky = _center_gram(_gram_rbf(y.double(), sy))
    return kx.ravel().dot(ky.ravel()) / (torch.linalg.norm(kx) * torch.linalg.norm(ky))


#: The most rows the dense forms run at here (several n x n float64 matrices live at once); up to it the
#: common bandwidth is ckatorch's rule (:func:`dense_median_sigma`), past it kernelssl's median rule.
DENSE_MAX_ROWS = 10000


def dense_median_sigma(a: torch.Tensor) -> float:
    """``sqrt(torch.median(d2))`` of the dense float64 squared distances of ``a``, diagonal included: the
    bandwidth ckatorch's ``rbf_kernel`` takes with ``threshold=1`` (the lower middle value)."""
    a = a.double()
    dot = a @ a.T
    sq = torch.diagonal(dot)
    return float(torch.median(-2 * dot + sq[:, None] + sq[None, :])) ** 0.5


def implementations(x: torch.Tensor, y: torch.Tensor, impls=IMPLS) -> tuple[dict[str, Callable], tuple]:
    """``({impl: fn(x, y)}, (sx, sy))`` for the requested implementations, all with the same bandwidths
    (numbers): ckatorch's rule (:func:`dense_median_sigma`, which ``cka_base(threshold=1)`` computes
    inside) up to :data:`DENSE_MAX_ROWS` rows, else kernelssl's median rule."""
    from kernelssl.metrics import cka, median_sigma

    if x.shape[0] <= DENSE_MAX_ROWS:
        sx, sy = dense_median_sigma(x), dense_median_sigma(y)
    else:
        sx, sy = float(median_sigma(x)), float(median_sigma(y))
    fns: dict[str, Callable] = {}
    for impl in impls:
        if impl == "eager":
            fns[impl] = lambda a, b: kornblith_cka(a, b, sx, sy)
        elif impl == "eager-compiled":
            fns[impl] = torch.compile(lambda a, b: kornblith_cka(a, b, sx, sy))
        elif impl.startswith("ckatorch"):
            from ckatorch.core import cka_base

            f = lambda a, b: cka_base(a, b, kernel="rbf", threshold=1.0)
            fns[impl] = torch.compile(f) if impl.endswith("compiled") else f
        elif impl == "kernelssl":
            fns[impl] = lambda a, b: cka(a, b, kernel="gaussian", sigma=(sx, sy))
        elif impl == "kernelssl-torch":
            fns[impl] = lambda a, b: cka(a, b, kernel="gaussian", sigma=(sx, sy), backend="torch")
    return fns, (sx, sy)


def check(value: float, reference: float, dtype: torch.dtype) -> None:
    """The implementation's CKA equals the float64 dense form's (METRICS_TOL of the inputs' dtype)."""
    from kernelssl.numerics import METRICS_TOL

    tol = METRICS_TOL[dtype if dtype == torch.float64 else torch.float32]
    if not abs(value - reference) <= tol["rtol"] * abs(reference) + tol["atol"]:
        raise AssertionError(f"CKA {value!r} differs from the dense float64 form's {reference!r} (tolerance {tol})")
