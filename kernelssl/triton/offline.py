"""Compiling the fused kernels for a GPU on a machine without one: record the launches the GPU path
issues, then compile each distinct variant with Triton's own compiler (and its bundled ptxas) for a
target, and read off registers, spills, shared memory and the tensor-core instructions.

The interpreter runs the kernels' arithmetic, but not Triton's GPU compiler: a ``tl.dot`` whose shapes
or operand dtypes the MMA cannot take, a layout conversion that does not fit shared memory, or tiles
that spill registers show up only when a kernel is compiled for a real target.  Used by
``tests/sm90_compile.py`` (the recipes per op, run by the tests) and ``benchmarks/perf_model.py`` (the
static performance model).  Needs ``TRITON_INTERPRET=0``: the kernels must be ``JITFunction`` s.

Also the sm_90 occupancy arithmetic (:data:`SM90`, :func:`occupancy`, :func:`wave_efficiency`), written
once for the ops' launch configurations, the tests and the performance model.  Importing this module
needs neither Triton nor a GPU.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import subprocess
import tempfile

__all__ = ["SM90", "tools_available", "Recorder", "recording", "rff_hsic_gpu_config", "compile_all", "occupancy",
           "programs_per_sm", "wave_efficiency"]

#: What sets an sm_90 GPU's (H100/H200 SXM) resident programs: SMs, 64 K registers, 2048 threads,
#: 228 KiB of shared memory with 1 KiB reserved per program, 32 programs per SM.
SM90 = {"sms": 132, "regs_per_sm": 65536, "threads_per_sm": 2048, "smem_per_sm": 233472, "smem_reserved": 1024,
        "blocks_per_sm": 32}


def tools_available() -> bool:
    """Whether Triton's bundled ptxas is installed."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    nvbin = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin")
    return os.path.exists(os.path.join(nvbin, "ptxas"))


class Recorder:
    """Stands in for ``torch.library.wrap_triton``: ``kernel[grid](*args, **kw)`` records the launch."""

    calls: list = []
    #: index in ``calls`` where the recipes with dimensions equal to 1 start (see :func:`compile_all`)
    ones_from: int | None = None
    tag: str | None = None  # set by a recipe: the case each recorded launch belongs to
    tags: list = []  # parallel to calls

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kw):
            Recorder.calls.append((self.kernel, grid, args, kw))
            Recorder.tags.append(Recorder.tag)

        return launch


def rff_hsic_gpu_config(R, setattr=setattr) -> None:
    """Make the rff_hsic module ``R`` pick its GPU block sizes (those of an H100 SXM, 132 SMs) for any
    tensors; ``setattr`` may be ``monkeypatch.setattr``."""
    import torch

    cuda = torch.device("cuda", 0)
    fwd_config, bwd_config = R._fwd_config, R._bwd_config
    setattr(R, "num_sms", lambda device: SM90["sms"])
    setattr(R, "_fwd_config", lambda device, *a: fwd_config(cuda, *a))
    setattr(R, "_bwd_config", lambda device, *a: bwd_config(cuda, *a))


@contextlib.contextmanager
def recording(op: str):
    """Record (do not run) every launch of ``op``'s host module and of the shared helpers: yields
    :attr:`Recorder.calls`, a list of ``(kernel, grid, args, kwargs)``."""
    modules = [importlib.import_module(m) for m in (f"kernelssl.triton.{op}_op", "kernelssl.triton._common")]
    saved = [m.wrap_triton for m in modules]
    Recorder.calls, Recorder.tags, Recorder.ones_from, Recorder.tag = [], [], None, None
    for m in modules:
        m.wrap_triton = Recorder
    try:
        yield Recorder.calls
    finally:
        for m, w in zip(modules, saved):
            m.wrap_triton = w


def compile_all(calls, ones_from: int | None = None) -> list[dict]:
    """Compile each distinct variant of ``calls``; ``ones: True`` marks a variant first recorded at or
    after index ``ones_from`` (the recipes with dimensions equal to 1: they must compile, but their
    speed, hence a spill, does not matter)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    arch = "sm_90a"  # what Triton builds for compute capability 9.0
    binders, seen, out = {}, set(), []
    tags = Recorder.tags if len(Recorder.tags) == len(calls) else [None] * len(calls)
    for index, ((kernel, _grid, args, kw), tag) in enumerate(zip(calls, tags)):
        if kernel not in binders:
            binders[kernel] = create_function_from_signature(kernel.signature, kernel.params, backend)
        kw = dict(kw)
        bound, spec, options = binders[kernel](*args, **kw)
        opts_key = repr(sorted(options.items())) if isinstance(options, dict) else repr(options)
        key = (kernel.fn.__name__, repr(spec), opts_key)
        if key in seen:
            continue
        seen.add(key)
        opts, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, spec, options)
        ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=opts.__dict__)
        with tempfile.TemporaryDirectory() as tmp:  # ptxas -v on Triton's PTX: the spill report
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(ck.asm["ptx"])
            report = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                                    capture_output=True, text=True, check=True).stderr
        field = lambda pattern: int(re.search(pattern, report).group(1))
        consts = {k[0] if isinstance(k, tuple) else k: v for k, v in constexprs.items()}
        names = [p.name for p in kernel.params]
        out.append({
            "kernel": kernel.fn.__name__,
            "constexprs": {names[i]: v for i, v in consts.items()
                           if isinstance(i, int) and isinstance(v, (int, float, str, bool))},
            "num_warps": opts.num_warps, "num_stages": opts.num_stages,
            "registers": field(r"Used (\d+) registers"), "stack": field(r"(\d+) bytes stack frame"),
            "spill_stores": field(r"(\d+) bytes spill stores"), "spill_loads": field(r"(\d+) bytes spill loads"),
            "shared": ck.metadata.shared,
            "wgmma": ck.asm["ptx"].count("wgmma.mma_async"), "mma_sync": ck.asm["ptx"].count("mma.sync"),
            "ones": ones_from is not None and index >= ones_from,
            # the first launch of this variant: its grid and the recipe's case (tag), if any
            "grid": [int(g) for g in _grid] if isinstance(_grid, tuple) else None, "case": tag,
        })
    return out


def occupancy(regs: int, warps: int, shared: int) -> int:
    """Resident programs per SM of an sm_90 variant with ``regs`` registers per thread (allocated per
    warp in units of 256), ``warps`` warps and ``shared`` bytes of shared memory (:data:`SM90`)."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = SM90["regs_per_sm"] // (per_warp * warps)
    by_threads = SM90["threads_per_sm"] // (32 * warps)
    by_smem = SM90["smem_per_sm"] // (shared + SM90["smem_reserved"])
    return max(0, min(SM90["blocks_per_sm"], by_regs, by_threads, by_smem))


def programs_per_sm(row: dict) -> int:
    """:func:`occupancy` of a compiled variant (a :func:`compile_all` row: ptxas' registers, Triton's
    shared memory)."""
    return occupancy(row["registers"], row["num_warps"], row["shared"])


def wave_efficiency(programs: int, slots: int) -> float:
    """``programs / (waves x slots)``: the busy fraction of ``slots`` program slots (SMs x programs per
    SM) over the waves a launch of ``programs`` programs takes, waves rounded up."""
    return programs / (-(-programs // slots) * slots)
