"""``gram_hsic``, torch tier (kernelssl/ops/gram_hsic.py): the HSIC/CKA statistics of exact Gaussian and
IMQ Grams, streamed over blocks, against the NumPy float64 reference (``reference.metrics.gram_hsic_stats``,
dense shifted Grams), tight in float64 (METRICS_TOL), with each Gram's shift 0 and 1.  The streamed
backward: float64 ``gradcheck`` and ``gradgradcheck`` (non-unit, random upstream gradients of both
outputs, through the bandwidths too), equal to the plain-autograd form; results independent of the block
size (ragged last block).  Slow tier: the peak memory of a forward+backward at n = 8000 stays far below
one n x n float64 Gram."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import reference.metrics as R
from helpers import assert_close
from kernelssl.numerics import METRICS_TOL
from kernelssl.ops import gram_hsic as G

F64 = torch.float64
KERNELS = list(G.GRAM_KERNELS)


def _reps(n, dims, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g, dtype=F64) + 1.5 for d in dims]
    return [(x - x.mean(0)).to(dtype) for x in xs]


def _sigmas(values, dtype=F64):
    return [torch.tensor(v, dtype=dtype) for v in values]


_shifts = _sigmas  # 0-d tensors too
MIXED = (8.0, 0.0, 1.0)  # shifts of up to three Grams: both kinds in one call, a scale of 8 and of 1


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n,dims", [(37, (5, 3)), (2, (1, 1)), (19, (4, 1, 2))])
@pytest.mark.parametrize("shift", [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), MIXED], ids=["0", "1", "mixed"])
def test_statistics_equal_reference(kernel, n, dims, shift):
    xs = _reps(n, dims)
    sig = [1.3, 0.7, 2.1][: len(dims)]
    shift = shift[: len(dims)]
    tr, rows = G.gram_hsic_stats(xs, kernel, _sigmas(sig), _shifts(shift), tile=8)
    rtr, rrows = R.gram_hsic_stats([x.numpy() for x in xs], kernel, sig, shift)
    assert tr.dtype == rows.dtype == F64
    assert_close(tr, rtr, name="tr", **METRICS_TOL[F64])
    assert_close(rows, rrows, name="rows", **METRICS_TOL[F64])


@pytest.mark.parametrize("kernel", KERNELS)
def test_block_size_does_not_change_the_statistics(kernel):
    xs = _reps(45, (3, 2), seed=1)
    one = G.gram_hsic_stats(xs, kernel, _sigmas([1.1, 0.8]), _shifts(MIXED[:2]), tile=1024)
    for tile in (7, 8, 45):  # 7: a ragged last block; 45: one block
        many = G.gram_hsic_stats(xs, kernel, _sigmas([1.1, 0.8]), _shifts(MIXED[:2]), tile=tile)
        for a, b in zip(many, one):
            assert_close(a, b, name=f"tile={tile}", **METRICS_TOL[F64])


def _weighted(fn, kernel, m, n, tile, shift=MIXED):
    g = torch.Generator().manual_seed(7)
    wt = torch.randn(m, m, generator=g, dtype=F64)  # non-unit upstream gradients of both outputs
    wr = torch.randn(m, n, generator=g, dtype=F64)

    def f(*t):
        tr, rows = fn(list(t[:m]), kernel, list(t[m:]), _shifts(shift[:m]), tile)
        return (tr * wt).sum() + (rows * wr).sum()
    return f


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shift", [(0.0, 1.0), (4.0, 0.0)], ids=["01", "40"])
def test_gradcheck_streamed_backward(kernel, shift):
    xs = [x.requires_grad_() for x in _reps(13, (3, 2))]
    sig = [s.requires_grad_() for s in _sigmas([1.2, 0.9])]
    f = _weighted(G.gram_hsic_stats, kernel, 2, 13, 5, shift)
    assert torch.autograd.gradcheck(f, (*xs, *sig))
    assert torch.autograd.gradgradcheck(f, (*xs, *sig))


@pytest.mark.parametrize("kernel", KERNELS)
def test_streamed_backward_equals_plain_autograd(kernel):
    n = 41
    xs = [x.requires_grad_() for x in _reps(n, (6, 1, 3), seed=2)]
    sig = [s.requires_grad_() for s in _sigmas([1.5, 0.6, 2.0])]
    args = (*xs, *sig)
    got = torch.autograd.grad(_weighted(G.gram_hsic_stats, kernel, 3, n, 16)(*args), args)
    want = torch.autograd.grad(_weighted(G.gram_hsic_stats_eager, kernel, 3, n, 16)(*args), args)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, name=f"grad {i}", rtol=1e-12, atol=1e-12 * float(b.abs().max()))


def test_float32_backward_far_apart_rows():
    """Rows far apart (kernel values ~1e-10 off the diagonal): the float32 gradient stays at the float32
    level of the float64 one (the diagonal's weight, exactly 0 in the math, is not carried)."""
    xs64 = _reps(50, (40, 1), seed=3)
    sig = [1.3, 0.7]
    grads = []
    for dt in (torch.float32, F64):
        xs = [x.to(dt).requires_grad_() for x in xs64]
        tr, rows = G.gram_hsic_stats(xs, "gaussian", _sigmas(sig, dt), _shifts([0.0, 0.0], dt), tile=16)
        grads.append(torch.autograd.grad(tr.sum() + rows.sum(), xs[0])[0])
    assert_close(grads[0], grads[1], name="dx", rtol=1e-4, atol=1e-6 * float(grads[1].abs().max()))


@pytest.mark.slow
def test_gradient_memory_is_streamed():
    """Forward+backward of an exact Gaussian CKA at n = 8000 in a fresh process: the peak extra resident
    memory stays below half of one n x n float64 Gram (244 MiB; a few 1024 x 1024 blocks are live at a
    time, while plain autograd keeps every block: several n x n float32 matrices)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    n = 8000
    code = textwrap.dedent(f"""
        import torch
        from kernelssl.bench.measure import peak_extra_bytes
        from kernelssl.metrics import cka
        torch.manual_seed(0)
        x = torch.randn({n}, 64, requires_grad=True)
        y = torch.randn({n}, 32, requires_grad=True)
        cka(x[:300], y[:300], kernel="gaussian", sigma=4.0).backward()  # warm up (allocator, kernels)
        def step():
            cka(x, y, kernel="gaussian", sigma=4.0).backward()
        p = peak_extra_bytes(step, torch.device("cpu"))
        print(-1 if p is None else p)
    """)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True,
                         cwd=root, env=env)
    peak = int(out.stdout.split()[-1])
    assert peak >= 0, "peak memory not measurable (needs Linux /proc/self/clear_refs and glibc malloc_trim)"
    assert peak < n * n * 8 / 2, f"peak extra memory {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("kernel", KERNELS)
def test_reference_statistics_are_the_dense_sums(kernel):
    """The reference's statistics are the off-diagonal sums of ``K - c`` for the dense Grams (``c``: the
    shift), and both reference estimators give the same HSIC on ``K - c 11^T`` as on ``K``."""
    x = np.arange(12.0).reshape(4, 3) / 7.0
    y = np.cos(np.arange(8.0)).reshape(4, 2)
    tr, rows = R.gram_hsic_stats([x, y], kernel, [1.0, 2.0], [4.0, 0.0])
    K1, K2 = R.gram(x, kernel, 1.0), R.gram(y, kernel, 2.0)
    off = ~np.eye(4, dtype=bool)
    assert tr[0, 1] == tr[1, 0] == pytest.approx(float((4.0 * (K1 - 1.0) * K2)[off].sum()), rel=1e-14)
    assert tr[0, 0] == pytest.approx(float((16.0 * (K1 - 1.0) ** 2)[off].sum()), rel=1e-14)
    assert rows[0] == pytest.approx(np.where(off, 4.0 * (K1 - 1.0), 0.0).sum(1), rel=1e-14)
    assert rows[1] == pytest.approx(np.where(off, K2, 0.0).sum(1), rel=1e-15)
    for f in (R.hsic_biased, R.hsic_unbiased):
        assert f(4.0 * (K1 - 1.0), K2 + 3.0) == pytest.approx(4.0 * f(K1, K2), rel=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
def test_compiled_cka_with_gradient_matches_eager(kernel):
    """``torch.compile(fullgraph=True)`` (aot_eager: dynamo and AOT autograd) of an exact CKA and its
    gradient through the streamed Function: no graph break, the eager numbers (float64)."""
    from kernelssl.metrics import cka

    x, y = (t.requires_grad_() for t in _reps(21, (4, 3), seed=8))

    def f(a, b):
        return cka(a, b, kernel=kernel, sigma=(1.2, 0.9), unbiased=True, backend="torch")

    want = f(x, y)
    gw = torch.autograd.grad(want, (x, y))
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, y)
    gg = torch.autograd.grad(got, (x, y))
    assert_close(got, want, name="cka", rtol=1e-12, atol=1e-14)
    for a, b in zip(gg, gw):
        assert_close(a, b, name="grad", rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_imq_diagonal_is_exactly_one(dtype):
    """``k(0) = 1`` exactly for every bandwidth: the estimators put each Gram's diagonal back as exactly 1
    (the statistics leave it out), so the value the tiles give at ``d2 = 0`` (duplicate rows) must be
    that 1 too.  The IMQ tile's ``s / sqrt(0 + s^2)`` is; ``s * rsqrt(s^2)`` is not for ~13% of
    bandwidths (1 ulp off)."""
    s = torch.logspace(-6, 6, 20001, dtype=dtype)
    assert bool((G._kernel(torch.zeros_like(s), "imq", s) == 1).all())


def test_unbiased_imq_hsic_with_a_near_identity_gram_float32():
    """Far-apart rows (a Gram near the identity) and a bandwidth where ``s * rsqrt(s^2) != 1``: the float32
    unbiased HSIC is the float64 reference's to METRICS_TOL's float32 rtol (it was -6.0e-8 against
    -3.3e-10 when the diagonal came out 1 ulp below 1: an error of n ulps in a sum of size n)."""
    from kernelssl.metrics import hsic, median_sigma

    torch.manual_seed(1)
    x = torch.randn(4, 8, dtype=F64).mul(1e6).float()
    y = torch.randn(4, 130)
    assert float(median_sigma(y) * torch.rsqrt(median_sigma(y) ** 2)) != 1.0  # the case of the test
    got = float(hsic(x, y, kernel="imq", sigma=(0.5, "median"), unbiased=True, backend="torch"))
    want = R.hsic(x.double().numpy(), y.double().numpy(), "imq", (0.5, "median"), True)
    assert_close(got, want, rtol=METRICS_TOL[torch.float32]["rtol"], atol=0.0, name="HSIC_u")


def test_shift_follows_the_median_row():
    """``gram_shift``: 0 for spread-out rows at their median bandwidth; for a tight cluster at a bandwidth
    far above its spread, a power of two that brings ``K - 1`` to order 1 -- one far row does not change
    that (a mean of the rows' norms would: the far row dominates it); 1 for a constant representation."""
    from kernelssl.metrics import median_sigma

    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 6, generator=g, dtype=F64)
    x = x - x.mean(0)
    assert float(G.gram_shift(x, median_sigma(x))) == 0.0
    cluster = 1e-3 * torch.randn(39, 4, generator=g, dtype=F64)
    for rows in (cluster, torch.cat([cluster, torch.full((1, 4), 10.0, dtype=F64)])):
        rows = rows - rows.mean(0)
        c = float(G.gram_shift(rows, torch.tensor(5.0, dtype=F64)))
        r = float((rows * rows).sum(1).median()) / 25.0
        assert c > 0 and math.log2(c) == round(math.log2(c)) and 0.5 <= c * r < 1.0
    assert float(G.gram_shift(torch.zeros(5, 3, dtype=F64), torch.tensor(1.0, dtype=F64))) == 1.0
