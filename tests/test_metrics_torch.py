"""kernelssl.metrics (torch tier) against the NumPy float64 reference (reference/metrics.py).

Values: every kernel x estimator x bandwidth form, float64 (tight) and float32 (METRICS_TOL in
kernelssl/numerics.py), odd n, n = 4, d = 1; the streamed exact kernels with several (and ragged) tiles
equal one tile; the median past MEDIAN_ROWS follows the stated evenly-spaced rule; random features
converge to the exact kernel within RFF_CKA_MC_CONST / sqrt(D).  Properties (hypothesis): symmetry,
cka(x, x) = 1, linear CKA invariant to isotropic scaling.  Degenerate input: constant -> CKA NaN, HSIC 0;
n < 4 unbiased -> ValueError naming x.  MinibatchCKA against the reference, and (slow tier) on 2 gloo
ranks against one process.  ckatorch, when installed, gives the same values.  Slow tier: the peak
memory of exact Gaussian CKA at n = 8000 stays below half of one n x n float64 Gram.
"""
from __future__ import annotations

import datetime
import math
import os
import socket

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kernelssl.metrics.similarity as H
import kernelssl.ops.gram_hsic as _gram
import reference.metrics as R
from helpers import assert_close
from kernelssl.metrics import MinibatchCKA, cka, hsic
from kernelssl.numerics import METRICS_TOL, RFF_CKA_MC_CONST

F64 = torch.float64
SIGMAS = {"linear": [None], "gaussian": [None, 1.7, (0.9, 2.2)], "imq": ["median", (1.1, 0.6)]}
CASES = [(k, s) for k, ss in SIGMAS.items() for s in ss]


def _data(n, dx, dy, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dx)) + 2.0
    y = np.tanh(x[:, :1] @ rng.normal(size=(1, dy))) + 0.5 * rng.normal(size=(n, dy))
    return x, y


def _check(got, x, y, kernel, sigma, unbiased, dtype):
    tol = METRICS_TOL[dtype]
    ref_c = R.cka(x, y, kernel, sigma, unbiased)
    assert_close(float(got[0]), ref_c, name="cka", **tol)
    scale = math.sqrt(abs(R.hsic(x, x, kernel, _first(sigma), unbiased)
                          * R.hsic(y, y, kernel, _second(sigma), unbiased)))
    ref_h = R.hsic(x, y, kernel, sigma, unbiased)
    assert abs(float(got[1]) - ref_h) <= tol["rtol"] * abs(ref_h) + tol["atol"] * scale + 1e-300, (float(got[1]), ref_h)


def _first(s):
    return s[0] if isinstance(s, tuple) else s


def _second(s):
    return s[1] if isinstance(s, tuple) else s


# float32 only where the estimate is well conditioned: at n = 4 the unbiased HSIC of near-1 kernel values is
# a difference of O(1) terms leaving ~1e-4, so rounding K alone to fp32 moves it by ~1e-4 relative.
SHAPES = [(n, dx, dy, dt) for n, dx, dy in [(4, 1, 2), (37, 5, 3), (120, 1, 1)]
          for dt in ([F64] if n == 4 else [F64, torch.float32])]


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("kernel,sigma", CASES)
@pytest.mark.parametrize("n,dx,dy,dtype", SHAPES)
def test_against_reference(n, dx, dy, kernel, sigma, unbiased, dtype):
    x, y = _data(n, dx, dy)
    tx, ty = torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)
    got = (cka(tx, ty, kernel=kernel, sigma=sigma, unbiased=unbiased),
           hsic(tx, ty, kernel=kernel, sigma=sigma, unbiased=unbiased))
    assert got[0].dtype == dtype and got[1].dtype == dtype
    # the reference sees the same (rounded) numbers
    _check(got, tx.double().numpy(), ty.double().numpy(), kernel, sigma, unbiased, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype):
    x, y = _data(50, 3, 2)
    tx, ty = torch.tensor(x).to(dtype), torch.tensor(y).to(dtype)
    got = cka(tx, ty, kernel="gaussian")
    assert got.dtype == torch.float32
    assert_close(float(got), R.cka(tx.double().numpy(), ty.double().numpy(), "gaussian"), **METRICS_TOL[torch.float32])


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("kernel", ["gaussian", "imq"])
def test_streamed_tiles_equal_one_tile(monkeypatch, kernel, unbiased):
    x, y = _data(45, 3, 2, seed=3)
    tx, ty = torch.tensor(x), torch.tensor(y)
    one = (cka(tx, ty, kernel=kernel, sigma=1.3, unbiased=unbiased), hsic(tx, ty, kernel=kernel, unbiased=unbiased))
    monkeypatch.setattr(_gram, "TILE", 8)  # 6 row blocks, the last one ragged (5 rows)
    many = (cka(tx, ty, kernel=kernel, sigma=1.3, unbiased=unbiased), hsic(tx, ty, kernel=kernel, unbiased=unbiased))
    for a, b in zip(one, many):
        assert_close(float(b), float(a), **METRICS_TOL[F64])


def test_median_past_median_rows(monkeypatch):
    monkeypatch.setattr(H, "MEDIAN_ROWS", 16)
    monkeypatch.setattr(R, "MEDIAN_ROWS", 16)
    x, y = _data(61, 3, 2, seed=4)
    got = float(H.median_sigma(torch.tensor(x)))
    assert_close(got, R.median_sigma(x), **METRICS_TOL[F64])
    assert_close(float(cka(torch.tensor(x), torch.tensor(y), kernel="gaussian")), R.cka(x, y, "gaussian"),
                 **METRICS_TOL[F64])


@pytest.mark.parametrize("kernel,unbiased", [("gaussian", False), ("imq", True)])
def test_random_features_converge(kernel, unbiased):
    x, y = _data(200, 4, 3, seed=5)
    D = 4096
    got = cka(torch.tensor(x), torch.tensor(y), kernel=kernel, unbiased=unbiased, exact=False, num_features=D,
              generator=torch.Generator().manual_seed(0))
    assert abs(float(got) - R.cka(x, y, kernel, None, unbiased)) <= RFF_CKA_MC_CONST / math.sqrt(D)


def test_gradcheck():
    x, y = _data(9, 2, 2, seed=6)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.tensor(y, requires_grad=True)
    for kernel, sig in (("linear", None), ("gaussian", 1.2), ("imq", 0.7)):
        torch.autograd.gradcheck(lambda a, b: cka(a, b, kernel=kernel, sigma=sig, unbiased=True), (tx, ty))


mats = st.integers(0, 2**31 - 1).flatmap(
    lambda seed: st.tuples(st.just(seed), st.integers(4, 25), st.integers(1, 5), st.integers(1, 5)))


@given(case=mats, unbiased=st.booleans(), kernel=st.sampled_from(["linear", "gaussian", "imq"]),
       scale=st.floats(1e-3, 1e3))
def test_properties(case, unbiased, kernel, scale):
    seed, n, dx, dy = case
    rng = np.random.default_rng(seed)
    x, y = torch.tensor(rng.normal(size=(n, dx))), torch.tensor(rng.normal(size=(n, dy)))
    tol = METRICS_TOL[F64]
    assert_close(float(hsic(x, y, kernel=kernel, unbiased=unbiased)),
                 float(hsic(y, x, kernel=kernel, unbiased=unbiased)), rtol=1e-9, atol=1e-12)
    c = float(cka(x, x, kernel=kernel, unbiased=unbiased))
    assert math.isnan(c) or abs(c - 1.0) <= 1e-9  # NaN only where an unbiased self-HSIC is negative
    if kernel == "linear":
        a, b = float(cka(x, y, unbiased=unbiased)), float(cka(scale * x, y, unbiased=unbiased))
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol["rtol"] * abs(a) + 1e-9


@pytest.mark.parametrize("kernel", ["linear", "gaussian", "imq"])
@pytest.mark.parametrize("exact", [True, False])
def test_constant_representation(kernel, exact):
    x = torch.full((10, 3), 2.5, dtype=F64)
    y = torch.randn(10, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    kw = dict(kernel=kernel, exact=exact, num_features=64, generator=torch.Generator().manual_seed(1))
    for unbiased in (False, True):
        assert torch.isnan(cka(x, y, unbiased=unbiased, **kw))
        assert torch.isnan(cka(y, x, unbiased=unbiased, **kw))
        assert float(hsic(x, y, unbiased=unbiased, **kw)) == 0.0


def test_errors_name_the_argument():
    x, y = torch.randn(3, 2), torch.randn(3, 2)
    with pytest.raises(ValueError, match="^x: .*at least 4 rows"):
        hsic(x, y, unbiased=True)
    with pytest.raises(ValueError, match="^y: expected 3 rows"):
        cka(x, torch.randn(4, 2))
    with pytest.raises(ValueError, match="^kernel: "):
        cka(x, y, kernel="rbf")
    with pytest.raises(ValueError, match="^sigma: expected None for kernel='linear'"):
        cka(x, y, sigma=1.0)
    with pytest.raises(ValueError, match="^sigma\\[1\\]: "):
        cka(x, y, kernel="gaussian", sigma=(1.0, -2.0))
    with pytest.raises(ValueError, match="^sigma: "):
        cka(x, y, kernel="gaussian", sigma="mean")
    with pytest.raises(TypeError, match="^x: "):
        cka(x.numpy(), y)
    with pytest.raises(TypeError, match="^unbiased: "):
        cka(x, y, unbiased=1)


def test_import_does_not_load_triton():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys, kernelssl, kernelssl.metrics; assert 'triton' not in sys.modules, 'triton imported'"
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)


def _batches(seed=0, nb=3, n=12):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(nb):
        a = rng.normal(size=(n, 4))
        xs.append([a, np.tanh(a @ rng.normal(size=(4, 3)))])
        ys.append([a[:, :2] + 0.1 * rng.normal(size=(n, 2)), rng.normal(size=(n, 5)), a @ rng.normal(size=(4, 1))])
    return xs, ys


@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("gaussian", 1.5), ("imq", "median")])
def test_minibatch_cka(kernel, sigma):
    xs, ys = _batches()
    m = MinibatchCKA(2, 3, kernel=kernel, sigma=sigma)
    for a, b in zip(xs, ys):
        m.update([torch.tensor(t) for t in a], [torch.tensor(t) for t in b])
    got = m.compute()
    assert got.shape == (2, 3) and got.dtype == F64
    np.testing.assert_allclose(got.numpy(), R.minibatch_cka(xs, ys, kernel, sigma), **METRICS_TOL[F64])
    m.reset()
    with pytest.raises(RuntimeError, match="^compute: "):
        m.compute()
    with pytest.raises(ValueError, match="^ys: expected 3 layers, got 1"):
        m.update([torch.tensor(t) for t in xs[0]], torch.tensor(ys[0][0]))


def test_minibatch_cka_reset_forgets_the_layer_counts_it_took():
    """Layer counts taken from the first update are forgotten by reset (a new pair of models may follow);
    counts given to the constructor are kept."""
    xs, ys = _batches()
    m = MinibatchCKA()
    m.update([torch.tensor(t) for t in xs[0]], [torch.tensor(t) for t in ys[0]])
    m.reset()
    m.update(torch.tensor(xs[1][0]), torch.tensor(ys[1][1]))  # one layer each now
    want = MinibatchCKA()
    want.update(torch.tensor(xs[1][0]), torch.tensor(ys[1][1]))
    assert m.compute().shape == (1, 1)
    assert_close(m.compute(), want.compute(), **METRICS_TOL[F64], name="CKA after reset")


# ---------------------------------------------------------------------------------------------------
# two gloo ranks: each sees half the minibatches; after sync_distributed both equal one process


def _rank(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        xs, ys = _batches(nb=4)
        m = MinibatchCKA()
        for a, b in list(zip(xs, ys))[rank::world]:
            m.update([torch.tensor(t) for t in a], [torch.tensor(t) for t in b])
        m.sync_distributed()
        torch.save(m.compute(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_distributed(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    xs, ys = _batches(nb=4)
    m = MinibatchCKA()
    for a, b in zip(xs, ys):
        m.update([torch.tensor(t) for t in a], [torch.tensor(t) for t in b])
    for r in range(2):
        np.testing.assert_allclose(torch.load(tmp_path / f"rank{r}.pt").numpy(), m.compute().numpy(), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------
# ckatorch (optional): the same values on the same inputs


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_matches_ckatorch(kernel, unbiased):
    ckatorch = pytest.importorskip("ckatorch", reason="ckatorch (optional comparison package) is not installed")
    from ckatorch.core import cka_base

    x, y = _data(40, 4, 3, seed=7)
    tx, ty = torch.tensor(x), torch.tensor(y)
    want = float(cka_base(tx, ty, kernel=kernel, unbiased=unbiased))
    if kernel == "linear":
        got = cka(tx, ty, unbiased=unbiased)
    else:  # ckatorch's bandwidth: sigma^2 = torch.median (the lower middle value) of its squared distances
        def sig(a):
            d = a @ a.T
            q = torch.diag(d)
            return float(torch.sqrt(torch.median(-2 * d + q[:, None] + q[None, :])))
        got = cka(tx, ty, kernel="gaussian", sigma=(sig(tx), sig(ty)), unbiased=unbiased)
    assert_close(float(got), want, **METRICS_TOL[F64])
    assert ckatorch is not None


def test_minibatch_matches_ckatorch():
    pytest.importorskip("ckatorch", reason="ckatorch (optional comparison package) is not installed")
    from ckatorch.core import cka_batch

    rng = np.random.default_rng(8)
    x = rng.normal(size=(5, 16, 4))
    y = np.tanh(x @ rng.normal(size=(4, 3))) + 0.2 * rng.normal(size=(5, 16, 3))
    m = MinibatchCKA()
    for a, b in zip(x, y):
        m.update(torch.tensor(a), torch.tensor(b))
    assert_close(float(m.compute()[0, 0]), float(cka_batch(torch.tensor(x), torch.tensor(y))), **METRICS_TOL[F64])


# ---------------------------------------------------------------------------------------------------
# memory: the exact kernels never hold an n x n matrix


@pytest.mark.slow
def test_streamed_memory_stays_below_one_gram():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    n = 8000  # one float64 Gram: 488 MiB; the streamed tiles need ~16 MiB each
    code = (
        "import torch; from kernelssl.bench.measure import peak_extra_bytes; from kernelssl.metrics import cka\n"
        f"x = torch.randn({n}, 16, dtype=torch.float64); y = torch.randn({n}, 8, dtype=torch.float64)\n"
        "cka(x[:300], y[:300], kernel='gaussian')\n"
        "p = peak_extra_bytes(lambda: cka(x, y, kernel='gaussian', unbiased=True), torch.device('cpu'))\n"
        "print(-1 if p is None else p)\n"
    )
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env, capture_output=True, text=True)
    peak = int(out.stdout.split()[-1])
    assert peak >= 0, "peak memory not measurable (needs Linux /proc/self/clear_refs and glibc malloc_trim)"
    assert peak < n * n * 8 / 2, f"peak extra {peak / 2**20:.0f} MiB: half of one n x n float64 Gram or more"


@pytest.mark.parametrize("kernel", ["gaussian", "imq"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_constant_representation_with_median_bandwidth_has_finite_gradients(kernel, unbiased):
    """A constant x has median bandwidth 0 (k(0; 0) = 0/0); every distance is 0 there, so any bandwidth
    gives the same all-ones Gram: HSIC is 0, CKA is NaN (undefined), and both gradients are finite."""
    x = torch.ones(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    h = hsic(x, y, kernel=kernel, sigma="median", unbiased=unbiased)
    assert float(h) == 0.0
    c = cka(x, y, kernel=kernel, sigma="median", unbiased=unbiased)
    assert math.isnan(float(c))
    for value in (h, c):
        for g in torch.autograd.grad(value, (x, y)):
            assert bool(torch.isfinite(g).all())


def _reference_on_shifted_grams(x, y, kernel, sigma, unbiased, shift):
    """The reference CKA and HSIC on the Grams ``K - shift 11^T`` (``reference.metrics.shifted_gram``: K - 1
    formed without cancellation; diagonal ``1 - shift``): both estimators are unchanged by the shift
    (tests/test_gram_hsic_torch.py holds the reference to that)."""
    f = R.hsic_unbiased if unbiased else R.hsic_biased
    K, L = (R.shifted_gram(a, kernel, sigma, shift) + (1.0 - shift) * np.eye(a.shape[0]) for a in (x, y))
    return f(K, L) / np.sqrt(f(K, K) * f(L, L)), f(K, L)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("kernel", ["gaussian", "imq"])
@pytest.mark.parametrize("spread", [1e-3, 1e-7, 1e-12])
def test_bandwidth_far_above_the_data_scale(kernel, unbiased, spread):
    """A bandwidth 1e3-1e12 times the data's spread: every Gram entry is 1 - O(spread^2 / s^2), which rounds
    to 1 in float32 (and from 1e-7 in float64), so CKA and HSIC live in ``K - 1`` (at 1e-12 its entries,
    ~1e-24, square below float32's range unless scaled).  Both dtypes are the reference's on the shifted
    Grams to METRICS_TOL (float32 CKA was -0.957 for 0.601 at spread 1e-3 when K itself was summed, -0.87
    for 0.29 at 1e-12 with K - 1 unscaled); CKA also tends to the linear CKA as s grows."""
    n = 40
    g = np.random.default_rng(3)
    x = g.standard_normal((n, 6))
    y = x @ g.standard_normal((6, 4)) + 0.5 * g.standard_normal((n, 4))
    x, y = x * spread, y * spread
    want_cka, want_hsic = _reference_on_shifted_grams(x, y, kernel, 1.0, unbiased, 1.0)
    assert want_cka == pytest.approx(R.cka(x, y, "linear", None, unbiased), rel=1e-4)  # the wide-bandwidth limit
    for dtype in (torch.float32, F64):
        xt, yt = torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)
        tol = METRICS_TOL[dtype]
        got = cka(xt, yt, kernel=kernel, sigma=1.0, unbiased=unbiased)
        assert_close(got, want_cka, name=f"CKA {dtype}", rtol=tol["rtol"], atol=tol["atol"])
        got = hsic(xt, yt, kernel=kernel, sigma=1.0, unbiased=unbiased)
        if abs(want_hsic) < torch.finfo(dtype).tiny:  # HSIC ~ spread^4 / s^4: 3e-47 at 1e-12, below float32
            assert float(got) == 0.0 or abs(float(got) - want_hsic) < torch.finfo(dtype).tiny
        else:
            assert_close(got, want_hsic, name=f"HSIC {dtype}", rtol=tol["rtol"], atol=tol["atol"] * abs(want_hsic))


@pytest.mark.parametrize("kernel", ["gaussian", "imq"])
def test_unbiased_self_hsic_of_a_gram_near_the_identity(kernel):
    """A bandwidth far below the rows' distances (off-diagonal entries ~1e-108 for gaussian): the unbiased
    HSIC(K, K) is a sum of their squares alone, which the diagonal's n would swallow in one float64 sum
    (it came out 0 for 6.1e-216); it is the reference's to float64's METRICS_TOL."""
    g = np.random.default_rng(0)
    x = g.standard_normal((64, 8))
    sigma = 0.05 if kernel == "gaussian" else 1e-9
    want = R.hsic(x, x, kernel, sigma, True)
    assert 0.0 < want < 1e-15
    xt = torch.tensor(x)
    got = hsic(xt, xt, kernel=kernel, sigma=sigma, unbiased=True)
    assert_close(got, want, name="HSIC_u", rtol=METRICS_TOL[F64]["rtol"], atol=0.0)


def test_cka_of_two_grams_near_the_identity():
    """A bandwidth far below the rows' distances (float64): both self-HSICs are tiny (~1e-227 and ~1e-98),
    so their product underflows; CKA is the ratio with each square root taken apart, as the reference's
    HSICs give it, and ``cka(x, x)`` is 1 (it was ``inf``)."""
    torch.manual_seed(0)
    x = torch.randn(12, 3, dtype=F64)
    y = torch.tanh(x @ torch.randn(3, 4, dtype=F64)) + 0.3 * torch.randn(12, 4, dtype=F64)
    xn, yn = x.numpy(), y.numpy()
    for sigma in (0.028, 0.02875):
        hx, hy, hxy = (R.hsic(a, b, "gaussian", sigma, True) for a, b in ((xn, xn), (yn, yn), (xn, yn)))
        assert 0.0 < hx < 1e-150 and hx * hy < 1e-300  # the case of the test: a subnormal product
        want = hxy / (math.sqrt(hx) * math.sqrt(hy))
        assert_close(cka(x, y, kernel="gaussian", sigma=sigma, unbiased=True), want, name="CKA",
                     **METRICS_TOL[F64])
        m = MinibatchCKA(kernel="gaussian", sigma=sigma)
        m.update([x], [y])
        assert_close(m.compute()[0, 0], want, name="MinibatchCKA", **METRICS_TOL[F64])
    assert_close(cka(x, x, kernel="gaussian", sigma=0.03, unbiased=True), 1.0, name="cka(x, x)", **METRICS_TOL[F64])


def test_bandwidth_outside_the_compute_dtype_is_refused():
    """A numeric bandwidth whose square the compute dtype cannot hold (float32: about 1.1e-19 to 1.8e19)
    is a ValueError naming it (it gave NaN, or a RuntimeError from deep inside); float64 takes it."""
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    for sigma, name in ((1e30, "sigma"), ((1.0, 1e-25), r"sigma\[1\]"), (1e300, "sigma")):
        with pytest.raises(ValueError, match=rf"^{name}: expected a bandwidth in .* for torch.float32 inputs"):
            cka(x, y, kernel="gaussian", sigma=sigma)
    with pytest.raises(ValueError, match="^sigma: expected a bandwidth"):
        MinibatchCKA(kernel="imq", sigma=1e30).update([x], [y])
    assert torch.isfinite(cka(x.double(), y.double(), kernel="gaussian", sigma=1e30))
    assert torch.isfinite(cka(x.half(), y.half(), kernel="gaussian", sigma=1e10))  # computed in float32


def test_tight_cluster_with_far_rows_at_a_wide_bandwidth():
    """30 rows of spread 1e-12 and two rows at +-1, bandwidth 1: the cluster's Gram entries are 1 - 1e-24,
    so the Gram is shifted and scaled by a large power of two; the far rows' entries, about ``-f``, must
    not overflow float32 in their products (the factor was 3e23 and CKA NaN): float32 CKA is the
    float64 one to METRICS_TOL."""
    torch.manual_seed(0)
    x = torch.cat([1e-12 * torch.randn(30, 4), torch.ones(1, 4), -torch.ones(1, 4)])
    y = torch.cat([1e-12 * torch.randn(30, 3), torch.ones(1, 3), -torch.ones(1, 3)])
    assert float(_gram.gram_shift(x - x.mean(0), torch.tensor(1.0))) > 2.0**50  # the case of the test
    want = cka(x.double(), y.double(), kernel="gaussian", sigma=1.0)
    assert_close(cka(x, y, kernel="gaussian", sigma=1.0), want.float(), name="CKA", **METRICS_TOL[torch.float32])
