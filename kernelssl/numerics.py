"""Numerics every check of the library shares: the stated tolerances, the 2x rule, and the CPU emulation
of the kernels' fp32 products (docs/numerics.md).  Used by the tests, ``python -m kernelssl.bench`` and
the long run (``tests/long_run.py``); nothing here runs in a loss.

**The 2x rule.**  In a precision below float64 (fp32 sums, bf16/fp16 inputs, TF32 products) the error
of an implementation against float64 is at most twice the error of the torch tier in the same
precision on the same input -- or below a stated ``floor``, the level under which two rounding errors
are noise and their ratio means nothing::

    err_kernel <= max(2 err_torch, floor)                              (:func:`bound_2x`)

for the loss and for every gradient (max-abs errors).  The floor is stated by each check: a few fp32
ulps of the quantity's scale, or half an ulp of the output dtype (which no implementation can beat).
(Not the additive ``2 err_torch + floor``: that allows up to ``2 err_torch`` more than the rule says
whenever ``err_torch`` is near the floor.)

**TF32 emulation.**  Under the Triton interpreter every ``tl.dot`` is full fp32 whatever its
``input_precision``, so the accuracy of the GPU's ``"tf32x3"`` and ``"tf32"`` cannot be seen by running
the kernels on a CPU.  :func:`mm` reproduces what the tensor cores compute for one fp32 x fp32 product,
so that each op's own GEMM decomposition (written out in its test) can be evaluated at the paper shape
against float64:

* ``"ieee"``: the fp32 GEMM itself (fp32 accumulation).
* ``"tf32"``: the MMA reads only the top 19 bits of each fp32 operand: truncation to TF32 (Triton passes
  fp32 registers to the MMA without rounding them).
* ``"tf32x3"``: Triton's ``F32DotTC`` split, ``x = big + small`` with ``big = cvt.rna.tf32(x)`` (rounded
  to nearest, ties away) and ``small = x - big`` (exact in fp32, *not* rounded: the MMA truncates it);
  ``a b ~ small_a big_b + big_a small_b + big_a big_b`` (the ``small_a small_b`` term, ~2^-22 relative,
  is dropped), fp32 accumulation.
* ``"bf16x3"`` / ``"bf16x6"`` (AMD's matrix cores; NVIDIA's too): Triton's ``BF16DotTC`` split,
  ``x = hi + mid + lo`` with each part the fp32 remainder rounded to bf16 (nearest even);
  ``bf16x3``: ``mid_a hi_b + hi_a mid_b + hi_a hi_b``; ``bf16x6`` adds ``mid_a mid_b + lo_a hi_b +
  hi_a lo_b`` first.  Products of bf16 values are exact in fp32; fp32 accumulation.
The tensor cores' own accumulation order is not modelled (fp32 either way); the GPU tests check the
real thing.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "HALF_ULP",
    "FP32_EPS",
    "FP32_TOL",
    "LOSS_FLOOR_ULPS",
    "GRAD_FLOOR",
    "VALUE_RTOL",
    "VALUE_ATOL",
    "SECOND_DERIVATIVE_FD",
    "METRICS_TOL",
    "RFF_CKA_MC_CONST",
    "to_numpy",
    "max_abs_error",
    "bound_2x",
    "assert_close",
    "assert_error_within_torch",
    "round_tf32",
    "trunc_tf32",
    "mm",
    "rel_err",
    "errors_by_precision",
    "within_2x_of_ieee",
    "check_within_2x_of_ieee",
]

#: Half an ulp of 1 in each dtype: the relative error of one rounding to it.
HALF_ULP = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
#: fp32's machine epsilon (one ulp of 1).
FP32_EPS = 2.0**-23

#: fp32 against float64, the bench's correctness case.  Loss: ``|err| <= rtol |ref| + atol``.  Gradients,
#: elementwise: ``|err| <= rtol |ref| + atol_rel max|ref|``.  Why 1e-4: SSL-HSIC's fp32 features carry a
#: phase error of ~1e-5 absolute (``|W x / c|`` up to ~30 rad), which reaches the loss and gradients at
#: ~1e-5 relative; SFRIK's and MEC's fp32 sums at the small case stay below ~1e-6.  Any wrong formula,
#: scale or missing term errs by >= 1e-2.
FP32_TOL = {"loss_rtol": 1e-4, "loss_atol": 1e-6, "grad_rtol": 1e-4, "grad_atol_rel": 1e-4}
#: The 2x rule's floors in the bench (relative to the reference's scale): the loss is fp32, so 64 fp32
#: ulps of |loss|; gradients come back rounded to the input dtype (TF32 rows: fp32 gradients of TF32
#: products), so half an ulp of that format of max|grad|.
LOSS_FLOOR_ULPS = 64 * 2.0**-24
GRAD_FLOOR = {"bf16": 2.0**-9, "fp16": 2.0**-12, "tf32": 2.0**-11}
#: Loss value at every timed shape against float64 on the same (rounded) inputs: fp32 sums of up to ~1e9
#: terms stay well under 1e-3 relative; TF32 products (10-bit mantissa) under 1e-2.
VALUE_RTOL = {"default": 1e-3, "tf32": 1e-2}
VALUE_ATOL = 1e-5
#: Second derivatives (``create_graph=True``) against a central difference of the first gradient in
#: float64: step ``h`` on inputs of unit scale, ``|autograd - fd| <= rtol max(|fd|, |autograd|) + atol``.
#: The difference's own error is ~h^2 |f'''| (1e-10 relative) plus rounding ~1e-16 / h (1e-11); 1e-6
#: leaves room for curvature, while a piece of the gradient taken as a constant errs at O(1) relative.
SECOND_DERIVATIVE_FD = {"h": 1e-5, "rtol": 1e-6, "atol": 1e-12}
#: HSIC/CKA metrics (kernelssl.metrics) against the float64 reference, ``|err| <= rtol |ref| + atol``, with
#: HSIC errors measured relative to ``sqrt(HSIC(x, x) HSIC(y, y))`` (its natural scale; CKA is already in
#: [-1, 1]).  float64: the torch tier forms the same sums in another order (Gram-form distances, tiles,
#: feature-space traces), ~1e-15 relative; 1e-9 leaves six orders of margin.  float32: the traces sum
#: ~n^2 products of O(1) kernel values (pairwise in torch.sum), the unbiased estimator subtracts terms of
#: size ~n^2 to leave ~n (a factor ~n of cancellation); at the test sizes (30 <= n <= 300) the measured error
#: stays below ~1e-5, so 1e-4 with a 1e-5 floor.  (At n = 4 an unbiased HSIC of
#: near-1 kernel values is ~1e-4 of its terms: fp32 rounding of K alone moves it ~1e-4; checked in float64.)
#: A wrong term or scale errs by >= 1e-2.
METRICS_TOL = {torch.float64: {"rtol": 1e-9, "atol": 1e-12}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}
#: Random-feature CKA against the exact kernel: a Monte-Carlo error ``|err| <= RFF_CKA_MC_CONST / sqrt(D)``
#: for D features (each Gram entry errs by ~1/sqrt(D); measured max over 20 seeds at n = 200, Gaussian
#: and IMQ, biased and unbiased: ~1.8 / sqrt(D); 4 is a 2x margin).
RFF_CKA_MC_CONST = 4.0


# --------------------------------------------------------------------------------------------------
# errors and the 2x rule
# --------------------------------------------------------------------------------------------------


def to_numpy(x) -> np.ndarray:
    """A tensor or array as a float64 NumPy array (on the host)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def max_abs_error(actual, expected) -> float:
    """``max |actual - expected|`` in float64 (NaN if either holds a NaN where the other does not)."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    return float(np.abs(a - e).max()) if a.size else 0.0


def bound_2x(err_torch: float, floor: float, factor: float = 2.0) -> float:
    """The largest error the 2x rule allows: ``max(factor * err_torch, floor)``."""
    return max(factor * err_torch, floor)


def assert_close(actual, expected, *, rtol: float, atol: float, name: str = "value") -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, with a report that says how
    many elements mismatch, the worst one, and where."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return
    err = np.abs(a - e)
    tol = atol + rtol * np.abs(e)
    bad = ~(err <= tol)  # NaN counts as a mismatch
    if bad.any():
        idx = np.unravel_index(np.nanargmax(np.where(bad, err - tol, -np.inf)), a.shape) if a.ndim else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.size} elements mismatch (rtol={rtol}, atol={atol}); "
            f"worst at {idx}: actual {a[idx]!r}, expected {e[idx]!r}, |diff| {err[idx]!r}; "
            f"max |diff| {np.nanmax(err)!r}"
        )


def assert_error_within_torch(actual, torch_actual, expected, *, floor: float, name: str, factor: float = 2.0,
                              rtol: float | None = None, atol: float | None = None) -> None:
    """The 2x rule (module docstring) for one result: ``max|actual - expected| <= max(factor *
    max|torch_actual - expected|, floor)``.

    With ``rtol``/``atol`` (the fp32 tier's stated tolerance, elementwise ``atol + rtol |expected|``) the
    result passes when every element is within that tolerance, and otherwise falls back to the rule: at
    cancellation points (a gradient through the normalisation Jacobian whose exact value is ~0, a
    difference of nearly equal terms) no fp32 computation reaches a tolerance scaled by the result, the
    torch tier misses it too, and the rule asks that the kernel be no worse than twice the torch tier
    there.  The rule is the same for the loss and for every gradient.
    """
    a, t, e = to_numpy(actual), to_numpy(torch_actual), to_numpy(expected)
    assert a.shape == e.shape == t.shape, f"{name}: shapes {a.shape}, torch {t.shape}, expected {e.shape}"
    if a.size == 0:
        return
    err = np.abs(a - e)
    if (rtol is not None or atol is not None) and bool((err <= (atol or 0.0) + (rtol or 0.0) * np.abs(e)).all()):
        return
    err_k = float(err.max())  # NaN if any element is NaN: fails below
    err_t = float(np.abs(t - e).max())
    bound = bound_2x(err_t, floor, factor)
    if not err_k <= bound:
        worst = a.ndim and not np.isnan(err).all()
        idx = tuple(int(i) for i in np.unravel_index(np.nanargmax(err), a.shape)) if worst else ()
        stated = f", and beyond the stated rtol={rtol}, atol={atol}" if rtol is not None or atol is not None else ""
        raise AssertionError(
            f"{name}: kernel error {err_k:.3e} > max({factor:g} x torch error {err_t:.3e}, floor {floor:.3e}) "
            f"(ratio {err_k / err_t if err_t else float('inf'):.2f}){stated}; worst at {idx}: "
            f"kernel {float(a[idx])!r}, torch {float(t[idx])!r}, float64 {float(e[idx])!r}"
        )


# --------------------------------------------------------------------------------------------------
# TF32 emulation
# --------------------------------------------------------------------------------------------------


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest TF32 value (10-bit mantissa), ties away from zero (``cvt.rna.tf32.f32``)."""
    b = x.contiguous().view(torch.int32)
    return ((b + 0x1000) & ~0x1FFF).view(torch.float32)


def trunc_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 by dropping the 13 low mantissa bits (what the MMA reads of an fp32 register)."""
    return (x.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def _split_bf16(x: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """``x`` (fp32) as ``parts`` bf16 values (as fp32), each the remainder so far rounded to nearest even."""
    out, rest = [], x
    for _ in range(parts):
        p = rest.to(torch.bfloat16).float()
        out.append(p)
        rest = rest - p
    return out


def mm(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """``a @ b`` as one fp32 ``tl.dot`` at ``precision`` computes it (float64 operands: exact float64)."""
    if a.dtype == torch.float64 or precision == "ieee":
        return a @ b
    if precision == "tf32":
        return trunc_tf32(a) @ trunc_tf32(b)
    if precision in ("bf16x3", "bf16x6"):
        (ah, am, al), (bh, bm, bl) = _split_bf16(a, 3), _split_bf16(b, 3)
        acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32)
        if precision == "bf16x6":
            acc = acc + am @ bm + al @ bh + ah @ bl
        return ((acc + am @ bh) + ah @ bm) + ah @ bh
    if precision != "tf32x3":
        raise ValueError(f"precision: expected 'ieee', 'tf32', 'tf32x3', 'bf16x3' or 'bf16x6', got {precision!r}")
    a_big, b_big = round_tf32(a), round_tf32(b)
    a_small, b_small = trunc_tf32(a - a_big), trunc_tf32(b - b_big)
    return (a_small @ b_big + a_big @ b_small) + a_big @ b_big


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |x - ref| / max |ref|`` (the errors compared across precisions)."""
    return float((x.double() - ref).abs().max() / ref.abs().max())


def errors_by_precision(run, ref, precisions) -> dict:
    """``{precision: [relative error of each result of run(precision) against ref]}``."""
    return {p: [rel_err(x, r) for x, r in zip(run(p), ref)] for p in precisions}


def within_2x_of_ieee(errs: dict, floor: float = 2.0**-22) -> set:
    """The precisions of ``errs`` (:func:`errors_by_precision`, ``"ieee"`` among them) whose every
    result's error is within 2x of ieee's, or below ``floor`` (see :func:`check_within_2x_of_ieee`)."""
    return {p for p, e in errs.items()
            if all(e_p <= bound_2x(e_i, 2.0 * floor) for e_p, e_i in zip(e, errs["ieee"]))}


def check_within_2x_of_ieee(run, ref, names, floor: float = 2.0**-22) -> dict:
    """Run ``run(precision)`` (a tuple of fp32 results) for ieee, tf32 and each precision of
    :data:`kernelssl.triton.targets.ACCURATE` (tf32x3: the targets' defaults are among them); every
    result's error against ``ref`` (float64) with each of ACCURATE is within 2x of ieee's, or below
    ``floor`` (relative errors below two fp32 epsilons, 2^-22, are equal -- the ieee path's own error
    on a scalar result moves by about one epsilon with the summation order alone: HSIC_ZY at the paper
    shape measured 1.22e-7 with one CPU thread and 3.45e-8 with two, SFRIK's M 9.3e-8 and 9.3e-10).
    tf32 must be clearly worse on at least one result, else the emulation is not doing anything.
    Returns the table of errors."""
    from .triton.targets import ACCURATE

    errs = errors_by_precision(run, ref, dict.fromkeys(("ieee", *ACCURATE, "tf32")))
    for p in ACCURATE:
        for name, e_ieee, e_p in zip(names, errs["ieee"], errs[p]):
            assert e_p <= bound_2x(e_ieee, 2.0 * floor), f"{name}: {p} error {e_p:.3g} > 2 x ieee {e_ieee:.3g}"
    assert max(t / max(i, floor) for t, i in zip(errs["tf32"], errs["ieee"])) > 10, errs
    return errs
