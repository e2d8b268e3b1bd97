"""Uniformity / alignment through the public API on each backend: the NumPy float64 reference, the torch
path and the fused Triton op (the interpreter on a CPU, the real kernels on a GPU) agree on the loss
and on the gradient of every input, with a non-unit upstream gradient.

The op-level tests live beside each tier (``test_gaussian_gram_reference.py``, ``test_gaussian_gram_torch.py``,
``test_gaussian_gram_triton.py``); this file checks that ``KF.uniformity``, ``KF.align_uniform_loss``
and the two modules really dispatch to the kernel and that what comes back is the same loss.

Tolerances (fp32 against the float64 reference): ``FP32_ATOL(t) = 64 eps32 (1 + 2t)`` on the value and
that bound times ``max|grad|`` on each gradient, the bound derived in ``test_gaussian_gram_torch.py`` (a few
ulps per Gram entry, amplified 2t by the exponent; log-sum-exp is 1-Lipschitz).  The alignment term adds
``||za_i - zb_i||^2 <= 4``, summed in fp32: far inside it.  float64 on the Triton backend runs the
same algorithm in float64: 1e-10, as the reference tiers of the other ops.  bf16/fp16 (the 2x rule,
kernelssl/numerics.py): the kernel's error against float64 at most 2x the torch path's in the same
dtype, plus a floor of 4 fp32 ulps of the quantity (both errors can be ~0 by chance).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kernelssl.functional as KF
from helpers import assert_close, to_numpy
from kernelssl.losses import AlignUniformLoss, UniformityLoss
from reference import gaussian_gram as R

EPS32 = float(torch.finfo(torch.float32).eps)
UPSTREAM = 0.37
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def FP32_ATOL(t: float) -> float:
    return 64 * EPS32 * (1 + 2 * t)


def _views(n: int, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    za = torch.randn(n, q, generator=g, dtype=torch.float64) * 3.0
    zb = za + 0.5 * torch.randn(n, q, generator=g, dtype=torch.float64)  # correlated views
    return za, zb


def _run(fn, inputs, dtype, device):
    xs = [x.detach().to(device=device, dtype=dtype).clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    (UPSTREAM * out).backward()
    return float(out.detach()), [x.grad.double().cpu().numpy() for x in xs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,q,t", [(2, 2, 2.0), (7, 3, 0.5), (33, 20, 2.0), (40, 16, 50.0)])
def test_align_uniform_three_tiers(device, n, q, t):
    za, zb = _views(n, q, seed=n * 100 + q)
    want = R.align_uniform_loss(to_numpy(za), to_numpy(zb), t=t)
    ga, gb = R.align_uniform_loss_grad(to_numpy(za), to_numpy(zb), t=t)
    want_g = [UPSTREAM * np.asarray(ga), UPSTREAM * np.asarray(gb)]
    for backend in ("torch", "triton"):
        loss = lambda a, b: KF.align_uniform_loss(a, b, t=t, backend=backend)
        v, gs = _run(loss, (za, zb), torch.float32, device)
        assert_close(v, want, rtol=0, atol=FP32_ATOL(t), name=f"{backend} fp32 loss")
        for got, ref, name in zip(gs, want_g, ("dz_a", "dz_b")):
            assert_close(got, ref, rtol=0, atol=FP32_ATOL(t) * float(np.abs(ref).max()), name=f"{backend} {name}")
        v64, gs64 = _run(loss, (za, zb), torch.float64, device)
        assert_close(v64, want, rtol=1e-10, atol=1e-12, name=f"{backend} float64 loss")
        for got, ref in zip(gs64, want_g):
            assert_close(got, ref, rtol=1e-10, atol=1e-12, name=f"{backend} float64 gradient")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("exclude_diagonal", [True, False])
def test_gaussian_gram_logmean_triton_equals_reference(device, exclude_diagonal):
    z, _ = _views(37, 12, seed=3)
    t = 3.0
    want = R.gaussian_gram_logmean(to_numpy(z), t, exclude_diagonal=exclude_diagonal)
    want_g = UPSTREAM * R.gaussian_gram_logmean_grad(to_numpy(z), t, exclude_diagonal=exclude_diagonal)
    fn = lambda x: KF.gaussian_gram_logmean(x, t, exclude_diagonal=exclude_diagonal, backend="triton")
    v, (g,) = _run(fn, (z,), torch.float32, device)
    assert_close(v, want, rtol=0, atol=FP32_ATOL(t), name="value")
    assert_close(g, want_g, rtol=0, atol=FP32_ATOL(t) * float(np.abs(want_g).max()), name="gradient")
    # the Gram-mean family's Gaussian member is exp of the log-mean with the diagonal
    if not exclude_diagonal:
        m = KF.gram_mean(z.float().to(device), KF.GaussianPotential(t), backend="triton")
        assert_close(float(m), np.exp(want), rtol=FP32_ATOL(t), atol=0, name="gram_mean Gaussian member")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_kernel_error_at_most_twice_torch(device, dtype):
    za, zb = _views(48, 24, seed=11)
    za_h, zb_h = za.to(dtype).double(), zb.to(dtype).double()  # the rounded inputs both tiers see
    want = R.align_uniform_loss(to_numpy(za_h), to_numpy(zb_h))
    ga, gb = R.align_uniform_loss_grad(to_numpy(za_h), to_numpy(zb_h))
    want_g = [UPSTREAM * np.asarray(ga), UPSTREAM * np.asarray(gb)]
    errs = {}
    for backend in ("torch", "triton"):
        v, gs = _run(lambda a, b: KF.align_uniform_loss(a, b, backend=backend), (za_h, zb_h), dtype, device)
        errs[backend] = [abs(v - want)] + [float(np.abs(g - r).max()) for g, r in zip(gs, want_g)]
    floors = [4 * EPS32 * max(1.0, abs(want))] + [4 * EPS32 * float(np.abs(r).max()) for r in want_g]
    for name, e_k, e_t, floor in zip(("loss", "dz_a", "dz_b"), errs["triton"], errs["torch"], floors):
        assert e_k <= 2 * e_t + floor, f"{dtype} {name}: kernel error {e_k:.3g} > 2 x torch error {e_t:.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_modules_on_triton_backend(device):
    za, zb = _views(20, 9, seed=5)
    for backend in ("torch", "triton"):
        mod = AlignUniformLoss(backend=backend)
        v, gs = _run(lambda a, b: mod(a, b), (za, zb), torch.float32, device)
        comps = mod.forward_components(za.float().to(device), zb.float().to(device))
        assert_close(float(comps.loss), v, rtol=0, atol=0, name=f"{backend} components' loss is forward's")
        u = UniformityLoss(backend=backend)(za.float().to(device))
        assert_close(float(u), R.uniformity_wang_isola(to_numpy(za / za.norm(dim=1, keepdim=True))),
                     rtol=0, atol=FP32_ATOL(2.0), name=f"{backend} UniformityLoss")
        if backend == "torch":
            v_torch, g_torch = v, gs
    assert_close(v, v_torch, rtol=0, atol=FP32_ATOL(2.0), name="triton vs torch module loss")
    for got, ref in zip(gs, g_torch):
        assert_close(got, ref, rtol=0, atol=FP32_ATOL(2.0) * float(np.abs(ref).max()), name="module gradient")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_every_row_non_finite_gives_nan(device, backend, bad):
    """A batch whose every row is non-finite (e.g. an fp16 overflow of the whole batch) gives NaN on
    both backends, not the -inf of a reduce that finds no tile with a comparable exponent."""
    z = torch.randn(6, 4, device=device)
    z[:, 0] = bad
    assert torch.isnan(KF.uniformity(z, backend=backend))
    assert torch.isnan(KF.uniformity(z.half(), backend=backend))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [33, 65, 34])
def test_nan_row_alone_in_the_last_row_block_reaches_the_value(device, n):
    """A tile whose valid entries are all NaN has max -inf (the max skips NaN) and sum NaN; the reduce
    must not skip it as empty and return a finite value (n = 33 or 65 with the last row NaN: the last
    row block of the interpreter's and the GPU's tiles holds that row alone)."""
    z = torch.randn(n, 4, device=device)
    z[n - 1] = float("nan")
    for backend in ("torch", "triton"):
        assert torch.isnan(KF.uniformity(z, backend=backend)), backend
        assert torch.isnan(KF.gaussian_gram_logmean(z, 2.0, exclude_diagonal=False, backend=backend)), backend
