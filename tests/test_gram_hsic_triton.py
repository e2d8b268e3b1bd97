"""Fused Triton kernels of the HSIC/CKA statistics of exact Gaussian and IMQ Grams
(kernelssl/triton/gram_hsic.py; docs/metrics.md).

On CPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1) at small shapes
(16-wide tiles: several row tiles, column splits and backward column chunks, every mask exercised).
Statistics and every gradient (both representations and both bandwidths, under random non-unit upstream
gradients of both outputs) are held to the float64 torch tier by the 2x rule of kernelssl/numerics.py:
the kernel's error no larger than twice the fp32 torch tier's, with a floor at the fp32 level.  The
metrics with ``backend="triton"`` against the NumPy reference (METRICS_TOL), degenerate input, second
derivatives.  GPU tests (the metrics' 20 000-row shape) are skipped without CUDA; the offline sm_90
compile is in the slow tier.
"""
from __future__ import annotations

import math

import pytest
import torch

import helpers
import reference.metrics as R
from helpers import DEV, assert_close, assert_error_within_torch, needs_cuda
from kernelssl import dispatch
from kernelssl.metrics import MinibatchCKA, cka, hsic
from kernelssl.numerics import METRICS_TOL
from kernelssl.ops import gram_hsic as G

GH = pytest.importorskip("kernelssl.triton.gram_hsic_op")
helpers.assert_kernels_can_run()

F32, F64 = torch.float32, torch.float64
KERNELS = list(G.GRAM_KERNELS)
# 2, 1, 1: the smallest pair; 50 x 40 against 1: two backward column chunks, a ragged last tile
SHAPES = [(37, 5, 3), (50, 40, 1), (2, 1, 1), (33, 16, 17)]

# The floor of the 2x rule: a kernel value k in [0, 1] computed in fp32 is within a few ulps (2^-22) of its
# float64 value; the statistics are sums of n^2 such values (or their products), so their error floor is
# ~n^2 2^-22 relative to the largest sum, and the gradients' (sums of n terms each) ~n 2^-20 of their max.


def _floor(ref: torch.Tensor, terms: int) -> float:
    return terms * 2.0**-22 * float(ref.abs().max())


def _inputs(n, dx, dy, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g, dtype=F64) * 1.3 + 0.5
    y = torch.tanh(x[:, :1]) + 0.4 * torch.randn(n, dy, generator=g, dtype=F64)
    return x - x.mean(0), y - y.mean(0)


def _upstream(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, generator=g, dtype=F64), torch.randn(2, n, generator=g, dtype=F64)


def _run(fn, x, y, sig, shift, wt, wr):
    xs = [x.clone().requires_grad_(), y.clone().requires_grad_(), sig.clone().requires_grad_()]
    tr, rows = fn(*xs, shift.to(x.dtype))
    grads = torch.autograd.grad((tr * wt).sum() + (rows * wr).sum(), xs)
    return tr.detach(), rows.detach(), grads


def _torch_tier(kernel):
    return lambda x, y, s, c: G.gram_hsic_stats([x, y], kernel, [s[0], s[1]], [c[0], c[1]])


def _kernels(kernel):
    return lambda x, y, s, c: GH.gram_hsic_stats(x, y, s, kernel, c)


# shifts (c_x, c_y): both Grams as given, one carried as 8 (K - 1) (on a wide bandwidth, where it is chosen)
SHIFTS = [((0.0, 0.0), (1.4, 0.8)), ((8.0, 0.0), (6.0, 0.8))]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n,dx,dy", SHAPES)
@pytest.mark.parametrize("shift,widths", SHIFTS, ids=["as-given", "x-shifted"])
def test_statistics_and_gradients_within_2x_of_torch(kernel, n, dx, dy, shift, widths):
    x, y = _inputs(n, dx, dy)
    sig = torch.tensor(widths, dtype=F64) * math.sqrt(dx)
    shift = torch.tensor(shift, dtype=F64)
    wt, wr = _upstream(n)
    ref = _run(_torch_tier(kernel), x, y, sig, shift, wt, wr)
    tor = _run(_torch_tier(kernel), x.float(), y.float(), sig.float(), shift, wt, wr)
    ker = _run(_kernels(kernel), x.float(), y.float(), sig.float(), shift, wt, wr)
    for name, i, terms in (("tr", 0, n * n), ("rows", 1, n)):
        assert ker[i].dtype == F64
        assert_error_within_torch(ker[i], tor[i], ref[i], floor=_floor(ref[i], terms), name=name)
    for name, k, t, r in zip(("dx", "dy", "dsigma"), ker[2], tor[2], ref[2]):
        assert k.dtype == F32 and k.shape == r.shape
        assert_error_within_torch(k, t, r, floor=_floor(r, 4 * n), name=name)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("kernel,sigma", [("gaussian", "median"), ("imq", (1.1, 0.6)), ("gaussian", 2.0)])
def test_metrics_on_the_kernels_equal_reference(kernel, sigma, unbiased):
    x, y = _inputs(45, 6, 3, seed=4)
    for fn, ref in ((cka, R.cka), (hsic, R.hsic)):
        got = fn(x.float(), y.float(), kernel=kernel, sigma=sigma, unbiased=unbiased, backend="triton")
        assert got.dtype == F32
        want = ref(x.float().double().numpy(), y.float().double().numpy(), kernel, sigma, unbiased)
        scale = 1.0 if fn is cka else abs(R.hsic(x.numpy(), x.numpy(), kernel, sigma if isinstance(sigma, str)
                                                 else (sigma if not isinstance(sigma, tuple) else sigma[0]),
                                                 unbiased))
        assert abs(float(got) - want) <= METRICS_TOL[F32]["rtol"] * abs(want) + METRICS_TOL[F32]["atol"] * scale, \
            (fn.__name__, float(got), want)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("spread", [1e-3, 1e-12])
def test_metrics_on_the_kernels_at_a_bandwidth_far_above_the_data_scale(kernel, unbiased, spread):
    """Rows of spread 1e-3 and 1e-12 against a bandwidth of 1 (every Gram entry 1 - O(spread^2)): the
    kernels carry ``f (K - 1)``, the shift the metric picks (at 1e-12 the unscaled entries' products
    underflow float32); CKA is the float64 torch tier's to METRICS_TOL."""
    x, y = (t * spread for t in _inputs(45, 6, 3, seed=4))
    got = cka(x.float(), y.float(), kernel=kernel, sigma=1.0, unbiased=unbiased, backend="triton")
    want = cka(x.float().double(), y.float().double(), kernel=kernel, sigma=1.0, unbiased=unbiased, backend="torch")
    assert 0.3 < float(want) < 1.0
    assert_close(got, want.float(), name="CKA", **METRICS_TOL[F32])


def test_metrics_on_the_kernels_tight_cluster_with_far_rows():
    """A cluster of spread 1e-12 and two rows at +-1 at bandwidth 1 (a Gram scaled by a large power of two:
    the far rows' entries must not overflow float32 in the tiles' products): CKA is the float64 torch
    tier's to METRICS_TOL."""
    torch.manual_seed(0)
    x = torch.cat([1e-12 * torch.randn(30, 4), torch.ones(1, 4), -torch.ones(1, 4)])
    y = torch.cat([1e-12 * torch.randn(30, 3), torch.ones(1, 3), -torch.ones(1, 3)])
    want = cka(x.double(), y.double(), kernel="gaussian", sigma=1.0, backend="torch")
    got = cka(x, y, kernel="gaussian", sigma=1.0, backend="triton")
    assert_close(got, want.float(), name="CKA", **METRICS_TOL[F32])


def test_minibatch_cka_on_the_kernels_equals_torch_tier():
    x, y = _inputs(40, 6, 3, seed=5)
    layers_a, layers_b = [x.float(), (x[:, :2] ** 2).float()], [y.float(), torch.sin(y).float(), x[:, 3:].float()]
    got, want = (MinibatchCKA(kernel="gaussian", sigma=1.7, backend=b) for b in ("triton", "torch"))
    for m in (got, want):
        m.update(layers_a, layers_b)
        m.update([a[:20] for a in layers_a], [b[:20] for b in layers_b])
    assert_close(got.compute(), want.compute(), name="minibatch CKA", **METRICS_TOL[F32])


def test_degenerate_input_on_the_kernels():
    x, y = _inputs(20, 3, 2)
    const = torch.ones(20, 3)
    assert math.isnan(float(cka(const, y.float(), kernel="gaussian", backend="triton")))
    assert float(hsic(const, y.float(), kernel="gaussian", backend="triton")) == 0.0
    bad = x.float().clone()
    bad[3, 1] = float("nan")
    assert math.isnan(float(cka(bad, y.float(), kernel="imq", sigma=1.0, backend="triton")))


@pytest.mark.parametrize("kernel", KERNELS)
def test_second_derivative_through_the_kernels(kernel):
    """``create_graph=True`` through the fused op: the torch tier's plain autograd, recorded (the same
    second derivative as the torch tier's, by the 2x rule)."""
    x, y = _inputs(12, 3, 2, seed=6)
    out = []
    for backend, dt in (("triton", F32), ("torch", F32), ("torch", F64)):
        a = x.to(dt).requires_grad_()
        c = cka(a, y.to(dt), kernel=kernel, sigma=1.5, backend=backend)
        (g,) = torch.autograd.grad(c, a, create_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), a)
        out.append(h)
    assert_error_within_torch(out[0], out[1], out[2], floor=_floor(out[2], 200), name="second derivative")


def test_auto_picks_the_kernels_only_on_cuda(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x = torch.zeros(4, 2)
    assert "gram_hsic" in dispatch.TRITON_OPS
    assert dispatch.implementation("gram_hsic", "auto", x, x) == "torch"
    assert dispatch.implementation("gram_hsic", "triton", x, x) == "triton"  # the interpreter, asked for
    assert dispatch.implementation("gram_hsic", "triton", x, x.double()) == "torch"


@needs_cuda
@pytest.mark.parametrize("kernel", KERNELS)
def test_gpu_metrics_shape(kernel):
    """The metrics' headline shape on a GPU (20 000 x 64 against 32): statistics and gradients within 2x
    of the fp32 torch tier's error against the float64 torch tier."""
    n = 20000
    x, y = (t.to(DEV) for t in _inputs(n, 64, 32, seed=7))
    sig = torch.tensor([8.0, 40.0], dtype=F64, device=DEV)
    shift = torch.stack([G.gram_shift(x, sig[0]), G.gram_shift(y, sig[1])])  # both kinds
    assert shift.tolist() == [0.0, 64.0]  # x as given, y carried as 64 (K - 1)
    wt, wr = (t.to(DEV) for t in _upstream(n))
    ref = _run(_torch_tier(kernel), x, y, sig, shift, wt, wr)
    tor = _run(_torch_tier(kernel), x.float(), y.float(), sig.float(), shift, wt, wr)
    ker = _run(_kernels(kernel), x.float(), y.float(), sig.float(), shift, wt, wr)
    for name, i, terms in (("tr", 0, n * n), ("rows", 1, n)):
        assert_error_within_torch(ker[i], tor[i], ref[i], floor=_floor(ref[i], terms), name=name)
    for name, k, t, r in zip(("dx", "dy", "dsigma"), ker[2], tor[2], ref[2]):
        assert_error_within_torch(k, t, r, floor=_floor(r, 4 * n), name=name)


@pytest.mark.slow
def test_sm90_compile():
    """Every launch of the GPU path compiles for sm_90 without spills (helpers.target_variants), with the
    Gram tiles on the tensor cores (wgmma) in the default tf32x3."""
    variants = helpers.sm90_variants("gram_hsic")
    assert {v["kernel"] for v in variants} == {"_stats_kernel", "_grad_kernel"}
    assert all(v["tensor_core"] for v in variants if v["constexprs"].get("INPUT_PRECISION") == "tf32x3")


def test_compiled_metric_on_the_kernels():
    """``torch.compile(fullgraph=True)`` of a CKA and its gradient on the fused op (one opaque call on the
    CPU interpreter; decomposed into its kernels on a GPU): the eager numbers."""
    x, y = (t.float().requires_grad_() for t in _inputs(30, 4, 3, seed=9))

    def f(a, b):
        return cka(a, b, kernel="gaussian", sigma=(1.3, 0.8), backend="triton")

    want = f(x, y)
    gw = torch.autograd.grad(want, (x, y))
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, y)
    gg = torch.autograd.grad(got, (x, y))
    assert_close(got, want, name="cka", rtol=1e-6, atol=0.0)
    for a, b in zip(gg, gw):
        assert_close(a, b, name="grad", rtol=1e-5, atol=1e-6 * float(b.abs().max()))


# --------------------------------------------------------------------------------------------------
# precision policy (docs/numerics.md): the default tf32x3, emulated on the CPU at a metrics shape
# --------------------------------------------------------------------------------------------------


def _emulated_cka(x, y, sig, precision):
    """``(CKA, dCKA/dx, dCKA/dy)``, biased Gaussian CKA, in the kernels' own decomposition (module
    docstring of kernelssl/triton/gram_hsic.py): each Gram tile's ``x_i . x_j`` by one
    ``kernelssl.numerics.mm`` at ``precision``, the distances by the expansion (clamped at 0, exactly 0
    on the diagonal), the shifted kernel values ``E`` (``K``, or ``c (K - 1)`` for the shift ``c`` of
    ``gram_shift``; 0 on the diagonal) and their products in the input dtype, every sum in float64; the
    backward's weights ``W`` in the input dtype and its ``W X`` by ``mm`` at ``precision``.  The upstream
    ``(dF/dtr, dF/drows)`` of CKA is formed from the float64 statistics, as the metric does."""
    from kernelssl.numerics import mm

    n = x.shape[0]
    grams, shifted, diag, scale = [], [], [], []
    for a, s in zip((x, y), sig):
        sq = (a * a).sum(1)
        d2 = (sq[:, None] + sq[None, :] - 2.0 * mm(a, a.T.contiguous(), precision)).clamp_min(0.0)
        d2.fill_diagonal_(0.0)
        c = G.gram_shift(a, s)
        t = d2 * (-0.5 / (s * s))
        grams.append(torch.exp(t))
        shifted.append(torch.where(c != 0, torch.expm1(t) * c, grams[-1]).fill_diagonal_(0.0))
        diag.append((c == 0).to(F64))
        scale.append(G.gram_scale(c))
    e, f = shifted
    tr = torch.stack([(p * q).sum(dtype=F64) for p in shifted for q in shifted]).view(2, 2).requires_grad_()
    rows = torch.stack([g.sum(1, dtype=F64) for g in shifted]).requires_grad_()

    def hsic_b(a, b):  # the Grams K, or c (K - 11^T) (diagonal 0), divided by the scales
        ka, kb = rows[a] + diag[a], rows[b] + diag[b]
        t = tr[a, b] + n * diag[a] * diag[b]
        return (t - (2.0 / n) * (ka @ kb) + ka.sum() * kb.sum() / n**2) / ((n - 1) ** 2 * scale[a] * scale[b])

    value = hsic_b(0, 1) / torch.sqrt(hsic_b(0, 0) * hsic_b(1, 1))
    gtr, grows = torch.autograd.grad(value, (tr, rows))
    S, g = (gtr + gtr.T).to(x.dtype), grows.to(x.dtype)
    grads = []
    for side, (a, s) in enumerate(zip((x, y), sig)):
        gamma = 2.0 * (S[side, 0] * e + S[side, 1] * f) + g[side][:, None] + g[side][None, :]
        w = gamma * grams[side] * (-scale[side] / (s * s))
        w.fill_diagonal_(0.0)
        grads.append(w.sum(1)[:, None] * a - mm(w, a, precision))
    return value.detach(), grads[0], grads[1]


def emulated_paper_case():
    """``(run, ref, names)``: the emulation above at a representation-comparison shape, n = 2048 rows of
    two 256-wide representations (a Gram entry's error is set by the row length, not by n), Gaussian
    kernel at the median bandwidth; ``run(precision)`` in fp32, ``ref`` in float64 (also used by
    test_targets)."""
    g = torch.Generator().manual_seed(23)
    n, d = 2048, 256
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.tanh(x @ torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d)) + 0.3 * torch.randn(
        n, d, generator=g, dtype=F64)
    x, y = x - x.mean(0), y - y.mean(0)
    from kernelssl.metrics import median_sigma

    sig = (median_sigma(x), median_sigma(y))
    ref = _emulated_cka(x, y, sig, "ieee")
    x32, y32, sig32 = x.float(), y.float(), tuple(s.float() for s in sig)
    return (lambda p: _emulated_cka(x32, y32, sig32, p)), ref, ("CKA", "dCKA/dx", "dCKA/dy")


def test_tf32x3_default_is_within_2x_of_ieee_emulated():
    """With every kernel GEMM in emulated tf32x3, the error of a Gaussian CKA and of both its gradients
    against float64 is within 2x of full fp32's ("ieee"); plain tf32 is far worse."""
    from kernelssl.numerics import check_within_2x_of_ieee

    check_within_2x_of_ieee(*emulated_paper_case())


@pytest.mark.parametrize("widths", [(1.1, 0.7), (30.0, 0.7)], ids=["as-given", "x-shifted"])
def test_emulation_in_float64_is_the_metric(widths):
    """The emulation above, in float64 (every product exact), is the torch tier's CKA and its gradients:
    what the precision test compares is the kernels' decomposition of this metric (with x's Gram carried
    as 64 (K - 1) at the wide bandwidth)."""
    x, y = _inputs(60, 7, 5, seed=11)
    sig = tuple(torch.tensor(w, dtype=F64) for w in widths)
    assert [float(G.gram_shift(a, s)) for a, s in zip((x, y), sig)] == ([0.0, 0.0] if widths[0] < 2 else [64.0, 0.0])
    value, dx, dy = _emulated_cka(x, y, sig, "ieee")
    xs = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    want = cka(*xs, kernel="gaussian", sigma=widths, backend="torch")
    gx, gy = torch.autograd.grad(want, xs)
    assert_close(value, want.detach(), name="CKA", rtol=1e-12, atol=0.0)
    assert_close(dx, gx, name="dx", rtol=1e-10, atol=1e-12 * float(gx.abs().max()))
    assert_close(dy, gy, name="dy", rtol=1e-10, atol=1e-12 * float(gy.abs().max()))
