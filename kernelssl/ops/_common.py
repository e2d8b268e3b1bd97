"""Helpers the torch tier's ops share: dtypes, the row prescale, unit rows and their Jacobian, Gram blocks."""
from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "NORM_EPS",
    "DEFAULT_BLOCK_BYTES",
    "upcast",
    "compute_dtype",
    "promote",
    "prescale_rows",
    "row_prescale",
    "PLAIN_NORM_RANGE",
    "norms_in_plain_range",
    "unit_rows",
    "unit_rows_backward",
    "default_block_size",
    "buffer_view",
    "WORKSPACE_MAX_ELEMENTS",
    "workspace",
    "workspace_stamp",
    "still_written",
    "gradient_in_forward",
    "recorded_backward",
]

NORM_EPS = 1e-12  #: the ``F.normalize`` default: ``z / max(||z||, NORM_EPS)``

#: Target bytes of one ``(T, T)`` Gram block of the blocked torch paths: 16 MiB (T = 2048 in float32,
#: 1440 in float64; two such buffers are live).  Measured on this project's 2-core EPYC (2 MiB L2,
#: 32 MiB L3), fp32, n = 4096, q = 128, forward+backward of one view: on one thread T = 1024 and 2048
#: are within ~10% (0.7x and 0.75x of the two n x n x q GEMMs); with two threads on a loaded machine
#: every op pays a parallel-region wake-up, so fewer, larger blocks win (T = 2048 1.7x faster than 1024).
DEFAULT_BLOCK_BYTES = 1 << 24


def upcast(z: Tensor) -> Tensor:
    """fp16/bf16 -> fp32 (differentiable: the gradient comes back in the input dtype); others kept."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (half and bfloat16 accumulate in float32)."""
    dt = functools.reduce(torch.promote_types, (x.dtype for x in xs))
    return torch.float64 if dt == torch.float64 else torch.float32


def promote(*xs: Tensor) -> list[Tensor]:
    """The tensors cast to their promoted dtype (no copy for those already in it)."""
    if all(x.dtype == xs[0].dtype for x in xs):
        return list(xs)
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in xs))
    return [x.to(dtype) for x in xs]


def traced_or_transformed() -> bool:
    """Whether this call is traced by ``torch.compile`` or runs under a ``torch.func`` transform: then no
    buffer is kept between calls and the small Functions that keep a user's tensor for autograd's
    in-place check give way to plain ops (Dynamo refuses their custom jvp)."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def stack_views(views: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """``torch.stack`` of ``views`` cast to ``dtype``, keeping the views themselves for autograd's in-place
    check (a plain stack saves nothing: a view changed in place after the forward would go unnoticed, and
    the library's ops after it see only the stacked copy)."""
    if traced_or_transformed() or not (torch.is_grad_enabled() and any(v.requires_grad for v in views)):
        return torch.stack([v.to(dtype) for v in views])
    return _StackViews.apply(dtype, *views)


class _StackViews(torch.autograd.Function):
    """:func:`stack_views` with a gradient: the views saved for the check, each gradient cast back to
    its view's dtype."""

    @staticmethod
    def forward(dtype: torch.dtype, *views: Tensor) -> Tensor:  # type: ignore[override]
        return torch.stack([v.to(dtype) for v in views])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[1:])
        ctx.save_for_forward(*inputs[1:])
        ctx.dtype, ctx.dtypes = inputs[0], [v.dtype for v in inputs[1:]]

    @staticmethod
    def jvp(ctx, dtype_t, *tangents: Tensor | None) -> Tensor:  # type: ignore[override]
        # forward-mode AD (torch.autograd.forward_ad); a view without a tangent contributes zeros
        return torch.stack([(torch.zeros_like(v) if t is None else t).to(ctx.dtype)
                            for t, v in zip(tangents, ctx.saved_tensors)])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        _ = ctx.saved_tensors  # the check: raises if a view was changed in place since the forward
        return None, *(g.to(dt) for g, dt in zip(grad.unbind(0), ctx.dtypes))


def prescale_rows(x: Tensor) -> Tensor:
    """``x`` with every non-zero row multiplied by ``2^-(floor(log2 max|x_i|) + 1)`` (its largest entry
    then lies in [0.5, 1); the exponent is capped so the factor stays finite for subnormal rows); zero rows
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
    factor = row_prescale(x)
    if traced_or_transformed():
        return x * factor  # no in-place check to keep (Dynamo refuses a custom jvp)
    return _Prescale.apply(x, factor)


class _Prescale(torch.autograd.Function):
    """``x * factor`` for a detached ``factor`` that keeps ``x`` for autograd's check: an ``x`` changed in
    place after the forward raises in the backward, as it would in plain autograd (a plain multiply by a
    constant saves only the constant, and the ops after it see only the library's copies)."""

    @staticmethod
    def forward(x: Tensor, factor: Tensor) -> Tensor:  # type: ignore[override]
        return x * factor

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def jvp(ctx, x_t: Tensor, factor_t) -> Tensor:  # type: ignore[override]
        return x_t * ctx.saved_tensors[1]  # forward-mode AD (torch.autograd.forward_ad); the factor is a constant

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        _, factor = ctx.saved_tensors  # the check: raises if x was changed in place since the forward
        return grad * factor, None


_PRESCALE_CAP: dict = {}  # dtype -> the largest exponent row_prescale uses


def row_prescale(x: Tensor) -> Tensor:
    """The detached factors of :func:`prescale_rows`: ``(..., 1)``, exact powers of two."""
    with torch.no_grad():
        x = x.detach()  # |x| in a scratch tensor (workspace): no fresh temporary of x's size
        if torch._C._are_functorch_transforms_active():  # out= has no batching rule
            amax = x.abs().amax(dim=-1, keepdim=True)
        else:
            amax = torch.abs(x, out=workspace(x.shape, x, 2)).amax(dim=-1, keepdim=True)
        # amax = m 2^e with m in [0.5, 1): the factor 2^-e.  A zero row has e = 0 (factor 1: its gradient,
        # F.normalize's g / eps, is kept), a NaN/Inf row too (it stays non-finite); subnormal rows: capped
        # at 2^(maxexp - 2), still exact
        cap = _PRESCALE_CAP.get(x.dtype)
        if cap is None:
            cap = _PRESCALE_CAP[x.dtype] = math.frexp(torch.finfo(x.dtype).max)[1] - 2
        e = torch.frexp(amax)[1]
        return torch.exp2(e.neg_().clamp_max_(cap).to(x.dtype))


#: Row norms that need no prescale: such a row's norm is above ``NORM_EPS`` (the clamp never acts), and its
#: sum of squares neither overflows (it is at most 2^80) nor, in a row of up to 2^24 entries, loses more
#: than 2^-47 of itself to squares below float32's normal range (each < 2^-126, against a sum of at least
#: 2^-78): normalising it unscaled gives the prescaled result.
PLAIN_NORM_RANGE = (2.0**-39, 2.0**40)


def norms_in_plain_range(norm: Tensor) -> bool:
    """Whether every one of these row norms (computed unscaled, in float32 or float64) is finite and in
    :data:`PLAIN_NORM_RANGE`, so that :func:`prescale_rows` would change nothing but rounding far below
    the dtype's epsilon.  Answered on the CPU only, where reading the norms is no device sync (False
    elsewhere: the callers prescale without asking); NaN gives False."""
    if norm.device.type != "cpu" or norm.numel() == 0:
        return False
    lo, hi = torch.aminmax(norm)
    return PLAIN_NORM_RANGE[0] <= lo.item() and hi.item() <= PLAIN_NORM_RANGE[1]


def unit_rows(z: Tensor) -> Tensor:
    """``F.normalize(z, dim=-1)`` in the compute dtype (fp16/bf16 upcast to fp32), differentiable."""
    return F.normalize(upcast(z), dim=-1, eps=NORM_EPS)


def unit_rows_backward(g: Tensor, zhat: Tensor, norm: Tensor, *, inplace: bool = False) -> Tensor:
    """The vector-Jacobian product of ``zhat = z / max(||z||, eps)`` with ``g = dL/dzhat``, row-wise::

        dz = (g - zhat (zhat . g)) / ||z||       (||z|| >= eps)
        dz = g / eps                              (||z|| < eps: the clamp is active, as in F.normalize)

    ``norm``: the row norms ``||z||`` with a trailing dim of 1.  ``inplace``: written over ``g``."""
    r = torch.linalg.vecdot(zhat, g).unsqueeze_(-1)  # zhat . g
    r = r.masked_fill(norm < NORM_EPS, 0.0)  # clamp active: no gradient through the norm
    out = g.addcmul_(zhat, r, value=-1.0) if inplace else torch.addcmul(g, zhat, r, value=-1.0)
    return out.div_(norm.clamp_min(NORM_EPS))


def default_block_size(n: int, dtype: torch.dtype = torch.float32) -> int:
    """Edge T of the ``(T, T)`` Gram blocks: the multiple of 32 nearest ``sqrt(DEFAULT_BLOCK_BYTES /
    itemsize)`` (2048 in float32, 1440 in float64), at most n."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    t = int(round((DEFAULT_BLOCK_BYTES / itemsize) ** 0.5 / 32.0)) * 32
    return max(1, min(n, t))


def buffer_view(buf: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous ``(rows, cols)`` tensor on the first ``rows * cols`` elements of ``buf``."""
    return buf[: rows * cols].view(rows, cols)


_WORKSPACE = threading.local()
#: Largest scratch tensor :func:`workspace` keeps (4 MiB in float32); larger ones are fresh each call.
WORKSPACE_MAX_ELEMENTS = 1 << 20


def workspace(shape: int | tuple[int, ...], like: Tensor, slot: int) -> Tensor:
    """A scratch tensor of ``shape`` (contiguous) in ``like``'s dtype and device, for temporaries that never
    leave the library (block buffers, the products of a row-wise dot).  On the CPU, up to
    ``WORKSPACE_MAX_ELEMENTS``, it is kept between calls, one per thread, ``slot``, dtype and inference mode
    (it only grows): glibc returns freed blocks of a few hundred KiB to the OS, and a fresh one costs a page
    fault per 4 KiB page on its first write (~150 us for 512 KiB on this project's VM, where a 2 x 256 x 128
    Gram takes ~300 us).  Otherwise (CUDA's caching allocator reuses its blocks; tensor subclasses such as
    fake tensors, tracing, ``torch.func`` transforms) a fresh tensor.  Every call hands the slot to a new
    writer: :func:`workspace_stamp` and :func:`still_written` tell a later reader whether what it wrote is
    still there."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = math.prod(shape)
    if not like.is_cpu or numel > WORKSPACE_MAX_ELEMENTS or type(like) is not Tensor or traced_or_transformed():
        return like.new_empty(shape)
    entry = _kept_entry(slot, like.dtype)  # [buffer, writer count, (shape, view) of the last call]
    if entry is None or entry[0].numel() < numel:
        with torch.no_grad():
            entry = _WORKSPACE.__dict__.setdefault("bufs", {})[_kept_key(slot, like.dtype)] = [
                like.new_empty(numel), 0, None]
    entry[1] += 1
    if entry[2] is None or entry[2][0] != shape:  # the same view object again for the same shape
        entry[2] = (shape, entry[0][:numel].view(shape))
    return entry[2][1]


def _kept_key(slot: int, dtype: torch.dtype) -> tuple:
    return slot, dtype, torch.is_inference_mode_enabled()


def _kept_entry(slot: int, dtype: torch.dtype) -> list | None:
    """This thread's kept buffer of :func:`workspace` for ``slot`` and ``dtype`` (and inference mode)."""
    return _WORKSPACE.__dict__.get("bufs", {}).get(_kept_key(slot, dtype))


def workspace_stamp(t: Tensor, slot: int) -> tuple | None:
    """For a scratch tensor ``t`` that a caller keeps from one call to a later one (a forward's unit rows,
    read again by its backward), taken right after the :func:`workspace` call that returned it: which
    writer holds ``slot`` now; None when ``t`` is not a kept buffer (a fresh tensor: not worth keeping).
    :func:`still_written` then says whether ``t`` still holds what was written."""
    entry = _kept_entry(slot, t.dtype)
    if entry is None or entry[0].untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
        return None
    return entry[0], entry[1]


def still_written(t: Tensor, slot: int, stamp: tuple) -> bool:
    """Whether the kept buffer ``t`` still holds what was written when ``stamp`` (:func:`workspace_stamp`)
    was taken: no later :func:`workspace` call of this thread took ``slot``."""
    entry = _kept_entry(slot, t.dtype)
    return entry is not None and entry[0] is stamp[0] and entry[1] == stamp[1]


def recorded_backward(fn, inputs: tuple, needs: tuple, grads_out: tuple) -> tuple:
    """The backward of a custom autograd Function under ``create_graph=True`` (grad mode is on inside
    the backward exactly then): ``fn(*inputs)``, the op in plain autograd, is recomputed from the saved
    inputs and differentiated with its graph recorded, so the gradient is itself differentiable -- a
    correct second derivative (at the plain-autograd form's memory) where a hand-written backward would
    hand autograd a constant.  ``needs``: ``ctx.needs_input_grad`` (one flag per input; non-tensor inputs
    are passed as they are); ``grads_out``: the upstream gradients, one per output of ``fn`` (``None``
    for an output nothing depends on).  Returns one gradient (or ``None``) per input."""
    wrt = [x for x, need in zip(inputs, needs) if need]
    with torch.enable_grad():
        outs = fn(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grads_out) if g is not None and o.requires_grad]
    if not wrt or not pairs:
        return tuple(None for _ in inputs)
    grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], create_graph=True,
                                     allow_unused=True, materialize_grads=True))
    return tuple(next(grads) if need else None for need in needs)


class _GradientInForward(torch.autograd.Function):
    """A value whose gradient is formed in the same pass as the value (the blocked Gram ops: each Gram
    block is read once, while it is in cache, for both); saves that ``(n, q)`` gradient, and the
    backward scales it by the upstream gradient.  Under ``create_graph=True`` the backward is
    :func:`recorded_backward` of ``eager`` (the op's plain-autograd form, which materialises the Gram),
    so second derivatives are correct."""

    @staticmethod
    def forward(ctx, zhat: Tensor, one_pass, want_grad: bool, eager) -> Tensor:  # type: ignore[override]
        value, grad = one_pass(zhat, want_grad)
        if grad is not None:
            ctx.save_for_backward(grad, zhat)
        ctx.eager = eager
        return value

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad, zhat = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*recorded_backward(ctx.eager, (zhat,), (True,), (grad_out,)), None, None, None)
        return grad * grad_out, None, None, None


def gradient_in_forward(one_pass, zhat: Tensor, eager) -> Tensor:
    """``value`` of ``one_pass(zhat, want_grad) -> (value, dvalue/dzhat or None)``, differentiable in
    ``zhat`` through the gradient the pass formed (:class:`_GradientInForward`); the gradient is formed
    only when autograd will ask for it (grad mode on and ``zhat`` requires grad).  ``eager(zhat)``: the
    same value in plain autograd, for higher derivatives."""
    return _GradientInForward.apply(zhat, one_pass, torch.is_grad_enabled() and zhat.requires_grad, eager)
