"""Test helpers (importable as ``helpers``: pytest puts tests/ on sys.path).  The tolerances' machinery,
the 2x rule and the TF32 emulation are the library's own :mod:`kernelssl.numerics`; here are the finite
difference and the pieces several test files share: the device setup of the Triton tiers, random rows,
the recorders of the kernels' launches and of the tensors an op creates, the checks of the offline
sm_90 compile (tests/compile_targets.py) and of the torch.func transforms, and the loader of the
scripts in benchmarks/."""
from __future__ import annotations

import contextlib
import importlib.util
import os

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernelssl.numerics import assert_close, assert_error_within_torch, max_abs_error, to_numpy  # noqa: F401

#: The repository's root (tests/ is one level below it).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module, loaded from its file (benchmarks/ is not a package;
    no sys.path edit)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# devices: the GPU tests run only with CUDA; without it the kernels run through the Triton interpreter
# (conftest.py sets TRITON_INTERPRET=1 before any test imports kernelssl.triton)
# --------------------------------------------------------------------------------------------------

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU; none on this machine")


def assert_kernels_can_run() -> None:
    """Without CUDA the kernels run only under the interpreter: a Triton test file checks it is on."""
    from kernelssl import dispatch

    if not CUDA:
        assert dispatch.interpreting(), "TRITON_INTERPRET must be set on a machine without CUDA"


def central_difference(f, x: np.ndarray, *, h: float = 1e-6) -> np.ndarray:
    """Central finite-difference gradient of a scalar function of a float64 array (O(h^2) error)."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f(x)
        flat[i] = old - h
        fm = f(x)
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return g


def random_rows(n: int, q: int, seed: int, dtype=torch.float64, unit: bool = False) -> torch.Tensor:
    """``n`` Gaussian rows of length ``q`` with norms spread over [0.25, 2.25] (``unit``: normalised),
    drawn in float64 from ``seed`` and rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 + 0.25  # rows of various norms
    z = torch.randn(n, q, generator=g, dtype=torch.float64) * scale
    if unit:
        z = torch.nn.functional.normalize(z, dim=1)
    return z.to(dtype)


# --------------------------------------------------------------------------------------------------
# launches of the Triton kernels (kernelssl/triton/_common.py: device_guard, wrap_triton, gram_config)
# --------------------------------------------------------------------------------------------------


def record_guarded_launches(monkeypatch) -> tuple[list, list]:
    """Under the interpreter: stand a recorder in for ``kernelssl.triton._common.device_guard`` and record
    every kernel launch.  Returns ``(guards, launches)``: ``(device, fake)`` per guard entered, and
    ``(kernel name, device of the innermost guard or "no guard", device of its first tensor)`` per
    launch -- in a correct op every launch's two devices are equal."""
    from triton.runtime.interpreter import InterpretedFunction

    from kernelssl.triton import _common

    inside: list = []
    guards: list = []
    launches: list = []

    @contextlib.contextmanager
    def recording_guard(device, fake=False):
        guards.append((device, fake))
        inside.append(device)
        try:
            yield
        finally:
            inside.pop()

    run = InterpretedFunction.run

    def checked_run(self, *args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        launches.append((self.fn.__name__, inside[-1] if inside else "no guard", tensors[0].device))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(_common, "device_guard", recording_guard)
    monkeypatch.setattr(InterpretedFunction, "run", checked_run)
    return guards, launches


def record_interpreted_launches(monkeypatch) -> list:
    """Under the interpreter: record ``(kernel name, grid)`` of every kernel launch (the kernels run)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: list = []
    run = InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        launches.append((self.fn.__name__, tuple(kwargs["grid"])))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    return launches


def check_on_a_device_that_is_not_the_current_one(monkeypatch, run) -> None:
    """GPU: ``run(device)`` (a list of outputs, on the CPU) with its tensors on the last CUDA device while
    device 0 is current (with two or more GPUs: a device that is not the current one, as in a DDP script
    that never calls set_device) -- every launch guarded with the tensors' device, and the outputs of
    the current device.  Same kernels and inputs: bitwise equal on two GPUs of one model; 1e-5 allows for
    a different model, whose SM count may split a reduction differently (another fp32 summation order)."""
    from kernelssl.triton import _common

    target = torch.device("cuda", torch.cuda.device_count() - 1)
    guards: list = []
    real_guard = _common.device_guard

    def recording_guard(device, fake=False):
        guards.append(device)
        return real_guard(device, fake)

    with torch.cuda.device(0):
        expected = run(torch.device("cuda", 0))
        monkeypatch.setattr(_common, "device_guard", recording_guard)
        got = run(target)
        torch.cuda.synchronize(target)
        assert torch.cuda.current_device() == 0
    assert guards and all(d == target for d in guards)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()), name=f"output {i}")


def forbid_torch_tier(monkeypatch, module, *names) -> None:
    """Make the torch tier's functions ``names`` of ``module`` raise if called: the kernels must run."""

    def fail(*a, **k):
        raise AssertionError("the torch math ran instead of the interpreted kernels")

    for name in names:
        monkeypatch.setattr(module, name, fail)


def use_gpu_gram_config(monkeypatch, module):
    """Make ``module`` (a host module of a Gram op) take the GPU block sizes of ``_common.gram_config``
    (64/128-wide tiles) under the interpreter.  Returns that configuration function."""
    from kernelssl.triton import _common

    config = _common.gram_config

    def gpu_config(dtype, q, *args):
        with monkeypatch.context() as m:
            m.setattr(_common, "interpreting", lambda: False)
            return config(dtype, q, *args)

    monkeypatch.setattr(module, "gram_config", gpu_config)
    return gpu_config


@contextlib.contextmanager
def tf32_flag_off():
    """torch's TF32 flag off inside (the kernels' default precision is then tf32x3), restored after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# --------------------------------------------------------------------------------------------------
# the GPU path compiled for a target without a GPU (tests/compile_targets.py)
# --------------------------------------------------------------------------------------------------


def target_variants(op: str, target: str = "sm_90") -> list[dict]:
    """Every kernel variant the GPU path of ``op`` issues on ``target``, compiled for it by
    tests/compile_targets.py (skipped without Triton's bundled ptxas), after the checks every op and
    target share: the recipes with dimensions equal to 1 compiled too, no register spills outside
    those, every variant within the target's shared memory per block, and matrix-unit instructions in
    some variant where Triton emits them for the target."""
    import compile_targets
    from kernelssl.triton.targets import lookup

    if not compile_targets.tools_available():
        pytest.skip("Triton's bundled ptxas is not available")
    variants = compile_targets.run(op, target)
    assert any(v["ones"] for v in variants)  # the recipes with dimensions equal to 1 compiled too
    spills = [v for v in variants if (v["spill_stores"] or v["spill_loads"]) and not v["ones"]]
    assert not spills, spills
    over = [v for v in variants if v["shared"] > lookup(target).smem_per_block]
    assert not over, over
    assert any(v["tensor_core"] for v in variants) == lookup(target).triton_mma
    return variants


def sm90_variants(op: str) -> list[dict]:
    """:func:`target_variants` for sm_90 (H100/H200)."""
    return target_variants(op, "sm_90")


def assert_tensor_cores_unless_ieee(gemms: list[dict], key: str, *, mma_sync: bool = True) -> None:
    """The GEMM variants come in the three precisions (constexpr ``key``), and a variant uses the tensor
    cores (wgmma, and with ``mma_sync`` also mma.sync) exactly when its precision is not "ieee": no
    silent TF32."""
    assert {v["constexprs"][key] for v in gemms} == {"ieee", "tf32", "tf32x3"}
    for v in gemms:
        cores = v["wgmma"] + (v["mma_sync"] if mma_sync else 0)
        assert (cores > 0) == (v["constexprs"][key] != "ieee"), v


# --------------------------------------------------------------------------------------------------
# the tensors an op creates; torch.func
# --------------------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def check_torch_func(f, za: torch.Tensor, zb: torch.Tensor, tangent: torch.Tensor) -> None:
    """``torch.func.grad``, ``vmap`` (over three stacked ``za``) and ``jvp`` (along ``tangent``) of the
    loss ``f(za, zb)`` against autograd and a loop over the stack (float64)."""
    from torch.func import grad, jvp, vmap

    a = za.clone().requires_grad_()
    f(a, zb).backward()
    torch.testing.assert_close(grad(f)(za, zb), a.grad, rtol=1e-10, atol=1e-12)
    stack_a = torch.stack([za, 2.0 * za + 0.1, za.flip(0)])
    batched = vmap(f)(stack_a, zb.expand(3, *zb.shape))
    torch.testing.assert_close(batched, torch.stack([f(x, zb) for x in stack_a]), rtol=1e-10, atol=1e-12)
    _, jvp_out = jvp(lambda x: f(x, zb), (za,), (tangent,))
    torch.testing.assert_close(jvp_out, (a.grad * tangent).sum(), rtol=1e-9, atol=1e-12)


def check_second_derivative(f, *inputs: torch.Tensor, seed: int = 0) -> None:
    """A gradient penalty's gradient through ``f`` (float64 ``inputs``): the derivative, along a random
    direction ``E``, of ``P(x) = sum_i <R_i, df/dx_i>`` (random weights ``R``, so the upstream gradient is
    not one), taken by autograd through ``create_graph=True``, against a central difference of ``P``
    computed from first gradients only (:data:`kernelssl.numerics.SECOND_DERIVATIVE_FD`)."""
    from kernelssl.numerics import SECOND_DERIVATIVE_FD as TOL

    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in inputs]
    direction = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in inputs]

    def penalty(xs, create_graph):
        xs = [x.detach().clone().requires_grad_(True) for x in xs]
        grads = torch.autograd.grad(f(*xs), xs, create_graph=create_graph)
        return xs, sum((w * g).sum() for w, g in zip(weights, grads))

    xs, p = penalty(inputs, True)
    assert p.requires_grad, "the first gradient is not differentiable (taken as a constant)"
    second = torch.autograd.grad(p, xs)
    auto = float(sum((e * g).sum() for e, g in zip(direction, second)))
    h = TOL["h"]
    plus = penalty([x + h * e for x, e in zip(inputs, direction)], False)[1]
    minus = penalty([x - h * e for x, e in zip(inputs, direction)], False)[1]
    fd = float(plus - minus) / (2.0 * h)
    assert abs(auto - fd) <= TOL["rtol"] * max(abs(fd), abs(auto)) + TOL["atol"], (auto, fd)
