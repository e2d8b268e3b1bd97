"""Side-by-side implementations of each loss on the same inputs, for the main job and the benchmarks.

``implementations(loss, ...)`` returns ``{name: fn}`` where every ``fn(*inputs)`` computes the same
scalar loss with the papers' default hyper-parameters:

* ``"torch"`` -- the library's torch path through the public functional API (``backend="torch"``);
* ``"eager"`` -- the form the papers' code computes (materialised Gram for SFRIK, all matrix powers in
  m-space for MEC, features recomputed per term for HSIC): the benchmark baseline;
* ``"compile"`` -- ``torch.compile`` of the torch path (only when asked for: it compiles);
* ``"triton"`` -- the fused kernel, once the op's kernel has landed and runs on the inputs' device.

``make_inputs(loss, shape, ...)`` draws random inputs of a named shape.  HSIC's random features are
drawn once per case (from ``seed``) so that every implementation sees the same maps.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import functional as KF
from . import hsic as _hsic
from . import mec as _mec
from . import sfrik as _sfrik
from ._backend import TRITON_OPS
from .rff import sample_imq_rff

LOSSES = ("hsic", "sfrik", "mec")


def make_inputs(
    loss: str, shape: dict, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Leaf input tensors (requires_grad where the loss differentiates them).

    shape keys -- hsic: K, B, d (and D, used by :func:`implementations`); sfrik: n, q; mec: m, d.
    MEC gets online outputs (with grad) and teacher outputs (without), like a training step.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*s, grad=True):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

    if loss == "hsic":
        return (randn(shape["K"], shape["B"], shape["d"]),)
    if loss == "sfrik":
        return randn(shape["n"], shape["q"]), randn(shape["n"], shape["q"])
    if loss == "mec":
        m, d = shape["m"], shape["d"]
        return randn(m, d), randn(m, d), randn(m, d, grad=False), randn(m, d, grad=False)
    raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")


_OPS = {"hsic": "rff_hsic", "sfrik": "legendre_gram_mean", "mec": "taylor_logdet"}


def available(loss: str, device: str | torch.device, *, compile: bool = False) -> tuple[str, ...]:
    """Names of the implementations of ``loss`` that can run on ``device``."""
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    names = ["eager", "torch"]
    if compile:
        names.append("compile")
    if _OPS[loss] in TRITON_OPS and torch.device(device).type == "cuda":
        names.append("triton")
    return tuple(names)


def hsic_maps(shape: dict, *, device: str | torch.device = "cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(w_a, b_a, w_b, b_b)``: the two RFF maps (d = ``shape["d"]``, D = ``shape.get("D", 512)``) that
    every HSIC implementation of :func:`implementations` uses for ``seed``."""
    d, D = shape["d"], shape.get("D", 512)
    g = torch.Generator().manual_seed(seed)
    w_a, b_a = sample_imq_rff(d, D, generator=g, device=device)
    w_b, b_b = sample_imq_rff(d, D, generator=g, device=device)
    return w_a, b_a, w_b, b_b


def implementations(
    loss: str,
    shape: dict,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    compile: bool = False,
) -> dict[str, Callable[..., torch.Tensor]]:
    """``{name: fn(*inputs) -> scalar loss}`` for :func:`available` implementations."""
    device = torch.device(device)
    names = available(loss, device, compile=compile)
    if loss == "hsic":
        w_a, b_a, w_b, b_b = hsic_maps(shape, device=device, seed=seed)

        def run(fn):
            return lambda views: _hsic.hsic_loss(*fn(views, w_a, b_a, w_b, b_b, 1.0), gamma=3.0)

        impls = {
            "eager": run(_hsic.rff_hsic_eager),
            "torch": run(lambda *a: KF.rff_hsic(*a, backend="torch")),
            "triton": run(lambda *a: KF.rff_hsic(*a, backend="triton")),
        }
    elif loss == "sfrik":
        impls = {
            "eager": lambda za, zb: _sfrik.sfrik_loss(za, zb, eager=True)[0],
            "torch": lambda za, zb: KF.sfrik_loss(za, zb, backend="torch"),
            "triton": lambda za, zb: KF.sfrik_loss(za, zb, backend="triton"),
        }
    else:
        impls = {
            "eager": lambda za, zb, pa, pb: _mec.mec_loss(za, zb, pa, pb, eager=True)[0],
            "torch": lambda za, zb, pa, pb: KF.mec_loss(za, zb, pa, pb, backend="torch"),
            "triton": lambda za, zb, pa, pb: KF.mec_loss(za, zb, pa, pb, backend="triton"),
        }
    if compile:
        impls["compile"] = torch.compile(impls["torch"])
    return {name: impls[name] for name in names}


def forward_backward(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One training-style step of the loss alone: forward, backward, gradients cleared first."""
    for x in inputs:
        x.grad = None
    loss = fn(*inputs)
    loss.backward()
    return loss.detach()
