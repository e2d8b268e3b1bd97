"""Host-side helpers every fused op shares: the launch wrapper, the SM count, the ops' registration.

**Launches** go through :func:`wrap_triton` (``wrap_triton(kernel)[grid](*args, **kwargs)``), which adds
two things to ``torch.library.wrap_triton``:

* **The device guard.**  Triton launches on the *current* CUDA device and its current stream, while
  torch allocates on the tensors' device.  With tensors on ``cuda:1`` and the current device 0 (a DDP
  script that moves its model with ``.to(f"cuda:{rank}")`` but never calls ``set_device``), an
  unguarded launch would run on the wrong device, or on a stream torch does not order against.  Each
  launch therefore runs inside ``torch.cuda.device(t.device)`` of its first tensor argument (all of a
  launch's tensors are on one device: the functional API checks it).  No-op for CPU tensors (the
  interpreter) and for fake tensors while ``torch.compile`` traces: the code inductor generates for
  the kernels guards the device itself.
* **The interpreter** (``TRITON_INTERPRET=1``, the CPU tests).  ``@triton.jit`` then gives
  ``InterpretedFunction`` objects, which cannot be captured into a graph: they are launched directly,
  and skipped on fake tensors (shape propagation: the launcher's allocations are the outputs' shapes,
  so every launcher is its op's fake implementation on every target).  Real ``JITFunction`` s go
  through ``torch.library.wrap_triton``, so ``torch.compile`` sees them.  Triton 3.6's interpreter
  also converts a scalar argument to an index (``range(0, q, BLOCK)``) with ``int()`` of a
  one-element array, which NumPy >= 2.4 refuses; while interpreting on such a Triton,
  :func:`_fix_interpreter_index` makes that conversion take the element (Triton 3.8 squeezes first).

**Registration** (:func:`register`): each fused op is a pair of ``torch.library.triton_op`` s (forward,
backward) wired by ``register_autograd``.  Every op gets the same CPU kernel rule -- the interpreted
kernels under ``TRITON_INTERPRET=1``, else the op's torch tier (:mod:`kernelssl.ops`) -- and the same
``torch.compile`` rule: on CUDA tensors (not interpreting) the op decomposes into its kernels, which
inductor schedules; on CPU tensors or under the interpreter it stays one opaque call that runs its CPU
kernel at run time.

The tests' launch recorders replace a module's ``wrap_triton``; the guard is looked up at launch time
(``device_guard``), so a test can record it too.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.library import wrap_triton as _torch_wrap_triton

try:
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # a triton without the interpreter: nothing is ever interpreted
    _Interpreted = ()

from ..dispatch import interpreting
from ..ops._common import NORM_EPS
from ._jit import _panel_matmul_kernel, _row_scales_kernel
from .targets import DEFAULT, Target, target_of

__all__ = [
    "DEFAULT_SMS",
    "DECOMPOSE_DEVICES",
    "interpreting",
    "num_sms",
    "wrap_triton",
    "device_guard",
    "register",
    "gram_config",
    "gram_precision",
    "panel_rows_for",
    "row_scales",
    "panel_matmul",
]

#: Streaming multiprocessors assumed off CUDA (the offline compile records the GPU launches on CPU
#: tensors): those of the default target (:data:`kernelssl.triton.targets.DEFAULT`, an H100/H200 SXM).
DEFAULT_SMS = DEFAULT.sms

#: Device types on which ``torch.compile`` decomposes the ops into their kernels (a test traces the
#: rule on the CPU by adding "cpu").
DECOMPOSE_DEVICES = ["cuda"]


def num_sms(device: torch.device) -> int:
    """SM (CU) count of ``device``'s target (:func:`kernelssl.triton.targets.target_of`: the device's own
    for CUDA, cached per device; the assumed target's elsewhere, :data:`DEFAULT_SMS` by default)."""
    return target_of(device).sms


def _fix_interpreter_index() -> None:
    """Triton < 3.8's interpreter: ``tensor.__index__`` as ``int(element)`` (module docstring).  Idempotent."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "_kernelssl_index_fix", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._kernelssl_index_fix = True
    interpreter._patch_lang_tensor = patched


if _Interpreted and interpreting() and tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8):
    _fix_interpreter_index()


def device_guard(device: torch.device | None, fake: bool = False):
    """``torch.cuda.device(device)`` for a real CUDA tensor's device; else a no-op context."""
    if device is None or device.type != "cuda" or fake:
        return contextlib.nullcontext()
    return torch.cuda.device(device)


class _GuardedLaunch:
    __slots__ = ("kernel",)

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        kernel = self.kernel

        def launch(*args, **kwargs):
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            device = None if first is None else first.device
            fake = first is not None and is_fake(first)
            interpreted = isinstance(kernel, _Interpreted)
            if interpreted and fake:  # shape propagation under the interpreter: nothing to compute
                return None
            with device_guard(device, fake):
                if interpreted:
                    return kernel[grid](*args, **kwargs)
                return _torch_wrap_triton(kernel)[grid](*args, **kwargs)

        return launch


def wrap_triton(kernel) -> _GuardedLaunch:
    """``torch.library.wrap_triton`` with the device guard, launching interpreted kernels directly
    (module docstring).  Use as ``wrap_triton(kernel)[grid](*args, **kwargs)``."""
    return _GuardedLaunch(kernel)


def _decompose_rule(launcher: Callable, tensor_index: int):
    """Functionalisation rule (what ``torch.compile``'s AOT dispatcher sees): on :data:`DECOMPOSE_DEVICES`
    tensors, not interpreting, decompose the op into its Triton kernels (``triton_op``'s default, so
    inductor schedules them); otherwise keep the op one opaque call, which runs its CPU kernel."""

    def rule(mode, op, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        if any(not issubclass(t, torch._subclasses.FakeTensor) and t not in (torch.Tensor, FunctionalTensor)
               for t in types):
            return NotImplemented
        if (custom_triton_ops_decomposition_disabled() or interpreting()
                or args[tensor_index].device.type not in DECOMPOSE_DEVICES):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return launcher(*args, **kwargs)

    return rule


def register(op, launcher: Callable, cpu: Callable, tensor_index: int) -> None:
    """The CPU kernel and the ``torch.compile`` rule of one ``triton_op`` (module docstring).

    ``launcher``: the op's body (it calls the launchers by name, so a test can replace them; also the
    fake implementation);
    ``cpu``: the same signature on the torch tier, run on CPU tensors when not interpreting;
    ``tensor_index``: the argument whose device decides the compile rule."""

    @op.register_kernel("cpu")
    def _cpu(*args, **kwargs):
        return launcher(*args, **kwargs) if interpreting() else cpu(*args, **kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, _decompose_rule(launcher, tensor_index))


# --------------------------------------------------------------------------------------------------
# Gram tiles: host side shared by legendre_gram and gaussian_gram
# --------------------------------------------------------------------------------------------------

#: Backward panel: all rows when n^2 <= PANEL_ELEMENTS, else max(MIN_PANEL_ROWS, PANEL_ELEMENTS // n)
#: rows (a multiple of 128), so the fp32 panel of phi'(G) is 128 MiB, or 4 KiB per row of z at most.
PANEL_ELEMENTS = 1 << 25
MIN_PANEL_ROWS = 1024


def gram_config(dtype: torch.dtype, q: int, n: int = 0, target: Target = DEFAULT, precision: str = "tf32x3") -> dict:
    """Block sizes of the Gram ops' kernels (``legendre_gram``, ``gaussian_gram``).  GPU: starting points
    for H100/H200, not tuned on a GPU (none was available); checked by compiling every kernel for sm_90 offline
    with the launch's own specialisation (``tests/compile_targets.py``: no register spills in any variant, and the
    wave count of the headline forward).  Backward: 128 x 64 phi' tiles (the joint value/derivative recurrence
    spills registers at 128 x 128) and 128 x 128 GEMM tiles, 8 warps, 3 stages (wgmma for 16-bit and TF32
    operands). K-steps of 64 for 16-bit operands, 32 where the MMA takes fp32 operands.

    Forward tiles: 128 x 128 Gram tiles need ~235-255 registers x 256 threads,
    one program per SM, and at the SFRIK headline shape (n = 2048) the T(T+1)/2 = 136 triangle tiles
    ran as a wave of 132 and a wave of 4 (52% wave efficiency).  64 x 64 tiles (8 warps, 76-114
    registers, two programs per SM by registers or by the 96 KiB of shared memory of the wider K-steps,
    see below) give 528 programs, two full waves of 264.  The larger tile (twice the arithmetic
    intensity) is kept where it has many waves anyway: ``T(T+1)/2 >= 8 * sms`` (tail <= 1/8).

    Rows whose length ``q`` is not a multiple of 16 (Triton then cannot assume aligned rows, so the
    loads are not vectorised and need more registers), in any dtype (fp16/bf16 spilled
    too): 64-wide Gram tiles and 128 x 64 GEMM tiles, which at 128 x 128 spill.  The interpreter gets
    32-wide blocks so that small test shapes span several tiles and exercise every mask.

    The phi' kernel with fp32 operands takes K-steps of 16: at 32 Triton 3.6's build (128 registers)
    spills; 16 is spill-free under Triton 3.6 and 3.8."""
    if interpreting():
        return dict(block=32, block_k=32, fwd_block=32, fwd_k=32, dphi_n=16, dphi_k=32, mm_m=32, mm_q=32, mm_k=32,
                    group=2, warps=4, stages=1, row_block=32, row_q=32)
    half = dtype in (torch.float16, torch.bfloat16)
    bk = 64 if half else 32
    mm_k = 64 if dtype == torch.bfloat16 else 32  # fp16 / fp32 feed fp32 operands to the MMA
    unaligned = q % 16 != 0
    t128 = triton.cdiv(n, 128)
    many_waves = t128 * (t128 + 1) // 2 >= 8 * target.sms
    fwd_block = 128 if (many_waves and not unaligned) else 64
    if not _hopper(target):
        fma_ieee = not half and precision == "ieee"  # fp32 "ieee": FMA dots, a thread's whole K slice in registers
        # fp32 panel GEMMs: 16-deep K-steps for ieee and tf32x3 (Triton 3.6 spilled 92 B at 32 with tf32x3, sm_86)
        panel_k = 16 if (not half and precision != "tf32") else mm_k
        return _compact_gram_config(target, half, 16 if fma_ieee else bk, panel_k, unaligned)
    # 64-wide forward tiles: 528 programs at n = 2048 make whole waves with 1, 2 or 4 programs per SM,
    # not 3; the K-step pins it at 2 (ptxas, sm_90, Triton 3.6 and 3.8): 16-bit rows 128-wide steps
    # (96 KiB of shared memory), fp32 "tf32" 64-wide (96 KiB), "ieee" 64-wide (104 registers; 80 with
    # 32-wide steps under Triton 3.6: 3 per SM); tf32x3 (114-120 registers) is held at 2 by its registers.
    wide_k = fwd_block == 64 and not unaligned and (half or precision != "tf32x3")
    fwd_k = 2 * bk if wide_k else bk
    return dict(block=64 if unaligned else 128, block_k=bk, fwd_block=fwd_block, fwd_k=fwd_k, dphi_n=64,
                dphi_k=bk if half else 16,
                mm_m=128, mm_q=64 if unaligned else 128, mm_k=mm_k, group=8, warps=8, stages=3, row_block=16,
                row_q=256)


def _hopper(target: Target) -> bool:
    """Whether ``target`` is an sm_90 part, the one the Gram ops' wide tiles (warp-group MMAs) are for."""
    return target.vendor == "nvidia" and target.arch >= 90


def _compact_gram_config(target: Target, half: bool, bk: int, mm_k: int, unaligned: bool) -> dict:
    """Gram blocks off sm_90 (compiled for every target by ``tests/compile_targets.py``): 64-wide Gram and
    phi' tiles and 128 x 64 panel-GEMM tiles (at 128 x 128 the register-resident MMA accumulators of
    sm_80/86/89 spill and 3 stages of 64-deep bf16 slices need 112 KiB, more than sm_86/89's 99 KiB);
    2 stages where shared memory per block is under 160 KiB (sm_86/89, sm_75, AMD's 64 KiB); targets
    whose dots Triton lowers to FMAs (sm_75) take 16-deep K-steps in every dtype (a thread holds its
    whole K slice in registers) and 4 warps (with 8, Triton 3.6's fp32 Gram tile spilled 4 B)."""
    fma = not target.triton_mma
    k = 16 if fma else bk
    return dict(block=64, block_k=k, fwd_block=64, fwd_k=k, dphi_n=64 if not fma else 32,
                dphi_k=16 if (fma or not half) else bk, mm_m=128 if not fma else 64, mm_q=64,
                mm_k=16 if fma else mm_k, group=8, warps=4 if fma else 8,
                stages=3 if target.smem_per_block >= 160 * 1024 else 2, row_block=16, row_q=256)


def gram_precision(dtype: torch.dtype, input_precision: str, target: Target = DEFAULT) -> str:
    """The Gram kernels' ``INPUT_PRECISION``: fp32 rows, the op's precision; bf16 rows go to the matrix
    units as they are (the target's neutral precision, ignored by their dots); fp16 rows the same, and
    the panel GEMM's fp32 weights times the (TF32-exact) fp16 rows as two TF32 products where the target
    has TF32, else one product at the target's default fp32 precision (``_jit._panel_dot``)."""
    if dtype == torch.float32:
        return input_precision
    if dtype == torch.float16:
        return "tf32" if target.tf32 else target.default_precision
    return target.neutral_precision


def panel_rows_for(n: int, align: int = 128) -> int:
    """Rows per backward panel: ``n`` when ``n^2 <= 2^25``, else ``max(1024, 2^25 // n)`` rounded down
    to a multiple of ``align`` (so the fp32 ``(rows, n)`` panel of ``phi'(G)`` is <= max(128 MiB, 4 KiB * n))."""
    if n * n <= PANEL_ELEMENTS:
        return n
    rows = max(MIN_PANEL_ROWS, PANEL_ELEMENTS // n)
    return min(n, max(align, rows // align * align))


def row_scales(z: torch.Tensor, normalize: bool, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, proj)``, each ``(n,)`` fp32, of ``_row_scales_kernel``: ``r = 1/max(||z_i||, eps)``, ``proj = r^2``
    (0 below eps; ``normalize=False``: ``r = 1``, ``proj = 0``)."""
    n, q = z.shape
    rinv = torch.empty(n, device=z.device, dtype=torch.float32)
    proj = torch.empty(n, device=z.device, dtype=torch.float32)
    wrap_triton(_row_scales_kernel)[(triton.cdiv(n, cfg["row_block"]),)](
        z, rinv, proj,
        z.stride(0), z.stride(1),
        n, q,
        EPS=NORM_EPS, NORMALIZE=normalize, BLOCK_R=cfg["row_block"], BLOCK_Q=cfg["row_q"],
        num_warps=4,
    )
    return rinv, proj


def panel_matmul(panel, z, rinv, proj, dpart, scale, out, row0: int, nrows: int, normalize: bool,
                 scale_given: bool, cfg: dict, dot_f32: bool, precision: str) -> None:
    """Stage 2 of the Gram ops' panel backward, ``_panel_matmul_kernel``: rows ``row0 .. row0 + nrows`` of
    ``out = (scale) (r_k P_k Z - proj_k d_k z_k)`` (the normalisation Jacobian in the epilogue).
    ``scale``: the 0-dim upstream gradient (legendre_gram: times ``2/n^2`` in the kernel) or, with
    ``scale_given``, the whole factor (gaussian_gram's weights kernel writes it)."""
    n, q = z.shape
    mode = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[z.dtype]
    grid = (triton.cdiv(nrows, cfg["mm_m"]) * triton.cdiv(q, cfg["mm_q"]),)
    wrap_triton(_panel_matmul_kernel)[grid](
        panel, z, rinv, proj, dpart, scale, out,
        panel.stride(0), panel.stride(1), z.stride(0), z.stride(1), dpart.stride(0), dpart.stride(1),
        out.stride(0), out.stride(1),
        n, q, row0, nrows, dpart.shape[1],
        NORMALIZE=normalize, MODE=mode,
        BLOCK_M=cfg["mm_m"], BLOCK_Q=cfg["mm_q"], BLOCK_K=cfg["mm_k"], BLOCK_T=32, GROUP_M=cfg["group"],
        DOT_F32=dot_f32, INPUT_PRECISION=precision, SCALE_GIVEN=scale_given,
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
