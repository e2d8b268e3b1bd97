"""The GPUs the performance model prices (docs/perf-model.md, "Other GPUs"): ceilings and the limits on
resident programs, one table (:data:`TARGETS`) -- PREDICTED use only, nothing here is measured except
the H200's two ceilings named below.

A small table on purpose: what the static model needs per GPU (matrix and vector rates, memory
bandwidth, SM / CU count, registers, threads and shared memory per SM / CU), not the kernels' launch
configuration per target, which belongs to the Triton tier.  Importing it needs neither Triton nor a GPU.

Sources (dense rates, no structured sparsity; bandwidth the datasheet's peak, except the H200's):

* ``h200``: bf16 790 TFLOP/s and 4.3 TB/s copy (read + write) **measured** on an H200 (its datasheet
  says 989 and 4.8); TF32 half of bf16; fp32 FMA 67 TFLOP/s from NVIDIA's H200 datasheet.
* ``h100``: NVIDIA H100 Tensor Core GPU datasheet, SXM5: FP32 67, TF32 494.7 (989 with sparsity), BF16
  989.4 (1979 with sparsity) TFLOP/s, HBM3 3.35 TB/s; 132 SMs.
* ``a100``: NVIDIA A100 Tensor Core GPU datasheet, SXM4 80 GB: FP32 19.5, TF32 156, BF16 312 TFLOP/s,
  HBM2e 2039 GB/s; 108 SMs (NVIDIA A100 architecture whitepaper).
* ``rtx4090`` (the sm_89 card: the consumer card people train on; an L4 has the same per-SM limits):
  NVIDIA Ada Lovelace architecture whitepaper v1.0, appendix table (GeForce RTX 4090): 128 SMs, FP32
  82.6, TF32 tensor 82.6, BF16 tensor with FP32 accumulate 165.2 TFLOP/s, GDDR6X 1008 GB/s.
* ``mi300x``: AMD Instinct MI300X data sheet: 304 CUs, FP32 vector 81.7, FP32 matrix 163.4, TF32
  matrix 653.7, BF16 matrix 1307.4 TFLOP/s, HBM3 5.3 TB/s; CDNA 3 white paper: 64 KB of LDS per CU,
  4 SIMDs per CU, wave64.
* The limits on resident programs (registers, threads, programs and shared memory per SM / CU, the
  per-block shared memory, the warp size) are those of the kernels' own target table,
  :data:`kernelssl.triton.targets.TARGETS`, by ``arch``; that table gives their sources.  Only the AMD
  register model's allocation unit (8 VGPRs) and its cap of 8 waves per SIMD are set here (AMD's
  CDNA 3 ISA guide).

``overhead`` (3 us per launch, GPU-side gap and ramp) is the same assumed figure on every target.
"""
from __future__ import annotations

from ..triton.offline import occupancy as _nvidia_occupancy
from ..triton.offline import resources
from ..triton.targets import TARGETS as KERNEL_TARGETS

#: AMD CDNA 3 ISA guide: vector registers are allocated in units of 8 per lane, at most 8 waves per SIMD.
_CDNA_VGPR_UNIT, _CDNA_WAVES_PER_SIMD = 8, 8


def _limits(arch: str) -> dict:
    """The limits on resident programs of ``arch``, from :data:`kernelssl.triton.targets.TARGETS`."""
    t = KERNEL_TARGETS[arch]
    out = {k: v for k, v in resources(t).items() if k != "sms"}  # the SM count is the GPU's, set per entry
    out.update(smem_per_block=t.smem_per_block, warp_size=t.warp_size)
    if t.vendor == "amd":
        out.update(simds=t.regs_per_sm // (t.regs_per_thread * t.warp_size), vgprs_per_lane=t.regs_per_thread,
                   vgpr_unit=_CDNA_VGPR_UNIT, waves_per_simd=_CDNA_WAVES_PER_SIMD)
    return out


#: ``{key: target}``: ``name``, ``arch``, ``source`` ("measured" where a ceiling was measured), rates in
#: flop/s (``bf16``, ``tf32`` -- None where the target has none --, ``fma`` the fp32 vector rate,
#: ``fp32_matrix`` the fp32 x fp32 matrix-unit rate where there is one, else None: "ieee" products then
#: run on the FMA units), ``bandwidth`` (byte/s), ``sms`` (SMs or CUs) and the limits on resident
#: programs; ``fp32_precisions``: the ``input_precision`` s the model prices fp32 products at, the
#: target's default first (that of :mod:`kernelssl.triton.targets`' precision policy: ``"tf32x3"`` on
#: sm_80+, ``"ieee"`` on CDNA, whose matrix cores take fp32; MI300X also at ``"bf16x6"``, faster there
#: but not within 2x of fp32's error on every op; the RTX 4090 also at ``"ieee"``: its TF32 rate is its
#: FP32 rate, so three TF32 products cost 3x).
TARGETS = {
    "h200": {"name": "H200 SXM", "arch": "sm_90", "source": "measured bf16 and copy; datasheet FMA",
             "bf16": 790e12, "tf32": 395e12, "fma": 67e12, "fp32_matrix": None, "bandwidth": 4.3e12,
             "fp32_precisions": ("tf32x3",), "sms": 132, **_limits("sm_90")},
    "h100": {"name": "H100 SXM5", "arch": "sm_90", "source": "datasheet",
             "bf16": 989.4e12, "tf32": 494.7e12, "fma": 67e12, "fp32_matrix": None, "bandwidth": 3.35e12,
             "fp32_precisions": ("tf32x3",), "sms": 132, **_limits("sm_90")},
    "a100": {"name": "A100 SXM4 80 GB", "arch": "sm_80", "source": "datasheet",
             "bf16": 312e12, "tf32": 156e12, "fma": 19.5e12, "fp32_matrix": None, "bandwidth": 2.039e12,
             "fp32_precisions": ("tf32x3",), "sms": 108, **_limits("sm_80")},
    "rtx4090": {"name": "GeForce RTX 4090", "arch": "sm_89", "source": "datasheet",
                "bf16": 165.2e12, "tf32": 82.6e12, "fma": 82.6e12, "fp32_matrix": None, "bandwidth": 1.008e12,
                "fp32_precisions": ("tf32x3", "ieee"), "sms": 128, **_limits("sm_89")},
    "mi300x": {"name": "Instinct MI300X", "arch": "gfx942", "source": "datasheet",
               "bf16": 1307.4e12, "tf32": 653.7e12, "fma": 81.7e12, "fp32_matrix": 163.4e12, "bandwidth": 5.3e12,
               "fp32_precisions": ("ieee", "bf16x6"), "sms": 304, **_limits("gfx942")},
}
for _t in TARGETS.values():
    _t.setdefault("overhead", 3e-6)
DEFAULT = "h200"


def rates(t: dict, fp32_precision: str) -> dict:
    """flop/s of a product by how it executes on target ``t``: the 16-bit units, ``tf32``, the fp32
    ``input_precision`` s (``tf32x3`` three TF32 products, ``bf16x3``/``bf16x6`` three or six bf16
    products, ``ieee`` fp32 on the matrix units where there are some, else the FMA units), and
    ``"fp32"``: the rate of ``fp32_precision``, the one fp32 products are priced at."""
    out = {"bf16": t["bf16"], "fp16": t["bf16"], "ieee": t["fp32_matrix"] or t["fma"],
           "bf16x3": t["bf16"] / 3, "bf16x6": t["bf16"] / 6}
    if t["tf32"]:
        out.update(tf32=t["tf32"], tf32x3=t["tf32"] / 3)
    if fp32_precision not in out:
        raise ValueError(f"fp32_precision: {t['name']} ({t['arch']}) has no {fp32_precision!r} products")
    out["fp32"] = out[fp32_precision]
    return out


def occupancy(t: dict, regs: int, warps: int, shared: int) -> int:
    """Resident programs per SM (CU) of a variant with ``regs`` registers per thread, ``warps`` warps
    of 32 threads (as compiled for sm_90) and ``shared`` bytes of shared memory; 0 where it exceeds the
    target's per-block shared memory.  NVIDIA: the arithmetic of :func:`kernelssl.triton.offline.occupancy`
    (registers allocated per warp in units of 256, threads, shared memory with 1 KiB reserved per
    program, programs per SM), on the target of its ``arch``.  AMD (wave64): the program's ``warps`` waves
    of 64 threads hold the same tiles, so about half the registers per thread (``regs / 2`` taken,
    rounded up to the allocation unit; a proxy until the variant is compiled for the target);
    ``floor(simds x waves per SIMD / warps)`` programs, waves per SIMD ``min(8, 512 / registers)``,
    and the LDS."""
    if shared > t["smem_per_block"]:
        return 0
    if t["warp_size"] == 32:
        return _nvidia_occupancy(regs, warps, shared, KERNEL_TARGETS[t["arch"]])
    unit = t["vgpr_unit"]
    vgprs = -(-max(-(-regs // 2), 1) // unit) * unit
    waves = min(t["waves_per_simd"], t["vgprs_per_lane"] // vgprs)
    by_regs = t["simds"] * waves // warps
    by_smem = t["smem_per_sm"] // max(shared, 1)
    return max(0, min(by_regs, by_smem))
