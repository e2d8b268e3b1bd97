"""Fused Triton kernels of the Gaussian-potential Gram log-mean, Wang & Isola's uniformity
(kernelssl/triton/gaussian_gram.py; docs/gaussian_gram.md).

On CPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1), at small
shapes (32-wide blocks: a few tiles, every mask exercised), against float64 formulas computed here
directly: the Gram form ``logsumexp(2t (zhat zhat^T - 1)) - log c`` (value and, by autograd, the
gradient) and Wang & Isola's own ``torch.pdist(zhat).pow(2).mul(-t).exp().mean().log()``.  GPU tests at
the uniformity shapes are skipped without CUDA.

Every gradient check uses a non-unit upstream gradient (``UPSTREAM * L``).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import helpers
import kernelssl.functional as KF
from helpers import CUDA, DEV, assert_close, assert_error_within_torch, needs_cuda, to_numpy
from helpers import random_rows as _z
from kernelssl import dispatch
from kernelssl.ops import gaussian_gram as U
from kernelssl.ops._common import prescale_rows

GG = pytest.importorskip("kernelssl.triton.gaussian_gram_op")
helpers.assert_kernels_can_run()

UPSTREAM = 2.5
HALF_ULP = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------------------------------
# tolerances (fp32 tier; the 2x rule of kernelssl/numerics.py below them), stated once
# --------------------------------------------------------------------------------------------------
# A Gram entry of unit rows computed in fp32 (fp32 products and accumulation, row scales r_i r_j in
# fp32) is within 2^-20 (8 ulps of 1) of its float64 value at the test shapes (q <= 64: ~sqrt(q) ulps
# typical); the exponent x = 2t (G - 1) then carries 2t x 2^-20.  L is a log-mean-exp of the x's, so
# it moves by at most max |dx|; its own roundings (the sums, log) add a few ulps of max(1, |L|).  The
# gradient is a sum of exp(x_kj - m) zhat_j / S': each weight carries the relative error dx, the n-term
# fp32 sums ~1e-5 of max |grad| (as legendre_gram's tests), the Jacobian's projection the same.


def _tol_value(t: float, value: float) -> float:
    return 2 * t * 2.0**-20 + 2.0**-21 * max(1.0, abs(value))


def _tol_grad(t: float, gmax: float, dtype=torch.float32) -> dict:
    ulp = HALF_ULP[dtype]  # half: plus the final rounding of the gradient to the input dtype
    return dict(rtol=ulp, atol=(2 * t * 2.0**-19 + 1e-5) * gmax + (2.0**-24 if ulp else 0.0))


def _floor_value(t: float, value: float) -> float:
    # floor of the 2x rule for the value: both paths sit at the fp32 level of _tol_value / 4 there
    return 2 * t * 2.0**-22 + 2.0**-22 * max(1.0, abs(value))


def _floor_grad(z: torch.Tensor, t: float, normalize=True, exclude_diagonal=True) -> float:
    """4 fp32 ulps (2^-22) of the gradient's scale before the normalisation Jacobian,
    max_k |dL/dzhat_k| / ||z_k||: the Jacobian r_k (I - zhat_k zhat_k^T) may cancel most of it (q = 1:
    all of it, the exact gradient is 0), and its rounding is relative to that scale."""
    z64 = z.detach().cpu().double()
    zh = F.normalize(z64, dim=1) if normalize else z64
    _, g_hat = _run(_formula, zh, t, False, exclude_diagonal)
    norms = z64.norm(dim=1).clamp_min(1e-12) if normalize else torch.ones(z64.shape[0], dtype=torch.float64)
    return 2.0**-22 * float((g_hat.norm(dim=1) / norms).max())


# --------------------------------------------------------------------------------------------------
# float64 formulas (inputs: helpers.random_rows)
# --------------------------------------------------------------------------------------------------


def _formula(z: torch.Tensor, t: float, normalize: bool = True, exclude_diagonal: bool = True,
             dtype=torch.float64) -> torch.Tensor:
    """The log-mean by the plain formula in ``dtype`` (n x n Gram; differentiable in ``z``)."""
    zc = z.to(dtype)
    zh = F.normalize(zc, dim=1) if normalize else zc
    n = zh.shape[0]
    x = (2.0 * t) * (zh @ zh.t() - 1.0)
    if exclude_diagonal:
        x = x.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("-inf"))
    log_c = math.log(n) + math.log(n - 1) if exclude_diagonal else 2 * math.log(n)
    return torch.logsumexp(x.reshape(-1), 0) - log_c


def _run(fn, z: torch.Tensor, *args, **kw):
    """``(L, dL/dz * UPSTREAM)`` of ``fn(z, ...)`` on a fresh leaf (the gradient in z's dtype)."""
    z = z.detach().clone().requires_grad_(True)
    value = fn(z, *args, **kw)
    (UPSTREAM * value).backward()
    return value.detach(), z.grad


def _reference(z: torch.Tensor, t: float, normalize=True, exclude_diagonal=True):
    """float64 value and gradient on the rounded input, exactly as given."""
    m, g = _run(_formula, z.detach().cpu().double(), t, normalize, exclude_diagonal)
    return float(m), to_numpy(g)


def _torch_fp32(z: torch.Tensor, t: float, normalize=True, exclude_diagonal=True):
    """The torch path's arithmetic in z's dtype (upcast to fp32, gradient back in z's dtype)."""
    return _run(_formula, z, t, normalize, exclude_diagonal, torch.float32)


def _check(kern, z, t, normalize=True, exclude_diagonal=True, what=""):
    """Kernel vs float64 within the stated fp32-tier tolerances (+ the half rounding of the gradient),
    or, where these are beyond fp32 on the input (cancellation in the normalisation Jacobian: n = 2,
    q = 2), within the 2x rule (kernelssl/numerics.py): 2x the torch path's error in the same dtype."""
    m, g = kern
    assert m.dtype == torch.float32 and m.dim() == 0 and g.dtype == z.dtype
    m64, g64 = _reference(z, t, normalize, exclude_diagonal)
    torch_ = _torch_fp32(z, t, normalize, exclude_diagonal)
    gmax = float(np.abs(g64).max())
    assert_error_within_torch(m, torch_[0], m64, floor=_floor_value(t, m64), name=f"L {what}", rtol=0.0,
                              atol=_tol_value(t, m64))
    assert_error_within_torch(g, torch_[1], g64, floor=_floor_grad(z, t, normalize, exclude_diagonal),
                              name=f"dL/dz {what}",
                              **_tol_grad(t, gmax, z.dtype))


# --------------------------------------------------------------------------------------------------
# values and gradients
# --------------------------------------------------------------------------------------------------

# (n, q, t, normalize, exclude_diagonal): odd and non-power-of-two sizes (ragged edges of the 32-wide
# interpreter tiles); n = 33 and 65 (a last tile of one row: with the diagonal excluded its diagonal
# tile has no valid pair and contributes m_p = -inf); n = 2; q = 2 and q = 1; raw unit rows.
SHAPES = [(37, 19, 2.0, True, True), (33, 5, 2.0, True, True), (65, 12, 1.0, True, False),
          (64, 33, 2.0, False, True), (45, 2, 2.0, True, False), (2, 5, 2.0, True, True), (2, 2, 3.0, True, True),
          (70, 40, 0.5, True, True), (20, 1, 2.0, True, True)]


@pytest.mark.parametrize("n,q,t,normalize,exclude", SHAPES)
def test_values_and_gradients_vs_float64(n, q, t, normalize, exclude):
    z = _z(n, q, n + 3 * q, torch.float32, unit=not normalize).to(DEV)
    kern = _run(GG.gaussian_gram_logmean, z, t, normalize=normalize, exclude_diagonal=exclude)
    _check(kern, z, t, normalize, exclude, f"n={n} q={q} t={t}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n,q,exclude", [(37, 19, True), (96, 48, True), (50, 24, False)])
def test_low_precision_rule(n, q, exclude, dtype):
    """The 2x rule (kernelssl/numerics.py): the kernel's error against float64 (on the rounded input)
    is at most 2x the torch path's in the same dtype (fp32 arithmetic on the upcast input, gradient
    rounded to the input dtype), for the value and the gradient, plus the floors of fp32 rounding
    (_floor_value, _floor_grad)."""
    t = 2.0
    z = _z(n, q, 5 * n + q, dtype).to(DEV)
    mk, gk = _run(GG.gaussian_gram_logmean, z, t, exclude_diagonal=exclude)
    mt, gt = _torch_fp32(z, t, exclude_diagonal=exclude)
    m64, g64 = _reference(z, t, exclude_diagonal=exclude)
    assert mk.dtype == torch.float32 and gk.dtype == dtype
    assert_error_within_torch(mk, mt, m64, floor=_floor_value(t, m64), name=f"L {dtype}")
    assert_error_within_torch(gk, gt, g64, floor=_floor_grad(z, t, exclude_diagonal=exclude), name=f"dL/dz {dtype}")


def test_wang_isola_pdist_formula():
    """Wang & Isola's own code, torch.pdist(x).pow(2).mul(-t).exp().mean().log() on the normalised rows
    (the mean over the n(n-1)/2 pairs i < j, distances computed directly), in float64."""
    t = 2.0
    z = _z(50, 16, 1, torch.float32).to(DEV)
    value = GG.gaussian_gram_logmean(z, t)
    zh = F.normalize(z.cpu().double(), dim=1)
    wang_isola = float(torch.pdist(zh, p=2).pow(2).mul(-t).exp().mean().log())
    assert abs(float(value) - wang_isola) <= _tol_value(t, wang_isola), (float(value), wang_isola)


@pytest.mark.parametrize("t", [1e3, 1e4])
def test_large_t_is_finite_and_correct(t):
    """At t = 1e3 and 1e4 every exp(-t ||zhat_i - zhat_j||^2) of these rows underflows in fp32 (Wang &
    Isola's form in fp32 is log 0 = -inf); the log-sum-exp is finite and matches float64's."""
    z = _z(40, 8, 2, torch.float32).to(DEV)
    zh = F.normalize(z.cpu(), dim=1)
    assert float(torch.pdist(zh).pow(2).mul(-t).exp().mean().log()) == -math.inf
    kern = _run(GG.gaussian_gram_logmean, z, t)
    assert torch.isfinite(kern[0]) and torch.isfinite(kern[1]).all()
    _check(kern, z, t, what=f"t={t}")


@pytest.mark.parametrize("t", [1e3, 1e4])
def test_large_t_diagonal_included(t):
    """Diagonal included: x_ii = 0 dominates, L -> log(n / n^2) = -log n; off-diagonal weights
    exp(-2t (1 - G_ij)) underflow; the gradient (the diagonal's term, along zhat_k, is removed by the
    normalisation Jacobian) is finite and within the stated tolerance of float64's (~0)."""
    z = _z(40, 8, 3, torch.float32).to(DEV)
    value, grad = _run(GG.gaussian_gram_logmean, z, t, exclude_diagonal=False)
    m64, g64 = _reference(z, t, exclude_diagonal=False)
    assert abs(float(value) - m64) <= _tol_value(t, m64)
    assert abs(m64 + math.log(40)) < 1e-12
    assert torch.isfinite(grad).all()
    # scale of the gradient: 4t |g| / ||z_k|| (the largest a unit weight could give), as no entry of g64
    # is representative here (all ~1e-14)
    scale = 4 * t * UPSTREAM / float(z.norm(dim=1).min())
    assert_close(grad, g64, rtol=0.0, atol=(2 * t * 2.0**-19 + 1e-5) * scale, name="gradient")


@pytest.mark.parametrize("exclude", [True, False])
def test_duplicate_rows(exclude):
    """Repeated rows (pairs at distance 0, x = 0: the maximum) and a row repeated with another norm."""
    z = _z(30, 7, 4, torch.float32)
    z[10:15] = z[3]
    z[20] = 3.0 * z[3]
    z = z.to(DEV)
    kern = _run(GG.gaussian_gram_logmean, z, 2.0, exclude_diagonal=exclude)
    _check(kern, z, 2.0, exclude_diagonal=exclude, what="duplicates")


@given(
    n=st.integers(2, 40),
    q=st.integers(1, 40),
    t=st.floats(0.05, 200.0),
    normalize=st.booleans(),
    exclude=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(n=2, q=2, t=2.0, normalize=True, exclude=True, seed=30)
@example(n=33, q=3, t=50.0, normalize=True, exclude=True, seed=1)
def test_random_shapes_and_scales(n, q, t, normalize, exclude, seed):
    """fp32 kernel vs float64 within the stated tolerances, or, where those are beyond fp32 on the input,
    within the 2x rule's bound: 2x the torch path's error."""
    z = _z(n, q, seed, torch.float32, unit=not normalize).to(DEV)
    kern = _run(GG.gaussian_gram_logmean, z, t, normalize=normalize, exclude_diagonal=exclude)
    _check(kern, z, t, normalize, exclude, f"n={n} q={q} t={t}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("normalize,exclude", [(True, True), (False, False), (True, False)])
def test_both_backward_paths(dtype, normalize, exclude, monkeypatch):
    """The two backwards give the float64 gradient: rows resident (the default for q <= 256; column
    splits as a small batch gets them, and one split) and the panel backward (q > 256; here forced: one
    panel, and panels of 20, 20, 5 rows)."""
    n, q, t = 45, 24, 2.0
    z = _z(n, q, 5, dtype, unit=not normalize).to(DEV)
    _, stats = GG.gaussian_gram_forward(z, t, normalize, exclude)
    grad = torch.tensor(UPSTREAM, device=DEV)
    _, g64 = _reference(z, t, normalize, exclude)
    tol = _tol_grad(t, float(np.abs(g64).max()), dtype)
    assert GG.resident_splits(n, 32, 32) == (2, 1)  # interpreter blocks: 2 row tiles x 2 column splits
    split = GG.gaussian_gram_backward(grad, z, stats, t, normalize, exclude)
    assert_close(split, g64, **tol, name="resident, 2 splits vs float64")
    monkeypatch.setattr(GG, "_RESIDENT_TARGET_PROGRAMS", 1)
    assert GG.resident_splits(n, 32, 32) == (1, 2)
    whole = GG.gaussian_gram_backward(grad, z, stats, t, normalize, exclude)
    assert_close(whole, g64, **tol, name="resident, 1 split vs float64")
    one = GG.gaussian_gram_backward(grad, z, stats, t, normalize, exclude, resident=False)
    many = GG.gaussian_gram_backward(grad, z, stats, t, normalize, exclude, panel_rows=20)
    assert_close(one, g64, **tol, name="1 panel vs float64")
    assert_close(many, g64, **tol, name="3 panels vs float64")


@pytest.mark.skipif(CUDA, reason="records the interpreter's launches")
@pytest.mark.parametrize("dtype,normalize,exclude", [(torch.float32, True, True), (torch.bfloat16, True, True),
                                                     (torch.float16, False, False)],
                         ids=["fp32", "bf16", "fp16-raw-diagonal"])
def test_views_batched_in_one_launch_per_stage(dtype, normalize, exclude, monkeypatch):
    """P = 2 views stacked ``(2, n, q)`` (Wang & Isola's loss): the values, statistics and gradients are
    bitwise those of the per-view calls (each program computes the same tiles in the same order; the
    column splits are the same here, asserted), from ONE launch per stage -- row scales (forward only:
    the backward takes the saved ones), Gram tiles over both views, one reduce program per view, the
    rows-resident backward over both views, one split reduce -- with the grids recorded; the panel
    backward (view by view) and a non-contiguous stack give the same bits."""
    n, q, t = 45, 24, 2.0
    za, zb = (_z(n, q, s, dtype, unit=not normalize).to(DEV) for s in (21, 22))
    up = torch.tensor([UPSTREAM, -0.75], device=DEV)
    launches = helpers.record_interpreted_launches(monkeypatch)
    zz = torch.stack([za, zb]).requires_grad_(True)
    values = GG.gaussian_gram_logmean(zz, t, normalize=normalize, exclude_diagonal=exclude)
    (values * up).sum().backward()
    tiles = -(-n // 32)  # interpreter: 32-wide tiles
    splits, _ = GG.resident_splits(n, 32, 32, 2)
    assert (splits, _) == GG.resident_splits(n, 32, 32, 1) == (2, 1)
    assert launches == [("_row_scales_kernel", (-(-2 * n // 32),)),
                        ("_gram_lse_kernel", (2 * tiles * (tiles + 1) // 2,)), ("_lse_reduce_kernel", (2,)),
                        ("_resident_backward_kernel", (2 * tiles * splits,)),
                        ("_split_reduce_kernel", (-(-2 * n // 32),))], launches  # q = 24: one q tile
    assert values.shape == (2,) and zz.grad.shape == (2, n, q) and zz.grad.dtype == dtype
    for b, zv in enumerate((za, zb)):
        one = zv.detach().clone().requires_grad_(True)
        value = GG.gaussian_gram_logmean(one, t, normalize=normalize, exclude_diagonal=exclude)
        (value * up[b]).backward()
        assert torch.equal(values[b], value), (b, values[b], value)
        assert torch.equal(zz.grad[b], one.grad), b
    # the same bits from a non-contiguous stack (views interleaved in memory) and the panel backward
    inter = torch.stack([za, zb], dim=1).transpose(0, 1)
    assert not inter.is_contiguous()
    v2, stats, rinv, proj = GG.gaussian_gram_forward(inter, t, normalize, exclude, return_scales=True)
    assert torch.equal(v2, values.detach())
    for panel in (dict(), dict(resident=False), dict(panel_rows=20)):
        g2 = GG.gaussian_gram_backward(up, inter, stats, t, normalize, exclude, scales=(rinv, proj), **panel)
        if panel:  # per view, by the panel path
            ref = torch.stack([GG.gaussian_gram_backward(up[b], zv, stats[b], t, normalize, exclude, **panel)
                               for b, zv in enumerate((za, zb))])
            assert torch.equal(g2, ref), panel
        else:
            assert torch.equal(g2, zz.grad), panel


@pytest.mark.skipif(CUDA, reason="records the interpreter's launches")
def test_align_uniform_loss_makes_one_batched_call(monkeypatch):
    """kernelssl.functional.align_uniform_loss on the Triton backend stacks the views first (one row
    prescale for both) and computes both views' uniformity in one fused call (one Gram-tile launch for
    both) with the value and components bitwise those of the
    per-view composition ``align + w * 0.5 * (u_a + u_b)``, the gradients to a few fp32 ulps."""
    from torch.utils._python_dispatch import TorchDispatchMode

    za, zb = (_z(40, 20, s, torch.float32).to(DEV) for s in (31, 32))
    kw = dict(alpha=2.0, t=2.0, uniformity_weight=0.7)
    launches = helpers.record_interpreted_launches(monkeypatch)

    class Ops(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    a, b = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    with Ops():
        comp = KF.align_uniform_loss(a, b, **kw, backend="triton", return_components=True)
    assert Ops.seen.count("stack") == 1 and Ops.seen.count("exp2") == 1, Ops.seen  # one prescale for both
    (UPSTREAM * comp.loss).backward()
    names = [name for name, _ in launches]
    assert names.count("_gram_lse_kernel") == 1 and names.count("_resident_backward_kernel") == 1, names
    a2, b2 = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    pa, pb = prescale_rows(a2), prescale_rows(b2)  # the loss's own steps, per view
    u_a, u_b = GG.gaussian_gram_logmean(pa, 2.0), GG.gaussian_gram_logmean(pb, 2.0)
    loss = U.alignment(pa, pb, 2.0, normalize=True) + 0.7 * 0.5 * (u_a + u_b)
    (UPSTREAM * loss).backward()
    assert torch.equal(comp.uniformity_a, u_a) and torch.equal(comp.uniformity_b, u_b)
    assert torch.equal(comp.loss, loss), (comp.loss, loss)
    # the gradients: equal up to the order in which autograd adds the three contributions at the
    # prescaled rows (alignment's two and the uniformity's, which arrives through the stack): a few
    # fp32 ulps of the largest entry
    for got, want, name in ((a.grad, a2.grad, "dL/dz_a"), (b.grad, b2.grad, "dL/dz_b")):
        assert_close(got, want, rtol=0.0, atol=2.0**-22 * float(want.abs().max()), name=name)
    torch_loss = KF.align_uniform_loss(za, zb, **kw, backend="torch")
    assert_close(comp.loss, torch_loss, rtol=1e-5, atol=1e-6, name="triton vs torch backend")


def test_resident_split_policy():
    """Enough programs for 4 per SM: a small batch is split over the columns (whole splits), a large one
    is not; rows wider than 256 take the panel backward."""
    assert GG.resident_splits(4096, 64, 64) == (8, 8)  # 64 row tiles x 8 splits of 8 column tiles
    assert GG.resident_splits(65536, 64, 64) == (1, 1024)
    assert GG.resident_splits(1000, 64, 64) == (16, 1)
    # one split (its epilogue fused, no split reduce) when the row tiles alone fill the SMs' one program
    # each at >= 90%: Wang & Isola's two views of 4096 (128 row tiles on 132 SMs), not one view (64)
    assert GG.resident_splits(4096, 64, 64, 2, 132) == (1, 64)
    assert GG.resident_splits(4096, 64, 64, 1, 132) == (8, 8)
    assert GG.resident_splits(65536, 64, 64, 1, 132) == (1, 1024)
    assert GG.resident_splits(1000, 64, 64, 10, 132) == (4, 4)  # 160 row tiles: 61% of 2 waves
    assert GG.resident_splits(1000, 64, 64, 16, 132) == (1, 16)  # 256 row tiles: 97% of 2 waves
    assert GG.resident_ok(128) and GG.resident_ok(100) and GG.resident_ok(256)
    assert not GG.resident_ok(200) and not GG.resident_ok(272)  # unaligned past 128 spills; past 256
    with pytest.raises(ValueError, match="resident"):
        GG.gaussian_gram_backward(torch.ones((), device=DEV), torch.ones(4, 300, device=DEV), torch.ones(2, device=DEV),
                                  2.0, resident=True)


@pytest.mark.skipif(CUDA, reason="on a GPU every test runs the GPU configuration")
@pytest.mark.parametrize("n,q", [(150, 45), (140, 48)], ids=["q45-unaligned", "q48-aligned"])
def test_gpu_block_configuration_under_interpreter(n, q, monkeypatch):
    """The GPU block sizes (_common.gram_config: 64/128-wide tiles) run through the interpreter."""
    gpu_config = helpers.use_gpu_gram_config(monkeypatch, GG)
    assert gpu_config(torch.float32, q)["block"] == (64 if q % 16 else 128)
    z = _z(n, q, 11, torch.float32).to(DEV)
    _check(_run(GG.gaussian_gram_logmean, z, 2.0), z, 2.0, what=f"GPU blocks n={n} q={q}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_deterministic(dtype):
    z = _z(100, 40, 1, dtype).to(DEV)
    m1, g1 = _run(GG.gaussian_gram_logmean, z, 2.0)
    m2, g2 = _run(GG.gaussian_gram_logmean, z, 2.0)
    assert torch.equal(m1, m2) and torch.equal(g1, g2)


def test_non_contiguous_input():
    zt = _z(30, 50, 2, torch.float32).to(DEV).t()  # (q, n) storage, used transposed
    assert not zt.is_contiguous()
    m, g = _run(GG.gaussian_gram_logmean, zt, 2.0)
    mc, gc = _run(GG.gaussian_gram_logmean, zt.contiguous(), 2.0)
    assert_close(m, mc, rtol=1e-6, atol=0, name="L strided")
    assert_close(g, gc, rtol=1e-6, atol=1e-7 * float(gc.abs().max()), name="grad strided")


def test_zero_row_and_non_finite():
    z = _z(20, 9, 4, torch.float32).to(DEV)
    z[3] = 0.0  # normalises to 0 (F.normalize): x_3j = -2t; its gradient is g / eps
    m, g = _run(GG.gaussian_gram_logmean, z, 2.0)
    mt, gt = _torch_fp32(z, 2.0)
    assert torch.isfinite(m) and torch.isfinite(g).all()
    assert_close(m, mt, rtol=1e-6, atol=0, name="L with a zero row")
    assert_close(g, gt, rtol=1e-5, atol=1e-5 * float(gt.abs().max()), name="grad with a zero row")
    z[5, 2] = math.nan  # NaN propagates, never a silent finite number
    m, g = _run(GG.gaussian_gram_logmean, z, 2.0)
    assert torch.isnan(m) and torch.isnan(g).any()


def test_no_grad_and_frozen_input():
    z = _z(33, 17, 6, torch.float32).to(DEV)
    with torch.no_grad():
        m0 = GG.gaussian_gram_logmean(z.clone().requires_grad_(True), 2.0)
    m1 = GG.gaussian_gram_logmean(z, 2.0)  # requires_grad=False
    assert m0.grad_fn is None and m1.grad_fn is None and not m1.requires_grad
    assert torch.equal(m0, m1)


@pytest.mark.parametrize("exclude", [True, False])
def test_float64_is_computed_in_float64(exclude):
    """backend="triton" with float64 rows: the dispatcher sends them to the torch tier, float64 end to end."""
    z = _z(20, 7, 8).to(DEV)
    m, g = _run(lambda x, t, **k: KF.gaussian_gram_logmean(x, t, backend="triton", **k), z, 2.0,
                exclude_diagonal=exclude)
    m64, g64 = _run(_formula, z, 2.0, True, exclude)
    assert m.dtype == torch.float64 and g.dtype == torch.float64
    assert_close(m, m64, rtol=1e-12, atol=1e-12, name="L float64")
    assert_close(g, g64, rtol=1e-12, atol=1e-12 * float(g64.abs().max()), name="grad float64")


def test_bad_input():
    """Bad input is refused once, by the functional API, before the dispatcher picks the kernels."""
    z = torch.ones(4, 3, device=DEV)

    def op(x, *a, **k):
        return KF.gaussian_gram_logmean(x, *a, backend="triton", **k)

    with pytest.raises(TypeError, match="z: expected a floating-point tensor"):
        op(torch.ones(4, 3, dtype=torch.int64), 2.0)
    with pytest.raises(ValueError, match="z: expected a 2-D tensor"):
        op(torch.ones(4, device=DEV), 2.0)
    with pytest.raises(ValueError, match="z: expected a 2-D tensor"):
        op(torch.ones(1, 2, 4, 3, device=DEV), 2.0)
    with pytest.raises(ValueError, match="z: expected at least 2 rows"):
        op(torch.ones(1, 3, device=DEV), 2.0)
    with pytest.raises(ValueError, match="z: expected at least 1 columns"):
        op(torch.ones(3, 0, device=DEV), 2.0)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="t: expected a finite number > 0"):
            op(z, bad)
    for bad in (True, "2", torch.tensor(2.0)):
        with pytest.raises(TypeError, match="t: expected a positive number"):
            op(z, bad)
    with pytest.raises(TypeError, match="normalize: expected a bool"):
        op(z, 2.0, normalize=1)
    with pytest.raises(TypeError, match="exclude_diagonal: expected a bool"):
        op(z, 2.0, exclude_diagonal="no")
    with pytest.raises(ValueError, match="input_precision"):
        op(z, 2.0, input_precision="fp32")
    # one row is a valid input with the diagonal included: L = log phi(1) = 0 (G_11 = 1 up to fp32 ulps)
    one = float(GG.gaussian_gram_logmean(torch.ones(1, 3, device=DEV), 2.0, exclude_diagonal=False))
    assert abs(one) <= _tol_value(2.0, 0.0), one


@pytest.mark.skipif(CUDA, reason="CPU dispatch")
def test_cpu_runs_the_kernels_under_the_interpreter(monkeypatch):
    # the torch tier: the CPU kernels' math
    helpers.forbid_torch_tier(monkeypatch, U, "gaussian_gram_logmean_stats", "gaussian_gram_logmean_backward")
    _run(GG.gaussian_gram_logmean, _z(20, 6, 10, torch.float32), 2.0)


@pytest.mark.skipif(CUDA, reason="CPU dispatch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_cpu_kernel_without_interpreter_is_the_torch_math(monkeypatch, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # dispatch.interpreting() reads it at call time
    z = _z(40, 11, 11, dtype)
    for normalize, exclude in ((True, True), (False, False)):
        zz = z if normalize else F.normalize(z.double(), dim=1).to(dtype)
        kern = _run(GG.gaussian_gram_logmean, zz, 2.0, normalize=normalize, exclude_diagonal=exclude)
        _check(kern, zz, 2.0, normalize, exclude, f"torch math normalize={normalize}")


def test_every_launch_runs_inside_a_guard_for_its_tensors_device(monkeypatch):
    """As test_triton_common.py for the other three ops: the module launches through the guarded
    wrapper, and (interpreter) every launch is inside a guard entered with its tensors' device."""
    from kernelssl.triton import _common as L

    assert GG.wrap_triton is L.wrap_triton
    if CUDA:
        return
    _, launches = helpers.record_guarded_launches(monkeypatch)
    z = _z(40, 9, 0, torch.float32)
    _run(GG.gaussian_gram_logmean, z, 2.0)
    GG.gaussian_gram_backward(torch.ones(()), z, GG.gaussian_gram_forward(z, 2.0)[1], 2.0, resident=False)
    assert {"_row_scales_kernel", "_gram_lse_kernel", "_lse_reduce_kernel", "_resident_backward_kernel",
            "_split_reduce_kernel", "_gram_weights_kernel", "_panel_matmul_kernel"} <= {n for n, _, _ in launches}
    assert all(g == dev for _, g, dev in launches), launches


# the same ops and schemas in both cases: the second (~2.5 s) in the slow tier
@pytest.mark.parametrize(
    "dtype,normalize,exclude",
    [(torch.float32, True, True), pytest.param(torch.bfloat16, False, False, marks=pytest.mark.slow)],
    ids=["fp32-normalize", "bf16-raw-diagonal"])
def test_opcheck(dtype, normalize, exclude):
    z = _z(37, 19, 14, dtype, unit=not normalize).to(DEV).requires_grad_(True)
    args = (2.0, normalize, exclude, "tf32x3")
    torch.library.opcheck(torch.ops.kernelssl.gaussian_gram_logmean.default, (z, *args))
    _, stats, rinv, proj = GG.gaussian_gram_forward(z.detach(), *args, return_scales=True)
    torch.library.opcheck(torch.ops.kernelssl.gaussian_gram_logmean_backward.default,
                          (torch.tensor(UPSTREAM, device=DEV), z.detach(), stats, rinv, proj, *args))
    # two views (P, n, q) in one call: a (P,) value, (P, 2) statistics, (P n,) row scales
    zz = torch.stack([z.detach(), z.detach().flip(0)]).requires_grad_(True)
    torch.library.opcheck(torch.ops.kernelssl.gaussian_gram_logmean.default, (zz, *args))
    _, stats, rinv, proj = GG.gaussian_gram_forward(zz.detach(), *args, return_scales=True)
    assert stats.shape == (2, 2) and rinv.shape == proj.shape == (2 * 37,)
    torch.library.opcheck(torch.ops.kernelssl.gaussian_gram_logmean_backward.default,
                          (torch.tensor([UPSTREAM, -0.5], device=DEV), zz.detach(), stats, rinv, proj, *args))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    """Forward + backward under torch.compile(fullgraph=True): no graph break, same numbers as eager
    (on CPU the op stays one opaque call that runs the interpreted kernels)."""
    torch._dynamo.reset()
    z = _z(40, 24, 15, torch.float32).to(DEV)
    fn = torch.compile(lambda x: UPSTREAM * GG.gaussian_gram_logmean(x, 2.0), backend=backend, fullgraph=True)
    m, g = _run(fn, z)
    me, ge = _run(lambda x: UPSTREAM * GG.gaussian_gram_logmean(x, 2.0), z)
    assert_close(m, me, rtol=1e-6, atol=0, name="compiled L")
    assert_close(g, ge, rtol=1e-6, atol=1e-6 * float(ge.abs().max()), name="compiled grad")
    # two views in one call (Wang & Isola's loss), (2,) values with distinct weights
    w = torch.tensor([UPSTREAM, -0.5], device=DEV)
    fn2 = torch.compile(lambda x: (w * GG.gaussian_gram_logmean(x, 2.0)).sum(), backend=backend, fullgraph=True)
    zz = torch.stack([z, z.flip(1)])
    m, g = _run(fn2, zz)
    me, ge = _run(lambda x: (w * GG.gaussian_gram_logmean(x, 2.0)).sum(), zz)
    assert_close(m, me, rtol=1e-6, atol=0, name="compiled L, 2 views")
    assert_close(g, ge, rtol=1e-6, atol=1e-6 * float(ge.abs().max()), name="compiled grad, 2 views")


def test_registered_in_the_backend_table():
    assert "gaussian_gram" in dispatch.TRITON_OPS


# --------------------------------------------------------------------------------------------------
# precision policy (docs/numerics.md): the default tf32x3, emulated on the CPU
# --------------------------------------------------------------------------------------------------


def _emulated_logmean(z, t, g, precision):
    """(L, dL/dz) for L = g L(z) (normalize=True, diagonal excluded), in the kernels' own decomposition
    (module docstring): Gram of the raw rows scaled by r_i r_j, the online log-sum-exp, the panel
    P = exp(x - m) r_j and the backward GEMM P Z with its Jacobian epilogue; every GEMM by
    kernelssl.numerics.mm at ``precision``."""
    from kernelssl.numerics import mm

    n = z.shape[0]
    r = 1.0 / z.norm(dim=1).clamp_min(1e-12)  # _row_scales_kernel
    gram = mm(z, z.T.contiguous(), precision) * r[:, None] * r[None, :]
    x = (2.0 * t) * (gram - 1.0)
    x.fill_diagonal_(-math.inf)
    m = x.max()
    w = torch.exp(x - m)
    s = w.sum()
    value = m + torch.log(s) - (math.log(n) + math.log(n - 1))
    d_k = (w * gram).sum(1)
    acc = mm(w * r[None, :], z, precision)  # _panel_matmul_kernel (MODE 0: fp32 rows)
    grad = (g * 4.0 * t / s) * (r[:, None] * acc - (r * r * d_k)[:, None] * z)
    return value.reshape(()), grad


def test_tf32x3_default_is_within_2x_of_ieee_emulated():
    """With every kernel GEMM in emulated tf32x3, the error of L and of dL/dz against
    float64 is within 2x of full fp32's ("ieee"); plain tf32 is far worse.  Uniformity's rows are q = 128
    long (a typical projector width); n = 2048 rows instead of the benchmark's 4096 keeps the CPU
    emulation to a few seconds (a Gram entry's error is set by q, not by n)."""
    from kernelssl.numerics import check_within_2x_of_ieee

    check_within_2x_of_ieee(*emulated_paper_case())


def emulated_paper_case():
    """``(run, ref, names)`` of the emulation above (also used by test_targets)."""
    n, q, t = 2048, 128, 2.0
    z = _z(n, q, 21)
    ref = _emulated_logmean(z, t, UPSTREAM, "ieee")  # float64 throughout
    z32 = z.float()
    return (lambda p: _emulated_logmean(z32, t, UPSTREAM, p)), ref, ("L", "dL/dz")


# --------------------------------------------------------------------------------------------------
# GPU: the uniformity shapes (skipped without CUDA)
# --------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n,q", [(4096, 128), (2048, 8192)])
def test_gpu_shapes_precision_rule(n, q, dtype):
    t = 2.0
    z = _z(n, q, 16, dtype).to("cuda")
    mk, gk = _run(GG.gaussian_gram_logmean, z, t)
    mt, gt = _torch_fp32(z, t)
    m64, g64 = _run(_formula, z.double(), t)
    m64, g64 = float(m64), to_numpy(g64)
    assert_error_within_torch(mk, mt, m64, floor=_floor_value(t, m64), name=f"L {dtype}")
    assert_error_within_torch(gk, gt, g64, floor=_floor_grad(z, t), name=f"dL/dz {dtype}")


@needs_cuda
def test_gpu_large_batch_memory():
    """n = 65536, q = 128: the n x n Gram would be 16 GiB in fp32 (the pdist vector 8 GiB); the kernels
    (rows-resident backward, one column split at this n) need the gradient, one (n, q) fp32 partial and
    O(n) vectors (the forward's partials: 2 x 4 bytes per 128 x 128 tile)."""
    n, q = 65536, 128
    z = torch.randn(n, q, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    value = GG.gaussian_gram_logmean(z, 2.0)
    value.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert GG.resident_splits(n, 64, 64)[0] == 1
    budget = n * q * 2 + n * q * 4 + 64 * 2**20  # grad + partial + slack
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()
    assert extra <= budget, (extra / 2**20, budget / 2**20)


@needs_cuda
def test_gpu_deterministic():
    z = _z(4096, 128, 17, torch.bfloat16).to("cuda")
    m1, g1 = _run(GG.gaussian_gram_logmean, z, 2.0)
    m2, g2 = _run(GG.gaussian_gram_logmean, z, 2.0)
    assert torch.equal(m1, m2) and torch.equal(g1, g2)


@needs_cuda
def test_gpu_compile_inductor():
    torch._dynamo.reset()
    z = _z(4096, 128, 18, torch.bfloat16).to("cuda")
    fn = torch.compile(lambda x: UPSTREAM * GG.gaussian_gram_logmean(x, 2.0), fullgraph=True)
    m, g = _run(fn, z)
    me, ge = _run(lambda x: UPSTREAM * GG.gaussian_gram_logmean(x, 2.0), z)
    assert_close(m, me, rtol=1e-6, atol=0, name="compiled L")
    assert_close(g, ge, rtol=2.0**-8, atol=1e-5 * float(ge.float().abs().max()), name="compiled grad")


@needs_cuda
def test_gpu_tensors_on_a_device_that_is_not_the_current_one(monkeypatch):
    """As test_triton_common.py for the other ops: tensors on the last CUDA device while device 0 is
    current -- every launch guarded with the tensors' device, and the same value and gradient as on
    the current device (both backward paths)."""

    def both(device):
        out = []
        for q in (24, 300):  # rows resident; panel backward
            z = _z(200, q, 31, torch.float32).to(device)
            out += [t.cpu().double() for t in _run(GG.gaussian_gram_logmean, z, 2.0)]
        return out

    helpers.check_on_a_device_that_is_not_the_current_one(monkeypatch, both)


@needs_cuda
def test_gpu_tf32x3_default_within_2x_of_ieee():
    """At the uniformity shape (n = 4096, q = 128, fp32 rows): the default (tf32x3) error of L and dL/dz
    against float64 is within 2x of "ieee"'s; plain "tf32" stays sane (1e-2 of L's scale 2t)."""
    t = 2.0
    z = _z(4096, 128, 19, torch.float32).to("cuda")
    m64, g64 = _run(_formula, z.double(), t)
    with helpers.tf32_flag_off():
        md, gd = _run(GG.gaussian_gram_logmean, z, t)  # default: tf32x3
    mi, gi = _run(GG.gaussian_gram_logmean, z, t, input_precision="ieee")
    m3, _ = _run(GG.gaussian_gram_logmean, z, t, input_precision="tf32")
    err_md, err_mi = float((md.double() - m64).abs()), float((mi.double() - m64).abs())
    assert err_md <= 2 * max(err_mi, _floor_value(t, float(m64))), (err_md, err_mi)
    err_gd, err_gi = float((gd.double() - g64).abs().max()), float((gi.double() - g64).abs().max())
    assert err_gd <= 2 * max(err_gi, 2.0**-22 * float(g64.abs().max())), (err_gd, err_gi)
    assert float((m3.double() - m64).abs()) <= 1e-2 * 2 * t


# --------------------------------------------------------------------------------------------------
# GPU code generation without a GPU (tests/compile_targets.py)
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="the GPU tests run the kernels themselves")
@pytest.mark.slow  # a subprocess compiling every variant for sm_90 (~10 s)
def test_kernels_compile_for_sm90():
    """Every kernel variant the GPU path issues (n = 4096 and 65536, q = 128, in bf16, fp16 and fp32 with
    each input_precision; unaligned rows q = 100 and 8200 in every dtype; the diagonal included, raw rows,
    several backward panels) compiles to an sm_90 cubin, specialised as a real launch would be, with no
    register spills and within the 227 KiB of shared memory; the Gram tiles and the backward GEMM use
    wgmma for 16-bit operands and for fp32 with tf32x3 / tf32, the FMA units only with "ieee".  The
    recipes with dimensions equal to 1 (n = 1 with the diagonal, q = 1, a last panel of one row)
    compile too."""
    variants = helpers.sm90_variants("gaussian_gram")
    assert {v["kernel"] for v in variants} == {"_row_scales_kernel", "_gram_lse_kernel", "_lse_reduce_kernel",
                                               "_resident_backward_kernel", "_split_reduce_kernel",
                                               "_gram_weights_kernel", "_panel_matmul_kernel"}
    gemms = [v for v in variants if "INPUT_PRECISION" in v["constexprs"]]
    helpers.assert_tensor_cores_unless_ieee(gemms, "INPUT_PRECISION", mma_sync=False)
    assert all(v["constexprs"]["SCALE_GIVEN"] for v in variants if v["kernel"] == "_panel_matmul_kernel")
