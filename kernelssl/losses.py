"""Drop-in ``nn.Module`` losses: :class:`HSICLoss`, :class:`SFRIKLoss`, :class:`MECLoss` (SPEC §5).

Each is a thin module over :mod:`kernelssl.functional`: keyword-only hyper-parameters with the
papers' defaults, ``backend="auto" | "triton" | "torch"``, ``return_components=True`` for a small
dataclass of the terms to log, and ``check_finite=True`` to raise on NaN/Inf inputs (by default
they propagate to a NaN loss -- never a silent finite number).

``gather_distributed=True`` computes every term on the global batch gathered from all data-parallel
ranks (:mod:`kernelssl.distributed`): every rank returns the loss of one process holding the global
batch, and after DistributedDataParallel averages the gradients the parameter gradients equal that
process's.  Uneven local batches are handled (padded for the collective, padding dropped).  Costs one
small metadata all-gather with a host read (one sync per call), one all-gather of the embeddings, and
a reduce-scatter in the backward.  Without an initialised process group (or with one rank) it is a
no-op.  Hyper-parameters that depend on the batch size refer to the **global** batch (MEC's m).

Autocast (mixed precision).  The losses run in float32 whatever autocast says: inside
``torch.autocast(device, dtype=torch.bfloat16 | torch.float16)`` they switch autocast off for the
inputs' device, upcast fp16/bf16 embeddings to float32, compute and accumulate in float32 and return
a float32 scalar; gradients flow back in the embeddings' dtype.  So a model with fp32 weights and
bf16 activations can call the loss inside its autocast region and gets the same loss as calling it
outside on the same (bf16) embeddings -- no matmul of the loss silently drops to bf16/fp16 (their
8/11-bit mantissas would cost the kernel sums 2-3 digits).  float64 inputs compute in float64.

``torch.compile``: the three modules trace with ``fullgraph=True`` (no graph break) when
``gather_distributed=False``, except that :class:`HSICLoss` draws its random features from a
``torch.Generator``, which dynamo cannot trace: draw them outside the compiled region with
:meth:`HSICLoss.draw_features` and pass them as ``forward(..., features=...)``.
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
    if not isinstance(gather_distributed, bool):
        raise TypeError(
            f"gather_distributed: expected a bool, got {type(gather_distributed).__name__} {gather_distributed!r}"
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
        gather_distributed: compute the loss on the views gathered from all ranks (B = global batch,
            N = K B).  The random features must be identical on every rank: the module's own
            generator is (same seed, same number of calls on every rank); a ``generator=`` passed to
            ``forward`` must be seeded alike on every rank (never by rank).  Its state is
            checksummed and compared across ranks in the gather's metadata exchange: a difference
            raises a ``ValueError`` (no seed is broadcast: that would cost a collective per step).
        backend, check_finite, return_components: see the module docstring.

    Shapes: ``forward(*views, generator=None, features=None)`` with K >= 2 tensors ``(B, d)`` (row i
    of each is image i), or one ``(K, B, d)`` tensor; returns a 0-dim float32 tensor (or
    :class:`~kernelssl.functional.HSICComponents`).  ``features=(w_a, b_a, w_b, b_b)``: the two
    random-feature maps drawn beforehand (:meth:`draw_features`, e.g. outside a ``torch.compile``
    region); then ``forward`` draws nothing, and the scale objective (``learn_scale``) uses
    ``generator`` for its pairs if given, else the deterministic strided pairs.

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

    def draw_features(
        self, dim: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The two maps ``(w_a, b_a, w_b, b_b)`` that ``forward`` would draw next for ``(K, B, dim)``
        views of ``dtype`` on ``device`` -- from the module's generator for that device, in the same
        order and dtype (float64 for float64 views, else float32), advancing it the same way.  Pass
        them as ``forward(..., features=...)``: eager and compiled steps then see the same numbers.
        """
        device = torch.device(device)
        gen = self._generator(device)
        dt = torch.float64 if dtype == torch.float64 else torch.float32
        w_a, b_a = KF.sample_imq_rff(dim, self.num_features, generator=gen, device=device, dtype=dt)
        w_b, b_b = KF.sample_imq_rff(dim, self.num_features, generator=gen, device=device, dtype=dt)
        return w_a, b_a, w_b, b_b

    @KF._fp32_compute
    def forward(
        self,
        *views: Tensor,
        generator: torch.Generator | None = None,
        features: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    ):
        stacked = KF._as_views(views)
        if features is not None:
            if self.kernel != "rff":
                raise ValueError(
                    f"features: expected None with kernel={self.kernel!r} (maps are for kernel='rff'), got maps"
                )
            if not isinstance(features, (tuple, list)) or len(features) != 4:
                raise TypeError(
                    "features: expected a tuple (w_a, b_a, w_b, b_b) as returned by draw_features, "
                    f"got {type(features).__name__}"
                )
        elif generator is None and self.kernel == "rff":
            generator = self._generator(stacked.device)
        if self.normalize:
            stacked = torch.nn.functional.normalize(stacked, dim=-1)
        if self.gather_distributed:
            # Everything random is drawn after the gather from `generator`: check it agrees on all ranks.
            stacked = KF.gather_views(stacked, generator if generator is not None else False)
        c = self.kernel_scale
        if features is None:
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
        else:
            zy, zz = KF.rff_hsic(stacked, *features, c, backend=self.backend, check_finite=self.check_finite)
            c_log = c.detach().reshape(()) if isinstance(c, Tensor) else torch.tensor(c)
            loss = _hsic.hsic_loss(zy, zz, gamma=self.gamma)
            out = KF.HSICComponents(loss=loss, hsic_zy=zy, hsic_zz=zz, kernel_scale=c_log)
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

    @KF._fp32_compute
    def forward(self, z_a: Tensor, z_b: Tensor):
        return KF.sfrik_loss(
            z_a,
            z_b,
            coefficients=self.coefficients,
            sim_weight=self.sim_weight,
            mmd_weight=self.mmd_weight,
            gather_distributed=self.gather_distributed,
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
        """``lam = d / (m * eps_sq)`` for batch size m and embedding dim d (with ``gather_distributed=True``
        m is the global batch size, summed over the ranks)."""
        return d / (m * self.eps_sq)

    @KF._fp32_compute
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
            gather_distributed=self.gather_distributed,
            backend=self.backend,
            check_finite=self.check_finite,
            return_components=self.return_components,
        )

    def extra_repr(self) -> str:
        return f"eps_sq={self.eps_sq}, order={self.order}, scale={self.scale!r}, backend={self.backend!r}"
