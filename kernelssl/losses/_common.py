"""What every loss module shares: the three options every loss takes, checked when it is built."""
from __future__ import annotations

from torch import nn

from .._checks import check_bool, check_choice
from ..dispatch import BACKENDS


class LossModule(nn.Module):
    """Base of the loss modules: ``gather_distributed``, ``backend`` and ``check_finite``, checked once
    here and handed to the functional form by :meth:`_options`."""

    def __init__(self, gather_distributed: bool, backend: str, check_finite: bool) -> None:
        super().__init__()
        check_choice(backend, "backend", BACKENDS)
        self.gather_distributed = check_bool(gather_distributed, "gather_distributed")
        self.backend = backend
        self.check_finite = check_bool(check_finite, "check_finite")

    def _options(self) -> dict:
        """The keyword arguments every functional loss takes, as this module holds them."""
        return dict(gather_distributed=self.gather_distributed, backend=self.backend, check_finite=self.check_finite)
