"""The NumPy uniformity reference (reference/gaussian_gram.py) against Wang & Isola's definitions written
out directly, closed forms, the SFRIK reference and central differences.  No torch here.

Tolerances: the reference and the direct pairwise formulas are two float64 evaluations of the same
O(1)-to-O(t) quantities over at most a few hundred terms: they agree to a few ulps (rtol 1e-12).
Central differences with h = 1e-6 have truncation error O(h^2 |f'''|) ~ 1e-12 and rounding error
O(eps |f| / h) ~ 1e-10 at these scales: rtol/atol 1e-7 leaves two orders of margin.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from helpers import assert_close, central_difference
from reference import gaussian_gram as R
from reference import legendre_gram as RS

TIGHT = dict(rtol=1e-12, atol=1e-12)
FD = dict(rtol=1e-7, atol=1e-7)
SHAPES = [(2, 2), (2, 5), (3, 2), (7, 3), (12, 8)]


def _z(n: int, q: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, q)) * scale


def _direct_uniformity(z: np.ndarray, t: float) -> float:
    """Wang & Isola's ``pdist(x).pow(2).mul(-t).exp().mean().log()`` with every step spelled out."""
    x = z / np.linalg.norm(z, axis=1, keepdims=True)
    d2 = [np.sum((x[i] - x[j]) ** 2) for i in range(len(x)) for j in range(i + 1, len(x))]
    return float(np.log(np.mean(np.exp(-t * np.array(d2)))))


@pytest.mark.parametrize("n,q", SHAPES)
@pytest.mark.parametrize("t", [0.5, 2.0, 7.0])
def test_logmean_is_wang_isola_uniformity(n, q, t):
    z = _z(n, q, seed=n * 10 + q)
    want = _direct_uniformity(z, t)
    assert_close(R.gaussian_gram_logmean(z, t), want, **TIGHT, name="log mean, diagonal excluded")
    assert_close(R.uniformity_wang_isola(R.normalize(z), t), want, **TIGHT, name="uniformity_wang_isola")


def test_n2_closed_form():
    # Two unit vectors at angle theta: ||x - y||^2 = 2 - 2 cos(theta), L_unif = -t (2 - 2 cos(theta)).
    theta, t = 0.7, 2.0
    z = np.array([[1.0, 0.0], [math.cos(theta), math.sin(theta)]])
    assert_close(R.gaussian_gram_logmean(z, t), -t * (2.0 - 2.0 * math.cos(theta)), **TIGHT, name="n = 2")
    # with the diagonal: log((2 + 2 exp(-t d^2)) / 4)
    d2 = 2.0 - 2.0 * math.cos(theta)
    assert_close(R.gaussian_gram_logmean(z, t, exclude_diagonal=False), math.log((2 + 2 * math.exp(-t * d2)) / 4),
                 **TIGHT, name="n = 2 with the diagonal")


@pytest.mark.parametrize("n,q", SHAPES)
def test_diagonal_identity(n, q):
    # docs/gaussian_gram.md: L_unif = log((n^2 gram_mean - n) / (n (n - 1))) -- the diagonal terms are phi_t(1) = 1.
    z, t = _z(n, q, seed=3), 1.5
    g = R.gram_mean(R.normalize(z), R.gaussian_phi(t))
    assert_close(R.gaussian_gram_logmean(z, t), math.log((n * n * g - n) / (n * (n - 1))), **TIGHT, name="identity")
    assert_close(R.gaussian_gram_logmean(z, t, exclude_diagonal=False), math.log(g), **TIGHT, name="with diagonal")


def test_large_t_does_not_underflow():
    # exp(-t d^2) underflows to 0 in float64 for t d^2 > ~745; the factored maximum keeps the log.
    z, t = _z(6, 3, seed=4), 1e5
    x = R.normalize(z)
    d2 = np.array([np.sum((x[i] - x[j]) ** 2) for i in range(6) for j in range(i + 1, 6)])
    assert np.all(np.exp(-t * d2) == 0.0)
    m = -t * d2.min()
    want = m + math.log(np.sum(np.exp(-t * d2 - m)) / d2.size)
    got = R.gaussian_gram_logmean(z, t)
    assert math.isfinite(got)
    assert_close(got, want, rtol=1e-12, atol=0.0, name="t = 1e5")


@pytest.mark.parametrize("q", [2, 3, 8])
def test_legendre_member_is_sfrik_gram_mean(q):
    z, b = R.normalize(_z(9, q, seed=q)), (1.0, 40.0, 40.0)
    assert_close(R.gram_mean(z, R.legendre_phi(q, b)), RS.gram_mean(z, b), **TIGHT, name="legendre member")
    assert_close(R.gram_mean_grad(_z(9, q, seed=q), R.legendre_phi(q, b)), RS.gram_mean_grad(_z(9, q, seed=q), b),
                 **TIGHT, name="legendre member gradient")


@pytest.mark.parametrize("n,q", SHAPES)
@pytest.mark.parametrize("exclude_diagonal", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_logmean_gradient_vs_finite_differences(n, q, exclude_diagonal, normalize):
    z, t = _z(n, q, seed=5, scale=1.3), 2.0
    if not normalize:
        z = R.normalize(z)  # unit rows, used as given
    kw = dict(normalize=normalize, exclude_diagonal=exclude_diagonal)
    fd = central_difference(lambda x: R.gaussian_gram_logmean(x, t, **kw), z)
    assert_close(R.gaussian_gram_logmean_grad(z, t, **kw), fd, **FD, name="dL/dz")


@pytest.mark.parametrize("n,q", SHAPES)
def test_gram_mean_gaussian_gradient_vs_finite_differences(n, q):
    z, phi = _z(n, q, seed=6), R.gaussian_phi(0.8)
    fd = central_difference(lambda x: R.gram_mean(R.normalize(x), phi), z)
    assert_close(R.gram_mean_grad(z, phi), fd, **FD, name="d gram_mean / dz")


@pytest.mark.parametrize("n,q", SHAPES)
def test_wang_isola_gradients_vs_finite_differences(n, q):
    x, y, t = _z(n, q, seed=7), _z(n, q, seed=8), 2.0
    fd = central_difference(lambda v: R.uniformity_wang_isola(v, t), x)
    assert_close(R.uniformity_wang_isola_grad(x, t), fd, **FD, name="d L_unif / dx")
    for alpha in (1.0, 2.0, 3.0):
        gx, gy = R.alignment_wang_isola_grad(x, y, alpha)
        assert_close(gx, central_difference(lambda v: R.alignment_wang_isola(v, y, alpha), x), **FD,
                     name="d L_align / dx")
        assert_close(gy, central_difference(lambda v: R.alignment_wang_isola(x, v, alpha), y), **FD,
                     name="d L_align / dy")


@pytest.mark.parametrize("n,q", SHAPES)
def test_loss_gradient_and_the_gram_form_agree(n, q):
    za, zb = _z(n, q, seed=9), _z(n, q, seed=10)
    kw = dict(alpha=2.0, t=2.0, uniformity_weight=0.7)
    ga, gb = R.align_uniform_loss_grad(za, zb, **kw)
    assert_close(ga, central_difference(lambda v: R.align_uniform_loss(v, zb, **kw), za), **FD, name="dL/dz_a")
    assert_close(gb, central_difference(lambda v: R.align_uniform_loss(za, v, **kw), zb), **FD, name="dL/dz_b")
    # the Gram form's gradient of L_unif equals the pairwise form's, through the normalisation
    g_pairs = RS._normalize_vjp(za, R.uniformity_wang_isola_grad(R.normalize(za), 2.0))
    assert_close(R.gaussian_gram_logmean_grad(za, 2.0), g_pairs, **TIGHT, name="Gram vs pairwise gradient")


def test_alignment_closed_form():
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    y = np.array([[0.0, 1.0], [0.0, 1.0]])
    # ||d_0|| = sqrt(2), ||d_1|| = 0
    assert_close(R.alignment_wang_isola(x, y, 2.0), 1.0, **TIGHT, name="alpha = 2")
    assert_close(R.alignment_wang_isola(x, y, 1.0), math.sqrt(2.0) / 2, **TIGHT, name="alpha = 1")


def test_bad_input():
    with pytest.raises(ValueError, match="n >= 2"):
        R.gaussian_gram_logmean(np.ones((1, 3)))
    with pytest.raises(ValueError, match="t: expected"):
        R.gaussian_gram_logmean(_z(3, 2), 0.0)
    with pytest.raises(ValueError, match="t: expected"):
        R.gaussian_phi(-1.0)
