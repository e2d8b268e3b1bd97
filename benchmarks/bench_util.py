"""Helpers of the benchmarks: the device, the scale, and peak extra memory of one call.

Peak extra memory is the peak minus the pre-call baseline.

CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``) above what was allocated
before the call.  CPU: the process's peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs``) above the resident set before the call, after ``malloc_trim(0)`` has
handed glibc's cached free memory back to the OS (without it, memory freed by an earlier call is
reused unseen and the peak reads ~0).  Linux/glibc only; elsewhere ``None``.  Seen here: repeated
CPU measurements of one call agree within ~10-20%.
"""
from __future__ import annotations

import ctypes
import gc
import platform
from typing import Callable

import torch


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def bench_scale(config) -> str:
    """``--bench-scale``, defaulting to ``paper`` on CUDA and ``smoke`` on CPU."""
    return config.getoption("--bench-scale") or ("paper" if bench_device().type == "cuda" else "smoke")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _malloc_trim() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _can_reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False
    except RuntimeError:
        return False


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes of memory ``fn()`` needs above what was in use before it ran (None if unmeasurable)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not (_malloc_trim() and _can_reset_cpu_peak()):
        return None
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    fn()
    return max(0, (_status_kib("VmHWM") - base) * 1024)


MODES = ("forward", "backward", "full")


def free_gpu_memory() -> None:
    """Release what an out-of-memory case left behind (call it outside the ``except`` block, whose
    traceback keeps the failed call's tensors alive), so the next case starts from an empty cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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
    from kernelssl._cases import available

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
