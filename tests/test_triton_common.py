"""How the fused ops launch their kernels (kernelssl/triton/_common.py: the guarded ``wrap_triton``).

* The device guard: every kernel launch of every op runs inside ``torch.cuda.device`` of the
  tensors' device (Triton launches on the *current* device and stream; torch allocates on the
  tensors').  On CPU the guard is a no-op, so these tests record it: every interpreted launch must
  happen inside a guard entered with the device of the launch's tensors.  On a GPU, tensors on a
  device that is not the current one must give the values they give on the current one.
  (gaussian_gram's launches are checked the same way in test_gaussian_gram_triton.py.)
* Grid limits: MEC's batch of pairs is folded into grid axis 0 (limit 2^31 - 1), never on axes 1/2
  (limit 65535).  Checked on the launches the GPU path records for a batch of 65537 pairs
  (nothing runs).
* ``mec_loss`` without components launches no convergence diagnostics (16 power-iteration launches
  per call for s > ONCHIP_MAX); with components it does, and the loss is the same.
* Mixed float32 / float64 pairs with ``backend="triton"``: the ops of two inputs (MEC's log det,
  SFRIK, alignment + uniformity) give exactly the torch tier's numbers, whichever input is the
  float64 one: the loss in float64, never through the fp32 kernels.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import helpers
import kernelssl.functional as KF
from helpers import CUDA, assert_close, needs_cuda
from kernelssl import dispatch

L = pytest.importorskip("kernelssl.triton._common")
from kernelssl.triton import legendre_gram_op as LG  # noqa: E402
from kernelssl.triton import rff_hsic_op as RH  # noqa: E402
from kernelssl.triton import taylor_logdet_op as TL  # noqa: E402

MODULES = (RH, LG, TL)


def _run_all_ops(device):
    """Forward + backward of rff_hsic, legendre_gram and taylor_logdet (small shapes; several tiles under
    the interpreter), on ``device``.  Returns the values and gradients, on the CPU, in float64."""
    g = torch.Generator().manual_seed(0)
    out = []
    views = torch.randn(2, 6, 5, generator=g).to(device).requires_grad_()
    w_a, b_a = torch.randn(7, 5, generator=g).to(device), torch.rand(7, generator=g).to(device)
    w_b, b_b = torch.randn(4, 5, generator=g).to(device), torch.rand(4, generator=g).to(device)
    zy, zz = RH.rff_hsic(views, w_a, b_a, w_b, b_b, 1.3, input_precision="ieee")
    (0.7 * zy - 1.9 * zz).backward()
    out += [zy, zz, views.grad]
    z = torch.randn(40, 9, generator=g).to(device).requires_grad_()
    m = LG.legendre_gram_mean(z, (1.0, 4.0, 4.0))
    (1.7 * m).backward()
    out += [m, z.grad]
    a = torch.randn(2, 7, 5, generator=g).to(device).requires_grad_()
    b = torch.randn(2, 7, 5, generator=g).to(device).requires_grad_()
    t, rho, _ = TL.taylor_logdet_with_diagnostics(a, b, 0.3, 4)
    (t * torch.tensor([1.5, -0.5], device=device)).sum().backward()
    out += [t, rho, a.grad, b.grad]
    return [o.detach().to("cpu", torch.float64) for o in out]


def test_every_module_launches_through_the_guarded_wrapper():
    for mod in MODULES:
        assert mod.wrap_triton is L.wrap_triton, mod.__name__


def test_device_guard_helper():
    assert isinstance(L.device_guard(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(L.device_guard(None), contextlib.nullcontext)
    assert isinstance(L.device_guard(torch.device("cuda", 1), fake=True), contextlib.nullcontext)
    guard = L.device_guard(torch.device("cuda", 1))  # constructing it touches no CUDA state
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@pytest.mark.skipif(CUDA, reason="the interpreter path (the GPU path is checked by the CUDA test below)")
def test_every_launch_runs_inside_a_guard_for_its_tensors_device(monkeypatch):
    """Every kernel launch of these three ops (forward and backward) happens inside the device guard,
    entered with the device of the launch's first tensor; the recorder stands in for the guard."""
    assert dispatch.interpreting()
    guards, launches = helpers.record_guarded_launches(monkeypatch)
    _run_all_ops("cpu")
    names = {name for name, _, _ in launches}
    # forward and backward kernels of the three ops were launched ...
    assert {"_rff_features_kernel", "_rff_dx_kernel", "_gram_phi_sum_kernel", "_panel_matmul_kernel",
            "_gemm_kernel", "_small_series_kernel"} <= names, names
    # ... each inside a guard for the device of its tensors
    bad = [(name, g, dev) for name, g, dev in launches if g != dev]
    assert not bad, bad
    assert len(guards) == len(launches) and not any(fake for _, fake in guards)


@needs_cuda
def test_gpu_tensors_on_a_device_that_is_not_the_current_one(monkeypatch):
    """Tensors on the last CUDA device while device 0 is current (with two or more GPUs: a device that
    is not the current one, as in a DDP script that never calls set_device): every launch is guarded
    with the tensors' device, and values and gradients equal those computed on the current device."""
    helpers.check_on_a_device_that_is_not_the_current_one(monkeypatch, _run_all_ops)


# ---------------------------------------------------------------------------------------------------
# grid limits
# ---------------------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for a module's ``wrap_triton``: records ``(kernel name, grid)``, runs nothing."""

    def __init__(self, calls):
        self.calls = calls

    def __call__(self, kernel):
        calls = self.calls

        class _Grid:
            def __getitem__(self, grid):
                return lambda *a, **k: calls.append((kernel.fn.__name__, tuple(grid)))

        return _Grid()


@pytest.mark.parametrize("path", ["onchip", "tiled"])
def test_taylor_large_batch_respects_the_grid_limits(path, monkeypatch):
    """A batch of 65537 pairs (one more than grid axes 1/2 take): every launch of the forward (with
    diagnostics) and backward, for orders 1 and 4, m- and d-space, has axes 1/2 <= 65535 and axis 0
    <= 2^31 - 1.  Nothing runs (the recorder replaces the launches)."""
    calls: list = []
    monkeypatch.setattr(TL, "wrap_triton", _Recorder(calls))
    if path == "tiled":
        monkeypatch.setattr(TL, "ONCHIP_MAX", 0)
    monkeypatch.setattr(TL, "_PROJ_IN_TILE_MAX", 0)  # d-space: the row-owning projection kernel too
    P = 65537
    for m, d in [(3, 4), (4, 3)]:
        a = torch.zeros(P, m, d, requires_grad=True)
        b = torch.zeros(P, m, d, requires_grad=True)
        for order in (1, 4):  # forward with diagnostics, and backward (values unused: nothing ran)
            TL.taylor_logdet_with_diagnostics(a, b, 0.5, order)[0].sum().backward()
    names = {name for name, _ in calls}
    assert "_gemm_kernel" in names and "_project_kernel" in names and "_rownorm_kernel" in names
    if path == "tiled":
        assert {"_pair_diag_kernel", "_power_step_kernel"} <= names
    bad = [(n, g) for n, g in calls if g[0] > 2**31 - 1 or any(x > 65535 for x in g[1:]) or len(g) > 3]
    assert not bad, bad[:5]
    assert max(g[0] for _, g in calls) >= P  # the batch is there, on axis 0


def test_taylor_grid_beyond_cuda_limits_raises():
    with pytest.raises(ValueError, match="pairs"):
        TL._programs(4, 2**30)
    assert TL._programs(2, 2**30 - 1) == 2**31 - 2


# ---------------------------------------------------------------------------------------------------
# mec_loss diagnostics only on request
# ---------------------------------------------------------------------------------------------------


def test_mec_loss_without_components_launches_no_diagnostics(monkeypatch):
    """Tiled path (s > ONCHIP_MAX, forced): without components no power-iteration launch; with
    components the 16 of one taylor_logdet call (both directions are one batch of 2 pairs), and the
    same loss."""
    calls: list = []
    real = TL.wrap_triton

    def counting(kernel):
        calls.append(kernel.fn.__name__)
        return real(kernel)

    monkeypatch.setattr(TL, "wrap_triton", counting)
    monkeypatch.setattr(TL, "ONCHIP_MAX", 0)
    rng = np.random.default_rng(3)
    dev = "cuda" if CUDA else "cpu"
    z_a = torch.tensor(rng.standard_normal((9, 6)), dtype=torch.float32, device=dev)
    z_b = torch.tensor(rng.standard_normal((9, 6)), dtype=torch.float32, device=dev)
    loss = KF.mec_loss(z_a, z_b, backend="triton")
    plain = list(calls)
    calls.clear()
    comp = KF.mec_loss(z_a, z_b, backend="triton", return_components=True)
    assert plain.count("_power_step_kernel") == 0, plain
    assert "_gemm_kernel" in plain
    assert calls.count("_power_step_kernel") == TL.POWER_ITERS
    assert_close(loss, comp.loss, rtol=0, atol=0, name="loss")


def _pair_ops():
    def mec(a, b, backend):
        return (KF.taylor_logdet(a, b, 0.1, 4, backend=backend),)

    def sfrik(a, b, backend):
        c = KF.sfrik_loss(a, b, backend=backend, return_components=True)
        return c.loss, c.mse, c.mmd_a, c.mmd_b

    def align_uniform(a, b, backend):
        c = KF.align_uniform_loss(a, b, backend=backend, return_components=True)
        return c.loss, c.alignment, c.uniformity_a, c.uniformity_b

    return {"taylor_logdet": mec, "legendre_gram": sfrik, "gaussian_gram": align_uniform}


@pytest.mark.parametrize("op", ["taylor_logdet", "legendre_gram", "gaussian_gram"])
@pytest.mark.parametrize("which", [0, 1])
def test_mixed_float32_float64_pairs_are_computed_in_float64(op, which):
    fn = _pair_ops()[op]
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(12, 9, generator=g, dtype=torch.float64) for _ in range(2)]
    rows[1 - which] = rows[1 - which].float()  # the other input is the float64 one
    outs = {}
    for backend in ("triton", "torch"):
        inputs = [r.to(helpers.DEV).requires_grad_() for r in rows]
        vals = fn(*inputs, backend)
        grads = torch.autograd.grad(vals[0] * 0.7, inputs)  # the loss's gradient, non-unit upstream
        outs[backend] = (vals, grads)
    assert outs["triton"][0][0].dtype == torch.float64, op
    for v, vt in zip(outs["triton"][0], outs["torch"][0]):
        assert v.dtype == vt.dtype and torch.equal(v, vt), op
    for gr, gt in zip(outs["triton"][1], outs["torch"][1]):
        assert torch.equal(gr, gt), op
