"""Drop-in ``nn.Module`` losses: :class:`HSICLoss`, :class:`SFRIKLoss`, :class:`MECLoss` (SPEC §5).

Each is a thin module over :mod:`kernelssl.functional`: keyword-only hyper-parameters with the
papers' defaults, ``backend="auto" | "triton" | "torch"``, ``return_components=True`` for a small
dataclass of the terms to log, and ``check_finite=True`` to raise on NaN/Inf inputs (by default
they propagate to a NaN loss -- never a silent finite number).

``gather_distributed=True`` (every term on the gathered global batch) lands with the scale-out
issue; until then it raises ``NotImplementedError`` rather than silently computing a local loss.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import functional as KF
from . import hsic as _hsic
from ._backend import BACKENDS
from ._checks import check_choice, check_coefficients, check_int, check_positive

__all__ = ["HSICLoss", "SFRIKLoss", "MECLoss"]

Tensor = torch.Tensor


def _check_common(gather_distributed: bool, backend: str) -> None:
    check_choice(backend, "backend", BACKENDS)
    if gather_distributed:
        raise NotImplementedError(
            "gather_distributed=True is not available in this version of kernelssl (it lands with the "
            "distributed issue); compute the loss on the local batch (gather_distributed=False)"
        )


class HSICLoss(nn.Module):
    """SSL-HSIC (Li, Pogodin, Sutherland, Gretton -- NeurIPS 2021), linear in the batch size.

    ::

        loss = gamma * sqrt(HSIC(Z, Z)) - HSIC(Z, Y)

    ``HSIC(Z, Y)`` is the dependence between embeddings and image identity (row index), ``HSIC(Z, Z)``
    the redundancy penalty, both with the inverse multiquadric kernel
    ``k_c(x, y) = c / sqrt(||x - y||^2 + c^2)`` approximated by ``num_features`` random Fourier
    features, two independent maps redrawn at every call (SPEC §1).  Cost O(N d D + N D^2), memory
    O(N D + D^2) for N = B*K embeddings: never an N x N matrix.

    Args (keyword-only):
        num_features: D, the number of random Fourier features per map (paper: 512).
        gamma: weight of ``sqrt(HSIC(Z, Z))`` (paper: 3).
        kernel_scale: the IMQ scale c (paper: learned from 1.0).
        learn_scale: own c as a parameter and learn it with the paper's side objective
            ``-log(c/2) + 1.5 mean log(rho + c^2)`` (rho = squared distances of ``num_scale_pairs``
            sampled pairs, no gradient to the embeddings).  The module then returns
            ``hsic_loss + scale_objective``: the embeddings get gradients from the first term only
            (c is stop-gradient there), c from the second only.  Give ``loss.parameters()`` its own
            optimiser (the paper: Adam, lr 3e-4).
        kernel: ``"rff"`` (the paper's estimator) or ``"exact"`` (the exact kernel, O(N^2) memory;
            for checking).
        normalize: L2-normalise each embedding first (the paper's code does this before the loss).
        seed: seed of the module's own generator for the random features, used when ``forward`` gets
            no ``generator``; the same seed gives the same features on every rank.
        gather_distributed, backend, check_finite, return_components: see the module docstring.

    Shapes: ``forward(*views)`` with K >= 2 tensors ``(B, d)`` (row i of each is image i), or one
    ``(K, B, d)`` tensor; returns a 0-dim float32 tensor (or :class:`~kernelssl.functional.HSICComponents`).

    Example::

        criterion = HSICLoss(learn_scale=True)
        scale_opt = torch.optim.Adam(criterion.parameters(), lr=3e-4)
        for x1, x2 in loader:
            z1, z2 = model(x1), model(x2)
            loss = criterion(z1, z2)
            opt.zero_grad(); scale_opt.zero_grad()
            loss.backward()
            opt.step(); scale_opt.step()
    """

    def __init__(
        self,
        *,
        num_features: int = 512,
        gamma: float = 3.0,
        kernel_scale: float = 1.0,
        learn_scale: bool = False,
        kernel: str = "rff",
        normalize: bool = False,
        num_scale_pairs: int = 1024,
        seed: int = 0,
        gather_distributed: bool = False,
        backend: str = "auto",
        check_finite: bool = False,
        return_components: bool = False,
    ) -> None:
        super().__init__()
        check_int(num_features, "num_features", minimum=1)
        check_positive(gamma, "gamma", allow_zero=True)
        check_positive(kernel_scale, "kernel_scale")
        check_choice(kernel, "kernel", ("rff", "exact"))
        check_int(num_scale_pairs, "num_scale_pairs", minimum=1)
        check_int(seed, "seed", minimum=0)
        _check_common(gather_distributed, backend)
        self.num_features = num_features
        self.gamma = float(gamma)
        self.learn_scale = learn_scale
        self.kernel = kernel
        self.normalize = normalize
        self.num_scale_pairs = num_scale_pairs
        self.seed = seed
        self.gather_distributed = gather_distributed
        self.backend = backend
        self.check_finite = check_finite
        self.return_components = return_components
        if learn_scale:
            self.kernel_scale = nn.Parameter(torch.tensor(float(kernel_scale)))
        else:
            self.kernel_scale = float(kernel_scale)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        # One generator per device, seeded identically: drawing on the device of the embeddings
        # avoids a host-to-device copy (and its implicit sync) every step.
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def forward(self, *views: Tensor, generator: torch.Generator | None = None):
        stacked = KF._as_views(views)
        if self.normalize:
            stacked = torch.nn.functional.normalize(stacked, dim=-1)
        if generator is None and self.kernel == "rff":
            generator = self._generator(stacked.device)
        c = self.kernel_scale
        out = KF.ssl_hsic_loss(
            stacked,
            num_features=self.num_features,
            gamma=self.gamma,
            kernel_scale=c,
            kernel=self.kernel,
            generator=generator,
            backend=self.backend,
            check_finite=self.check_finite,
            return_components=True,
        )
        scale_obj = None
        loss = out.loss
        if self.learn_scale:
            scale_obj = _hsic.kernel_scale_objective(
                stacked, c, num_pairs=self.num_scale_pairs, generator=generator
            )
            loss = loss + scale_obj
        if not self.return_components:
            return loss
        out.loss, out.scale_objective = loss, scale_obj
        return out

    def extra_repr(self) -> str:
        c = "learned" if self.learn_scale else self.kernel_scale
        return (
            f"num_features={self.num_features}, gamma={self.gamma}, kernel_scale={c}, kernel={self.kernel!r}, "
            f"normalize={self.normalize}, backend={self.backend!r}"
        )


class SFRIKLoss(nn.Module):
    """SFRIK (Zheng, Puy, Riccietti, Perez, Gribonval -- ICLR 2023): similarity + MMD to uniformity.

    ::

        L = sim_weight * R + mmd_weight * (M(Z_a) + M(Z_b)) / 2
        R = (1/(n q)) sum_i ||z_a,i^ - z_b,i^||^2
        M(Z) = (1/n^2) sum_{i,j} phi(z_i^ . z_j^),   phi(t) = sum_{l=1..L} b_l P_l(q; t)

    ``z^`` are the L2-normalised rows, ``P_l(q; .)`` the Legendre polynomials in dimension q
    (``P_l(q; 1) = 1``); ``M`` is the biased (V-statistic) MMD^2 between the batch and the uniform
    distribution on the sphere under the rotation-invariant kernel ``phi(u . v)``, diagonal included
    (SPEC §2).  The Gram is streamed in row chunks: memory O(n q), never n x n.

    Args (keyword-only):
        coefficients: ``(b_1, ..., b_L)``, any degree L >= 1 (paper: (1, 40, 40)); the kernel is
            positive definite iff every b_l >= 0.
        sim_weight: weight of R.  The paper has no default and scales it with q; 4000 is its
            q = 8192 setting (40000 at q = 32768).
        mmd_weight: weight of the mean of the two uniformity terms (paper: 1).
        gather_distributed, backend, check_finite, return_components: see the module docstring.

    Shapes: ``forward(z_a, z_b)`` with raw projector outputs ``(n, q)``, n >= 2, q >= 2 (normalised
    inside); returns a 0-dim float32 tensor (or :class:`~kernelssl.functional.SFRIKComponents`).

    Example::

        criterion = SFRIKLoss(sim_weight=4000.0)
        for x1, x2 in loader:
            loss = criterion(model(x1), model(x2))
            opt.zero_grad(); loss.backward(); opt.step()
    """

    def __init__(
        self,
        *,
        coefficients: Sequence[float] = (1.0, 40.0, 40.0),
        sim_weight: float = 4000.0,
        mmd_weight: float = 1.0,
        gather_distributed: bool = False,
        backend: str = "auto",
        check_finite: bool = False,
        return_components: bool = False,
    ) -> None:
        super().__init__()
        self.coefficients = check_coefficients(coefficients)
        self.sim_weight = check_positive(sim_weight, "sim_weight", allow_zero=True)
        self.mmd_weight = check_positive(mmd_weight, "mmd_weight", allow_zero=True)
        _check_common(gather_distributed, backend)
        self.gather_distributed = gather_distributed
        self.backend = backend
        self.check_finite = check_finite
        self.return_components = return_components

    def forward(self, z_a: Tensor, z_b: Tensor):
        return KF.sfrik_loss(
            z_a,
            z_b,
            coefficients=self.coefficients,
            sim_weight=self.sim_weight,
            mmd_weight=self.mmd_weight,
            backend=self.backend,
            check_finite=self.check_finite,
            return_components=self.return_components,
        )

    def extra_repr(self) -> str:
        return (
            f"coefficients={self.coefficients}, sim_weight={self.sim_weight}, mmd_weight={self.mmd_weight}, "
            f"backend={self.backend!r}"
        )


class MECLoss(nn.Module):
    """Maximum Entropy Coding (Liu, Wang, Li, Wang -- NeurIPS 2022), truncated matrix-log series.

    ::

        C(A, B) = lam * A^ B^T                               (m x m; rows L2-normalised)
        T_n(A, B) = tr sum_{k=1..n} (-1)^(k+1) C^k / k       (-> log det(I + C) when rho(C) < 1)
        loss = -(1/lam) * (T_n(P_a, Z_b) + T_n(P_b, Z_a)) / (2m)        scale="reference"
        loss = -mu * (T_n(P_a, Z_b) + T_n(P_b, Z_a)) / 2                  scale="paper", mu = (m+d)/2

    with ``lam = d / (m * eps_sq)`` (SPEC §3).  P are the teacher (target-branch) outputs, Z the
    online outputs; without targets the online outputs are used on both sides (not detached: pass
    ``target_a=z_a.detach()`` for a stop-gradient).  ``m`` is the batch size.

    The series is a polynomial: it never returns NaN, and is silently far from ``log det`` when the
    spectral radius of C reaches 1 (a collapsed batch has rho = lam * m = d / eps_sq).  Even orders
    are self-stabilising; the paper warms ``1/lam`` up from ``8/lam`` over 10 epochs
    (:func:`kernelssl.functional.mec_lambda_warmup`, passed as ``forward(..., lam=)``).  With
    ``return_components=True`` the result carries a power-iteration estimate of rho (no host sync)
    to log; ``exact=True`` evaluates ``log det`` exactly instead of the series, for checking.

    Args (keyword-only):
        eps_sq: distortion epsilon^2 (paper: 64).
        order: series order n >= 1 (paper: 4).
        scale: ``"reference"`` (the paper's code; its hyper-parameters are tuned for it) or ``"paper"``.
        exact: use ``log det(I + C)`` (slogdet; NaN where det <= 0) instead of the series.
        gather_distributed, backend, check_finite, return_components: see the module docstring.

    Shapes: ``forward(z_a, z_b, target_a=None, target_b=None, *, lam=None)``, all ``(m, d)``,
    m >= 2; returns a 0-dim float32 tensor (or :class:`~kernelssl.functional.MECComponents`).

    Example::

        criterion = MECLoss()
        base = criterion.default_lambda(batch_size, dim)
        for step, (x1, x2) in enumerate(loader):
            lam = KF.mec_lambda_warmup(step, steps_per_epoch=len(loader), base_lam=base)
            with torch.no_grad():
                p1, p2 = teacher(x1), teacher(x2)
            loss = criterion(student(x1), student(x2), p1, p2, lam=lam)
            opt.zero_grad(); loss.backward(); opt.step()
    """

    def __init__(
        self,
        *,
        eps_sq: float = 64.0,
        order: int = 4,
        scale: str = "reference",
        exact: bool = False,
        gather_distributed: bool = False,
        backend: str = "auto",
        check_finite: bool = False,
        return_components: bool = False,
    ) -> None:
        super().__init__()
        self.eps_sq = check_positive(eps_sq, "eps_sq")
        self.order = check_int(order, "order", minimum=1)
        self.scale = check_choice(scale, "scale", ("reference", "paper"))
        _check_common(gather_distributed, backend)
        self.exact = exact
        self.gather_distributed = gather_distributed
        self.backend = backend
        self.check_finite = check_finite
        self.return_components = return_components

    def default_lambda(self, m: int, d: int) -> float:
        """``lam = d / (m * eps_sq)`` for batch size m and embedding dim d."""
        return d / (m * self.eps_sq)

    def forward(
        self,
        z_a: Tensor,
        z_b: Tensor,
        target_a: Tensor | None = None,
        target_b: Tensor | None = None,
        *,
        lam: float | None = None,
    ):
        return KF.mec_loss(
            z_a,
            z_b,
            target_a,
            target_b,
            eps_sq=self.eps_sq,
            order=self.order,
            scale=self.scale,
            lam=lam,
            exact=self.exact,
            backend=self.backend,
            check_finite=self.check_finite,
            return_components=self.return_components,
        )

    def extra_repr(self) -> str:
        return f"eps_sq={self.eps_sq}, order={self.order}, scale={self.scale!r}, backend={self.backend!r}"
