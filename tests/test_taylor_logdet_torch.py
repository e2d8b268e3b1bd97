"""MEC torch tier (kernelssl/ops/taylor_logdet.py) against the NumPy reference (reference/taylor_logdet.py), the eager
baseline, first principles and its own invariances."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import kernelssl.functional as KF
from helpers import assert_close, to_numpy
from kernelssl.ops import taylor_logdet as M
from reference import taylor_logdet as R

F64 = torch.float64
SHAPES = [(5, 8), (8, 5)]  # m < d (m-space path) and m > d (d-space path)
BATCHES = [(), (2,), (2, 3)]


def _pair(seed, m, d, batch=()):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(batch + (m, d)), rng.standard_normal(batch + (m, d))


def _t(x, requires_grad=False, dtype=F64):
    return torch.tensor(np.asarray(x), dtype=dtype, requires_grad=requires_grad)


def _series_scale(a, b, lam, order):
    """Magnitude against which float roundoff of T_n is measured: sum_k s ||C||_F^k / k
    (``|tr(C^k)| <= ||C^k||_* <= s ||C||_F^k`` bounds every partial sum met on the way)."""
    c = lam * R.normalize(a) @ np.swapaxes(R.normalize(b), -1, -2)
    s = min(a.shape[-2:])
    f = np.sqrt((c * c).sum(axis=(-2, -1)))
    return sum(s * f ** k / k for k in range(1, order + 1))


# ---------------------------------------------------------------------------------------------------
# values and gradients vs the reference, float64
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("m,d", SHAPES)
@pytest.mark.parametrize("order", range(1, 9))
def test_taylor_logdet_and_eager_match_reference(order, m, d, batch):
    a, b = _pair(100 * order + m, m, d, batch)
    lam = 0.6
    ref = R.taylor_logdet(a, b, lam, order)
    ref_ga, ref_gb = R.taylor_logdet_grad(a, b, lam, order)
    up = np.random.default_rng(order).uniform(0.5, 2.0, size=batch) * np.where(
        np.arange(max(1, int(np.prod(batch)))).reshape(batch) % 2, -1.0, 1.0)
    for fn in (M.taylor_logdet, M.taylor_logdet_eager):
        ta, tb = _t(a, True), _t(b, True)
        out = fn(ta, tb, lam, order)
        assert out.shape == torch.Size(batch) and out.dtype == F64
        # float64 roundoff of a few small products of O(1) entries
        assert_close(out, ref, rtol=1e-12, atol=1e-12, name=f"{fn.__name__} value")
        ga, gb = torch.autograd.grad(out, (ta, tb), _t(up))
        assert_close(ga, up[..., None, None] * ref_ga, rtol=1e-11, atol=1e-12, name=f"{fn.__name__} dT/da")
        assert_close(gb, up[..., None, None] * ref_gb, rtol=1e-11, atol=1e-12, name=f"{fn.__name__} dT/db")


@pytest.mark.parametrize("m,d", SHAPES)
def test_tensor_lam_per_batch_element(m, d):
    a, b = _pair(1, m, d, (2, 3))
    lam = np.array([0.2, 0.7, 1.1])  # broadcasts over the trailing batch dim
    ref = R.taylor_logdet(a, b, lam, 5)
    for fn in (M.taylor_logdet, M.taylor_logdet_eager):
        assert_close(fn(_t(a), _t(b), _t(lam), 5), ref, rtol=1e-12, atol=1e-12, name=fn.__name__)
    lam_full = np.broadcast_to(lam, (2, 3)).copy()
    assert_close(M.taylor_logdet(_t(a), _t(b), _t(lam_full), 5), ref, rtol=1e-12, atol=1e-12, name="full lam")


@pytest.mark.parametrize("m,d", [(4, 3), (3, 4)])
@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_gradcheck_taylor_logdet(m, d, order):
    a, b = _pair(order, m, d, (2,))
    inputs = (_t(a, True), _t(b, True), _t([0.5, 1.2], True))
    assert torch.autograd.gradcheck(lambda x, y, lam: M.taylor_logdet(x, y, lam, order), inputs)
    if order == 3:
        assert torch.autograd.gradcheck(lambda x, y, lam: M.taylor_logdet_eager(x, y, lam, order), inputs)
        assert torch.autograd.gradgradcheck(lambda x, y, lam: M.taylor_logdet(x, y, lam, order), inputs)


@pytest.mark.parametrize("m,d", [(4, 3), (3, 4)])
def test_gradcheck_exact_logdet(m, d):
    a, b = _pair(5, m, d, (2,))
    inputs = (_t(a, True), _t(b, True), _t([0.3, 0.6], True))  # small lam: det(I + C) > 0
    assert torch.autograd.gradcheck(lambda x, y, lam: M.exact_logdet(x, y, lam), inputs)


@pytest.mark.parametrize("m,d", SHAPES)
def test_exact_logdet_matches_numpy_slogdet(m, d):
    a, b = _pair(2, m, d, (3,))
    lam = np.array([0.1, 0.4, 0.8])
    ref = R.exact_logdet(a, b, lam)  # numpy slogdet of the m x m matrix (NaN where det <= 0)
    # slogdet via LU on <= 8 x 8 well-conditioned matrices; assert_close requires NaN at the same places
    got = M.exact_logdet(_t(a), _t(b), _t(lam))
    assert np.array_equal(np.isnan(to_numpy(got)), np.isnan(ref))
    assert_close(got[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-12, atol=1e-12, name="exact")
    # b = -a: C = -lam A^ A^T, det(I + C) = prod(1 - lam mu_i) changes sign with lam
    lams = np.linspace(0.2, 6.0, 12)
    aa = np.broadcast_to(a[0], (12, m, d)).copy()
    ref = R.exact_logdet(aa, -aa, lams)
    assert np.isnan(ref).any() and np.isfinite(ref).any()  # premise: both signs occur
    got = M.exact_logdet(_t(aa), _t(-aa), _t(lams))
    assert np.array_equal(np.isnan(to_numpy(got)), np.isnan(ref))
    assert_close(got[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-10, atol=1e-10, name="exact, b=-a")


@pytest.mark.parametrize("eps_sq", [64.0, 4.0])
def test_series_approaches_exact_when_convergent(eps_sq):
    a, b = _pair(9, 16, 12)
    lam = 12 / (16 * eps_sq)
    c = lam * R.normalize(a) @ R.normalize(b).T
    r = np.abs(np.linalg.eigvals(c)).max()
    assert r < 0.5
    exact = M.exact_logdet(_t(a), _t(b), lam)
    for n in (4, 8):
        tail = -math.log1p(-r) - sum(r ** k / k for k in range(1, n + 1))  # sum_{k>n} r^k / k
        err = abs(float(M.taylor_logdet(_t(a), _t(b), lam, n)) - float(exact))
        assert err <= 12 * tail + 1e-12  # rank * tail bounds the truncation error (+ roundoff)


# ---------------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["library", "eager"])
@pytest.mark.parametrize("with_targets", [False, True])
@pytest.mark.parametrize("scale", ["reference", "paper"])
def test_mec_loss_matches_reference(scale, with_targets, path):
    rng = np.random.default_rng(3)
    m, d = 6, 5
    arrays = [rng.standard_normal((m, d)) for _ in range(4)]
    if not with_targets:
        arrays[2] = arrays[3] = None
    kw = dict(eps_sq=2.0, order=4, scale=scale)  # lam = 5/12: a non-trivial C
    ref_loss, ref_ab, ref_ba, ref_cl = R.mec_loss(*arrays, **kw)
    ref_grads = R.mec_loss_grad(*arrays, **kw)
    ts = [None if x is None else _t(x, True) for x in arrays]
    loss, t_ab, t_ba, cl, lam = M.mec_loss(*ts, **kw, eager=(path == "eager"))
    assert lam == d / (m * 2.0) and isinstance(lam, float)
    tol = dict(rtol=1e-12, atol=1e-12)  # float64 roundoff only
    for got, want, name in ((loss, ref_loss, "loss"), (t_ab, ref_ab, "t_ab"), (t_ba, ref_ba, "t_ba"),
                            (cl, ref_cl, "coding_length")):
        assert got.shape == () and got.dtype == F64
        assert_close(got, want, **tol, name=name)
    (2.5 * loss).backward()  # non-unit upstream gradient
    for x, g, name in zip(ts, ref_grads, ("z_a", "z_b", "target_a", "target_b")):
        if x is None:
            assert g is None
            continue
        assert_close(x.grad, 2.5 * g, rtol=1e-11, atol=1e-12, name=f"grad {name}")


@pytest.mark.parametrize("scale", ["reference", "paper"])
def test_mec_loss_exact_path(scale):
    rng = np.random.default_rng(4)
    za, zb, pa, pb = (rng.standard_normal((7, 4)) for _ in range(4))
    lam = 4 / (7 * 64.0)
    loss, t_ab, t_ba, cl, _ = M.mec_loss(_t(za), _t(zb), _t(pa), _t(pb), exact=True, scale=scale)
    assert_close(t_ab, R.exact_logdet(pa, zb, lam), rtol=1e-12, atol=1e-13, name="t_ab")
    assert_close(t_ba, R.exact_logdet(pb, za, lam), rtol=1e-12, atol=1e-13, name="t_ba")
    s = float(t_ab + t_ba)
    want = -s / (2 * 7 * lam) if scale == "reference" else -(11 / 2) * s / 2
    assert_close(loss, want, rtol=1e-14, atol=0, name="loss")
    # lam given explicitly (e.g. by the warm-up), as a float and as a 0-dim tensor
    lam_w = M.lambda_warmup(3, steps_per_epoch=10, base_lam=lam)
    got = M.mec_loss(_t(za), _t(zb), lam=lam_w)
    got_t = M.mec_loss(_t(za), _t(zb), lam=_t(lam_w))
    want = R.mec_loss(za, zb, lam=lam_w)
    for i in range(4):
        assert_close(got[i], want[i], rtol=1e-12, atol=1e-13, name=f"lam float, output {i}")
        assert_close(got_t[i], want[i], rtol=1e-12, atol=1e-13, name=f"lam tensor, output {i}")


def test_order_one_loss_is_minus_mean_cosine():
    za, zb = _pair(6, 9, 7)
    cos = torch.nn.functional.cosine_similarity(_t(za), _t(zb), dim=-1, eps=1e-12)
    assert_close(M.mec_loss(_t(za), _t(zb), order=1)[0], -cos.mean(), rtol=1e-13, atol=1e-14, name="loss")


def test_requires_grad_false_and_no_grad():
    a, b = _pair(8, 6, 5, (2,))
    for fn in (M.taylor_logdet, M.taylor_logdet_eager, M.exact_logdet):
        args = (0.4, 3) if fn is not M.exact_logdet else (0.4,)
        plain = fn(_t(a), _t(b), *args)
        assert not plain.requires_grad
        with torch.no_grad():
            ng = fn(_t(a, True), _t(b, True), *args)
        assert not ng.requires_grad
        assert torch.equal(plain, ng)
    plain = M.mec_loss(_t(a[0]), _t(b[0]))
    with torch.no_grad():
        ng = M.mec_loss(_t(a[0], True), _t(b[0], True))
    assert not plain[0].requires_grad and not ng[0].requires_grad
    assert torch.equal(plain[0], ng[0])
    # gradient reaches only the argument that asks for it (stop-gradient target)
    za = _t(a[0], True)
    M.mec_loss(za, _t(b[0]), za.detach(), _t(b[0]))[0].backward()
    assert za.grad is not None and torch.isfinite(za.grad).all()


# ---------------------------------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,d", [(32, 16), (16, 32)])
@pytest.mark.parametrize("order", [2, 4, 7])
def test_float32_vs_float64(m, d, order):
    rng = np.random.default_rng(11)
    a = rng.standard_normal((2, m, d)) + rng.standard_normal((2, 1, d))  # a shared direction
    b = a + 0.5 * rng.standard_normal((2, m, d))
    lam = 2.0 / m  # rho(C) ~ 0.6-0.9: the high-order terms are not negligible
    c = lam * R.normalize(a) @ np.swapaxes(R.normalize(b), -1, -2)
    terms = sum(np.abs(np.trace(np.linalg.matrix_power(c, k), axis1=-2, axis2=-1)) / k
                for k in range(1, order + 1))
    up = np.array([1.3, -0.6])
    a64, b64 = _t(a, True), _t(b, True)
    ref = M.taylor_logdet(a64, b64, lam, order)
    rga, rgb = torch.autograd.grad(ref, (a64, b64), _t(up))
    a32, b32 = _t(a, True, torch.float32), _t(b, True, torch.float32)
    out = M.taylor_logdet(a32, b32, lam, order)
    assert out.dtype == torch.float32
    ga, gb = torch.autograd.grad(out, (a32, b32), _t(up, dtype=torch.float32))
    assert ga.dtype == torch.float32 and gb.dtype == torch.float32
    # fp32 unit roundoff 6e-8 times accumulations of length O(min(m, d)) = 16: ~1e-6 of the
    # summed term magnitudes |tr C^k| / k (observed ~1e-7)
    assert_close(out, ref, rtol=0, atol=1e-6 * terms, name="fp32 value")
    # gradients add the n-term S_n sum and the normalisation Jacobian: 5e-6 of the largest entry
    gmax = max(float(rga.abs().max()), float(rgb.abs().max()))
    assert_close(ga, rga, rtol=0, atol=5e-6 * gmax, name="fp32 dT/da")
    assert_close(gb, rgb, rtol=0, atol=5e-6 * gmax, name="fp32 dT/db")


@pytest.mark.parametrize("dtype,u", [(torch.float16, 2.0 ** -11), (torch.bfloat16, 2.0 ** -8)])
@pytest.mark.parametrize("fn", [M.taylor_logdet, M.taylor_logdet_eager, M.exact_logdet])
def test_half_inputs_are_upcast(dtype, u, fn):
    a, b = _pair(12, 12, 10, (2,))
    ah, bh = _t(a, True, dtype), _t(b, True, dtype)
    args = (0.08,) if fn is M.exact_logdet else (0.08, 4)
    out = fn(ah, bh, *args)
    assert out.dtype == torch.float32 and out.shape == (2,)
    up = torch.tensor([0.7, -1.9])
    ga, gb = torch.autograd.grad(out, (ah, bh), up)
    assert ga.dtype == dtype and gb.dtype == dtype
    # reference: float64 on the SAME (rounded) inputs -- the only error left is fp32 compute
    a64, b64 = ah.detach().double().requires_grad_(), bh.detach().double().requires_grad_()
    ref = fn(a64, b64, *args)
    rga, rgb = torch.autograd.grad(ref, (a64, b64), up.double())
    assert_close(out, ref, rtol=1e-5, atol=1e-6, name="value")  # fp32 accumulation, O(1) values
    # gradients are rounded to the input dtype at the end: relative error <= u of the largest entry
    gmax = float(max(rga.abs().max(), rgb.abs().max()))
    assert_close(ga, rga, rtol=u, atol=1e-5 * gmax, name="dT/da")
    assert_close(gb, rgb, rtol=u, atol=1e-5 * gmax, name="dT/db")


@pytest.mark.parametrize("m,d", [(5, 8), (8, 5)])
@pytest.mark.parametrize("order", range(2, 8))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("wants", ["ab", "b", "a", "lam"])
def test_function_matches_plain_autograd(m, d, order, normalize, wants):
    # the library path's autograd Function (normalisation folded into C, hand-written backward) against
    # taylor_logdet_autograd: m- and d-space, a zero row (the clamp of the normalisation), a per-batch lam
    a, b = _pair(7 * order + m, m, d, (3,))
    a[1, 2] = 0.0
    b[0, 4] = 0.0
    lam = np.array([0.3, 0.6, 0.9])
    up = np.array([0.7, -1.3, 2.0])
    got, want = [], []
    for fn, out in ((M.taylor_logdet, got), (M.taylor_logdet_autograd, want)):
        ta, tb, tl = _t(a, "a" in wants), _t(b, "b" in wants), _t(lam, wants == "lam")
        t = fn(ta, tb, tl, order, normalize=normalize)
        out += [t, *torch.autograd.grad(t, [x for x in (ta, tb, tl) if x.requires_grad], _t(up))]
    for x, y, name in zip(got, want, ("value", "grad 1", "grad 2")):
        assert_close(x, y, rtol=1e-11, atol=1e-12, name=name)


def test_output_dtypes():
    a, b = _pair(0, 4, 6)
    assert M.taylor_logdet(_t(a, dtype=torch.float32), _t(b), 0.5, 4).dtype == F64  # promotes
    assert M.taylor_logdet(_t(a, dtype=torch.float16), _t(b, dtype=torch.bfloat16), 0.5, 4).dtype == torch.float32
    out = M.mec_loss(_t(a, dtype=torch.bfloat16), _t(b, dtype=torch.bfloat16))
    assert all(x.dtype == torch.float32 for x in out[:4])


# ---------------------------------------------------------------------------------------------------
# divergence and diagnostics
# ---------------------------------------------------------------------------------------------------


def _collapsed(seed, m, d, noise=1e-3):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(d)
    return u + noise * rng.standard_normal((m, d)), u + noise * rng.standard_normal((m, d))


@pytest.mark.parametrize("m,d", [(8, 256), (256, 8)])
@pytest.mark.parametrize("order", range(1, 9))
def test_diverging_series_still_matches_reference_polynomial(m, d, order):
    a, b = _collapsed(order, m, d)
    # collapsed batch: rho = lam * m.  For (8, 256) that is the default eps_sq = 64 (lam = d / (64 m),
    # rho = d / 64 = 4); for (256, 8) the default would give 1/8, so lam is raised to the same rho = 4.
    lam = 4.0 / m
    if d == 256:
        assert lam == d / (m * 64.0)
    ref = R.taylor_logdet(a, b, lam, order)
    # values up to ~4^8/8: relative tolerance, float64 roundoff
    assert_close(M.taylor_logdet(_t(a), _t(b), lam, order), ref, rtol=1e-11, atol=0, name="library")
    assert_close(M.taylor_logdet_eager(_t(a), _t(b), lam, order), ref, rtol=1e-11, atol=0, name="eager")
    out32 = M.taylor_logdet(_t(a, dtype=torch.float32), _t(b, dtype=torch.float32), lam, order)
    # fp32: unit roundoff 6e-8 times random-walk growth over up-to-256-long accumulations ~1e-6
    assert_close(out32, ref, rtol=1e-5, atol=0, name="fp32")
    rho, ratio = M.convergence_diagnostics(_t(a), _t(b), lam, order=order)
    assert rho >= 1 and ratio >= 1
    assert_close(rho, 4.0, rtol=1e-2, atol=0, name="rho ~ lam m")  # noise 1e-3 perturbs rho by ~1e-3


def test_diagnostic_exact_on_rank_one_collapse():
    u = np.random.default_rng(0).standard_normal(20)
    a = np.broadcast_to(u, (2, 12, 20)).copy()
    lam = 20 / (12 * 64.0)  # default eps_sq: C = lam 1 1^T, rho = lam * m = 20/64
    rho, ratio = M.convergence_diagnostics(_t(a), _t(a), _t([lam, 4 * lam]), order=4)
    assert rho.shape == (2,) and ratio.shape == (2,)
    # power iteration on a rank-one matrix is exact after one step
    assert_close(rho, [lam * 12, 4 * lam * 12], rtol=1e-12, atol=0, name="rho")
    # tr(C^k) = (lam m)^k: ratio (rho^4/4) / (rho^3/3) = 3 rho / 4
    assert_close(ratio, [0.75 * lam * 12, 3 * lam * 12], rtol=1e-12, atol=0, name="term ratio")
    _, r1 = M.convergence_diagnostics(_t(a), _t(a), lam, order=1)  # order 1: |tr C^2/2| / |tr C|
    assert_close(r1, [lam * 12 / 2] * 2, rtol=1e-12, atol=0, name="order-1 ratio")


def test_diagnostic_converging_case():
    a, b = _pair(5, 16, 32)
    rho, ratio = M.convergence_diagnostics(_t(a), _t(b), 32 / (16 * 64.0))  # default lam
    assert rho < 1 and ratio < 1
    rho32, _ = M.convergence_diagnostics(_t(a, dtype=torch.float16), _t(b, dtype=torch.float16), 1 / 32)
    assert rho32.dtype == torch.float32 and rho32 < 1
    # zero C (zero rows) -> rho 0, no NaN
    z = torch.zeros(4, 3, dtype=F64)
    rho0, ratio0 = M.convergence_diagnostics(z, z, 0.5)
    assert float(rho0) == 0.0 and float(ratio0) == 0.0


@pytest.mark.parametrize("m,d", [(12, 20), (20, 12), (16, 16)])
@pytest.mark.parametrize("seed", range(3))
def test_rho_estimate_vs_eigvals(m, d, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, d)) + rng.standard_normal(d)  # shared direction: real dominant eigenvalue
    b = a + 0.3 * rng.standard_normal((m, d))  # not symmetric
    lam = 0.1
    ev = np.abs(np.linalg.eigvals(lam * R.normalize(a) @ R.normalize(b).T))
    ev.sort()
    assert ev[-2] / ev[-1] < 0.5  # premise: a gap
    rho, _ = M.convergence_diagnostics(_t(a), _t(b), lam)
    # 8 post-burn-in steps: the gap's contribution decays like 0.5^8 ~ 4e-3
    assert_close(rho, ev[-1], rtol=5e-3, atol=0, name="rho")


def test_diagnostics_do_not_build_a_graph():
    a, b = _pair(1, 6, 4, (2,))
    ta = _t(a, True)
    rho, ratio = M.convergence_diagnostics(ta, _t(b), 0.5)
    assert not rho.requires_grad and not ratio.requires_grad


# ---------------------------------------------------------------------------------------------------
# properties (Hypothesis)
# ---------------------------------------------------------------------------------------------------

dims = st.integers(min_value=2, max_value=13)
orders = st.integers(min_value=1, max_value=8)
lams = st.floats(min_value=0.02, max_value=1.5)
seeds = st.integers(min_value=0, max_value=2 ** 31 - 1)


@settings(deadline=None)
@given(m=dims, d=dims, order=orders, lam=lams, seed=seeds)
def test_property_m_space_equals_d_space(m, d, order, lam, seed):
    a, b = _pair(seed, m, d)
    atol = 1e-12 * _series_scale(a, b, lam, order)  # float64 roundoff relative to the term sizes
    ref_m = R.taylor_logdet(a, b, lam, order)
    ref_d = R.taylor_logdet_dspace(a, b, lam, order)
    assert_close(ref_d, ref_m, rtol=0, atol=atol, name="reference d vs m")
    lib = M.taylor_logdet(_t(a), _t(b), lam, order)  # min(m, d) space
    eager = M.taylor_logdet_eager(_t(a), _t(b), lam, order)  # m space
    assert_close(lib, ref_m, rtol=0, atol=atol, name="library")
    assert_close(eager, ref_m, rtol=0, atol=atol, name="eager")


@settings(deadline=None)
@given(m=dims, d=dims, order=orders, lam=lams, seed=seeds)
def test_property_invariances(m, d, order, lam, seed):
    a, b = _pair(seed, m, d)
    rng = np.random.default_rng(seed + 1)
    atol = 1e-12 * _series_scale(a, b, lam, order)
    base = M.taylor_logdet(_t(a), _t(b), lam, order)
    perm = rng.permutation(m)  # same row permutation: C -> P C P^T
    assert_close(M.taylor_logdet(_t(a[perm]), _t(b[perm]), lam, order), base, rtol=0, atol=atol, name="perm")
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # joint rotation: A^ Q Q^T B^T = A^ B^T
    assert_close(M.taylor_logdet(_t(a @ q), _t(b @ q), lam, order), base, rtol=0, atol=atol, name="rotation")
    sa, sb = rng.uniform(0.1, 10, (m, 1)), rng.uniform(0.1, 10, (m, 1))  # row scales vanish in A^
    assert_close(M.taylor_logdet(_t(sa * a), _t(sb * b), lam, order), base, rtol=0, atol=atol, name="scale")


@settings(deadline=None)
@given(kind=st.sampled_from(["duplicate_rows", "collapsed", "m2", "odd_d", "zero_row", "antipodal"]),
       m=st.integers(2, 17), d=st.integers(2, 17), order=orders, seed=seeds,
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_property_degenerate_inputs_stay_finite(kind, m, d, order, seed, dtype):
    rng = np.random.default_rng(seed)
    if kind == "m2":
        m = 2
    if kind == "odd_d":
        d = d | 1
    a, b = rng.standard_normal((m, d)), rng.standard_normal((m, d))
    if kind == "duplicate_rows":
        a[1:] = a[0]
        b[-1] = b[0]
    elif kind == "collapsed":
        a[:] = a[0]
        b[:] = a[0]
    elif kind == "zero_row":
        a[0] = 0.0
        b[-1] = 0.0
    elif kind == "antipodal":
        b = -a
    ta, tb = _t(a, True, dtype), _t(b, True, dtype)
    loss, t_ab, t_ba, cl, _ = M.mec_loss(ta, tb, order=order)  # default eps_sq
    (1.7 * loss).backward()
    for x in (loss, t_ab, t_ba, cl, ta.grad, tb.grad):
        assert torch.isfinite(x).all()
    out = M.taylor_logdet(ta.detach(), tb.detach(), 0.9, order)
    assert torch.isfinite(out).all()
    rho, ratio = M.convergence_diagnostics(ta, tb, 0.9, order=order)
    assert torch.isfinite(rho).all() and not torch.isnan(ratio).any()


def test_nan_propagates():
    a, b = _pair(0, 4, 3)
    a[1, 2] = np.nan
    assert torch.isnan(M.taylor_logdet(_t(a), _t(b), 0.5, 4))
    assert torch.isnan(M.mec_loss(_t(a), _t(b))[0])


# ---------------------------------------------------------------------------------------------------
# cost: the library path multiplies ceil(n/2) - 1 powers (+ the one product forming C)
# ---------------------------------------------------------------------------------------------------


class _CountMatmul(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.mm,
                    torch.einsum):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("m,d", SHAPES)
@pytest.mark.parametrize("order", range(1, 9))
def test_matrix_product_count(m, d, order):
    a, b = _pair(0, m, d, (2,))
    with _CountMatmul() as lib:
        M.taylor_logdet(_t(a), _t(b), 0.5, order)
    with _CountMatmul() as eager:
        M.taylor_logdet_eager(_t(a), _t(b), 0.5, order)
    h = (order + 1) // 2
    assert lib.count == (0 if order == 1 else 1 + (h - 1))
    assert eager.count == order  # forming C, then n - 1 powers


# ---------------------------------------------------------------------------------------------------
# warm-up and bad input
# ---------------------------------------------------------------------------------------------------


def test_lambda_warmup_matches_reference():
    for kw in (dict(steps_per_epoch=13, base_lam=1 / 32), dict(steps_per_epoch=3, base_lam=0.2, warmup_epochs=2,
                                                                 start_factor=4.0)):
        for step in range(0, 140, 3):
            assert M.lambda_warmup(step, **kw) == pytest.approx(R.lambda_warmup(step, **kw), rel=1e-15)
    assert M.lambda_warmup(0, steps_per_epoch=5, base_lam=0.25) == 0.25 / 8
    assert M.lambda_warmup(50, steps_per_epoch=5, base_lam=0.25) == 0.25
    assert M.lambda_warmup(0, steps_per_epoch=5, base_lam=0.25, warmup_epochs=0) == 0.25
    with pytest.raises(ValueError, match="step"):
        M.lambda_warmup(-1, steps_per_epoch=5, base_lam=0.25)
    with pytest.raises(TypeError, match="steps_per_epoch"):
        M.lambda_warmup(1, steps_per_epoch=2.5, base_lam=0.25)
    with pytest.raises(ValueError, match="base_lam"):
        M.lambda_warmup(1, steps_per_epoch=5, base_lam=0.0)


def test_bad_input():
    """The functional API checks the inputs (once) before calling the torch tier."""
    a = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="a:.*at least 2 dims"):
        KF.taylor_logdet(a[0], a[0], 0.5, 4)
    with pytest.raises(ValueError, match="b: expected the same shape"):
        KF.taylor_logdet(a, a[:3], 0.5, 4)
    with pytest.raises(TypeError, match="a:.*floating-point"):
        KF.taylor_logdet(a.long(), a, 0.5, 4)
    with pytest.raises(ValueError, match="order"):
        KF.taylor_logdet(a, a, 0.5, 0)
    with pytest.raises(TypeError, match="order"):
        KF.taylor_logdet(a, a, 0.5, 2.0)
    with pytest.raises(ValueError, match="lam"):
        KF.taylor_logdet(a, a, -0.5, 4)
    with pytest.raises(ValueError, match="lam: expected a tensor broadcastable"):
        KF.taylor_logdet(a, a, torch.ones(2, dtype=F64), 4)
    with pytest.raises(TypeError, match="lam"):
        KF.exact_logdet(a, a, torch.ones((), dtype=torch.long))
    with pytest.raises(ValueError, match="b: expected device"):
        KF.taylor_logdet(a, torch.empty(4, 3, dtype=F64, device="meta"), 0.5, 4)
    with pytest.raises(ValueError, match="iters"):
        M.convergence_diagnostics(a, a, 0.5, iters=0)
    with pytest.raises(ValueError, match="z_a:.*2-D"):
        KF.mec_loss(a[None], a[None])
    with pytest.raises(ValueError, match="z_a:.*at least 2 rows"):
        KF.mec_loss(a[:1], a[:1])
    with pytest.raises(ValueError, match="target_b"):
        KF.mec_loss(a, a, a, a[:, :2])
    with pytest.raises(ValueError, match="scale"):
        KF.mec_loss(a, a, scale="nope")
    with pytest.raises(ValueError, match="eps_sq"):
        KF.mec_loss(a, a, eps_sq=0.0)
