"""Fused Triton kernels of MEC's batched matrix-log Taylor expansion (kernelssl/triton/taylor_logdet.py).

On CPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1), at small
shapes, against the float64 NumPy reference (reference/taylor_logdet.py) and the torch tier
(kernelssl/ops/taylor_logdet.py); GPU tests at the paper's shapes are skipped without CUDA.

Both kernel paths are exercised: ``onchip`` (s = min(m, d) <= ONCHIP_MAX: one program per pair holds
the s x s matrix) and ``tiled`` (ONCHIP_MAX forced to 0: tiled GEMMs, trace pairing, deterministic
reductions).  Under the interpreter the tiles are 16 wide, so every shape here spans several tiles
and the odd sizes exercise the masks.  Every gradient check uses a non-unit, per-pair upstream
gradient.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import helpers
import kernelssl.functional as KF
from helpers import CUDA, DEV, ROOT, assert_close, assert_error_within_torch, needs_cuda, to_numpy
from kernelssl.losses import MECLoss
from kernelssl.ops import taylor_logdet as M
from reference import taylor_logdet as R

K = pytest.importorskip("kernelssl.triton.taylor_logdet_op")
helpers.assert_kernels_can_run()

F64 = torch.float64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32 vs float64 (the torch tier's own fp32 tolerances, test_taylor_logdet_torch.py): fp32 unit roundoff 6e-8
# times accumulations of length O(s): 1e-6 of the summed term magnitudes sum_k |tr C^k| / k for T;
# gradients add the S_n sum and the normalisation Jacobian: 5e-6 of the largest entry.
FP32_VALUE = 1e-6
FP32_GRAD = 5e-6
# Floor of the 2x rule (kernelssl/numerics.py): 8 fp32 ulps (2^-21, relative) of the quantity's scale
# (the term magnitudes for T, max |grad| for gradients).  Both paths accumulate in fp32 and sit at this
# level whatever the input dtype; below it the ratio of two roundoff errors is noise.
RULE_FLOOR = 2.0**-21


@pytest.fixture
def path(request, monkeypatch):
    """"onchip": the default threshold; "tiled": ONCHIP_MAX = 0 forces the tiled kernels."""
    if request.param == "tiled":
        monkeypatch.setattr(K, "ONCHIP_MAX", 0)
    return request.param


def _pair(seed, m, d, batch=(2,)):
    """Rows with a shared direction (so C has a dominant eigenvalue and rho ~ 0.3-0.9 at the lam
    used) and b a noisy copy of a: every term of the series matters."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(batch + (m, d)) + 0.7 * rng.standard_normal(batch + (1, d))
    b = a + 0.8 * rng.standard_normal(batch + (m, d))
    return a, b


def _lam(m, d):
    return 1.5 / min(m, d)


def _upstream(batch, seed=0):
    """Non-unit upstream gradient of mixed signs, one per pair."""
    n = int(np.prod(batch)) if batch else 1
    rng = np.random.default_rng(seed + 7)
    return (rng.uniform(0.5, 2.5, n) * np.where(np.arange(n) % 2, -1.0, 1.0)).reshape(batch)


def _terms(a, b, lam, order, normalize=True):
    """sum_k sum_i |diag(C^k)_i| / k per pair: the magnitude against which roundoff of T is measured
    (the summands of the traces, not the traces: at d = 1 with rows of opposite signs tr(C) = 0
    exactly while each diag(C)_i = +-lam is rounded; elsewhere the diagonals share a sign and this is
    sum_k |tr(C^k)| / k)."""
    an, bn = (R.normalize(a), R.normalize(b)) if normalize else (a, b)
    c = np.asarray(lam)[..., None, None] * an @ np.swapaxes(bn, -1, -2)
    out, p = 0.0, np.broadcast_to(np.eye(c.shape[-1]), c.shape)
    for k in range(1, order + 1):
        p = p @ c
        out = out + np.abs(np.diagonal(p, axis1=-2, axis2=-1)).sum(-1) / k
    return out


def _reference(a, b, lam, order, up, normalize=True):
    t = R.taylor_logdet(a, b, lam, order, normalize=normalize)
    ga, gb = R.taylor_logdet_grad(a, b, lam, order, normalize=normalize)
    u = np.asarray(up)[..., None, None]
    return np.asarray(t), u * ga, u * gb


def _run(fn, a, b, lam, order, up, dtype=torch.float32, **kw):
    """``(T, dL/da, dL/db)`` of ``L = sum(up * fn(a, b))`` on fresh leaves of ``dtype``."""
    ta = torch.as_tensor(a).to(DEV, dtype).requires_grad_(True)
    tb = torch.as_tensor(b).to(DEV, dtype).requires_grad_(True)
    t = fn(ta, tb, lam, order, **kw)
    (torch.as_tensor(up, device=DEV, dtype=t.dtype) * t).sum().backward()
    return t.detach(), ta.grad, tb.grad


def _check_rule(kern, torch_, ref, terms, name="", stated=False):
    """The 2x rule (kernelssl/numerics.py): the kernel's error vs float64 at most 2x the torch path's in the same
    dtype on the same input, plus RULE_FLOOR of the scale, for T and both gradients.  ``stated``: accept
    also everything within the fp32 tolerances of _check_fp32 -- the rule then governs only where those
    are beyond fp32 on the input (cancellation points, e.g. a gradient that is exactly 0)."""
    gmax = max(np.abs(ref[1]).max(), np.abs(ref[2]).max())
    scales = [np.max(terms), gmax, gmax]
    tols = [FP32_VALUE * np.max(terms), FP32_GRAD * gmax, FP32_GRAD * gmax]
    for what, k, t, r, sc, tol in zip(("T", "dT/da", "dT/db"), kern, torch_, ref, scales, tols):
        stated_tol = dict(rtol=0.0, atol=tol) if stated else {}
        assert_error_within_torch(k, t, r, floor=RULE_FLOOR * sc, name=f"{name} {what}", **stated_tol)


def _check_fp32(got, ref, terms, name=""):
    t, ga, gb = got
    rt, rga, rgb = ref
    assert t.dtype == torch.float32 and ga.dtype == torch.float32 and gb.dtype == torch.float32
    assert_close(t, rt, rtol=0, atol=FP32_VALUE * np.max(terms), name=f"{name} T")
    gmax = max(np.abs(rga).max(), np.abs(rgb).max())
    assert_close(ga, rga, rtol=0, atol=FP32_GRAD * gmax, name=f"{name} dT/da")
    assert_close(gb, rgb, rtol=0, atol=FP32_GRAD * gmax, name=f"{name} dT/db")


# ---------------------------------------------------------------------------------------------------
# values and gradients against the float64 reference (and the torch path), fp32
# ---------------------------------------------------------------------------------------------------

CASES = [  # (path, m, d, batch): m-space (m <= d) and d-space (m > d), odd sizes, batch dims
    ("onchip", 12, 20, (2,)),
    ("onchip", 21, 13, (2,)),
    ("tiled", 12, 20, (2,)),
    ("tiled", 21, 13, (2,)),
]


@pytest.mark.parametrize("order", range(1, 9))
@pytest.mark.parametrize("path,m,d,batch", CASES, indirect=["path"], ids=lambda v: str(v))
def test_values_and_gradients_vs_reference(path, m, d, batch, order):
    a, b = _pair(10 * order + m, m, d, batch)
    lam, up = _lam(m, d), _upstream(batch, order)
    ref = _reference(a, b, lam, order, up)
    terms = _terms(a, b, lam, order)
    got = _run(K.taylor_logdet, a, b, lam, order, up)
    assert got[0].shape == batch
    _check_fp32(got, ref, terms, "kernel")
    # and the torch path in the same dtype agrees to the same tolerance
    _check_fp32(_run(M.taylor_logdet, a, b, lam, order, up), ref, terms, "torch")


@pytest.mark.parametrize("sms", [132, 108, 114])
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "bf16"])
def test_gram_split_fills_the_waves(sms, half, monkeypatch):
    """The Gram's split-K is chosen from the SM count and the kernel's occupancy (1 program
    per SM) so that its programs fill >= 90% of their waves, with no split where the output alone does
    (MEC's paper Gram on 132 SMs: fp32 256 programs, bf16 128 of 128 x 128; a split only adds the
    partials' sum)."""
    import compile_targets

    monkeypatch.setattr(K, "interpreting", lambda: False)
    cfg = K._gemm_config(half, "tf32x3")
    tiles = (1024 // cfg["BLOCK_M"]) * (1024 // cfg["BLOCK_N"])  # MEC's paper shape, m = 1024
    per_sm = K._gemm_per_sm(half, "tf32x3")
    split = K._split_k(tiles, 2, 2048, cfg["BLOCK_K"], sms * per_sm)
    assert compile_targets.wave_efficiency(tiles * 2 * split, per_sm * sms) >= 0.9, split
    if sms == 132:
        assert split == 1


@pytest.mark.parametrize("order", [2, 4, 5])
@pytest.mark.parametrize(
    "path,m,d,batch",
    # the larger shapes (1-2.5 s each under the interpreter) in the slow tier: test_values_and_gradients_vs_reference
    # covers both paths in m- and d-space over several tiles on the fast one; the 2-D batch stays
    [pytest.param("tiled", 33, 64, (2,), marks=pytest.mark.slow),
     pytest.param("tiled", 64, 47, (1,), marks=pytest.mark.slow),
     pytest.param("onchip", 30, 64, (3,), marks=pytest.mark.slow), ("tiled", 5, 7, (2, 3))],
    indirect=["path"], ids=lambda v: str(v))
def test_larger_and_batched_shapes(path, m, d, batch, order):
    a, b = _pair(order + m + d, m, d, batch)
    lam, up = _lam(m, d), _upstream(batch, order)
    got = _run(K.taylor_logdet, a, b, lam, order, up)
    _check_fp32(got, _reference(a, b, lam, order, up), _terms(a, b, lam, order))


@pytest.mark.parametrize("path", ["onchip", "tiled"], indirect=True)
@pytest.mark.parametrize("m,d", [(12, 18), (19, 11)])
def test_normalize_false(path, m, d):
    a, b = _pair(3, m, d)
    a, b = 0.3 * a, 0.3 * b  # raw rows of norm ~1-2: C of moderate size
    lam, up, order = 0.05, _upstream((2,)), 3
    got = _run(K.taylor_logdet, a, b, lam, order, up, normalize=False)
    ref = _reference(a, b, lam, order, up, normalize=False)
    _check_fp32(got, ref, _terms(a, b, lam, order, normalize=False))


@pytest.mark.parametrize("path", ["onchip", "tiled"], indirect=True)
def test_tensor_lam_broadcast_and_its_gradient(path):
    a, b = _pair(4, 14, 9, (3, 2))
    lam = np.array([0.07, 0.15])  # broadcasts over the trailing batch dim
    up = _upstream((3, 2))
    ref = _reference(a, b, lam, 4, up)
    tl = torch.tensor(lam, dtype=torch.float32, device=DEV, requires_grad=True)
    got = _run(lambda x, y, _l, n: K.taylor_logdet(x, y, tl, n), a, b, None, 4, up)
    _check_fp32(got, ref, _terms(a, b, lam, 4))
    # dT/dlam against float64 autograd of the torch path
    l64 = torch.tensor(lam, dtype=F64, requires_grad=True)
    t64 = M.taylor_logdet(torch.tensor(a), torch.tensor(b), l64, 4)
    (torch.tensor(up) * t64).sum().backward()
    assert_close(tl.grad, l64.grad, rtol=1e-5, atol=1e-6 * float(l64.grad.abs().max()), name="dT/dlam")


@pytest.mark.parametrize("path", ["onchip", "tiled"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_d_space_rows_wider_than_a_tile(path, dtype, monkeypatch):
    """d-space gradients whose rows do not fit one tile: GEMM to an fp32 buffer, then the row-owning
    normalisation-Jacobian kernel (the GPU path for d > 128; forced here at d = 24)."""
    monkeypatch.setattr(K, "_PROJ_IN_TILE_MAX", 0)
    a, b = _pair(5, 40, 24)
    ah, bh = torch.tensor(a).to(dtype), torch.tensor(b).to(dtype)
    a64, b64 = ah.double().numpy(), bh.double().numpy()  # reference on the same rounded inputs
    lam, up = _lam(40, 24), _upstream((2,))
    t, ga, gb = _run(K.taylor_logdet, a64, b64, lam, 4, up, dtype=dtype)
    assert ga.dtype == dtype and gb.dtype == dtype
    rt, rga, rgb = _reference(a64, b64, lam, 4, up)
    u = 0.0 if dtype == torch.float32 else 2.0**-8  # the gradients are rounded to the input dtype
    gmax = max(np.abs(rga).max(), np.abs(rgb).max())
    assert_close(t, rt, rtol=0, atol=FP32_VALUE * np.max(_terms(a64, b64, lam, 4)), name="T")
    assert_close(ga, rga, rtol=u, atol=FP32_GRAD * gmax, name="dT/da")
    assert_close(gb, rgb, rtol=u, atol=FP32_GRAD * gmax, name="dT/db")


@given(m=st.integers(2, 18), d=st.integers(1, 18), order=st.integers(1, 6), tiled=st.booleans(),
       normalize=st.booleans(), seed=st.integers(0, 2**16))
@example(m=2, d=1, order=1, tiled=False, normalize=True, seed=0)  # cancellation: test_d1_gradient_is_zero_regression
@example(m=2, d=1, order=2, tiled=False, normalize=True, seed=0)  # the same at order 2 (the thorough profile's)
@example(m=2, d=1, order=1, tiled=False, normalize=True, seed=27426)  # tr(C) = 0 exactly: see _terms
def test_random_tiny_shapes(m, d, order, tiled, normalize, seed):
    """fp32 kernel vs float64 within the stated fp32 tolerances, or, where those are beyond fp32 on the
    input (torch misses them too), within the 2x rule's bound: 2x the torch path's error."""
    old = K.ONCHIP_MAX
    K.ONCHIP_MAX = 0 if tiled else old
    try:
        a, b = _pair(seed, m, d, (2,))
        lam = 0.5 / min(m, d) if normalize else 0.02 / d
        up = _upstream((2,), seed)
        got = _run(K.taylor_logdet, a, b, lam, order, up, normalize=normalize)
    finally:
        K.ONCHIP_MAX = old
    assert all(x.dtype == torch.float32 for x in got)
    torch_ = _run(M.taylor_logdet, a, b, lam, order, up, normalize=normalize)
    _check_rule(got, torch_, _reference(a, b, lam, order, up, normalize), _terms(a, b, lam, order, normalize),
                f"m={m} d={d} order={order}", stated=True)


@pytest.mark.parametrize("path", ["onchip", "tiled"], indirect=True)
@pytest.mark.parametrize("m,order", [(2, 1), (2, 2), (3, 4)])
def test_d1_gradient_is_zero_regression(path, m, order):
    """d = 1, so every normalised row is +-1, T is constant and dT/da = dT/db = 0 exactly.  The kernels
    divide (x^ = x / |x|, as F.normalize) and reduce x^ . v from the v they subtract from: 0 exactly
    where the row norm is exact (|x| = sqrt(x^2), IEEE sqrt: the interpreter), and within the 2x rule
    everywhere.  Projecting v with x^ = x * (1/|x|) instead (and, at order 1, the forward's
    q_i = <a, b> (1/|a|)(1/|b|)), differently rounded +-1s, gives 6.7e-7 (m = 2, order 1; torch fp32:
    1.2e-7), and in the d-space GEMM epilogue of orders >= 2 likewise (m = 3, order 4: 1.3e-6, torch 0)."""
    d, seed = 1, 0
    a, b = _pair(seed, m, d, (2,))
    lam, up = 0.5, _upstream((2,), seed)
    ref = _reference(a, b, lam, order, up)
    assert np.abs(ref[1]).max() == 0.0 and np.abs(ref[2]).max() == 0.0
    kern = _run(K.taylor_logdet, a, b, lam, order, up)
    _check_rule(kern, _run(M.taylor_logdet, a, b, lam, order, up), ref, _terms(a, b, lam, order), "d = 1")
    if not CUDA:
        assert float(kern[1].abs().max()) == 0.0 and float(kern[2].abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------------
# the 2x rule (kernelssl/numerics.py): kernel error <= 2x torch-path error, loss and every gradient
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["onchip", "tiled"], indirect=True)
@pytest.mark.parametrize("m,d", [(24, 40), (40, 24)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_low_precision_rule(path, m, d, dtype):
    a, b = _pair(m + d, m, d)
    # reference: float64 on the SAME rounded inputs (the error left is the arithmetic's)
    a = torch.tensor(a).to(dtype).double().numpy()
    b = torch.tensor(b).to(dtype).double().numpy()
    lam, up, order = _lam(m, d), _upstream((2,)), 4
    ref = _reference(a, b, lam, order, up)
    kern = _run(K.taylor_logdet, a, b, lam, order, up, dtype=dtype)
    torch_ = _run(M.taylor_logdet, a, b, lam, order, up, dtype=dtype)
    assert kern[0].dtype == torch.float32 and kern[1].dtype == dtype and kern[2].dtype == dtype
    _check_rule(kern, torch_, ref, _terms(a, b, lam, order), f"{dtype} m={m} d={d}")


@pytest.mark.parametrize("hilo", [1, 2])
def test_bf16_gradient_split_product_error_bound(hilo):
    """bf16 gradients: the fp32 operand F (HILO 1: X = S diag(1/|x_k|), the row weights moved onto its
    columns; HILO 2: Y = S') times the raw bf16 rows H as two bf16 products, F = bf16(F) +
    bf16(F - bf16(F)).  Against float64, elementwise:
    |err| <= (2^-18 + 2^-21 + K 2^-24) sum_k |F_ik| |H_kj|
    (the split leaves <= 2^-18 |F|; the weight 1/|x_k| and the row scaling of HILO 2 a few fp32
    roundings; fp32 accumulation of K exact products).  A single bf16 rounding of F (what a plain bf16
    product of S would do) misses this bound by far: the check has teeth."""
    P, m, k, n = 2, 24, 40, 36
    gen = torch.Generator().manual_seed(hilo)
    f = torch.randn(P, m, k, generator=gen) * torch.exp2(torch.randint(-4, 4, (P, m, k), generator=gen).float())
    hb = torch.randn(P, k, n, generator=gen).to(torch.bfloat16)
    w = torch.rand(P, k if hilo == 1 else m, generator=gen) + 0.5  # norms: their reciprocals weight F
    out = torch.empty(P, m, n)
    if hilo == 1:  # out = F diag(1/w) H
        x, y, kw = f, hb, dict(ks=w.to(DEV))
    else:  # out = diag(1/w) H' F' with H' (m, k) bf16 and F' (k, n) fp32
        hb = torch.randn(P, m, k, generator=gen).to(torch.bfloat16)
        x, y, kw = hb, torch.randn(P, k, n, generator=gen) * 2.0 ** torch.randint(-4, 4, (P, k, n), generator=gen), \
            dict(rs=w.to(DEV))
    x, y, out = x.to(DEV), y.to(DEV), out.to(DEV)
    K._gemm(x, y, out, torch.ones(P, device=DEV), sx=K._strides3(x), sy=K._strides3(y), so=K._so(out),
            m=m, n=n, k=k, hilo=hilo, **kw)
    x64, y64, r64 = x.cpu().double(), y.cpu().double(), 1.0 / w.double()
    if hilo == 1:
        f64, h64 = x64 * r64[:, None, :], y64
        ref, bound_terms = f64 @ h64, f64.abs() @ h64.abs()
        single = f64.float().to(torch.bfloat16).double() @ h64
    else:
        f64, h64 = y64, x64
        ref, bound_terms = r64[..., None] * (h64 @ f64), r64[..., None] * (h64.abs() @ f64.abs())
        single = r64[..., None] * (h64 @ f64.float().to(torch.bfloat16).double())
    bound = (2.0**-18 + 2.0**-21 + k * 2.0**-24) * bound_terms
    err = (out.cpu().double() - ref).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    assert float(((single - ref).abs() / bound).max()) > 10.0  # one bf16 rounding of F: far outside


# ---------------------------------------------------------------------------------------------------
# divergence and the convergence diagnostics
# ---------------------------------------------------------------------------------------------------


def _collapsed(seed, m, d, noise=1e-3):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(d)
    return u + noise * rng.standard_normal((m, d)), u + noise * rng.standard_normal((m, d))


@pytest.mark.parametrize("path", ["onchip", "tiled"], indirect=True)
@pytest.mark.parametrize("m,d", [(8, 48), (48, 8)])
@pytest.mark.parametrize("order", range(1, 9))
def test_diverging_series_matches_reference_polynomial(path, m, d, order):
    """A collapsed batch (rho = lam m = 4): T_n is a polynomial far from log det, and must still be
    THE reference polynomial, to a relative tolerance (values up to ~4^8 / 8)."""
    a, b = _collapsed(order, m, d)
    lam = 4.0 / m
    ref = R.taylor_logdet(a, b, lam, order)
    out = K.taylor_logdet(torch.tensor(a, dtype=torch.float32, device=DEV),
                          torch.tensor(b, dtype=torch.float32, device=DEV), lam, order)
    # fp32 unit roundoff 6e-8 grown over accumulations of length <= 48 and n <= 8 products: 1e-5
    # relative, as the torch path's test
    assert_close(out, ref, rtol=1e-5, atol=0, name="T diverging")


@pytest.mark.parametrize("path", ["onchip", "tiled"], indirect=True)
@pytest.mark.parametrize("m,d", [(12, 20), (26, 19)])
@pytest.mark.parametrize("order", [1, 4])
def test_diagnostics_match_mec(path, m, d, order):
    a, b = _pair(1, m, d)
    lam = torch.tensor([0.3 / min(m, d), 3.0 / min(m, d)])  # converging and diverging pairs
    at, bt = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    t, rho, ratio = K.taylor_logdet_with_diagnostics(at.to(DEV), bt.to(DEV), lam.to(DEV), order)
    assert t.shape == rho.shape == ratio.shape == (2,)
    assert not rho.requires_grad and not ratio.requires_grad
    # T is bitwise the plain forward's
    assert torch.equal(t, K.taylor_logdet(at.to(DEV), bt.to(DEV), lam.to(DEV), order))
    rho64, ratio64 = M.convergence_diagnostics(torch.tensor(a), torch.tensor(b), lam.double(), order=order)
    # the same 16-step power iteration in fp32 vs float64 (stable: roundoff does not grow), and a
    # ratio of two fp32 traces: 1e-5 relative
    assert_close(rho, rho64, rtol=1e-5, atol=0, name="rho")
    assert_close(ratio, ratio64, rtol=1e-5, atol=0, name="term ratio")
    assert float(rho[0]) < 1 < float(rho[1])


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("path", ["onchip", "tiled"], indirect=True)
def test_diagnostics_rank_one_collapse_and_zero(path):
    # (the interpreter's numpy warns about the 0/0 and log(0) that tl.where then discards)
    u = np.random.default_rng(0).standard_normal(20)
    a = torch.tensor(np.broadcast_to(u, (2, 12, 20)).copy(), dtype=torch.float32, device=DEV)
    lam = 20 / (12 * 64.0)  # C = lam 1 1^T: rho = lam m exactly after one step
    _, rho, ratio = K.taylor_logdet_with_diagnostics(a, a, torch.tensor([lam, 4 * lam], device=DEV), 4)
    assert_close(rho, [lam * 12, 4 * lam * 12], rtol=1e-6, atol=0, name="rho")
    assert_close(ratio, [0.75 * lam * 12, 3 * lam * 12], rtol=1e-6, atol=0, name="ratio")  # 3 rho / 4
    _, _, r1 = K.taylor_logdet_with_diagnostics(a, a, lam, 1)  # order 1: |tr C^2 / 2| / |tr C|
    assert_close(r1, [lam * 12 / 2] * 2, rtol=1e-6, atol=0, name="order-1 ratio")
    z = torch.zeros(1, 4, 3, device=DEV)
    t0, rho0, ratio0 = K.taylor_logdet_with_diagnostics(z, z, 0.5, 4)
    assert float(t0) == 0.0 and float(rho0) == 0.0 and float(ratio0) == 0.0  # no NaN


# ---------------------------------------------------------------------------------------------------
# determinism, edge cases, dtypes
# ---------------------------------------------------------------------------------------------------


# the tiled path (~2 s a case) in the slow tier; its kernels' values are checked on the fast one
@pytest.mark.parametrize("path", ["onchip", pytest.param("tiled", marks=pytest.mark.slow)], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_deterministic(path, dtype):
    a, b = _pair(9, 20, 27)
    up = _upstream((2,))
    first = _run(K.taylor_logdet, a, b, 0.05, 4, up, dtype=dtype)
    second = _run(K.taylor_logdet, a, b, 0.05, 4, up, dtype=dtype)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@pytest.mark.parametrize("path", ["onchip", "tiled"], indirect=True)
def test_zero_tiny_rows_and_non_contiguous(path):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((2, 17, 26))
    b = rng.standard_normal((2, 26, 17))
    a[0, 3] = 0.0  # a zero row: stays zero, gradient g / eps like F.normalize
    a[1, 5] = 1e-13 * rng.standard_normal(26)  # below F.normalize's eps: the public entry prescales it
    # by an exact power of two, so it normalises like any other row (the reference's exact norm)
    b[1, :, 2] = 0.0
    up = _upstream((2,))
    ta = torch.tensor(a, dtype=torch.float32, device=DEV).requires_grad_(True)
    tb_leaf = torch.tensor(b, dtype=torch.float32, device=DEV).requires_grad_(True)
    tb = tb_leaf.transpose(-1, -2)  # a non-contiguous view: read through its strides, no copy
    assert not tb.is_contiguous()
    t = KF.taylor_logdet(ta, tb, 0.04, 4, backend="triton")
    (torch.tensor(up, dtype=torch.float32, device=DEV) * t).sum().backward()
    bt = np.swapaxes(b, -1, -2)
    rt, rga, rgb = _reference(a, bt, 0.04, 4, up)
    rgb = np.swapaxes(rgb, -1, -2)
    assert_close(t, rt, rtol=1e-6, atol=1e-6, name="T")
    # the zero row's gradient is g / 1e-12 (~1e12): relative tolerance per element, fp32
    assert_close(ta.grad, rga, rtol=2e-5, atol=FP32_GRAD * np.abs(rga[..., 0:3, :]).max(), name="dT/da")
    assert_close(tb_leaf.grad, rgb, rtol=2e-5, atol=FP32_GRAD * np.abs(rgb).max(), name="dT/db")


def test_requires_grad_false_no_grad_and_one_side():
    a, b = (torch.tensor(x, dtype=torch.float32, device=DEV) for x in _pair(0, 10, 14))
    ref = K.taylor_logdet(a, b, 0.1, 4)
    assert not ref.requires_grad
    with torch.no_grad():
        assert torch.equal(K.taylor_logdet(a.clone().requires_grad_(), b, 0.1, 4), ref)
    a.requires_grad_()
    t = K.taylor_logdet(a, b, 0.1, 4)
    (2.5 * t.sum()).backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and b.grad is None


def test_empty_batch_and_single_pair():
    a = torch.randn(0, 5, 6, device=DEV)
    assert K.taylor_logdet(a, a, 0.1, 3).shape == (0,)
    x, y = (torch.tensor(v, dtype=torch.float32, device=DEV) for v in _pair(1, 6, 5, ()))
    t = K.taylor_logdet(x, y, 0.2, 3)
    assert t.shape == () and t.dtype == torch.float32
    assert_close(t, R.taylor_logdet(*_pair(1, 6, 5, ()), 0.2, 3), rtol=1e-6, atol=1e-6, name="2-D input")


def test_float64_and_mixed_dtypes():
    a, b = _pair(2, 8, 11)
    t64 = KF.taylor_logdet(torch.tensor(a, device=DEV), torch.tensor(b, device=DEV), 0.1, 4, backend="triton")
    assert t64.dtype == F64  # the dispatcher's float64 rule: the torch tier, float64 end to end
    assert_close(t64, R.taylor_logdet(a, b, 0.1, 4), rtol=1e-12, atol=1e-12, name="float64")
    ah = torch.tensor(a, dtype=torch.float16, device=DEV).requires_grad_()
    bb = torch.tensor(b, dtype=torch.bfloat16, device=DEV).requires_grad_()
    t = K.taylor_logdet(ah, bb, 0.1, 4)  # promotes to fp32
    t.sum().backward()
    assert t.dtype == torch.float32 and ah.grad.dtype == torch.float16 and bb.grad.dtype == torch.bfloat16


def test_nan_propagates():
    a, b = (torch.tensor(x, dtype=torch.float32, device=DEV) for x in _pair(3, 9, 12))
    a[1, 2, 3] = float("nan")
    t = K.taylor_logdet(a, b, 0.1, 4)
    assert torch.isfinite(t[0]) and torch.isnan(t[1])


def test_bad_input():
    """Bad input is refused once, by the functional API, before the dispatcher picks the kernels."""
    x = torch.randn(2, 4, 3, device=DEV)
    with pytest.raises(ValueError, match="order"):
        KF.taylor_logdet(x, x, 0.1, 0, backend="triton")
    with pytest.raises(ValueError, match="b: expected the same shape as a"):
        KF.taylor_logdet(x, torch.randn(2, 4, 4, device=DEV), 0.1, 2, backend="triton")
    with pytest.raises(ValueError, match="lam"):
        KF.taylor_logdet(x, x, torch.ones(3, device=DEV), 2, backend="triton")
    with pytest.raises(TypeError, match="a"):
        KF.taylor_logdet(x.long(), x, 0.1, 2, backend="triton")


# ---------------------------------------------------------------------------------------------------
# dispatch, torch.library, torch.compile
# ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="CPU dispatch")
def test_public_api_dispatches_to_the_kernel(monkeypatch):
    calls = []
    real = K.taylor_logdet_forward
    monkeypatch.setattr(K, "taylor_logdet_forward", lambda *a: calls.append(a[3]) or real(*a))
    z = [torch.tensor(x, dtype=torch.float32) for x in _pair(6, 16, 10, ())]
    z += [z[0] + 0.1, z[1] - 0.1]
    t_tr = KF.taylor_logdet(z[0], z[1], 0.2, 3, backend="triton")
    assert calls == [3]
    assert_close(t_tr, KF.taylor_logdet(z[0], z[1], 0.2, 3, backend="torch"), rtol=1e-6, atol=1e-6, name="T")
    loss_tr = MECLoss(backend="triton")(*z)
    assert calls == [3, 4]  # the loss: both directions in ONE batched call, default order 4
    assert_close(loss_tr, MECLoss(backend="torch")(*z), rtol=1e-6, atol=1e-6, name="MEC loss")


@pytest.mark.skipif(CUDA, reason="CPU dispatch")
@pytest.mark.parametrize("path", ["onchip", "tiled"], indirect=True)
def test_cpu_kernel_without_interpreter_is_the_same_math(path, monkeypatch):
    """The ops' CPU kernel runs the torch tier when not interpreting: the same value, gradients and
    diagnostics as the interpreted kernels."""
    a, b = _pair(8, 13, 22)
    up = _upstream((2,))
    interp = _run(K.taylor_logdet, a, b, 0.1, 5, up)
    d_interp = K.taylor_logdet_with_diagnostics(torch.tensor(a).float(), torch.tensor(b).float(), 0.1, 5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    mirror = _run(K.taylor_logdet, a, b, 0.1, 5, up)
    d_mirror = K.taylor_logdet_with_diagnostics(torch.tensor(a).float(), torch.tensor(b).float(), 0.1, 5)
    for name, x, y in zip(("T", "dT/da", "dT/db", "T", "rho", "ratio"), interp + d_interp, mirror + d_mirror):
        assert_close(x, y, rtol=1e-5, atol=1e-6 * float(y.abs().max()), name=name)


# the same ops and schemas on both paths: the tiled one (1-4.5 s a case) in the slow tier
@pytest.mark.parametrize("path", ["onchip", pytest.param("tiled", marks=pytest.mark.slow)], indirect=True)
@pytest.mark.parametrize("order,normalize,diagnostics", [(1, True, False), (4, True, True), (3, False, False)])
def test_opcheck(path, order, normalize, diagnostics):
    a, b = (torch.tensor(x, dtype=torch.float32, device=DEV).requires_grad_() for x in _pair(1, 11, 18))
    lam = torch.tensor([0.1, 0.2], device=DEV, requires_grad=True)
    args = (a, b, lam, order, normalize, diagnostics, "tf32x3")
    torch.library.opcheck(torch.ops.kernelssl.taylor_logdet_fwd.default, args)
    out = torch.ops.kernelssl.taylor_logdet_fwd(*(x.detach() if torch.is_tensor(x) else x for x in args))
    g = torch.tensor([1.5, -0.5], device=DEV)
    torch.library.opcheck(torch.ops.kernelssl.taylor_logdet_bwd.default,
                          (g, a.detach(), b.detach(), lam.detach(), *out[2:6], order, normalize, "tf32x3", True, True))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    """Forward + backward under torch.compile(fullgraph=True): no graph break, the eager numbers.
    On CPU the op stays one opaque call (its CPU kernel runs the interpreted kernels); on CUDA it is
    decomposed into the Triton kernels (test_gpu_compile_inductor)."""
    torch._dynamo.reset()
    a, b = (torch.tensor(x, dtype=torch.float32, device=DEV) for x in _pair(4, 14, 23))
    lam = torch.tensor(0.08, device=DEV)
    up = torch.tensor(_upstream((2,)), dtype=torch.float32, device=DEV)

    def step(x, y, lam_):
        return (up * K.taylor_logdet(x, y, lam_, 4)).sum()

    def grads(fn):
        x, y, l_ = a.clone().requires_grad_(), b.clone().requires_grad_(), lam.clone().requires_grad_()
        v = fn(x, y, l_)
        v.backward()
        return v.detach(), x.grad, y.grad, l_.grad

    eager = grads(step)
    compiled = grads(torch.compile(step, backend=backend, fullgraph=True))
    for name, x, y in zip(("value", "dT/da", "dT/db", "dT/dlam"), compiled, eager):
        assert_close(x, y, rtol=1e-6, atol=1e-7 * float(y.abs().max()), name=f"compiled {name}")


# ---------------------------------------------------------------------------------------------------
# the GPU code path, compiled for sm_90 without a GPU
# ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(CUDA, reason="on a GPU the GPU tests run the real kernels")
@pytest.mark.slow  # a subprocess compiling every variant for sm_90 (~10 s)
def test_gpu_kernels_compile_for_sm90_without_spills():
    """Every kernel variant the GPU path issues (paper shape fp32 with diagnostics, bf16, fp32 with
    TF32; d-space, tiny s on-chip, order 1, an fp16 d-space case with unaligned rows) compiles with
    Triton's real compiler and ptxas for sm_90, specialised as a real launch would be -- what the
    interpreter cannot check (tl.dot shapes and dtypes, layouts, constexpr branches) -- with no
    register spills, within the 227 KiB of shared memory, the bf16 Gram and every TF32 GEMM on the
    tensor cores (wgmma), and no IEEE-fp32 GEMM on them (no silent TF32)."""
    variants = helpers.sm90_variants("taylor_logdet")
    assert {v["kernel"] for v in variants} >= {"_rownorm_kernel", "_gemm_kernel", "_small_series_kernel",
                                                "_pair_diag_kernel", "_series_reduce_kernel",
                                                "_power_step_kernel", "_project_kernel"}
    assert any(v["kernel"] == "_gemm_kernel" and v["constexprs"].get("HALF_DOT") and v["wgmma"] > 0 for v in variants)
    gemms = [v for v in variants if v["kernel"] in ("_gemm_kernel", "_small_series_kernel")
             and not v["constexprs"].get("HALF_DOT") and not v["constexprs"].get("HILO")]
    # bf16 gradients: S split into bf16 hi + lo against the bf16 rows, on the tensor cores (m-space: HILO
    # 1, d-space: 2), whatever the precision of the fp32 products
    assert {v["constexprs"]["HILO"] for v in variants if v["kernel"] == "_gemm_kernel" and v["wgmma"] > 0
            and not v["ones"]} >= {1, 2}
    # the default tf32x3 (and tf32) on the tensor cores, "ieee" never
    helpers.assert_tensor_cores_unless_ieee(gemms, "PRECISION")
    # every fp32 GEMM of the paper shape's default (fp32 and bf16 inputs: powers, S_n, gradients) on wgmma
    assert sum(v["kernel"] == "_gemm_kernel" and v["constexprs"]["PRECISION"] == "tf32x3" and v["wgmma"] > 0
               for v in gemms) >= 4


_DECOMPOSE_SCRIPT = r"""
import os, torch
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
import torch._functorch.config as functorch_config
from torch._functorch.aot_autograd import aot_module_simplified

class Sm90Target:  # stands in for the CUDA driver: the target of the TTIR the mutation analysis reads
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

triton.runtime.driver.set_active(Sm90Target())
from kernelssl.triton import _common
from kernelssl.triton import taylor_logdet_op as K
_common.DECOMPOSE_DEVICES.append("cpu")  # decompose as on a GPU
graphs = []
def capture(gm, inputs):
    return aot_module_simplified(gm, inputs, fw_compiler=lambda g, i: graphs.append(("fw", g)) or g.forward,
                                 bw_compiler=lambda g, i: graphs.append(("bw", g)) or g.forward)
for (m, d), order in [((12, 40), 4), ((300, 40), 5), ((40, 300), 1)]:
    graphs.clear()
    torch._dynamo.reset()
    a, b = torch.randn(2, m, d, requires_grad=True), torch.randn(2, m, d, requires_grad=True)
    lam = torch.tensor(0.1, requires_grad=True)
    fn = torch.compile(lambda x, y, l: K.taylor_logdet_with_diagnostics(x, y, l, order)[0].sum(),
                       backend=capture, fullgraph=True)
    with functorch_config.patch(force_non_lazy_backward_lowering=True):
        try:
            fn(a, b, lam)  # both graphs compile; running the forward would launch a kernel: no GPU
        except Exception:
            pass
    for kind, g in graphs:
        hops = [n for n in g.graph.nodes if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)]
        clones = sorted({c for n in hops for c in n.kwargs["tensors_to_clone"]})
        print("GRAPH", kind, m, d, order, len(hops), ",".join(clones))
"""


@pytest.mark.skipif(CUDA, reason="on a GPU, test_gpu_compile_inductor compiles and runs it")
@pytest.mark.slow  # a subprocess tracing three compiles (~11 s)
def test_compile_decomposes_into_the_kernels_as_on_a_gpu():
    """What torch.compile does with the ops on a GPU, traced on CPU: the triton_op is decomposed into
    its kernels under functionalisation (Triton's TTIR mutation analysis runs against an sm_90 target),
    forward and backward partition, and only the kernels' output buffers count as mutated (no input is
    copied or written back)."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([ROOT] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    out = subprocess.run([sys.executable, "-c", _DECOMPOSE_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("GRAPH")]
    assert [r[1] for r in rows] == ["fw", "bw"] * 3, out.stdout + out.stderr[-3000:]
    outputs = {"nrm_ptr", "q_ptr", "out_ptr", "t_ptr", "u_ptr", "r_ptr", "s_ptr", "rho_ptr", "ratio_ptr",
               "vout_ptr", "sqout_ptr"}
    for _, kind, m, d, order, n_kernels, clones in (r if len(r) == 7 else r + [""] for r in rows):
        assert int(n_kernels) >= (3 if kind == "fw" and order != "1" else 1), (kind, m, d, order)
        assert set(clones.split(",")) - {""} <= outputs, (kind, m, d, clones)


# ---------------------------------------------------------------------------------------------------
# GPU: paper shapes (skipped without CUDA)
# ---------------------------------------------------------------------------------------------------


def _gpu_pair(m, d, seed=0, batch=2):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(batch, m, d, device="cuda", generator=g)
    a = a + 0.5 * torch.randn(batch, 1, d, device="cuda", generator=g)
    return a, a + 0.8 * torch.randn(batch, m, d, device="cuda", generator=g)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("m,d", [(1024, 2048), (2048, 1024), (1024, 200), (4096, 64), (24, 4096)])
def test_gpu_paper_shapes_precision_rule(m, d, dtype):
    """MEC's paper shape (m = 1024, d = 2048, n = 4, both directions as a batch of 2) and the other
    regimes (d-space, wide d-space rows, tiny s on-chip): the 2x rule against float64."""
    a, b = _gpu_pair(m, d)
    a, b = a.to(dtype), b.to(dtype)
    lam, order = d / (m * 64.0), 4
    up = torch.tensor([1.3, -0.7], device="cuda")

    def run(fn, x, y, dt):
        x, y = x.to(dt).detach().requires_grad_(), y.to(dt).detach().requires_grad_()
        t = fn(x, y, lam, order)
        (up.to(t.dtype) * t).sum().backward()
        return t.detach().double(), x.grad.double(), y.grad.double()

    ref = run(M.taylor_logdet, a, b, F64)
    kern = run(K.taylor_logdet, a, b, dtype)
    torch_ = run(M.taylor_logdet, a, b, dtype)
    # T's scale here: max |T| (the float64 torch path gives no term magnitudes)
    _check_rule(kern, torch_, [to_numpy(x) for x in ref], to_numpy(ref[0].abs()), f"{dtype} m={m} d={d}")


@needs_cuda
@pytest.mark.parametrize("m,d", [(1024, 2048), (2048, 1024), (32, 4096)])
def test_gpu_deterministic_and_no_host_sync(m, d):
    a, b = _gpu_pair(m, d)
    up = torch.tensor([1.3, -0.7], device="cuda")

    def run(check_sync=True):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        torch.cuda.set_sync_debug_mode("error" if check_sync else "default")
        try:
            t, rho, ratio = K.taylor_logdet_with_diagnostics(x, y, d / (m * 64.0), 4)
            (up * t).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return t, rho, ratio, x.grad, y.grad

    run(check_sync=False)  # warm-up: Triton's JIT compiles the kernels
    for x, y in zip(run(), run()):
        assert torch.equal(x, y)


@needs_cuda
def test_gpu_diagnostics_match_mec():
    a, b = _gpu_pair(1024, 2048)
    lam = torch.tensor([1 / 32, 1 / 4], device="cuda")
    _, rho, ratio = K.taylor_logdet_with_diagnostics(a, b, lam, 4)
    rho64, ratio64 = M.convergence_diagnostics(a.double(), b.double(), lam.double(), order=4)
    assert_close(rho, rho64, rtol=1e-4, atol=0, name="rho")
    assert_close(ratio, ratio64, rtol=1e-4, atol=0, name="ratio")


@needs_cuda
def test_gpu_compile_inductor():
    a, b = _gpu_pair(1024, 2048)
    up = torch.tensor([1.3, -0.7], device="cuda")

    def step(x, y):
        return (up * K.taylor_logdet(x, y, 1 / 32, 4)).sum()

    def grads(fn):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        v = fn(x, y)
        v.backward()
        return v.detach(), x.grad, y.grad

    torch._dynamo.reset()
    eager, compiled = grads(step), grads(torch.compile(step, fullgraph=True))
    for name, x, y in zip(("value", "dT/da", "dT/db"), compiled, eager):
        assert_close(x, y, rtol=1e-5, atol=1e-6 * float(y.abs().max()), name=f"compiled {name}")


@needs_cuda
def test_gpu_precisions():
    """"ieee" and the default tf32x3 keep fp32-level error; "tf32" trades ~3 digits for speed."""
    a, b = _gpu_pair(1024, 2048)
    ref = M.taylor_logdet(a.double(), b.double(), 1 / 32, 4)
    err = {}
    for prec in ("ieee", "tf32x3", "tf32"):
        out = K.taylor_logdet(a, b, 1 / 32, 4, input_precision=prec)
        err[prec] = float((out.double() - ref).abs().max() / ref.abs().max())
    assert err["ieee"] < 1e-5 and err["tf32x3"] < 1e-5 and err["tf32"] < 1e-2, err


def test_mec_components_take_the_kernels_diagnostics():
    # MECLoss(backend="triton").forward_components(...) reports the fused op's diagnostics; they
    # agree with the torch path's (same power iteration, same traces) to fp32 round-off.
    g = torch.Generator().manual_seed(3)
    z = [torch.randn(12, 7, generator=g) for _ in range(4)]
    from kernelssl.losses import MECLoss

    got = MECLoss(backend="triton").forward_components(*z)
    want = MECLoss(backend="torch").forward_components(*z)
    for name in ("loss", "t_ab", "t_ba", "spectral_radius", "term_ratio"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------------
# precision policy (docs/numerics.md): the default tf32x3, emulated on the CPU at the paper shape
# ---------------------------------------------------------------------------------------------------


def _emulated_mec(a, b, lam, g, precision):
    """(T_4, dL/da, dL/db) for L = g T_4(a, b), m <= d, in the kernels' own decomposition (module
    docstring; m-space, h = 2), every GEMM by kernelssl.numerics.mm at ``precision``."""
    from kernelssl.numerics import mm

    na, nb = a.norm(dim=1), b.norm(dim=1)  # _rownorm_kernel
    ra, rb = 1.0 / na.clamp_min(1e-12), 1.0 / nb.clamp_min(1e-12)
    m_mat = mm(a, b.T.contiguous(), precision) * ra[:, None] * rb[None, :] * lam  # Gram, scaled epilogue
    m2 = mm(m_mat, m_mat, precision)  # M^2 (powers up to h = 2)
    diags = [m_mat.diagonal(), (m_mat * m_mat.T).sum(1), (m2 * m_mat.T).sum(1), (m2 * m2.T).sum(1)]  # pairing
    t = sum((-1.0) ** k * dk.sum() / (k + 1) for k, dk in enumerate(diags))
    r = sum((-1.0) ** k * dk for k, dk in enumerate(diags))
    q2 = torch.eye(m_mat.shape[0], dtype=a.dtype) - m_mat  # Q_2 = I - M
    s_mat = (m2 - mm(m2, m_mat, precision)) + q2  # S_4 = M^2 (I - M) + Q_2: one GEMM, M^2 and Q_2 in its epilogue
    alpha = g * lam
    grads = []
    for sm, own, r_own, oth, r_oth in ((s_mat.T.contiguous(), a, ra, b, rb), (s_mat, b, rb, a, ra)):
        v = mm(sm, oth * r_oth[:, None], precision) * alpha  # contraction weighted by 1/|oth_j|
        grads.append(r_own[:, None] * (v - (own * r_own[:, None]) * (g * r)[:, None]))  # PROJ = 1 epilogue
    return t, grads[0], grads[1]


@pytest.mark.slow  # the CPU emulation at the paper shape (~3 s)
def test_tf32x3_default_is_within_2x_of_ieee_emulated_at_paper_shape():
    """At MEC's paper shape (m = 1024, d = 2048, order 4, lam = d / (m eps^2) with
    eps^2 = 64), the error against float64 of T and both gradients with every kernel GEMM in emulated
    tf32x3 is within 2x of full fp32's ("ieee"); plain tf32 is far worse (printed with -s)."""
    from kernelssl.numerics import check_within_2x_of_ieee

    check_within_2x_of_ieee(*emulated_paper_case())


def emulated_paper_case():
    """``(run, ref, names)`` of the emulation above (also used by test_targets)."""
    m, d = 1024, 2048
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, d, generator=gen, dtype=F64) + 0.1 * torch.randn(1, d, generator=gen, dtype=F64)
    b = a + 0.8 * torch.randn(m, d, generator=gen, dtype=F64)
    lam, g = d / (m * 64.0), 1.7
    ref = _emulated_mec(a, b, lam, g, "ieee")  # float64 throughout
    a32, b32 = a.float(), b.float()
    return (lambda p: _emulated_mec(a32, b32, lam, g, p)), ref, ("T", "dL/da", "dL/db")


@needs_cuda
def test_gpu_tf32x3_default_within_2x_of_ieee_at_paper_shape():
    """The same bound on a GPU: the default (tf32x3) error of T and both gradients against float64 is
    within 2x of "ieee"'s at the paper shape (m = 1024, d = 2048, order 4)."""
    a, b = _gpu_pair(1024, 2048)
    lam, up = 2048 / (1024 * 64.0), torch.tensor([1.3, -0.7], device="cuda")

    def run(x, y, dt, **kw):
        x, y = x.to(dt).detach().requires_grad_(), y.to(dt).detach().requires_grad_()
        t = (K.taylor_logdet if dt != F64 else M.taylor_logdet)(x, y, lam, 4, **kw)
        (up.to(t.dtype) * t).sum().backward()
        return t.detach().double(), x.grad.double(), y.grad.double()

    ref = run(a, b, F64)
    with helpers.tf32_flag_off():
        default = run(a, b, torch.float32)
    ieee = run(a, b, torch.float32, input_precision="ieee")
    for name, x, y, r in zip(("T", "dL/da", "dL/db"), default, ieee, ref):
        e_x, e_i = float((x - r).abs().max()), float((y - r).abs().max())
        assert e_x <= 2.0 * max(e_i, 2.0**-22 * float(r.abs().max())), f"{name}: {e_x:.3g} > 2 x {e_i:.3g}"
