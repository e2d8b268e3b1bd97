"""Helpers of the benchmarks: the device, the scale, the modes and the sweeps' parametrisation.

The measurement itself (device name, peak extra memory of one call, releasing memory after an
out-of-memory case) lives in the package, :mod:`kernelssl.bench.measure`, shared with
``python -m kernelssl.bench``; it is imported from there.
"""
from __future__ import annotations

import torch

from kernelssl.bench.measure import (  # noqa: F401  (re-exported for the benchmark modules)
    bench_device,
    device_name,
    free_gpu_memory,
    peak_extra_bytes,
    sync,
)


def bench_scale(config) -> str:
    """``--bench-scale``, defaulting to ``paper`` on CUDA and ``smoke`` on CPU."""
    return config.getoption("--bench-scale") or ("paper" if bench_device().type == "cuda" else "smoke")


MODES = ("forward", "backward", "full")


def mode_step(fn, inputs, mode: str, device: torch.device, *, scalar=lambda out: out):
    """``(setup, target)`` for pytest-benchmark's ``pedantic``, timing one mode of ``fn(*inputs)``:
    ``forward`` (a training step's forward: autograd records what the backward needs), ``backward``
    (the forward runs in ``setup``, outside the timed region) or ``full``.  ``scalar(out)`` turns the
    output into the loss to differentiate.  Gradients of the inputs are cleared before each round."""
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def clear():
        for x in leaves:
            x.grad = None
        sync(device)
        return (), {}

    if mode == "backward":
        def setup():
            clear()
            loss = scalar(fn(*inputs))
            sync(device)
            return (loss,), {}

        def target(loss):
            loss.backward()
            sync(device)

        return setup, target

    if mode == "full":
        def target():
            loss = scalar(fn(*inputs))
            loss.backward()
            sync(device)
            return loss

        return clear, target

    def target():
        out = fn(*inputs)
        sync(device)
        return out

    return clear, target


def step_peak_bytes(setup, target, device: torch.device) -> int | None:
    """Peak extra memory of one timed round of :func:`mode_step`'s ``target``."""
    args, _ = setup()
    return peak_extra_bytes(lambda: target(*args), device)


def parametrize_sweep(metafunc, loss: str, op: str, cases, tf32_variant: str | None = None,
                      tf32_cases=()) -> None:
    """Parametrize ``op_case`` with ``(shape, dtype, mode, impl)`` for every ``(shape, dtype, mode)`` of
    ``cases`` and every implementation of ``loss`` that runs on this device.  Where the Triton kernel
    runs, the ``(shape, dtype, mode)`` in ``tf32_cases`` (fp32 ones) also get the implementation
    ``tf32_variant`` (e.g. ``"triton-tf32x3"``): the kernel with its TF32 opt-in, timed beside the
    IEEE-fp32 default, so one GPU run tells whether the opt-in pays."""
    from kernelssl.bench.cases import available

    if "op_case" not in metafunc.fixturenames:
        return
    device = bench_device()
    params, ids = [], []
    for shape, dtype, mode in cases:
        impls = available(loss, device, compile=device.type == "cuda")
        if tf32_variant and "triton" in impls and (shape, dtype, mode) in tf32_cases:
            impls += (tf32_variant,)
        for impl in impls:
            params.append((shape, dtype, mode, impl))
            dims = "-".join(f"{k}{v}" for k, v in shape.items())
            ids.append(f"{op}-{mode}-{dims}-{str(dtype)[6:]}-{impl}")
    metafunc.parametrize("op_case", params, ids=ids)
