"""Measuring one call: the device, peak extra memory, time, and releasing memory after an OOM.

Shared by ``python -m kernelssl.bench`` and ``pytest benchmarks/`` (``benchmarks/bench_util.py``
imports these).

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
import statistics
import time
from collections.abc import Callable

import torch


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not (_malloc_trim() and _can_reset_cpu_peak()):
        return None
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    fn()
    return max(0, (_status_kib("VmHWM") - base) * 1024)


def free_gpu_memory() -> None:
    """Release what an out-of-memory case left behind (call it outside the ``except`` block, whose
    traceback keeps the failed call's tensors alive), so the next case starts from an empty cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_one(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn()``: between two CUDA events on a GPU (synchronised after the
    call), wall time (``time.perf_counter``) on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_calls(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, repeats: int = 5,
               min_repeats: int = 3, budget_s: float | None = None) -> list[float]:
    """Seconds per call of ``fn()``: ``warmup`` untimed calls, then up to ``repeats`` timed ones (at
    least ``min_repeats``; fewer than ``repeats`` once ``budget_s`` seconds of timed calls have passed).

    CUDA: each call between two CUDA events (the GPU time of the call's work, launch gaps included),
    synchronised after each call.  CPU: wall time (``time.perf_counter``).
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats:
        t = time_one(fn, device)
        times.append(t)
        spent += t
        if budget_s is not None and len(times) >= min_repeats and spent >= budget_s:
            break
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)
