"""The NumPy float64 HSIC/CKA reference (reference/metrics.py) against independent definitions.

* the unbiased estimator equals Song et al.'s U-statistic, averaged over every ordered 4-tuple of
  distinct indices (n = 6, 7: brute force);
* biased linear HSIC equals the feature-space identity ||y~^T x~||_F^2 / (n-1)^2;
* the median bandwidth equals numpy.median of the direct squared differences, and past MEDIAN_ROWS the
  evenly spaced rows;
* linear CKA is 1 on (x, x) and unchanged by rotations and isotropic scaling.
"""
import itertools

import numpy as np
import pytest

import reference.metrics as R
from helpers import assert_close

# Two float64 evaluations by different formulas over < 1e4 terms: round-off ~1e-16 per term.
EQ_RTOL, EQ_ATOL = 1e-11, 1e-13


def _ustat(K, L):
    n = K.shape[0]
    tot, cnt = 0.0, 0
    for t, u, v, w in itertools.permutations(range(n), 4):
        tot += K[t, u] * L[t, u] + K[t, u] * L[v, w] - 2.0 * K[t, u] * L[t, v]
        cnt += 1
    return tot / cnt


@pytest.mark.parametrize("n", [6, 7])
@pytest.mark.parametrize("kernel", ["linear", "gaussian", "imq"])
def test_unbiased_is_the_u_statistic(n, kernel):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, 3)), rng.normal(size=(n, 2))
    K, L = R.gram(x, kernel, 1.3), R.gram(y, kernel, 0.8)
    assert_close(R.hsic_unbiased(K, L), _ustat(K, L), rtol=EQ_RTOL, atol=EQ_ATOL)


def test_biased_linear_is_the_feature_identity():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(11, 4)) + 3.0, rng.normal(size=(11, 2))
    xc, yc = x - x.mean(0), y - y.mean(0)
    assert_close(R.hsic(x, y), np.linalg.norm(yc.T @ xc) ** 2 / 10**2, rtol=EQ_RTOL, atol=EQ_ATOL)


def test_median_sigma(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 3))
    d2 = np.array([[((a - b) ** 2).sum() for b in x] for a in x])
    assert_close(R.median_sigma(x), np.sqrt(np.median(d2)), rtol=EQ_RTOL, atol=EQ_ATOL)
    monkeypatch.setattr(R, "MEDIAN_ROWS", 4)
    rows = x[[0, 2, 5, 8]]  # (k * 8) // 3 for k = 0..3
    d2 = np.array([[((a - b) ** 2).sum() for b in rows] for a in rows])
    assert_close(R.median_sigma(x), np.sqrt(np.median(d2)), rtol=EQ_RTOL, atol=EQ_ATOL)


@pytest.mark.parametrize("unbiased", [False, True])
def test_linear_cka_invariances(unbiased):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(12, 3))
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    c = R.cka(x, y, unbiased=unbiased)
    assert_close(R.cka(x, x, unbiased=unbiased), 1.0, rtol=EQ_RTOL, atol=EQ_ATOL)
    assert_close(R.cka(3.7 * x @ q, y, unbiased=unbiased), c, rtol=EQ_RTOL, atol=EQ_ATOL)
