"""``UniformityLoss`` and ``AlignUniformLoss`` (Wang & Isola, ICML 2020) on the ``gaussian_gram`` op."""
from __future__ import annotations

import torch

from .. import dispatch
from .. import functional as KF
from .._checks import check_bool, check_positive
from ..functional.align_uniform import check_alpha, check_t
from ._common import LossModule

__all__ = ["UniformityLoss", "AlignUniformLoss"]

Tensor = torch.Tensor


class UniformityLoss(LossModule):
    """Wang & Isola's uniformity (ICML 2020, "Understanding contrastive representation learning through
    alignment and uniformity on the hypersphere"; docs/gaussian_gram.md)::

        L_unif(Z; t) = log( (1/(n (n - 1))) sum_{i != j} exp(-t ||z_i^ - z_j^||^2) )
                     = log( (1/(n (n - 1))) sum_{i != j} exp(2t (z_i^ . z_j^ - 1)) )

    on the L2-normalised rows ``z^`` (diagonal excluded).  Equal to their
    ``torch.pdist(z^, p=2).pow(2).mul(-t).exp().mean().log()``, computed without the ``n (n - 1) / 2``
    distances: the Gram of unit rows is streamed in blocks (memory O(n q), never n x n) with an
    online log-sum-exp, so it is finite and right for any t (their form underflows to ``-inf`` at
    large t in fp32).  Lower is more uniform.  On CUDA the fused Triton kernel runs it
    (``backend="auto"``).

    Args (keyword-only):
        t: t > 0 (paper: 2).
        normalize: L2-normalise the rows first (default); ``False`` takes them as given: unit rows (rows off the
            sphere by more than ``kernelssl.functional.align_uniform.UNIT_ROW_TOL`` make the uniformity NaN).
        gather_distributed: compute it on the batch gathered from all ranks (n global).
        backend, check_finite: see the module docstring.
        input_precision: the fused kernel's fp32 GEMM precision (``"tf32x3"`` default, ``"ieee"``,
            ``"tf32"``); the torch tier ignores it.

    One batch of embeddings: ``forward(z)``.  For the two-view training loss use
    :class:`AlignUniformLoss`; as a metric of frozen features use
    :func:`kernelssl.functional.uniformity` under ``torch.no_grad()``.

    Example (uniformity as a regulariser in a two-view training loop)::

        unif = UniformityLoss(t=2.0)
        for x1, x2 in loader:
            z1, z2 = projector(backbone(x1)), projector(backbone(x2))
            loss = my_invariance_loss(z1, z2) + 0.5 * (unif(z1) + unif(z2))
            optimizer.zero_grad(); loss.backward(); optimizer.step()
    """

    def __init__(
        self,
        *,
        t: float = 2.0,
        normalize: bool = True, gather_distributed: bool = False, backend: str = "auto", check_finite: bool = False,
        input_precision: str | None = None,
    ) -> None:
        super().__init__(gather_distributed, backend, check_finite)
        self.t = check_t(t)
        self.normalize = check_bool(normalize, "normalize")
        dispatch.check_precision(input_precision)
        self.input_precision = input_precision

    def forward(self, z: Tensor) -> Tensor:
        """The uniformity of one batch of embeddings::

            loss = log( (1/(n (n - 1))) sum_{i != j} exp(-t ||z_i^ - z_j^||^2) )

        Args:
            z: ``(n, q)`` embeddings, n >= 2, any float dtype (raw projector outputs are fine:
                rows are L2-normalised inside unless ``normalize=False``).

        Returns:
            The loss, a 0-dim float32 tensor (float64 for float64 input), differentiable w.r.t. ``z``.

        Example::

            criterion = UniformityLoss()
            for x1, x2 in loader:
                z1, z2 = model(x1), model(x2)
                loss = 0.5 * (criterion(z1) + criterion(z2))
                optimizer.zero_grad(); loss.backward(); optimizer.step()
        """
        return KF.uniformity(
            z,
            self.t,
            normalize=self.normalize,
            **self._options(),
            input_precision=self.input_precision,
        )

    def extra_repr(self) -> str:
        return f"t={self.t}, normalize={self.normalize}, backend={self.backend!r}"


class AlignUniformLoss(LossModule):
    """Wang & Isola's alignment + uniformity loss (ICML 2020; docs/gaussian_gram.md)::

        loss    = L_align(Z_a, Z_b) + uniformity_weight * (L_unif(Z_a) + L_unif(Z_b)) / 2
        L_align = (1/n) sum_i ||z_a^_i - z_b^_i||^alpha
        L_unif  = log( (1/(n (n - 1))) sum_{i != j} exp(-t ||z_i^ - z_j^||^2) )      (per view)

    on the L2-normalised rows ``z^`` of two views of the same n images (row i of each is image i).
    Their code: ``align_loss(x, y, alpha) + lam * (uniform_loss(x, t) + uniform_loss(y, t)) / 2``.
    The uniformity terms never store the ``n (n - 1) / 2`` distances of their ``pdist`` form (memory
    O(n q), online log-sum-exp, any t; see :class:`UniformityLoss`).

    Args (keyword-only):
        alpha: alpha > 0, the alignment's exponent (paper: 2).
        t: t > 0, the uniformity's scale (paper: 2).
        uniformity_weight: lambda >= 0, weight of the mean of the two uniformity terms (paper: 1).
        normalize: L2-normalise the rows first (default, as their encoder's output layer does).  ``False``:
            the alignment takes the rows as given; the uniformity needs unit rows (NaN off the sphere).
        gather_distributed: both terms on the batch gathered from all ranks (n global).
        backend, check_finite: see the module docstring.
        input_precision: the fused kernel's fp32 GEMM precision (see :class:`UniformityLoss`).

    Example (a two-view training loop, as Wang & Isola train: no EMA teacher, no predictor)::

        criterion = AlignUniformLoss()
        for x1, x2 in loader:                       # two augmentations of the same images
            z1, z2 = projector(backbone(x1)), projector(backbone(x2))
            loss = criterion(z1, z2)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
    """

    def __init__(
        self,
        *,
        alpha: float = 2.0,
        t: float = 2.0,
        uniformity_weight: float = 1.0,
        normalize: bool = True, gather_distributed: bool = False, backend: str = "auto", check_finite: bool = False,
        input_precision: str | None = None,
    ) -> None:
        super().__init__(gather_distributed, backend, check_finite)
        self.alpha = check_alpha(alpha)
        self.t = check_t(t)
        self.uniformity_weight = check_positive(uniformity_weight, "uniformity_weight", allow_zero=True)
        self.normalize = check_bool(normalize, "normalize")
        dispatch.check_precision(input_precision)
        self.input_precision = input_precision

    def _compute(self, z_a: Tensor, z_b: Tensor) -> KF.AlignUniformComponents:
        return KF.align_uniform_loss(
            z_a,
            z_b,
            alpha=self.alpha,
            t=self.t,
            uniformity_weight=self.uniformity_weight,
            normalize=self.normalize,
            **self._options(),
            return_components=True,
            input_precision=self.input_precision,
        )

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """The alignment + uniformity loss of two views of the same n images::

            loss = mean_i ||z_a^_i - z_b^_i||^alpha
                   + uniformity_weight * (L_unif(Z_a; t) + L_unif(Z_b; t)) / 2
            L_unif(Z; t) = log( (1/(n (n - 1))) sum_{i != j} exp(-t ||z_i^ - z_j^||^2) )

        Args:
            z_a, z_b: raw projector outputs ``(n, q)`` of the two views, n >= 2, same shape and
                device, any float dtype (rows are L2-normalised inside unless ``normalize=False``).

        Returns:
            The loss, a 0-dim float32 tensor (float64 for float64 inputs).  For the terms, call
            :meth:`forward_components`.

        Example::

            criterion = AlignUniformLoss()
            for x1, x2 in loader:
                loss = criterion(model(x1), model(x2))
                optimizer.zero_grad(); loss.backward(); optimizer.step()
        """
        return self._compute(z_a, z_b).loss

    def forward_components(self, z_a: Tensor, z_b: Tensor) -> KF.AlignUniformComponents:
        """Same arguments and single pass as :meth:`forward`; returns
        :class:`~kernelssl.functional.AlignUniformComponents` (``loss``, ``alignment``,
        ``uniformity_a``, ``uniformity_b``), 0-dim tensors, no host sync.  ``out.loss.backward()``
        trains.

        Example::

            out = criterion.forward_components(z1, z2)
            out.loss.backward()
            log(align=out.alignment.item(), unif=(out.uniformity_a + out.uniformity_b).item() / 2)
        """
        return self._compute(z_a, z_b)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, t={self.t}, uniformity_weight={self.uniformity_weight}, "
            f"normalize={self.normalize}, backend={self.backend!r}"
        )
