"""SFRIK torch tier (kernelssl/ops/legendre_gram.py, kernelssl/ops/sfrik_loss.py) against the NumPy
reference, gradcheck, dtypes, invariances, degenerate inputs and the memory contract of the chunked Gram
mean."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernelssl.functional as KF
from helpers import LargestTensor, assert_close, to_numpy
from kernelssl.ops import legendre_gram as S
from kernelssl.ops import sfrik_loss as SL
from reference import legendre_gram as R

B3 = (1.0, 40.0, 40.0)
# float64 torch vs float64 NumPy: same math, different summation order; M and the loss are O(1..1e3)
# sums of n^2 O(1e2) terms, so a few hundred ulps of the largest term at most.
F64 = dict(rtol=1e-10, atol=1e-11)
# fp32 computation vs float64 (justified in test_fp32_vs_float64): M / loss relative, gradient relative
# to max|grad|
FP32_RTOL_M = 2e-6
FP32_RTOL_G = 1e-5


def _z(n: int, q: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 + 0.25  # rows of various norms
    return (torch.randn(n, q, generator=g, dtype=torch.float64) * scale).to(dtype)


def _coeffs(L: int, seed: int) -> tuple[float, ...]:
    rng = np.random.default_rng(seed)
    return tuple(float(x) for x in rng.uniform(-2.0, 5.0, L))


def _m_and_grad(fn, z: torch.Tensor, upstream: float = 2.5, **kw):
    """Value and gradient of ``upstream * fn(z)`` (non-unit upstream)."""
    z = z.detach().clone().requires_grad_(True)
    m = fn(z, **kw)
    (upstream * m).backward()
    return m.detach(), z.grad


# --------------------------------------------------------------------------------------------------
# Polynomials
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [2, 3, 4, 7, 10])
def test_legendre_vs_reference(q):
    t = torch.rand(40, dtype=torch.float64) * 2 - 1
    p = S.legendre(t, q, 8)
    assert p.shape == (9, 40) and p.dtype == torch.float64
    assert_close(p, R.legendre(q, to_numpy(t), 8), rtol=1e-13, atol=1e-14, name="P_l")
    p0 = S.legendre(t.reshape(5, 8), q, 0)
    assert p0.shape == (1, 5, 8) and bool((p0 == 1).all())


@pytest.mark.parametrize("L", range(1, 9))
@pytest.mark.parametrize("q", [2, 3, 6])
def test_legendre_series_vs_reference(L, q):
    b = _coeffs(L, 10 * L + q)
    t = torch.rand(3, 17, dtype=torch.float64) * 2 - 1
    val, der = S.legendre_series(t, q, b, derivative=True)
    assert val.shape == der.shape == t.shape
    tn = to_numpy(t)
    assert_close(val, R.phi(tn, q, b), rtol=1e-12, atol=1e-12, name="phi")
    assert_close(der, R.phi_prime(tn, q, b), rtol=1e-12, atol=1e-11, name="phi'")
    only = S.legendre_series(t, q, b)
    assert isinstance(only, torch.Tensor)
    assert_close(only, val, rtol=0, atol=0, name="phi (derivative=False)")
    # the differentiable series: autograd of phi equals the derivative recurrence
    tt = t.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(S.legendre_series(tt, q, b).sum(), tt)
    assert_close(g, der, rtol=1e-12, atol=1e-11, name="autograd phi")
    # dtype of t is kept
    assert S.legendre_series(t.float(), q, b).dtype == torch.float32


@pytest.mark.parametrize("q", [2, 3, 9])
def test_recurrence_constants(q):
    consts = S.legendre_recurrence_constants(q, 6)
    assert len(consts) == 5 and S.legendre_recurrence_constants(q, 1) == ()
    # P_2 = (q t^2 - 1)/(q - 1): alpha_1 = q/(q-1), beta_1 = 1/(q-1)
    assert consts[0] == pytest.approx((q / (q - 1), 1 / (q - 1)), rel=1e-15)
    t = np.linspace(-1, 1, 11)
    p = [np.ones_like(t), t]
    for a, c in consts:
        p.append(a * t * p[-1] - c * p[-2])
    assert_close(np.stack(p), R.legendre(q, t, 6), rtol=1e-13, atol=1e-14, name="P via constants")


# --------------------------------------------------------------------------------------------------
# Gram mean: chunked Function vs eager vs reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 17, 40])  # 5 does not divide n = 17; 40 >= n
def test_gram_mean_vs_reference_and_eager(normalize, chunk_size):
    z = _z(17, 6, 0)
    if not normalize:
        z = torch.nn.functional.normalize(z, dim=-1) * 0.95  # raw rows, moderate inner products
    b = (1.0, 40.0, 40.0, -3.0)
    m, g = _m_and_grad(S.legendre_gram_mean, z, coefficients=b, normalize=normalize, chunk_size=chunk_size)
    me, ge = _m_and_grad(S.legendre_gram_mean_eager, z, coefficients=b, normalize=normalize)
    zn = to_numpy(z)
    m_ref = R.gram_mean(R.normalize(zn) if normalize else zn, b)
    g_ref = 2.5 * R.gram_mean_grad(zn, b, normalize=normalize)
    assert m.dtype == me.dtype == torch.float64 and m.shape == ()
    assert_close(m, m_ref, **F64, name="M chunked")
    assert_close(me, m_ref, **F64, name="M eager")
    assert_close(g, g_ref, **F64, name="dM/dz chunked")
    assert_close(ge, g_ref, **F64, name="dM/dz eager")


@pytest.mark.parametrize("L", range(1, 9))
@pytest.mark.parametrize("q", [2, 3, 5])
def test_gram_mean_any_degree(L, q):
    b = _coeffs(L, L + 100 * q)
    z = _z(11, q, L * q)
    zn = to_numpy(z)
    m_ref, g_ref = R.gram_mean(R.normalize(zn), b), 2.5 * R.gram_mean_grad(zn, b)
    for fn, kw in [(S.legendre_gram_mean, dict(chunk_size=4)), (S.legendre_gram_mean_eager, {})]:
        m, g = _m_and_grad(fn, z, coefficients=b, **kw)
        assert_close(m, m_ref, **F64, name=f"M ({fn.__name__}, L={L}, q={q})")
        assert_close(g, g_ref, **F64, name=f"dM/dz ({fn.__name__}, L={L}, q={q})")


@pytest.mark.parametrize("normalize", [True, False])
def test_gram_mean_gradcheck(normalize):
    z = _z(7, 3, 1).requires_grad_(True)
    b = (1.0, 4.0, 4.0, 0.5)
    for chunk in (1, 3, 7):
        assert torch.autograd.gradcheck(
            lambda x: S.legendre_gram_mean(x, b, normalize=normalize, chunk_size=chunk), (z,)
        )
    assert torch.autograd.gradcheck(lambda x: S.legendre_gram_mean_eager(x, b, normalize=normalize), (z,))


def test_gram_mean_deterministic():
    z = _z(33, 8, 3, torch.float32)
    a = _m_and_grad(S.legendre_gram_mean, z, coefficients=B3, chunk_size=7)
    b = _m_and_grad(S.legendre_gram_mean, z, coefficients=B3, chunk_size=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eager,chunk_size", [(False, None), (False, 3), (True, None)])
def test_sfrik_loss_vs_reference(eager, chunk_size):
    n, q = 13, 7
    za, zb = _z(n, q, 4), _z(n, q, 5)
    kw = dict(coefficients=(1.0, 40.0, 40.0), sim_weight=4000.0, mmd_weight=1.0)
    ta, tb = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    out = SL.sfrik_loss(ta, tb, eager=eager, chunk_size=chunk_size, **kw)
    ref = R.sfrik_loss(to_numpy(za), to_numpy(zb), **kw)
    for name, o, r in zip(("loss", "mse", "mmd_a", "mmd_b"), out, ref):
        assert o.shape == () and o.dtype == torch.float64
        assert_close(o, r, **F64, name=name)
    # a random upstream vector on all four outputs: w0 loss + w1 mse + w2 mmd_a + w3 mmd_b
    w = [2.5, -0.7, 1.3, 0.4]
    sum(wi * o for wi, o in zip(w, out)).backward()
    sim = w[0] * kw["sim_weight"] + w[1]
    ga = R.sfrik_loss_grad(
        to_numpy(za), to_numpy(zb), coefficients=kw["coefficients"], sim_weight=sim,
        mmd_weight=2 * (w[0] * kw["mmd_weight"] / 2 + w[2]),
    )[0]
    gb = R.sfrik_loss_grad(
        to_numpy(za), to_numpy(zb), coefficients=kw["coefficients"], sim_weight=sim,
        mmd_weight=2 * (w[0] * kw["mmd_weight"] / 2 + w[3]),
    )[1]
    assert_close(ta.grad, ga, **F64, name="dz_a")
    assert_close(tb.grad, gb, **F64, name="dz_b")


@pytest.mark.parametrize("eager", [False, True])
def test_sfrik_loss_gradcheck(eager):
    za, zb = _z(6, 3, 6).requires_grad_(True), _z(6, 3, 7).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: SL.sfrik_loss(a, b, coefficients=(1.0, 4.0, 4.0), sim_weight=40.0, chunk_size=4, eager=eager),
        (za, zb),
    )


# Every path of the eager blocked pass: the degree-2 term in the blocks or in q x q space, one block or
# several (n = 19 is no multiple of 5), every degree, with and without the gradient formed in the forward.
@pytest.mark.parametrize("qspace", [False, True])
@pytest.mark.parametrize("block", [19, 5])
@pytest.mark.parametrize("L", [1, 2, 3, 5])
@pytest.mark.parametrize("want_grad", [False, True])
def test_block_gram_mean_every_path(qspace, block, L, want_grad):
    b = _coeffs(L, L)
    z = torch.nn.functional.normalize(_z(19, 6, L), dim=-1)
    m, r = S._block_gram_mean(torch.stack([z, z.flip(0) * -1.0]), b, block, want_grad, qspace)
    for v, zv in enumerate((z, z.flip(0) * -1.0)):
        zn = to_numpy(zv)
        assert_close(m[v], R.gram_mean(zn, b), **F64, name=f"M view {v}")
        if want_grad:  # R = (n^2 / 2) dM/dzhat
            g_ref = R.gram_mean_grad(zn, b, normalize=False) * (19**2 / 2)
            assert_close(r[v], g_ref, **F64, name=f"R view {v}")
        else:
            assert r is None


@pytest.mark.parametrize("n,q", [(S.SINGLE_BLOCK_MAX_ROWS, 96), (S.SINGLE_BLOCK_MAX_ROWS + 1, 96),
                                 (S.SINGLE_BLOCK_MAX_ROWS + 1, 32), (S.SINGLE_BLOCK_MAX_ROWS, 32)])
def test_default_call_either_side_of_the_crossovers(n, q):
    """The sizes where the default call changes path (one block -> blocks at n = SINGLE_BLOCK_MAX_ROWS + 1,
    the degree-2 term into q x q space at n >= QSPACE_MIN_ROWS_PER_COLUMN q): the same results, fp32 and
    float64, on both sides."""
    assert S.use_qspace(n, q) == (n >= S.QSPACE_MIN_ROWS_PER_COLUMN * q)
    assert S.sfrik_block_size(n, q) == (n if n <= S.SINGLE_BLOCK_MAX_ROWS else S.SFRIK_BLOCK_ROWS)
    za, zb = _z(n, q, 1), _z(n, q, 2)
    m64, g64 = _m_and_grad(S.legendre_gram_mean, za, coefficients=B3)
    m_ref, g_ref = R.gram_mean(R.normalize(to_numpy(za)), B3), 2.5 * R.gram_mean_grad(to_numpy(za), B3)
    assert_close(m64, m_ref, **F64, name="M float64")
    assert_close(g64, g_ref, **F64, name="dM/dz float64")
    m32, g32 = _m_and_grad(S.legendre_gram_mean, za.float(), coefficients=B3)
    assert_close(m32, m64, rtol=FP32_RTOL_M, atol=0, name="M fp32")
    gmax = float(g64.abs().max())
    assert_close(g32, g64, rtol=FP32_RTOL_G, atol=FP32_RTOL_G * gmax, name="dM/dz fp32")
    ta, tb = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    fa, fb = za.float().requires_grad_(True), zb.float().requires_grad_(True)
    (2.5 * SL.sfrik_loss(ta, tb)[0]).backward()
    loss32 = SL.sfrik_loss(fa, fb)[0]
    (2.5 * loss32).backward()
    assert_close(loss32, SL.sfrik_loss(za, zb)[0], rtol=FP32_RTOL_M, atol=0, name="loss fp32")
    for name, g32_, g64_ in (("dz_a", fa.grad, ta.grad), ("dz_b", fb.grad, tb.grad)):
        gmax = float(g64_.abs().max())
        assert_close(g32_, g64_, rtol=FP32_RTOL_G, atol=FP32_RTOL_G * gmax, name=f"{name} fp32")


# The one-block pass forms the Gram by halves (split_gram) or whole: the same loss and gradients as the
# float64 reference either way, fp32 within the stated tolerances; odd n (halves of unequal size).
@pytest.mark.parametrize("n", [128, 129])
@pytest.mark.parametrize("split", [False, True])
def test_one_block_gram_by_halves_or_whole(n, split, monkeypatch):
    q = 16  # n < 16 q: the degree-2 term in the block (the one-block cubic pass)
    assert not S.use_qspace(n, q) and S.sfrik_block_size(n, q) >= n
    monkeypatch.setattr(S, "split_gram", lambda n_, q_: split)
    za, zb = _z(n, q, 51), _z(n, q, 52)
    ref = R.sfrik_loss(to_numpy(za), to_numpy(zb))
    ga, gb = R.sfrik_loss_grad(to_numpy(za), to_numpy(zb))
    for dtype in (torch.float64, torch.float32):
        ta, tb = za.to(dtype, copy=True).requires_grad_(True), zb.to(dtype, copy=True).requires_grad_(True)
        out = SL.sfrik_loss(ta, tb, prescale=True)
        out[0].backward()
        if dtype == torch.float64:
            assert_close(torch.stack(out), np.array(ref), **F64, name="outputs")
            assert_close(ta.grad, ga, **F64, name="dz_a")
            assert_close(tb.grad, gb, **F64, name="dz_b")
        else:
            assert_close(out[0], ref[0], rtol=FP32_RTOL_M, atol=0, name="loss fp32")
            for name, got, want in (("dz_a", ta.grad, ga), ("dz_b", tb.grad, gb)):
                gmax = float(np.abs(want).max())
                assert_close(got, want, rtol=FP32_RTOL_G, atol=FP32_RTOL_G * gmax, name=f"{name} fp32")


def test_split_gram_rule():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert S.split_gram(256, 256) and not S.split_gram(256, 128) and not S.split_gram(127, 512)
        torch.set_num_threads(1)
        assert S.split_gram(128, 128) and not S.split_gram(128, 64)
    finally:
        torch.set_num_threads(threads)


def test_fp32_vs_float64():
    n, q = 64, 32
    za, zb = _z(n, q, 8), _z(n, q, 9)
    m64, g64 = _m_and_grad(S.legendre_gram_mean, za, coefficients=B3, chunk_size=24)
    for fn, kw in [(S.legendre_gram_mean, dict(chunk_size=24)), (S.legendre_gram_mean_eager, {})]:
        m32, g32 = _m_and_grad(fn, za.float(), coefficients=B3, **kw)
        assert m32.dtype == torch.float32 and g32.dtype == torch.float32
        # fp32 (u = 6e-8): O(u) error per Gram entry times |phi'/phi| = O(1..10), pairwise-summed over
        # n^2 terms; observed ~1e-7 relative on M and ~8e-7 of max|grad|, bounds leave ~10-20x margin.
        assert_close(m32, m64, rtol=FP32_RTOL_M, atol=0, name=f"M fp32 ({fn.__name__})")
        gmax = float(g64.abs().max())
        assert_close(g32, g64, rtol=FP32_RTOL_G, atol=FP32_RTOL_G * gmax, name=f"dM/dz fp32 ({fn.__name__})")
    ta, tb = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    fa, fb = za.float().requires_grad_(True), zb.float().requires_grad_(True)
    (2.5 * SL.sfrik_loss(ta, tb)[0]).backward()
    loss32 = SL.sfrik_loss(fa, fb)[0]
    (2.5 * loss32).backward()
    assert loss32.dtype == torch.float32
    loss64 = SL.sfrik_loss(za, zb)[0]
    assert_close(loss32, loss64, rtol=FP32_RTOL_M, atol=0, name="loss fp32")  # same budget as M
    for name, g32, g64 in (("dz_a", fa.grad, ta.grad), ("dz_b", fb.grad, tb.grad)):
        gmax = float(g64.abs().max())
        assert_close(g32, g64, rtol=FP32_RTOL_G, atol=FP32_RTOL_G * gmax, name=f"{name} fp32")


@pytest.mark.parametrize("dtype,ulp", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)])
def test_half_inputs(dtype, ulp):
    n, q = 48, 16
    za, zb = _z(n, q, 10, dtype), _z(n, q, 11, dtype)
    # inputs are upcast at entry, so the exact answer is the float64 one on the rounded inputs
    za64, zb64 = za.double(), zb.double()
    for fn in (S.legendre_gram_mean, S.legendre_gram_mean_eager):
        m, g = _m_and_grad(fn, za, coefficients=B3)
        m64, g64 = _m_and_grad(fn, za64, coefficients=B3)
        assert m.dtype == torch.float32 and g.dtype == dtype
        # value computed in fp32 (see test_fp32_vs_float64); gradient: the fp32 error plus one rounding
        # to the input dtype (half an ulp, relative), plus the fp16 subnormal spacing 2^-24 in atol
        assert_close(m, m64, rtol=FP32_RTOL_M, atol=0, name=f"M {dtype}")
        gmax = float(g64.abs().max())
        assert_close(g, g64, rtol=ulp + FP32_RTOL_G, atol=FP32_RTOL_G * gmax + 2.0**-24, name=f"dM/dz {dtype}")
    ta, tb = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    out = SL.sfrik_loss(ta, tb)
    (2.5 * out[0]).backward()
    ref = SL.sfrik_loss(za64.requires_grad_(True), zb64.requires_grad_(True))
    (2.5 * ref[0]).backward()
    assert all(o.dtype == torch.float32 for o in out)
    assert ta.grad.dtype == dtype and tb.grad.dtype == dtype
    assert_close(out[0], ref[0].detach(), rtol=FP32_RTOL_M, atol=0, name=f"loss {dtype}")
    for name, g, g64 in (("dz_a", ta.grad, za64.grad), ("dz_b", tb.grad, zb64.grad)):
        gmax = float(g64.abs().max())
        assert_close(g, g64, rtol=ulp + FP32_RTOL_G, atol=FP32_RTOL_G * gmax + 2.0**-24, name=f"{name} {dtype}")


def test_mixed_dtypes_promote():
    za, zb = _z(5, 4, 12, torch.float32), _z(5, 4, 13)
    out = SL.sfrik_loss(za, zb)
    assert all(o.dtype == torch.float64 for o in out)
    ref = R.sfrik_loss(to_numpy(za), to_numpy(zb))
    assert_close(out[0], ref[0], **F64, name="loss (fp32 + fp64)")


def test_no_grad_and_frozen_inputs():
    za, zb = _z(9, 5, 14), _z(9, 5, 15)
    ref = R.sfrik_loss(to_numpy(za), to_numpy(zb))
    with torch.no_grad():
        a = SL.sfrik_loss(za.clone().requires_grad_(True), zb)
        m = S.legendre_gram_mean(za.clone().requires_grad_(True), B3, chunk_size=2)
    assert not a[0].requires_grad and not m.requires_grad
    b = SL.sfrik_loss(za, zb)  # requires_grad=False inputs
    assert not b[0].requires_grad
    for x in (a, b):
        assert_close(torch.stack(x), np.array(ref), **F64, name="outputs without grad")
    assert_close(m, ref[2], **F64, name="M under no_grad")
    # one view frozen: gradient flows to the other only
    ta = za.clone().requires_grad_(True)
    (2.5 * SL.sfrik_loss(ta, zb, chunk_size=4)[0]).backward()
    assert_close(ta.grad, 2.5 * R.sfrik_loss_grad(to_numpy(za), to_numpy(zb))[0], **F64, name="dz_a (z_b frozen)")


def test_non_finite_inputs():
    za, zb = _z(6, 4, 16), _z(6, 4, 17)
    za[2, 1] = float("nan")
    out = SL.sfrik_loss(za, zb)
    assert torch.isnan(out[0]) and torch.isnan(out[2])
    assert torch.isnan(S.legendre_gram_mean(za, B3))
    with pytest.raises(ValueError, match="z_a"):
        KF.sfrik_loss(za, zb, check_finite=True)
    with pytest.raises(ValueError, match="z"):
        KF.legendre_gram_mean(za, B3, check_finite=True)


def test_bad_input():
    """The functional API checks the inputs (once) before calling the torch tier."""
    z = _z(6, 4, 18)
    with pytest.raises(ValueError, match="z"):
        KF.legendre_gram_mean(z[0], B3)  # 1-D
    with pytest.raises(ValueError, match="rows"):
        KF.legendre_gram_mean(z[:1], B3)  # n < 2
    with pytest.raises(ValueError, match="q >= 2"):
        KF.legendre_gram_mean(z[:, :1], B3)  # q < 2
    with pytest.raises(TypeError, match="floating"):
        KF.legendre_gram_mean(z.long(), B3)
    with pytest.raises(ValueError, match="coefficients"):
        KF.legendre_gram_mean(z, ())
    with pytest.raises(TypeError, match="coefficients"):
        KF.legendre_gram_mean(z, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="chunk_size"):
        S.legendre_gram_mean(z, B3, chunk_size=0)  # the torch tier's own argument
    with pytest.raises(ValueError, match="z_b"):
        KF.sfrik_loss(z, z[:, :3])
    with pytest.raises(ValueError, match="sim_weight"):
        KF.sfrik_loss(z, z, sim_weight=-1.0)
    with pytest.raises(ValueError, match="q"):
        S.legendre(torch.zeros(3), 1, 2)


# --------------------------------------------------------------------------------------------------
# Properties (Hypothesis)
# --------------------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(2, 24), st.integers(2, 12))
chunks = st.one_of(st.none(), st.integers(1, 30))
seeds = st.integers(0, 2**31 - 1)
degrees = st.integers(1, 6)


@settings(deadline=None)
@given(shape=shapes, chunk=chunks, seed=seeds, L=degrees)
def test_permutation_invariance(shape, chunk, seed, L):
    n, q = shape
    z, b = _z(n, q, seed), _coeffs(L, seed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    m, g = _m_and_grad(S.legendre_gram_mean, z, coefficients=b, chunk_size=chunk)
    mp, gp = _m_and_grad(S.legendre_gram_mean, z[perm], coefficients=b, chunk_size=chunk)
    scale = 1 + float(g.abs().max())
    assert_close(mp, m, **F64, name="M(P z)")
    assert_close(gp, g[perm], rtol=1e-10, atol=1e-11 * scale, name="grad(P z)")


@settings(deadline=None)
@given(shape=shapes, chunk=chunks, seed=seeds, L=degrees)
def test_rotation_invariance(shape, chunk, seed, L):
    n, q = shape
    z, b = _z(n, q, seed), _coeffs(L, seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    rot, _ = torch.linalg.qr(torch.randn(q, q, generator=gen, dtype=torch.float64))
    m, g = _m_and_grad(S.legendre_gram_mean, z, coefficients=b, chunk_size=chunk)
    mr, gr = _m_and_grad(S.legendre_gram_mean, z @ rot, coefficients=b, chunk_size=chunk)
    scale = 1 + float(g.abs().max())
    # M(z Q) = M(z) and, Q orthogonal, grad(z Q) = grad(z) Q
    assert_close(mr, m, **F64, name="M(z Q)")
    assert_close(gr, g @ rot, rtol=1e-9, atol=1e-10 * scale, name="grad(z Q)")


@settings(deadline=None)
@given(shape=shapes, chunk=chunks, seed=seeds, s=st.floats(1e-3, 1e3), eager=st.booleans())
def test_scale_invariance_and_view_symmetry(shape, chunk, seed, s, eager):
    n, q = shape
    za, zb = _z(n, q, seed), _z(n, q, seed + 1)

    def run(a, b):
        a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        out = SL.sfrik_loss(a, b, chunk_size=chunk, eager=eager)
        (2.5 * out[0]).backward()
        return [o.detach() for o in out], a.grad, b.grad

    out, ga, gb = run(za, zb)
    scale = 1 + float(torch.cat([ga, gb]).abs().max())
    out_s, ga_s, gb_s = run(s * za, s * zb)  # normalisation: values invariant, gradients scale 1/s
    for name, o, r in zip(("loss", "mse", "mmd_a", "mmd_b"), out_s, out):
        assert_close(o, r, **F64, name=f"{name}(s z)")
    assert_close(s * ga_s, ga, rtol=1e-9, atol=1e-10 * scale, name="s * grad_a(s z)")
    assert_close(s * gb_s, gb, rtol=1e-9, atol=1e-10 * scale, name="s * grad_b(s z)")
    out_w, gb_w, ga_w = run(zb, za)  # swapped views
    assert_close(out_w[0], out[0], **F64, name="loss(z_b, z_a)")
    assert_close(out_w[1], out[1], **F64, name="mse(z_b, z_a)")
    assert_close(out_w[2], out[3], **F64, name="mmd_a(z_b, z_a)")
    assert_close(out_w[3], out[2], **F64, name="mmd_b(z_b, z_a)")
    assert_close(ga_w, ga, rtol=1e-10, atol=1e-11 * scale, name="grad_a swapped")
    assert_close(gb_w, gb, rtol=1e-10, atol=1e-11 * scale, name="grad_b swapped")


@settings(deadline=None)
@given(
    shape=shapes,
    chunk=chunks,
    seed=seeds,
    kind=st.sampled_from(["duplicate", "all_equal", "zero_rows", "antipodal"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    eager=st.booleans(),
)
def test_degenerate_inputs_are_finite(shape, chunk, seed, kind, dtype, eager):
    n, q = shape
    za, zb = _z(n, q, seed, dtype), _z(n, q, seed + 1, dtype)
    if kind == "duplicate":
        za[n // 2] = za[0]
        zb[-1] = za[-1]
    elif kind == "all_equal":
        za[:] = za[0]
    elif kind == "zero_rows":  # F.normalize maps a zero row to zero; G = 0 on its row and column
        za[0] = 0
        zb[n - 1] = 0
    else:
        za[n - 1] = -za[0]
    ta, tb = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    out = SL.sfrik_loss(ta, tb, chunk_size=chunk, eager=eager)
    (2.5 * out[0]).backward()
    for name, o in zip(("loss", "mse", "mmd_a", "mmd_b"), out):
        assert bool(torch.isfinite(o)), f"{name} not finite ({kind})"
    assert bool(torch.isfinite(ta.grad).all()) and bool(torch.isfinite(tb.grad).all()), kind
    if dtype == torch.float64:
        ref = R.sfrik_loss(to_numpy(za), to_numpy(zb))
        ga, gb = R.sfrik_loss_grad(to_numpy(za), to_numpy(zb))
        assert_close(torch.stack(out).detach(), np.array(ref), **F64, name=f"outputs ({kind})")
        # zero rows: the gradient there is g / 1e-12 (below the normalisation clamp)
        for name, g, r in (("dz_a", ta.grad, ga), ("dz_b", tb.grad, gb)):
            assert_close(g, 2.5 * r, rtol=1e-9, atol=1e-10 * (1 + np.abs(r).max()), name=f"{name} ({kind})")
    if kind == "all_equal":
        assert_close(out[2], sum(B3), rtol=1e-5, atol=0, name="M(all rows equal) = phi(1)")


# --------------------------------------------------------------------------------------------------
# Memory: the chunked Function keeps no n x n tensor alive and creates none larger than a tile
# --------------------------------------------------------------------------------------------------


def _saved_numel(fn, z):
    total = []

    def pack(t):
        total.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(z)
    return out, sum(total)


def test_saved_tensors_are_linear_in_n():
    n, q = 512, 8
    z = _z(n, q, 19, torch.float32).requires_grad_(True)
    m, saved = _saved_numel(lambda x: S.legendre_gram_mean(x, B3), z)
    # z, its norms and Zhat (normalisation + the Function): a few n*q, far below n^2 = 262144
    assert saved <= 6 * n * q, saved
    m.backward()
    me, saved_e = _saved_numel(lambda x: S.legendre_gram_mean_eager(x, B3), z)
    assert saved_e >= n * n, saved_e
    loss, saved_l = _saved_numel(lambda x: SL.sfrik_loss(x, x.detach().flip(0))[0], z)
    assert saved_l <= 12 * n * q, saved_l


def test_no_tensor_larger_than_a_tile():
    n, q, chunk = 512, 8, 16
    z = _z(n, q, 20, torch.float32).requires_grad_(True)
    mode = LargestTensor()
    with mode:
        m = S.legendre_gram_mean(z, B3, chunk_size=chunk)
        (2.5 * m).backward()
    assert mode.largest <= max(chunk * n, n * q), mode.largest  # tiles are (chunk, n)
    eager = LargestTensor()
    z.grad = None
    with eager:
        (2.5 * S.legendre_gram_mean_eager(z, B3)).backward()
    assert eager.largest >= n * n


def test_fp32_near_uniform_batch_keeps_per_entry_accuracy():
    """M of a near-uniform batch is a small difference of large sums (c_0 n^2 against c_2 ||Zhat^T Zhat||^2
    ~ c_2 n^2 / q): the blocked path must still match float64 to the per-entry-sum accuracy of
    test_fp32_vs_float64 (an aggregate fp32 form loses ~10-100x of it here), with and without grad,
    and the loss too (R is summed with torch's cascade, not a single-accumulator dot)."""
    n, q = 2048, 64
    g = torch.Generator().manual_seed(21)
    z64 = torch.randn(n, q, generator=g, dtype=torch.float64)
    za64, zb64 = z64, z64 + 0.1 * torch.randn(n, q, generator=g, dtype=torch.float64)
    m64 = S.legendre_gram_mean(za64, B3)
    for grad in (False, True):
        z = za64.float().requires_grad_(grad)
        m = S.legendre_gram_mean(z, B3)
        assert abs(m.item() - m64.item()) <= FP32_RTOL_M * abs(m64.item()), (grad, m.item(), m64.item())
    loss = SL.sfrik_loss(za64.float().requires_grad_(True), zb64.float())[0]
    loss64 = SL.sfrik_loss(za64, zb64)[0]
    assert abs(loss.item() - loss64.item()) <= FP32_RTOL_M * abs(loss64.item()), (loss.item(), loss64.item())


def test_workspace_is_kept_per_slot_and_dtype_and_fresh_where_it_cannot_be():
    from kernelssl.ops import _common as CM
    x = torch.zeros(3)
    a = CM.workspace(10, x, 0)
    assert a.shape == (10,) and a.dtype == x.dtype
    assert CM.workspace(8, x, 0).data_ptr() == a.data_ptr()  # the same memory, reused
    assert CM.workspace(8, x, 1).data_ptr() != a.data_ptr()  # another slot
    assert CM.workspace(8, x.double(), 0).dtype == torch.float64
    with torch.inference_mode():
        CM.workspace(4, x, 0).fill_(1.0)  # an inference tensor of its own, never handed out outside
    CM.workspace(10, x, 0).fill_(2.0)  # (would raise on an inference tensor)
    big = CM.WORKSPACE_MAX_ELEMENTS + 1
    assert CM.workspace(big, x, 0).data_ptr() != CM.workspace(big, x, 0).data_ptr()  # too large: fresh
    # stamps: a kept buffer holds its writer's data until the next call takes the slot
    t = CM.workspace((2, 3), x, 7)
    stamp = CM.workspace_stamp(t, 7)
    assert stamp is not None and CM.still_written(t, 7, stamp)
    CM.workspace(6, x.double(), 7)  # another dtype: another buffer
    assert CM.still_written(t, 7, stamp)
    CM.workspace((3, 2), x, 7)  # the same slot and dtype: taken
    assert not CM.still_written(t, 7, stamp)
    assert CM.workspace_stamp(CM.workspace(big, x, 7), 7) is None  # a fresh tensor is not a kept buffer
    # the prescale (through the workspace): exact powers of two that bring every row's largest entry into
    # [0.5, 1), 1 on a zero row
    z = torch.randn(2, 5, 7, dtype=torch.float64) * torch.tensor([1e30, 1.0, 1e-30, 0.0, 3.0])[:, None]
    scale = CM.row_prescale(z)
    assert torch.equal(torch.frexp(scale)[0], torch.full_like(scale, 0.5))  # powers of two
    top = (z * scale).abs().amax(-1)
    assert bool(((top >= 0.5) & (top < 1.0)).sum() == 8) and torch.equal(top[:, 3], torch.zeros(2))
    assert torch.equal(scale[:, 3], torch.ones(2, 1, dtype=z.dtype))


def _loss_grads(fn, za, zb, w=(2.5, -0.7, 1.3, 0.4)):
    """Gradients of ``sum_k w_k out_k`` over the four outputs of ``fn(za, zb)`` (non-unit upstreams)."""
    ta, tb = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    out = fn(ta, tb)
    sum(wi * o for wi, o in zip(w, out)).backward()
    return ta.grad, tb.grad


# The fused loss forms the loss's gradient in its forward and scales it in place in the backward; a
# backward with gradients of the components too, or a repeated one (retain_graph=True), forms R again and
# reads y, y_a - y_b back from their scratch tensors unless another call took them (two losses before one
# backward).  All must give plain autograd's gradients: the loss alone (upstream 2.5) and all four outputs,
# one block (the cubic pass) and several, with and without the prescaling.
# prescale "always": the prescale's own branch on rows it could skip (the CPU skips it for rows in range).
@pytest.mark.parametrize("n, chunk", [(13, None), (40, 16)])
@pytest.mark.parametrize("prescale", [False, True, "always"])
@pytest.mark.parametrize("w", [(2.5, -0.7, 1.3, 0.4), (2.5,)], ids=["all-outputs", "loss-only"])
def test_fused_loss_repeated_and_interleaved_backward(n, chunk, prescale, w, monkeypatch):
    if prescale == "always":
        monkeypatch.setattr(SL, "norms_in_plain_range", lambda norm: False)
        prescale = True
    q = 7
    za, zb, zc = _z(n, q, 31), _z(n, q, 32), _z(n, q, 33)
    ga, gb = _loss_grads(lambda a, b: SL.sfrik_loss(a, b, eager=True, prescale=prescale), za, zb, w)
    ta, tb = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    total = sum(wi * o for wi, o in zip(w, SL.sfrik_loss(ta, tb, chunk_size=chunk, prescale=prescale)))
    total.backward(retain_graph=True)
    assert_close(ta.grad, ga, **F64, name="dz_a")
    assert_close(tb.grad, gb, **F64, name="dz_b")
    total.backward()  # the first backward consumed R: formed again
    assert_close(ta.grad, 2 * ga, **F64, name="dz_a, second backward")
    assert_close(tb.grad, 2 * gb, **F64, name="dz_b, second backward")
    # two losses sharing zb, both forwards before one backward
    ta.grad = tb.grad = None
    tc = zc.clone().requires_grad_(True)
    (SL.sfrik_loss(ta, tb, chunk_size=chunk, prescale=prescale)[0]
     + 2.0 * SL.sfrik_loss(tb, tc, chunk_size=chunk, prescale=prescale)[0]).backward()
    ea, eb, ec = (t.clone().requires_grad_(True) for t in (za, zb, zc))
    (SL.sfrik_loss(ea, eb, eager=True, prescale=prescale)[0]
     + 2.0 * SL.sfrik_loss(eb, ec, eager=True, prescale=prescale)[0]).backward()
    for name, got, want in (("dz_a", ta, ea), ("dz_b", tb, eb), ("dz_c", tc, ec)):
        assert_close(got.grad, want.grad, **F64, name=f"{name}, two losses")


# Prescaled rows at the ends of the dtype's range in the fused loss and in plain autograd on the same
# prescaled rows: same gradients (float64: F64; float32: FP32 tolerances).  A zero row; a row whose squares
# underflow (its gradient, ~1/||z||, still finite); a row whose sum of squares would overflow.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [9, 300])  # one block, blocks
@pytest.mark.parametrize("w", [(2.5, -0.7, 1.3, 0.4), (2.5,)], ids=["all-outputs", "loss-only"])
def test_fused_loss_prescaled_extreme_rows(dtype, n, w):
    q = 6
    fi = torch.finfo(dtype)
    za, zb = _z(n, q, 41, dtype), _z(n, q, 42, dtype)
    za[0], zb[1] = 0.0, 0.0
    za[2] = za[2] * fi.tiny ** 0.5 * 2.0**-20  # squares below the smallest normal number
    zb[3] = zb[3] * fi.max / 8.0  # the sum of squares would overflow
    fused = _loss_grads(lambda a, b: SL.sfrik_loss(a, b, prescale=True), za, zb, w)
    plain = _loss_grads(lambda a, b: SL.sfrik_loss(a, b, eager=True, prescale=True), za, zb, w)
    for name, got, want in zip(("dz_a", "dz_b"), fused, plain):
        assert bool(torch.isfinite(got).all()), name
        if dtype == torch.float64:
            assert_close(got, want, **F64, name=name)
        else:
            scale = want.abs().max()
            assert_close(got, want, rtol=0, atol=FP32_RTOL_G * float(scale), name=name)


# On the CPU the fused loss reads its rows' norms first and skips the prescale when every one lies in
# PLAIN_NORM_RANGE (no row over- or underflows unscaled): the same loss, bitwise (y is z / ||z|| either
# way: a power of two cancels exactly), and the same gradients up to the last rounding (1 / ||z|| is applied
# as a division there, as a product by s / ||s z|| after the prescale).  One row outside the range, at
# either end, and the rows are prescaled: right where the unscaled rows are not (see the test above).
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("w", [(2.5, -0.7, 1.3, 0.4), (2.5,)], ids=["all-outputs", "loss-only"])
def test_fused_loss_skips_the_prescale_only_for_rows_in_range(dtype, w, monkeypatch):
    from kernelssl.ops import _common as CM
    lo, hi = CM.PLAIN_NORM_RANGE
    norm = torch.tensor([[lo], [1.0], [hi]], dtype=dtype)
    assert CM.norms_in_plain_range(norm)  # both ends belong to the range
    for bad in (lo * 0.5, hi * 2.0, float("nan"), float("inf"), 0.0):
        assert not CM.norms_in_plain_range(torch.cat([norm, norm.new_full((1, 1), bad)])), bad
    assert not CM.norms_in_plain_range(norm.to("meta"))  # not on the CPU: never asked (no device sync)
    calls = []
    prescale = CM.row_prescale
    monkeypatch.setattr(SL, "row_prescale", lambda z: calls.append(1) or prescale(z))
    za, zb = _z(23, 6, 71, dtype), _z(23, 6, 72, dtype)
    skipped = _loss_grads(lambda a, b: SL.sfrik_loss(a, b, prescale=True), za, zb, w)
    loss_skipped = SL.sfrik_loss(za, zb, prescale=True)[0]
    assert not calls  # rows of norm ~0.25..2.25: in range
    with monkeypatch.context() as m:
        m.setattr(SL, "norms_in_plain_range", lambda norm: False)
        scaled = _loss_grads(lambda a, b: SL.sfrik_loss(a, b, prescale=True), za, zb, w)
        assert torch.equal(SL.sfrik_loss(za, zb, prescale=True)[0], loss_skipped)
    assert calls
    tol = F64 if dtype == torch.float64 else dict(rtol=FP32_RTOL_G, atol=FP32_RTOL_G * float(scaled[0].abs().max()))
    for name, got, want in zip(("dz_a", "dz_b"), skipped, scaled):
        assert_close(got, want, **tol, name=name)
    # rows of norm at either end of the range: still skipped, and still the prescaled result
    ends = za.clone()
    ends[4] *= lo * 1.01 / ends[4].norm()
    ends[5] *= hi / 1.01 / ends[5].norm()
    calls.clear()
    at_ends = SL.sfrik_loss(ends, zb, prescale=True)[0]
    assert not calls
    with monkeypatch.context() as m:
        m.setattr(SL, "norms_in_plain_range", lambda norm: False)
        assert torch.equal(SL.sfrik_loss(ends, zb, prescale=True)[0], at_ends)
    # one row below or above the range: prescaled, and its value as if its norm were moderate
    for factor in (lo * 2.0**-10, hi * 2.0**10):
        calls.clear()
        far = za.clone()
        far[4] *= factor
        got = SL.sfrik_loss(far, zb, prescale=True)[0]
        assert calls, factor
        assert_close(got, loss_skipped, **(F64 if dtype == torch.float64 else dict(rtol=FP32_RTOL_M, atol=0.0)),
                     name=f"loss, row 4 times {factor}")


# An input changed in place between the forward and the backward: autograd's error, as in plain autograd,
# on the usual step (the gradient formed in the forward) and on the general backward alike.
@pytest.mark.parametrize("w", [(2.5,), (2.5, -0.7, 1.3, 0.4)], ids=["loss-only", "all-outputs"])
def test_fused_loss_input_changed_in_place_raises(w):
    za = _z(9, 5, 61).requires_grad_(True)
    zb = _z(9, 5, 62).requires_grad_(True)
    a = za * 1.0
    total = sum(wi * o for wi, o in zip(w, SL.sfrik_loss(a, zb, prescale=True)))
    with torch.no_grad():
        a.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total.backward()
