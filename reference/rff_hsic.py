"""SSL-HSIC reference (docs/rff_hsic.md): NumPy, float64, obviously correct.  No torch.

Conventions
-----------
``views`` is a ``(K, B, d)`` array: K >= 2 views of the same B images; row i of every view is image i.
The N = B*K embeddings are flattened view-major: flat row ``n = v*B + i`` is view v of image i, so
``img(n) = n mod B``.  ``c > 0`` is the kernel scale.

Kernel (inverse multiquadric) and random Fourier features (cos only, random phase)::

    k_c(x, y) = c / sqrt(||x - y||^2 + c^2)                   (k(x, x) = 1)
    phi(x)    = sqrt(2/D) * cos(W (x / c) + beta),  W (D, d), beta (D,),   E[phi(x).phi(y)] = k_c(x, y)

Estimators.  With ``S_i = sum_v phi_A(z_i^v)`` and ``mu = (1/N) sum_n phi_A(z_n)``::

    HSIC_ZY = (1/(B K (K-1))) sum_i ||S_i||^2 - ||mu||^2
    HSIC_ZZ = ||Phibar_B^T Phibar_A||_F^2 / N^2,     Phibar = Phi - 1 mu^T  (column-centred, N x D)
    loss    = gamma * sqrt_guard(HSIC_ZZ) - HSIC_ZY,  gamma = 3

The exact-kernel estimators put the N x N kernel matrix ``Kmat`` in place of ``Phi Phi^T``::

    HSIC_ZY = (1/(B K (K-1))) sum_i sum_{v,w} k(z_i^v, z_i^w) - (1/N^2) sum_{n,m} k(z_n, z_m)
    HSIC_ZZ = ||H Kmat H||_F^2 / N^2,     H = I - 11^T/N

(the v = w terms of the first sum contribute exactly ``B K / (B K (K-1)) = 1/(K-1)``, since k(x,x)=1).

Other kernel families, ``kernel=`` on the exact functions (the RFF functions take any maps)::

    "imq"       k_c(x, y) = c / sqrt(||x - y||^2 + c^2)      dk/dx = -(x - y) k^3 / c^2
    "gaussian"  k_c(x, y) = exp(-||x - y||^2 / (2 c^2))      dk/dx = -(x - y) k / c^2
    "laplace"   k_c(x, y) = exp(-||x - y||_1 / c)            dk/dx = -sign(x - y) k / c

Laplace: ``|t|`` has no derivative at t = 0; the subgradient taken is ``sign(0) = 0`` (what
``torch.abs``'s autograd uses), so a coordinate where x and y tie contributes nothing -- in
particular ``dk(x, y)/dx = 0`` at x = y, as for the two smooth kernels.

sqrt guard
----------
``sqrt_guard(x) = sqrt(max(x, 0) + SQRT_EPS)`` with ``SQRT_EPS = 1e-12``.  For x >= 0 the shift is
``0 < sqrt(x + eps) - sqrt(x) = eps / (sqrt(x + eps) + sqrt(x)) <= sqrt(eps) = 1e-6``, the maximum
being reached at x = 0 (and ``<= eps / (2 sqrt(x))`` away from 0), so the loss moves by at most
``gamma * 1e-6``.  Its derivative ``1/(2 sqrt(max(x,0) + eps))`` is at most ``1/(2e-6) = 5e5``, finite;
at a collapsed batch (all embeddings equal) the centred features vanish, so the gradient of
HSIC_ZZ itself vanishes and the loss gradient stays finite (zero through that term).  Negative
round-off values of HSIC_ZZ are clamped to 0 by a relu (derivative 0 for x <= 0, 1 for x > 0, like
``torch.relu``): an exactly collapsed batch (HSIC_ZZ = 0) gets no gradient through the guard.

Kernel-scale side objective, in c alone: minus ``mean_ij 1/2 log (dk/drho)^2`` over
the distances rho (squared Euclidean for imq and gaussian, the l1 distance for laplace)::

    imq       objective(c) = -log(c/2) + (3/2) mean log(rho + c^2)    d/dc = -1/c + 3 c mean 1/(rho + c^2)
    gaussian  objective(c) = log(2 c^2) + mean(rho) / (2 c^2)          d/dc = 2/c - mean(rho) / c^3
    laplace   objective(c) = log(c) + mean(rho) / c                    d/dc = 1/c - mean(rho) / c^2
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "SQRT_EPS",
    "sqrt_guard",
    "sqrt_guard_grad",
    "KERNELS",
    "imq_kernel",
    "gaussian_kernel",
    "laplace_kernel",
    "kernel_matrix",
    "rff_features",
    "rff_hsic",
    "exact_hsic",
    "hsic_loss",
    "rff_hsic_grad",
    "exact_hsic_grad",
    "hsic_loss_grad",
    "scale_objective",
    "scale_objective_grad",
]

SQRT_EPS = 1e-12
KERNELS = ("imq", "gaussian", "laplace")


def _views(views) -> np.ndarray:
    v = np.asarray(views, dtype=np.float64)
    if v.ndim != 3 or v.shape[0] < 2:
        raise ValueError(f"views: expected shape (K>=2, B, d), got {v.shape}")
    return v


def sqrt_guard(x: float) -> float:
    """``sqrt(max(x, 0) + SQRT_EPS)``; see the module docstring for the bound on the shift."""
    return float(np.sqrt(max(float(x), 0.0) + SQRT_EPS))


def sqrt_guard_grad(x: float) -> float:
    """d sqrt_guard / dx: ``1 / (2 sqrt(x + eps))`` for x > 0 (at most 5e5, as x -> 0+), 0 for x <= 0."""
    x = float(x)
    return 0.0 if x <= 0 else 1.0 / (2.0 * np.sqrt(x + SQRT_EPS))


def imq_kernel(x, y, c: float) -> np.ndarray:
    """IMQ kernel matrix ``k_c(x_n, y_m) = c / sqrt(||x_n - y_m||^2 + c^2)``; x (n, d), y (m, d) -> (n, m)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    diff = x[:, None, :] - y[None, :, :]
    rho = np.sum(diff * diff, axis=-1)
    return c / np.sqrt(rho + c * c)


def gaussian_kernel(x, y, c: float) -> np.ndarray:
    """Gaussian kernel matrix ``exp(-||x_n - y_m||^2 / (2 c^2))``; x (n, d), y (m, d) -> (n, m)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    diff = x[:, None, :] - y[None, :, :]
    rho = np.sum(diff * diff, axis=-1)
    return np.exp(-rho / (2.0 * c * c))


def laplace_kernel(x, y, c: float) -> np.ndarray:
    """Laplace (l1) kernel matrix ``exp(-||x_n - y_m||_1 / c)``; x (n, d), y (m, d) -> (n, m)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    r = np.sum(np.abs(x[:, None, :] - y[None, :, :]), axis=-1)
    return np.exp(-r / c)


def _check_kernel(kernel) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    return kernel


def kernel_matrix(x, y, c: float, kernel: str = "imq") -> np.ndarray:
    """``k_c(x_n, y_m)`` for the family ``kernel`` ("imq", "gaussian", "laplace")."""
    fn = {"imq": imq_kernel, "gaussian": gaussian_kernel, "laplace": laplace_kernel}[_check_kernel(kernel)]
    return fn(x, y, c)


def _kernel_grad_x(x, y, c: float, kernel: str) -> np.ndarray:
    """``d k_c(x_n, y_m) / d x_n`` as an (n, m, d) array (Laplace: subgradient sign(0) = 0)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    diff = x[:, None, :] - y[None, :, :]
    k = kernel_matrix(x, y, c, kernel)[:, :, None]
    if kernel == "imq":
        return -diff * k**3 / c**2
    if kernel == "gaussian":
        return -diff * k / c**2
    return -np.sign(diff) * k / c


def rff_features(x, w, b, c: float) -> np.ndarray:
    """``phi(x) = sqrt(2/D) cos(W (x/c) + b)``; x (n, d), w (D, d), b (D,) -> (n, D)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    D = w.shape[0]
    return np.sqrt(2.0 / D) * np.cos((x / c) @ w.T + b)


def _rff_parts(views, w_a, b_a, w_b, b_b, c):
    v = _views(views)
    K, B, d = v.shape
    N = K * B
    x = v.reshape(N, d)
    phi_a = rff_features(x, w_a, b_a, c)
    phi_b = rff_features(x, w_b, b_b, c)
    S = phi_a.reshape(K, B, -1).sum(axis=0)  # (B, D_A)
    mu = phi_a.mean(axis=0)
    pa = phi_a - mu
    pb = phi_b - phi_b.mean(axis=0)
    C = pb.T @ pa  # (D_B, D_A)
    return v, x, phi_a, phi_b, S, mu, pa, pb, C


def rff_hsic(views, w_a, b_a, w_b, b_b, c: float) -> tuple[float, float]:
    """RFF estimators (HSIC_ZY, HSIC_ZZ) , map A for both terms and map B for HSIC_ZZ."""
    v, x, phi_a, phi_b, S, mu, pa, pb, C = _rff_parts(views, w_a, b_a, w_b, b_b, c)
    K, B, _ = v.shape
    N = K * B
    zy = np.sum(S * S) / (B * K * (K - 1)) - np.sum(mu * mu)
    zz = np.sum(C * C) / N**2
    return float(zy), float(zz)


def exact_hsic(views, c: float, kernel: str = "imq") -> tuple[float, float]:
    """Exact-kernel estimators (HSIC_ZY, HSIC_ZZ) from the N x N kernel matrix of ``kernel`` (loops)."""
    v = _views(views)
    K, B, d = v.shape
    N = K * B
    x = v.reshape(N, d)
    kmat = kernel_matrix(x, x, c, kernel)
    pos = 0.0
    for i in range(B):
        for a in range(K):
            for w in range(K):
                pos += kmat[a * B + i, w * B + i]
    zy = pos / (B * K * (K - 1)) - kmat.sum() / N**2
    H = np.eye(N) - np.ones((N, N)) / N
    hkh = H @ kmat @ H
    zz = np.sum(hkh * hkh) / N**2
    return float(zy), float(zz)


def hsic_loss(hsic_zy: float, hsic_zz: float, gamma: float = 3.0) -> float:
    """``gamma * sqrt_guard(HSIC_ZZ) - HSIC_ZY``."""
    return float(gamma * sqrt_guard(hsic_zz) - hsic_zy)


def _features_backward(x, w, b, c, g_phi):
    """Chain d/dPhi (N, D) through ``phi = s cos(W x/c + b)``: d/dx = -(s/c) (g_phi * sin(u)) W."""
    w = np.asarray(w, dtype=np.float64)
    D = w.shape[0]
    u = (x / c) @ w.T + np.asarray(b, dtype=np.float64)
    return -(np.sqrt(2.0 / D) / c) * (g_phi * np.sin(u)) @ w


def rff_hsic_grad(views, w_a, b_a, w_b, b_b, c: float, g_zy: float, g_zz: float) -> np.ndarray:
    """Analytic ``d(g_zy * HSIC_ZY + g_zz * HSIC_ZZ)/d views`` for the RFF estimators, (K, B, d).

    HSIC_ZY: row n of d/dPhi_A is ``2 S_img(n) / (B K (K-1)) - (2/N) mu``.
    HSIC_ZZ: ``d/dPhi_A = (2/N^2) Phibar_B C``, ``d/dPhi_B = (2/N^2) Phibar_A C^T``, ``C = Phibar_B^T Phibar_A``
    (these are already column-centred, so the centring Jacobian leaves them unchanged).
    """
    v, x, phi_a, phi_b, S, mu, pa, pb, C = _rff_parts(views, w_a, b_a, w_b, b_b, c)
    K, B, d = v.shape
    N = K * B
    g_a = np.zeros_like(phi_a)
    for n in range(N):
        g_a[n] = g_zy * (2.0 * S[n % B] / (B * K * (K - 1)) - 2.0 * mu / N)
    g_a += g_zz * (2.0 / N**2) * (pb @ C)
    g_b = g_zz * (2.0 / N**2) * (pa @ C.T)
    gx = _features_backward(x, w_a, b_a, c, g_a) + _features_backward(x, w_b, b_b, c, g_b)
    return gx.reshape(K, B, d)


def exact_hsic_grad(views, c: float, g_zy: float, g_zz: float, kernel: str = "imq") -> np.ndarray:
    """Analytic ``d(g_zy * HSIC_ZY + g_zz * HSIC_ZZ)/d views`` for the exact kernel ``kernel``, (K, B, d).

    Both terms are ``sum_{nm} G_nm Kmat_nm`` (G taken with the entries of Kmat as free variables):
    HSIC_ZY: ``G_nm = [img(n) = img(m)]/(B K (K-1)) - 1/N^2``; HSIC_ZZ = tr(Kmat H Kmat H)/N^2:
    ``G = 2 H Kmat H / N^2``.  Then ``d/dx_n = sum_m (G_nm + G_mn) dk(x_n, x_m)/dx_n`` with the kernel
    derivatives of the module docstring (IMQ ``-(x_n - x_m) k^3 / c^2``; Laplace's with sign(0) = 0).
    """
    v = _views(views)
    K, B, d = v.shape
    N = K * B
    x = v.reshape(N, d)
    kmat = kernel_matrix(x, x, c, kernel)
    dk = _kernel_grad_x(x, x, c, kernel)  # (N, N, d)
    G = np.full((N, N), -1.0 / N**2)
    for n in range(N):
        for m in range(N):
            if n % B == m % B:
                G[n, m] += 1.0 / (B * K * (K - 1))
    G *= g_zy
    H = np.eye(N) - np.ones((N, N)) / N
    G += g_zz * 2.0 * (H @ kmat @ H) / N**2
    Gs = G + G.T
    gx = np.zeros_like(x)
    for n in range(N):
        for m in range(N):
            gx[n] += Gs[n, m] * dk[n, m]
    return gx.reshape(K, B, d)


def hsic_loss_grad(
    views,
    c: float,
    *,
    gamma: float = 3.0,
    kernel: str = "imq",
    exact: bool = False,
    w_a=None,
    b_a=None,
    w_b=None,
    b_b=None,
) -> np.ndarray:
    """d loss / d views, ``loss = gamma * sqrt_guard(HSIC_ZZ) - HSIC_ZY``: the RFF estimators
    (``exact=False``; needs the two maps, whatever kernel they sample -- ``kernel`` is then only
    validated) or the exact kernel ``kernel`` (``exact=True``): ``g_zy = -1``,
    ``g_zz = gamma * sqrt_guard'(HSIC_ZZ)``."""
    _check_kernel(kernel)
    if exact is False:
        _, zz = rff_hsic(views, w_a, b_a, w_b, b_b, c)
        return rff_hsic_grad(views, w_a, b_a, w_b, b_b, c, -1.0, gamma * sqrt_guard_grad(zz))
    if exact is True:
        _, zz = exact_hsic(views, c, kernel)
        return exact_hsic_grad(views, c, -1.0, gamma * sqrt_guard_grad(zz), kernel)
    raise TypeError(f"exact: expected a bool, got {exact!r}")


def scale_objective(rho, c: float, kernel: str = "imq") -> float:
    """Minus ``mean 1/2 log (dk/drho)^2`` over the distances ``rho`` (any shape; squared Euclidean for
    "imq" and "gaussian", l1 for "laplace"): ``-log(c/2) + 1.5 mean log(rho + c^2)`` (imq),
    ``log(2 c^2) + mean(rho) / (2 c^2)`` (gaussian), ``log(c) + mean(rho) / c`` (laplace)."""
    rho = np.asarray(rho, dtype=np.float64)
    if _check_kernel(kernel) == "imq":
        return float(-np.log(c / 2.0) + 1.5 * np.mean(np.log(rho + c * c)))
    if kernel == "gaussian":
        return float(np.log(2.0 * c * c) + np.mean(rho) / (2.0 * c * c))
    return float(np.log(c) + np.mean(rho) / c)


def scale_objective_grad(rho, c: float, kernel: str = "imq") -> float:
    """``d scale_objective / dc``: ``-1/c + 3 c mean(1/(rho + c^2))`` (imq), ``2/c - mean(rho)/c^3``
    (gaussian), ``1/c - mean(rho)/c^2`` (laplace)."""
    rho = np.asarray(rho, dtype=np.float64)
    if _check_kernel(kernel) == "imq":
        return float(-1.0 / c + 3.0 * c * np.mean(1.0 / (rho + c * c)))
    if kernel == "gaussian":
        return float(2.0 / c - np.mean(rho) / c**3)
    return float(1.0 / c - np.mean(rho) / c**2)
