"""The RFF-HSIC op (SSL-HSIC's core; docs/rff_hsic.md): forward, backward and forward+backward time and
peak extra memory, Triton vs the torch path vs eager (the paper's form) vs ``torch.compile`` of the torch
path, plus sweeps over N and D.  ``test_losses.py`` already covers forward+backward at the paper shape;
the rows here add the per-mode split and the sweeps.

* CUDA (``paper`` scale, the default there): the paper shape N = 16384 (K = 4, B = 4096), d = 256,
  D = 512 in all three modes, then forward+backward over N = 1024 ... 65536 (D = 512) and
  D = 128 ... 2048 (N = 16384); fp32 and bf16; impls eager, torch, compile, triton.
* CPU (any scale), or ``--bench-scale smoke`` on CUDA: only the smallest case (on CPU: torch path and
  eager -- the Triton interpreter's timings mean nothing, so the kernel is not timed there), so the
  benchmark code never rots.

Rows go to the shared results file with ``loss = "rff_hsic:<mode>"``; the summary's speed-up and memory
ratio columns are then against eager in the same mode.  Each row also checks that the implementation
computes eager's loss (a fast wrong kernel cannot look good).  Targets (read off the rows, not
asserted): forward+backward >= 3x eager and >= 1.5x compile at the paper shape, peak extra memory
<= 0.5x eager.
"""
from __future__ import annotations

import torch

from kernelssl.bench import cases as C
from kernelssl.bench.measure import MODES, bench_device

PAPER = C.PAPER_SHAPES["hsic"]
SIZES = C.OP_SWEEPS["rff_hsic"]  # N = K B with K = 4, and D
SMOKE = {"K": 2, "B": 64, "d": 32, "D": 64}
ROUNDS = {"cpu": 3, "cuda": 20}
LOSS_RTOL, LOSS_ATOL = 1e-3, 1e-5  # as in test_losses.py: same inputs, fp32 accumulation everywhere


def _cases(device: torch.device, scale: str):
    if device.type != "cuda" or scale == "smoke":
        return [(SMOKE, torch.float32, mode) for mode in MODES]
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        cases += [(PAPER, dtype, mode) for mode in MODES]
        cases += [({**PAPER, "B": n // PAPER["K"]}, dtype, "full") for n in SIZES["N"] if n != PAPER["K"] * PAPER["B"]]
        cases += [({**PAPER, "D": D}, dtype, "full") for D in SIZES["D"] if D != PAPER["D"]]
    return cases


# op_case's parametrisation (conftest.py): the fp32 rows at the paper shape also time the kernel with
# input_precision="tf32x3" (three TF32 tensor-core products, ~fp32 accuracy), beside the IEEE default
# (docs/numerics.md).
SWEEP = {"loss": "hsic", "op": "rff_hsic", "cases": _cases,
         "variant": "triton-tf32x3", "variant_shape": PAPER}


def _implementation(impl, shape, device):
    """``fn(views) -> loss`` of ``impl``; ``triton-tf32x3`` on the same random features as the rest."""
    if impl != "triton-tf32x3":
        return C.implementations("hsic", shape, device=device, compile=impl == "compile")[impl]
    from kernelssl.ops import rff_hsic as H
    from kernelssl.triton import rff_hsic_op as RK

    maps = C.hsic_maps(shape, device=device)
    return lambda views: H.hsic_loss(*RK.rff_hsic(views, *maps, 1.0, input_precision="tf32x3"), gamma=3.0)


def test_rff_hsic_modes(op_case, bench):
    shape, dtype, mode, impl = op_case
    device = bench_device()

    def make():
        return _implementation(impl, shape, device), C.make_inputs("hsic", shape, device=device, dtype=dtype)

    def check(fn, inputs):
        with torch.no_grad():
            value = fn(*inputs).detach()
            expected = value if impl == "eager" else C.implementations("hsic", shape, device=device)["eager"](*inputs)
        torch.testing.assert_close(value.float(), expected.float(), rtol=LOSS_RTOL, atol=LOSS_ATOL)
        return float(value)

    shape_s = ",".join(f"{k}={v}" for k, v in shape.items())
    row = {"loss": f"rff_hsic:{mode}", "shape": shape_s, "dtype": str(dtype)[6:], "impl": impl}
    bench.mode(make, mode, check=check, row=row, group=f"rff_hsic {mode} {shape_s} {str(dtype)[6:]}",
               rounds=ROUNDS[device.type])
