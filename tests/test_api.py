"""Public surface: modules, functional forms, backend selection, bad input (docs/api.md)."""
import math
import os
import subprocess
import sys

import pytest
import torch

import kernelssl
import kernelssl.functional as KF
from kernelssl import dispatch
from kernelssl.losses import AlignUniformLoss, HSICLoss, MECLoss, SFRIKLoss, UniformityLoss


def _views(K=2, B=8, d=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, generator=g, dtype=dtype) for _ in range(K)]


# ------------------------------------------------------------------------------------------------
# import and modules
# ------------------------------------------------------------------------------------------------


def test_import_does_not_import_triton():
    code = "import sys, kernelssl, kernelssl.losses, kernelssl.functional; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_top_level_exports():
    assert kernelssl.HSICLoss is HSICLoss and kernelssl.SFRIKLoss is SFRIKLoss and kernelssl.MECLoss is MECLoss
    assert isinstance(kernelssl.__version__, str)


def test_hyper_parameters_are_keyword_only():
    for cls in (HSICLoss, SFRIKLoss, MECLoss):
        with pytest.raises(TypeError):
            cls(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_modules_return_scalar_and_components(dtype):
    z = _views(dtype=dtype)
    for crit in (HSICLoss(num_features=64), SFRIKLoss(), MECLoss()):
        # HSIC redraws its features every call: give both calls the same generator state
        kw = lambda: {"generator": torch.Generator().manual_seed(1)} if isinstance(crit, HSICLoss) else {}
        loss = crit(*z, **kw())
        assert isinstance(loss, torch.Tensor)
        assert loss.shape == () and loss.dtype == dtype and torch.isfinite(loss)
        comps = crit.forward_components(*z, **kw())
        torch.testing.assert_close(comps.loss, loss, rtol=0, atol=0)


def test_hsic_module_matches_functional_with_same_generator():
    z = _views(K=3, dtype=torch.float64)
    crit = HSICLoss(num_features=32, gamma=2.0, kernel_scale=0.7, normalize=True)
    got = crit(*z, generator=torch.Generator().manual_seed(5))
    zn = torch.nn.functional.normalize(torch.stack(z), dim=-1)
    want = KF.ssl_hsic_loss(zn, num_features=32, gamma=2.0, kernel_scale=0.7,
                            generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_hsic_module_redraws_features_each_step_reproducibly():
    z = _views(dtype=torch.float64)
    a, b = HSICLoss(num_features=16, seed=3), HSICLoss(num_features=16, seed=3)
    first_a, second_a = a(*z), a(*z)
    first_b = b(*z)
    assert not torch.equal(first_a, second_a)  # fresh features each call
    assert torch.equal(first_a, first_b)  # same seed, same stream


def test_hsic_learn_scale_gradients_are_separated():
    z = [v.requires_grad_() for v in _views(dtype=torch.float64)]
    crit = HSICLoss(num_features=32, learn_scale=True, normalize=False)
    out = crit.forward_components(*z)
    assert out.scale_objective is not None
    torch.testing.assert_close(out.loss, KF.hsic_loss(out.hsic_zy, out.hsic_zz) + out.scale_objective)
    out.loss.backward()
    c = crit.kernel_scale
    assert c.grad is not None and torch.isfinite(c.grad)
    # c only gets the side objective's gradient: replay the module's generator stream (two RFF maps,
    # then the scale pairs) and differentiate the objective alone.
    g = torch.Generator().manual_seed(0)
    stacked = torch.stack([v.detach() for v in z])
    KF.ssl_hsic_loss(stacked, num_features=32, generator=g)
    c2 = torch.tensor(1.0, requires_grad=True)
    KF.kernel_scale_objective(stacked, c2, generator=g).backward()
    torch.testing.assert_close(c.grad, c2.grad)
    # the embeddings' gradient equals that of the HSIC loss alone (scale objective has no path to them)
    z2 = [v.detach().clone().requires_grad_() for v in z]
    crit2 = HSICLoss(num_features=32, kernel_scale=1.0, seed=0, normalize=False)
    crit2(*z2).backward()
    for g1, g2 in zip(z, z2):
        torch.testing.assert_close(g1.grad, g2.grad, rtol=1e-12, atol=1e-12)


def test_mec_default_lambda_and_warmup():
    crit = MECLoss(eps_sq=64.0)
    assert crit.default_lambda(1024, 2048) == 2048 / (1024 * 64.0)
    base = 0.5
    assert KF.mec_lambda_warmup(0, steps_per_epoch=10, base_lam=base) == pytest.approx(base / 8)
    assert KF.mec_lambda_warmup(100, steps_per_epoch=10, base_lam=base) == pytest.approx(base)
    assert KF.mec_lambda_warmup(10_000, steps_per_epoch=10, base_lam=base) == pytest.approx(base)


def test_mec_components_report_divergence_without_sync():
    z = torch.ones(16, 8, dtype=torch.float64)  # collapsed: rho = lam * m = d / eps_sq
    comps = MECLoss(eps_sq=0.5).forward_components(z + 1e-3 * torch.randn(16, 8, dtype=torch.float64), z)
    assert comps.spectral_radius.shape == () and comps.spectral_radius > 1.0
    ok = MECLoss(eps_sq=64.0).forward_components(*_views(B=16, d=8))
    assert ok.spectral_radius < 1.0


# ------------------------------------------------------------------------------------------------
# backend selection
# ------------------------------------------------------------------------------------------------


def test_auto_backend_uses_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    for op in dispatch.TRITON_OPS:
        assert dispatch.implementation(op, "auto", torch.zeros(2, 2)) == "torch"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend: expected one of 'auto', 'triton', 'torch', got 'cuda'"):
        SFRIKLoss(backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        KF.sfrik_loss(*_views(), backend="fast")


def test_env_var_backend(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="KERNELSSL_BACKEND"):
        KF.legendre_gram_mean(_views()[0])
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert torch.isfinite(KF.legendre_gram_mean(_views()[0]))


@pytest.mark.parametrize(
    "call",
    [
        lambda z: KF.ssl_hsic_loss(z, backend="triton"),
        lambda z: KF.legendre_gram_mean(z[0], backend="triton"),
        lambda z: KF.taylor_logdet(z[0], z[1], 0.1, backend="triton"),
        lambda z: MECLoss(backend="triton")(*z),
    ],
)
def test_explicit_triton_raises_with_reason(call, monkeypatch):
    # Every op has a Triton kernel; on CPU tensors it can run only under the interpreter, so an
    # explicit request without TRITON_INTERPRET raises, naming the CUDA-tensor requirement.
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run .*: .*CUDA tensors"):
        call(_views())


def test_explicit_triton_via_env_raises(monkeypatch):
    # SFRIK's Gram op has a Triton kernel; on CPU tensors without the interpreter it cannot run.
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run legendre_gram: .*CUDA tensors"):
        SFRIKLoss()(*_views())


@pytest.mark.parametrize("allow,explicit", [(False, None), (True, None), (True, "ieee"), (False, "tf32")],
                         ids=["default-tf32x3", "torch-tf32-flag", "explicit-ieee-wins", "explicit-tf32"])
def test_kernels_take_the_precision_policy(allow, explicit):
    # Every fused op gets its precision as one string (docs/architecture.md, "Precision"); the default
    # is "tf32x3", "tf32" only under torch's own TF32 flag (torch.set_float32_matmul_precision("high")),
    # an explicit argument wins.  Read off the precision argument each registered op is called with.
    pytest.importorskip("triton")
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "kernelssl":
                seen[func._schema.name] = [a for a in args if isinstance(a, str)]
            return func(*args, **(kwargs or {}))

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (conftest sets it)
    z = torch.stack(_views(K=2, B=6, d=5, dtype=torch.float32)).to(dev)
    maps = [t.to(dev) for t in KF.sample_imq_rff(5, 8, generator=torch.Generator().manual_seed(0))] * 2
    before = torch.backends.cuda.matmul.allow_tf32  # a property: set and restored by hand
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        with Record():
            KF.rff_hsic(z, *maps, 1.0, backend="triton", input_precision=explicit)
            KF.legendre_gram_mean(z[0], backend="triton", input_precision=explicit)
            KF.taylor_logdet(z[0], z[1], 0.1, backend="triton", input_precision=explicit)
            KF.uniformity(z[0], backend="triton", input_precision=explicit)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    want = [explicit or ("tf32" if allow else "tf32x3")]
    assert seen == {"kernelssl::rff_hsic_fwd": want, "kernelssl::legendre_gram_mean": want,
                    "kernelssl::taylor_logdet_fwd": want, "kernelssl::gaussian_gram_logmean": want}


def test_input_precision_is_validated_on_every_entry_point():
    z = _views(K=2, B=6, d=5, dtype=torch.float32)
    maps = KF.sample_imq_rff(5, 8, generator=torch.Generator().manual_seed(0)) * 2
    calls = [lambda p: KF.rff_hsic(torch.stack(z), *maps, 1.0, backend="torch", input_precision=p),
             lambda p: KF.ssl_hsic_loss(z, num_features=8, generator=torch.Generator().manual_seed(1),
                                        input_precision=p),
             lambda p: KF.legendre_gram_mean(z[0], input_precision=p),
             lambda p: KF.sfrik_loss(*z, input_precision=p),
             lambda p: KF.taylor_logdet(z[0], z[1], 0.1, input_precision=p),
             lambda p: KF.mec_loss(*z, input_precision=p)]
    for call in calls:
        with pytest.raises(ValueError,
                           match="input_precision: expected one of 'tf32x3', 'ieee', 'tf32', 'bf16x3', 'bf16x6' "
                                 "or None, got 'fp32'"):
            call("fp32")
        # the torch path ignores it: the same result for every precision
        first = lambda r: r[0] if isinstance(r, tuple) else r
        assert torch.equal(first(call("ieee")), first(call(None)))


def test_gather_distributed_without_process_group_is_a_no_op():
    # No torch.distributed process group here: gathering is the identity, the loss bitwise the local
    # one (the 2-process contract is tested in test_distributed.py).
    assert not torch.distributed.is_initialized()
    z = _views()
    for make in (lambda **k: HSICLoss(num_features=8, **k), SFRIKLoss, MECLoss):
        assert torch.equal(make(gather_distributed=True)(*z), make()(*z))
    assert torch.equal(KF.mec_loss(*z, gather_distributed=True), KF.mec_loss(*z))
    with pytest.raises(TypeError, match="gather_distributed: expected a bool"):
        SFRIKLoss(gather_distributed="yes")


# ------------------------------------------------------------------------------------------------
# bad input: one test per case of the checks every entry point makes (kernelssl/_checks.py)
# ------------------------------------------------------------------------------------------------

LOSSES = {
    "hsic": lambda *z: HSICLoss(num_features=8)(*z),
    "sfrik": lambda *z: SFRIKLoss()(*z),
    "mec": lambda *z: MECLoss()(*z),
}


@pytest.mark.parametrize("name", LOSSES)
def test_wrong_ndim(name):
    a = torch.randn(8, 5)
    with pytest.raises(ValueError, match=r"expected a 2-D tensor, got shape \(8, 5, 1\)"):
        LOSSES[name](a, a[..., None])


@pytest.mark.parametrize("name", LOSSES)
def test_mismatched_view_shapes(name):
    with pytest.raises(ValueError,
                       match=r"(views\[1\]|z_b): expected the same shape as (views\[0\]|z_a) \(8, 5\), got \(8, 6\)"):
        LOSSES[name](torch.randn(8, 5), torch.randn(8, 6))


@pytest.mark.parametrize("name", LOSSES)
def test_batch_of_one(name):
    with pytest.raises(ValueError, match=r"(B >= 2|at least 2 rows)"):
        LOSSES[name](torch.randn(1, 5), torch.randn(1, 5))


@pytest.mark.parametrize("name", LOSSES)
def test_integer_dtype(name):
    a = torch.ones(8, 5, dtype=torch.int64)
    with pytest.raises(TypeError, match="expected a floating-point tensor .* got dtype torch.int64"):
        LOSSES[name](a, a)


@pytest.mark.parametrize("name", LOSSES)
def test_not_a_tensor(name):
    with pytest.raises(TypeError, match="expected a torch.Tensor, got list"):
        LOSSES[name]([[1.0, 2.0]], torch.randn(1, 2))


@pytest.mark.parametrize("name", LOSSES)
def test_views_on_different_devices(name):
    a = torch.randn(8, 5)
    b = torch.randn(8, 5, device="meta")
    with pytest.raises(ValueError, match="expected device cpu .*got meta"):
        LOSSES[name](a, b)


def test_sfrik_q_one():
    with pytest.raises(ValueError, match=r"z_a: expected q >= 2 columns .* got shape \(8, 1\)"):
        SFRIKLoss()(torch.randn(8, 1), torch.randn(8, 1))
    with pytest.raises(ValueError, match="q >= 2"):
        KF.legendre_gram_mean(torch.randn(8, 1))


def test_sfrik_bad_coefficients():
    with pytest.raises(ValueError, match="coefficients: expected at least one"):
        SFRIKLoss(coefficients=())
    with pytest.raises(TypeError, match=r"coefficients\[1\]: expected a finite Python float, got float nan"):
        SFRIKLoss(coefficients=(1.0, math.nan))
    with pytest.raises(TypeError, match="coefficients: expected a sequence"):
        KF.legendre_gram_mean(torch.randn(8, 3), torch.tensor([1.0, 2.0]))


def test_mec_order_below_one():
    with pytest.raises(ValueError, match="order: expected an int >= 1, got 0"):
        MECLoss(order=0)
    with pytest.raises(TypeError, match="order: expected an int >= 1, got float 2.0"):
        KF.taylor_logdet(torch.randn(4, 3), torch.randn(4, 3), 0.1, 2.0)


def test_mec_mismatched_branches():
    z = torch.randn(8, 5)
    with pytest.raises(ValueError, match=r"target_a: expected the same shape as z_a \(8, 5\), got \(8, 4\)"):
        MECLoss()(z, z, torch.randn(8, 4), z)
    with pytest.raises(ValueError, match=r"b: expected the same shape as a \(2, 8, 5\), got \(3, 8, 5\)"):
        KF.taylor_logdet(torch.randn(2, 8, 5), torch.randn(3, 8, 5), 0.1)


def test_mec_bad_lambda_and_scale():
    z = torch.randn(8, 5)
    with pytest.raises(ValueError, match="lam: expected a finite number > 0, got -1"):
        MECLoss()(z, z, lam=-1.0)
    with pytest.raises(ValueError, match="scale: expected one of 'reference', 'paper', got 'log'"):
        MECLoss(scale="log")
    with pytest.raises(ValueError, match="eps_sq: expected a finite number > 0, got 0"):
        MECLoss(eps_sq=0.0)


def test_hsic_single_view_and_unequal_views():
    with pytest.raises(ValueError, match="expected K >= 2 views .* got 1 view"):
        HSICLoss()(torch.randn(8, 5))
    with pytest.raises(ValueError, match=r"views\[2\]: expected the same shape as views\[0\] \(8, 5\), got \(7, 5\)"):
        HSICLoss()(torch.randn(8, 5), torch.randn(8, 5), torch.randn(7, 5))
    with pytest.raises(ValueError, match=r"expected K >= 2 views, got shape \(1, 8, 5\)"):
        KF.ssl_hsic_loss(torch.randn(1, 8, 5))


def test_hsic_bad_hyper_parameters():
    with pytest.raises(ValueError, match="kernel: expected one of 'imq', 'gaussian', 'laplace', got 'gauss'"):
        HSICLoss(kernel="gauss")
    with pytest.raises(ValueError, match="kernel_scale: expected a finite number > 0, got -2"):
        HSICLoss(kernel_scale=-2.0)
    with pytest.raises(ValueError, match="num_features: expected an int >= 1, got 0"):
        HSICLoss(num_features=0)


def test_rff_hsic_map_shapes():
    views = torch.randn(2, 8, 5)
    w, b = KF.sample_imq_rff(5, 16)
    with pytest.raises(ValueError, match=r"w_a: expected shape \(D, 5\) .* got \(16, 4\)"):
        KF.rff_hsic(views, w[:, :4], b, w, b, 1.0)
    with pytest.raises(ValueError, match=r"b_b: expected shape \(16,\) .* got \(15,\)"):
        KF.rff_hsic(views, w, b, w, b[:15], 1.0)


# ------------------------------------------------------------------------------------------------
# non-finite policy
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_propagates(name, bad):
    a, b = _views()
    a = a.clone()
    a[3, 1] = bad
    assert not torch.isfinite(LOSSES[name](a, b))


@pytest.mark.parametrize("cls", [HSICLoss, SFRIKLoss, MECLoss])
def test_check_finite_raises(cls):
    a, b = _views()
    a[0, 0] = math.nan
    with pytest.raises(ValueError, match="expected finite values .* got 1 NaN/Inf"):
        cls(check_finite=True)(a, b)


# ------------------------------------------------------------------------------------------------
# grad modes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
def test_no_grad_and_requires_grad_false(name):
    a, b = _views()
    with torch.no_grad():
        v1 = LOSSES[name](a, b)
    assert not v1.requires_grad
    v2 = LOSSES[name](a, b)  # inputs do not require grad
    assert torch.isfinite(v2)
    a.requires_grad_()
    v3 = LOSSES[name](a, b)  # only one input requires grad
    (2.5 * v3).backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and b.grad is None


def test_env_default_does_not_leak():
    assert os.environ.get(dispatch.ENV_VAR) in (None, "", "auto", "torch")


def test_auto_never_picks_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(2, 2)
    for op in dispatch.TRITON_OPS:
        assert dispatch.implementation(op, "auto", x) == "torch"
        if dispatch.triton_import_error() is None:
            assert dispatch.implementation(op, "triton", x) == "triton"


def test_float64_among_the_inputs_takes_the_torch_tier(monkeypatch):
    """Any float64 input (not only the first) sends the call to the torch tier, which computes in the
    promoted dtype; maps the kernel does not differentiate (``frozen``) are taken in any dtype."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if dispatch.triton_import_error() is not None:
        pytest.skip("needs triton (the decision under test is the one that would pick the kernels)")
    f32, f64 = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float64)
    for op in dispatch.TRITON_OPS:
        assert dispatch.implementation(op, "triton", f32, f32) == "triton"
        assert dispatch.implementation(op, "triton", f32, f64) == "torch"
        assert dispatch.implementation(op, "triton", f64, f32) == "torch"
    assert dispatch.implementation("rff_hsic", "triton", f32, frozen=(f64,)) == "triton"
    assert dispatch.implementation("rff_hsic", "triton", f32, frozen=(f64.requires_grad_(),)) == "torch"


def test_op_without_kernel_is_refused(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x = torch.zeros(2, 2)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run some_new_op: there is no fused Triton kernel"):
        dispatch.implementation("some_new_op", "triton", x)
    assert dispatch.implementation("some_new_op", "auto", x) == "torch"


# ------------------------------------------------------------------------------------------------
# autograd's in-place check: an input changed after the forward raises in the backward, as in plain
# autograd (the row prescale and the fused Functions keep the user's tensor for the check)
# ------------------------------------------------------------------------------------------------

IN_PLACE_CASES = {
    "HSICLoss, stacked views": lambda a, b: HSICLoss(num_features=8, seed=0)(a.view(2, 4, 4), view_dim=0),
    # separate views are stacked into one tensor by a stack that keeps them (the first in float64 here)
    "HSICLoss, separate views": lambda a, b: HSICLoss(num_features=8, seed=0)(a, b.float()),
    "SFRIKLoss": lambda a, b: SFRIKLoss()(a, b),
    "MECLoss": lambda a, b: MECLoss()(a, b),
    "UniformityLoss": lambda a, b: UniformityLoss()(a),
    "AlignUniformLoss": lambda a, b: AlignUniformLoss()(a, b),
    "taylor_logdet": lambda a, b: KF.taylor_logdet(a, b, 0.05),
    "gaussian_gram_logmean": lambda a, b: KF.gaussian_gram_logmean(a, 2.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", IN_PLACE_CASES)
def test_input_changed_in_place_after_forward_raises(name, dtype):
    za = torch.randn(8, 4, dtype=dtype, requires_grad=True)
    zb = torch.randn(8, 4, dtype=dtype, requires_grad=True)
    loss = IN_PLACE_CASES[name](za, zb)
    with torch.no_grad():
        za.mul_(-0.5).add_(0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_stack_views_is_a_stack_in_value_gradient_and_tangent():
    """The stack that keeps the views (separate views of a multi-view loss): the values, the gradients
    (cast back to each view's dtype) and forward-mode tangents (zeros for a view without one) of
    ``torch.stack`` of the cast views."""
    import torch.autograd.forward_ad as fwAD

    from kernelssl.ops._common import stack_views

    a = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, dtype=torch.float32, requires_grad=True)
    out = stack_views([a, b], torch.float64)
    assert out.dtype == torch.float64 and torch.equal(out, torch.stack([a, b.double()]))
    w = torch.randn(2, 3, 2, dtype=torch.float64)
    ga, gb = torch.autograd.grad((out * w).sum(), (a, b))
    assert ga.dtype == torch.float64 and gb.dtype == torch.float32
    assert torch.equal(ga, w[0]) and torch.equal(gb, w[1].float())
    ta = torch.randn(3, 2, dtype=torch.float64)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(stack_views([fwAD.make_dual(a.detach(), ta), b.detach().requires_grad_()],
                                               torch.float64)).tangent
    assert torch.equal(tangent, torch.stack([ta, torch.zeros(3, 2, dtype=torch.float64)]))
