"""``gather_distributed=True`` under DistributedDataParallel (kernelssl/distributed.py; docs/training.md).

One 2-process CPU ``gloo`` group (spawned once, 127.0.0.1 only, bounded at 120 s) runs every case;
each rank saves its loss and gradients, and the tests compare them here with ONE process holding the
concatenated global batch:

* every rank's loss equals the single-process loss, and
* every parameter gradient after DDP's averaging equals the single-process gradient (the model's
  parameters and, for HSIC with ``learn_scale=True``, the kernel scale's).

Both even (5 + 5 rows) and uneven (6 + 3 rows: padded for the collective) local batches; and inputs
that cannot be gathered (feature dims or dtypes differing across ranks, an HSIC generator seeded by
rank) raise a ValueError naming every rank's value, on every rank.  Everything in float64.

Tolerance: rtol 1e-9, atol 1e-11.  The distributed computation is the same arithmetic on the same
numbers except for summation order (DDP's average of two partial gradients vs one backward over all
rows, and the gather backward's all-to-all sum), i.e. a few float64 roundings, ~1e-15 relative; 1e-9
leaves six orders of margin and still catches any scaling bug (a missing factor W = 2 is an error of
0.5).
"""
from __future__ import annotations

import datetime
import gc
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import kernelssl.functional as KF
from helpers import assert_close
from kernelssl.losses import AlignUniformLoss, HSICLoss, MECLoss, SFRIKLoss, UniformityLoss

F64 = torch.float64
WORLD = 2
TIMEOUT_S = 120
RTOL, ATOL = 1e-9, 1e-11
# A multi-process run (spawning the group costs ~8 s): the slow tier, `pytest tests -m slow`.
pytestmark = pytest.mark.slow

LOSSES = {
    # small sizes; HSIC with the reference's K = 4 views (2 online + 2 target) and a learned scale
    "hsic": lambda gather: HSICLoss(num_features=16, normalize=True, learn_scale=True, seed=3,
                                    gather_distributed=gather, backend="torch"),
    "sfrik": lambda gather: SFRIKLoss(sim_weight=50.0, gather_distributed=gather, backend="torch"),
    "mec": lambda gather: MECLoss(eps_sq=4.0, gather_distributed=gather, backend="torch"),
    "mec_no_targets": lambda gather: MECLoss(eps_sq=4.0, gather_distributed=gather, backend="torch"),
    # the functional form, with a user generator seeded alike on every rank
    "hsic_functional": lambda gather: _Fn(
        lambda z1, z2: KF.ssl_hsic_loss([z1, z2], num_features=16, generator=torch.Generator().manual_seed(4),
                                        gather_distributed=gather, backend="torch")
    ),
    # Wang & Isola: both terms on the global batch; the single-view module through the functional form
    "align_uniform": lambda gather: AlignUniformLoss(uniformity_weight=0.7, gather_distributed=gather, backend="torch"),
    "uniformity": lambda gather: _Fn(
        lambda z1, z2: KF.uniformity(z1, 3.0, gather_distributed=gather) + UniformityLoss(
            t=3.0, gather_distributed=gather, backend="torch")(z2)
    ),
}
SPLITS = {"even": (5, 5), "uneven": (6, 3)}
CASES = [(loss, split) for loss in LOSSES for split in SPLITS if not (loss == "mec_no_targets" and split == "uneven")]


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 8)).to(F64)


def _run_case(loss_name: str, sizes: tuple[int, ...], rank: int, distributed: bool) -> dict:
    """One training step on rank ``rank``'s shard (``sizes[rank]`` rows); ``distributed=False`` with
    ``sizes = (n,)`` is the single-process reference on the whole batch."""
    model, teacher = _mlp(0), _mlp(1)
    g = torch.Generator().manual_seed(2)
    n = sum(sizes)
    x1, x2 = torch.randn(n, 6, generator=g, dtype=F64), torch.randn(n, 6, generator=g, dtype=F64)
    lo = sum(sizes[:rank])
    x1, x2 = x1[lo : lo + sizes[rank]], x2[lo : lo + sizes[rank]]
    net = DDP(model) if distributed else model
    crit = LOSSES[loss_name](distributed)
    z1, z2 = net(torch.cat([x1, x2])).split(sizes[rank])  # one forward for both views (one DDP pass)
    with torch.no_grad():
        t1, t2 = teacher(x1), teacher(x2)
    if loss_name == "hsic":
        loss = crit(z1, z2, t2, t1)
    elif loss_name == "sfrik":
        loss = crit(z1, z2)
    elif loss_name == "mec":
        loss = crit(z1, z2, t1, t2)
    else:
        loss = crit(z1, z2)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()] + [p.grad.clone() for p in crit.parameters()]
    return {"loss": loss.detach().clone(), "grads": grads}


def _error_cases(rank: int) -> dict:
    """Inputs the gather must reject on every rank (no rank left hanging in a collective)."""
    out = {}
    q = 8 if rank == 0 else 7  # feature dims differ across ranks
    try:
        SFRIKLoss(gather_distributed=True)(torch.randn(4, q, dtype=F64), torch.randn(4, q, dtype=F64))
    except ValueError as e:
        out["shape"] = str(e)
    dt = F64 if rank == 0 else torch.float32  # dtypes differ across ranks
    try:
        MECLoss(gather_distributed=True)(torch.randn(4, 8, dtype=dt), torch.randn(4, 8, dtype=dt))
    except ValueError as e:
        out["dtype"] = str(e)
    z = torch.randn(4, 8, dtype=F64)
    try:  # a generator seeded by rank: the random features would differ across ranks
        HSICLoss(num_features=8, gather_distributed=True)(z, z + 1, generator=torch.Generator().manual_seed(rank))
    except ValueError as e:
        out["generator"] = str(e)
    return out


def _worker(rank: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    # gloo's own connections on the loopback interface only (not the host's external address)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        results = {case: _run_case(case[0], SPLITS[case[1]], rank, True) for case in CASES}
        results["errors"] = _error_cases(rank)
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        # The first DDP(...) imports torch._dynamo, and an import-time frame cycle in torch
        # (torch.fx's `wrap`) keeps _run_case's frame -- its autograd graph, whose all_gather node
        # holds the process group -- alive until the cyclic GC runs.  Without this collect, the group
        # outlives destroy_process_group, is freed in interpreter teardown, and gloo's threads abort
        # the process (SIGABRT, "terminate called without an active exception"): 13 of 90 runs here.
        gc.collect()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(outdir) -> None:
    ctx = mp.start_processes(_worker, args=(_free_port(), str(outdir)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):  # raises ProcessRaisedException with the rank's traceback
            if time.monotonic() > deadline:
                raise AssertionError(f"the {WORLD}-process gloo group did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build of torch")
    outdir = tmp_path_factory.mktemp("ddp")
    _run_group(outdir)
    return [torch.load(outdir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("loss_name,split", CASES)
def test_ddp_matches_single_process(ranks, loss_name, split):
    sizes = SPLITS[split]
    ref = _run_case(loss_name, (sum(sizes),), 0, False)
    for r, res in enumerate(ranks):
        got = res[(loss_name, split)]
        assert got["loss"].dtype == F64
        assert_close(got["loss"], ref["loss"], rtol=RTOL, atol=ATOL, name=f"rank {r} loss")
        assert len(got["grads"]) == len(ref["grads"])
        for i, (a, e) in enumerate(zip(got["grads"], ref["grads"])):
            assert_close(a, e, rtol=RTOL, atol=ATOL, name=f"rank {r} grad[{i}]")
    # every rank computes the same global loss from the same gathered numbers: bitwise equal
    assert torch.equal(ranks[0][(loss_name, split)]["loss"], ranks[1][(loss_name, split)]["loss"])


def test_ddp_gradient_is_not_the_local_one(ranks):
    # Guard against a vacuous pass: the local-batch loss of rank 0's shard differs from the global one.
    local = _run_case("sfrik", (5, 5), 0, False)  # rank 0's shard, no gather
    glob = ranks[0][("sfrik", "even")]
    assert not torch.allclose(local["loss"], glob["loss"], rtol=1e-3)


def test_mismatched_shapes_dtypes_and_generators_are_rejected_on_every_rank(ranks):
    for r, res in enumerate(ranks):
        errors = res["errors"]
        assert set(errors) == {"shape", "dtype", "generator"}, f"rank {r} did not raise: {errors}"
        assert "rank 0: (4, 8)" in errors["shape"] and "rank 1: (4, 7)" in errors["shape"], errors["shape"]
        assert "rank 0: (torch.float64, torch.float64), rank 1: (torch.float32, torch.float32)" in errors["dtype"]
        assert errors["generator"].startswith("generator: expected the same value on every rank"), errors["generator"]
