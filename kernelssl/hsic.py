"""SSL-HSIC (Li, Pogodin, Sutherland, Gretton, NeurIPS 2021), torch tier (SPEC §1).

Conventions
-----------
``views`` is a ``(K, B, d)`` tensor: K >= 2 views of the same B >= 2 images; row i of every view is
image i (the image identity is the row index).  The N = B*K embeddings are flattened view-major
(flat row ``n = v*B + i``).  ``kernel_scale`` c > 0 (a number or a one-element tensor) is the kernel scale.
Two random-feature maps (``w_a (D_A, d)``, ``b_a (D_A,)``) and (``w_b (D_B, d)``, ``b_b (D_B,)``) are
drawn per step with :func:`kernelssl.rff.sample_rff` (the paper's IMQ: :func:`kernelssl.rff.sample_imq_rff`);
``phi(x) = sqrt(2/D) cos(W (x/c) + b)``.

Estimators (SPEC §1.3), ``S_i = sum_v phi_A(z_i^v)``, ``mu = (1/N) sum_n phi_A(z_n)``::

    HSIC_ZY = (1/(B K (K-1))) sum_i ||S_i||^2 - ||mu||^2
    HSIC_ZZ = ||Phibar_B^T Phibar_A||_F^2 / N^2,        Phibar = Phi - 1 mu^T   (N x D, column-centred)
    loss    = gamma * sqrt_guard(HSIC_ZZ) - HSIC_ZY,     gamma = 3

The exact-kernel versions (:func:`exact_hsic`) use the N x N kernel matrix in place of ``Phi Phi^T``;
the RFF terms are unbiased estimates of them (E over the maps; A and B independent).

Kernel families (SPEC §6.2; ``kernel=`` names one, :data:`kernelssl.rff.KERNELS`): the RFF estimators
take any maps, so only the sampler (:func:`kernelssl.rff.sample_rff`) and the exact kernel change::

    "imq"       k_c(x, y) = c / sqrt(||x - y||^2 + c^2)      (SSL-HSIC's, the default)
    "gaussian"  k_c(x, y) = exp(-||x - y||^2 / (2 c^2))
    "laplace"   k_c(x, y) = exp(-||x - y||_1 / c)

Legacy spelling: ``kernel="rff"`` / ``kernel="exact"`` (before the families existed) still work on the
public entry points with a ``FutureWarning`` (:func:`resolve_kernel`): "rff" is ``kernel="imq",
exact=False`` and "exact" is ``kernel="imq", exact=True``.

Numerics: fp16/bf16 views are upcast to float32 at entry, float64 stays float64; the results are
float32 (float64 for float64 views), and autograd returns gradients in the dtype of ``views``.  The
kernel scale is **detached** in the HSIC terms (stop-gradient, SPEC §1.2); it is learned only through
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
"""
from __future__ import annotations

import math
import warnings

import torch
from torch.autograd.function import once_differentiable

from ._checks import check_bool, check_int, check_positive, check_tensor, describe
from .rff import KERNELS, _compute_dtype, check_kernel, rff_features

__all__ = [
    "SQRT_EPS",
    "sqrt_guard",
    "rff_hsic",
    "rff_hsic_eager",
    "exact_hsic",
    "hsic_loss",
    "kernel_scale_objective",
    "resolve_kernel",
]

SQRT_EPS = 1e-12


def sqrt_guard(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(x, 0) + SQRT_EPS)``: finite gradient at 0, value shifted by at most 1e-6 (module doc)."""
    return torch.sqrt(torch.relu(x) + SQRT_EPS)


# --------------------------------------------------------------------------------------------------
# validation / preparation (metadata only: no host sync)


_LEGACY_KERNELS = {"rff": False, "exact": True}


def resolve_kernel(kernel: object, exact: object, *, stacklevel: int = 3) -> tuple[str, bool]:
    """``(family, exact)`` from the public ``kernel=`` / ``exact=`` arguments.

    ``kernel`` is one of :data:`~kernelssl.rff.KERNELS`; ``exact`` a bool.  The legacy values map with a
    ``FutureWarning`` naming the new spelling: ``kernel="rff"`` -> ``("imq", False)``, ``kernel="exact"``
    -> ``("imq", True)``.  ``kernel="rff", exact=True`` contradicts itself: ``ValueError``.
    """
    check_bool(exact, "exact")
    if isinstance(kernel, str) and kernel in _LEGACY_KERNELS:
        legacy_exact = _LEGACY_KERNELS[kernel]
        if kernel == "rff" and exact:
            raise ValueError(
                "kernel: the legacy kernel='rff' (random features) contradicts exact=True; pass "
                "kernel='imq', exact=True for the exact IMQ kernel or kernel='imq' for random features"
            )
        new = "kernel='imq', exact=True" if legacy_exact else "kernel='imq'"
        warnings.warn(
            f"kernel={kernel!r} is deprecated: kernel now names the kernel family (one of "
            f"{', '.join(repr(k) for k in KERNELS)}) and exact= picks the exact path; pass {new}",
            FutureWarning,
            stacklevel=stacklevel,
        )
        return "imq", legacy_exact or exact
    return check_kernel(kernel), exact


def _check_views(views: object) -> torch.Tensor:
    check_tensor(views, "views", ndim=3, min_rows=2)
    if views.shape[0] < 2:
        raise ValueError(
            f"views: expected shape (K, B, d) with K >= 2 views, got shape {tuple(views.shape)}"
        )
    return views


def _check_map(w: object, b: object, d: int, device: torch.device, wn: str, bn: str) -> None:
    check_tensor(w, wn, ndim=2)
    check_tensor(b, bn, ndim=1)
    if w.shape[1] != d:
        raise ValueError(f"{wn}: expected shape (D, {d}) (d = views' last dim), got {tuple(w.shape)}")
    if b.shape[0] != w.shape[0]:
        raise ValueError(f"{bn}: expected shape ({w.shape[0]},) (D of {wn}), got {tuple(b.shape)}")
    for t, n in ((w, wn), (b, bn)):
        if t.device != device:
            raise ValueError(f"{n}: expected device {device} (the device of views), got {t.device}")


def _scale(kernel_scale: object, dtype: torch.dtype, device: torch.device, *, detach: bool):
    """A Python float (validated > 0) or a 0-dim tensor of ``dtype`` on ``device`` (value not read)."""
    if isinstance(kernel_scale, torch.Tensor):
        if not kernel_scale.is_floating_point() or kernel_scale.numel() != 1:
            raise TypeError(
                "kernel_scale: expected a positive number or a one-element floating-point tensor, "
                f"got {describe(kernel_scale)}"
            )
        c = kernel_scale.detach() if detach else kernel_scale
        return c.to(device=device, dtype=dtype).reshape(())
    return check_positive(kernel_scale, "kernel_scale")


def _prepare(views, w_a, b_a, w_b, b_b, kernel_scale):
    _check_views(views)
    K, B, d = views.shape
    _check_map(w_a, b_a, d, views.device, "w_a", "b_a")
    _check_map(w_b, b_b, d, views.device, "w_b", "b_b")
    cdt = _compute_dtype(views)
    c = _scale(kernel_scale, cdt, views.device, detach=True)
    return K, B, d, views.to(cdt), c


# --------------------------------------------------------------------------------------------------
# RFF estimators


def rff_hsic(
    views: torch.Tensor,
    w_a: torch.Tensor,
    b_a: torch.Tensor,
    w_b: torch.Tensor,
    b_b: torch.Tensor,
    kernel_scale: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    K, B, d, v, c = _prepare(views, w_a, b_a, w_b, b_b, kernel_scale)
    maps = (w_a, b_a, w_b, b_b)
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and any(t.requires_grad for t in maps)):
        return _RFFHSIC.apply(v, *(t.to(v.dtype) for t in maps), c, K, B)
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
    forward cos, mean and centring per map; backward one product, sin and a multiply per map.  Saves
    ``Ua, Ub, Pa, Pb`` (``N x D`` each) and ``G``.  Once differentiable.
    """

    @staticmethod
    def forward(ctx, v, w_a, b_a, w_b, b_b, c, K: int, B: int):  # type: ignore[override]
        N, d = K * B, v.shape[-1]
        x = v.reshape(N, d)
        wa, wb = w_a / c, w_b / c
        ua = torch.addmm(b_a, x, wa.t())  # (N, D_A)
        ub = torch.addmm(b_b, x, wb.t())  # (N, D_B)
        pa, pb = torch.cos(ua), torch.cos(ub)
        mu_a = pa.mean(dim=0)
        dev = pa.view(K, B, -1).sum(dim=0).sub_(mu_a, alpha=K)  # S_i - K mu (unscaled), (B, D_A)
        zy = dev.square().sum() / (B * K * (K - 1)) + mu_a.square().sum() / (K - 1)
        pa.sub_(mu_a)
        pb.sub_(pb.mean(dim=0))
        g = pb.t() @ pa  # (D_B, D_A)
        flat = g.reshape(-1)
        zz = torch.dot(flat, flat) / (N * N)
        sa2, sb2 = 2.0 / wa.shape[0], 2.0 / wb.shape[0]
        ctx.save_for_backward(ua, ub, pa, pb, g, dev, mu_a, wa, wb)
        ctx.dims = (K, B, sa2, sb2)
        return zy * sa2, zz * (sa2 * sb2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_zy, grad_zz):  # type: ignore[override]
        ua, ub, pa, pb, g, dev, mu_a, wa, wb = ctx.saved_tensors
        K, B, sa2, sb2 = ctx.dims
        N = K * B
        # minus signs of d cos = -sin du folded in here
        gs = g * (grad_zz * (-2.0 * sa2 * sb2 / (N * N)))
        ya = (dev + mu_a) * (grad_zy * (-2.0 * sa2 / (B * K * (K - 1))))
        da = torch.mm(pb, gs)  # (N, D_A)
        da.view(K, B, -1).add_(ya)
        db = torch.mm(pa, gs.t())  # (N, D_B)
        da.mul_(torch.sin(ua))
        db.mul_(torch.sin(ub))
        dx = torch.mm(da, wa).addmm_(db, wb)
        return dx.view(K, B, -1), None, None, None, None, None, None, None


def rff_hsic_eager(
    views: torch.Tensor,
    w_a: torch.Tensor,
    b_a: torch.Tensor,
    w_b: torch.Tensor,
    b_b: torch.Tensor,
    kernel_scale: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same estimators as :func:`rff_hsic`, written the way the paper's reference code computes
    them -- the benchmark baseline.

    HSIC_ZY: a Python loop over the views, computing map-A features per view and accumulating the
    per-image sums ``S`` and the global feature sum, then ``sum ||S_i||^2 / (B K (K-1)) - ||mu||^2``
    (the direct form).  HSIC_ZZ: the features are recomputed (both maps, on the concatenated views),
    centred explicitly, and ``||Phibar_B^T Phibar_A||_F^2 / N^2`` via the D x D product.  Still never
    N x N.  Same shapes, dtypes and stop-gradient on ``kernel_scale`` as :func:`rff_hsic`.
    """
    K, B, d, v, c = _prepare(views, w_a, b_a, w_b, b_b, kernel_scale)
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
    check_kernel(kernel)
    raise AssertionError(kernel)  # pragma: no cover - check_kernel raised


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
    _check_views(views)
    check_kernel(kernel)
    K, B, d = views.shape
    N = K * B
    cdt = _compute_dtype(views)
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


def _pair_indices(n: int, m: int, generator: torch.Generator | None, device: torch.device):
    """Row indices ``(i, j)``, each of length m, into the n flattened embeddings.

    With a generator: ``i = randint(n, (m,))`` then ``j = randint(n, (m,))`` (with replacement), drawn
    on the generator's device and moved to ``device``.  Without one: deterministic, evenly strided --
    the 2m indices ``t * n // (2m)``, t = 0..2m-1, even t to ``i`` and odd t to ``j`` (disjoint sets
    whenever 2m <= n, so no zero self-distances).
    """
    if generator is None:
        t = torch.arange(2 * m, device=device)
        idx = (t * n) // (2 * m)
        return idx[0::2], idx[1::2]
    gdev = generator.device
    i = torch.randint(n, (m,), generator=generator, device=gdev).to(device)
    j = torch.randint(n, (m,), generator=generator, device=gdev).to(device)
    return i, j


def kernel_scale_objective(
    views: torch.Tensor,
    kernel_scale: float | torch.Tensor,
    *,
    num_pairs: int = 1024,
    generator: torch.Generator | None = None,
    kernel: str = "imq",
) -> torch.Tensor:
    """Side objective that learns the kernel scale c (SPEC §1.2), to minimise in c alone.

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
    embeddings (m^2 ~ num_pairs pairs): drawn with ``generator`` (i then j, ``randint`` with
    replacement), or, when ``generator`` is None, a deterministic evenly strided choice (even / odd
    points of ``t * N // (2m)``, t < 2m) -- the same pairs whatever the kernel.  The distances (direct
    differences, O(m^2 + m d) memory) are computed under ``torch.no_grad()`` from detached views: no
    gradient reaches the embeddings, only ``kernel_scale`` (when it is a tensor that requires grad; its
    value is not checked, as that would sync -- a Python number is checked > 0).  Returns a 0-dim
    tensor, float32 (float64 for float64 views).
    """
    _check_views(views)
    check_int(num_pairs, "num_pairs", minimum=1)
    check_kernel(kernel)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {describe(generator)}")
    K, B, d = views.shape
    N = K * B
    cdt = _compute_dtype(views)
    m = max(1, int(round(math.sqrt(num_pairs))))
    with torch.no_grad():
        x = views.detach().to(cdt).reshape(N, d)
        i, j = _pair_indices(N, m, generator, views.device)
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
