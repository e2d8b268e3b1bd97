"""The training script's recipes and command line (``python -m kernelssl.train --help``)."""
from __future__ import annotations

import argparse
import math
import os
from typing import Any

import torch

from .._checks import OneLineArgumentParser
from ..losses import LOSSES
from .data import DATASETS
from .models import ARCHS

__all__ = ["LOSSES", "RECIPES", "DATASET_DEFAULTS", "MAX_WORKERS", "LOSS_FLAGS", "UsageError", "resolve",
           "parse_args", "machine_defaults"]


class UsageError(Exception):
    """A user error found after parsing (a device, a path, a checkpoint): ``main`` prints it as one
    ``error:`` line and exits with status 2, as argparse does."""


#: The loss hyper-parameters of each loss (options whose default is None, filled from the recipe):
#: given for another loss they are refused; a resumed run must match the checkpoint's.
LOSS_FLAGS: dict[str, tuple[str, ...]] = {
    "hsic": ("num_features", "gamma", "kernel_scale", "learn_scale", "scale_lr"),
    "sfrik": ("coefficients", "sim_weight", "mmd_weight"),
    "mec": ("eps_sq", "order", "mec_warmup"),
    "uniformity": ("align_alpha", "unif_t", "unif_weight"),
}

# Range of every numeric option: (minimum, maximum, minimum included); values must be finite.
_RANGES: dict[str, tuple[float, float | None, bool]] = {
    "subset": (1, None, True), "image_size": (1, None, True), "epochs": (1, None, True),
    "batch_size": (2, None, True), "stop_after": (1, None, True), "width": (1, None, True),
    "knn_k": (1, None, True), "threads": (1, None, True), "workers": (0, None, True),
    "lr": (0, None, False), "weight_decay": (0, None, True), "warmup_epochs": (0, None, True),
    "proj_hidden": (1, None, True), "proj_dim": (2, None, True), "pred_hidden": (0, None, True),
    "ema": (0, 1, True), "num_features": (1, None, True), "gamma": (0, None, True),
    "kernel_scale": (0, None, False), "scale_lr": (0, None, False), "sim_weight": (0, None, True),
    "mmd_weight": (0, None, True), "eps_sq": (0, None, False), "order": (1, None, True),
    "mec_warmup": (0, None, True), "align_alpha": (0, None, False), "unif_t": (0, None, False),
    "unif_weight": (0, None, True), "probe_labels": (0, None, True), "probe_repeats": (1, None, True),
    "probe_c": (0, None, False), "seed": (0, 2**63 - 1, True),
}


def flag(name: str) -> str:
    """The command-line spelling of an option's attribute name."""
    return "--" + name.replace("_", "-")




# --------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------

#: Per-loss defaults for tiny images (digits, ``smallcnn`` width 16): 60 epochs of batch 64 (19
#: steps/epoch), AdamW lr 2e-3 (3 warm-up epochs, cosine), EMA target from 0.99 (cosine to 1).
#: Departures from the papers' large-scale values, measured on digits (seed 0, linear-probe margin
#: over the random-init encoder, 5 labels/class): batch 256 -> 64 (hsic +13.7 -> +14.3 points,
#: sfrik +13.4 -> +13.5, mec +10.8 -> +16.8); hsic gamma 3 -> 1 (+14.3 -> +16.6); sfrik sim_weight
#: 62.5 (the paper's 4000 q / 8192 at q = 128) -> 250 (+13.5 -> +15.7); mec eps_sq stays 64
#: (16 and 32 push the spectral radius of C past 1 and lose; 128 gives +15.1).
RECIPES: dict[str, dict[str, Any]] = {
    "hsic": dict(
        epochs=60, batch_size=64, lr=2e-3, weight_decay=1e-4, warmup_epochs=3,
        proj_hidden=256, proj_dim=64, pred_hidden=256, ema=0.99,
        num_features=512, gamma=1.0, kernel_scale=1.0, learn_scale=True, scale_lr=3e-4,
    ),
    "sfrik": dict(
        epochs=60, batch_size=64, lr=2e-3, weight_decay=1e-4, warmup_epochs=3,
        proj_hidden=256, proj_dim=128, pred_hidden=0, ema=None,
        coefficients=(1.0, 40.0, 40.0), sim_weight=250.0, mmd_weight=1.0,
    ),
    "mec": dict(
        epochs=60, batch_size=64, lr=2e-3, weight_decay=1e-4, warmup_epochs=3,
        proj_hidden=256, proj_dim=128, pred_hidden=256, ema=0.99,
        eps_sq=64.0, order=4, mec_warmup=None,
    ),
    "uniformity": dict(
        epochs=60, batch_size=64, lr=2e-3, weight_decay=1e-4, warmup_epochs=3,
        proj_hidden=256, proj_dim=128, pred_hidden=0, ema=None,
        align_alpha=2.0, unif_t=2.0, unif_weight=1.0,
    ),
}

#: Per-dataset overrides of :data:`RECIPES` (natural images: ResNet-18, longer runs, batch 256, wider
#: heads, the papers' gamma and q-scaled sim_weight).  Not tuned here (no dataset on the CI machine).
#: ``width`` is used by ``--arch smallcnn`` only.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(arch="smallcnn", width=16, probe_labels=5, probe_repeats=5),
    "cifar10": dict(arch="resnet18", width=32, epochs=200, batch_size=256, lr=1e-3, weight_decay=1e-5,
                    warmup_epochs=10, proj_hidden=2048, probe_labels=0, probe_repeats=1),
    "stl10": dict(arch="resnet18", width=32, epochs=200, batch_size=256, lr=1e-3, weight_decay=1e-5,
                  warmup_epochs=10, proj_hidden=2048, probe_labels=0, probe_repeats=1),
    "imagefolder": dict(arch="resnet18", width=32, epochs=200, batch_size=256, lr=1e-3, weight_decay=1e-5,
                        warmup_epochs=10, proj_hidden=2048, probe_labels=0, probe_repeats=1),
}
#: Most data-loader workers by default (``--workers`` unset): digits are tensors already, natural
#: images are decoded and augmented per item.  The default never exceeds the cores left to each
#: process after one compute thread (:func:`machine_defaults`).
MAX_WORKERS = {"digits": 1, "cifar10": 4, "stl10": 4, "imagefolder": 4}
_NATURAL_DIMS = {"hsic": dict(proj_dim=256, pred_hidden=2048, gamma=3.0),
                 "sfrik": dict(proj_dim=2048, sim_weight=None),
                 "mec": dict(proj_dim=2048, pred_hidden=512),
                 "uniformity": dict(proj_dim=128)}  # Wang & Isola's feature dim


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every ``None`` option from the recipe of ``args.loss`` and the defaults of ``args.dataset``."""
    table = dict(RECIPES[args.loss])
    table.update(DATASET_DEFAULTS[args.dataset])
    if args.dataset != "digits":
        table.update(_NATURAL_DIMS[args.loss])
    for key, value in table.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.loss in ("sfrik", "uniformity"):
        args.pred_hidden = 0  # the projections of both views: no predictor, no target
        args.ema = None
    if args.loss == "sfrik" and args.sim_weight is None:
        args.sim_weight = 4000.0 * args.proj_dim / 8192.0
    if args.loss == "mec" and args.mec_warmup is None:
        # the reference warms up over 10 of its (>= 100) epochs; keep that fraction for short runs
        args.mec_warmup = min(10.0, 0.1 * args.epochs)
    args.coefficients = tuple(float(c) for c in args.coefficients) if args.coefficients is not None else None
    return args


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m kernelssl.train",
        description="Self-supervised pretraining with SSL-HSIC, SFRIK, MEC or alignment + uniformity, then "
        "linear-probe and k-NN "
        "evaluation against a random-init encoder.  Options left unset come from the per-loss recipe.",
    )
    a = p.add_argument
    a("--loss", choices=LOSSES, default="hsic", help="the self-supervised loss (default hsic)")
    a("--dataset", choices=DATASETS, default="digits", help="default digits (bundled with scikit-learn, offline)")
    a("data", nargs="?", default=None, metavar="PATH",
      help="dataset root (cifar10/stl10) or image folder (imagefolder): the same as --data-dir PATH")
    a("--data-dir", default=None,
      help="dataset root (cifar10/stl10) or image folder (imagefolder); default $KERNELSSL_DATA or ./data")
    a("--download", action="store_true", help="download cifar10/stl10 into --data-dir if missing")
    a("--subset", type=int, default=None, help="use only the first N images for pretraining and probe training")
    a("--image-size", type=int, default=None, help="crop size (default: 8 digits, 32 cifar10, 64 stl10/imagefolder)")
    a("--out", default="runs/kernelssl", help="output directory (checkpoint.pt, log.csv, results.json)")
    a("--seed", type=int, default=0)
    a("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    a("--stop-after", type=int, default=None, metavar="N",
      help="stop after N epochs in this invocation (checkpoint written; continue later with --resume)")
    # optimisation
    a("--arch", choices=ARCHS, default=None, help="backbone (default: smallcnn on digits, resnet18 otherwise)")
    a("--width", type=int, default=None, help="smallcnn base width (features = 4 * width)")
    a("--epochs", type=int, default=None)
    a("--batch-size", type=int, default=None, help="global batch size (images per view)")
    a("--lr", type=float, default=None, help="peak AdamW learning rate (linear warm-up, cosine decay)")
    a("--weight-decay", type=float, default=None)
    a("--warmup-epochs", type=float, default=None, help="learning-rate warm-up epochs")
    a("--proj-hidden", type=int, default=None, help="projector hidden width")
    a("--proj-dim", type=int, default=None, help="projector output dim (the embedding dim of the loss)")
    a("--pred-hidden", type=int, default=None, help="predictor hidden width (hsic, mec)")
    a("--ema", type=float, default=None, help="base EMA momentum of the target (cosine to 1; hsic, mec)")
    # loss hyper-parameters
    a("--num-features", type=int, default=None, help="hsic: random Fourier features D")
    a("--gamma", type=float, default=None, help="hsic: weight of sqrt(HSIC(Z,Z))")
    a("--hsic-kernel", choices=("imq", "gaussian", "laplace"), default="imq",
      help="hsic: kernel family (default imq, the paper's)")
    a("--hsic-exact", type=int, choices=(0, 1), default=0,
      help="hsic: 1 = the exact kernel (N x N Gram of the batch) instead of random features (0, the paper's); "
           "laplace needs it (its random-feature gradient has infinite variance)")
    a("--kernel-scale", type=float, default=None, help="hsic: kernel scale c (initial value when learned)")
    a("--learn-scale", type=int, choices=(0, 1), default=None, help="hsic: learn c (1) or keep it fixed (0)")
    a("--scale-lr", type=float, default=None, help="hsic: Adam lr of the learned scale")
    a("--coefficients", type=float, nargs="+", default=None, help="sfrik: Legendre coefficients b_1..b_L")
    a("--sim-weight", type=float, default=None, help="sfrik: weight of the MSE term (default 4000 q / 8192)")
    a("--mmd-weight", type=float, default=None, help="sfrik: weight of the uniformity term")
    a("--eps-sq", type=float, default=None, help="mec: distortion epsilon^2")
    a("--order", type=int, default=None, help="mec: Taylor order")
    a("--mec-warmup", type=float, default=None, help="mec: lambda warm-up epochs (default min(10, epochs/10))")
    a("--align-alpha", type=float, default=None, help="uniformity: alpha of the alignment term (default 2)")
    a("--unif-t", type=float, default=None, help="uniformity: t of the uniformity term (default 2)")
    a("--unif-weight", type=float, default=None, help="uniformity: weight lambda of the uniformity term (default 1)")
    a("--mec-check", choices=("off", "warn", "raise"), default="off",
      help="mec: warn or stop when the series diverges (spectral radius of C >= 1; one host sync per step). "
           "The radius is logged either way (log.csv: spectral_radius, the epoch mean, and spectral_radius_max)")
    # evaluation
    a("--probe-labels", type=int, default=None,
      help="labelled images per class for the probes (0 = all; default 5 on digits, else 0)")
    a("--probe-repeats", type=int, default=None, help="draws of the labelled subset (fixed seeds 0..R-1)")
    a("--probe-c", type=float, default=1.0, help="inverse L2 strength of the logistic-regression probe")
    a("--knn-k", type=int, default=20)
    # machinery
    a("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    a("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype for the network")
    a("--threads", type=int, default=None, help="torch intra-op threads (default: cores / processes - workers)")
    a("--workers", type=int, default=None,
      help="data-loader worker processes (default: cores per process - 1, at most 1 on digits and 4 otherwise)")
    a("--backend", choices=("auto", "torch", "triton"), default="auto", help="kernelssl backend of the loss")
    a("--no-progress", action="store_true", help="no tqdm bar (it is off anyway when stderr is not a tty)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and resolve the command line (recipe defaults filled in)."""
    p = _parser()
    args = p.parse_args(argv)
    if args.data is not None and args.data_dir is not None and args.data != args.data_dir:
        p.error(f"PATH {args.data!r} and --data-dir {args.data_dir!r} differ: give one of them")
    args.data_dir = args.data or args.data_dir or os.environ.get("KERNELSSL_DATA", "data")
    for name, (lo, hi, closed) in _RANGES.items():
        v = getattr(args, name)
        if v is None:
            continue
        ok = math.isfinite(v) and (v >= lo if closed else v > lo) and (hi is None or v <= hi)
        if not ok:
            span = f"in [{lo}, {hi}]" if hi is not None else f"{'>=' if closed else '>'} {lo}"
            p.error(f"{flag(name)} must be a finite number {span}, got {v}")
    if args.coefficients is not None and not all(math.isfinite(c) for c in args.coefficients):
        p.error(f"--coefficients must be finite numbers, got {' '.join(map(str, args.coefficients))}")
    other = [flag(n) for loss, names in LOSS_FLAGS.items() if loss != args.loss for n in names
             if getattr(args, n) is not None]
    if args.loss in ("sfrik", "uniformity"):  # no predictor, no target
        other += [flag(n) for n in ("ema", "pred_hidden") if getattr(args, n) is not None]
    defaults = {"hsic": (("hsic_kernel", "imq"), ("hsic_exact", 0)), "mec": (("mec_check", "off"),)}
    other += [flag(n) for loss, pairs in defaults.items() if loss != args.loss for n, d in pairs
              if getattr(args, n) != d]
    if args.loss == "hsic" and args.learn_scale == 0 and args.scale_lr is not None:
        other.append("--scale-lr (with --learn-scale 0)")
    if other:
        p.error(f"{', '.join(other)} do(es) not apply to --loss {args.loss} (it would be ignored)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out!r} is a file, not a directory")
    if args.dataset != "digits" and os.path.isfile(args.data_dir):
        p.error(f"--data-dir {args.data_dir!r} is a file, not a directory")
    return resolve(args)


# --------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _pick_device(spec: str, local_rank: int, world: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected auto, cpu, cuda or cuda:N, got {spec!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda requested but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def machine_defaults(args: argparse.Namespace, cores: int, local_world: int) -> tuple[int, int]:
    """``(workers, threads)`` for this process: ``--workers`` if given, else
    ``min(MAX_WORKERS[dataset], cores per process - 1)`` (so a 2-core machine gets 1 worker, a 1-core
    machine none); ``--threads`` if given, else the cores per process left after the workers (>= 1)."""
    per_process = max(1, cores // max(1, local_world))
    workers = args.workers if args.workers is not None else min(MAX_WORKERS[args.dataset], per_process - 1)
    threads = args.threads or max(1, per_process - workers)
    return workers, threads
