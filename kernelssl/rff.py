"""Random Fourier features for the inverse-multiquadric (IMQ) kernel (SPEC §1.2), torch.

Kernel and feature map::

    k_c(x, y) = c / sqrt(||x - y||^2 + c^2)
    phi(x)    = sqrt(2/D) * cos(W (x / c) + beta),    W (D, d),  beta (D,),    E[phi(x).phi(y)] = k_c(x, y)

Sampler (exact, table-free).  ``(1 + s)^(-1/2) = E_t[exp(-t s)]`` with ``t ~ Gamma(shape 1/2, rate 1)``,
and ``E_g[cos(sqrt(2t) g.delta)] = exp(-t ||delta||^2)`` for ``g ~ N(0, I_d)``, so ``W_j = sqrt(2 t_j) g_j``
has the IMQ spectral law (radial density of ``||W_j||`` proportional to ``r^nu K_nu(r)``,
``nu = (d-1)/2``).  ``Gamma(1/2, 1) = chi^2_1 / 2``, hence ``sqrt(2 t_j) = |n_j|`` with ``n_j ~ N(0, 1)``:
``W_j = |n_j| g_j``.  Phases ``beta_j ~ U[0, 2 pi)``, independent of the directions.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_int, check_same_device, check_tensor, describe

__all__ = ["sample_imq_rff", "rff_features"]


def sample_imq_rff(
    dim: int,
    num_features: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one IMQ random-feature map ``(w, b)``: ``w`` of shape ``(num_features, dim)``, ``b`` of shape
    ``(num_features,)``, for :func:`rff_features`.

    Draw order (fixed, part of the contract), all in float64 from the one generator::

        g = randn(D, dim);  n = randn(D);  b = rand(D) * 2 pi;   w = |n|[:, None] * g

    Determinism: the numbers are drawn in float64 **on the generator's device** (``generator.device``;
    the CPU default generator, i.e. ``torch.manual_seed``, when ``generator`` is None) and only then
    moved to ``device`` and cast to ``dtype``.  So a CPU generator with a given seed gives the same
    features on every device and every rank whatever ``device`` is; a CUDA generator gives the same
    features on every rank that seeds it alike (but not the same numbers as a CPU generator).  The
    generator may live on a different device than ``device``.  ``device=None`` means the generator's
    device (CPU without a generator).

    After the cast the phases are reduced modulo 2 pi in ``dtype`` (float32(2 pi) exceeds 2 pi, so a
    draw just below 2 pi could otherwise round up onto it); they lie in ``[0, 2 pi)``.
    """
    check_int(dim, "dim", minimum=1)
    check_int(num_features, "num_features", minimum=1)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {describe(dtype)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {describe(generator)}")
    src = generator.device if generator is not None else torch.device("cpu")
    out = torch.device(device) if device is not None else src
    D = num_features
    if out.type == "meta":  # shape propagation: nothing to draw, and no generator state consumed
        return torch.empty(D, dim, device=out, dtype=dtype), torch.empty(D, device=out, dtype=dtype)
    g = torch.randn(D, dim, generator=generator, device=src, dtype=torch.float64)
    n = torch.randn(D, generator=generator, device=src, dtype=torch.float64)
    b = torch.rand(D, generator=generator, device=src, dtype=torch.float64) * (2.0 * math.pi)
    w = n.abs().unsqueeze(1) * g
    w = w.to(device=out, dtype=dtype)
    b = torch.remainder(b.to(device=out, dtype=dtype), 2.0 * math.pi)
    return w, b


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rff_features(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, kernel_scale: float | torch.Tensor
) -> torch.Tensor:
    """``phi(x) = sqrt(2/D) cos(W (x / c) + b)`` applied to the last dim: ``x (..., d)`` -> ``(..., D)``.

    ``w (D, d)``, ``b (D,)`` on the device of ``x``; ``kernel_scale`` c > 0 a number or a one-element
    tensor (a CPU scalar tensor is fine for CUDA ``x``).  Computed in
    float32 for fp16/bf16/fp32 ``x`` and float64 for float64 ``x`` (``w``, ``b`` and c are cast to that
    dtype); returned in that dtype.  Differentiable in every argument (c included: the HSIC losses
    detach it themselves).  The scale is applied to ``w`` (``x @ (w / c)^T``, the cheaper of the two
    equal forms).
    """
    check_tensor(x, "x", min_ndim=1)
    check_tensor(w, "w", ndim=2)
    check_tensor(b, "b", ndim=1)
    if w.shape[1] != x.shape[-1]:
        raise ValueError(f"w: expected shape (D, {x.shape[-1]}) to match x's last dim, got {tuple(w.shape)}")
    if b.shape[0] != w.shape[0]:
        raise ValueError(f"b: expected shape ({w.shape[0]},) to match w's D, got {tuple(b.shape)}")
    check_same_device([x, w, b], ["x", "w", "b"])
    cdt = _compute_dtype(x)
    dev = x.device
    x = x.to(cdt)
    w = w.to(device=dev, dtype=cdt)
    b = b.to(device=dev, dtype=cdt)
    if isinstance(kernel_scale, torch.Tensor):
        c = kernel_scale.to(device=dev, dtype=cdt).reshape(())
    else:
        c = float(kernel_scale)
    D = w.shape[0]
    u = torch.matmul(x, (w / c).transpose(0, 1)) + b
    return math.sqrt(2.0 / D) * torch.cos(u)
