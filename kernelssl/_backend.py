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


def tf32_allowed(allow_tf32: bool | None = None) -> bool:
    """The kernels' TF32 opt-in: ``allow_tf32`` when given, else torch's own flag
    ``torch.backends.cuda.matmul.allow_tf32`` (set by ``torch.set_float32_matmul_precision("high")``),
    the one the torch path's matmuls obey."""
    return bool(torch.backends.cuda.matmul.allow_tf32 if allow_tf32 is None else allow_tf32)


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
