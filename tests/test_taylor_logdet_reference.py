"""The MEC NumPy reference (reference/taylor_logdet.py) against first principles: brute-force matrix powers,
the d-space identity, the exact log det it truncates, central differences, closed forms."""
import math

import numpy as np
import pytest

from helpers import assert_close, central_difference
from reference import taylor_logdet as R

SHAPES = [(5, 8), (8, 5)]  # m < d and m > d


def _pair(seed, m, d, batch=()):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(batch + (m, d)), rng.standard_normal(batch + (m, d))


def _c(a, b, lam):
    return lam * R.normalize(a) @ np.swapaxes(R.normalize(b), -1, -2)


# ---------------------------------------------------------------------------------------------------
# the series
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,d", SHAPES)
@pytest.mark.parametrize("order", range(1, 9))
def test_series_matches_brute_force_matrix_power(m, d, order):
    a, b = _pair(order, m, d)
    lam = 0.7
    c = _c(a, b, lam)
    brute = sum((-1) ** (k + 1) * np.trace(np.linalg.matrix_power(c, k)) / k for k in range(1, order + 1))
    # float64 roundoff of <= 8 small matrix products of O(1) entries
    assert_close(R.taylor_logdet(a, b, lam, order), brute, rtol=1e-12, atol=1e-12, name="T_n")


@pytest.mark.parametrize("m,d", SHAPES)
@pytest.mark.parametrize("order", [1, 2, 3, 4, 7])
def test_m_space_equals_d_space(m, d, order):
    a, b = _pair(10 + order, m, d, batch=(2,))
    lam = np.array([0.3, 1.3])  # per-batch lam, one of them outside the convergence region
    # same traces, different (m x m vs d x d) roundoff only
    assert_close(R.taylor_logdet_dspace(a, b, lam, order), R.taylor_logdet(a, b, lam, order),
                 rtol=1e-11, atol=1e-12, name="d-space vs m-space")


@pytest.mark.parametrize("m,d", SHAPES)
def test_series_converges_to_exact_logdet_within_truncation_bound(m, d):
    a, b = _pair(3, m, d)
    lam = 0.15
    c = _c(a, b, lam)
    r = np.abs(np.linalg.eigvals(c)).max()
    assert r < 0.5  # premise: well inside the convergence region
    rank = min(m, d)
    exact = R.exact_logdet(a, b, lam)
    assert_close(exact, np.linalg.slogdet(np.eye(m) + c)[1], rtol=1e-13, atol=1e-13, name="exact")
    tail = -math.log1p(-r)  # sum_{k>=1} r^k / k
    errors = []
    for n in range(1, 16):
        tail -= r ** n / n  # now sum_{k>n} r^k / k
        # |sum_{k>n} (-1)^(k+1) tr(C^k)/k| <= sum_{k>n} |tr C^k|/k <= rank * sum_{k>n} r^k/k;
        # 1e-13 covers float64 roundoff of the finite sums.
        err = abs(R.taylor_logdet(a, b, lam, n) - exact)
        assert err <= rank * tail + 1e-13, (n, err, rank * tail)
        errors.append(err)
    assert rank * tail < 1e-4 and errors[-1] < 1e-4  # the bound is not vacuous at n = 15


def test_closed_form_orthonormal_rows():
    # b = a with orthonormal rows: C = lam I_m, T_n = m sum (-1)^(k+1) lam^k / k, log det = m log(1+lam)
    m, d, lam = 4, 7, 0.6
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((d, m)))
    a = 3.0 * q.T  # orthogonal rows of norm 3 (normalisation removes the 3)
    for n in range(1, 7):
        expected = m * sum((-1) ** (k + 1) * lam ** k / k for k in range(1, n + 1))
        assert_close(R.taylor_logdet(a, a, lam, n), expected, rtol=1e-13, atol=1e-13, name=f"T_{n}")
    assert_close(R.exact_logdet(a, a, lam), m * math.log1p(lam), rtol=1e-13, atol=1e-13, name="logdet")
    # b = -a, lam > 1, m odd: det(I - lam I) = (1 - lam)^m < 0 -> NaN
    assert np.isnan(R.exact_logdet(a[:3], -a[:3], 1.5))


def test_first_term_is_lam_times_sum_of_cosines():
    a, b = _pair(4, 7, 5)
    lam = 0.37
    cos = np.array([a[i] @ b[i] / (np.linalg.norm(a[i]) * np.linalg.norm(b[i])) for i in range(7)])
    assert_close(R.taylor_logdet(a, b, lam, 1), lam * cos.sum(), rtol=1e-13, atol=1e-14, name="T_1")
    # so the order-1 reference-scale loss is minus the mean cosine similarity
    loss = R.mec_loss(a, b, order=1)[0]
    assert_close(loss, -cos.mean(), rtol=1e-13, atol=1e-14, name="order-1 loss")


# ---------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------

# central differences with h = 1e-6 on O(1) functions: truncation O(h^2) ~ 1e-12, roundoff
# ~ eps/h ~ 1e-10 per entry -> 1e-7 absolute is a safe bound with margin.
FD_TOL = dict(rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("m,d", [(4, 3), (3, 5)])
@pytest.mark.parametrize("order", range(1, 6))
def test_taylor_grad_vs_central_difference(m, d, order):
    a, b = _pair(20 + order, m, d)
    lam = 0.8
    ga, gb = R.taylor_logdet_grad(a, b, lam, order)
    assert_close(ga, central_difference(lambda x: R.taylor_logdet(x, b, lam, order), a), **FD_TOL, name="dT/da")
    assert_close(gb, central_difference(lambda x: R.taylor_logdet(a, x, lam, order), b), **FD_TOL, name="dT/db")


def test_taylor_grad_unnormalised_and_batched():
    a, b = _pair(5, 3, 4, batch=(2,))
    lam = np.array([0.5, 0.9])
    ga, gb = R.taylor_logdet_grad(a, b, lam, 3, normalize=False)
    fa = central_difference(lambda x: R.taylor_logdet(x, b, lam, 3, normalize=False).sum(), a)
    fb = central_difference(lambda x: R.taylor_logdet(a, x, lam, 3, normalize=False).sum(), b)
    assert_close(ga, fa, **FD_TOL, name="dT/da")
    assert_close(gb, fb, **FD_TOL, name="dT/db")


@pytest.mark.parametrize("scale", ["reference", "paper"])
@pytest.mark.parametrize("with_targets", [False, True])
def test_loss_grad_vs_central_difference(scale, with_targets):
    rng = np.random.default_rng(7)
    z_a, z_b, p_a, p_b = (rng.standard_normal((4, 3)) for _ in range(4))
    if not with_targets:
        p_a = p_b = None
    kw = dict(order=4, scale=scale, eps_sq=0.5)  # lam = d/(m eps_sq) = 1.5: a non-trivial C
    grads = R.mec_loss_grad(z_a, z_b, p_a, p_b, **kw)
    args = [z_a, z_b, p_a, p_b]
    for i, g in enumerate(grads):
        if args[i] is None:
            assert g is None
            continue

        def f(x, i=i):
            xs = list(args)
            xs[i] = x
            return R.mec_loss(*xs, **kw)[0]

        assert_close(g, central_difference(f, args[i]), **FD_TOL, name=f"grad {i}")


def test_loss_scales_and_coding_length():
    a, b = _pair(8, 6, 10)
    m, d = 6, 10
    lam = d / (m * 64.0)
    mu = (m + d) / 2
    loss_r, t_ab, t_ba, cl = R.mec_loss(a, b)
    loss_p, t_ab2, t_ba2, cl2 = R.mec_loss(a, b, scale="paper")
    assert_close(t_ab, R.taylor_logdet(a, b, lam, 4), rtol=1e-14, atol=0, name="t_ab")
    assert_close(t_ba, R.taylor_logdet(b, a, lam, 4), rtol=1e-14, atol=0, name="t_ba")
    assert_close(loss_r, -(t_ab + t_ba) / (2 * m * lam), rtol=1e-14, atol=0, name="reference loss")
    assert_close(loss_p, -mu * (t_ab + t_ba) / 2, rtol=1e-14, atol=0, name="paper loss")
    assert_close(cl, mu * (t_ab + t_ba) / (2 * m), rtol=1e-14, atol=0, name="coding length")
    assert (t_ab2, t_ba2, cl2) == (t_ab, t_ba, cl)
    # targets equal to the online outputs give the same loss as no targets
    assert R.mec_loss(a, b, a.copy(), b.copy())[0] == loss_r


# ---------------------------------------------------------------------------------------------------
# lambda warm-up
# ---------------------------------------------------------------------------------------------------


def test_lambda_warmup_endpoints_and_linearity():
    base, spe, we, sf = 1 / 32, 7, 3, 8.0
    total = we * spe
    lam = [R.lambda_warmup(s, steps_per_epoch=spe, base_lam=base, warmup_epochs=we, start_factor=sf)
           for s in range(total + 5)]
    assert_close(lam[0], base / sf, rtol=1e-15, atol=0, name="step 0")
    assert all(x == base for x in lam[total:])
    inv = 1 / np.array(lam[: total + 1])
    # 1/lam is affine in the step: constant first differences equal to (1 - sf) / (base * total)
    assert_close(np.diff(inv), np.full(total, (1 - sf) / (base * total)), rtol=1e-10, atol=0, name="slope")
    assert np.all(np.diff(lam[: total + 1]) > 0)
    assert R.lambda_warmup(0, steps_per_epoch=spe, base_lam=base, warmup_epochs=0) == base
    for bad in (dict(step=-1), dict(step=1.5)):
        with pytest.raises(ValueError):
            R.lambda_warmup(bad["step"], steps_per_epoch=spe, base_lam=base)
