"""``MECLoss`` (Liu et al., NeurIPS 2022) on the ``taylor_logdet`` op."""
from __future__ import annotations

import torch

from .. import functional as KF
from .._checks import check_bool, check_choice, check_int, check_positive
from ..functional._common import fp32_compute
from ._common import LossModule

__all__ = ["MECLoss"]

Tensor = torch.Tensor


class MECLoss(LossModule):
    """Maximum Entropy Coding (Liu, Wang, Li, Wang -- NeurIPS 2022), truncated matrix-log series.

    ::

        C(A, B) = lam * A^ B^T                               (m x m; rows L2-normalised)
        T_n(A, B) = tr sum_{k=1..n} (-1)^(k+1) C^k / k       (-> log det(I + C) when rho(C) < 1)
        loss = -(1/lam) * (T_n(P_a, Z_b) + T_n(P_b, Z_a)) / (2m)        scale="reference"
        loss = -mu * (T_n(P_a, Z_b) + T_n(P_b, Z_a)) / 2                  scale="paper", mu = (m+d)/2

    with ``lam = d / (m * eps_sq)`` (docs/taylor_logdet.md).  P are the teacher (target-branch) outputs, Z the
    online outputs; without targets the online outputs are used on both sides (not detached: pass
    ``target_a=z_a.detach()`` for a stop-gradient).  ``m`` is the batch size.

    The series is a polynomial: it never returns NaN, and is silently far from ``log det`` when the
    spectral radius of C reaches 1 (a collapsed batch has rho = lam * m = d / eps_sq).  Even orders
    are self-stabilising; the paper warms ``1/lam`` up from ``8/lam`` over 10 epochs
    (:func:`kernelssl.functional.mec_lambda_warmup`, passed as ``forward(..., lam=)``).
    :meth:`forward_components` carries a power-iteration estimate of rho (no host sync) to log;
    ``check_convergence="warn" | "raise"`` checks it on every call (one host sync); ``exact=True``
    evaluates ``log det`` exactly instead of the series, for checking.

    Args (keyword-only):
        eps_sq: distortion epsilon^2 (paper: 64).  In fp32, a lambda below ~1e-31 (a huge eps_sq)
            is refused: C's entries would underflow (:func:`kernelssl.functional.min_lambda`).
        order: series order n >= 1 (paper: 4).
        scale: ``"reference"`` (the paper's code; its hyper-parameters are tuned for it) or ``"paper"``.
        exact: use ``log det(I + C)`` (slogdet; NaN where det <= 0) instead of the series.
        check_convergence: ``"off"`` (default), ``"warn"`` (``RuntimeWarning``) or ``"raise"``
            (``ValueError``) when the estimated spectral radius of C is >= 1 in either direction.
            Opt-in because it reads rho on the host: one sync per call, plus the diagnostics' cost.
        gather_distributed, backend, check_finite: see the module docstring.

    Example (an EMA-teacher training loop, the paper's)::

        criterion = MECLoss()
        base = criterion.default_lambda(batch_size, dim)
        for step, (x1, x2) in enumerate(loader):
            lam = KF.mec_lambda_warmup(step, steps_per_epoch=len(loader), base_lam=base)
            with torch.no_grad():
                p1, p2 = teacher(x1), teacher(x2)
            loss = criterion(student(x1), student(x2), p1, p2, lam=lam)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
    """

    def __init__(
        self,
        *,
        eps_sq: float = 64.0,
        order: int = 4,
        scale: str = "reference",
        exact: bool = False,
        check_convergence: str = "off",
        gather_distributed: bool = False, backend: str = "auto", check_finite: bool = False,
    ) -> None:
        super().__init__(gather_distributed, backend, check_finite)
        self.eps_sq = check_positive(eps_sq, "eps_sq")
        self.order = check_int(order, "order", minimum=1)
        self.scale = check_choice(scale, "scale", ("reference", "paper"))
        self.exact = check_bool(exact, "exact")
        self.check_convergence = check_choice(check_convergence, "check_convergence", ("off", "warn", "raise"))

    def default_lambda(self, m: int, d: int) -> float:
        """``lam = d / (m * eps_sq)`` for batch size m and embedding dim d (with ``gather_distributed=True``
        m is the global batch size, summed over the ranks)."""
        m = check_int(m, "m", minimum=1)
        d = check_int(d, "d", minimum=1)
        return d / (m * self.eps_sq)

    @fp32_compute
    def _compute(self, z_a, z_b, target_a, target_b, lam, components: bool) -> Tensor | KF.MECComponents:
        """The functional loss; ``components``: the :class:`~kernelssl.functional.MECComponents`, with the
        convergence diagnostics, else the loss alone (no diagnostics computed unless ``check_convergence``
        asks for them)."""
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
            **self._options(),
            return_components=components,
            check_convergence=self.check_convergence,
        )

    def forward(
        self,
        z_a: Tensor,
        z_b: Tensor,
        target_a: Tensor | None = None,
        target_b: Tensor | None = None,
        *,
        lam: float | Tensor | None = None,
    ) -> Tensor:
        """The MEC loss of two views (reference scale shown)::

            loss = -(1/lam) (T_n(P_a, Z_b) + T_n(P_b, Z_a)) / (2m),   C = lam * P^ Z^T,
            T_n = tr sum_{k=1..n} (-1)^(k+1) C^k / k

        Args:
            z_a, z_b: online (student, after the predictor) outputs of the two views, ``(m, d)``,
                m >= 2, raw (rows are L2-normalised inside), any float dtype.
            target_a, target_b: teacher outputs of the same views ``(m, d)`` (computed without
                gradient, e.g. an EMA copy); None uses ``z_a`` / ``z_b`` (not detached).
            lam: this step's lambda (e.g. :func:`~kernelssl.functional.mec_lambda_warmup`; a 0-dim
                tensor avoids recompiles under ``torch.compile``); None: ``d / (m eps_sq)``.

        Returns:
            The loss, a 0-dim float32 tensor (float64 for float64 inputs).  For the terms and the
            convergence diagnostics, call :meth:`forward_components`.

        Example::

            criterion = MECLoss()
            for x1, x2 in loader:
                with torch.no_grad():
                    p1, p2 = teacher(x1), teacher(x2)
                loss = criterion(student(x1), student(x2), p1, p2)
                optimizer.zero_grad(); loss.backward(); optimizer.step()
        """
        return self._compute(z_a, z_b, target_a, target_b, lam, False)

    def forward_components(
        self,
        z_a: Tensor,
        z_b: Tensor,
        target_a: Tensor | None = None,
        target_b: Tensor | None = None,
        *,
        lam: float | Tensor | None = None,
    ) -> KF.MECComponents:
        """Same arguments and single pass as :meth:`forward`; returns
        :class:`~kernelssl.functional.MECComponents`: ``loss``, ``t_ab``, ``t_ba``, ``coding_length``,
        ``lam``, ``spectral_radius`` (power-iteration estimate of rho(C), the series converges iff
        < 1) and ``term_ratio`` -- 0-dim tensors, no host sync."""
        return self._compute(z_a, z_b, target_a, target_b, lam, True)

    def extra_repr(self) -> str:
        return f"eps_sq={self.eps_sq}, order={self.order}, scale={self.scale!r}, backend={self.backend!r}"
