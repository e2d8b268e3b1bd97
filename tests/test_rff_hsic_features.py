"""Random Fourier features (kernelssl/ops/rff_hsic.py): the exact IMQ sampler, the Gaussian and Laplace
samplers (docs/rff_hsic.md), the dispatcher, and the feature map.

Statistical tests use fixed seeds (so they are deterministic) and assert bounds that a correct
sampler violates with probability <= delta = 1e-6 (union-bounded over every tested quantity), except
where a CLT sigma bound is stated.
"""
import math

import numpy as np
import pytest
import torch
from scipy import special
from scipy.integrate import cumulative_trapezoid

import kernelssl.functional as KF
import reference.rff_hsic as R
from helpers import assert_close
from kernelssl.ops.rff_hsic import (
    KERNELS,
    rff_features,
    sample_gaussian_rff,
    sample_imq_rff,
    sample_laplace_rff,
    sample_rff,
)

DELTA = 1e-6


def _gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# sampler: reproducibility, draw order, shapes, dtypes, devices, phases


def test_sampler_reproducible_and_seed_dependent():
    w1, b1 = sample_imq_rff(5, 64, generator=_gen(3))
    w2, b2 = sample_imq_rff(5, 64, generator=_gen(3))
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    w3, b3 = sample_imq_rff(5, 64, generator=_gen(4))
    assert not torch.equal(w1, w3) and not torch.equal(b1, b3)
    # two draws from one generator are independent maps (A and B of a step)
    g = _gen(3)
    wa, ba = sample_imq_rff(5, 64, generator=g)
    wb, bb = sample_imq_rff(5, 64, generator=g)
    assert torch.equal(wa, w1) and not torch.equal(wa, wb) and not torch.equal(ba, bb)


def test_sampler_default_generator_follows_manual_seed():
    torch.manual_seed(11)
    w1, b1 = sample_imq_rff(3, 16)
    torch.manual_seed(11)
    w2, b2 = sample_imq_rff(3, 16)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)


def test_sampler_documented_draw_order():
    """g = randn(D, dim), n = randn(D), b = rand(D) * 2pi, all float64 from the one generator."""
    D, dim = 33, 7
    g = _gen(5)
    gg = torch.randn(D, dim, generator=g, dtype=torch.float64)
    n = torch.randn(D, generator=g, dtype=torch.float64)
    b = torch.rand(D, generator=g, dtype=torch.float64) * (2 * math.pi)
    w, bb = sample_imq_rff(dim, D, generator=_gen(5), dtype=torch.float64)
    assert torch.equal(w, n.abs()[:, None] * gg)
    assert torch.equal(bb, b)
    # lower precisions are casts of the same float64 draw
    w32, b32 = sample_imq_rff(dim, D, generator=_gen(5), dtype=torch.float32)
    assert torch.equal(w32, w.float())
    assert torch.equal(b32, torch.remainder(b.float(), 2 * math.pi))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_sampler_shapes_dtypes_and_phase_range(dtype):
    w, b = sample_imq_rff(9, 4099, generator=_gen(0), dtype=dtype)
    assert w.shape == (4099, 9) and b.shape == (4099,)
    assert w.dtype == dtype and b.dtype == dtype
    assert w.device.type == "cpu" and b.device.type == "cpu"
    b64 = b.double()
    assert bool((b64 >= 0).all()) and bool((b64 < 2 * math.pi).all())


def test_sampler_device_argument():
    w, b = sample_imq_rff(4, 8, generator=_gen(0), device="meta")
    assert w.device.type == "meta" and b.device.type == "meta"
    assert w.shape == (8, 4) and b.shape == (8,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")
@pytest.mark.parametrize("kernel", KERNELS)
def test_sampler_same_features_on_every_device(kernel):  # pragma: no cover - GPU only
    w_cpu, b_cpu = sample_rff(kernel, 6, 128, generator=_gen(9), dtype=torch.float64)
    w_gpu, b_gpu = sample_rff(kernel, 6, 128, generator=_gen(9), device="cuda", dtype=torch.float64)
    assert w_gpu.device.type == "cuda"
    assert torch.equal(w_gpu.cpu(), w_cpu) and torch.equal(b_gpu.cpu(), b_cpu)
    # a CUDA generator draws on CUDA and can be moved to the CPU
    w, b = sample_rff(kernel, 6, 128, generator=_gen(9, "cuda"), device="cpu")
    assert w.device.type == "cpu"


def _check_rejects_bad_arguments(sampler):
    with pytest.raises(ValueError, match="num_features"):
        sampler(3, 0)
    with pytest.raises(TypeError, match="dim"):
        sampler(3.0, 4)
    with pytest.raises(TypeError, match="dtype"):
        sampler(3, 4, dtype=torch.int64)
    with pytest.raises(TypeError, match="generator"):
        sampler(3, 4, generator=0)


def test_sampler_rejects_bad_arguments():
    _check_rejects_bad_arguments(sample_imq_rff)


def test_gaussian_and_laplace_documented_draw_order():
    """Gaussian: w = randn(D, dim), b = rand(D) 2pi.  Laplace: u = rand(D, dim), b = rand(D) 2pi,
    w = tan(pi (u - 1/2)).  Float64 from the one generator; lower precisions are casts."""
    D, dim = 33, 7
    g = _gen(6)
    w = torch.randn(D, dim, generator=g, dtype=torch.float64)
    b = torch.rand(D, generator=g, dtype=torch.float64) * (2 * math.pi)
    wg, bg = sample_gaussian_rff(dim, D, generator=_gen(6), dtype=torch.float64)
    assert torch.equal(wg, w) and torch.equal(bg, b)
    g = _gen(6)
    u = torch.rand(D, dim, generator=g, dtype=torch.float64)
    b = torch.rand(D, generator=g, dtype=torch.float64) * (2 * math.pi)
    wl, bl = sample_laplace_rff(dim, D, generator=_gen(6), dtype=torch.float64)
    assert torch.equal(wl, torch.tan(math.pi * (u - 0.5))) and torch.equal(bl, b)
    for fn, w64, b64 in ((sample_gaussian_rff, wg, bg), (sample_laplace_rff, wl, bl)):
        w32, b32 = fn(dim, D, generator=_gen(6), dtype=torch.float32)
        assert torch.equal(w32, w64.float()) and torch.equal(b32, torch.remainder(b64.float(), 2 * math.pi))


def test_dispatcher_is_each_sampler_draw_for_draw():
    # the default (IMQ) stream is unchanged by the dispatcher: same numbers, same generator state after
    for kernel, fn in (("imq", sample_imq_rff), ("gaussian", sample_gaussian_rff), ("laplace", sample_laplace_rff)):
        g1, g2 = _gen(8), _gen(8)
        for _ in range(2):
            w1, b1 = sample_rff(kernel, 5, 19, generator=g1)
            w2, b2 = fn(5, 19, generator=g2)
            assert torch.equal(w1, w2) and torch.equal(b1, b2), kernel
        assert torch.equal(g1.get_state(), g2.get_state())
    assert KERNELS == ("imq", "gaussian", "laplace")


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_sampler_shapes_dtypes_devices(kernel):
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        w, b = sample_rff(kernel, 9, 4099, generator=_gen(0), dtype=dtype)
        assert w.shape == (4099, 9) and b.shape == (4099,) and w.dtype == b.dtype == dtype
        b64 = b.double()
        assert bool((b64 >= 0).all()) and bool((b64 < 2 * math.pi).all())
        assert bool(torch.isfinite(w).all())
    g = _gen(0)
    state = g.get_state()
    w, b = sample_rff(kernel, 4, 8, generator=g, device="meta")
    assert w.device.type == "meta" and w.shape == (8, 4) and b.shape == (8,)
    assert torch.equal(g.get_state(), state)  # nothing drawn for meta


def test_sample_rff_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"kernel: expected one of 'imq', 'gaussian', 'laplace', got 'rff'"):
        sample_rff("rff", 3, 4)
    with pytest.raises(TypeError, match=r"kernel: expected a str, one of 'imq', 'gaussian', 'laplace', got int 3"):
        sample_rff(3, 3, 4)
    for fn in (sample_gaussian_rff, sample_laplace_rff):
        _check_rejects_bad_arguments(fn)


# ------------------------------------------------------------------------------------------------
# sampler: the spectral law


def test_mean_squared_norm_and_second_moment():
    """w = |n| g: E||w||^2 = dim E[n^2] = dim and E[w w^T] = I.

    ||w||^2 = n^2 ||g||^2: Var = E[n^4] E[||g||^4] - dim^2 = 3 (dim^2 + 2 dim) - dim^2 = 2 dim^2 + 6 dim.
    Entries of w w^T: Var(n^2 g_a^2) = 3*3 - 1 = 8 (diagonal), Var(n^2 g_a g_b) = 3 (off-diagonal).
    The sample means over D draws are asserted within 6 standard errors (CLT; the seed is fixed).
    """
    D, dim = 16384, 4
    w, _ = sample_imq_rff(dim, D, generator=_gen(1), dtype=torch.float64)
    sq = w.square().sum(1).mean().item()
    assert abs(sq - dim) <= 6 * math.sqrt((2 * dim * dim + 6 * dim) / D)
    second = (w.t() @ w / D).numpy()
    se = np.where(np.eye(dim, dtype=bool), math.sqrt(8 / D), math.sqrt(3 / D))
    assert np.all(np.abs(second - np.eye(dim)) <= 6 * se)


@pytest.mark.parametrize("dim", [2, 3, 7])
def test_radial_law_matches_bessel_density(dim):
    """||W_j|| has density proportional to r^nu K_nu(r), nu = (dim-1)/2 (docs/rff_hsic.md).

    Dvoretzky-Kiefer-Wolfowitz: P(sup_r |F_D(r) - F(r)| > eps) <= 2 exp(-2 D eps^2), so with
    eps = sqrt(ln(2 / delta') / (2D)) (delta' = delta/3 for the three dims) the KS statistic is below eps.
    The CDF is integrated numerically (trapezoid on a fine grid: error << eps); at dim = 2 the law is
    closed-form, r^(1/2) K_(1/2)(r) = sqrt(pi/2) e^-r, i.e. ||W|| ~ Exp(1), checked too.
    """
    D = 16384
    w, _ = sample_imq_rff(dim, D, generator=_gen(100 + dim), dtype=torch.float64)
    r = np.sort(w.norm(dim=1).numpy())
    nu = (dim - 1) / 2
    grid = np.linspace(0.0, 80.0, 400001)
    dens = np.empty_like(grid)
    dens[1:] = grid[1:] ** nu * special.kv(nu, grid[1:])
    dens[0] = 2 ** (nu - 1) * special.gamma(nu)  # the limit r -> 0 for nu > 0
    cdf = cumulative_trapezoid(dens, grid, initial=0.0)
    cdf /= cdf[-1]
    F = np.interp(r, grid, cdf)
    if dim == 2:
        assert_close(F, 1.0 - np.exp(-r), rtol=0, atol=1e-6, name="numerical CDF vs Exp(1)")
    i = np.arange(1, D + 1)
    ks = max(np.max(i / D - F), np.max(F - (i - 1) / D))
    eps = math.sqrt(math.log(2 / (DELTA / 3)) / (2 * D))
    assert ks <= eps, f"KS statistic {ks} > DKW bound {eps}"


@pytest.mark.parametrize("kernel", ["gaussian", "laplace"])
def test_gaussian_and_laplace_entries_follow_their_laws(kernel):
    """W's entries are iid N(0, 1) (Gaussian) or standard Cauchy (Laplace): the KS statistic of all
    D*dim entries against the CDF (Phi, or 1/2 + arctan(w)/pi) is within the DKW bound at
    delta (one test per kernel).  Entries of one row are independent by construction (one iid draw)."""
    D, dim = 4096, 4
    w, _ = sample_rff(kernel, dim, D, generator=_gen(200), dtype=torch.float64)
    x = np.sort(w.numpy().ravel())
    F = special.ndtr(x) if kernel == "gaussian" else 0.5 + np.arctan(x) / math.pi
    n = x.size
    i = np.arange(1, n + 1)
    ks = max(np.max(i / n - F), np.max(F - (i - 1) / n))
    eps = math.sqrt(math.log(2 / DELTA) / (2 * n))
    assert ks <= eps, f"{kernel}: KS statistic {ks} > DKW bound {eps}"


def _bernstein_t(D, n_tests):
    """Deviation t with P(|mean of D iid X - E X| > t) <= DELTA / n_tests for X = 2 cos(u) cos(v).

    X in [-2, 2] and E X = k in (0, 1], so |X - E X| <= M = 3.  With a uniform phase,
    E[X^2] = E[(1 + cos 2u)(1 + cos 2v)] = 1 + k(2(x - y)) / 2 <= 3/2 = sigma^2 bound.
    Bernstein: P(|err| > t) <= 2 exp(-D t^2 / (2 sigma^2 + 2 M t / 3)); solve for t.  This is tighter
    than Hoeffding's t = sqrt(8 ln(2/delta') / D) (range 4), which it implies.
    """
    L = math.log(2 * n_tests / DELTA)
    sigma2, M = 1.5, 3.0
    a = 2 * M * L / 3
    t = (a + math.sqrt(a * a + 8 * D * sigma2 * L)) / (2 * D)
    assert t <= math.sqrt(8 * L / D)  # Bernstein beats Hoeffding here
    return t


@pytest.mark.parametrize("kernel", KERNELS)
def test_feature_gram_converges_to_kernel(kernel):
    """phi(X) phi(Y)^T -> k_c(X, Y) at D = 4096 and 16384, for several kernel scales (x / c), for each
    family's sampler against its exact kernel.  The Bernstein bound of :func:`_bernstein_t` uses only
    a uniform phase and 0 <= k <= 1 (E[X^2] = 1 + k(2 delta)/2 <= 3/2, |X - E X| <= 3), which holds
    for all three kernels."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 5)) * 0.7
    Y = rng.standard_normal((6, 5)) * 0.7
    scales, Ds = (1.0, 0.5, 2.5), (4096, 16384)
    n_tests = X.shape[0] * Y.shape[0] * len(scales) * len(Ds)  # union bound over every entry
    xt, yt = torch.from_numpy(X), torch.from_numpy(Y)
    errs = {}
    for D in Ds:
        t = _bernstein_t(D, n_tests)
        for k, c in enumerate(scales):
            w, b = sample_rff(kernel, 5, D, generator=_gen(1000 * D + k), dtype=torch.float64)
            gram = (rff_features(xt, w, b, c) @ rff_features(yt, w, b, c).t()).numpy()
            err = np.abs(gram - R.kernel_matrix(X, Y, c, kernel)).max()
            assert err <= t, f"D={D}, c={c}: max |error| {err} > bound {t}"
            errs[D, c] = err
    # sanity of the bound's scale: the error at 16384 is not larger than the bound at 4096 / 2
    assert max(errs[16384, c] for c in scales) <= _bernstein_t(4096, n_tests) / 2


# ------------------------------------------------------------------------------------------------
# the feature map


def test_rff_features_matches_reference_and_batches():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 5))
    w, b = sample_imq_rff(5, 37, generator=_gen(2), dtype=torch.float64)
    c = 0.7
    phi = rff_features(torch.from_numpy(x), w, b, c)
    assert phi.shape == (2, 3, 37) and phi.dtype == torch.float64
    expected = R.rff_features(x.reshape(6, 5), w.numpy(), b.numpy(), c).reshape(2, 3, 37)
    # same formula, float64: differences come from the order of the d = 5 products only
    assert_close(phi, expected, rtol=1e-12, atol=1e-14, name="phi")
    phi_t = rff_features(torch.from_numpy(x), w, b, torch.tensor(c, dtype=torch.float32))
    # c as a float32 tensor is cast to float64 first: float32(0.7) differs from 0.7 by ~1e-8 relative,
    # moving cos by <= |u| * 3e-8 with |u| <= ~ 30 here
    assert_close(phi_t, expected, rtol=0, atol=1e-6 * math.sqrt(2 / 37), name="phi (tensor c)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rff_features_low_precision_computes_in_float32(dtype):
    x = torch.randn(4, 3, generator=_gen(0)).to(dtype).requires_grad_()
    w, b = sample_imq_rff(3, 16, generator=_gen(1))
    phi = rff_features(x, w, b, 1.0)
    assert phi.dtype == torch.float32
    assert torch.equal(phi, rff_features(x.detach().float(), w, b, 1.0))  # exactly an entry upcast
    (g,) = torch.autograd.grad(phi.sum() * 2.5, x)
    assert g.dtype == dtype


def test_rff_features_gradcheck():
    x = torch.randn(3, 4, dtype=torch.float64, generator=_gen(0), requires_grad=True)
    w, b = sample_imq_rff(4, 6, generator=_gen(1), dtype=torch.float64)
    c = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, c: rff_features(x, w, b, c),
        (x, w.requires_grad_(), b.requires_grad_(), c),
    )


def test_rff_features_rejects_bad_input():
    """The functional API checks the inputs (once) before calling the torch tier."""
    w, b = sample_imq_rff(4, 6, generator=_gen(1))
    with pytest.raises(ValueError, match="w"):
        KF.rff_features(torch.randn(3, 5), w, b, 1.0)
    with pytest.raises(ValueError, match="b"):
        KF.rff_features(torch.randn(3, 4), w, b[:5], 1.0)
    with pytest.raises(TypeError, match="x"):
        KF.rff_features(torch.ones(3, 4, dtype=torch.int64), w, b, 1.0)
    with pytest.raises(ValueError, match="device"):
        KF.rff_features(torch.randn(3, 4, device="meta"), w, b, 1.0)
