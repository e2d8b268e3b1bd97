"""How the three ops launch their kernels: ``wrap_triton(kernel)[grid](*args, **kwargs)``.

Every kernel module imports :func:`wrap_triton` from here instead of ``torch.library``'s; it adds two
things to torch's wrapper:

* **The device guard.**  Triton launches on the *current* CUDA device and its current stream, while
  torch allocates on the tensors' device.  With tensors on ``cuda:1`` and the current device 0 (a DDP
  script that moves its model with ``.to(f"cuda:{rank}")`` but never calls ``set_device``), an
  unguarded launch would run on the wrong device, or on a stream torch does not order against.  Each
  launch therefore runs inside ``torch.cuda.device(t.device)`` of its first tensor argument (all of
  a launch's tensors are on one device: the ops check it).  No-op for CPU tensors (the interpreter)
  and for fake tensors while ``torch.compile`` traces: the code inductor generates for the kernels
  guards the device itself.
* **The interpreter.**  Under ``TRITON_INTERPRET=1`` ``@triton.jit`` gives ``InterpretedFunction``
  objects, which cannot be captured into a graph.  torch >= 2.12's ``wrap_triton`` hands them back
  unwrapped (a plain launch); torch 2.11's raises ("wrap_triton only works on functions annotated
  with triton.jit or triton.autotune").  Here they are launched directly under every torch version;
  real ``JITFunction`` s still go through ``torch.library.wrap_triton``, so ``torch.compile`` sees
  them as before.  Triton 3.6's interpreter also converts a scalar argument to an index (``range(0,
  q, BLOCK)``) with ``int()`` of a one-element array, which NumPy >= 2.4 refuses ("only 0-dimensional
  arrays can be converted to Python scalars"; Triton 3.8 squeezes first): while interpreting on such a
  Triton, :func:`_fix_interpreter_index` makes that conversion take the element (``.item()``).

``tests/sm90_compile.py`` (and the launch-counting tests) replace a module's ``wrap_triton`` with a
recorder; the guard is looked up at launch time (``device_guard``), so a test can record it too.
"""
from __future__ import annotations

import contextlib

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton as _torch_wrap_triton

try:
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # a triton without the interpreter: nothing is ever interpreted
    _Interpreted = ()

from .._backend import interpreting

__all__ = ["wrap_triton", "device_guard"]


def _fix_interpreter_index() -> None:
    """Triton < 3.8's interpreter: ``tensor.__index__`` as ``int(element)`` (module docstring).  Idempotent."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "_kernelssl_index_fix", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._kernelssl_index_fix = True
    interpreter._patch_lang_tensor = patched


if _Interpreted and interpreting() and tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8):
    _fix_interpreter_index()


def device_guard(device: torch.device | None, fake: bool = False):
    """``torch.cuda.device(device)`` for a real CUDA tensor's device; else a no-op context."""
    if device is None or device.type != "cuda" or fake:
        return contextlib.nullcontext()
    return torch.cuda.device(device)


class _GuardedLaunch:
    __slots__ = ("kernel",)

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        kernel = self.kernel

        def launch(*args, **kwargs):
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            device = None if first is None else first.device
            fake = first is not None and is_fake(first)
            with device_guard(device, fake):
                if isinstance(kernel, _Interpreted):
                    return kernel[grid](*args, **kwargs)
                return _torch_wrap_triton(kernel)[grid](*args, **kwargs)

        return launch


def wrap_triton(kernel) -> _GuardedLaunch:
    """``torch.library.wrap_triton`` with the device guard, launching interpreted kernels directly
    (module docstring).  Use as ``wrap_triton(kernel)[grid](*args, **kwargs)``."""
    return _GuardedLaunch(kernel)
