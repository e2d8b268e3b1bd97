"""Determinism (docs/numerics.md): two identical runs give bitwise-equal loss and gradients.

Each run builds everything from scratch (model from a seed, a fresh loss module -- HSIC's random
features come from the module's own generator, seeded by ``seed``), does two training steps (so the
generator's advance is covered too) and records the losses, the gradients of every parameter and of
the embeddings.  float32, sizes large enough for multi-threaded CPU matmuls (n = 256).  Compared with
``torch.equal``: bitwise, no tolerance.

Backends: the torch path on CPU here; on a GPU also the torch path on CUDA and the Triton kernels
of every registered op (``kernelssl.dispatch.TRITON_OPS``).
"""
from __future__ import annotations

import pytest
import torch

from kernelssl import dispatch
from kernelssl.losses import HSICLoss, MECLoss, SFRIKLoss

N, D_IN, D = 256, 32, 64

LOSSES = {
    "hsic": (lambda b: HSICLoss(num_features=256, normalize=True, learn_scale=True, seed=11, backend=b), "rff_hsic"),
    "sfrik": (lambda b: SFRIKLoss(backend=b), "legendre_gram_mean"),
    "mec": (lambda b: MECLoss(backend=b), "taylor_logdet"),
}


def _settings():
    cuda = torch.cuda.is_available()
    out = [pytest.param("cpu", "torch", id="cpu-torch")]
    out.append(pytest.param("cuda", "torch", id="cuda-torch",
                            marks=pytest.mark.skipif(not cuda, reason="needs a CUDA GPU; none on this machine")))
    out.append(pytest.param("cuda", "triton", id="cuda-triton",
                            marks=pytest.mark.skipif(not cuda, reason="needs a CUDA GPU; none on this machine")))
    return out


def _run(name: str, device: str, backend: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, 128), torch.nn.ReLU(), torch.nn.Linear(128, D)).to(device)
    crit = LOSSES[name][0](backend).to(device)
    g = torch.Generator().manual_seed(1)
    record = []
    for _ in range(2):
        x1, x2 = (torch.randn(N, D_IN, generator=g).to(device) for _ in range(2))
        z1, z2 = model(x1), model(x2)
        z1.retain_grad()
        z2.retain_grad()
        loss = crit(z1, z2, z2.detach(), z1.detach()) if name == "hsic" else crit(z1, z2)
        model.zero_grad()
        crit.zero_grad()
        loss.backward()
        params = list(model.parameters()) + list(crit.parameters())
        record.append([loss.detach().clone(), z1.grad.clone(), z2.grad.clone()] + [p.grad.clone() for p in params])
    return record


@pytest.mark.parametrize("device,backend", _settings())
@pytest.mark.parametrize("name", list(LOSSES))
def test_two_runs_are_bitwise_equal(name, device, backend):
    op = LOSSES[name][1]
    assert backend != "triton" or op in dispatch.TRITON_OPS, f"no Triton kernel registered for {op}"
    first, second = _run(name, device, backend), _run(name, device, backend)
    labels = ["loss", "grad z1", "grad z2"] + [f"grad param[{i}]" for i in range(len(first[0]) - 3)]
    for step, (a, b) in enumerate(zip(first, second)):
        assert torch.isfinite(a[0])
        for label, x, y in zip(labels, a, b):
            assert torch.equal(x, y), f"step {step} {label}: max |diff| {(x - y).abs().max().item()!r}"
    # the second step drew new features / saw new data: a vacuous "equal" of constants is excluded
    assert not torch.equal(first[0][0], first[1][0])
