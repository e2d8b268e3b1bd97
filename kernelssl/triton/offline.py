"""Compiling the fused kernels for a GPU on a machine without one: record the launches the GPU path
issues on a target (:mod:`kernelssl.triton.targets`), then compile each distinct variant with Triton's
own compiler for it (NVIDIA: the bundled ptxas; AMD: Triton's AMDGCN backend), and read off registers,
spills, shared memory and the matrix-unit instructions.

The interpreter runs the kernels' arithmetic, but not Triton's GPU compiler: a ``tl.dot`` whose shapes
or operand dtypes the MMA cannot take, a layout conversion that does not fit shared memory, or tiles
that spill registers show up only when a kernel is compiled for a real target.  Used by
``tests/compile_targets.py`` (the recipes per op, run by the tests) and ``benchmarks/perf_model.py`` (the
static performance model).  Needs ``TRITON_INTERPRET=0``: the kernels must be ``JITFunction`` s.

Also the occupancy arithmetic (:func:`occupancy`, :func:`wave_efficiency`; :data:`SM90` the figures of
an sm_90 GPU, from its :class:`~kernelssl.triton.targets.Target`), written once for the ops' launch
configurations, the tests and the performance model.  Importing this module
needs neither Triton nor a GPU.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import subprocess
import tempfile

from .targets import TARGETS, Target, assume, lookup

__all__ = ["SM90", "SMEM_RESERVED", "resources", "tools_available", "Recorder", "recording", "rff_hsic_gpu_config",
           "compile_all", "occupancy", "programs_per_sm", "wave_efficiency"]

#: Shared memory the driver reserves per resident program (NVIDIA sm_80+; bytes).
SMEM_RESERVED = 1024


def resources(t: Target) -> dict:
    """What sets ``t``'s resident programs, as :func:`occupancy` reads them (1 KiB reserved per program on NVIDIA)."""
    return {"sms": t.sms, "regs_per_sm": t.regs_per_sm, "threads_per_sm": t.threads_per_sm,
            "smem_per_sm": t.smem_per_sm, "smem_reserved": SMEM_RESERVED if t.vendor == "nvidia" else 0,
            "blocks_per_sm": t.blocks_per_sm}


#: What sets an sm_90 GPU's (H100/H200 SXM) resident programs: SMs, 64 K registers, 2048 threads,
#: 228 KiB of shared memory with 1 KiB reserved per program, 32 programs per SM.
SM90 = resources(TARGETS["sm_90"])


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
    """Make the rff_hsic module ``R`` pick its GPU block sizes (those of the target :func:`targets.target_of`
    gives CPU tensors: an H100 SXM, 132 SMs, unless :func:`targets.assume` names another) for any tensors,
    interpreter or not; ``setattr`` may be ``monkeypatch.setattr``."""
    import torch

    from .targets import target_of

    cuda = torch.device("cuda", 0)
    fwd_config, bwd_config = R._fwd_config, R._bwd_config
    setattr(R, "num_sms", lambda device: target_of(None).sms)
    setattr(R, "target_of", lambda device: target_of(None))
    setattr(R, "_fwd_config", lambda device, *a: fwd_config(cuda, *a))
    setattr(R, "_bwd_config", lambda device, *a: bwd_config(cuda, *a))


@contextlib.contextmanager
def recording(op: str, target: str = "sm_90"):
    """Record (do not run) every launch of ``op``'s host module and of the shared helpers, the CPU
    tensors taken to be on ``target``: yields :attr:`Recorder.calls`, a list of ``(kernel, grid, args,
    kwargs)``."""
    modules = [importlib.import_module(m) for m in (f"kernelssl.triton.{op}_op", "kernelssl.triton._common")]
    saved = [m.wrap_triton for m in modules]
    Recorder.calls, Recorder.tags, Recorder.ones_from, Recorder.tag = [], [], None, None
    for m in modules:
        m.wrap_triton = Recorder
    try:
        with assume(target):
            yield Recorder.calls
    finally:
        for m, w in zip(modules, saved):
            m.wrap_triton = w


def _ptxas_report(ptx: str, cc: int) -> dict:
    """Registers, stack frame and spills of Triton's PTX for compute capability ``cc`` (``ptxas -v``)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"  # what Triton builds for the capability
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        report = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True, check=True).stderr
    field = lambda pattern: int(re.search(pattern, report).group(1))
    return {"registers": field(r"Used (\d+) registers"), "stack": field(r"(\d+) bytes stack frame"),
            "spill_stores": field(r"(\d+) bytes spill stores"), "spill_loads": field(r"(\d+) bytes spill loads")}


def _amdgcn_report(asm: str) -> dict:
    """VGPRs, scratch and spills from the metadata of Triton's AMDGCN assembly: ``spill_stores`` is the
    bytes of scratch (private segment) per lane when any VGPR/SGPR is spilled, the scratch size also
    as ``stack``; ``mfma`` the matrix-core instructions."""
    def field(pattern, default=0):
        m = re.search(pattern, asm)
        return int(m.group(1)) if m else default

    vgpr_spill = field(r"\.vgpr_spill_count:\s+(\d+)")
    sgpr_spill = field(r"\.sgpr_spill_count:\s+(\d+)")
    scratch = field(r"\.private_segment_fixed_size:\s+(\d+)")
    return {"registers": field(r"\.vgpr_count:\s+(\d+)"), "agprs": field(r"\.agpr_count:\s+(\d+)"),
            "stack": scratch, "vgpr_spills": vgpr_spill, "sgpr_spills": sgpr_spill,
            "spill_stores": scratch if (vgpr_spill or sgpr_spill) else 0,
            "spill_loads": scratch if (vgpr_spill or sgpr_spill) else 0,
            "mfma": len(re.findall(r"^\s*v_mfma", asm, re.M))}


def compile_all(calls, ones_from: int | None = None, target: str | Target = "sm_90") -> list[dict]:
    """Compile each distinct variant of ``calls`` for ``target`` (a name of
    :data:`~kernelssl.triton.targets.TARGETS`); ``ones: True`` marks a variant first recorded at or
    after index ``ones_from`` (the recipes with dimensions equal to 1: they must compile, but their
    speed, hence a spill, does not matter).  Each row: the kernel, its constexprs, warps, stages,
    registers, stack, spills (bytes), shared memory (bytes), the matrix-unit instructions (NVIDIA:
    ``wgmma``, ``mma_sync``; AMD: ``mfma``; all of them in ``tensor_core``), ``ones``, the grid and
    case of its first launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    tgt = lookup(target) if isinstance(target, str) else target
    gpu_target = GPUTarget(*tgt.gpu_target)
    backend = make_backend(gpu_target)
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
        ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=gpu_target,
                            options=opts.__dict__)
        if tgt.vendor == "nvidia":
            ptx = ck.asm["ptx"]
            res = _ptxas_report(ptx, tgt.arch)
            res.update(wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"))
            res["tensor_core"] = res["wgmma"] + res["mma_sync"]
        else:
            res = _amdgcn_report(ck.asm["amdgcn"])
            res["tensor_core"] = res["mfma"]
        consts = {k[0] if isinstance(k, tuple) else k: v for k, v in constexprs.items()}
        names = [p.name for p in kernel.params]
        out.append({
            "kernel": kernel.fn.__name__, "target": tgt.name,
            "constexprs": {names[i]: v for i, v in consts.items()
                           if isinstance(i, int) and isinstance(v, (int, float, str, bool))},
            "num_warps": opts.num_warps, "num_stages": opts.num_stages,
            **res,
            "shared": ck.metadata.shared, "shared_limit": tgt.smem_per_block,
            "ones": ones_from is not None and index >= ones_from,
            # the first launch of this variant: its grid and the recipe's case (tag), if any
            "grid": [int(g) for g in _grid] if isinstance(_grid, tuple) else None, "case": tag,
        })
    return out


def occupancy(regs: int, warps: int, shared: int, target: str | Target = "sm_90") -> int:
    """Resident programs per SM of an NVIDIA variant with ``regs`` registers per thread (allocated per
    warp in units of 256), ``warps`` warps and ``shared`` bytes of shared memory on ``target``
    (:data:`SM90` for sm_90)."""
    res = resources(lookup(target) if isinstance(target, str) else target)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = res["regs_per_sm"] // (per_warp * warps)
    by_threads = res["threads_per_sm"] // (32 * warps)
    by_smem = res["smem_per_sm"] // (shared + res["smem_reserved"])
    return max(0, min(res["blocks_per_sm"], by_regs, by_threads, by_smem))


def programs_per_sm(row: dict) -> int:
    """:func:`occupancy` of a compiled variant (a :func:`compile_all` row: ptxas' registers, Triton's
    shared memory) on its target (sm_90 for a row without one)."""
    return occupancy(row["registers"], row["num_warps"], row["shared"], row.get("target", "sm_90"))


def wave_efficiency(programs: int, slots: int) -> float:
    """``programs / (waves x slots)``: the busy fraction of ``slots`` program slots (SMs x programs per
    SM) over the waves a launch of ``programs`` programs takes, waves rounded up."""
    return programs / (-(-programs // slots) * slots)
