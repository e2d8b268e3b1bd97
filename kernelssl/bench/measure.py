"""Measuring calls: the device, the time of one call, interleaved repeats, peak extra memory, the
steps a benchmark times (forward, backward, forward+backward, metric), releasing memory after an OOM.

The one timing harness of the project: ``python -m kernelssl.bench`` (:mod:`.runner`), ``pytest
benchmarks`` (its ``conftest.py``: the steps and peak memory; pytest-benchmark's ``pedantic`` repeats
the step there) and the scripts in ``benchmarks/`` (``cpu_peer.py``, ``uniformity_memory.py``) all
measure through these functions.  How the numbers are read: docs/benchmarks.md.

Time: on a GPU between two CUDA events (the GPU time of the call's work, launch gaps included),
synchronised after the call; on a CPU wall time (``time.perf_counter``).  Repeats of several
implementations are **interleaved** (:func:`interleaved`: one call of each per round, in a seeded
random order), so a change in the machine's load hits all of them alike and no implementation always
runs after the same neighbour.

Peak extra memory is the peak minus the pre-call baseline.  CUDA: the caching allocator's peak
(``torch.cuda.max_memory_allocated``) above what was allocated before the call.  CPU: the process's
peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set
before the call, after ``malloc_trim(0)`` has handed glibc's cached free memory back to the OS
(without it, memory freed by an earlier call is reused unseen and the peak reads ~0).  Linux/glibc
only; elsewhere ``None``.  Seen here: repeated CPU measurements of one call agree within ~10-20%.
"""
from __future__ import annotations

import ctypes
import gc
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence

import torch

# --------------------------------------------------------------------------------------------------
# the device


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_gpu_memory() -> None:
    """Release what an out-of-memory case left behind (call it outside the ``except`` block, whose
    traceback keeps the failed call's tensors alive), so the next case starts from an empty cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# peak extra memory


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
    except (OSError, RuntimeError):
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


def process_peak_bytes() -> int:
    """The process's whole peak resident set (``VmHWM``: inputs and libraries included); Linux only."""
    return _status_kib("VmHWM") * 1024


# --------------------------------------------------------------------------------------------------
# time


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


def wall(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """``(seconds, fn())``: the wall time of one call, synchronised after it -- for a first call,
    whose compile, JIT or autotuning happens on the host."""
    t0 = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - t0, value


def one_call(fn: Callable[[], object], device: torch.device) -> tuple[float, int | None, object]:
    """``(seconds, peak extra bytes, fn())`` of one call: its wall time (synchronised) measured inside
    :func:`peak_extra_bytes`."""
    out: dict = {}

    def timed():
        out["seconds"], out["value"] = wall(fn, device)

    peak = peak_extra_bytes(timed, device)
    return out["seconds"], peak, out["value"]


def warm_up(fn: Callable[[], object], device: torch.device, calls: int = 1) -> None:
    """``calls`` untimed calls of ``fn()`` (compile, JIT, autotune caches, allocator), then a sync."""
    for _ in range(calls):
        fn()
    sync(device)


def interleaved(steps: dict[str, Callable[[], object]], device: torch.device, *, repeats: int,
                min_repeats: int = 3, budget_s: float | None = None,
                guard: Callable[[str, Callable[[], float]], float | None] | None = None,
                seed: int = 0, warm: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each step (:func:`time_one`), interleaved: each round calls every step once,
    so a change in the machine's load hits all of them alike, in an order drawn afresh each round
    (seeded by ``seed``: reproducible), so that no step always runs after the same neighbour (on the
    CPU the call before leaves its own data in the caches: a fixed order moved one step's time by ~10%
    against another's on this project's VM).  Up to ``repeats`` rounds; with ``budget_s``, the rounds
    stop after ``min_repeats`` once every step has spent ``budget_s`` seconds.

    ``warm``: each timed call comes right after an untimed call of the same step, so that what it finds in
    the caches is its own (what a loop of one step measures), whatever ran before it.

    ``guard(name, timed_call)``, where given, runs each timed call and returns its seconds, or None
    when the call failed (an out-of-memory, say): that step then leaves the rounds and the result."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    spent = dict.fromkeys(steps, 0.0)
    order = random.Random(seed)
    for rnd in range(repeats):
        names = list(times)
        order.shuffle(names)
        for name in names:
            def call(fn=steps[name]) -> float:
                if warm:
                    fn()  # untimed: the timed call finds this step's own data in the caches
                return time_one(fn, device)
            t = call() if guard is None else guard(name, call)
            if t is None:
                del times[name], spent[name]
                continue
            times[name].append(t)
            spent[name] += t
        if budget_s is not None and rnd + 1 >= min_repeats and all(s >= budget_s for s in spent.values()):
            break
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# --------------------------------------------------------------------------------------------------
# the steps a benchmark times

#: What a step of :func:`mode_step` runs: a training step's ``forward`` (autograd records what the
#: backward needs), its ``backward`` alone, both (``full``), or ``metric``: the forward under
#: ``torch.no_grad()`` (a loss used as an evaluation metric).
MODES = ("forward", "backward", "full")


def _leaves(inputs) -> list[torch.Tensor]:
    return [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]


def mode_call(fn: Callable[..., object], inputs: Sequence, mode: str, *, scalar=lambda out: out) -> None:
    """One untimed call of ``fn(*inputs)`` in ``mode`` (a warm-up): the forward under
    ``torch.no_grad()`` for ``metric``, else forward and backward of ``scalar(out)``, gradients
    cleared first."""
    if mode == "metric":
        with torch.no_grad():
            fn(*inputs)
        return
    for x in _leaves(inputs):
        x.grad = None
    scalar(fn(*inputs)).backward()


def mode_step(fn: Callable[..., object], inputs: Sequence, mode: str, device: torch.device, *,
              scalar=lambda out: out) -> tuple[Callable[[], tuple], Callable[..., object]]:
    """``(setup, target)`` timing one mode (:data:`MODES` or ``"metric"``) of ``fn(*inputs)``: ``setup()``
    (untimed, returns ``(args, kwargs)`` for ``target``, pytest-benchmark's ``pedantic`` convention)
    clears the inputs' gradients and, for ``backward``, runs the forward; ``target(*args)`` is the
    timed part, synchronised at its end.  ``scalar(out)`` turns the output into the loss to
    differentiate."""
    leaves = _leaves(inputs)

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

    if mode not in ("forward", "metric"):
        raise ValueError(f"mode: expected one of {MODES + ('metric',)}, got {mode!r}")

    def target():
        if mode == "metric":
            with torch.no_grad():
                out = fn(*inputs)
        else:
            out = fn(*inputs)
        sync(device)
        return out

    return clear, target


def step_peak_bytes(setup: Callable[[], tuple], target: Callable[..., object], device: torch.device) -> int | None:
    """Peak extra memory (:func:`peak_extra_bytes`) of one call of :func:`mode_step`'s ``target``."""
    args, kwargs = setup()
    return peak_extra_bytes(lambda: target(*args, **kwargs), device)
