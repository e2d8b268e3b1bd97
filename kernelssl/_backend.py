"""Backend selection (SPEC §4, "Backends").

``backend="auto" | "triton" | "torch"`` on every entry point, plus the ``KERNELSSL_BACKEND``
environment variable, which is consulted only when the argument is ``"auto"``.  ``auto`` picks Triton
for CUDA tensors when Triton imports and the op has a Triton kernel, else torch, silently.  An
explicit request that cannot be honoured raises with the reason.  Nothing here imports Triton at
module load: ``import kernelssl`` works with no GPU and no Triton.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ._checks import check_choice

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "KERNELSSL_BACKEND"

# Ops whose fused Triton kernel has landed, as op name -> module under kernelssl.triton.
# Each kernel issue adds its op here.
TRITON_OPS: dict[str, str] = {
    "rff_hsic": "rff_hsic",
    "legendre_gram_mean": "legendre_gram",
    "taylor_logdet": "taylor_logdet",
    "gaussian_gram_logmean": "gaussian_gram",
}


# Whether triton is installed, found without importing it (``import kernelssl`` must not import
# triton).  A module constant, so ``torch.compile`` reads it as one (an import inside the dispatch
# would break the graph).  A broken install is found when the kernel module is imported, and raises.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_import_error() -> str | None:
    """``None`` when triton is installed, else the reason Triton kernels cannot run."""
    return None if _TRITON_FOUND else "triton is not installed (pip install triton, on Linux x86_64)"


def interpreting() -> bool:
    """Whether Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: The precisions of the fused kernels' fp32 x fp32 products (SPEC §4, "Numerics"), default first.
PRECISIONS = ("tf32x3", "ieee", "tf32")


def resolve_precision(input_precision: str | None = None) -> str:
    """The kernels' ``input_precision`` for their fp32 x fp32 products (SPEC §4, "Numerics").

    An explicit ``"tf32x3"`` (three TF32 tensor-core products, fp32-level error), ``"ieee"`` (full fp32
    on the FMA units) or ``"tf32"`` (one TF32 product, ~1e-3 relative error per product) wins.  ``None``
    resolves to ``"tf32"`` only when torch's own TF32 opt-in is on
    (``torch.backends.cuda.matmul.allow_tf32``, set by ``torch.set_float32_matmul_precision("high")``,
    the flag the torch path's matmuls obey), else to ``"tf32x3"``: never a silent plain TF32.
    Products of two fp16/bf16 operands ignore it (exact on the tensor cores, fp32 accumulation)."""
    if input_precision is None:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    if not isinstance(input_precision, str) or input_precision not in PRECISIONS:
        raise ValueError(f"input_precision: expected one of {', '.join(map(repr, PRECISIONS))} or None, "
                         f"got {input_precision!r}")
    return input_precision


def resolve_backend(backend: str, op: str, device: torch.device) -> str:
    """Return ``"torch"`` or ``"triton"`` for running ``op`` on ``device``, or raise with the reason."""
    check_choice(backend, "backend", BACKENDS)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto") or "auto"
        check_choice(env, ENV_VAR, BACKENDS)
        backend = env
    if backend == "torch":
        return "torch"
    problem = _triton_problem(op, device)
    if backend == "auto":
        # Triton only for CUDA tensors: the CPU interpreter is for testing, never picked silently.
        return "triton" if problem is None and device.type == "cuda" else "torch"
    if problem:
        raise RuntimeError(f"backend='triton' cannot run {op}: {problem}. Use backend='torch' (or 'auto').")
    return "triton"


def _triton_problem(op: str, device: torch.device) -> str | None:
    if op not in TRITON_OPS:
        return f"the fused Triton kernel for {op} is not yet available in this version of kernelssl"
    err = triton_import_error()
    if err is not None:
        return f"triton does not import ({err})"
    if device.type != "cuda" and not interpreting():
        return (
            f"the inputs are on {device}, and Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before kernelssl is imported, to run them on the CPU interpreter)"
        )
    return None
