"""The GPU targets the fused kernels serve, in one place: what each one has (shared memory, registers,
warp size, SMs, matrix-unit precisions) and what the kernels do there (the default fp32 product).

Every op's launch configuration reads the :class:`Target` of its tensors' device (:func:`target_of`):
block sizes, warps and stages are chosen so that shared memory fits the target's per-block limit and
the main variants do not spill registers -- checked by compiling every recorded launch for every
target offline (``tests/compile_targets.py``).

**Precision of fp32 x fp32 products** (``input_precision``), per target:

* NVIDIA sm_80+ (A100, A10/A40/RTX 30, L4/L40S/RTX 40, H100/H200): ``"tf32x3"`` by default (three TF32
  tensor-core products, fp32-level error); also ``"ieee"``, ``"tf32"``, ``"bf16x3"``, ``"bf16x6"``.
* NVIDIA sm_75 (T4), sm_70 (V100): ``"ieee"`` only (no TF32 and no bf16 matrix unit); bf16 inputs
  are not served by the kernels there (:meth:`Target.serves`): the torch tier runs them.
* AMD CDNA2 / CDNA3 (gfx90a MI250, gfx942 MI300): the fastest of ``"bf16x3"``, ``"bf16x6"``, ``"ieee"``
  whose error stays within 2x of full fp32's for every op (:data:`ACCURATE`, decided by the CPU
  emulation of each op at the paper shape, ``tests/test_targets.py``), by the datasheet rates: that is
  ``"ieee"`` -- on CDNA full fp32 runs on the matrix cores themselves (``v_mfma_f32_*_f32``).
  ``"bf16x3"`` (two-way bf16 split, three products) is ~2^8 times less accurate than fp32 on every
  op; ``"bf16x6"`` (three-way split, six products) is within 2x on rff_hsic, taylor_logdet and
  gaussian_gram but not on legendre_gram's value (emulated at q = 8192: 6.6e-7 relative, against
  9.3e-10 for ieee and 9.3e-8 for tf32x3), and would be faster only on gfx942 (MI300X: bf16 1307
  TFLOP/s / 6 = 218 against 163 fp32-matrix; on MI250X 383 / 6 = 64 against 96).  Also ``"bf16x3"``,
  ``"bf16x6"`` on request, and ``"tf32"`` on gfx942.

Off CUDA (the CPU interpreter, the offline compile that records launches on CPU tensors) the target is
:data:`DEFAULT` (an H100 SXM) unless :func:`assume` names another.  Importing this module needs neither
Triton nor a GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

__all__ = ["ACCURATE", "Target", "TARGETS", "MATRIX", "DEFAULT", "target_of", "assume", "lookup"]

_KIB = 1024
#: NVIDIA sm_80+: what Triton accepts, fastest first among fp32-level ones (tf32x3: 3 TF32 products)
_NV_FAST = ("tf32x3", "ieee", "tf32", "bf16x3", "bf16x6")

#: The fp32 products whose error against float64 stays within 2x of full fp32's (``"ieee"``) at the
#: paper shapes, value and every gradient of every op: the CPU emulation decides (``tests/test_targets.py``
#: holds this tuple to it).  A target's default is the first of its ``precisions`` in it.
ACCURATE = ("ieee", "tf32x3")


@dataclasses.dataclass(frozen=True)
class Target:
    """One GPU target: ``name`` ("sm_80", "gfx942"), ``vendor`` ("nvidia" / "amd"), ``arch`` (NVIDIA:
    compute capability as an int, 80; AMD: the gfx name), ``label`` (example devices), shared memory
    per block and per SM (bytes, the per-block figure the opt-in maximum a kernel may use), 32-bit
    registers per SM and per thread, threads and programs per SM, warp size, the SM (CU) count of
    the reference device, the fp32 product precisions its Triton accepts (``precisions``, ordered by
    their speed there, fastest first), whether it has bf16 / fp16 matrix units, and whether Triton
    emits matrix-unit instructions for it (``triton_mma``: not on sm_75/sm_70, whose dots Triton 3.8
    lowers to FMAs)."""

    name: str
    vendor: str
    arch: int | str
    label: str
    smem_per_block: int
    smem_per_sm: int
    regs_per_sm: int
    regs_per_thread: int
    threads_per_sm: int
    blocks_per_sm: int
    warp_size: int
    sms: int
    precisions: tuple[str, ...]
    bf16_mma: bool
    triton_mma: bool = True

    @property
    def default_precision(self) -> str:
        """The default product for fp32 inputs: fp32-level error (:data:`ACCURATE`) by the fastest path
        the target has."""
        return next(p for p in self.precisions if p in ACCURATE)

    @property
    def neutral_precision(self) -> str:
        """The ``input_precision`` passed to dots of two fp16/bf16 operands (ignored by them, but Triton
        checks it): Triton's own default on the target."""
        return "tf32" if self.vendor == "nvidia" else "ieee"

    @property
    def tf32(self) -> bool:
        """Whether fp32 operands can go to the matrix units as TF32."""
        return "tf32" in self.precisions

    @property
    def gpu_target(self) -> tuple[str, int | str, int]:
        """``(backend, arch, warp_size)``, the arguments of Triton's ``GPUTarget``."""
        return ("cuda" if self.vendor == "nvidia" else "hip", self.arch, self.warp_size)

    def serves(self, dtype: torch.dtype) -> str | None:
        """``None`` when the kernels take inputs of ``dtype`` on this target, else the reason."""
        if dtype == torch.bfloat16 and not self.bf16_mma:
            return f"{self.name} ({self.label}) has no bf16 matrix unit"
        return None

    def check_precision(self, precision: str) -> str:
        """``precision`` if this target has it, else a ``ValueError`` naming the target and its precisions."""
        if precision not in self.precisions:
            raise ValueError(
                f"input_precision: {precision!r} is not available on {self.name} ({self.label}); it has "
                f"{', '.join(map(repr, self.precisions))} (default {self.default_precision!r})")
        return precision


def _nv(name, cc, label, smem_block_kib, smem_sm_kib, threads, blocks, sms, precisions, bf16):
    return Target(name, "nvidia", cc, label, smem_block_kib * _KIB, smem_sm_kib * _KIB, 65536, 255, threads, blocks,
                  32, sms, precisions, bf16, cc >= 80)


def _amd(name, label, sms, precisions):
    # CDNA: 64 KiB of LDS per CU (and per workgroup); 4 SIMDs x 512 VGPRs (arch + acc) x 64 lanes
    return Target(name, "amd", name, label, 64 * _KIB, 64 * _KIB, 4 * 512 * 64, 512, 2048, 32, 64, sms, precisions,
                  True)


#: Every target the kernels know, by name.  Sources of the limits: the CUDA C++ Programming Guide,
#: "Technical Specifications per Compute Capability" (7.0: 96 KB of shared memory per SM and block;
#: 7.5: 64 KB, 1024 threads, 16 blocks; 8.0: 164 KB per SM, 163 KB per block; 8.6 / 8.9: 100 KB per SM,
#: 99 KB per block, 1536 threads, 16 / 24 blocks; 9.0: 228 KB per SM, 227 KB per block; all: 64 K
#: registers per SM, 255 per thread, 1 KB reserved per block); AMD's CDNA 3 ISA guide and CDNA 3 white
#: paper (64 KB of LDS per CU, 4 SIMDs, 512 vector registers per lane and SIMD, wave64).
TARGETS: dict[str, Target] = {t.name: t for t in (
    _nv("sm_70", 70, "V100", 96, 96, 2048, 32, 80, ("ieee",), False),
    _nv("sm_75", 75, "T4", 64, 64, 1024, 16, 40, ("ieee",), False),
    _nv("sm_80", 80, "A100", 163, 164, 2048, 32, 108, _NV_FAST, True),
    _nv("sm_86", 86, "A10, A40, RTX 30", 99, 100, 1536, 16, 72, _NV_FAST, True),
    _nv("sm_89", 89, "L4, L40S, RTX 40", 99, 100, 1536, 24, 58, _NV_FAST, True),
    _nv("sm_90", 90, "H100, H200", 227, 228, 2048, 32, 132, _NV_FAST, True),
    # AMD, fastest first by the datasheet rates (module docstring): bf16x3 (3 bf16 products) first
    _amd("gfx90a", "MI250", 104, ("bf16x3", "ieee", "bf16x6")),
    _amd("gfx942", "MI300", 304, ("tf32", "bf16x3", "bf16x6", "ieee")),
)}

#: The targets checked offline (every recorded launch compiled, resources and spills held by the tests);
#: a device outside it is not served by the kernels (``backend="auto"`` runs the torch tier there).
MATRIX = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "gfx90a", "gfx942")

#: The target assumed off CUDA: an H100 SXM.
DEFAULT = TARGETS["sm_90"]

_assumed: list[Target] = []


def lookup(name: str) -> Target:
    """The :class:`Target` called ``name``; a ``ValueError`` listing the known ones otherwise."""
    if name not in TARGETS:
        raise ValueError(f"target: expected one of {', '.join(TARGETS)}, got {name!r}")
    return TARGETS[name]


@contextlib.contextmanager
def assume(target: str | Target):
    """Within the block, tensors off CUDA are taken to be on ``target`` (the offline compile records the
    launches a device of that target would issue; tests fake a device's target this way)."""
    _assumed.append(lookup(target) if isinstance(target, str) else target)
    try:
        yield _assumed[-1]
    finally:
        _assumed.pop()


_CUDA: dict[int, Target] = {}


def _cuda_target(index: int) -> Target:
    if index not in _CUDA:
        _CUDA[index] = _read_cuda_target(index)
    return _CUDA[index]


def _read_cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    if getattr(torch.version, "hip", None):
        arch = getattr(props, "gcnArchName", "").split(":")[0]
        base = TARGETS.get(arch)
        name = arch or "unknown AMD GPU"
        if base is None:
            return Target(name, "amd", name, props.name, 64 * _KIB, 64 * _KIB, 4 * 512 * 64, 512, 2048, 32, 64,
                          props.multi_processor_count, ("ieee",), False)
        return dataclasses.replace(base, label=props.name, sms=props.multi_processor_count)
    major, minor = torch.cuda.get_device_capability(index)
    name = f"sm_{major}{minor}"
    base = TARGETS.get(name)
    if base is None:  # not a known target: its nearest known relative's resources, not served (MATRIX)
        known = [t for t in TARGETS.values() if t.vendor == "nvidia" and t.arch <= major * 10 + minor]
        base = known[-1] if known else TARGETS["sm_70"]
        return dataclasses.replace(base, name=name, arch=major * 10 + minor, label=props.name,
                                   sms=props.multi_processor_count)
    return dataclasses.replace(base, label=props.name, sms=props.multi_processor_count)


def target_of(device: torch.device | str | None) -> Target:
    """The :class:`Target` of ``device``: for a CUDA device (ROCm's torch calls AMD GPUs "cuda" too)
    read from ``torch.cuda`` (compute capability, or ``gcnArchName`` under ``torch.version.hip``, and
    the SM count; cached per device); elsewhere what :func:`assume` names, else :data:`DEFAULT`."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return _assumed[-1] if _assumed else DEFAULT
