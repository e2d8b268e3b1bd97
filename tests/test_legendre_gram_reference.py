"""The NumPy SFRIK reference (reference/legendre_gram.py) against closed forms, classical polynomials,
exact quadrature and central differences.  No torch here."""
from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.polynomial import legendre as npleg
from scipy.special import roots_jacobi

from helpers import assert_close, central_difference
from reference import legendre_gram as R

QS = list(range(2, 11))
# Recurrence vs closed forms in float64: a few ulps per step on |t| <= 1 values of size O(1).
TIGHT = dict(rtol=1e-12, atol=1e-13)


def _t(seed: int, size: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform(-1.0, 1.0, size), [-1.0, 0.0, 1.0]])


def _n_harmonics(q: int, l: int) -> float:
    """N(q, l): dimension of the degree-l spherical harmonics on S^(q-1) (N(q,0) = 1)."""
    if l == 0:
        return 1.0
    return (2 * l + q - 2) / l * math.comb(l + q - 3, l - 1)


# --------------------------------------------------------------------------------------------------
# Polynomials
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", QS)
def test_recurrence_matches_closed_forms(q):
    t = _t(q)
    p = R.legendre(q, t, 4)
    assert p.shape == (5, t.size)
    assert_close(p[0], np.ones_like(t), **TIGHT, name="P_0")
    assert_close(p[1], t, **TIGHT, name="P_1")
    assert_close(p[2], (q * t**2 - 1) / (q - 1), **TIGHT, name="P_2")
    assert_close(p[3], ((q + 2) * t**3 - 3 * t) / (q - 1), **TIGHT, name="P_3")
    p4 = ((q + 2) * (q + 4) * t**4 - 6 * (q + 2) * t**2 + 3) / (q**2 - 1)
    assert_close(p[4], p4, **TIGHT, name="P_4")


def test_q3_is_classical_legendre():
    t = _t(3)
    p = R.legendre(3, t, 6)
    for l in range(7):
        assert_close(p[l], npleg.Legendre.basis(l)(t), **TIGHT, name=f"P_{l}(3; t)")


def test_q2_is_chebyshev():
    t = _t(2)
    p = R.legendre(2, t, 6)
    for l in range(7):
        assert_close(p[l], np.cos(l * np.arccos(t)), **TIGHT, name=f"P_{l}(2; t) vs T_{l}")


@pytest.mark.parametrize("q", QS)
def test_parity_and_values_at_one(q):
    deg = 12
    t = _t(100 + q)
    p, pm = R.legendre(q, t, deg), R.legendre(q, -t, deg)
    for l in range(deg + 1):
        assert_close(pm[l], (-1) ** l * p[l], **TIGHT, name=f"parity P_{l}")
    one = np.array([1.0])
    assert_close(R.legendre(q, one, deg)[:, 0], np.ones(deg + 1), **TIGHT, name="P_l(q;1)")
    d1 = R.legendre_derivative(q, one, deg)[:, 0]
    expected = np.array([l * (l + q - 2) / (q - 1) for l in range(deg + 1)])
    assert_close(d1, expected, **TIGHT, name="P'_l(q;1)")
    # derivative parity: P'_l(-t) = (-1)^(l+1) P'_l(t)
    d, dm = R.legendre_derivative(q, t, deg), R.legendre_derivative(q, -t, deg)
    for l in range(deg + 1):
        assert_close(dm[l], (-1) ** (l + 1) * d[l], **TIGHT, name=f"parity P'_{l}")


@pytest.mark.parametrize("q", [2, 3, 5, 8, 10])
def test_derivative_recurrence_vs_central_difference(q):
    deg = 8
    t = np.random.default_rng(q).uniform(-0.99, 0.99, 20)
    d = R.legendre_derivative(q, t, deg)
    for l in range(deg + 1):
        # elementwise polynomial: the gradient of the sum is the vector of derivatives
        fd = central_difference(lambda x: float(np.sum(R.legendre(q, x, deg)[l])), t)
        # central differences, h = 1e-6: O(h^2 |P'''|) ~ 1e-9 truncation + ~1e-10 rounding
        assert_close(d[l], fd, rtol=1e-7, atol=1e-7, name=f"P'_{l}(q={q})")


@pytest.mark.parametrize("q", QS)
def test_orthogonality_by_exact_quadrature(q):
    """t = u.v for u, v uniform on S^(q-1) has density ~ (1 - t^2)^((q-3)/2) on [-1, 1]; Gauss-Jacobi
    with alpha = beta = (q-3)/2 and 20 nodes integrates polynomials of degree <= 39 exactly."""
    x, w = roots_jacobi(20, (q - 3) / 2, (q - 3) / 2)
    w = w / w.sum()  # expectation under the normalised density
    deg = 6
    p = R.legendre(q, x, deg)
    # exact quadrature of degree <= 12 polynomials: rounding only
    for l in range(1, deg + 1):
        assert abs(np.dot(w, p[l])) <= 1e-13, f"E[P_{l}(q={q})] = {np.dot(w, p[l])}"
    gram = np.einsum("i,li,ki->lk", w, p, p)
    expected = np.diag([1.0 / _n_harmonics(q, l) for l in range(deg + 1)])
    assert_close(gram, expected, rtol=1e-12, atol=1e-13, name=f"E[P_l P_k] (q={q})")
    # the two closed forms of N(q, 1) and N(q, 2)
    assert _n_harmonics(q, 1) == q
    assert math.isclose(_n_harmonics(q, 2), (q + 2) * (q - 1) / 2, rel_tol=1e-15)


def test_phi_and_phi_prime_are_the_series():
    q, b = 6, (0.5, 2.0, -1.0, 3.0)
    t = _t(7)
    p, d = R.legendre(q, t, 4), R.legendre_derivative(q, t, 4)
    assert_close(R.phi(t, q, b), sum(b[l - 1] * p[l] for l in range(1, 5)), **TIGHT, name="phi")
    assert_close(R.phi_prime(t, q, b), sum(b[l - 1] * d[l] for l in range(1, 5)), **TIGHT, name="phi'")


# --------------------------------------------------------------------------------------------------
# Gram mean, loss, gradients
# --------------------------------------------------------------------------------------------------


def test_normalize():
    z = np.random.default_rng(0).standard_normal((6, 4))
    z[2] = 0.0
    zh = R.normalize(z)
    norms = np.linalg.norm(zh, axis=1)
    assert_close(np.delete(norms, 2), np.ones(5), **TIGHT, name="unit rows")
    assert np.all(zh[2] == 0.0), "a zero row must stay zero"


def test_gram_mean_is_the_double_sum():
    rng = np.random.default_rng(1)
    zh = R.normalize(rng.standard_normal((5, 3)))
    b = (1.0, 40.0, 40.0)
    total = 0.0
    for i in range(5):
        for j in range(5):
            total += float(R.phi(np.array(zh[i] @ zh[j]), 3, b))
    assert_close(R.gram_mean(zh, b), total / 25, **TIGHT, name="M")


@pytest.mark.parametrize("n,q", [(7, 2), (9, 3), (12, 5), (16, 8)])
def test_feature_space_identities(n, q):
    zh = R.normalize(np.random.default_rng(n * q).standard_normal((n, q)))
    s = zh.sum(axis=0)
    c = zh.T @ zh
    # sum_ij P_1 = ||s||^2 ;  sum_ij P_2 = (q ||C||_F^2 - n^2)/(q - 1)  -- float64 rounding only
    assert_close(n**2 * R.gram_mean(zh, (1.0,)), s @ s, rtol=1e-12, atol=1e-12, name="sum P_1")
    expected = (q * np.sum(c * c) - n**2) / (q - 1)
    assert_close(n**2 * R.gram_mean(zh, (0.0, 1.0)), expected, rtol=1e-12, atol=1e-11, name="sum P_2")


def test_gram_mean_closed_cases():
    b = (1.0, 40.0, 40.0)
    # all rows equal: every Gram entry is 1, M = phi(1) = sum b
    zh = R.normalize(np.tile(np.random.default_rng(3).standard_normal(5), (6, 1)))
    assert_close(R.gram_mean(zh, b), sum(b), **TIGHT, name="M(equal rows)")
    # orthonormal rows (n = q): off-diagonal phi(0), diagonal phi(1)
    q = 4
    zh = np.linalg.qr(np.random.default_rng(4).standard_normal((q, q)))[0]
    phi0 = float(R.phi(np.array(0.0), q, b))
    assert_close(R.gram_mean(zh, b), (q * sum(b) + (q * q - q) * phi0) / q**2, **TIGHT, name="M(orthonormal)")


def test_gram_mean_is_nonnegative_for_nonnegative_coefficients():
    rng = np.random.default_rng(5)
    for k in range(10):
        q = 2 + k % 6
        zh = R.normalize(rng.standard_normal((8, q)))
        b = tuple(rng.uniform(0, 5, 1 + k % 5))
        # positive-definite kernel (Schoenberg): V-statistic MMD^2 >= 0 up to rounding
        assert R.gram_mean(zh, b) >= -1e-12


@pytest.mark.parametrize("n,q,b", [(5, 4, (1.0, 40.0, 40.0)), (4, 2, (0.3, -1.0, 2.0, 0.7, 1.5)), (6, 3, (2.0,))])
@pytest.mark.parametrize("normalize", [True, False])
def test_gram_mean_grad_vs_central_difference(n, q, b, normalize):
    rng = np.random.default_rng(10 * n + q)
    z = rng.standard_normal((n, q)) * rng.uniform(0.5, 2.0, (n, 1))
    if normalize:
        f = lambda x: R.gram_mean(R.normalize(x), b)
    else:
        z = R.normalize(z) * 0.9  # keep the raw inner products in a moderate range
        f = lambda x: R.gram_mean(x, b)
    g = R.gram_mean_grad(z, b, normalize=normalize)
    fd = central_difference(f, z)
    # h = 1e-6: truncation O(h^2 f''') ~ 1e-9 and rounding ~ 1e-16 |M| / h ~ 1e-8 (|M| <= 100)
    assert_close(g, fd, rtol=1e-6, atol=1e-6, name="dM/dz")


def test_gram_mean_grad_is_tangent():
    """M(normalize(z)) is invariant to row scaling: the gradient is orthogonal to each row."""
    z = np.random.default_rng(11).standard_normal((9, 5))
    g = R.gram_mean_grad(z, (1.0, 40.0, 40.0))
    assert_close(np.sum(g * z, axis=1), np.zeros(9), rtol=0, atol=1e-12, name="<g_k, z_k>")


@pytest.mark.parametrize("n,q", [(4, 3), (5, 2), (3, 6)])
def test_sfrik_loss_grad_vs_central_difference(n, q):
    rng = np.random.default_rng(n + 7 * q)
    za, zb = rng.standard_normal((n, q)), rng.standard_normal((n, q))
    kw = dict(coefficients=(1.0, 40.0, 40.0), sim_weight=4000.0, mmd_weight=1.0)
    ga, gb = R.sfrik_loss_grad(za, zb, **kw)
    fda = central_difference(lambda x: R.sfrik_loss(x, zb, **kw)[0], za)
    fdb = central_difference(lambda x: R.sfrik_loss(za, x, **kw)[0], zb)
    # loss ~ 1e3: rounding ~ 1e-16 * 1e3 / 1e-6 = 1e-7, gradients ~ 1e2
    assert_close(ga, fda, rtol=1e-6, atol=1e-5, name="dloss/dz_a")
    assert_close(gb, fdb, rtol=1e-6, atol=1e-5, name="dloss/dz_b")


def test_sfrik_loss_composition():
    rng = np.random.default_rng(12)
    za, zb = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    b = (2.0, 1.0)
    loss, mse, ma, mb = R.sfrik_loss(za, zb, coefficients=b, sim_weight=3.0, mmd_weight=0.5)
    ha, hb = R.normalize(za), R.normalize(zb)
    assert_close(mse, np.sum((ha - hb) ** 2) / 24, **TIGHT, name="mse")
    assert_close(ma, R.gram_mean(ha, b), **TIGHT, name="mmd_a")
    assert_close(mb, R.gram_mean(hb, b), **TIGHT, name="mmd_b")
    assert_close(loss, 3.0 * mse + 0.25 * (ma + mb), **TIGHT, name="loss")
    # identical views (up to positive row scaling): mse = 0
    _, mse0, _, _ = R.sfrik_loss(za, 3.0 * za, coefficients=b)
    assert_close(mse0, 0.0, rtol=0, atol=1e-15, name="mse(z, 3z)")


def test_zero_row_gradient_matches_the_clamp():
    """Below the clamp, normalize is z / 1e-12: the VJP is g / 1e-12 (what autograd gives)."""
    rng = np.random.default_rng(13)
    z = rng.standard_normal((5, 3))
    z[1] = 0.0
    zh = R.normalize(z)
    g_unit = R.gram_mean_grad(zh, (1.0, 2.0), normalize=False)
    g = R.gram_mean_grad(z, (1.0, 2.0))
    assert np.all(np.isfinite(g))
    assert_close(g[1], g_unit[1] / R.EPS, rtol=1e-14, atol=0, name="zero-row gradient")


def test_bad_input():
    with pytest.raises(ValueError, match="q"):
        R.legendre(1, np.zeros(3), 2)
    with pytest.raises(ValueError, match="coefficients"):
        R.phi(np.zeros(3), 3, ())
    with pytest.raises(ValueError, match="z_b"):
        R.sfrik_loss(np.ones((3, 4)), np.ones((3, 5)))
