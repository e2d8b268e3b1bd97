"""Gathering the global batch across data-parallel ranks (docs/api.md, "Distributed").

With ``gather_distributed=True`` every loss computes **every term on the global batch**: each rank
gathers the embeddings of all ranks (rank order, i.e. the concatenation ``[rank 0 rows, rank 1 rows,
...]``) and evaluates the loss on them.  Contract:

* every rank's loss equals the loss of one process holding the global batch, and
* after DistributedDataParallel averages the gradients, the parameter gradients equal that
  process's gradients.

Why the second holds.  Let ``L(Z)`` be the loss of the global batch ``Z = [Z_0; ...; Z_{W-1}]`` and
rank r's embeddings ``Z_r = f_theta(X_r)``.  Every rank computes the same ``L``, so rank s's backward
produces ``dL/dZ_r`` for every block r.  The gather used here
(:func:`torch.distributed.nn.functional.all_gather`) has a backward that **sums** the gradients of
block r over the ranks (reduce-scatter with SUM on NCCL, all-to-all + sum elsewhere), so rank r
receives ``W * dL/dZ_r`` and its parameter gradient is ``W * (dL/dZ_r)(dZ_r/dtheta)``.  DDP averages:
``(1/W) sum_r W (dL/dZ_r)(dZ_r/dtheta) = dL/dtheta``, the single-process gradient.  (A gather whose
backward keeps only the local block -- e.g. ``dist.all_gather`` on detached tensors plus re-inserting
the local tensor -- would give ``dL/dtheta / W`` after averaging: wrong by a factor W.)

Uneven batches (e.g. the last batch of an epoch split unevenly) are **handled**: the ranks first
exchange a small metadata vector (one int64 all-gather: the shape of the local batch and any
values that must agree across ranks), pad every block to the largest size along the batch dim,
gather, and drop the padding.  The padding rows never enter the loss, and their gradient is
discarded.  Shapes that differ in any other dim raise a ``ValueError`` naming every rank's shape,
on every rank (the metadata is known everywhere, so no rank is left hanging in a collective); so do
dtypes that differ across ranks.

Cost: one tiny metadata all-gather (and a host read of it: **one host sync per loss call**, the
price of supporting uneven batches and of the consistency checks) plus one all-gather of the
embeddings (all tensors of one dtype and shape stacked into a single collective).  The backward
adds one reduce-scatter (or all-to-all).  Every rank must call the loss the same number of times in
the same order, as with any collective, and each rank's local batch must pass the loss's own input
checks (e.g. at least 2 rows).

When ``torch.distributed`` is unavailable or not initialised, or the world size is 1, gathering is
the identity (no collective, no sync).  The gather runs outside ``torch.compile`` graphs
(``torch.compiler.disable``): a compiled step with ``gather_distributed=True`` breaks the graph
there; ``fullgraph=True`` therefore refuses it (compile the model, or the loss without gathering).
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["world_size", "gather_batch", "generator_fingerprint"]

Tensor = torch.Tensor

_MAX_DIMS = 8  # tensors of up to 8 dims (the losses use 2-D and 3-D)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_CODES = {dt: i for i, dt in enumerate(_DTYPES)}


def world_size() -> int:
    """The default process group's world size, or 1 when ``torch.distributed`` is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def generator_fingerprint(generator: torch.Generator | None) -> int:
    """A 32-bit checksum (CRC32) of ``generator``'s state (the CPU default generator when None).

    Read on the host (``get_state()`` is host memory for CPU and CUDA generators: no device sync).
    :func:`gather_batch` compares it across ranks so that random features drawn after the gather are
    identical on every rank.
    """
    gen = torch.default_generator if generator is None else generator
    return zlib.crc32(gen.get_state().numpy().tobytes())


def _collective_device(t: Tensor) -> torch.device:
    # gloo collectives run on CPU tensors; every other backend (NCCL, ...) on the tensors' device.
    return torch.device("cpu") if dist.get_backend() == "gloo" else t.device


def gather_batch(
    tensors: Sequence[Tensor],
    *,
    dim: int = 0,
    names: Sequence[str] | None = None,
    consensus: Sequence[tuple[str, int]] = (),
) -> list[Tensor]:
    """All-gather the batch dim ``dim`` of every tensor across the default process group.

    Args:
        tensors: tensors of one shape (the losses check this first), the local batch along ``dim``.
        dim: the batch dim (0 for ``(n, q)`` embeddings, 1 for HSIC's ``(K, B, d)`` views).
        names: argument names for error messages (default ``tensor[i]``).
        consensus: ``(name, value)`` pairs of Python ints that must be equal on every rank (e.g. the
            :func:`generator_fingerprint` of the generator that draws HSIC's random features);
            a difference raises a ``ValueError`` on every rank.

    Returns:
        The gathered tensors, same order, each of size ``sum_r n_r`` along ``dim`` (rank order),
        differentiable: the backward sums each block's gradient over the ranks (module docstring).
        With world size 1 (or no process group) the inputs themselves.
    """
    tensors = list(tensors)
    ws = world_size()
    if ws == 1 or not tensors:
        return tensors
    global _gather_outside_compile
    if _gather_outside_compile is None:
        # Created on first use: torch.compiler.disable imports torch._dynamo (and with it Triton),
        # which ``import kernelssl`` must not do.
        _gather_outside_compile = torch.compiler.disable(_gather)
    return _gather_outside_compile(tensors, ws, dim, names, consensus)


_gather_outside_compile = None


def _gather(tensors: list[Tensor], ws: int, dim: int, names, consensus) -> list[Tensor]:
    names = list(names) if names is not None else [f"tensor[{i}]" for i in range(len(tensors))]
    ref = tensors[0]
    if ref.dim() > _MAX_DIMS:
        raise ValueError(f"{names[0]}: expected at most {_MAX_DIMS} dims to gather, got shape {tuple(ref.shape)}")
    dim = dim % ref.dim()
    for t, n in zip(tensors[1:], names[1:]):
        if t.shape != ref.shape:
            raise ValueError(
                f"{n}: expected the shape of {names[0]} {tuple(ref.shape)} to gather, got {tuple(t.shape)}"
            )

    # 1. metadata: [ndim, shape padded with -1, dtype codes, consensus values], one int64 all-gather,
    #    read on the host.
    codes = [_DTYPE_CODES.get(t.dtype, -1) for t in tensors]
    meta_local = [ref.dim(), *ref.shape, *([-1] * (_MAX_DIMS - ref.dim())), *codes, *(int(v) for _, v in consensus)]
    dev = _collective_device(ref)
    meta = torch.tensor(meta_local, dtype=torch.int64, device=dev)
    metas = [torch.empty_like(meta) for _ in range(ws)]
    dist.all_gather(metas, meta)
    rows = torch.stack(metas).tolist()  # the one host sync
    shapes = [tuple(r[1 : 1 + r[0]]) for r in rows]
    other = [s[:dim] + s[dim + 1 :] for s in shapes]
    if any(s != other[0] or len(shapes[i]) != len(shapes[0]) for i, s in enumerate(other)):
        raise ValueError(
            f"{names[0]}: expected the same shape on every rank except in the batch dim {dim} "
            f"(gather_distributed=True), got shapes {', '.join(f'rank {i}: {s}' for i, s in enumerate(shapes))}"
        )
    k = 1 + _MAX_DIMS
    dtypes = [tuple(r[k : k + len(tensors)]) for r in rows]
    if any(c != dtypes[0] for c in dtypes):
        got = ", ".join(
            f"rank {i}: ({', '.join(str(_DTYPES[j]) if j >= 0 else '?' for j in c)})" for i, c in enumerate(dtypes)
        )
        raise ValueError(
            f"{', '.join(names)}: expected the same dtypes on every rank (gather_distributed=True), got {got}"
        )
    k += len(tensors)
    for j, (cname, _) in enumerate(consensus):
        vals = [r[k + j] for r in rows]
        if any(v != vals[0] for v in vals):
            raise ValueError(
                f"{cname}: expected the same value on every rank (gather_distributed=True), got "
                f"{', '.join(f'rank {i}: {v}' for i, v in enumerate(vals))}"
            )
    sizes = [s[dim] for s in shapes]

    # 2. one autograd-aware all-gather per dtype (tensors of one dtype stacked together).
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    out: list[Tensor | None] = [None] * len(tensors)
    for idx in groups.values():
        if len(idx) == 1:
            x, d = tensors[idx[0]], dim
        else:
            x, d = torch.stack([tensors[i] for i in idx]), dim + 1
        full = _all_gather_cat(x, d, sizes)
        if len(idx) == 1:
            out[idx[0]] = full
        else:
            for k, i in enumerate(idx):
                out[i] = full[k]
    return out  # type: ignore[return-value]


def _all_gather_cat(x: Tensor, dim: int, sizes: list[int]) -> Tensor:
    """Concatenation along ``dim`` of every rank's ``x`` (sizes ``sizes[r]`` along ``dim``)."""
    from torch.distributed.nn.functional import all_gather  # autograd-aware; backward sums over ranks

    top = max(sizes)
    local = x.shape[dim]
    if local < top:  # pad to the largest block: all_gather needs equal shapes
        pad_shape = list(x.shape)
        pad_shape[dim] = top - local
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    blocks = all_gather(x)
    if any(s != top for s in sizes):
        blocks = [b.narrow(dim, 0, s) for b, s in zip(blocks, sizes)]
    return torch.cat(blocks, dim=dim)
