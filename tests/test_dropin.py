"""Drop-in use without surprises -- defaults that learn, views, docs and components, strict flags, no
silent wrong numbers at the edges, torch.func and meta tensors, the HSIC generator in the state dict,
MEC's opt-in convergence check.

Tolerances: fp32 results are compared with the float64 reference at rtol 1e-4 -- a handful of
float32 roundings (eps 6e-8) on O(1) normalised quantities, summed over <= 64^2 Gram entries whose
errors partly cancel; the observed errors are ~1e-6.  Where the fix is exact (power-of-two row
scaling) the comparison is bitwise.
"""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

import kernelssl.functional as KF
from helpers import assert_close, check_torch_func
from kernelssl.losses import HSICLoss, MECLoss, SFRIKLoss
from reference import legendre_gram as RS
from reference import rff_hsic as RH
from reference import taylor_logdet as RM


def _z(n=16, d=8, *, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype) * scale


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# 1. HSICLoss normalises by default (raw projector outputs, ||z|| ~ 10, learn)
# ------------------------------------------------------------------------------------------------


def test_hsic_default_normalizes_so_the_scale_of_the_embeddings_does_not_matter():
    assert HSICLoss().normalize is True
    z1, z2 = _z(seed=0), _z(seed=1)
    crit = HSICLoss(num_features=64)
    small = crit(z1, z2, generator=_gen())
    large = crit(10.0 * z1, 10.0 * z2, generator=_gen())  # ||z|| ~ 10*sqrt(d): raw projector outputs
    torch.testing.assert_close(large, small, rtol=1e-12, atol=1e-12)
    # what the module computes is the functional loss on the normalised rows
    zn = torch.nn.functional.normalize(torch.stack([z1, z2]), dim=-1)
    torch.testing.assert_close(small, KF.ssl_hsic_loss(zn, num_features=64, generator=_gen()), rtol=0, atol=0)
    # the functional op is unchanged: it takes the rows as given
    raw = KF.ssl_hsic_loss(torch.stack([10.0 * z1, 10.0 * z2]), num_features=64, generator=_gen())
    assert not torch.allclose(raw, small)


# ------------------------------------------------------------------------------------------------
# 2. Views: K tensors, one list/tuple, or a stacked tensor only with its view axis named
# ------------------------------------------------------------------------------------------------


def test_hsic_takes_a_list_or_tuple_of_views():
    z = [_z(seed=s) for s in range(3)]
    crit = HSICLoss(num_features=32)
    want = crit(*z, generator=_gen())
    for packed in (z, tuple(z)):
        torch.testing.assert_close(crit(packed, generator=_gen()), want, rtol=0, atol=0)
    torch.testing.assert_close(crit.forward_components(z, generator=_gen()).loss, want, rtol=0, atol=0)


def test_hsic_stacked_tensor_needs_its_view_axis():
    z = [_z(seed=s) for s in range(3)]  # K = 3 views of B = 16 images
    crit = HSICLoss(num_features=32)
    want = crit(*z, generator=_gen())
    b_k_d = torch.stack(z, dim=1)  # (B, K, d): the silently misread layout
    with pytest.raises(ValueError, match=r"views: got one 3-D tensor of shape \(16, 3, 8\) and no view_dim"):
        crit(b_k_d)
    with pytest.raises(ValueError, match="view_dim"):
        crit(torch.stack(z))  # (K, B, d) too: never guessed
    torch.testing.assert_close(crit(b_k_d, view_dim=1, generator=_gen()), want, rtol=0, atol=0)
    torch.testing.assert_close(crit(torch.stack(z), view_dim=0, generator=_gen()), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"view_dim: expected 0 \(\(K, B, d\)\) or 1"):
        crit(b_k_d, view_dim=2)
    with pytest.raises(ValueError, match="view_dim: expected None unless the views come as one stacked"):
        crit(*z, view_dim=0)


# ------------------------------------------------------------------------------------------------
# 3. forward always returns the tensor; forward_components holds the loss too; docstrings
# ------------------------------------------------------------------------------------------------

MODULES = {
    "hsic": lambda: HSICLoss(num_features=32),
    "sfrik": SFRIKLoss,
    "mec": MECLoss,
}
COMPONENT_FIELDS = {
    "hsic": ("loss", "hsic_zy", "hsic_zz", "kernel_scale", "scale_objective"),
    "sfrik": ("loss", "mse", "mmd_a", "mmd_b"),
    "mec": ("loss", "t_ab", "t_ba", "coding_length", "lam", "spectral_radius", "term_ratio"),
}


@pytest.mark.parametrize("name", MODULES)
def test_forward_returns_the_loss_and_forward_components_the_terms(name):
    crit = MODULES[name]()
    za, zb = _z(seed=0).requires_grad_(), _z(seed=1)
    kw = (lambda: {"generator": _gen()}) if name == "hsic" else dict
    loss = crit(za, zb, **kw())
    assert isinstance(loss, torch.Tensor) and loss.shape == ()
    (2.0 * loss).backward()
    g1 = za.grad.clone()
    za.grad = None
    out = crit.forward_components(za, zb, **kw())
    assert tuple(f for f in COMPONENT_FIELDS[name] if hasattr(out, f)) == COMPONENT_FIELDS[name]
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=0)
    (2.0 * out.loss).backward()  # the components' loss trains, same gradient
    torch.testing.assert_close(za.grad, g1, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [HSICLoss, SFRIKLoss, MECLoss])
def test_return_components_is_not_a_constructor_argument(cls):
    # forward() always returns the scalar loss; the terms come from forward_components()
    with pytest.raises(TypeError, match="return_components"):
        cls(return_components=True)


@pytest.mark.parametrize("cls", [HSICLoss, SFRIKLoss, MECLoss])
def test_forward_docstrings(cls):
    doc = cls.forward.__doc__
    assert doc is not None
    for part in ("Args:", "Returns:", "Example::", "loss = ", "0-dim", "backward()", "for x1, x2 in loader"):
        assert part in doc, (cls.__name__, part)
    comp = cls.forward_components.__doc__
    assert comp is not None and "loss" in comp and "forward" in comp


# ------------------------------------------------------------------------------------------------
# 4. Flags are strictly bools; seed range; draw_features dtype
# ------------------------------------------------------------------------------------------------

FLAGS = [
    (HSICLoss, "normalize"), (HSICLoss, "learn_scale"), (HSICLoss, "check_finite"),
    (HSICLoss, "gather_distributed"), (SFRIKLoss, "check_finite"), (SFRIKLoss, "gather_distributed"),
    (MECLoss, "exact"), (MECLoss, "check_finite"), (MECLoss, "gather_distributed"),
]


@pytest.mark.parametrize("cls,flag", FLAGS, ids=[f"{c.__name__}-{f}" for c, f in FLAGS])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_module_flags_must_be_bools(cls, flag, value):
    with pytest.raises(TypeError, match=f"{flag}: expected a bool"):
        cls(**{flag: value})


@pytest.mark.parametrize(
    "call,flag",
    [
        (lambda z: KF.ssl_hsic_loss([z, z], check_finite="no"), "check_finite"),
        (lambda z: KF.ssl_hsic_loss([z, z], return_components=1), "return_components"),
        (lambda z: KF.legendre_gram_mean(z, normalize="no"), "normalize"),
        (lambda z: KF.sfrik_loss(z, z, check_finite="yes"), "check_finite"),
        (lambda z: KF.taylor_logdet(z, z, 0.1, normalize=0), "normalize"),
        (lambda z: KF.mec_loss(z, z, exact="yes"), "exact"),
        (lambda z: KF.rff_hsic(torch.stack([z, z]), *KF.sample_imq_rff(8, 4) * 2, 1.0, check_finite=0),
         "check_finite"),
    ],
)
def test_functional_flags_must_be_bools(call, flag):
    with pytest.raises(TypeError, match=f"{flag}: expected a bool"):
        call(_z())


def test_seed_range_is_checked_up_front():
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match=r"seed: expected an int in \[0, 18446744073709551615\]"):
            HSICLoss(seed=bad)
    HSICLoss(seed=2**64 - 1)(_z(), _z(seed=1))  # the largest works


def test_draw_features_refuses_non_float_dtypes():
    with pytest.raises(TypeError, match="dtype: expected the views' floating dtype .* got torch.int64"):
        HSICLoss().draw_features(8, dtype=torch.int64)
    w_a, b_a, w_b, b_b = HSICLoss(num_features=4).draw_features(8, dtype=torch.float64)
    assert w_a.dtype == b_b.dtype == torch.float64 and w_a.shape == (4, 8)


# ------------------------------------------------------------------------------------------------
# 5. No silent wrong numbers at the edges (the float64 reference is right in each)
# ------------------------------------------------------------------------------------------------

HUGE = 1e20  # finite in fp32 (max 3.4e38); ||z||^2 ~ 1e41 overflows fp32 without the row scaling


def test_huge_rows_sfrik_matches_reference():
    za, zb = _z(seed=0, scale=HUGE), _z(seed=1, scale=HUGE)
    want = RS.sfrik_loss(za.numpy(), zb.numpy())[0]
    za32, zb32 = za.float().requires_grad_(), zb.float().requires_grad_()
    got = SFRIKLoss()(za32, zb32)
    assert_close(got, want, rtol=1e-4, atol=0, name="SFRIK loss, rows of norm ~1e20 (fp32)")
    got.backward()
    assert torch.isfinite(za32.grad).all() and torch.isfinite(zb32.grad).all()
    # the row scaling is an exact power of two: bitwise the loss of the same rows scaled down by 2^66
    p = 2.0**66
    torch.testing.assert_close(SFRIKLoss()(za32.detach(), zb32.detach()),
                               SFRIKLoss()(za32.detach() / p, zb32.detach() / p), rtol=0, atol=0)


def test_huge_rows_mec_matches_reference():
    za, zb = _z(seed=0, scale=HUGE), _z(seed=1, scale=HUGE)
    want = RM.mec_loss(za.numpy(), zb.numpy())[0]
    got = MECLoss()(za.float(), zb.float())
    assert_close(got, want, rtol=1e-4, atol=1e-7, name="MEC loss, rows of norm ~1e20 (fp32)")


def test_huge_rows_hsic_module_matches_float64():
    za, zb = _z(seed=0, scale=HUGE), _z(seed=1, scale=HUGE)
    for exact in (True, False):
        want = HSICLoss(exact=exact, num_features=64)(za, zb, generator=_gen())
        got = HSICLoss(exact=exact, num_features=64)(za.float(), zb.float(), generator=_gen())
        assert_close(got, want, rtol=1e-4, atol=1e-6, name=f"HSIC (exact={exact}) loss, rows of norm ~1e20 (fp32)")


@pytest.mark.parametrize("op", ["legendre_gram_mean", "taylor_logdet"])
def test_huge_rows_triton_and_torch_agree(op):
    pytest.importorskip("triton")  # on CPU: the interpreter (tests/conftest.py sets TRITON_INTERPRET)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    za, zb = _z(12, 8, seed=0, scale=HUGE, dtype=torch.float32).to(dev), _z(12, 8, seed=1, scale=HUGE).float().to(dev)
    if op == "legendre_gram_mean":
        ref = RS.gram_mean(RS.normalize(za.double().cpu().numpy()), (1.0, 40.0, 40.0))
        run = lambda b: KF.legendre_gram_mean(za, backend=b)
    else:
        ref = RM.taylor_logdet(za.double().cpu().numpy(), zb.double().cpu().numpy(), 0.5, 4)
        run = lambda b: KF.taylor_logdet(za, zb, 0.5, 4, backend=b)
    for backend in ("torch", "triton"):
        assert_close(run(backend), ref, rtol=1e-4, atol=1e-6, name=f"{op} {backend}, rows of norm ~1e20")


def test_exact_hsic_kernel_of_a_point_with_itself_is_one():
    # Two identical views: every positive pair is (x, x).  The Gram form ||x||^2 + ||y||^2 - 2 x.y left
    # a residue of ~1e-7 ||x||^2 in fp32 (~1e-16 ||x||^2 in float64), so k(x, x) < 1 at small c.
    x = _z(16, 8, seed=3)
    views = torch.stack([x, x])
    for c in (1e-3, 1e-6):
        want = RH.exact_hsic(views.numpy(), c)
        for dtype in (torch.float64, torch.float32):
            zy, zz = KF.exact_hsic(views.to(dtype), c)
            assert_close(zy, want[0], rtol=1e-5, atol=0, name=f"HSIC_ZY c={c} {dtype}")
            assert_close(zz, want[1], rtol=1e-4, atol=1e-9, name=f"HSIC_ZZ c={c} {dtype}")


@pytest.mark.parametrize("c", [1e20, 1e-25])
def test_exact_hsic_extreme_scales_fp32(c):
    # fp32 c^2 overflows at 1e20 (k = c / inf = 0) and underflows at 1e-25 (k(x, x) = c / 0 = inf)
    views = torch.stack([_z(seed=0), _z(seed=1)])
    want = RH.exact_hsic(views.numpy(), c)
    zy, zz = KF.exact_hsic(views.float(), c)
    assert_close(zy, want[0], rtol=1e-5, atol=1e-7, name="HSIC_ZY")
    assert_close(zz, want[1], rtol=1e-4, atol=1e-7, name="HSIC_ZZ")


def test_scale_objective_extreme_scales_fp32():
    views = torch.stack([_z(seed=0), _z(seed=1)])
    for c in (1e20, 1e-25):
        want = KF.kernel_scale_objective(views, torch.tensor(c, dtype=torch.float64))
        got = KF.kernel_scale_objective(views.float(), torch.tensor(c))
        assert_close(got, want, rtol=1e-5, atol=1e-5, name=f"scale objective c={c}")


def test_mec_tiny_lambda_is_refused_in_fp32_and_fine_in_float64():
    za, zb = _z(64, 32, seed=0), _z(64, 32, seed=1)
    # eps_sq = 1e45: lambda = 5e-46 underflows to 0 in fp32, which would give a loss of 0.0
    with pytest.raises(ValueError, match=r"lam: expected lambda >= 9.86e-32 for torch.float32 .*eps_sq"):
        MECLoss(eps_sq=1e45)(za.float(), zb.float())
    with pytest.raises(ValueError, match="lam: expected lambda >= "):
        KF.taylor_logdet(za.float(), zb.float(), 1e-40)
    want = RM.mec_loss(za.numpy(), zb.numpy(), eps_sq=1e45)[0]
    assert_close(MECLoss(eps_sq=1e45)(za, zb), want, rtol=1e-10, atol=0, name="float64 at eps_sq=1e45")
    # just above the floor fp32 still matches float64
    assert_close(MECLoss(eps_sq=1e20)(za.float(), zb.float()), RM.mec_loss(za.numpy(), zb.numpy(), eps_sq=1e20)[0],
                 rtol=1e-5, atol=0, name="fp32 at eps_sq=1e20")


def test_tensor_hyper_parameters_out_of_range_give_nan_without_sync():
    za, zb = _z(seed=0), _z(seed=1)
    views = torch.stack([za, zb])
    for bad in (0.0, -1.0, math.nan):
        c = torch.tensor(bad, dtype=torch.float64)
        assert torch.isnan(KF.ssl_hsic_loss(views, num_features=8, kernel_scale=c, generator=_gen()))
        assert torch.isnan(KF.ssl_hsic_loss(views, exact=True, kernel_scale=c))
        lam = torch.tensor(bad, dtype=torch.float64)
        assert torch.isnan(KF.mec_loss(za, zb, lam=lam))
        assert torch.isnan(KF.taylor_logdet(za, zb, lam))
    good = torch.tensor(0.5, dtype=torch.float64)
    assert torch.isfinite(KF.mec_loss(za, zb, lam=good))
    with pytest.raises(ValueError, match=r"kernel_scale: expected finite values > 0 \(check_finite=True\)"):
        KF.ssl_hsic_loss(views, kernel_scale=torch.tensor(-1.0), check_finite=True)
    crit = HSICLoss(learn_scale=True, num_features=8, check_finite=True)
    with torch.no_grad():
        crit.kernel_scale.fill_(-1.0)  # a learned scale driven out of range by a bad step
    with pytest.raises(ValueError, match=r"kernel_scale: expected finite values > 0 \(check_finite=True\)"):
        crit(za, zb, generator=_gen())
    crit.check_finite = False  # without the check: NaN, no host sync
    assert torch.isnan(crit(za, zb, generator=_gen()))
    with pytest.raises(ValueError, match=r"lam: expected finite values > 0 \(check_finite=True\)"):
        KF.mec_loss(za, zb, lam=torch.tensor(0.0, dtype=torch.float64), check_finite=True)


def test_sfrik_high_degree_fp32_error_is_as_documented():
    # The docstring of legendre_gram_mean quotes the fp32 gradient error at high degree; hold it.
    z = _z(256, 16, seed=0)
    b = (1.0,) * 100
    z64, z32 = z.clone().requires_grad_(), z.float().requires_grad_()
    KF.legendre_gram_mean(z64, b).backward()
    KF.legendre_gram_mean(z32, b).backward()
    err = float((z32.grad.double() - z64.grad).abs().max() / z64.grad.abs().max())
    assert err < 2e-3, err  # documented ~5e-4 at L = 100 (measured 6.6e-4 at q = 16)
    assert "L = 100: ~5e-4" in KF.legendre_gram_mean.__doc__


# ------------------------------------------------------------------------------------------------
# 6. torch.func transforms and meta tensors
# ------------------------------------------------------------------------------------------------

FUNC_LOSSES = {
    "hsic": lambda a, b: HSICLoss(exact=True)(a, b),
    "sfrik": lambda a, b: SFRIKLoss()(a, b),
    "mec": lambda a, b: MECLoss()(a, b),
}


@pytest.mark.parametrize("name", FUNC_LOSSES)
def test_torch_func_grad_vmap_jvp(name):
    check_torch_func(FUNC_LOSSES[name], _z(8, 5, seed=0), _z(8, 5, seed=1), _z(8, 5, seed=2))


@pytest.mark.parametrize("name", ["hsic", "hsic-exact", "sfrik", "mec"])
def test_meta_tensors_propagate_shapes(name):
    crit = {"hsic": HSICLoss(), "hsic-exact": HSICLoss(exact=True), "sfrik": SFRIKLoss(), "mec": MECLoss()}[name]
    za, zb = torch.empty(8, 5, device="meta"), torch.empty(8, 5, device="meta")
    out = crit(za, zb)
    assert out.device.type == "meta" and out.shape == () and out.dtype == torch.float32
    comps = crit.forward_components(za.double(), zb.double())
    assert comps.loss.device.type == "meta" and comps.loss.dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast raised before any check
        assert crit(za, zb).shape == ()


def test_meta_tensors_functional_ops():
    z = torch.empty(2, 8, 5, device="meta")
    w, b = KF.sample_imq_rff(5, 16, device="meta")
    assert w.device.type == "meta" and w.shape == (16, 5)
    zy, zz = KF.rff_hsic(z, w, b, w, b, 1.0)
    assert zy.shape == () and zz.device.type == "meta"
    assert KF.legendre_gram_mean(z[0]).shape == ()
    assert KF.taylor_logdet(z, z, 0.1).shape == (2,)


# ------------------------------------------------------------------------------------------------
# 7. The HSIC module's generator state is part of its state_dict
# ------------------------------------------------------------------------------------------------


def test_hsic_state_dict_restores_the_feature_stream():
    za, zb = _z(seed=0), _z(seed=1)
    saved = HSICLoss(num_features=16, seed=7)
    saved(za, zb)
    saved(za, zb)  # advance the stream: a fresh module with the same seed would now differ
    buf = io.BytesIO()
    torch.save(saved.state_dict(), buf)
    restored = HSICLoss(num_features=16)  # another seed: the state dict carries it
    restored.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for _ in range(2):
        assert torch.equal(restored(za, zb), saved(za, zb))
    assert restored.seed == 7
    fresh = HSICLoss(num_features=16, seed=7)  # same seed, stream not advanced: other features
    assert not torch.equal(fresh(za, zb), saved(za, zb))


def test_hsic_state_dict_without_generator_state_is_refused():
    # the generators' state is part of the state_dict: a dict without it does not load silently
    crit = HSICLoss(num_features=8, learn_scale=True, seed=3)
    with pytest.raises(RuntimeError, match="_extra_state"):
        crit.load_state_dict({"kernel_scale": torch.tensor(0.25)})


def test_hsic_state_dict_with_learned_scale_round_trips():
    crit = HSICLoss(num_features=8, learn_scale=True, kernel_scale=0.5)
    crit(_z(), _z(seed=1))
    sd = crit.state_dict()
    assert set(sd) == {"kernel_scale", "_extra_state"}
    other = HSICLoss(num_features=8, learn_scale=True)
    other.load_state_dict(sd)
    assert float(other.kernel_scale.detach()) == 0.5
    assert torch.equal(other(_z(), _z(seed=1)), crit(_z(), _z(seed=1)))


# ------------------------------------------------------------------------------------------------
# 8. MEC: opt-in convergence check
# ------------------------------------------------------------------------------------------------


def _collapsed():
    z = torch.ones(16, 8, dtype=torch.float64)
    return z + 1e-3 * _z(16, 8, seed=4), z  # rho ~ lam m = d / eps_sq = 16 at eps_sq = 0.5


def test_mec_check_convergence_raises_or_warns():
    za, zb = _collapsed()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MECLoss(eps_sq=0.5)(za, zb)  # default: no check, no sync, no warning
    with pytest.raises(ValueError, match=r"check_convergence: MEC: the truncated log-det series diverges: "
                                         r"spectral radius .* about \d+\.?\d* >= 1"):
        MECLoss(eps_sq=0.5, check_convergence="raise")(za, zb)
    with pytest.warns(RuntimeWarning, match="series diverges"):
        loss = MECLoss(eps_sq=0.5, check_convergence="warn")(za, zb)
    assert torch.equal(loss, MECLoss(eps_sq=0.5)(za, zb))
    # a converging batch passes the check silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MECLoss(check_convergence="raise")(_z(16, 8, seed=0), _z(16, 8, seed=1))
    with pytest.raises(ValueError, match="check_convergence: expected one of 'off', 'warn', 'raise', got True"):
        MECLoss(check_convergence=True)
