"""What every functional entry point shares: the views of a multi-view loss, the autocast policy,
tensor hyper-parameters that are never read on the host, and the finite-value check."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .. import distributed as _dist
from .._checks import check_same_device, check_same_shape, check_tensor
from ..ops._common import stack_views

Tensor = torch.Tensor


def as_views(views: Sequence[Tensor] | Tensor, name: str = "views") -> Tensor:
    """Stack K >= 2 views ``(B, d)`` (or take one ``(K, B, d)`` tensor) into ``(K, B, d)``."""
    if isinstance(views, Tensor):
        check_tensor(views, name, ndim=3)
        stacked = views
    else:
        views = list(views)
        if len(views) == 1 and isinstance(views[0], Tensor) and views[0].dim() == 3:
            return as_views(views[0], name)
        if len(views) < 2:
            raise ValueError(
                f"{name}: expected K >= 2 views of shape (B, d) or one (K, B, d) tensor, got {len(views)} view(s)"
            )
        names = [f"{name}[{i}]" for i in range(len(views))]
        for v, n in zip(views, names):
            check_tensor(v, n, ndim=2)
        check_same_shape(views, names)
        check_same_device(views, names)
        dtype = functools.reduce(torch.promote_types, (v.dtype for v in views))
        stacked = stack_views(views, dtype)  # keeps the views for autograd's in-place check
    if stacked.shape[0] < 2:
        raise ValueError(f"{name}: expected K >= 2 views, got shape {tuple(stacked.shape)} (K = {stacked.shape[0]})")
    if stacked.shape[1] < 2:
        raise ValueError(
            f"{name}: expected a batch of B >= 2 images per view, got shape {tuple(stacked.shape)} "
            f"(B = {stacked.shape[1]})"
        )
    if stacked.shape[2] < 1:
        raise ValueError(f"{name}: expected embedding dim d >= 1, got shape {tuple(stacked.shape)}")
    return stacked


def _first_tensor(args, kwargs) -> Tensor | None:
    """The first tensor among the arguments, looking into (nested) lists and tuples."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            return a
        if isinstance(a, (list, tuple)):
            t = _first_tensor(a, {})
            if t is not None:
                return t
    return None


# Device types torch.autocast knows; asking about any other (``meta``) raises, so a meta tensor is
# treated as "autocast off" and its shapes propagate.
_AUTOCAST_DEVICE_TYPES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu", "privateuseone"})


def fp32_compute(fn):
    """Run ``fn`` with autocast disabled for its inputs' device type (the library's autocast policy).

    Inside ``torch.autocast`` a matmul would otherwise be re-cast to bf16/fp16 even after the torch
    tier upcast its inputs to float32, breaking "compute and accumulate in fp32".  Outside autocast it
    adds nothing; it traces under ``torch.compile``.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = _first_tensor(args, kwargs)
        if (t is not None and t.device.type in _AUTOCAST_DEVICE_TYPES
                and torch.is_autocast_enabled(t.device.type)):
            with torch.autocast(t.device.type, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def positive_or_nan(x: float | Tensor) -> float | Tensor:
    """A tensor hyper-parameter (c, lam) with every value <= 0 or NaN replaced by NaN -- so that a
    meaningless value turns the loss into NaN instead of a silent number -- without reading it on the
    host.  Python numbers pass through (they are validated eagerly)."""
    if isinstance(x, Tensor) and x.is_floating_point():
        return torch.where(x > 0, x, torch.full_like(x, float("nan")))
    return x


def assert_finite_hyper(x: float | Tensor, name: str) -> None:
    """``check_finite=True`` on a tensor hyper-parameter: raise unless every value is finite and > 0."""
    if isinstance(x, Tensor) and not bool(((x > 0) & torch.isfinite(x)).all()):
        raise ValueError(f"{name}: expected finite values > 0 (check_finite=True), got {x.detach().cpu().tolist()}")


def gather_views(views: Tensor, generator: torch.Generator | None | bool = False) -> Tensor:
    """HSIC's ``(K, B, d)`` views gathered over the ranks along the image dim (identity without a
    process group).  ``generator``: the generator that will draw the random features after the gather
    (None: the default CPU generator), whose state must agree on every rank; ``False``: no check."""
    if _dist.world_size() == 1:
        return views
    consensus = () if generator is False else (("generator", _dist.generator_fingerprint(generator)),)
    (views,) = _dist.gather_batch([views], dim=1, names=["views"], consensus=consensus)
    return views
