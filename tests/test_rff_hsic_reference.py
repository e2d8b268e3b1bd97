"""The NumPy float64 reference of SSL-HSIC (reference/rff_hsic.py) against its own definitions.

Analytic gradients vs central differences, the RFF estimators vs their pairwise-kernel (Gram) forms,
the streamed identity for ||HKH||^2, the +1/(K-1) diagonal of the exact positive term, and the
kernel-scale objective.  No torch here except what conftest imports.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference.rff_hsic as R
from helpers import assert_close, central_difference

# Central differences with h = 1e-6 on O(1) functions: truncation O(h^2 f''') ~ 1e-12, round-off
# ~ 1e-16 * |f| / h ~ 1e-10; 1e-7 absolute + 1e-6 relative leaves a wide margin over both.
FD_RTOL, FD_ATOL = 1e-6, 1e-7
# Two float64 evaluations of the same quantity by different formulas: round-off ~ 1e-16 times the
# number of accumulated terms (< 1e4 here).
EQ_RTOL, EQ_ATOL = 1e-11, 1e-13


def _imq_map(rng, d, D):
    """A map with the IMQ spectral law (|n| * g, U[0, 2pi) phases), drawn with NumPy."""
    g = rng.standard_normal((D, d))
    n = rng.standard_normal(D)
    return np.abs(n)[:, None] * g, rng.uniform(0.0, 2 * math.pi, D)


def _case(seed, K, B, d, D):
    rng = np.random.default_rng(seed)
    views = rng.standard_normal((K, B, d))
    views /= np.linalg.norm(views, axis=-1, keepdims=True)  # the loss sees L2-normalised rows
    views += 0.3 * rng.standard_normal((K, B, d))  # ... but must not rely on it
    w_a, b_a = _imq_map(rng, d, D)
    w_b, b_b = _imq_map(rng, d, D)
    c = float(rng.uniform(0.5, 2.0))
    return views, w_a, b_a, w_b, b_b, c


def _rows(views):
    """``(N, x)``: the number of rows and the views' rows as one ``(N, d)`` array, view after view."""
    K, B, d = views.shape
    return K * B, views.reshape(K * B, d)


def _within_image_sum(pair, K, B, *, same_view=True):
    """``sum_i sum_{v, w} pair(v B + i, w B + i)`` over images i and views v, w (``v != w`` unless
    ``same_view``): the positive pairs, in the rows of :func:`_rows`."""
    total = 0.0
    for i in range(B):
        for v in range(K):
            for w in range(K):
                if same_view or v != w:
                    total += pair(v * B + i, w * B + i)
    return total


def _imq_gram(shape):
    """The views of :func:`_case` for a drawn ``shape`` (no maps), their scale c and their IMQ Gram."""
    K, B, d, _, seed = shape
    views, *_, c = _case(seed, K, B, d, 1)
    _, x = _rows(views)
    return views, c, R.imq_kernel(x, x, c)


shapes = st.tuples(
    st.integers(2, 4),  # K
    st.integers(2, 5),  # B
    st.integers(1, 5),  # d
    st.integers(1, 24),  # D
    st.integers(0, 2**31 - 1),  # seed
)


# ------------------------------------------------------------------------------------------------
# analytic gradients vs central differences


@pytest.mark.parametrize("K,B,d,D", [(2, 3, 3, 16), (3, 2, 2, 7)])
def test_rff_hsic_grad_matches_central_difference(K, B, d, D):
    views, w_a, b_a, w_b, b_b, c = _case(1, K, B, d, D)
    g_zy, g_zz = 1.7, -2.3  # non-unit upstream gradients of both outputs

    def f(v):
        zy, zz = R.rff_hsic(v, w_a, b_a, w_b, b_b, c)
        return g_zy * zy + g_zz * zz

    analytic = R.rff_hsic_grad(views, w_a, b_a, w_b, b_b, c, g_zy, g_zz)
    assert analytic.shape == views.shape
    assert_close(analytic, central_difference(f, views), rtol=FD_RTOL, atol=FD_ATOL, name="rff grad")


@pytest.mark.parametrize("kernel", R.KERNELS)
@pytest.mark.parametrize("K,B,d", [(2, 3, 3), (3, 2, 4)])
def test_exact_hsic_grad_matches_central_difference(K, B, d, kernel):
    # (Laplace: random views have no tied coordinates within 2h, so f is smooth around them.)
    views, *_, c = _case(2, K, B, d, 1)
    g_zy, g_zz = -0.6, 3.1

    def f(v):
        zy, zz = R.exact_hsic(v, c, kernel)
        return g_zy * zy + g_zz * zz

    analytic = R.exact_hsic_grad(views, c, g_zy, g_zz, kernel)
    assert_close(analytic, central_difference(f, views), rtol=FD_RTOL, atol=FD_ATOL, name=f"exact {kernel} grad")


def test_laplace_subgradient_at_tied_coordinates_is_the_central_difference():
    """|t| at t = 0: the reference takes the subgradient sign(0) = 0.  Moving a tied coordinate by
    +h or -h changes |t| to h either way, so that pair's term cancels exactly in a central
    difference: the central difference IS the sign(0) = 0 gradient (up to the other, smooth terms'
    truncation), which tests the choice.  Ties here: duplicated images, two views sharing a
    coordinate, and one row equal to another in every coordinate."""
    views, *_, c = _case(9, 3, 3, 3, 1)
    views[1, 2] = views[0, 2]  # two views of image 2 coincide (all d coordinates tie)
    views[2, 0, 1] = views[0, 1, 1]  # one tied coordinate across different images
    views[:, 1, 0] = views[0, 0, 0]  # coordinate 0 of image 1 ties with image 0's in every view
    g_zy, g_zz = 1.3, -2.2

    def f(v):
        zy, zz = R.exact_hsic(v, c, "laplace")
        return g_zy * zy + g_zz * zz

    analytic = R.exact_hsic_grad(views, c, g_zy, g_zz, "laplace")
    assert_close(analytic, central_difference(f, views), rtol=FD_RTOL, atol=FD_ATOL, name="laplace grad at ties")
    # the tied coordinates really are kinks: a one-sided difference differs from the central one
    x = views.copy()
    h = 1e-6
    base = f(x)
    x[1, 2, 0] += h
    right = (f(x) - base) / h
    assert abs(right - analytic[1, 2, 0]) > 1e3 * FD_ATOL


@pytest.mark.parametrize("kernel,exact", [("imq", False), ("imq", True), ("gaussian", True), ("laplace", True)])
def test_hsic_loss_grad_matches_central_difference(kernel, exact):
    views, w_a, b_a, w_b, b_b, c = _case(3, 3, 3, 2, 12)
    gamma = 2.5

    def f(v):
        if not exact:
            zy, zz = R.rff_hsic(v, w_a, b_a, w_b, b_b, c)
        else:
            zy, zz = R.exact_hsic(v, c, kernel)
        return R.hsic_loss(zy, zz, gamma=gamma)

    analytic = R.hsic_loss_grad(
        views, c, gamma=gamma, kernel=kernel, exact=exact, w_a=w_a, b_a=b_a, w_b=w_b, b_b=b_b
    )
    assert_close(analytic, central_difference(f, views), rtol=FD_RTOL, atol=FD_ATOL, name="loss grad")


def test_hsic_loss_grad_rejects_unknown_kernel():
    views, *_ = _case(0, 2, 2, 2, 2)
    with pytest.raises(ValueError, match="kernel"):
        R.hsic_loss_grad(views, 1.0, kernel="gauss")
    with pytest.raises(ValueError, match="kernel"):
        R.hsic_loss_grad(views, 1.0, kernel="rff")  # a method name is not a kernel family
    with pytest.raises(TypeError, match="exact"):
        R.hsic_loss_grad(views, 1.0, exact="yes")
    with pytest.raises(ValueError, match="kernel"):
        R.kernel_matrix(views[0], views[0], 1.0, "cauchy")


@pytest.mark.parametrize("kernel", R.KERNELS)
@pytest.mark.parametrize("rho_scale", [0.1, 1.0, 4.0])
def test_scale_objective_grad_matches_central_difference(rho_scale, kernel):
    rng = np.random.default_rng(4)
    rho = rho_scale * rng.uniform(0.0, 4.0, size=(8, 8))
    rho[0, 0] = 0.0  # a zero distance is allowed: log(c^2) is finite
    for c in (0.3, 1.0, 2.7):
        fd = central_difference(lambda cc: R.scale_objective(rho, float(cc[0]), kernel), np.array([c]))
        assert_close(R.scale_objective_grad(rho, c, kernel), fd[0], rtol=FD_RTOL, atol=FD_ATOL,
                     name=f"{kernel} d obj/dc")


def test_scale_objective_definition():
    # IMQ: -log(c/2) + 1.5 mean log(rho + c^2), written out with a loop.
    rho = np.array([[0.0, 1.0], [2.0, 0.5]])
    c = 0.7
    expected = -math.log(c / 2) + 1.5 * sum(math.log(r + c * c) for r in rho.ravel()) / rho.size
    assert_close(R.scale_objective(rho, c), expected, rtol=EQ_RTOL, atol=EQ_ATOL, name="objective")
    # the others as -mean 1/2 log (dk/drho)^2 from the kernels' derivatives, written out
    mean = sum(rho.ravel()) / rho.size
    gauss = -sum(math.log(abs(-math.exp(-r / (2 * c * c)) / (2 * c * c))) for r in rho.ravel()) / rho.size
    lap = -sum(math.log(abs(-math.exp(-r / c) / c)) for r in rho.ravel()) / rho.size
    assert_close(R.scale_objective(rho, c, "gaussian"), gauss, rtol=EQ_RTOL, atol=EQ_ATOL, name="gaussian")
    assert_close(R.scale_objective(rho, c, "laplace"), lap, rtol=EQ_RTOL, atol=EQ_ATOL, name="laplace")
    # and their minimisers (the learned scale's fixed point): c^2 = mean(rho)/2 and c = mean(rho)
    assert abs(R.scale_objective_grad(rho, math.sqrt(mean / 2), "gaussian")) <= 1e-14
    assert abs(R.scale_objective_grad(rho, mean, "laplace")) <= 1e-14


# ------------------------------------------------------------------------------------------------
# the estimators vs their definitions


@settings(deadline=None)
@given(shapes)
def test_rff_hsic_zy_equals_pairwise_feature_kernel_form(shape):
    """HSIC_ZY with k(x, y) = phi_A(x).phi_A(y), summed pair by pair."""
    K, B, d, D, seed = shape
    views, w_a, b_a, w_b, b_b, c = _case(seed, K, B, d, D)
    N, x = _rows(views)
    phi = R.rff_features(x, w_a, b_a, c)
    pos = _within_image_sum(lambda n, m: float(phi[n] @ phi[m]), K, B)
    allpairs = 0.0
    for n in range(N):
        for m in range(N):
            allpairs += float(phi[n] @ phi[m])
    expected = pos / (B * K * (K - 1)) - allpairs / N**2
    zy, _ = R.rff_hsic(views, w_a, b_a, w_b, b_b, c)
    assert_close(zy, expected, rtol=EQ_RTOL, atol=EQ_ATOL, name="HSIC_ZY")


@settings(deadline=None)
@given(shapes)
def test_rff_hsic_zz_equals_trace_form(shape):
    """||Phibar_B^T Phibar_A||^2 / N^2 = tr(K_A H K_B H) / N^2, K_A = Phi_A Phi_A^T."""
    *dims, seed = shape
    views, w_a, b_a, w_b, b_b, c = _case(seed, *dims)
    N, x = _rows(views)
    ka = R.rff_features(x, w_a, b_a, c) @ R.rff_features(x, w_a, b_a, c).T
    kb = R.rff_features(x, w_b, b_b, c) @ R.rff_features(x, w_b, b_b, c).T
    H = np.eye(N) - np.ones((N, N)) / N
    expected = np.trace(ka @ H @ kb @ H) / N**2
    _, zz = R.rff_hsic(views, w_a, b_a, w_b, b_b, c)
    assert_close(zz, expected, rtol=EQ_RTOL, atol=EQ_ATOL, name="HSIC_ZZ")


@settings(deadline=None)
@given(shapes)
def test_exact_hsic_zz_equals_streamed_identity(shape):
    """||HKH||^2 = ||K||^2 - (2/N)||K1||^2 + (1^T K 1)^2 / N^2 (docs/rff_hsic.md), over N^2."""
    views, c, km = _imq_gram(shape)
    N = km.shape[0]
    one = np.ones(N)
    streamed = (np.sum(km * km) - (2.0 / N) * np.sum((km @ one) ** 2) + (one @ km @ one) ** 2 / N**2) / N**2
    _, zz = R.exact_hsic(views, c)
    assert_close(zz, streamed, rtol=1e-9, atol=1e-13, name="HSIC_ZZ")  # streamed form cancels: ~N^2 eps


@settings(deadline=None)
@given(shapes)
def test_exact_positive_term_includes_one_over_k_minus_one(shape):
    """The v = w terms of the positive sum contribute exactly 1/(K-1) (k(x, x) = 1)."""
    K, B = shape[:2]
    views, c, km = _imq_gram(shape)
    N = km.shape[0]
    off = _within_image_sum(lambda n, m: km[n, m], K, B, same_view=False)  # two different views only
    zy_off = off / (B * K * (K - 1)) - km.sum() / N**2
    zy, _ = R.exact_hsic(views, c)
    assert_close(zy - zy_off, 1.0 / (K - 1), rtol=EQ_RTOL, atol=EQ_ATOL, name="diagonal part")


def test_imq_kernel_definition():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    c = 1.3
    km = R.imq_kernel(x, y, c)
    assert km.shape == (4, 5)
    for n in range(4):
        for m in range(5):
            expected = c / math.sqrt(sum((x[n, k] - y[m, k]) ** 2 for k in range(3)) + c * c)
            assert_close(km[n, m], expected, rtol=EQ_RTOL, atol=EQ_ATOL, name="k(x, y)")
    assert_close(np.diag(R.imq_kernel(x, x, c)), np.ones(4), rtol=0, atol=1e-15, name="k(x, x) = 1")


def test_gaussian_and_laplace_kernel_definitions():
    rng = np.random.default_rng(15)
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    c = 0.9
    kg, kl = R.gaussian_kernel(x, y, c), R.laplace_kernel(x, y, c)
    assert kg.shape == kl.shape == (4, 5)
    for n in range(4):
        for m in range(5):
            sq = sum((x[n, k] - y[m, k]) ** 2 for k in range(3))
            l1 = sum(abs(x[n, k] - y[m, k]) for k in range(3))
            assert_close(kg[n, m], math.exp(-sq / (2 * c * c)), rtol=EQ_RTOL, atol=EQ_ATOL, name="gaussian k")
            assert_close(kl[n, m], math.exp(-l1 / c), rtol=EQ_RTOL, atol=EQ_ATOL, name="laplace k")
    for kernel in R.KERNELS:
        assert np.array_equal(np.diag(R.kernel_matrix(x, x, c, kernel)), np.ones(4)), kernel  # k(x, x) = 1
    assert np.array_equal(R.kernel_matrix(x, y, c, "imq"), R.imq_kernel(x, y, c))


def test_rff_features_definition():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 2))
    w, b = _imq_map(rng, 2, 5)
    c = 0.8
    phi = R.rff_features(x, w, b, c)
    assert phi.shape == (3, 5)
    for n in range(3):
        for j in range(5):
            expected = math.sqrt(2 / 5) * math.cos(w[j] @ (x[n] / c) + b[j])
            assert_close(phi[n, j], expected, rtol=EQ_RTOL, atol=EQ_ATOL, name="phi")


def test_collapsed_batch_closed_forms():
    """All embeddings equal: HSIC_ZZ = 0 and exact HSIC_ZY = K/(K-1) - 1 = 1/(K-1)."""
    K, B, d = 3, 4, 2
    views = np.broadcast_to(np.array([0.3, -0.2]), (K, B, d)).copy()
    zy, zz = R.exact_hsic(views, 1.0)
    assert_close(zy, 1.0 / (K - 1), rtol=EQ_RTOL, atol=EQ_ATOL, name="HSIC_ZY")
    assert abs(zz) <= 1e-28  # HKH = 0 exactly up to the round-off of a mean of ones
    _, w_a, b_a, w_b, b_b, c = _case(7, K, B, d, 16)
    _, zz_rff = R.rff_hsic(views, w_a, b_a, w_b, b_b, c)
    assert abs(zz_rff) <= 1e-28
    g = R.hsic_loss_grad(views, c, w_a=w_a, b_a=b_a, w_b=w_b, b_b=b_b)
    assert np.all(np.isfinite(g))
    for kernel in R.KERNELS:  # every exact kernel: k(x, x) = 1 gives the same closed form
        zy, zz = R.exact_hsic(views, 1.0, kernel)
        assert_close(zy, 1.0 / (K - 1), rtol=EQ_RTOL, atol=EQ_ATOL, name=f"{kernel} HSIC_ZY")
        assert abs(zz) <= 1e-28
        # dk/dx = 0 at x = y for all three (Laplace by the sign(0) = 0 subgradient): zero gradient
        assert np.array_equal(R.exact_hsic_grad(views, 1.0, 1.7, -0.4, kernel), np.zeros_like(views)), kernel


def test_sqrt_guard_bounds():
    """sqrt_guard(x) - sqrt(x) = eps / (sqrt(x + eps) + sqrt(x)) in (0, sqrt(eps)] = (0, 1e-6]."""
    assert R.SQRT_EPS == 1e-12
    assert_close(R.sqrt_guard(0.0), 1e-6, rtol=1e-12, atol=0, name="guard at 0")
    assert_close(R.sqrt_guard(-1e-9), 1e-6, rtol=1e-12, atol=0, name="negative round-off clamps")
    for x in (1e-14, 1e-12, 1e-8, 1e-3, 1.0, 50.0):
        shift = R.sqrt_guard(x) - math.sqrt(x)
        assert 0 < shift <= 1e-6
        # the subtraction of two floats ~sqrt(x) is exact to ~2 ulp(sqrt(x)) ~ 4.4e-16 sqrt(x) absolute
        assert_close(shift, R.SQRT_EPS / (math.sqrt(x + R.SQRT_EPS) + math.sqrt(x)), rtol=1e-9,
                     atol=1e-15 * max(1.0, math.sqrt(x)), name="shift")
    assert_close(R.sqrt_guard_grad(1e-300), 5e5, rtol=1e-12, atol=0, name="max slope 1/(2e-6) at 0+")
    assert R.sqrt_guard_grad(0.0) == 0.0 and R.sqrt_guard_grad(-1.0) == 0.0  # relu convention
    for x in (1e-3, 0.5, 3.0):
        fd = central_difference(lambda a: R.sqrt_guard(a[0]), np.array([x]))[0]
        assert_close(R.sqrt_guard_grad(x), fd, rtol=1e-6, atol=1e-8, name="guard slope")


def test_hsic_loss_definition():
    assert_close(R.hsic_loss(0.4, 0.09, gamma=3.0), 3.0 * math.sqrt(0.09 + 1e-12) - 0.4,
                 rtol=EQ_RTOL, atol=EQ_ATOL, name="loss")
