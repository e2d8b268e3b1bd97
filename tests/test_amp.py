"""Autocast (mixed precision) policy, for every loss (docs/numerics.md).

Policy (module docstring of :mod:`kernelssl.losses`): a loss called inside ``torch.autocast`` switches
autocast off for its inputs' device and computes in float32 on the low-precision embeddings upcast
at entry; it returns a float32 scalar and gradients in the embeddings' dtype.  Tested here:

1. Autocast has no effect on the loss: inside autocast == outside autocast on the same low-precision
   embeddings, bitwise (loss and input gradient), for the modules and the three core ops.
2. The low-precision rule.  Reference: the same loss in float64 on the same embeddings upcast to
   float64 (so the error measured is the loss's own, not the model's).  Errors: ``|L - L64| / |L64|``
   for the loss and ``max|g - g64| / max|g64|`` for the gradient w.r.t. the embeddings.  The library
   must satisfy ``err_lib <= 2 * err_eager + floor``, where "eager" is the plain form of the same loss
   (the papers' code: ``*_eager`` functions) run under the same autocast -- its matmuls then run in
   the low dtype.  Floors: loss ``1e-5`` (float32 compute: a few hundred roundings of 6e-8), gradient
   ``1.1 u`` with ``u`` the unit roundoff of the embeddings' dtype (2^-8 bf16, 2^-11 fp16): the
   gradient is returned in that dtype, one rounding of ``|g_i| <= max|g|`` costs up to ``u``, and 10%
   covers the float32 compute.  The library is also held to the floors alone (it computes in fp32).
3. A training step (fp32 weights, low-precision activations) gives a float32 loss and finite float32
   parameter gradients.

CUDA fp16/bf16 variants run only with a GPU.
"""
from __future__ import annotations

import pytest
import torch

import kernelssl.functional as KF
from kernelssl.losses import HSICLoss, MECLoss, SFRIKLoss
from kernelssl.ops import rff_hsic as _hsic
from kernelssl.ops import sfrik_loss as _sfrik
from kernelssl.ops import taylor_logdet as _mec

F64 = torch.float64
N, D_IN, D = 64, 16, 32
NUM_FEATURES = 128
LOSS_FLOOR = 1e-5
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")
SETTINGS = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=_no_cuda),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=_no_cuda),
]


def _model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 48), torch.nn.Tanh(), torch.nn.Linear(48, D)).to(device)


def _inputs(device):
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, N, D_IN, generator=g).to(device)


def _embeddings(device, dtype):
    """Four ``(N, D)`` low-precision embeddings from an fp32-weight model under autocast (no grad)."""
    model, x = _model(device), _inputs(device)
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        z = model(x)
    assert z.dtype == dtype
    return z


def _maps(device, dtype):
    g = torch.Generator().manual_seed(2)
    return [t.to(device=device, dtype=dtype) for _ in range(2)
            for t in KF.sample_imq_rff(D, NUM_FEATURES, generator=g, dtype=F64)]


# Library forms (autocast off inside), as ``f(z)`` on the stacked (4, N, D) embeddings.
def _library(device):
    return {
        "hsic-module": lambda z: HSICLoss(num_features=NUM_FEATURES, learn_scale=True, seed=3)(z, view_dim=0),
        "sfrik-module": lambda z: SFRIKLoss(sim_weight=50.0)(z[0], z[1]),
        "mec-module": lambda z: MECLoss(eps_sq=4.0)(z[0], z[1], z[2], z[3]),
        "rff_hsic": lambda z: sum(KF.rff_hsic(z, *_maps(device, torch.float32), 1.0)),
        "legendre_gram_mean": lambda z: KF.legendre_gram_mean(z[0]),
        "taylor_logdet": lambda z: KF.taylor_logdet(z[:2], z[2:], 0.125).sum(),
    }


@pytest.mark.parametrize("device,dtype", SETTINGS)
@pytest.mark.parametrize("name", list(_library("cpu")))
def test_autocast_does_not_change_the_loss(device, dtype, name):
    z = _embeddings(device, dtype)
    f = _library(device)[name]
    results = []
    for autocast in (True, False):
        zz = z.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            loss = f(zz)
        (grad,) = torch.autograd.grad(loss, zz)
        results.append((loss, grad))
    (l_in, g_in), (l_out, g_out) = results
    assert l_in.dtype == torch.float32 and g_in.dtype == dtype
    assert torch.equal(l_in, l_out), f"{name}: loss inside autocast {l_in.item()!r} != outside {l_out.item()!r}"
    assert torch.equal(g_in, g_out), f"{name}: input gradient differs inside autocast"


def _hsic_lib(maps):
    return lambda z: _hsic.hsic_loss(*KF.rff_hsic(z, *maps, 1.0))


# (library, eager baseline) per loss; the float64 reference is the library form on float64 inputs.
def _pairs(device):
    m32, m64 = _maps(device, torch.float32), _maps(device, F64)
    return {
        "hsic": (_hsic_lib(m32), lambda z: _hsic.hsic_loss(*_hsic.rff_hsic_eager(z, *m32, 1.0)), _hsic_lib(m64)),
        "sfrik": (
            lambda z: KF.sfrik_loss(z[0], z[1], sim_weight=50.0),
            lambda z: _sfrik.sfrik_loss(z[0], z[1], sim_weight=50.0, eager=True)[0],
            lambda z: KF.sfrik_loss(z[0], z[1], sim_weight=50.0),
        ),
        "mec": (
            lambda z: KF.mec_loss(z[0], z[1], z[2], z[3], eps_sq=4.0),
            lambda z: _mec.mec_loss(z[0], z[1], z[2], z[3], eps_sq=4.0, eager=True)[0],
            lambda z: KF.mec_loss(z[0], z[1], z[2], z[3], eps_sq=4.0),
        ),
    }


def _errors(f, z, l64, g64, device, dtype):
    zz = z.clone().requires_grad_()
    with torch.autocast(device, dtype=dtype):
        loss = f(zz)
    (g,) = torch.autograd.grad(loss, zz)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    err_l = (abs(loss.double() - l64) / abs(l64)).item()
    err_g = ((g.double() - g64).abs().max() / g64.abs().max()).item()
    return loss, g, err_l, err_g


@pytest.mark.parametrize("device,dtype", SETTINGS)
@pytest.mark.parametrize("name", ["hsic", "sfrik", "mec"])
def test_low_precision_error_rule(device, dtype, name):
    z = _embeddings(device, dtype)
    lib, eager, ref = _pairs(device)[name]
    z64 = z.double().requires_grad_()
    l64 = ref(z64)
    (g64,) = torch.autograd.grad(l64, z64)
    loss, g, e_lib_l, e_lib_g = _errors(lib, z, l64, g64, device, dtype)
    _, _, e_eag_l, e_eag_g = _errors(eager, z, l64, g64, device, dtype)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    g_floor = 1.1 * UNIT_ROUNDOFF[dtype]
    report = f"{name}: loss err lib {e_lib_l:.2e} eager {e_eag_l:.2e}; grad err lib {e_lib_g:.2e} eager {e_eag_g:.2e}"
    assert e_lib_l <= 2 * e_eag_l + LOSS_FLOOR, report
    assert e_lib_g <= 2 * e_eag_g + g_floor, report
    assert e_lib_l <= LOSS_FLOOR and e_lib_g <= g_floor, report  # fp32 compute, one rounding of the output


@pytest.mark.parametrize("device,dtype", SETTINGS)
@pytest.mark.parametrize(
    "make, call",
    [
        (lambda: HSICLoss(num_features=NUM_FEATURES, normalize=True),
         lambda c, z: c(z[0], z[1], z[2].detach(), z[3].detach())),
        (lambda: SFRIKLoss(sim_weight=50.0), lambda c, z: c(z[0], z[1])),
        (lambda: MECLoss(eps_sq=4.0), lambda c, z: c(z[0], z[1], z[2].detach(), z[3].detach())),
    ],
    ids=["hsic", "sfrik", "mec"],
)
def test_training_step_under_autocast(device, dtype, make, call):
    model, x = _model(device), _inputs(device)
    crit = make()
    with torch.autocast(device, dtype=dtype):
        z = model(x)
        loss = call(crit, z)
    assert z.dtype == dtype and loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
