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
4. An explicit ``"triton"`` that cannot run (the op has no kernel, Triton does not import, the
   tensors are on the CPU without ``TRITON_INTERPRET=1``, or the kernels cannot serve the device:
   its target, :func:`kernelssl.triton.targets.target_of`, is outside the checked
   :data:`~kernelssl.triton.targets.MATRIX`, the installed Triton has no compiler for it, or the
   inputs' dtype has no matrix unit there, bf16 on sm_75) raises with the reason; ``"auto"`` picks
   Triton only for CUDA tensors when nothing stands in the way (the CPU interpreter is for tests,
   never picked silently).  Where the device is what stands in the way, ``"auto"`` runs the torch
   tier with one ``RuntimeWarning`` per device and reason (a process warns once), naming both: never
   a crash in the first training step.
5. What the kernels do not take goes to the torch tier whatever was asked: float64 inputs, any of
   them (a float64 caller asked for float64 accuracy; the torch tier computes in the promoted dtype,
   float64 end to end) and, for
   ``rff_hsic``, random-feature maps that require grad (the fused backward gives the views' gradient
   only).

The kernels' ``input_precision`` is resolved here too, per target (:func:`resolve_precision`).

Nothing here imports Triton: ``import kernelssl`` works with no GPU and no Triton.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from collections.abc import Iterable

import torch

from ._checks import check_choice
from .triton import targets as _targets

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "PRECISIONS",
    "TRITON_OPS",
    "interpreting",
    "triton_import_error",
    "resolve_precision",
    "check_precision",
    "device_problem",
    "implementation",
    "triton_op",
]

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "KERNELSSL_BACKEND"

#: The ops with fused Triton kernels (``kernelssl/triton/<op>.py`` and ``<op>_op.py``).
TRITON_OPS = ("rff_hsic", "legendre_gram", "taylor_logdet", "gaussian_gram", "gram_hsic")

#: The precisions of the fused kernels' fp32 x fp32 products (docs/architecture.md, "Precision"); which
#: of them a GPU has, and its default, depend on its target (:mod:`kernelssl.triton.targets`).
PRECISIONS = ("tf32x3", "ieee", "tf32", "bf16x3", "bf16x6")
#: Those the Triton interpreter (CPU tensors under ``TRITON_INTERPRET=1``) takes.
INTERPRETER_PRECISIONS = ("tf32x3", "ieee", "tf32")

# Whether triton is installed, and the vendors its compilers serve, found without importing it.
# Module constants, so ``torch.compile`` reads them as such (an import inside the dispatch would break
# the graph).  A broken install is found when the kernel module is imported, and raises.
_TRITON_SPEC = importlib.util.find_spec("triton")
_TRITON_FOUND = _TRITON_SPEC is not None


def _triton_backends() -> frozenset:
    if _TRITON_SPEC is None or not _TRITON_SPEC.submodule_search_locations:
        return frozenset()
    found = set()
    for root in _TRITON_SPEC.submodule_search_locations:
        for name, vendor in (("nvidia", "nvidia"), ("amd", "amd")):
            if os.path.isfile(os.path.join(root, "backends", name, "compiler.py")):
                found.add(vendor)
    return frozenset(found)


_TRITON_VENDORS = _triton_backends()
_WARNED: set = set()


def interpreting() -> bool:
    """Whether Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_import_error() -> str | None:
    """``None`` when triton is installed, else the reason Triton kernels cannot run."""
    return None if _TRITON_FOUND else "triton is not installed (pip install triton, on Linux x86_64)"


def resolve_precision(input_precision: str | None = None, device: torch.device | None = None) -> str:
    """The kernels' ``input_precision`` for their fp32 x fp32 products on ``device``'s target
    (:func:`kernelssl.triton.targets.target_of`; off CUDA, and for ``device=None``, the default target,
    an H100).

    An explicit precision wins if the target has it: ``"tf32x3"`` (three TF32 tensor-core products,
    fp32-level error), ``"ieee"`` (full fp32), ``"tf32"`` (one TF32 product, ~1e-3 relative error per
    product), ``"bf16x6"`` / ``"bf16x3"`` (six / three bf16 products of a split); one it lacks (TF32 on
    a T4 or an MI250) raises a ``ValueError`` naming the target and the precisions it has.  ``None``
    resolves to ``"tf32"`` only when torch's own TF32 opt-in is on
    (``torch.backends.cuda.matmul.allow_tf32``, set by ``torch.set_float32_matmul_precision("high")``,
    the flag the torch tier's matmuls obey) and the target has TF32, else to the target's default:
    fp32-level error by its fastest path (``"tf32x3"`` on NVIDIA sm_80+, ``"ieee"`` on sm_75 and AMD,
    where ``bf16x6`` is not within 2x of ``ieee``'s error on every op: :data:`kernelssl.triton.targets.ACCURATE`):
    never a silent plain TF32.  Products of two fp16/bf16 operands
    ignore it (exact on the matrix units, fp32 accumulation)."""
    target = _targets.target_of(device)
    if input_precision is None:
        return "tf32" if target.tf32 and torch.backends.cuda.matmul.allow_tf32 else target.default_precision
    if not isinstance(input_precision, str) or input_precision not in PRECISIONS:
        raise ValueError(f"input_precision: expected one of {', '.join(map(repr, PRECISIONS))} or None, "
                         f"got {input_precision!r}")
    if interpreting() and (device is None or torch.device(device).type != "cuda") \
            and input_precision not in INTERPRETER_PRECISIONS:
        raise ValueError(f"input_precision: {input_precision!r} is not available in the Triton interpreter "
                         f"(TRITON_INTERPRET=1); it has {', '.join(map(repr, INTERPRETER_PRECISIONS))}")
    return target.check_precision(input_precision)


def check_precision(input_precision: str | None) -> None:
    """Raise as :func:`resolve_precision` does for an ``input_precision`` no target has (None, each
    target's default, always passes): the check of a functional's argument, before any tensor is read."""
    if input_precision is not None:
        resolve_precision(input_precision)


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


def device_problem(device: torch.device, dtypes: Iterable[torch.dtype] = ()) -> str | None:
    """``None`` when the fused kernels serve ``device`` (for inputs of ``dtypes``), else the reason: its
    target outside the targets the kernels are checked for (:data:`kernelssl.triton.targets.MATRIX`),
    no compiler for its vendor in the installed Triton, or a dtype without a matrix unit there."""
    if device.type != "cuda":
        return None
    target = _targets.target_of(device)
    if target.name not in _targets.MATRIX:
        return (f"{device} is {target.name} ({target.label}), not one of the targets the kernels are compiled "
                f"and checked for ({', '.join(_targets.MATRIX)})")
    if target.vendor not in _TRITON_VENDORS:
        return f"{device} is {target.name} ({target.label}), and the installed Triton has no {target.vendor} compiler"
    for dtype in dtypes:
        reason = target.serves(dtype)
        if reason is not None:
            return f"{device}: {reason} ({dtype} inputs)"
    return None


def _fall_back(op: str, device: torch.device, reason: str) -> str:
    key = (str(device), reason)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"kernelssl: the fused kernels cannot serve {device} ({reason}); {op} and the other ops "
                      "run the torch tier there (backend='auto')", RuntimeWarning, stacklevel=4)
    return "torch"


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
    if requested == "torch" or (requested == "auto" and x.device.type != "cuda"):
        return "torch"
    problem = _triton_problem(op, x.device)
    if requested == "triton" and problem is not None:
        raise RuntimeError(f"backend='triton' cannot run {op}: {problem}. Use backend='torch' (or 'auto').")
    if problem is not None:
        return "torch"
    if any(t.dtype == torch.float64 for t in (x, *others)):
        return "torch"
    problem = device_problem(x.device, {t.dtype for t in (x, *others)})
    if problem is not None:
        if requested == "triton":
            raise RuntimeError(f"backend='triton' cannot run {op}: {problem}. Use backend='torch' (or 'auto').")
        return _fall_back(op, x.device, problem)
    if torch.is_grad_enabled() and any(t.requires_grad for t in frozen):
        return "torch"
    return "triton"


_LOADED: dict = {}


def triton_op(op: str):
    """The host module of ``op``'s fused kernels, ``kernelssl.triton.<op>_op`` (imported on first use;
    then a dict lookup, which ``torch.compile`` traces -- an import inside a compiled region would break
    its graph)."""
    mod = _LOADED.get(op)
    if mod is None:
        mod = _LOADED[op] = importlib.import_module(f"kernelssl.triton.{op}_op")
    return mod
