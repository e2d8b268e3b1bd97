"""The one place that decides which implementation of an op runs (docs/architecture.md, "Dispatch").

Every functional entry point (:mod:`kernelssl.functional`) checks its inputs once, then asks
:func:`implementation` which tier serves the call, and calls it:

* ``"triton"`` -- the fused kernels (:mod:`kernelssl.triton`, ``<op>_op.py``);
* ``"torch"`` -- the torch tier (:mod:`kernelssl.ops`), its fastest form (custom autograd Functions);
* ``"autograd"`` -- the torch tier's plain-autograd form, under ``torch.func`` transforms (``grad``,
  ``vmap``, ``jvp``, ...), which cannot see through custom Functions (same value; the Gram ops then
  materialise their ``n x n`` Gram).

The decision, in order:

1. ``backend`` is one of :data:`BACKENDS`; ``"auto"`` defers to the ``KERNELSSL_BACKEND`` environment
   variable (read at every call), itself ``"auto"`` when unset.
2. Under a ``torch.func`` transform: ``"autograd"``; an explicit ``"triton"`` raises (the fused ops
   have no vmap/jvp rule).
3. ``"torch"``: the torch tier.
4. An explicit ``"triton"`` that cannot run (the op has no kernel, Triton does not import, or the
   tensors are on the CPU without ``TRITON_INTERPRET=1``) raises with the reason; ``"auto"`` picks
   Triton only for CUDA tensors when nothing stands in the way (the CPU interpreter is for tests,
   never picked silently).
5. What the kernels do not take goes to the torch tier whatever was asked: float64 inputs, any of
   them (a float64 caller asked for float64 accuracy; the torch tier computes in the promoted dtype,
   float64 end to end) and, for
   ``rff_hsic``, random-feature maps that require grad (the fused backward gives the views' gradient
   only).

Nothing here imports Triton: ``import kernelssl`` works with no GPU and no Triton.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterable

import torch

from ._checks import check_choice

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "PRECISIONS",
    "TRITON_OPS",
    "interpreting",
    "triton_import_error",
    "resolve_precision",
    "implementation",
    "triton_op",
]

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "KERNELSSL_BACKEND"

#: The ops with fused Triton kernels (``kernelssl/triton/<op>.py`` and ``<op>_op.py``).
TRITON_OPS = ("rff_hsic", "legendre_gram", "taylor_logdet", "gaussian_gram")

#: The precisions of the fused kernels' fp32 x fp32 products (docs/architecture.md, "Precision").
PRECISIONS = ("tf32x3", "ieee", "tf32")

# Whether triton is installed, found without importing it.  A module constant, so ``torch.compile``
# reads it as one (an import inside the dispatch would break the graph).  A broken install is found
# when the kernel module is imported, and raises.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_import_error() -> str | None:
    """``None`` when triton is installed, else the reason Triton kernels cannot run."""
    return None if _TRITON_FOUND else "triton is not installed (pip install triton, on Linux x86_64)"


def resolve_precision(input_precision: str | None = None) -> str:
    """The kernels' ``input_precision`` for their fp32 x fp32 products.

    An explicit ``"tf32x3"`` (three TF32 tensor-core products, fp32-level error), ``"ieee"`` (full fp32
    on the FMA units) or ``"tf32"`` (one TF32 product, ~1e-3 relative error per product) wins.  ``None``
    resolves to ``"tf32"`` only when torch's own TF32 opt-in is on
    (``torch.backends.cuda.matmul.allow_tf32``, set by ``torch.set_float32_matmul_precision("high")``,
    the flag the torch tier's matmuls obey), else to ``"tf32x3"``: never a silent plain TF32.
    Products of two fp16/bf16 operands ignore it (exact on the tensor cores, fp32 accumulation)."""
    if input_precision is None:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    if not isinstance(input_precision, str) or input_precision not in PRECISIONS:
        raise ValueError(f"input_precision: expected one of {', '.join(map(repr, PRECISIONS))} or None, "
                         f"got {input_precision!r}")
    return input_precision


def _requested(backend: str) -> str:
    check_choice(backend, "backend", BACKENDS)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto") or "auto"
        check_choice(env, ENV_VAR, BACKENDS)
        return env
    return backend


def _triton_problem(op: str, device: torch.device) -> str | None:
    if op not in TRITON_OPS:
        return f"there is no fused Triton kernel for {op}"
    err = triton_import_error()
    if err is not None:
        return f"triton does not import ({err})"
    if device.type != "cuda" and not interpreting():
        return (
            f"the inputs are on {device}, and Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before kernelssl is imported, to run them on the CPU interpreter)"
        )
    return None


def implementation(op: str, backend: str, x: torch.Tensor, *others: torch.Tensor,
                   frozen: Iterable[torch.Tensor] = ()) -> str:
    """``"triton"``, ``"torch"`` or ``"autograd"`` for this call of ``op`` on the inputs ``x, *others``
    (module docstring); raises with the reason when an explicit ``backend="triton"`` cannot be honoured.
    The device is ``x``'s; a float64 tensor among ``x, *others`` sends the call to the torch tier, which
    computes in the promoted dtype.  ``frozen``: inputs the fused op does not differentiate (the torch
    tier does, when they require grad); the kernels take them in any float dtype."""
    frozen = tuple(frozen)
    requested = _requested(backend)
    if torch._C._are_functorch_transforms_active():
        if requested == "triton":
            raise RuntimeError(
                f"backend='triton' cannot run {op} under a torch.func transform (the fused op has no vmap/jvp "
                "rule); use backend='torch' or 'auto' (the plain-autograd form)"
            )
        return "autograd"
    if requested == "torch":
        return "torch"
    problem = _triton_problem(op, x.device)
    if requested == "triton" and problem is not None:
        raise RuntimeError(f"backend='triton' cannot run {op}: {problem}. Use backend='torch' (or 'auto').")
    if problem is not None or (requested == "auto" and x.device.type != "cuda"):
        return "torch"
    if any(t.dtype == torch.float64 for t in (x, *others)):
        return "torch"
    if torch.is_grad_enabled() and any(t.requires_grad for t in frozen):
        return "torch"
    return "triton"


def triton_op(op: str):
    """The host module of ``op``'s fused kernels, ``kernelssl.triton.<op>_op`` (imported on first use)."""
    return importlib.import_module(f"kernelssl.triton.{op}_op")
