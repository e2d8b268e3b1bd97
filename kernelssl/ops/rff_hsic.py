"""``rff_hsic``, torch tier: SSL-HSIC's estimators with random Fourier features (Li, Pogodin, Sutherland,
Gretton, NeurIPS 2021; docs/rff_hsic.md), the samplers of the feature maps, and the exact-kernel check path.

Differentiable, any device; the inputs are checked by :mod:`kernelssl.functional`, which calls these.

Conventions
-----------
``views`` is a ``(K, B, d)`` tensor: K >= 2 views of the same B >= 2 images; row i of every view is
image i (the image identity is the row index).  The N = B*K embeddings are flattened view-major
(flat row ``n = v*B + i``).  ``kernel_scale`` c > 0 (a number or a one-element tensor) is the kernel scale.
Two random-feature maps (``w_a (D_A, d)``, ``b_a (D_A,)``) and (``w_b (D_B, d)``, ``b_b (D_B,)``) are
drawn per step with :func:`sample_rff` (the paper's IMQ: :func:`sample_imq_rff`);
``phi(x) = sqrt(2/D) cos(W (x/c) + b)``.

Estimators, ``S_i = sum_v phi_A(z_i^v)``, ``mu = (1/N) sum_n phi_A(z_n)``::

    HSIC_ZY = (1/(B K (K-1))) sum_i ||S_i||^2 - ||mu||^2
    HSIC_ZZ = ||Phibar_B^T Phibar_A||_F^2 / N^2,        Phibar = Phi - 1 mu^T   (N x D, column-centred)
    loss    = gamma * sqrt_guard(HSIC_ZZ) - HSIC_ZY,     gamma = 3

The exact-kernel versions (:func:`exact_hsic`) use the N x N kernel matrix in place of ``Phi Phi^T``;
the RFF terms are unbiased estimates of them (E over the maps; A and B independent).

Kernel families (``kernel=`` names one, :data:`KERNELS`): the RFF estimators take any maps, so only the
sampler (:func:`sample_rff`) and the exact kernel change::

    "imq"       k_c(x, y) = c / sqrt(||x - y||^2 + c^2)      (SSL-HSIC's, the default)
    "gaussian"  k_c(x, y) = exp(-||x - y||^2 / (2 c^2))
    "laplace"   k_c(x, y) = exp(-||x - y||_1 / c)

Numerics: fp16/bf16 views are upcast to float32 at entry, float64 stays float64; the results are
float32 (float64 for float64 views), and autograd returns gradients in the dtype of ``views``.  The
kernel scale is **detached** in the HSIC terms (stop-gradient); it is learned only through
:func:`kernel_scale_objective`.  Nothing here reads a tensor value on the host.  Non-finite inputs
propagate to non-finite outputs.

sqrt guard
----------
``sqrt_guard(x) = sqrt(max(x, 0) + SQRT_EPS)``, ``SQRT_EPS = 1e-12`` (same constant as
``reference/rff_hsic.py``).  For x >= 0 it shifts the value by
``0 < sqrt(x + eps) - sqrt(x) = eps / (sqrt(x + eps) + sqrt(x)) <= sqrt(eps) = 1e-6`` (equality at
x = 0; ``<= eps / (2 sqrt(x))`` otherwise), i.e. the loss by at most ``gamma * 1e-6``.  Its derivative
``1 / (2 sqrt(max(x, 0) + eps))`` is at most ``1/(2e-6) = 5e5``: at a collapsed batch (HSIC_ZZ -> 0)
the gradient is finite, and since the centred features -- hence the gradient of HSIC_ZZ itself --
vanish there, the loss gradient through that term vanishes too.  Negative round-off values of
HSIC_ZZ are clamped to 0 (``relu``: gradient 0 for x <= 0, so an exactly collapsed batch, HSIC_ZZ = 0,
gets no gradient through the guard; for x > 0 the slope tends to 5e5 as x -> 0+).

Random Fourier features: ``phi(x) = sqrt(2/D) cos(W (x / c) + beta)``, ``E[phi(x).phi(y)] = k_c(x, y)``.
Sampler (exact, table-free).  ``(1 + s)^(-1/2) = E_t[exp(-t s)]`` with ``t ~ Gamma(shape 1/2, rate 1)``,
and ``E_g[cos(sqrt(2t) g.delta)] = exp(-t ||delta||^2)`` for ``g ~ N(0, I_d)``, so ``W_j = sqrt(2 t_j) g_j``
has the IMQ spectral law (radial density of ``||W_j||`` proportional to ``r^nu K_nu(r)``,
``nu = (d-1)/2``).  ``Gamma(1/2, 1) = chi^2_1 / 2``, hence ``sqrt(2 t_j) = |n_j|`` with ``n_j ~ N(0, 1)``:
``W_j = |n_j| g_j``.  Phases ``beta_j ~ U[0, 2 pi)``, independent of the directions.

Other shift-invariant kernels, same feature map, only the law of W changes (Bochner:
``E_w[cos(w . delta)]`` is the kernel at ``delta = (x - y) / c``)::

    "gaussian"  k_c(x, y) = exp(-||x - y||^2 / (2 c^2))   W_jk iid N(0, 1):  E cos(w.delta) = exp(-||delta||^2 / 2)
    "laplace"   k_c(x, y) = exp(-||x - y||_1 / c)         W_jk iid standard Cauchy:  E cos(w.delta) = exp(-||delta||_1)

:func:`sample_rff` dispatches on the kernel name (:data:`KERNELS`).  Laplace features have
heavy-tailed frequencies (a Cauchy entry exceeds 1e4 with probability ~6e-5), so some phases
``W x / c`` are large; their cos is evaluated full-range (torch, and libdevice in the Triton kernel),
but the fp32 rounding of a phase u is ~6e-8 |u| rad: such features are high-frequency noise in fp32
(their expectation, the kernel's tail, is tiny) -- compute in float64 if that matters.

Laplace features estimate the kernel's *value* without bias (the Gram converges: the tests check it),
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

from .._checks import check_int, describe
from ._common import compute_dtype, recorded_backward, workspace

__all__ = [
    "KERNELS",
    "SQRT_EPS",
    "check_kernel",
    "sample_rff",
    "sample_imq_rff",
    "sample_gaussian_rff",
    "sample_laplace_rff",
    "rff_features",
    "sqrt_guard",
    "rff_hsic",
    "rff_hsic_autograd",
    "rff_hsic_eager",
    "rff_hsic_backward",
    "exact_hsic",
    "hsic_loss",
    "kernel_scale_objective",
    "draw_scale_pairs",
]

Tensor = torch.Tensor

#: The shift-invariant kernel families with a sampler here and an exact path (:func:`exact_hsic`).
KERNELS = ("imq", "gaussian", "laplace")


# --------------------------------------------------------------------------------------------------
# feature maps


def check_kernel(kernel: object, name: str = "kernel") -> str:
    """One of :data:`KERNELS` (a ``TypeError`` for a non-string, a ``ValueError`` for an unknown name)."""
    expected = ", ".join(repr(k) for k in KERNELS)
    if not isinstance(kernel, str):
        raise TypeError(f"{name}: expected a str, one of {expected}, got {describe(kernel)}")
    if kernel not in KERNELS:
        raise ValueError(f"{name}: expected one of {expected}, got {kernel!r}")
    return kernel


def _draw_imq(D: int, dim: int, generator, src) -> tuple[torch.Tensor, torch.Tensor]:
    # g = randn(D, dim);  n = randn(D);  b = rand(D) * 2 pi;   w = |n|[:, None] * g
    g = torch.randn(D, dim, generator=generator, device=src, dtype=torch.float64)
    n = torch.randn(D, generator=generator, device=src, dtype=torch.float64)
    b = torch.rand(D, generator=generator, device=src, dtype=torch.float64) * (2.0 * math.pi)
    return n.abs().unsqueeze(1) * g, b


def _draw_gaussian(D: int, dim: int, generator, src) -> tuple[torch.Tensor, torch.Tensor]:
    # w = randn(D, dim);  b = rand(D) * 2 pi
    w = torch.randn(D, dim, generator=generator, device=src, dtype=torch.float64)
    return w, torch.rand(D, generator=generator, device=src, dtype=torch.float64) * (2.0 * math.pi)


def _draw_laplace(D: int, dim: int, generator, src) -> tuple[torch.Tensor, torch.Tensor]:
    # u = rand(D, dim);  b = rand(D) * 2 pi;   w = tan(pi (u - 1/2)): standard Cauchy by inversion
    # (u in [0, 1): pi (u - 1/2) in [-pi/2, pi/2), whose float64 tangent is finite -- at most ~1.6e16
    # in magnitude, at u = 0)
    u = torch.rand(D, dim, generator=generator, device=src, dtype=torch.float64)
    b = torch.rand(D, generator=generator, device=src, dtype=torch.float64) * (2.0 * math.pi)
    return torch.tan(math.pi * (u - 0.5)), b


_DRAWS = {"imq": _draw_imq, "gaussian": _draw_gaussian, "laplace": _draw_laplace}


def sample_rff(
    kernel: str,
    dim: int,
    num_features: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one random-feature map ``(w, b)`` of ``kernel`` in :data:`KERNELS`: ``w`` of shape
    ``(num_features, dim)``, ``b`` of shape ``(num_features,)``, for :func:`rff_features`.  The law of
    ``w`` is the kernel's (module docstring); the draw order is fixed and part of the contract:

        "imq"       g = randn(D, dim);  n = randn(D);  b = rand(D) * 2 pi;   w = |n|[:, None] * g
        "gaussian"  w = randn(D, dim);  b = rand(D) * 2 pi
        "laplace"   u = rand(D, dim);   b = rand(D) * 2 pi;   w = tan(pi (u - 1/2))   (standard Cauchy)

    Determinism: the numbers are drawn in float64 **on the generator's device** (``generator.device``;
    the CPU default generator, i.e. ``torch.manual_seed``, when ``generator`` is None) and only then
    moved to ``device`` and cast to ``dtype``.  So a CPU generator with a given seed gives the same
    features on every device and every rank whatever ``device`` is; a CUDA generator gives the same
    features on every rank that seeds it alike (but not the same numbers as a CPU generator).  The
    generator may live on a different device than ``device``.  ``device=None`` means the generator's
    device (CPU without a generator).  On a ``meta`` device nothing is drawn (and no generator state is
    consumed).  After the cast the phases are reduced modulo 2 pi in ``dtype`` (float32(2 pi) exceeds
    2 pi, so a draw just below 2 pi could otherwise round up onto it); they lie in ``[0, 2 pi)``.
    Laplace features refuse float16 (standard Cauchy draws exceed its maximum 65504 with probability
    ~1e-5 per entry), before any draw.
    """
    kernel = check_kernel(kernel)
    if kernel == "laplace" and dtype == torch.float16:  # before any draw: the generator's state stays untouched
        raise ValueError(
            "dtype: expected float32, float64 or bfloat16 for Laplace features, got float16 (standard "
            "Cauchy draws exceed its maximum 65504 with probability ~1e-5 per entry: inf, then NaN "
            "features); draw them in float32"
        )
    dim = check_int(dim, "dim", minimum=1)
    num_features = check_int(num_features, "num_features", minimum=1)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {describe(dtype)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {describe(generator)}")
    src = generator.device if generator is not None else torch.device("cpu")
    out = torch.device(device) if device is not None else src
    if out.type == "meta":  # shape propagation: nothing to draw
        return (torch.empty(num_features, dim, device=out, dtype=dtype),
                torch.empty(num_features, device=out, dtype=dtype))
    w, b = _DRAWS[kernel](num_features, dim, generator, src)
    return w.to(device=out, dtype=dtype), torch.remainder(b.to(device=out, dtype=dtype), 2.0 * math.pi)


def sample_imq_rff(dim: int, num_features: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_rff` for the inverse multiquadric kernel ``c / sqrt(||x - y||^2 + c^2)``
    (SSL-HSIC's): ``W_j = |n_j| g_j``; keyword arguments ``generator``, ``device``, ``dtype``."""
    return sample_rff("imq", dim, num_features, **kwargs)


def sample_gaussian_rff(dim: int, num_features: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_rff` for the Gaussian kernel ``exp(-||x - y||^2 / (2 c^2))``: iid N(0, 1) entries;
    keyword arguments ``generator``, ``device``, ``dtype``."""
    return sample_rff("gaussian", dim, num_features, **kwargs)


def sample_laplace_rff(dim: int, num_features: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_rff` for the Laplace (l1) kernel ``exp(-||x - y||_1 / c)``: iid standard Cauchy
    entries; keyword arguments ``generator``, ``device``, ``dtype``."""
    return sample_rff("laplace", dim, num_features, **kwargs)


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
    cdt = compute_dtype(x)
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


# --------------------------------------------------------------------------------------------------
# estimators


SQRT_EPS = 1e-12
#: The smallest Python-number kernel scale the losses take: ``2^-100`` keeps ``x / c`` (unit rows) and
#: ``W / c`` finite in float32 (a subnormal c made them inf, and the loss NaN); the kernel at such a
#: scale is already ~0 between distinct points.  A tensor scale is not read (NaN policy instead).
MIN_KERNEL_SCALE = 2.0**-100


def sqrt_guard(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(x, 0) + SQRT_EPS)``: finite gradient at 0, value shifted by at most 1e-6 (module doc)."""
    return torch.sqrt(torch.relu(x) + SQRT_EPS)


def _scale(kernel_scale, dtype: torch.dtype, device: torch.device, *, detach: bool):
    """A Python float, or a 0-dim tensor of ``dtype`` on ``device`` (its value is never read)."""
    if isinstance(kernel_scale, torch.Tensor):
        c = kernel_scale.detach() if detach else kernel_scale
        return c.to(device=device, dtype=dtype).reshape(())
    return float(kernel_scale)


def _prepare(views, kernel_scale):
    K, B, d = views.shape
    cdt = compute_dtype(views)
    return K, B, d, views.to(cdt), _scale(kernel_scale, cdt, views.device, detach=True)


# --------------------------------------------------------------------------------------------------
# RFF estimators


def rff_hsic(views: Tensor, w_a: Tensor, b_a: Tensor, w_b: Tensor, b_b: Tensor,
             kernel_scale: float | Tensor) -> tuple[Tensor, Tensor]:
    """RFF estimators ``(HSIC_ZY, HSIC_ZZ)`` (any kernel's maps) -- the library (torch) path.

    Shapes: ``views (K, B, d)``, ``w_a (D_A, d)``, ``b_a (D_A,)``, ``w_b (D_B, d)``, ``b_b (D_B,)``;
    returns two 0-dim tensors.  Each map's features are computed once (``Phi_A``, ``Phi_B``, N x D);
    HSIC_ZZ goes through the ``D_B x D_A`` cross-covariance ``C = Phibar_B^T Phibar_A``: cost
    O(N d D + N D_A D_B), memory O(N D + D_A D_B), never N x N.

    HSIC_ZY is evaluated in the algebraically equal, cancellation-free form (using ``sum_i S_i = N mu``)::

        HSIC_ZY = (1/(B K (K-1))) sum_i ||S_i - K mu||^2 + ||mu||^2 / (K-1)

    (both terms are >= 0), which keeps fp32 accurate.  ``kernel_scale`` is detached (no gradient).

    Eager calls whose maps need no gradient (the loss's case) run :class:`_RFFHSIC`, the same algebra
    with a hand-written backward (fewer passes over the ``N x D`` features than autograd's); maps that
    require grad, and ``torch.compile`` (which fuses the elementwise work itself), take plain autograd.
    """
    maps = (w_a, b_a, w_b, b_b)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in maps)):
        return rff_hsic_autograd(views, *maps, kernel_scale)
    K, B, _, v, c = _prepare(views, kernel_scale)
    return _RFFHSIC.apply(v, *(t.to(v.dtype) for t in maps), c, K, B)


def rff_hsic_autograd(views: Tensor, w_a: Tensor, b_a: Tensor, w_b: Tensor, b_b: Tensor,
                      kernel_scale: float | Tensor) -> tuple[Tensor, Tensor]:
    """:func:`rff_hsic` by plain autograd: for maps that require grad, under ``torch.compile`` (which fuses
    the elementwise work itself) and under ``torch.func`` transforms (which cannot see through a custom
    autograd Function).  Same numbers up to rounding."""
    K, B, d, v, c = _prepare(views, kernel_scale)
    N = K * B
    x = v.reshape(N, d)
    phi_a = rff_features(x, w_a, b_a, c)  # (N, D_A)
    phi_b = rff_features(x, w_b, b_b, c)  # (N, D_B)
    mu_a = phi_a.mean(dim=0)
    dev = phi_a.reshape(K, B, -1).sum(dim=0) - K * mu_a  # S_i - K mu, (B, D_A)
    hsic_zy = dev.square().sum() / (B * K * (K - 1)) + mu_a.square().sum() / (K - 1)
    pa = phi_a - mu_a
    pb = phi_b - phi_b.mean(dim=0)
    cov = pb.transpose(0, 1) @ pa  # (D_B, D_A)
    flat = cov.reshape(-1)
    hsic_zz = torch.dot(flat, flat) / (N * N)
    return hsic_zy, hsic_zz


def _rff_forward(v, w_a, b_a, w_b, b_b, c, K: int, B: int):
    """``(HSIC_ZY, HSIC_ZZ, saved)`` of :class:`_RFFHSIC` (its docstring has the algebra).  Both maps in
    one projection ``U = X [W_a; W_b]^T / c + [b_a; b_b]`` (N x (D_A + D_B)); ``sin(U)`` is written over U
    once ``cos(U)`` is taken: two fresh N x (D_A + D_B) tensors, saved for the backward."""
    N, d = K * B, v.shape[-1]
    da_ = w_a.shape[0]
    x = v.reshape(N, d)
    w = torch.cat([w_a, w_b]).div_(c)  # (D_A + D_B, d)
    u = torch.addmm(torch.cat([b_a, b_b]), x, w.t())
    p = torch.cos(u)
    u.sin_()  # the backward's d cos = -sin du
    pa, pb = p[:, :da_], p[:, da_:]
    mu = p.mean(dim=0)  # both maps' feature means
    mu_a = mu[:da_]
    dev = pa.view(K, B, -1).sum(dim=0).sub_(mu_a, alpha=K)  # S_i - K mu (unscaled), (B, D_A)
    zy = dev.square().sum() / (B * K * (K - 1)) + mu_a.square().sum() / (K - 1)
    p.sub_(mu)  # centred features of both maps
    g = pb.t() @ pa  # (D_B, D_A)
    flat = g.reshape(-1)
    zz = torch.dot(flat, flat) / (N * N)
    sa2, sb2 = 2.0 / da_, 2.0 / (w.shape[0] - da_)
    return zy * sa2, zz * (sa2 * sb2), (u, p, g, dev, mu_a, w)


def _rff_backward(saved, K: int, B: int, grad_zy, grad_zz):
    """``dHSIC/dviews`` (``(K, B, d)``) from :func:`_rff_forward`'s saved tensors.  The ``N x D`` gradients
    of the features live in scratch tensors (:func:`~kernelssl.ops._common.workspace`)."""
    s, p, g, dev, mu_a, w = saved
    d_b, d_a = g.shape
    sa2, sb2 = 2.0 / d_a, 2.0 / d_b
    N = K * B
    # minus signs of d cos = -sin du folded in here
    gs = g * (grad_zz * (-2.0 * sa2 * sb2 / (N * N)))
    ya = (dev + mu_a) * (grad_zy * (-2.0 * sa2 / (B * K * (K - 1))))
    da = torch.mm(p[:, d_a:], gs, out=workspace((N, d_a), p, 5))  # dHSIC/dU_A
    da.view(K, B, -1).add_(ya).mul_(s[:, :d_a].view(K, B, -1))
    db = torch.mm(p[:, :d_a], gs.t(), out=workspace((N, d_b), p, 6)).mul_(s[:, d_a:])
    return torch.mm(da, w[:d_a]).addmm_(db, w[d_a:]).view(K, B, -1)


@torch.no_grad()
def rff_hsic_backward(grad_zy, grad_zz, views, w_a, b_a, w_b, b_b, kernel_scale) -> torch.Tensor:
    """``grad_zy dHSIC_ZY/dviews + grad_zz dHSIC_ZZ/dviews`` (shape and dtype of ``views``) without
    autograd: the hand-written backward of :class:`_RFFHSIC` after its forward.  The CPU kernel of the
    fused op's backward (:mod:`kernelssl.triton.rff_hsic_op`)."""
    K, B, _, v, c = _prepare(views, kernel_scale)
    maps = (t.to(v.dtype) for t in (w_a, b_a, w_b, b_b))
    _, _, saved = _rff_forward(v, *maps, c, K, B)
    return _rff_backward(saved, K, B, grad_zy.to(v.dtype), grad_zz.to(v.dtype)).to(views.dtype)


class _RFFHSIC(torch.autograd.Function):
    """:func:`rff_hsic`'s estimators for maps without gradient, with a hand-written backward.

    With unscaled features ``Ca = cos(X Wa^T / c + ba)`` (``Phi_A = s_a Ca``, ``s = sqrt(2/D)``; the
    scales are folded into the scalars), ``Pa = Ca - 1 mu_a^T``, ``G = Pb^T Pa`` (``D_B x D_A``) and
    ``dev_i = S_i - K mu_a``::

        HSIC_ZY = s_a^2 (sum_i ||dev_i||^2 / (B K (K-1)) + ||mu_a||^2 / (K-1))
        HSIC_ZZ = s_a^2 s_b^2 ||G||_F^2 / N^2
        dHSIC_ZY/dCa[v, i] = s_a^2 (2 / (B K (K-1))) (dev_i + mu_a)
        dHSIC_ZZ/dCa = s_a^2 s_b^2 (2 / N^2) Pb G,   dHSIC_ZZ/dCb = s_a^2 s_b^2 (2 / N^2) Pa G^T
        dX = (-sin(Ua) * dCa) Wa / c + (-sin(Ub) * dCb) Wb / c

    (the centring's Jacobian drops out: ``Pb G`` and ``Pa G^T`` have zero column means).  The
    projections are ``addmm`` with the phases as bias; the upstream gradients and every constant go into
    the small ``(B, D)`` and ``(D, D)`` factors, so each ``N x D`` array is touched a few times only:
    forward one projection for both maps, cos, sin, mean and centring; backward one product and a
    multiply per map, into scratch tensors.  Saves ``sin(U)`` and ``P`` (``N x (D_A + D_B)`` each) and
    ``G``.  Under ``create_graph=True`` the backward is
    :func:`~kernelssl.ops._common.recorded_backward` of :func:`rff_hsic_autograd` (still O(N D)), so
    second derivatives are correct.
    """

    @staticmethod
    def forward(ctx, v, w_a, b_a, w_b, b_b, c, K: int, B: int):  # type: ignore[override]
        zy, zz, saved = _rff_forward(v, w_a, b_a, w_b, b_b, c, K, B)
        scale = (c,) if isinstance(c, Tensor) else ()
        ctx.save_for_backward(*saved, v, w_a, b_a, w_b, b_b, *scale)
        ctx.dims = (K, B)
        ctx.scale = None if scale else c
        return zy, zz

    @staticmethod
    def backward(ctx, grad_zy, grad_zz):  # type: ignore[override]
        saved, inputs = ctx.saved_tensors[:6], ctx.saved_tensors[6:]
        nones = (None,) * 7
        if torch.is_grad_enabled():  # create_graph=True: a recorded (differentiable) gradient
            v, maps, c = inputs[0], inputs[1:5], (inputs[5] if ctx.scale is None else ctx.scale)
            (dv,) = recorded_backward(lambda x: rff_hsic_autograd(x, *maps, c), (v,), (True,), (grad_zy, grad_zz))
            return dv, *nones
        with torch.no_grad():
            return _rff_backward(saved, *ctx.dims, grad_zy, grad_zz), *nones


def rff_hsic_eager(views: Tensor, w_a: Tensor, b_a: Tensor, w_b: Tensor, b_b: Tensor,
                   kernel_scale: float | Tensor) -> tuple[Tensor, Tensor]:
    """The same estimators as :func:`rff_hsic`, written the way the paper's reference code computes
    them -- the benchmark baseline.

    HSIC_ZY: a Python loop over the views, computing map-A features per view and accumulating the
    per-image sums ``S`` and the global feature sum, then ``sum ||S_i||^2 / (B K (K-1)) - ||mu||^2``
    (the direct form).  HSIC_ZZ: the features are recomputed (both maps, on the concatenated views),
    centred explicitly, and ``||Phibar_B^T Phibar_A||_F^2 / N^2`` via the D x D product.  Still never
    N x N.  Same shapes, dtypes and stop-gradient on ``kernel_scale`` as :func:`rff_hsic`.
    """
    K, B, d, v, c = _prepare(views, kernel_scale)
    N = K * B
    # HSIC(Z, Y)
    per_image = None
    total = None
    for k in range(K):
        f = rff_features(v[k], w_a, b_a, c)  # (B, D_A)
        per_image = f if per_image is None else per_image + f
        s = f.sum(dim=0)
        total = s if total is None else total + s
    mean = total / N
    hsic_zy = (per_image * per_image).sum() / (B * K * (K - 1)) - (mean * mean).sum()
    # HSIC(Z, Z)
    z = torch.cat([v[k] for k in range(K)], dim=0)  # (N, d)
    fa = rff_features(z, w_a, b_a, c)
    fb = rff_features(z, w_b, b_b, c)
    fa = fa - fa.mean(dim=0, keepdim=True)
    fb = fb - fb.mean(dim=0, keepdim=True)
    cross = fb.t() @ fa
    hsic_zz = (cross * cross).sum() / (N * N)
    return hsic_zy, hsic_zz


# --------------------------------------------------------------------------------------------------
# exact kernel (check path)


def exact_kernel_matrix(x: torch.Tensor, kernel: str = "imq") -> torch.Tensor:
    """The N x N matrix of ``kernel`` at unit scale on ``x (N, d)`` (already divided by c)::

        "imq"       1 / sqrt(||x_n - x_m||^2 + 1)
        "gaussian"  exp(-||x_n - x_m||^2 / 2)
        "laplace"   exp(-||x_n - x_m||_1)

    Distances come from direct coordinate differences (memory O(N^2 d) under autograd: a check path),
    never from the Gram form ``||x||^2 + ||y||^2 - 2 x.y``, which cancels: so ``k(x, x) = 1`` exactly.
    Laplace's gradient: ``|t|`` is not differentiable at t = 0; autograd's ``abs`` uses the subgradient
    ``sign(0) = 0``, so a coordinate where ``x_n`` and ``x_m`` tie contributes nothing to ``d k_nm``
    (the reference's choice too, :func:`reference.rff_hsic.exact_hsic_grad`).
    """
    diff = x[:, None, :] - x[None, :, :]
    if kernel == "imq":
        return torch.rsqrt(diff.square().sum(dim=-1) + 1.0)
    if kernel == "gaussian":
        return torch.exp(-0.5 * diff.square().sum(dim=-1))
    if kernel == "laplace":
        return torch.exp(-diff.abs().sum(dim=-1))
    raise ValueError(f"kernel: expected one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")


def exact_hsic(
    views: torch.Tensor, kernel_scale: float | torch.Tensor, *, kernel: str = "imq"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-kernel estimators ``(HSIC_ZY, HSIC_ZZ)``, the limit of the RFF terms as D grows.

    **Materialises the N x N kernel matrix** (memory O(N^2)): this is the check path and the
    ``exact=True`` option, not the scalable one.  ``kernel`` is the family ("imq", "gaussian",
    "laplace"; module doc).  With ``Kmat_nm = k_c(z_n, z_m)``::

        HSIC_ZY = (1/(B K (K-1))) sum_i sum_{v,w} Kmat[(v,i), (w,i)] - (1/N^2) sum_{n,m} Kmat_nm
        HSIC_ZZ = ||H Kmat H||_F^2 / N^2,   H = I - 11^T / N

    The first sum includes v = w, a constant ``1/(K-1)`` (k(x, x) = 1).  ``kernel_scale`` is detached.

    The kernel is evaluated at unit scale on ``x / c`` (:func:`exact_kernel_matrix`; IMQ:
    ``Kmat_nm = 1 / sqrt(r_nm^2 + 1)`` with ``r_nm^2 = ||z_n/c - z_m/c||^2``) summed from direct
    coordinate differences, never from the Gram form ``||x||^2 + ||y||^2 - 2 x.y``: that cancels
    catastrophically when the distance is small next to the norms, so ``k(x, x)`` came out below 1 (a
    few percent in fp32 at moderate scales, and wrong even in float64 at small c), and ``c^2``
    overflowed/underflowed in fp32 (c = 1e20 gave k = 0, c = 1e-25 NaN).  Now ``k(x, x) = 1`` exactly,
    every c representable in the dtype works, and ``r -> inf`` gives k -> 0 without overflow trouble.
    """
    K, B, d = views.shape
    N = K * B
    cdt = compute_dtype(views)
    c = _scale(kernel_scale, cdt, views.device, detach=True)
    x = views.to(cdt).reshape(N, d) / c
    kmat = exact_kernel_matrix(x, kernel)
    positive = kmat.reshape(K, B, K, B).diagonal(dim1=1, dim2=3).sum()  # same image i, all (v, w)
    hsic_zy = positive / (B * K * (K - 1)) - kmat.mean()
    kc = kmat - kmat.mean(dim=0, keepdim=True) - kmat.mean(dim=1, keepdim=True) + kmat.mean()
    hsic_zz = kc.square().sum() / (N * N)
    return hsic_zy, hsic_zz


# --------------------------------------------------------------------------------------------------
# loss and kernel-scale objective


def hsic_loss(hsic_zy: torch.Tensor, hsic_zz: torch.Tensor, *, gamma: float = 3.0) -> torch.Tensor:
    """``loss = gamma * sqrt_guard(HSIC_ZZ) - HSIC_ZY`` (to minimise); see the module doc for the guard."""
    return gamma * sqrt_guard(hsic_zz) - hsic_zy


def draw_scale_pairs(num_pairs: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """The random part of :func:`kernel_scale_objective`'s pairs: a ``(2, m)`` float64 tensor of
    uniforms in ``[0, 1)`` (``m = max(1, round(sqrt(num_pairs)))``), drawn on the generator's device
    and moved to ``device``.  It does not depend on the number of embeddings, so it can be drawn before
    the views exist (outside a ``torch.compile`` region, or before a gather)."""
    m = max(1, int(round(math.sqrt(num_pairs))))
    return torch.rand((2, m), generator=generator, device=generator.device, dtype=torch.float64).to(device)


def _pair_indices(n: int, m: int, generator: torch.Generator | None, device: torch.device,
                  pairs: torch.Tensor | None = None):
    """Row indices ``(i, j)``, each of length m, into the n flattened embeddings.

    From uniforms ``u`` (``pairs``, or :func:`draw_scale_pairs` from ``generator``): ``i = floor(u_0 n)``,
    ``j = floor(u_1 n)`` (uniform with replacement).  With neither: deterministic, evenly strided --
    the 2m indices ``t * n // (2m)``, t = 0..2m-1, even t to ``i`` and odd t to ``j`` (disjoint sets
    whenever 2m <= n, so no zero self-distances).
    """
    if pairs is None and generator is None:
        t = torch.arange(2 * m, device=device)
        idx = (t * n) // (2 * m)
        return idx[0::2], idx[1::2]
    if pairs is None:
        pairs = draw_scale_pairs(m * m, generator, device)
    idx = (pairs.to(device) * n).long().clamp_(max=n - 1)
    return idx[0], idx[1]


def kernel_scale_objective(
    views: torch.Tensor,
    kernel_scale: float | torch.Tensor,
    *,
    num_pairs: int = 1024,
    generator: torch.Generator | None = None,
    kernel: str = "imq",
    pairs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Side objective that learns the kernel scale c, to minimise in c alone.

    The paper's rule (for its IMQ kernel): maximise ``mean_ab 1/2 log (dk/drho)^2`` over sampled pairs,
    the kernel's sensitivity to the distance at the distances the batch has.  Written out, minus it,
    for each family (``rho`` the squared Euclidean distance; for Laplace the l1 distance ``r``, the
    variable that kernel is a function of -- any c-free reparametrisation of the distance only adds
    a c-free constant, so the minimiser and the gradient in c do not depend on that choice)::

        "imq"       -log(c/2) + (3/2) mean log(rho + c^2)     k = c (rho + c^2)^(-1/2)
        "gaussian"  log(2 c^2) + mean(rho) / (2 c^2)         k = exp(-rho / (2 c^2)):  minimum at c^2 = mean(rho) / 2
        "laplace"   log(c) + mean(r) / c                     k = exp(-r / c):          minimum at c = mean(r)

    (IMQ: minimum where ``mean c^2 / (rho + c^2) = 1/3``.)  Distances over the m x m grid of
    ``m = max(1, round(sqrt(num_pairs)))`` row indices i and m indices j into the N flattened
    embeddings (m^2 ~ num_pairs pairs): ``floor(u n)`` for the ``(2, m)`` uniforms ``pairs`` (drawn
    beforehand by :func:`draw_scale_pairs`) or, without them, drawn from ``generator`` the same way
    (uniform with replacement), or, when both are None, a deterministic evenly strided choice (even / odd
    points of ``t * N // (2m)``, t < 2m) -- the same pairs whatever the kernel.  The distances (direct
    differences, O(m^2 + m d) memory) are computed under ``torch.no_grad()`` from detached views: no
    gradient reaches the embeddings, only ``kernel_scale`` (when it is a tensor that requires grad; its
    value is not checked, as that would sync -- a Python number is checked > 0).  Returns a 0-dim
    tensor, float32 (float64 for float64 views).
    """
    K, B, d = views.shape
    N = K * B
    cdt = compute_dtype(views)
    m = max(1, int(round(math.sqrt(num_pairs))))
    with torch.no_grad():
        x = views.detach().to(cdt).reshape(N, d)
        i, j = _pair_indices(N, m, generator, views.device, pairs)
        xi, xj = x[i], x[j]
        # direct differences (the Gram form cancels: a sampled pair i = j got rho ~ 1e-7 ||x||^2, not 0)
        diff = xi[:, None, :] - xj[None, :, :]
        if kernel == "laplace":
            dist = diff.abs().sum(dim=-1)  # l1 distances r
        else:
            dist = diff.square().sum(dim=-1)  # squared distances rho
        log_dist = torch.log(dist)
    c = _scale(kernel_scale, cdt, views.device, detach=False)
    if isinstance(c, float):
        c = torch.tensor(c, dtype=cdt, device=views.device)
    log_c = torch.log(c)
    if kernel == "imq":
        # log(rho + c^2) as logaddexp(log rho, 2 log c): no c^2 to overflow/underflow in fp32 (rho = 0 -> 2 log c)
        return -torch.log(c / 2.0) + 1.5 * torch.logaddexp(log_dist, 2.0 * log_c).mean()
    # mean(dist) / c^p as exp(log mean(dist) - p log c): no c^p to overflow/underflow (mean 0 -> exp(-inf) = 0)
    log_mean = torch.logsumexp(log_dist.reshape(-1), dim=0) - math.log(log_dist.numel())
    if kernel == "gaussian":
        return math.log(2.0) + 2.0 * log_c + 0.5 * torch.exp(log_mean - 2.0 * log_c)
    return log_c + torch.exp(log_mean - log_c)
