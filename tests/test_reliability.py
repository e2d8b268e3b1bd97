"""Hostile-but-realistic inputs: torch.func through the random-feature HSIC paths, dtypes the ops do not
take, hyper-parameters out of a dtype's range, NumPy scalars as hyper-parameters."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kernelssl.functional as KF
from helpers import check_torch_func
from helpers import random_rows as _z
from kernelssl import AlignUniformLoss, HSICLoss, MECLoss, SFRIKLoss, UniformityLoss

_CRIT = HSICLoss(num_features=16, gamma=2.0)
_FEATURES = _CRIT.draw_features(5, dtype=torch.float64)


@pytest.mark.parametrize("name", ["HSICLoss", "rff_hsic", "ssl_hsic_loss"])
def test_torch_func_through_random_features(name):
    f = {
        "HSICLoss": lambda a, b: _CRIT(a, b, features=_FEATURES),
        "rff_hsic": lambda a, b: KF.rff_hsic(torch.stack([a, b]), *_FEATURES, 1.3)[0],
        # drawn inside: torch.func.vmap refuses random draws, so grad and jvp only (below)
        "ssl_hsic_loss": None,
    }[name]
    if f is not None:
        check_torch_func(f, _z(8, 5, seed=0), _z(8, 5, seed=1), _z(8, 5, seed=2))
        return
    a, b, t = _z(8, 5, seed=0), _z(8, 5, seed=1), _z(8, 5, seed=2)

    def loss(x):
        return KF.ssl_hsic_loss(torch.stack([x, b]), num_features=16, generator=torch.Generator().manual_seed(4))
    x = a.clone().requires_grad_()
    loss(x).backward()
    torch.testing.assert_close(torch.func.grad(loss)(a), x.grad, rtol=1e-10, atol=1e-12)
    _, tangent_out = torch.func.jvp(loss, (a,), (t,))
    torch.testing.assert_close(tangent_out, (x.grad * t).sum(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("crit", [SFRIKLoss(), MECLoss(), HSICLoss(), AlignUniformLoss()], ids=type)
def test_float8_inputs_are_refused_with_the_accepted_dtypes(crit):
    z = torch.randn(8, 4).to(torch.float8_e4m3fn)
    msg = r"(z_a|views\[0\]): expected a floating-point tensor \(float16, bfloat16, float32 or float64\), got dtype "
    with pytest.raises(TypeError, match=msg + "torch.float8_e4m3fn"):
        crit(z, z)


def test_hyper_parameters_out_of_a_dtypes_range_are_named():
    with pytest.raises(ValueError, match=r"t: expected a number <= 3.40282e\+38"):
        UniformityLoss(t=1e39)
    for exact in (False, True):
        with pytest.raises(ValueError, match="kernel_scale: expected a number >= 7.88861e-31"):
            HSICLoss(kernel_scale=1e-39, exact=exact)
    with pytest.raises(ValueError, match="kernel_scale: expected a number >= 7.88861e-31"):
        KF.ssl_hsic_loss(torch.randn(2, 8, 4), kernel_scale=1e-39)
    a, b = _z(8, 4, seed=0).float(), _z(8, 4, seed=1).float()
    assert torch.isfinite(HSICLoss(kernel_scale=2.0**-100)(a, b))  # the floor itself computes


def test_numpy_integers_and_floats_are_hyper_parameters():
    a, b = _z(8, 4, seed=0), _z(8, 4, seed=1)
    assert torch.equal(MECLoss(order=np.int64(4))(a, b), MECLoss(order=4)(a, b))
    assert torch.equal(HSICLoss(num_features=np.int32(8), seed=np.uint8(3))(a, b),
                       HSICLoss(num_features=8, seed=3)(a, b))
    assert torch.equal(SFRIKLoss(coefficients=(np.float32(1.0), 40, np.float64(40.0)))(a, b), SFRIKLoss()(a, b))
    with pytest.raises(TypeError, match="order: expected an int"):
        MECLoss(order=np.bool_(True))
    with pytest.raises(TypeError, match="order: expected an int"):
        MECLoss(order=4.0)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5, 3.0])
def test_alignment_at_a_perfect_match_has_the_zero_subgradient(alpha):
    """One duplicated pair (row 0 of both views equal) gave a NaN gradient row for alpha < 1; now its
    gradient is 0 there and every other row's is the one of Wang & Isola's formula."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64).requires_grad_()
    other = torch.cat([z[:1].detach(), torch.randn(4, 4, generator=g, dtype=torch.float64)])
    loss = KF.alignment(z, other, alpha=alpha)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(grad).all()
    zr = z.detach()[1:].clone().requires_grad_()
    un = torch.nn.functional.normalize
    naive = (un(zr, dim=1) - un(other[1:], dim=1)).norm(dim=1).pow(alpha).sum() / 5
    (grad_ref,) = torch.autograd.grad(naive, zr)
    torch.testing.assert_close(loss, naive.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad[1:], grad_ref, rtol=1e-10, atol=1e-12)
    assert (grad[0] == 0).all()


def test_mec_lam_tensor_keeps_the_inputs_dtype_and_is_checked_for_device():
    """A float64 lam tensor (what a scheduler's torch.tensor(0.1, dtype=float64) gives) made the loss
    float64 for fp32/fp16 inputs; a lam on another device failed inside torch, naming neither."""
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    lam64 = torch.tensor(0.1, dtype=torch.float64)
    for a, b in ((za, zb), (za.half(), zb.half())):
        out = MECLoss()(a, b, lam=lam64)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, MECLoss()(a, b, lam=0.1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"lam: expected device cpu .* got meta"):
        KF.mec_loss(za, zb, lam=torch.tensor(0.1, device="meta"))
    with pytest.raises(TypeError, match="dtype: expected a floating-point torch.dtype"):
        KF.min_lambda(torch.int32)


@pytest.mark.parametrize("seed", [45, 50])
def test_mec_check_convergence_trips_where_the_estimate_runs_low(seed):
    """True spectral radius 1.05 where the power iteration read 0.97: check_convergence must raise."""
    g = torch.Generator().manual_seed(seed)
    za = torch.randn(10, 3, generator=g)
    zb = za + torch.randn(10, 3, generator=g)
    a, b = (torch.nn.functional.normalize(x.double(), dim=1) for x in (za, zb))
    lam = 1.05 / torch.linalg.eigvals(a @ b.T).abs().max().item()
    est = MECLoss().forward_components(za, zb, lam=lam).spectral_radius
    assert float(est) < 1.0  # the case this test is about: the estimate alone would let it through
    with pytest.raises(ValueError, match="check_convergence: .*diverges"):
        MECLoss(check_convergence="raise")(za, zb, lam=lam)
    MECLoss(check_convergence="raise")(za, zb, lam=0.8 * lam)  # a converging series passes (rho 0.84)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_uniformity_normalize_false_off_the_sphere_is_nan_not_another_number(backend):
    """normalize=False uses ||a - b||^2 = 2 - 2 a.b, true for unit rows only: rows off the sphere gave a
    silently different number (-1.01 where their pdist code gives -0.13); now NaN.  Unit rows (also ones
    normalised in bf16) give the normalize=True value."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 3, generator=g) * 0.3
    for value in (KF.uniformity(z, t=0.5, normalize=False, backend=backend),
                  UniformityLoss(t=0.5, normalize=False, backend=backend)(z),
                  AlignUniformLoss(normalize=False, backend=backend)(z, z.flip(0))):
        assert torch.isnan(value)
    unit = torch.nn.functional.normalize(z, dim=1)
    torch.testing.assert_close(KF.uniformity(unit, t=0.5, normalize=False, backend=backend),
                               KF.uniformity(z, t=0.5, backend=backend), rtol=1e-5, atol=1e-6)
    half = torch.nn.functional.normalize(z.bfloat16(), dim=1)
    assert torch.isfinite(KF.uniformity(half, t=0.5, normalize=False, backend=backend))


def test_probes_say_when_they_clamp_what_was_asked():
    """--probe-labels above a class's size and --knn-k above the probe set were clamped silently (and
    recorded as given); now each says so."""
    from kernelssl.train import probes

    y = np.array([0, 0, 1, 1, 1])
    with pytest.warns(RuntimeWarning, match="--probe-labels 3: a class has only 2"):
        subsets = probes._label_subsets(y, 3, 1)
    assert len(subsets[0]) == 5
    f = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="--knn-k 9: only 5 probe-train images"):
        acc = probes.knn_probe(f, y, f, y, k=9)
    assert 0.0 <= acc <= 1.0
