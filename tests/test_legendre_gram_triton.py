"""Fused Triton kernels of SFRIK's Legendre Gram mean (kernelssl/triton/legendre_gram.py).

On CPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1), at small
shapes, against the float64 NumPy reference (reference/legendre_gram.py) and the torch tier
(kernelssl/ops/legendre_gram.py); GPU tests at the paper's shapes are skipped without CUDA.

Every gradient check uses a non-unit upstream gradient (``UPSTREAM * M``).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import helpers
import kernelssl.functional as KF
from helpers import CUDA, DEV, assert_close, assert_error_within_torch, needs_cuda, to_numpy
from helpers import random_rows as _z
from kernelssl import dispatch
from kernelssl.losses import SFRIKLoss
from kernelssl.ops import legendre_gram as S
from reference import legendre_gram as R

LG = pytest.importorskip("kernelssl.triton.legendre_gram_op")
helpers.assert_kernels_can_run()

UPSTREAM = 2.5
B3 = (1.0, 40.0, 40.0)
HALF_ULP = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# fp32 vs float64, as in test_legendre_gram_torch.py: M is an fp32 sum of n^2 polynomial values (relative
# 2e-6); gradients relative 1e-5 of max|grad| (fp32 Gram entries through phi' and an n-term sum).
FP32_RTOL_M = 2e-6
FP32_RTOL_G = 1e-5


def _coeffs(L: int, seed: int) -> tuple[float, ...]:
    rng = np.random.default_rng(seed)
    return tuple(float(x) for x in rng.uniform(-2.0, 5.0, L))


def _m_floor(b) -> float:
    # Absolute floor for |M error|: 4 fp32 ulps (2^-22, relative) of sum|b_l| >= max|phi| on unit rows,
    # i.e. of one term of the mean -- no fp32 computation of M can promise less.
    return 2.0**-22 * sum(abs(x) for x in b)


def _rule_floor_m(m64: float, b, n: int) -> float:
    # Floor of the 2x rule for M: 8 fp32 ulps (2^-21, relative) of M's natural scale -- its value, or
    # the diagonal's share sum|b|/n when mixed-sign terms cancel.  Both paths sit at this level in
    # fp32 (a sum of n^2 rounded terms), where a ratio of their errors is noise.
    return 2.0**-21 * max(abs(m64), sum(abs(x) for x in b) / n)


def _grad_floor(g64) -> float:
    # Floor of the 2x rule for gradients: 4 fp32 ulps (2^-22, relative) of max |grad|.
    return 2.0**-22 * float(np.abs(g64).max())


def _check_rule(kern, torch_, m64, g64, b, n, what="", stated_dtype=None):
    """The 2x rule (kernelssl/numerics.py): the kernel's error vs float64 at most 2x the torch path's in the same
    dtype on the same input, plus the floors, for M and the gradient.  ``stated_dtype``: accept also
    everything within the fp32 tier's stated tolerances (_check_vs_reference) -- the rule then governs
    only where those are beyond fp32 on the input (cancellation points)."""
    (mk, gk), (mt, gt) = kern, torch_
    sm = sg = {}
    if stated_dtype is not None:
        ulp = HALF_ULP[stated_dtype]
        sm = dict(rtol=FP32_RTOL_M, atol=_m_floor(b))
        sg = dict(rtol=ulp + FP32_RTOL_G,
                  atol=FP32_RTOL_G * float(np.abs(g64).max()) + (2.0**-24 if ulp else 0.0))
    assert_error_within_torch(mk, mt, m64, floor=_rule_floor_m(m64, b, n), name=f"M {what}", **sm)
    assert_error_within_torch(gk, gt, g64, floor=_grad_floor(g64), name=f"dM/dz {what}", **sg)


def _run(fn, z: torch.Tensor, **kw):
    """``(M, dM/dz * UPSTREAM)`` of ``fn(z, **kw)`` on a fresh leaf."""
    z = z.detach().clone().requires_grad_(True)
    m = fn(z, **kw)
    (UPSTREAM * m).backward()
    return m.detach(), z.grad


def _reference(z: torch.Tensor, b, normalize: bool):
    zn = to_numpy(z)  # the rounded input, exactly, in float64
    m = R.gram_mean(R.normalize(zn) if normalize else zn, b)
    return m, UPSTREAM * R.gram_mean_grad(zn, b, normalize=normalize)


def _check_vs_reference(m, g, m64, g64, b, dtype, what=""):
    assert m.dtype == torch.float32 and m.dim() == 0
    assert g.dtype == dtype
    assert_close(m, m64, rtol=FP32_RTOL_M, atol=_m_floor(b), name=f"M {what}")
    gmax = float(np.abs(g64).max())
    # half: the fp32 error plus the final rounding to the input dtype (half an ulp, relative) and the
    # fp16 subnormal spacing 2^-24 (the torch tier's test_half_inputs budget)
    ulp = HALF_ULP[dtype]
    assert_close(g, g64, rtol=ulp + FP32_RTOL_G, atol=FP32_RTOL_G * gmax + (2.0**-24 if ulp else 0.0),
                 name=f"dM/dz {what}")


# (n, q, L, normalize): odd and non-power-of-two sizes so every tile loop has a ragged edge (the
# interpreter uses 32-wide blocks), q = 2 (Chebyshev), n = 2, L from 1 to 6.
SHAPES = [(37, 19, 3, True), (128, 64, 6, True), (64, 33, 4, False), (45, 2, 2, True), (2, 5, 1, True),
          (70, 40, 5, True)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n,q,L,normalize", SHAPES)
def test_values_and_gradients_vs_reference(n, q, L, normalize, dtype):
    b = B3 if L == 3 else _coeffs(L, 7 * n + q)
    z = _z(n, q, n + q, dtype, unit=not normalize).to(DEV)
    m, g = _run(LG.legendre_gram_mean, z, coefficients=b, normalize=normalize)
    m64, g64 = _reference(z.cpu(), b, normalize)
    _check_vs_reference(m, g, m64, g64, b, dtype, f"{dtype} n={n} q={q} L={L}")


@pytest.mark.skipif(CUDA, reason="on a GPU every test runs the GPU configuration")
@pytest.mark.parametrize("n,q", [(150, 45), (140, 48)], ids=["q45-unaligned", "q48-aligned"])
def test_gpu_block_configuration_under_interpreter(n, q, monkeypatch):
    """The GPU block sizes (128-wide tiles; 64-wide Gram and 128 x 64 GEMM tiles for fp32 rows that are
    not 16-byte aligned) run through the interpreter: ragged edges and both fp32 layouts of gram_config
    give the reference values, so a GPU session starts from block sizes whose indexing is tested."""
    gpu_config = helpers.use_gpu_gram_config(monkeypatch, LG)
    assert gpu_config(torch.float32, q)["block"] == (64 if q % 16 else 128)
    z = _z(n, q, 11, torch.float32).to(DEV)
    m, g = _run(LG.legendre_gram_mean, z, coefficients=B3)
    m64, g64 = _reference(z.cpu(), B3, True)
    _check_vs_reference(m, g, m64, g64, B3, torch.float32, f"GPU blocks n={n} q={q}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n,q,L", [(37, 19, 3), (128, 64, 6), (96, 48, 2)])
def test_low_precision_rule(n, q, L, dtype):
    """The 2x rule (kernelssl/numerics.py): error of the kernel vs float64 <= 2x the torch path's error
    in the same dtype, for M and the gradient.  Floors where both are at fp32 rounding level:
    _rule_floor_m for M; for the gradient 2^-22 max|grad| (4 fp32 ulps of the largest entry), far below
    a half-precision gradient's rounding."""
    b = B3 if L == 3 else _coeffs(L, n * q)
    z = _z(n, q, 3 * n + q, dtype).to(DEV)
    mk, gk = _run(LG.legendre_gram_mean, z, coefficients=b)
    mt, gt = _run(S.legendre_gram_mean, z, coefficients=b)
    m64, g64 = _reference(z.cpu(), b, True)
    _check_rule((mk, gk), (mt, gt), m64, g64, b, n, f"{dtype} n={n} q={q} L={L}")
    # and the two agree with each other (same inputs, same dtype of result)
    assert_close(mk, mt, rtol=2 * FP32_RTOL_M, atol=2 * _m_floor(b), name="M kernel vs torch")


@given(
    n=st.integers(2, 40),
    q=st.integers(2, 40),
    L=st.integers(1, 6),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(n=2, q=2, L=2, normalize=True, seed=30)  # a cancellation point: test_normalisation_jacobian_q2_regression
def test_random_tiny_shapes(n, q, L, normalize, seed):
    """fp32 kernel vs float64 within the stated fp32 tolerances, or, where those are beyond fp32 on the
    input (torch misses them too), within the 2x rule's bound: 2x the torch path's error."""
    b = _coeffs(L, seed)
    z = _z(n, q, seed, torch.float32, unit=not normalize).to(DEV)
    m, g = _run(LG.legendre_gram_mean, z, coefficients=b, normalize=normalize)
    assert m.dtype == torch.float32 and m.dim() == 0 and g.dtype == torch.float32
    torch_ = _run(S.legendre_gram_mean, z, coefficients=b, normalize=normalize)
    m64, g64 = _reference(z.cpu(), b, normalize)
    _check_rule((m, g), torch_, m64, g64, b, n, f"n={n} q={q} L={L}", stated_dtype=torch.float32)


def test_normalisation_jacobian_q2_regression():
    """n = 2, q = 2, nearly antipodal rows -- the Jacobian (I - zhat zhat^T) g / ||z|| cancels most of
    g.  The diagonal term phi'(G_kk) zhat_k, which the Jacobian removes exactly, is dropped for
    normalised rows: carried through in fp32 with G_kk = 1 +- ulps it would put dM/dz[0, 0] 3.1e-6 off
    (torch fp32: 7.4e-7 worst).  Strict rule, no stated tolerance."""
    n, q, L, seed = 2, 2, 2, 30
    b = _coeffs(L, seed)
    z = _z(n, q, seed, torch.float32).to(DEV)
    m64, g64 = _reference(z.cpu(), b, True)
    _check_rule(_run(LG.legendre_gram_mean, z, coefficients=b), _run(S.legendre_gram_mean, z, coefficients=b),
                m64, g64, b, n, "n = 2, q = 2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("normalize", [True, False])
def test_backward_panels(dtype, normalize):
    """The backward in several row panels (20 rows: panels of 20, 20, 5) equals one panel and the reference."""
    n, q, b = 45, 24, _coeffs(4, 3)
    z = _z(n, q, 5, dtype, unit=not normalize).to(DEV)
    grad = torch.tensor(UPSTREAM, device=DEV)
    one = LG.legendre_gram_backward(grad, z, b, normalize)
    many = LG.legendre_gram_backward(grad, z, b, normalize, panel_rows=20)
    _, g64 = _reference(z.cpu(), b, normalize)
    gmax = float(np.abs(g64).max())
    tol = dict(rtol=HALF_ULP[dtype] + FP32_RTOL_G, atol=FP32_RTOL_G * gmax)
    assert_close(many, g64, **tol, name="3 panels vs reference")
    assert_close(one, g64, **tol, name="1 panel vs reference")
    # each is rounded once to the output dtype from fp32 values that differ by fp32 rounding only: the
    # two roundings may land one ulp apart (a half ulp each way), so panels vs panel allow twice that
    both = dict(rtol=2 * HALF_ULP[dtype] + FP32_RTOL_G, atol=FP32_RTOL_G * gmax)
    assert_close(many, one, **both, name="3 panels vs 1 panel")


def test_panel_rows_policy():
    assert LG.panel_rows_for(2048) == 2048  # n^2 = 4 Mi <= 32 Mi: one panel (16 MiB)
    assert LG.panel_rows_for(5792) == 5792
    assert LG.panel_rows_for(8192) == 4096  # 2^25 / n
    assert LG.panel_rows_for(131072) == 1024  # floor of 1024 rows: 512 MiB panel, never n x n
    assert LG.panel_rows_for(100_000) % 128 == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_deterministic(dtype):
    z = _z(100, 40, 1, dtype).to(DEV)
    m1, g1 = _run(LG.legendre_gram_mean, z, coefficients=B3)
    m2, g2 = _run(LG.legendre_gram_mean, z, coefficients=B3)
    assert torch.equal(m1, m2) and torch.equal(g1, g2)


def test_non_contiguous_input():
    base = _z(30, 50, 2, torch.float32).to(DEV)  # (q, n) storage, used transposed
    zt = base.t()
    assert not zt.is_contiguous()
    m, g = _run(LG.legendre_gram_mean, zt, coefficients=B3)
    mc, gc = _run(LG.legendre_gram_mean, zt.contiguous(), coefficients=B3)
    assert_close(m, mc, rtol=1e-6, atol=0, name="M strided")
    assert_close(g, gc, rtol=1e-6, atol=1e-7 * float(gc.abs().max()), name="grad strided")


def test_zero_row_and_non_finite():
    z = _z(20, 9, 4, torch.float32).to(DEV)
    z[3] = 0.0  # normalises to 0 (F.normalize), its Gram row is 0; its gradient is g / eps
    m, g = _run(LG.legendre_gram_mean, z, coefficients=B3)
    mt, gt = _run(S.legendre_gram_mean, z, coefficients=B3)
    assert torch.isfinite(m) and torch.isfinite(g).all()
    assert_close(m, mt, rtol=1e-6, atol=0, name="M with a zero row")
    assert_close(g, gt, rtol=1e-5, atol=1e-5 * float(gt.abs().max()), name="grad with a zero row")
    z[5, 2] = math.nan  # NaN propagates, never a silent finite number
    m, g = _run(LG.legendre_gram_mean, z, coefficients=B3)
    assert torch.isnan(m) and torch.isnan(g).any()


def test_no_grad_and_frozen_input():
    z = _z(33, 17, 6, torch.float32).to(DEV)
    with torch.no_grad():
        m0 = LG.legendre_gram_mean(z.clone().requires_grad_(True), B3)
    m1 = LG.legendre_gram_mean(z, B3)  # requires_grad=False
    assert m0.grad_fn is None and m1.grad_fn is None and not m1.requires_grad
    assert torch.equal(m0, m1)


def test_float64_uses_the_torch_path():
    """backend="triton" with float64 rows: the dispatcher sends them to the torch tier."""
    z = _z(20, 7, 8).to(DEV)
    m, g = _run(lambda x, coefficients: KF.legendre_gram_mean(x, coefficients, backend="triton"), z, coefficients=B3)
    mt, gt = _run(S.legendre_gram_mean, z, coefficients=B3)
    assert m.dtype == torch.float64 and torch.equal(m, mt) and torch.equal(g, gt)


def test_bad_input():
    """Bad input is refused once, by the functional API, before the dispatcher picks the kernels."""
    with pytest.raises(TypeError, match="z: expected a floating-point tensor"):
        KF.legendre_gram_mean(torch.ones(4, 3, dtype=torch.int64), B3, backend="triton")
    with pytest.raises(ValueError, match="z: expected a 2-D tensor"):
        KF.legendre_gram_mean(torch.ones(4), B3, backend="triton")
    with pytest.raises(ValueError, match="q >= 2"):
        KF.legendre_gram_mean(torch.ones(4, 1), B3, backend="triton")


@pytest.mark.skipif(CUDA, reason="CPU dispatch")
def test_cpu_runs_the_kernels_under_the_interpreter(monkeypatch):
    # the torch tier: the CPU kernels' math
    helpers.forbid_torch_tier(monkeypatch, S, "legendre_gram_mean", "legendre_gram_mean_backward")
    _run(LG.legendre_gram_mean, _z(20, 6, 10, torch.float32), coefficients=B3)


@pytest.mark.skipif(CUDA, reason="CPU dispatch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_cpu_kernel_without_interpreter_is_the_torch_math(monkeypatch, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # dispatch.interpreting() reads it at call time
    z = _z(40, 11, 11, dtype)
    z[7] = 0.0
    for normalize in (True, False):
        m, g = _run(LG.legendre_gram_mean, z, coefficients=B3, normalize=normalize)
        m64, g64 = _reference(z, B3, normalize)
        if normalize:
            g64[7] = UPSTREAM * R.gram_mean_grad(to_numpy(z), B3)[7]  # g / eps: same formula
        _check_vs_reference(m, g, m64, g64, B3, dtype, f"torch math normalize={normalize}")


def test_public_api_dispatches_to_the_kernel(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    za, zb = _z(48, 16, 12, torch.float32).to(DEV), _z(48, 16, 13, torch.float32).to(DEV)
    m = KF.legendre_gram_mean(za, B3, backend="triton")
    assert torch.equal(m, LG.legendre_gram_mean(za, B3))
    ta, tb = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    loss = SFRIKLoss(backend="triton")(ta, tb)
    (UPSTREAM * loss).backward()
    ra, rb = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    ref = SFRIKLoss(backend="torch")(ra, rb)
    (UPSTREAM * ref).backward()
    assert_close(loss, ref.detach(), rtol=FP32_RTOL_M, atol=0, name="SFRIK loss triton vs torch")
    for name, g, gr in (("dz_a", ta.grad, ra.grad), ("dz_b", tb.grad, rb.grad)):
        assert_close(g, gr, rtol=FP32_RTOL_G, atol=FP32_RTOL_G * float(gr.abs().max()), name=name)


@pytest.mark.parametrize("dtype,normalize", [(torch.float32, True), (torch.bfloat16, False)],
                         ids=["fp32-normalize", "bf16-raw"])
def test_opcheck(dtype, normalize):
    z = _z(37, 19, 14, dtype, unit=not normalize).to(DEV).requires_grad_(True)
    args = ([1.0, 40.0, 40.0], normalize, "tf32x3")
    torch.library.opcheck(torch.ops.kernelssl.legendre_gram_mean.default, (z, *args))
    torch.library.opcheck(torch.ops.kernelssl.legendre_gram_mean_backward.default,
                          (torch.tensor(UPSTREAM, device=DEV), z.detach(), *args))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    """Forward + backward under torch.compile(fullgraph=True): no graph break, same numbers as eager.
    On CPU the op stays one opaque call that runs the interpreted kernels (inductor cannot capture
    interpreted kernels); on CUDA it decomposes into the Triton kernels (test_gpu_compile_inductor)."""
    torch._dynamo.reset()
    z = _z(40, 24, 15, torch.float32).to(DEV)
    fn = torch.compile(lambda x: UPSTREAM * LG.legendre_gram_mean(x, B3), backend=backend, fullgraph=True)
    m, g = _run(fn, z)
    me, ge = _run(lambda x: UPSTREAM * LG.legendre_gram_mean(x, B3), z)
    assert_close(m, me, rtol=1e-6, atol=0, name="compiled M")
    assert_close(g, ge, rtol=1e-6, atol=1e-6 * float(ge.abs().max()), name="compiled grad")


# --------------------------------------------------------------------------------------------------
# GPU: the paper's shapes (skipped without CUDA)
# --------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("q", [8192, 32768])
def test_gpu_paper_shapes_precision_rule(q, dtype):
    n = 2048
    z = _z(n, q, 16, dtype).to("cuda")
    kern = _run(LG.legendre_gram_mean, z, coefficients=B3)
    torch_ = _run(S.legendre_gram_mean, z, coefficients=B3)
    m64, g64 = _run(S.legendre_gram_mean, z.double(), coefficients=B3)  # float64 torch path (= reference)
    _check_rule(kern, torch_, float(m64), to_numpy(g64), B3, n, f"{dtype} q={q}")


@needs_cuda
def test_gpu_large_batch_memory():
    """n = 32768: the n x n Gram would be 4 GiB in fp32; the kernels need z, its gradient and one
    (1024, n) fp32 panel (128 MiB) plus O(n) vectors."""
    n, q = 32768, 8192
    z = torch.randn(n, q, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    m = LG.legendre_gram_mean(z, B3)
    m.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    budget = n * q * 2 + 4 * LG.panel_rows_for(n) * n + 64 * 2**20  # grad + panel + slack
    assert torch.isfinite(m) and torch.isfinite(z.grad).all()
    assert extra <= budget, (extra / 2**20, budget / 2**20)


@needs_cuda
def test_gpu_deterministic():
    z = _z(2048, 8192, 17, torch.bfloat16).to("cuda")
    m1, g1 = _run(LG.legendre_gram_mean, z, coefficients=B3)
    m2, g2 = _run(LG.legendre_gram_mean, z, coefficients=B3)
    assert torch.equal(m1, m2) and torch.equal(g1, g2)


@needs_cuda
def test_gpu_compile_inductor():
    torch._dynamo.reset()
    z = _z(2048, 8192, 18, torch.bfloat16).to("cuda")
    fn = torch.compile(lambda x: UPSTREAM * LG.legendre_gram_mean(x, B3), fullgraph=True)
    m, g = _run(fn, z)
    me, ge = _run(lambda x: UPSTREAM * LG.legendre_gram_mean(x, B3), z)
    assert_close(m, me, rtol=1e-6, atol=0, name="compiled M")
    assert_close(g, ge, rtol=2.0**-8, atol=1e-5 * float(ge.float().abs().max()), name="compiled grad")


@needs_cuda
def test_gpu_precisions():
    z = _z(1024, 4096, 19, torch.float32).to("cuda")
    m64 = S.legendre_gram_mean(z.double(), B3)
    default = LG.legendre_gram_mean(z, B3)  # tf32x3 unless torch's TF32 flag is on
    ieee = LG.legendre_gram_mean(z, B3, input_precision="ieee")
    tf32 = LG.legendre_gram_mean(z, B3, input_precision="tf32")
    # IEEE fp32 and tf32x3 keep fp32 accuracy; TF32 (10-bit mantissa products) is allowed to be worse but sane
    assert float((ieee.double() - m64).abs()) <= FP32_RTOL_M * float(m64.abs()) + _m_floor(B3)
    if not torch.backends.cuda.matmul.allow_tf32:
        assert float((default.double() - m64).abs()) <= FP32_RTOL_M * float(m64.abs()) + _m_floor(B3)
    assert float((tf32.double() - m64).abs()) <= 1e-2 * float(m64.abs())


# --------------------------------------------------------------------------------------------------
# precision policy (docs/numerics.md): the default tf32x3, emulated on the CPU
# --------------------------------------------------------------------------------------------------


def _legendre_terms(t, q, b):
    """(phi(t), phi'(t)) by the kernels' joint recurrence (_phi, _phi_prime), constants in float64."""
    p_prev, p, d_prev, d = torch.ones_like(t), t, torch.zeros_like(t), torch.ones_like(t)
    val, der = b[0] * t, b[0] * torch.ones_like(t)
    for l in range(1, len(b)):
        alpha, beta = (2 * l + q - 2) / (l + q - 2), l / (l + q - 2)
        p_next, d_next = alpha * t * p - beta * p_prev, alpha * (p + t * d) - beta * d_prev
        val, der = val + b[l] * p_next, der + b[l] * d_next
        p_prev, p, d_prev, d = p, p_next, d, d_next
    return val, der


def _emulated_gram_mean(z, b, g, precision):
    """(M, dL/dz) for L = g M(z) (normalize=True), in the kernels' own decomposition (module
    docstring): Gram tiles of the raw rows scaled by r_i r_j, the panel P = phi'(G) r_j, the backward
    GEMM P Z and its normalisation epilogue; every GEMM by kernelssl.numerics.mm at ``precision``."""
    from kernelssl.numerics import mm

    n, q = z.shape
    r = 1.0 / z.norm(dim=1).clamp_min(1e-12)  # _row_scales_kernel
    gram = mm(z, z.T.contiguous(), precision) * r[:, None] * r[None, :]
    val, der = _legendre_terms(gram, q, b)
    m = val.sum() / (n * n)
    d_k = (der * gram).sum(1)
    acc = mm(der * r[None, :], z, precision)  # _panel_matmul_kernel (MODE 0: fp32 rows)
    grad = (2.0 * g / (n * n)) * (r[:, None] * acc - (r * r * d_k)[:, None] * z)
    return m, grad


@pytest.mark.slow  # the CPU emulation at q = 8192 (~3 s)
def test_tf32x3_default_is_within_2x_of_ieee_emulated():
    """With every kernel GEMM in emulated tf32x3, the error of M and of dL/dz
    against float64 is within 2x of full fp32's ("ieee"); plain tf32 is far worse (printed with -s).
    SFRIK's rows are q = 8192 long as in the paper; n = 512 rows instead of the paper's 2048 keeps the
    CPU emulation to a few seconds (the Gram's error is per entry, set by q, not by n)."""
    from kernelssl.numerics import check_within_2x_of_ieee

    check_within_2x_of_ieee(*emulated_paper_case())


def emulated_paper_case():
    """``(run, ref, names)`` of the emulation above (also used by test_targets)."""
    n, q = 512, 8192
    z = _z(n, q, 21)
    ref = _emulated_gram_mean(z, B3, UPSTREAM, "ieee")  # float64 throughout
    z32 = z.float()
    return (lambda p: _emulated_gram_mean(z32, B3, UPSTREAM, p)), ref, ("M", "dL/dz")


@needs_cuda
def test_gpu_tf32x3_default_within_2x_of_ieee_at_paper_shape():
    """The same bound on a GPU at the SFRIK headline shape (n = 2048, q = 8192, fp32 rows): the default
    (tf32x3) error of M and dL/dz against float64 is within 2x of "ieee"'s."""
    z = _z(2048, 8192, 16, torch.float32).to("cuda")
    m64, g64 = _run(S.legendre_gram_mean, z.double(), coefficients=B3)
    with helpers.tf32_flag_off():
        md, gd = _run(LG.legendre_gram_mean, z, coefficients=B3)  # default: tf32x3
    mi, gi = _run(LG.legendre_gram_mean, z, coefficients=B3, input_precision="ieee")
    err_md, err_mi = float((md.double() - m64).abs()), float((mi.double() - m64).abs())
    assert err_md <= 2 * max(err_mi, _rule_floor_m(float(m64), B3, 2048)), (err_md, err_mi)
    err_gd, err_gi = float((gd.double() - g64).abs().max()), float((gi.double() - g64).abs().max())
    assert err_gd <= 2 * max(err_gi, 2.0**-22 * float(g64.abs().max())), (err_gd, err_gi)  # floor: kernelssl.numerics


# --------------------------------------------------------------------------------------------------
# GPU code generation without a GPU: compile every kernel for sm_90 (H100/H200) with Triton's bundled
# ptxas, specialised as a real launch would be (tests/compile_targets.py).
# --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(CUDA, reason="the GPU tests run the kernels themselves")
@pytest.mark.slow  # a subprocess compiling every variant for sm_90 (~10 s)
def test_kernels_compile_for_sm90():
    """Every kernel variant the GPU path issues (n = 2048, q = 8192 in bf16, fp16 and fp32 with each
    input_precision; rows of q = 8200 and 300, not multiples of 16, in every dtype; L = 5 without
    normalisation over several backward panels) compiles to an sm_90 cubin, specialised as a real launch
    would be, with no register spills and within the 227 KiB of shared memory.  The Gram and backward
    GEMMs use Hopper tensor cores (wgmma) for 16-bit operands and for fp32 with the default tf32x3 (and
    tf32), and only the FMA units with "ieee".  Catches GPU-only compile errors the interpreter cannot.

    The forward at the SFRIK headline shape (n = 2048 per view, q = 8192) fills the 132 SMs of an
    H100/H200 in whole waves (programs per SM from ptxas' registers and the shared memory): wave
    efficiency >= 80% in every dtype (136 programs at one per SM would be 52%)."""
    import compile_targets

    variants = helpers.sm90_variants("legendre_gram")
    assert {v["kernel"] for v in variants} == {"_row_scales_kernel", "_gram_phi_sum_kernel", "_sum_partials_kernel",
                                               "_gram_dphi_kernel", "_panel_matmul_kernel"}
    gemms = [v for v in variants if "INPUT_PRECISION" in v["constexprs"]]
    # "tf32" is also what 16-bit operands carry (ignored by their MMA)
    helpers.assert_tensor_cores_unless_ieee(gemms, "INPUT_PRECISION", mma_sync=False)
    for v in gemms:
        assert v["mma_sync"] == 0 or v["constexprs"]["INPUT_PRECISION"] != "ieee", v
    assert sum(v["constexprs"]["INPUT_PRECISION"] == "tf32x3" for v in gemms) >= 6
    headline = [v for v in variants if v["kernel"] == "_gram_phi_sum_kernel"
                and (v["case"] or "").startswith("n2048-q8192-")]
    assert len(headline) == 5, [(v["case"], v["grid"]) for v in variants if v["kernel"] == "_gram_phi_sum_kernel"]
    for v in headline:
        per_sm = compile_targets.programs_per_sm(v)
        assert compile_targets.wave_efficiency(v["grid"][0], per_sm * compile_targets.SM90["sms"]) >= 0.8, (per_sm, v)
