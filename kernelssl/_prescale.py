"""The exact power-of-two row prescale applied before every L2 normalisation of the losses' rows."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def prescale_rows(x: Tensor) -> Tensor:
    """``x`` with every non-zero row multiplied by ``2^-floor(log2 max|x_i|)`` (its largest entry then
    lies in [1, 2); the exponent is capped so the factor stays finite for subnormal rows); zero rows
    unchanged.  For rows that are L2-normalised next: the sum of squares can neither overflow (huge
    rows) nor underflow below the normalisation's eps (rows of norm < 1e-12, which ``F.normalize``
    would leave un-normalised and the losses would read as nearly orthogonal to everything, a
    silent wrong number at a collapse towards zero).  Since the factor is an exact power of two
    (detached), the normalised row, and the gradient through it, are bitwise those of the unscaled
    row whenever that one did not overflow or underflow.  NaN/Inf rows stay non-finite.  fp16 is
    returned as is (every path squares it in fp32, which can neither overflow nor underflow at
    fp16's range).  No host sync.
    """
    if x.dtype == torch.float16:
        return x
    with torch.no_grad():
        amax = x.detach().abs().amax(dim=-1, keepdim=True)
        # zero rows: log2(0) = -inf -> factor 1; subnormal rows: cap 2^(maxexp - 2), still exact
        cap = float(math.frexp(torch.finfo(x.dtype).max)[1] - 2) if x.is_floating_point() else 0.0
        e = (-torch.floor(torch.log2(amax))).clamp_max(cap)
        scale = torch.exp2(torch.where(amax > 0, e, torch.zeros_like(e)))
    return x * scale
