"""CPU emulation of the fused kernels' fp32 GEMMs at each ``input_precision`` (SPEC §4), in torch.

Under the Triton interpreter every ``tl.dot`` is full fp32 whatever its precision, so the accuracy of
the GPU's ``"tf32x3"`` and ``"tf32"`` cannot be seen by running the kernels here.  These helpers
reproduce what the tensor cores compute for one fp32 x fp32 product, so that each op's own GEMM
decomposition (written out in its test, in the kernel's order: which products, on which scaled
operands, with which fp32 epilogues) can be evaluated at the paper shape and compared with float64:

* ``"ieee"``: the fp32 GEMM itself (CPU fp32 matmul, fp32 accumulation).
* ``"tf32"``: the MMA reads only the top 19 bits of each fp32 operand (truncation to TF32: the
  conservative model -- Triton does not round the operands first); products exact, fp32 accumulation.
* ``"tf32x3"``: Triton's split, ``x = big + small`` with ``big`` = x rounded to TF32 (``cvt.rna``),
  ``small = x - big`` (exact in fp32), fed to the MMA (truncated to TF32);
  ``a b ~ small_a big_b + big_a small_b + big_a big_b`` (the ``small_a small_b`` term, ~2^-22 relative,
  is dropped), fp32 accumulation.
The tensor cores' own accumulation order is not modelled (fp32 either way); the GPU tests check the
real thing.
"""
from __future__ import annotations

import torch


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest TF32 value (10-bit mantissa), ties away from zero (``cvt.rna.tf32.f32``)."""
    b = x.contiguous().view(torch.int32)
    return ((b + 0x1000) & ~0x1FFF).view(torch.float32)


def trunc_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 by dropping the 13 low mantissa bits (what the MMA reads of an fp32 register)."""
    return (x.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def mm(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """``a @ b`` as one fp32 ``tl.dot`` at ``precision`` computes it (float64 operands: exact float64)."""
    if a.dtype == torch.float64 or precision == "ieee":
        return a @ b
    if precision == "tf32":
        return trunc_tf32(a) @ trunc_tf32(b)
    assert precision == "tf32x3", precision
    a_big, b_big = round_tf32(a), round_tf32(b)
    a_small, b_small = trunc_tf32(a - a_big), trunc_tf32(b - b_big)
    return (a_small @ b_big + a_big @ b_small) + a_big @ b_big


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (the errors compared across precisions)."""
    return float((x.double() - ref).abs().max() / ref.abs().max())


def check_within_2x_of_ieee(run, ref, names, floor: float = 2.0**-22) -> dict:
    """Run ``run(precision)`` (a tuple of fp32 results) for the three precisions; every result's error
    against ``ref`` (float64) with tf32x3 is within 2x of ieee's (``floor``: relative errors below two
    fp32 epsilons, 2^-22, are equal -- the ieee path's own error on a scalar result moves by about one
    epsilon with the summation order alone: HSIC_ZY at the paper shape measured 1.22e-7 with one CPU
    thread and 3.45e-8 with two, SFRIK's M 9.3e-8 and 9.3e-10).  tf32 must be clearly worse on at least one result, else the emulation is
    not doing anything.  Returns the table of errors."""
    errs = {p: [rel_err(x, r) for x, r in zip(run(p), ref)] for p in ("ieee", "tf32x3", "tf32")}
    for name, e_ieee, e_x3 in zip(names, errs["ieee"], errs["tf32x3"]):
        assert e_x3 <= 2.0 * max(e_ieee, floor), f"{name}: tf32x3 error {e_x3:.3g} > 2 x ieee {e_ieee:.3g}"
    assert max(t / max(i, floor) for t, i in zip(errs["tf32"], errs["ieee"])) > 10, errs
    print({p: dict(zip(names, (f"{e:.2e}" for e in v))) for p, v in errs.items()})
    return errs
