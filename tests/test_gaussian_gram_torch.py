"""Uniformity / alignment torch tier (kernelssl/ops/gaussian_gram.py and its public API) against Wang & Isola's
own formulas (their ``torch.pdist`` code, float64), the NumPy reference, gradcheck, fp32 vs float64,
large t, degenerate inputs, Hypothesis properties, bad input, torch.compile, meta tensors, torch.func,
and the memory contract of the blocked Gram.

Tolerances:

* float64 vs Wang & Isola's float64 code: 1e-12.  Both are the same sums; ours reads
  ``||x_i - x_j||^2`` as ``2 - 2 x_i . x_j`` (an absolute error of a few ulps per entry, O(1) entries)
  and sums in another order: observed ~1e-15.
* float64 vs the NumPy reference: rtol/atol 1e-10 (reference tiers of the other ops: sums of up to
  n^2 terms in another order).
* fp32 vs float64 (:data:`FP32_ATOL`): each Gram entry of unit rows carries a few fp32 ulps, the
  exponent ``2t (s - 1)`` 2t times that; log-sum-exp is 1-Lipschitz in the max-norm of its inputs,
  and the fp32 sum of up to 10^6 positive terms (torch's cascade) adds ~log2(n^2) ulps.  So
  ``|L32 - L64| <= eps32 * (c_G 2t + c_S)`` with c_G, c_S ~ a few to 20: we allow
  ``64 eps32 (1 + 2t)`` (observed 2-12 eps32 (1 + 2t) over n = 64..1000, q = 8..128, t = 0.5..10).
  The gradient's relative error (to its max-abs) has the same source (weights ``exp(E)`` off by
  ``exp(dE) - 1 ~ dE``): the same bound times ``max|grad|``.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import kernelssl
import kernelssl.functional as KF
from helpers import LargestTensor, assert_close, check_torch_func, to_numpy
from kernelssl.losses import AlignUniformLoss, UniformityLoss
from kernelssl.ops import gaussian_gram as U
from kernelssl.ops._common import prescale_rows
from reference import gaussian_gram as R
from reference import legendre_gram as RS

F64 = torch.float64
WI = dict(rtol=1e-12, atol=1e-12)  # vs Wang & Isola's float64 code (module docstring)
REF = dict(rtol=1e-10, atol=1e-10)
EPS32 = float(torch.finfo(torch.float32).eps)
UPSTREAM = 2.5
SHAPES = [(2, 2), (2, 9), (3, 2), (5, 1), (17, 5), (64, 33)]
BLOCKS = [None, 1, 3, 7]


def FP32_ATOL(t: float) -> float:
    return 64 * EPS32 * (1 + 2 * t)


def _z(n: int, q: int, seed: int, dtype=F64, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    norms = torch.rand(n, 1, generator=g, dtype=F64) * 2 + 0.25  # rows of various norms
    return (torch.randn(n, q, generator=g, dtype=F64) * norms * scale).to(dtype)


def _val_grad(fn, *zs, upstream: float = UPSTREAM):
    """Value of ``fn(*zs)`` and the gradients of ``upstream * fn`` (non-unit upstream)."""
    xs = [z.detach().clone().requires_grad_(True) for z in zs]
    v = fn(*xs)
    grads = torch.autograd.grad(upstream * v, xs)
    return v.detach(), grads


def _wi_uniformity(z, t=2.0):
    """Wang & Isola's code on the normalised rows (their encoder normalises)."""
    return U.uniformity_pdist(F.normalize(z, dim=-1), t)


def _wi_loss(za, zb, alpha=2.0, t=2.0, lam=1.0):
    """Their training loss: ``align_loss(x, y, alpha) + lam * (uniform_loss(x, t) + uniform_loss(y, t)) / 2``."""
    x, y = F.normalize(za, dim=-1), F.normalize(zb, dim=-1)
    return U.alignment_wang_isola(x, y, alpha) + lam * (U.uniformity_pdist(x, t) + U.uniformity_pdist(y, t)) / 2


# --------------------------------------------------------------------------------------------------
# Equal to Wang & Isola's formulas (float64, 1e-12), including n = 2 and q = 2
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,q", SHAPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("t", [0.5, 2.0, 9.0])
def test_uniformity_equals_wang_isola(n, q, block, t):
    z = _z(n, q, seed=n * 100 + q)
    want, (g_want,) = _val_grad(lambda x: _wi_uniformity(x, t), z)
    got, (g_got,) = _val_grad(lambda x: U.gaussian_gram_logmean(x, t, block_size=block), z)
    assert got.dtype == F64 and got.shape == ()
    assert_close(got, want, **WI, name="L_unif")
    assert_close(g_got, g_want, rtol=1e-12, atol=1e-12 * (1 + float(g_want.abs().max())), name="dL_unif/dz")
    pub, (g_pub,) = _val_grad(lambda x: KF.uniformity(x, t), z)
    assert_close(pub, want, **WI, name="KF.uniformity")
    assert_close(g_pub, g_want, rtol=1e-12, atol=1e-12 * (1 + float(g_want.abs().max())), name="KF grad")


@pytest.mark.parametrize("n,q", SHAPES)
@pytest.mark.parametrize("alpha,t,lam", [(2.0, 2.0, 1.0), (1.0, 0.7, 0.3), (3.0, 5.0, 2.0)])
def test_align_uniform_loss_equals_wang_isola(n, q, alpha, t, lam):
    za, zb = _z(n, q, seed=1), _z(n, q, seed=2)
    want, g_want = _val_grad(lambda a, b: _wi_loss(a, b, alpha, t, lam), za, zb)
    crit = AlignUniformLoss(alpha=alpha, t=t, uniformity_weight=lam)
    got, g_got = _val_grad(crit, za, zb)
    assert_close(got, want, **WI, name="loss")
    for name, a, e in zip(("dz_a", "dz_b"), g_got, g_want):
        assert_close(a, e, rtol=1e-12, atol=1e-12 * (1 + float(e.abs().max())), name=name)
    out = crit.forward_components(za, zb)
    x, y = F.normalize(za, dim=-1), F.normalize(zb, dim=-1)
    assert_close(out.loss, want, **WI, name="components.loss")
    assert_close(out.alignment, U.alignment_wang_isola(x, y, alpha), **WI, name="alignment")
    assert_close(out.uniformity_a, U.uniformity_pdist(x, t), **WI, name="uniformity_a")
    assert_close(out.uniformity_b, U.uniformity_pdist(y, t), **WI, name="uniformity_b")
    assert_close(KF.alignment(za, zb, alpha), U.alignment_wang_isola(x, y, alpha), **WI, name="KF.alignment")
    u = UniformityLoss(t=t)
    assert_close(u(za), U.uniformity_pdist(x, t), **WI, name="UniformityLoss")


def test_n2_q2_closed_form():
    # two unit vectors at angle theta: L_unif = -t ||x - y||^2 = -t (2 - 2 cos theta)
    theta, t = 1.1, 2.0
    z = torch.tensor([[3.0, 0.0], [2 * math.cos(theta), 2 * math.sin(theta)]], dtype=F64)
    assert_close(KF.uniformity(z, t), -t * (2 - 2 * math.cos(theta)), **WI, name="n = q = 2")


# --------------------------------------------------------------------------------------------------
# Equal to the NumPy reference; the Gram-mean family
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,q", [(2, 2), (9, 3), (40, 6)])
@pytest.mark.parametrize("exclude_diagonal", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("block", [None, 4])
def test_logmean_vs_reference(n, q, exclude_diagonal, normalize, block):
    z, t = _z(n, q, seed=3), 1.7
    if not normalize:
        z = F.normalize(z, dim=-1)
    kw = dict(normalize=normalize, exclude_diagonal=exclude_diagonal)
    got, (g,) = _val_grad(lambda x: U.gaussian_gram_logmean(x, t, block_size=block, **kw), z)
    zn = to_numpy(z)
    assert_close(got, R.gaussian_gram_logmean(zn, t, **kw), **REF, name="value")
    assert_close(g, UPSTREAM * R.gaussian_gram_logmean_grad(zn, t, **kw), **REF, name="gradient")
    pub, (gp,) = _val_grad(lambda x: KF.gaussian_gram_logmean(x, t, **kw), z)
    assert_close(pub, got, **REF, name="KF value")
    assert_close(gp, g, **REF, name="KF gradient")
    eager, (ge,) = _val_grad(lambda x: U.gaussian_gram_logmean_eager(x, t, **kw), z)
    assert_close(eager, got, **REF, name="eager value")
    assert_close(ge, g, **REF, name="eager gradient")


@pytest.mark.parametrize("q", [2, 3, 8])
def test_gram_mean_family(q):
    z = _z(20, q, seed=q)
    b = (1.0, 40.0, 40.0)
    leg, (gl,) = _val_grad(lambda x: KF.gram_mean(x, KF.LegendreSeries(b)), z)
    want, (gw,) = _val_grad(lambda x: KF.legendre_gram_mean(x, b), z)
    assert_close(leg, want, rtol=0, atol=0, name="Legendre member = legendre_gram_mean")
    assert_close(gl, gw, rtol=0, atol=0, name="Legendre member gradient")
    t = 1.3
    gau, (gg,) = _val_grad(lambda x: KF.gram_mean(x, KF.GaussianPotential(t)), z)
    ref, (gr,) = _val_grad(lambda x: torch.exp(KF.gaussian_gram_logmean(x, t, exclude_diagonal=False)), z)
    assert_close(gau, ref, rtol=0, atol=0, name="Gaussian member = exp(logmean incl. diagonal)")
    assert_close(gg, gr, rtol=0, atol=0, name="Gaussian member gradient")
    zn = to_numpy(z)
    phi = R.gaussian_phi(t)
    assert_close(gau, R.gram_mean(R.normalize(zn), phi), **REF, name="Gaussian member vs reference")
    assert_close(gg, UPSTREAM * R.gram_mean_grad(zn, phi), **REF, name="Gaussian member gradient vs reference")
    # docs/gaussian_gram.md: L_unif = log((n^2 gram_mean - n) / (n (n - 1)))
    n = z.shape[0]
    assert_close(KF.uniformity(z, t), torch.log((n * n * gau - n) / (n * (n - 1))), **REF, name="identity")


def test_gram_mean_phi_spec_is_checked():
    z = _z(4, 3, seed=0)
    with pytest.raises(TypeError, match="phi: expected"):
        KF.gram_mean(z, (1.0, 40.0))
    with pytest.raises(ValueError, match="t: expected"):
        KF.GaussianPotential(t=0.0)
    with pytest.raises(TypeError, match="coefficients"):
        KF.LegendreSeries(coefficients="abc")
    with pytest.raises(dataclasses.FrozenInstanceError):  # frozen
        KF.GaussianPotential(2.0).t = 3.0  # type: ignore[misc]
    assert KF.LegendreSeries([1, 2]).coefficients == (1.0, 2.0)


# --------------------------------------------------------------------------------------------------
# gradcheck, fp32 vs float64, upstream gradients, no-grad paths
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [None, 2])
@pytest.mark.parametrize("exclude_diagonal", [True, False])
def test_gradcheck(block, exclude_diagonal):
    z = _z(7, 3, seed=4).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: U.gaussian_gram_logmean(x, 1.5, exclude_diagonal=exclude_diagonal, block_size=block), (z,))
    za, zb = _z(6, 4, seed=5).requires_grad_(True), _z(6, 4, seed=6).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: KF.align_uniform_loss(a, b, t=3.0, uniformity_weight=0.5), (za, zb))


@pytest.mark.parametrize("n,q,t", [(64, 8, 0.5), (200, 32, 2.0), (300, 128, 10.0), (1000, 16, 2.0)])
def test_fp32_vs_float64(n, q, t):
    z = _z(n, q, seed=n + q)
    v64, (g64,) = _val_grad(lambda x: KF.uniformity(x, t), z)
    v32, (g32,) = _val_grad(lambda x: KF.uniformity(x, t), z.float())
    assert v32.dtype == torch.float32 and g32.dtype == torch.float32
    assert_close(v32, v64, rtol=0, atol=FP32_ATOL(t), name="fp32 value")
    assert_close(g32, g64, rtol=0, atol=FP32_ATOL(t) * float(g64.abs().max()), name="fp32 gradient")
    # half inputs: upcast at entry, float32 result, gradient in the input dtype
    for dt in (torch.float16, torch.bfloat16):
        zh = z.to(dt).requires_grad_(True)
        v = KF.uniformity(zh, t)
        v.backward()
        assert v.dtype == torch.float32 and zh.grad.dtype == dt
        want = KF.uniformity(zh.detach().double(), t)
        assert_close(v, want, rtol=0, atol=FP32_ATOL(t), name=f"{dt} input, fp32 compute")


def test_upstream_gradient_scales_and_no_grad_paths():
    z = _z(33, 5, seed=7)
    v1, (g1,) = _val_grad(lambda x: KF.uniformity(x), z, upstream=1.0)
    v3, (g3,) = _val_grad(lambda x: KF.uniformity(x), z, upstream=-3.25)
    assert_close(g3, -3.25 * g1, rtol=1e-14, atol=0, name="upstream -3.25")
    with torch.no_grad():
        v_ng = KF.uniformity(z.clone().requires_grad_(True))
    assert not v_ng.requires_grad
    v_frozen = KF.uniformity(z)  # requires_grad=False input
    assert not v_frozen.requires_grad
    for v in (v_ng, v_frozen):
        assert_close(v, v1, rtol=0, atol=0, name="value without gradient")
    # one view frozen in the loss: gradient for the other only, equal to the both-views one
    za, zb = _z(12, 4, seed=8).requires_grad_(True), _z(12, 4, seed=9)
    (UPSTREAM * KF.align_uniform_loss(za, zb)).backward()
    _, (ga, _gb) = _val_grad(lambda a, b: KF.align_uniform_loss(a, b), za.detach(), zb)
    assert_close(za.grad, ga, rtol=0, atol=0, name="grad with a frozen second view")


# --------------------------------------------------------------------------------------------------
# Stability at large t: online maximum
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [None, 3])
def test_large_t_is_finite_and_right_in_fp32(block):
    z, t = _z(40, 8, seed=11), 1e4
    assert torch.isinf(_wi_uniformity(z.float(), t))  # their form underflows: every exp(-t d^2) == 0
    want = R.gaussian_gram_logmean(to_numpy(z), t)
    got, (g,) = _val_grad(lambda x: U.gaussian_gram_logmean(x, t, block_size=block), z.float())
    assert math.isfinite(float(got)) and bool(torch.isfinite(g).all())
    # fp32 Gram entries carry ~1e-7 absolute error, the exponent 2t times that (2e-3 at t = 1e4) --
    # the same bound as FP32_ATOL, ~0.8% of which is used here
    assert_close(got, want, rtol=0, atol=FP32_ATOL(t), name="t = 1e4, fp32")
    g_ref = UPSTREAM * R.gaussian_gram_logmean_grad(to_numpy(z), t)
    assert_close(g, g_ref, rtol=0, atol=FP32_ATOL(t) * float(np.abs(g_ref).max()), name="gradient, t = 1e4")
    # float64 against the reference, tight
    got64, (g64,) = _val_grad(lambda x: U.gaussian_gram_logmean(x, t, block_size=block), z)
    assert_close(got64, want, rtol=1e-12, atol=0, name="t = 1e4, float64")
    assert_close(g64, g_ref, rtol=1e-9, atol=1e-9 * float(np.abs(g_ref).max()), name="gradient, float64")


def test_running_maximum_moves_across_blocks():
    # The first blocks hold only far-apart rows; a near-duplicate pair sits in the last block, so the
    # running maximum jumps by ~t late and every earlier partial sum and gradient must be rescaled.
    t = 300.0
    far = torch.eye(8, dtype=F64)  # orthonormal rows: E = -2t for every pair
    close = torch.cat([far[-1:], F.normalize(far[-1:] + 0.05 * far[:1], dim=-1)])
    z = torch.cat([far[:-1], close])
    for block in (2, 3, None):
        got, (g,) = _val_grad(lambda x: U.gaussian_gram_logmean(x, t, block_size=block), z)
        assert_close(got, R.gaussian_gram_logmean(to_numpy(z), t), rtol=1e-12, atol=0, name=f"block {block}")
        assert_close(g, UPSTREAM * R.gaussian_gram_logmean_grad(to_numpy(z), t), rtol=1e-9, atol=1e-12,
                     name=f"gradient, block {block}")


# --------------------------------------------------------------------------------------------------
# Degenerate inputs
# --------------------------------------------------------------------------------------------------


def _ref_loss_and_grad(za: np.ndarray, zb: np.ndarray, t: float = 2.0):
    """The loss and its ``UPSTREAM``-scaled gradients from the NumPy reference's Gram form."""
    xa, xb = R.normalize(za), R.normalize(zb)
    value = R.alignment_wang_isola(xa, xb) + 0.5 * (R.gaussian_gram_logmean(za, t) + R.gaussian_gram_logmean(zb, t))
    ga, gb = R.alignment_wang_isola_grad(xa, xb)
    ga = RS._normalize_vjp(za, ga) + 0.5 * R.gaussian_gram_logmean_grad(za, t)
    gb = RS._normalize_vjp(zb, gb) + 0.5 * R.gaussian_gram_logmean_grad(zb, t)
    return value, (UPSTREAM * ga, UPSTREAM * gb)


@pytest.mark.parametrize("kind", ["duplicate", "all_equal", "zero_row", "antipodal"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_degenerate_inputs(kind, dtype):
    n, q = 9, 4
    za, zb = _z(n, q, seed=12, dtype=dtype), _z(n, q, seed=13, dtype=dtype)
    if kind == "duplicate":
        za[4] = za[0]
        zb[2] = za[2]  # aligned pair: distance 0
    elif kind == "all_equal":
        za[:] = za[0]
        zb[:] = za[0]
    elif kind == "zero_row":
        za[0] = 0
    else:
        za[-1] = -za[0]
    v, g = _val_grad(lambda a, b: KF.align_uniform_loss(a, b), za, zb)
    assert bool(torch.isfinite(v)) and all(bool(torch.isfinite(x).all()) for x in g), kind
    if dtype == F64:
        # the reference's Gram form: a zero row normalises to 0, s = 0 with every row (squared distance 2)
        want, gw = _ref_loss_and_grad(to_numpy(za), to_numpy(zb))
        assert_close(v, want, **REF, name=f"loss ({kind})")
        for a, e in zip(g, gw):  # zero row: the gradient there is g / 1e-12 (below the clamp)
            assert_close(a, e, rtol=1e-9, atol=1e-10 * (1 + float(np.abs(e).max())), name=f"gradient ({kind})")
        if kind != "zero_row":  # on the sphere, Wang & Isola's pdist form is the same number
            want_wi, gw_wi = _val_grad(lambda a, b: _wi_loss(a, b), za, zb)
            assert_close(v, want_wi, **WI, name=f"loss vs Wang & Isola ({kind})")
            for a, e in zip(g, gw_wi):
                assert_close(a, e, rtol=1e-9, atol=1e-10 * (1 + float(e.abs().max())), name=f"grad vs W&I ({kind})")
    if kind == "all_equal":  # every pair at distance 0: L_unif = log 1 = 0, L_align = 0, and no gradient
        # exact 0; in rounding, the gradient 4t sum_j zhat_j projected off zhat_k leaves ~n 4t (a few
        # ulps) / ||z_k||: allow 16 ulps of that
        assert abs(float(v)) <= 16 * EPS32 * (1 + 2 * 2.0), float(v)
        bound = UPSTREAM * 4 * 2.0 * n * 16 * EPS32 / float(za[0].double().norm())
        for x in g:
            assert float(x.abs().max()) <= bound, (kind, float(x.abs().max()), bound)


def test_nan_propagates_and_check_finite_raises():
    z = _z(6, 3, seed=14)
    z[2, 1] = float("nan")
    assert torch.isnan(KF.uniformity(z))
    assert torch.isnan(KF.align_uniform_loss(z, z.flip(0)))
    z[2, 1] = float("inf")
    assert not torch.isfinite(KF.uniformity(z))
    with pytest.raises(ValueError, match="z: expected finite values"):
        KF.uniformity(z, check_finite=True)
    with pytest.raises(ValueError, match="z_b: expected finite values"):
        AlignUniformLoss(check_finite=True)(z.nan_to_num(), z)


def test_huge_rows_normalise_correctly():
    z = _z(10, 4, seed=15, dtype=torch.float32)
    big = z * 2.0**120  # ||z||^2 ~ 2^240 overflows fp32 without the (exact, power-of-two) prescaling
    assert_close(KF.uniformity(big), KF.uniformity(z), rtol=0, atol=0, name="huge rows")
    assert_close(KF.align_uniform_loss(big, z), KF.align_uniform_loss(z, z), rtol=0, atol=0, name="huge rows, loss")


# --------------------------------------------------------------------------------------------------
# Properties (Hypothesis)
# --------------------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(2, 23), st.integers(1, 11))
blocks = st.one_of(st.none(), st.integers(1, 25))
seeds = st.integers(0, 2**31 - 1)
ts = st.floats(0.05, 60.0)


@settings(deadline=None)
@given(shape=shapes, block=blocks, seed=seeds, t=ts)
def test_property_equals_wang_isola(shape, block, seed, t):
    n, q = shape
    z = _z(n, q, seed)
    want, (gw,) = _val_grad(lambda x: _wi_uniformity(x, t), z)
    got, (g,) = _val_grad(lambda x: U.gaussian_gram_logmean(x, t, block_size=block), z)
    if math.isinf(float(want)):  # their form underflowed (large t, far-apart rows): ours stays finite
        assert math.isfinite(float(got))
        return
    assert_close(got, want, rtol=1e-12, atol=1e-12 * (1 + 2 * t), name="L_unif")
    assert_close(g, gw, rtol=1e-10, atol=1e-11 * (1 + float(gw.abs().max())), name="gradient")


@settings(deadline=None)
@given(shape=shapes, block=blocks, seed=seeds, t=ts, s=st.floats(1e-3, 1e3))
def test_property_invariances(shape, block, seed, t, s):
    n, q = shape
    z = _z(n, q, seed)
    f = lambda x: U.gaussian_gram_logmean(x, t, block_size=block)
    v, (g,) = _val_grad(f, z)
    scale = 1 + float(g.abs().max())
    tol = dict(rtol=1e-10, atol=1e-11 * (1 + 2 * t))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    vp, (gp,) = _val_grad(f, z[perm])
    assert_close(vp, v, **tol, name="L(P z)")
    assert_close(gp, g[perm], rtol=1e-9, atol=1e-10 * scale, name="grad(P z)")
    rot, _ = torch.linalg.qr(torch.randn(q, q, generator=torch.Generator().manual_seed(seed + 1), dtype=F64))
    vr, (gr,) = _val_grad(f, z @ rot)
    assert_close(vr, v, **tol, name="L(z Q)")
    assert_close(gr, g @ rot, rtol=1e-9, atol=1e-10 * scale, name="grad(z Q)")
    vs, (gs,) = _val_grad(f, s * z)  # normalisation: value invariant, gradient scales as 1/s
    assert_close(vs, v, **tol, name="L(s z)")
    assert_close(s * gs, g, rtol=1e-9, atol=1e-10 * scale, name="s grad(s z)")


@settings(deadline=None)
@given(shape=shapes, seed=seeds, alpha=st.floats(1.0, 4.0), t=ts, lam=st.floats(0.0, 3.0))
def test_property_loss_equals_wang_isola(shape, seed, alpha, t, lam):
    n, q = shape
    za, zb = _z(n, q, seed), _z(n, q, seed + 1)
    want, gw = _val_grad(lambda a, b: _wi_loss(a, b, alpha, t, lam), za, zb)
    got, g = _val_grad(lambda a, b: KF.align_uniform_loss(a, b, alpha=alpha, t=t, uniformity_weight=lam), za, zb)
    if not math.isfinite(float(want)):
        assert math.isfinite(float(got))
        return
    assert_close(got, want, rtol=1e-12, atol=1e-12 * (1 + 2 * t), name="loss")
    for a, e in zip(g, gw):
        assert_close(a, e, rtol=1e-10, atol=1e-11 * (1 + float(e.abs().max())), name="gradient")


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_bad_input():
    z = _z(5, 3, seed=16)
    with pytest.raises(ValueError, match=r"z: expected a 2-D tensor, got shape \(3,\) \(1-D\)"):
        KF.uniformity(z[0])
    with pytest.raises(ValueError, match=r"z: expected a 2-D tensor"):
        KF.gaussian_gram_logmean(z[None])
    with pytest.raises(ValueError, match=r"z: expected at least 2 rows"):
        KF.uniformity(z[:1])
    with pytest.raises(ValueError, match=r"z: expected at least 1 columns"):
        KF.uniformity(z[:, :0])
    with pytest.raises(TypeError, match=r"z: expected a floating-point tensor.*got dtype torch.int64"):
        KF.uniformity(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"z: expected a torch.Tensor, got list"):
        KF.uniformity([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(ValueError, match=r"z_b: expected the same shape as z_a \(5, 3\), got \(5, 2\)"):
        KF.align_uniform_loss(z, z[:, :2])
    with pytest.raises(ValueError, match=r"z_b: expected the same shape as z_a"):
        AlignUniformLoss()(z, z[:4])
    with pytest.raises(ValueError, match=r"z_b: expected the same shape"):
        KF.alignment(z, z[:4])
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"t: expected a finite number > 0"):
            KF.uniformity(z, bad)
        with pytest.raises(ValueError, match=r"t: expected a finite number > 0"):
            UniformityLoss(t=bad)
        with pytest.raises(ValueError, match=r"alpha: expected a finite number > 0"):
            AlignUniformLoss(alpha=bad)
        with pytest.raises(ValueError, match=r"alpha: expected a finite number > 0"):
            KF.alignment(z, z, bad)
    with pytest.raises(TypeError, match=r"t: expected a positive number, got tensor of shape \(\)"):
        KF.uniformity(z, torch.tensor(2.0))
    with pytest.raises(TypeError, match=r"alpha: expected a positive number, got str"):
        KF.align_uniform_loss(z, z, alpha="2")
    with pytest.raises(ValueError, match=r"uniformity_weight: expected a finite number >= 0, got -1"):
        AlignUniformLoss(uniformity_weight=-1.0)
    with pytest.raises(ValueError, match=r"backend: expected one of 'auto', 'triton', 'torch', got 'cuda'"):
        KF.uniformity(z, backend="cuda")
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        UniformityLoss(backend="gpu")
    with pytest.raises(ValueError, match=r"input_precision: expected one of"):
        KF.uniformity(z, input_precision="fp32")
    with pytest.raises(ValueError, match=r"input_precision: expected one of"):
        AlignUniformLoss(input_precision="high")
    with pytest.raises(ValueError, match=r"block_size: expected an int >= 1, got 0"):
        U.gaussian_gram_logmean(z, block_size=0)
    if torch.cuda.is_available():  # pragma: no cover - views on different devices
        with pytest.raises(ValueError, match="z_b: expected device"):
            KF.align_uniform_loss(z, z.cuda())


@pytest.mark.parametrize("flag", ["normalize", "gather_distributed", "check_finite"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_flags_must_be_bools(flag, value):
    z = _z(4, 3, seed=17)
    for make in (UniformityLoss, AlignUniformLoss):
        with pytest.raises(TypeError, match=f"{flag}: expected a bool"):
            make(**{flag: value})
    with pytest.raises(TypeError, match=f"{flag}: expected a bool"):
        KF.uniformity(z, **{flag: value})
    with pytest.raises(TypeError, match=f"{flag}: expected a bool"):
        KF.align_uniform_loss(z, z, **{flag: value})
    with pytest.raises(TypeError, match="exclude_diagonal: expected a bool"):
        KF.gaussian_gram_logmean(z, exclude_diagonal=value)
    with pytest.raises(TypeError, match="return_components: expected a bool"):
        KF.align_uniform_loss(z, z, return_components=value)


# --------------------------------------------------------------------------------------------------
# API surface: exports, docstrings, repr, autocast
# --------------------------------------------------------------------------------------------------


def test_exports_docstrings_and_repr():
    assert kernelssl.UniformityLoss is UniformityLoss and kernelssl.AlignUniformLoss is AlignUniformLoss
    assert {"UniformityLoss", "AlignUniformLoss"} <= set(kernelssl.losses.__all__) <= set(dir(kernelssl.losses))
    names = {"gaussian_gram_logmean", "gram_mean", "LegendreSeries", "GaussianPotential", "uniformity", "alignment",
             "align_uniform_loss", "AlignUniformComponents"}
    assert names <= set(KF.__all__)
    for cls in (UniformityLoss, AlignUniformLoss):  # the parts test_dropin asks of the other losses
        for part in ("Args:", "Returns:", "Example::", "loss = ", "0-dim", "backward()", "for x1, x2 in loader"):
            assert part in cls.forward.__doc__, (cls.__name__, part)
        for part in ("Args (keyword-only):", "Example", "log(", "for x1, x2 in loader"):
            assert part in cls.__doc__, (cls.__name__, part)
    comp = AlignUniformLoss.forward_components.__doc__
    assert "loss" in comp and "forward" in comp and "AlignUniformComponents" in comp
    for doc in (KF.uniformity.__doc__, KF.align_uniform_loss.__doc__, KF.gaussian_gram_logmean.__doc__):
        assert "Returns" in doc or "return" in doc
    assert repr(AlignUniformLoss(t=3.0)) == (
        "AlignUniformLoss(alpha=2.0, t=3.0, uniformity_weight=1.0, normalize=True, backend='auto')")
    assert repr(UniformityLoss()) == "UniformityLoss(t=2.0, normalize=True, backend='auto')"


def test_hyper_parameters_are_keyword_only_and_modules_hold_no_state():
    for cls in (UniformityLoss, AlignUniformLoss):
        with pytest.raises(TypeError):
            cls(2.0)
        assert cls().state_dict() == {} and list(cls().parameters()) == []


def test_forward_components_is_the_same_single_pass():
    crit = AlignUniformLoss(t=1.5)
    za, zb = _z(10, 6, seed=24).requires_grad_(), _z(10, 6, seed=25)
    loss = crit(za, zb)
    (2.0 * loss).backward()
    g1 = za.grad.clone()
    za.grad = None
    out = crit.forward_components(za, zb)
    assert isinstance(out, KF.AlignUniformComponents)
    assert [f for f in ("loss", "alignment", "uniformity_a", "uniformity_b") if hasattr(out, f)] == [
        "loss", "alignment", "uniformity_a", "uniformity_b"]
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, out.alignment + 0.5 * (out.uniformity_a + out.uniformity_b), rtol=0, atol=0)
    (2.0 * out.loss).backward()
    torch.testing.assert_close(za.grad, g1, rtol=0, atol=0)
    comp = KF.align_uniform_loss(za, zb, t=1.5, return_components=True)
    torch.testing.assert_close(comp.loss, loss, rtol=0, atol=0)


def test_autocast_computes_in_fp32():
    z = _z(32, 8, seed=18, dtype=torch.float32)
    want = KF.align_uniform_loss(z, z.flip(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = AlignUniformLoss()(z, z.flip(0))
    assert got.dtype == torch.float32
    assert_close(got, want, rtol=0, atol=0, name="inside autocast")


# --------------------------------------------------------------------------------------------------
# Memory: no n x n tensor is created or kept; the metric stores nothing
# --------------------------------------------------------------------------------------------------


class _Ops(TorchDispatchMode):
    """Records the name of every aten op that runs (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_no_host_sync_in_forward_or_backward():
    # A host read of a tensor value is aten._local_scalar_dense (.item(), bool(), float(), ...): none may
    # run in the loss's forward or backward (the running maximum stays on the device).
    za, zb = _z(40, 6, seed=26, dtype=torch.float32).requires_grad_(), _z(40, 6, seed=27, dtype=torch.float32)
    ops = _Ops()
    with ops:
        (UPSTREAM * AlignUniformLoss()(za, zb)).backward()
        with torch.no_grad():
            KF.uniformity(zb)
        U.gaussian_gram_logmean(za, 1e4, block_size=7).backward()
    assert "aten.addmm" in ops.names and "aten.amax" in ops.names  # the blocked path ran, and was recorded
    assert not any("local_scalar_dense" in n or n == "aten.item" for n in ops.names), sorted(ops.names)


def test_no_tensor_larger_than_a_block_and_saved_is_linear():
    n, q, block = 600, 8, 64
    z = _z(n, q, seed=19, dtype=torch.float32).requires_grad_(True)
    mode = LargestTensor()
    with mode:
        (UPSTREAM * U.gaussian_gram_logmean(z, block_size=block)).backward()
    assert mode.largest <= max(block * block, n * q), mode.largest
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        KF.align_uniform_loss(z, z.detach().flip(0))
    assert sum(saved) <= 16 * n * q, sum(saved)  # a handful of (n, q) tensors, n^2 = 360000
    with torch.no_grad(), LargestTensor() as m2:
        KF.uniformity(z)
    assert m2.largest <= max(min(n, 2048) ** 2, n * q)
    eager = LargestTensor()
    with eager:
        _wi_uniformity(z.detach(), 2.0)
    assert eager.largest >= n * (n - 1) // 2  # the pdist form stores every distance


# --------------------------------------------------------------------------------------------------
# torch.compile, torch.func, meta tensors
# --------------------------------------------------------------------------------------------------

COMPILE_BACKENDS = ["aot_eager"] + (["inductor"] if os.environ.get("KERNELSSL_TEST_INDUCTOR") == "1" else [])


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("which", ["align_uniform", "uniformity", "align_uniform-gather-noop"])
def test_compiled_step_matches_eager(which, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)).to(F64)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(10, 6, generator=g, dtype=F64), torch.randn(10, 6, generator=g, dtype=F64)
    if which == "uniformity":
        crit = UniformityLoss(t=3.0, backend="torch")
        step = lambda a, b: 0.5 * (crit(model(a)) + crit(model(b)))
    else:
        crit = AlignUniformLoss(uniformity_weight=0.7, gather_distributed=which.endswith("noop"), backend="torch")
        step = lambda a, b: crit(model(a), model(b))
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    params = list(model.parameters())
    for i in range(2):
        le = step(x1 + i, x2)
        le.backward()
        ge = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        lc = compiled(x1 + i, x2)
        lc.backward()
        gc = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        assert_close(lc, le, rtol=1e-12, atol=1e-14, name=f"call {i} loss")
        for j, (c, e) in enumerate(zip(gc, ge)):
            assert_close(c, e, rtol=1e-12, atol=1e-14, name=f"call {i} grad[{j}]")


def test_compiled_op_large_t_and_small_blocks():
    # The compiled path (the blocked pass as one torch.library op) with several blocks and a large t.
    torch._dynamo.reset()
    z = _z(23, 4, seed=20)
    f = lambda x: U.gaussian_gram_logmean(x, 500.0, block_size=5)
    want, (gw,) = _val_grad(f, z)
    got, (g,) = _val_grad(torch.compile(f, fullgraph=True, backend="aot_eager"), z)
    assert_close(got, want, rtol=1e-12, atol=0, name="compiled value")
    assert_close(g, gw, rtol=1e-10, atol=1e-12 * float(gw.abs().max()), name="compiled gradient")


@pytest.mark.parametrize("which", ["uniformity", "align_uniform"])
def test_torch_func_grad_vmap_jvp(which):
    f = (lambda a, b: UniformityLoss()(a)) if which == "uniformity" else (lambda a, b: AlignUniformLoss()(a, b))
    check_torch_func(f, _z(8, 5, seed=21), _z(8, 5, seed=22), _z(8, 5, seed=23))


def test_meta_tensors_propagate_shapes():
    z = torch.empty(16, 8, device="meta")
    for out in (KF.uniformity(z), KF.gaussian_gram_logmean(z, exclude_diagonal=False),
                KF.gram_mean(z, KF.GaussianPotential()), KF.alignment(z, z), UniformityLoss()(z),
                AlignUniformLoss()(z, z), AlignUniformLoss().forward_components(z, z).uniformity_b):
        assert out.shape == () and out.device.type == "meta" and out.dtype == torch.float32
    zr = torch.empty(16, 8, device="meta", requires_grad=True)
    AlignUniformLoss()(zr, z).backward()
    assert zr.grad.shape == zr.shape and zr.grad.device.type == "meta"


# --------------------------------------------------------------------------------------------------
# Edge cases of the public API (rows near 0, large t, numpy scalars) and of the torch tier forms
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-13, 1e-20, 1e-200])
def test_tiny_rows_normalise_like_any_other(scale):
    """Rows of norm < 1e-12 (a batch collapsing towards zero) would stay un-normalised under
    F.normalize's eps and score as perfectly uniform (-4t: the loss's global minimum at collapse);
    the exact power-of-two prescale scales them up too, so every finite non-zero row gives the
    value and gradient of its direction, bitwise-level (the scaling is exact)."""
    z = _z(9, 4, seed=21)
    want, (g_want,) = _val_grad(lambda x: KF.uniformity(x), z)
    got, (g_got,) = _val_grad(lambda x: KF.uniformity(x), z * scale)
    assert_close(got, want, **WI, name="uniformity of tiny rows")
    assert_close(g_got * scale, g_want, rtol=1e-12, atol=1e-12 * float(g_want.abs().max()), name="its gradient")
    # the other losses share the prescale: SFRIK's Gram mean (-20 instead of ~5 at 1e-14 without it)
    assert_close(KF.legendre_gram_mean(z * scale), KF.legendre_gram_mean(z), **WI, name="legendre")
    aligned = KF.align_uniform_loss(z * scale, z * scale)
    assert_close(aligned, want, **WI, name="align + uniform of tiny, identical views")
    # fp32 at its own tiny end (normal numbers): the direction's value within the fp32 bound
    zf = z.float()
    assert_close(KF.uniformity(zf * 1e-30), KF.uniformity(zf), rtol=0, atol=FP32_ATOL(2.0), name="fp32 1e-30")


def test_diagonal_included_fp32_gradient_at_large_t():
    """exclude_diagonal=False keeps the pairs (k, k); their gradient is radial and the normalisation
    Jacobian removes it.  Adding it and relying on the Jacobian's cancellation would put the fp32
    gradient 4e-2 off (relative) at t = 10, and give garbage at t = 40: it is within the fp32 bound."""
    for n, q, t in [(40, 64, 10.0), (40, 64, 40.0), (129, 17, 40.0)]:
        z = _z(n, q, seed=n + q)
        _, (g64,) = _val_grad(lambda x: KF.gaussian_gram_logmean(x, t, exclude_diagonal=False), z)
        _, (g32,) = _val_grad(lambda x: KF.gaussian_gram_logmean(x, t, exclude_diagonal=False), z.float())
        assert_close(g32.double(), g64, rtol=0, atol=FP32_ATOL(t) * float(g64.abs().max()), name=f"t = {t}")


def test_huge_t_with_duplicate_rows_stays_a_log_of_a_fraction():
    """On unit rows s <= 1, so the log-mean is <= 0; a rounded s = 1 + ulp times t = 1e30 would give +2e23.
    With duplicates the exact value is log(#duplicate pairs / n(n-1))."""
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))  # fp32: row 0 . row 0 = 1 + 2^-23
    z[1] = z[0]
    zh = F.normalize(z)
    assert float(zh[0] @ zh[1]) > 1.0  # the rounding this test is about
    for backend in ("torch", "triton"):
        got = KF.uniformity(z, 1e30, backend=backend)
        assert_close(got, math.log(2 / 20), rtol=0, atol=1e-6, name=f"{backend} t = 1e30, one duplicate pair")


def test_numpy_scalars_and_return_components():
    z = _z(6, 3, seed=1)
    want = KF.uniformity(z, 2.0)
    for t in (np.float32(2.0), np.float64(2.0), np.int64(2)):
        assert_close(KF.uniformity(z, t), want, rtol=0, atol=0, name=f"t = {t!r}")
        assert_close(AlignUniformLoss(t=t, alpha=np.float32(2.0))(z, z), want, rtol=0, atol=0, name="module")
    with pytest.raises(TypeError, match="t: expected a positive number"):
        KF.uniformity(z, np.bool_(True))
    for cls in (UniformityLoss, AlignUniformLoss):  # the terms come from forward_components / KF
        with pytest.raises(TypeError, match="return_components"):
            cls(return_components=True)


def test_torch_tier_forms_at_the_edges():
    """The torch tier's blocked and plain-autograd forms, on the rows the functional API prescales: a
    row of norm < 1e-12 keeps its diagonal gradient right (prescaled, it is a unit row like the others);
    the plain-autograd form clamps s <= 1 like the blocked pass; alignment names mismatched shapes."""
    z = _z(5, 3, seed=4)
    z[2] *= 1e-13 / float(z[2].norm())
    t = 2.0
    want_g = UPSTREAM * R.gaussian_gram_logmean_grad(to_numpy(z), t, exclude_diagonal=False)
    for fn in (U.gaussian_gram_logmean, U.gaussian_gram_logmean_eager):
        _, (g,) = _val_grad(lambda x: fn(prescale_rows(x), t, exclude_diagonal=False), z)
        assert_close(g, want_g, **REF, name=f"{fn.__name__}: gradient with a row of norm 1e-13")
    with pytest.raises(TypeError, match="exclude_diagonal"):
        KF.gaussian_gram_logmean(z, t, exclude_diagonal="yes")
    zd = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))  # fp32: row 0 . row 0 = 1 + ulp
    zd[1] = zd[0]
    assert_close(U.gaussian_gram_logmean_eager(zd, 1e30), math.log(2 / 20), rtol=0, atol=1e-6, name="eager, huge t")
    with pytest.raises(ValueError, match=r"z_b: expected the same shape as z_a \(4, 3\), got \(5, 3\)"):
        KF.alignment(torch.randn(4, 3), torch.randn(5, 3))
