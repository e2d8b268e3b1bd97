"""Random Fourier features for shift-invariant kernels, torch: the inverse multiquadric (IMQ, SPEC §1.2),
Gaussian and Laplace (SPEC §6.2).

Kernel and feature map::

    k_c(x, y) = c / sqrt(||x - y||^2 + c^2)
    phi(x)    = sqrt(2/D) * cos(W (x / c) + beta),    W (D, d),  beta (D,),    E[phi(x).phi(y)] = k_c(x, y)

Sampler (exact, table-free).  ``(1 + s)^(-1/2) = E_t[exp(-t s)]`` with ``t ~ Gamma(shape 1/2, rate 1)``,
and ``E_g[cos(sqrt(2t) g.delta)] = exp(-t ||delta||^2)`` for ``g ~ N(0, I_d)``, so ``W_j = sqrt(2 t_j) g_j``
has the IMQ spectral law (radial density of ``||W_j||`` proportional to ``r^nu K_nu(r)``,
``nu = (d-1)/2``).  ``Gamma(1/2, 1) = chi^2_1 / 2``, hence ``sqrt(2 t_j) = |n_j|`` with ``n_j ~ N(0, 1)``:
``W_j = |n_j| g_j``.  Phases ``beta_j ~ U[0, 2 pi)``, independent of the directions.

Other shift-invariant kernels (SPEC §6.2), same feature map, only the law of W changes (Bochner:
``E_w[cos(w . delta)]`` is the kernel at ``delta = (x - y) / c``)::

    "gaussian"  k_c(x, y) = exp(-||x - y||^2 / (2 c^2))   W_jk iid N(0, 1):  E cos(w.delta) = exp(-||delta||^2 / 2)
    "laplace"   k_c(x, y) = exp(-||x - y||_1 / c)         W_jk iid standard Cauchy:  E cos(w.delta) = exp(-||delta||_1)

:func:`sample_rff` dispatches on the kernel name (:data:`KERNELS`).  Laplace features have
heavy-tailed frequencies (a Cauchy entry exceeds 1e4 with probability ~6e-5), so some phases
``W x / c`` are large; their cos is evaluated full-range (torch, and libdevice in the Triton kernel),
but the fp32 rounding of a phase u is ~6e-8 |u| rad: such features are high-frequency noise in fp32
(their expectation, the kernel's tail, is tiny) -- compute in float64 if that matters.

Laplace features estimate the kernel's *value* without bias (the Gram converges, tests/test_rff.py),
but their *gradient* ``-(s/c) sin(W x/c + beta) W`` has infinite variance: the Cauchy law has no
second moment (the Laplace kernel is not differentiable at x = y).  Measured (K = 4, B = 64, d = 64,
D = 512, unit rows, float64): the RFF gradient of the loss has cosine 0.01-0.2 with the exact one
(Gaussian 0.8, IMQ 0.65), and on digits the RFF-Laplace loss trains the encoder to below its
random initialisation while the exact Laplace kernel learns.  Train with the Laplace kernel through
``exact=True`` (N x N, small batches) or use the Gaussian / IMQ kernels for random features.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_int, check_same_device, check_tensor, describe

__all__ = ["KERNELS", "sample_rff", "sample_imq_rff", "sample_gaussian_rff", "sample_laplace_rff", "rff_features"]

#: The shift-invariant kernel families with a sampler here (and an exact path in :mod:`kernelssl.hsic`).
KERNELS = ("imq", "gaussian", "laplace")


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
    src, out = _sampler_devices(dim, num_features, generator, device, dtype)
    D = num_features
    if out.type == "meta":  # shape propagation: nothing to draw, and no generator state consumed
        return _meta_map(D, dim, out, dtype)
    g = torch.randn(D, dim, generator=generator, device=src, dtype=torch.float64)
    n = torch.randn(D, generator=generator, device=src, dtype=torch.float64)
    b = torch.rand(D, generator=generator, device=src, dtype=torch.float64) * (2.0 * math.pi)
    w = n.abs().unsqueeze(1) * g
    return _finish(w, b, out, dtype)


def _sampler_devices(dim, num_features, generator, device, dtype) -> tuple[torch.device, torch.device]:
    """Validate a sampler's arguments; return (device drawn on, device returned on)."""
    check_int(dim, "dim", minimum=1)
    check_int(num_features, "num_features", minimum=1)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {describe(dtype)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {describe(generator)}")
    src = generator.device if generator is not None else torch.device("cpu")
    out = torch.device(device) if device is not None else src
    return src, out


def _meta_map(D: int, dim: int, out: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(D, dim, device=out, dtype=dtype), torch.empty(D, device=out, dtype=dtype)


def _finish(w: torch.Tensor, b: torch.Tensor, out: torch.device, dtype: torch.dtype):
    """float64 draws -> ``dtype`` on ``out``; phases reduced modulo 2 pi after the cast."""
    w = w.to(device=out, dtype=dtype)
    b = torch.remainder(b.to(device=out, dtype=dtype), 2.0 * math.pi)
    return w, b


def sample_gaussian_rff(
    dim: int,
    num_features: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one Gaussian-kernel random-feature map ``(w, b)`` (``k_c = exp(-||x - y||^2 / (2 c^2))``):
    ``w`` of shape ``(num_features, dim)`` with iid N(0, 1) entries, ``b`` of shape ``(num_features,)``.

    Draw order (fixed, part of the contract), in float64 from the one generator::

        w = randn(D, dim);  b = rand(D) * 2 pi

    Devices, dtypes and the phase reduction exactly as :func:`sample_imq_rff`.
    """
    src, out = _sampler_devices(dim, num_features, generator, device, dtype)
    D = num_features
    if out.type == "meta":
        return _meta_map(D, dim, out, dtype)
    w = torch.randn(D, dim, generator=generator, device=src, dtype=torch.float64)
    b = torch.rand(D, generator=generator, device=src, dtype=torch.float64) * (2.0 * math.pi)
    return _finish(w, b, out, dtype)


def sample_laplace_rff(
    dim: int,
    num_features: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one Laplace (l1) kernel random-feature map ``(w, b)`` (``k_c = exp(-||x - y||_1 / c)``):
    ``w`` of shape ``(num_features, dim)`` with iid standard Cauchy entries, ``b`` ``(num_features,)``.

    Draw order (fixed, part of the contract), in float64 from the one generator, Cauchy by inversion::

        u = rand(D, dim);  b = rand(D) * 2 pi;   w = tan(pi (u - 1/2))

    (``u`` in [0, 1): ``pi (u - 1/2)`` in [-pi/2, pi/2), whose float64 tangent is finite -- at most
    ~1.6e16 in magnitude, at u = 0).  Devices, dtypes and the phase reduction as :func:`sample_imq_rff`.
    """
    if dtype == torch.float16:  # before any draw: the generator's state stays untouched
        raise ValueError(
            "dtype: expected float32, float64 or bfloat16 for Laplace features, got float16 (standard "
            "Cauchy draws exceed its maximum 65504 with probability ~1e-5 per entry: inf, then NaN "
            "features); draw them in float32"
        )
    src, out = _sampler_devices(dim, num_features, generator, device, dtype)
    D = num_features
    if out.type == "meta":
        return _meta_map(D, dim, out, dtype)
    u = torch.rand(D, dim, generator=generator, device=src, dtype=torch.float64)
    b = torch.rand(D, generator=generator, device=src, dtype=torch.float64) * (2.0 * math.pi)
    w = torch.tan(math.pi * (u - 0.5))
    return _finish(w, b, out, dtype)


_SAMPLERS = {"imq": sample_imq_rff, "gaussian": sample_gaussian_rff, "laplace": sample_laplace_rff}


def check_kernel(kernel: object, name: str = "kernel") -> str:
    """One of :data:`KERNELS` (a ``TypeError`` for a non-string, a ``ValueError`` for an unknown name)."""
    expected = ", ".join(repr(k) for k in KERNELS)
    if not isinstance(kernel, str):
        raise TypeError(f"{name}: expected a str, one of {expected}, got {describe(kernel)}")
    if kernel not in KERNELS:
        raise ValueError(f"{name}: expected one of {expected}, got {kernel!r}")
    return kernel


def sample_rff(
    kernel: str,
    dim: int,
    num_features: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random-feature map ``(w, b)`` for ``kernel`` in :data:`KERNELS` ("imq", "gaussian", "laplace"):
    :func:`sample_imq_rff`, :func:`sample_gaussian_rff` or :func:`sample_laplace_rff` (same arguments,
    same numbers: ``sample_rff("imq", ...)`` is ``sample_imq_rff(...)`` draw for draw)."""
    return _SAMPLERS[check_kernel(kernel)](dim, num_features, generator=generator, device=device, dtype=dtype)


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
