"""Second derivatives (``create_graph=True``: gradient penalties, Hessian-vector products) through every
op and loss, on every tier.  The custom autograd Functions of the torch tier and the fused ops' backwards
differentiate a recomputation in plain autograd under ``create_graph=True``
(:func:`kernelssl.ops._common.recorded_backward`), so the second derivative is the true one, never one
that takes the hand-written gradient as a constant.  float64 against a central difference of the first
gradient (:func:`helpers.check_second_derivative`); the fused tier (fp32, the interpreter on a CPU)
against the torch tier by the 2x rule."""
from __future__ import annotations

import pytest
import torch

import kernelssl.functional as KF
from helpers import assert_close, assert_error_within_torch, check_second_derivative
from helpers import random_rows as _z
from kernelssl import AlignUniformLoss, HSICLoss, MECLoss, SFRIKLoss, UniformityLoss

B3 = (1.0, 40.0, 40.0)
_MAPS = [t.double() for t in (*KF.sample_rff("imq", 4, 24, generator=torch.Generator().manual_seed(3)),
                               *KF.sample_rff("imq", 4, 16, generator=torch.Generator().manual_seed(4)))]


def _rff(backend):
    def f(a, b):
        zy, zz = KF.rff_hsic(torch.stack([a, b, a * b]), *(m.to(a.dtype) for m in _MAPS), 1.3, backend=backend)
        return 2.0 * zy - 3.0 * zz.sqrt()
    return f


_HSIC = HSICLoss(gamma=2.0)
_HSIC_FEATURES = [t.double() for t in _HSIC.draw_features(4)]

# torch-tier (float64) ops and losses, two inputs each
CASES = {
    "rff_hsic": _rff("torch"),
    "HSICLoss": lambda a, b: _HSIC(a, b, features=_HSIC_FEATURES),
    "legendre_gram_mean": lambda a, b: KF.legendre_gram_mean(a, B3, backend="torch") * KF.legendre_gram_mean(
        b, B3, normalize=False, backend="torch"),
    "sfrik_loss": lambda a, b: KF.sfrik_loss(a, b, sim_weight=3.0, backend="torch"),
    "SFRIKLoss": lambda a, b: SFRIKLoss(sim_weight=3.0)(a, b),
    "SFRIKLoss through a layer": lambda a, b: SFRIKLoss(sim_weight=3.0)(torch.tanh(a @ b.t()[:, :4]), a * b),
    "uniformity": lambda a, b: KF.uniformity(a, backend="torch") + KF.gaussian_gram_logmean(
        b, 1.5, normalize=False, backend="torch"),
    "UniformityLoss": lambda a, b: UniformityLoss()(a) - UniformityLoss(t=0.5)(b),
    "AlignUniformLoss": lambda a, b: AlignUniformLoss()(a, b),
    "taylor_logdet": lambda a, b: KF.taylor_logdet(a, b, 0.3, 3, backend="torch"),
    "MECLoss": lambda a, b: MECLoss()(a, b),
}


@pytest.mark.parametrize("name", CASES)
def test_second_derivative_matches_finite_differences(name):
    check_second_derivative(CASES[name], _z(7, 4, seed=1), _z(7, 4, seed=2), seed=5)


def test_second_derivative_with_one_view_frozen():
    b = _z(7, 4, seed=2)
    check_second_derivative(lambda a: SFRIKLoss(sim_weight=3.0)(a, b), _z(7, 4, seed=1), seed=6)
    check_second_derivative(lambda a: _HSIC(a, b, features=_HSIC_FEATURES), _z(7, 4, seed=1), seed=7)


TRITON_CASES = {
    "rff_hsic": lambda backend: _rff(backend),
    "legendre_gram_mean": lambda backend: lambda a, b: KF.legendre_gram_mean(a, B3, backend=backend) * (
        1.0 + KF.legendre_gram_mean(b, B3, normalize=False, backend=backend)),
    "sfrik_loss": lambda backend: lambda a, b: KF.sfrik_loss(a, b, sim_weight=3.0, backend=backend),
    "uniformity": lambda backend: lambda a, b: KF.align_uniform_loss(a, b, backend=backend),
    "taylor_logdet": lambda backend: lambda a, b: KF.taylor_logdet(a, b, 0.3, 3, backend=backend),
}


def _penalty_gradient(f, a, b):
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ga, gb = torch.autograd.grad(f(a, b), (a, b), create_graph=True)
    weight = torch.linspace(-1.0, 2.0, ga.numel(), dtype=ga.dtype).view(ga.shape)
    return torch.autograd.grad((weight * ga).sum() + gb.square().sum(), (a, b))


@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton_second_derivative_within_2x_of_torch(name):
    pytest.importorskip("triton")
    a, b = _z(6, 4, seed=3), _z(6, 4, seed=4)
    exact = _penalty_gradient(TRITON_CASES[name]("torch"), a, b)
    torch32 = _penalty_gradient(TRITON_CASES[name]("torch"), a.float(), b.float())
    fused = _penalty_gradient(TRITON_CASES[name]("triton"), a.float(), b.float())
    for i, (f, t, e) in enumerate(zip(fused, torch32, exact)):
        floor = 64 * 2.0**-24 * float(e.abs().max())
        assert_error_within_torch(f, t, e, floor=floor, name=f"{name} d(penalty)/d(input {i})")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_sfrik_second_derivative_on_rows_of_extreme_norm(dtype):
    """A row of norm far below ``F.normalize``'s eps (1e-12) and one whose sum of squares overflows, both
    normalised exactly by the fused forward's power-of-two prescale: under ``create_graph=True`` the
    backward differentiates that same prescaled function, so the first gradient is the plain backward's,
    row by row, and the Hessian-vector product is plain autograd's of the prescaled eager form.  (The
    tiny norm is chosen so that the Hessian, ~1 / ||z||^2, stays finite in the dtype.)  Tolerances:
    float64, two algorithms for one function (the fused gradient, plain autograd), 1e-10 of each row's
    largest entry; float32, the fp32 gradient tolerance of kernelssl.numerics (FP32_TOL)."""
    from kernelssl.numerics import FP32_TOL
    from kernelssl.ops import sfrik_loss as SL

    tiny, huge = (1e-150, 1e160) if dtype == torch.float64 else (1e-15, 1e20)
    za, zb = _z(7, 4, seed=1).to(dtype), _z(7, 4, seed=2).to(dtype)
    za[1] = za[1] * tiny
    za[4] = za[4] * huge
    crit = SFRIKLoss(sim_weight=3.0)
    a = za.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(crit(a, zb), a)
    a = za.clone().requires_grad_(True)
    (first,) = torch.autograd.grad(crit(a, zb), a, create_graph=True)
    v = torch.randn(za.shape, generator=torch.Generator().manual_seed(8), dtype=dtype)
    (hvp,) = torch.autograd.grad((first * v).sum(), a)
    r = za.clone().requires_grad_(True)
    (ref_first,) = torch.autograd.grad(
        SL.sfrik_loss(r, zb, sim_weight=3.0, eager=True, prescale=True)[0], r, create_graph=True)
    (ref_hvp,) = torch.autograd.grad((ref_first * v).sum(), r)
    rel = 1e-10 if dtype == torch.float64 else FP32_TOL["grad_atol_rel"]
    assert bool(torch.isfinite(plain).all()) and bool(torch.isfinite(hvp).all())
    for i in range(za.shape[0]):  # row by row: the tiny row's gradient is ~1/||z|| larger than the others
        scale = float(plain[i].abs().max())
        assert_close(first[i], plain[i], rtol=0.0, atol=rel * scale, name=f"first gradient, row {i}")
        assert_close(hvp[i], ref_hvp[i], rtol=0.0, atol=rel * float(ref_hvp[i].abs().max()), name=f"HVP, row {i}")
