"""``python -m kernelssl.train``: self-supervised pretraining with one of the kernel losses, then a
linear probe and a k-NN probe against a randomly initialised encoder of the same architecture.

Offline by default: ``--dataset digits`` is scikit-learn's bundled 8x8 handwritten digits, so the
default run needs no download and finishes in about a minute on two CPU cores.

Losses and their recipes (:data:`RECIPES`; every entry can be overridden on the command line):

* ``hsic``  -- SSL-HSIC with a BYOL-style EMA target network and K = 4 embedding sets: the online
  predictions of views 1 and 2 and the target projections of views 2 and 1 (SPEC §1.1), L2-normalised,
  kernel scale learned by the paper's side objective (its own Adam).
* ``sfrik`` -- SFRIK on the projections of the two views, no target network (SPEC §2.3); ``sim_weight``
  250 at q = 128 on digits (4x the paper's q = 8192 value scaled to q), ``4000 * q / 8192`` otherwise.
* ``mec``   -- MEC with an EMA teacher, a predictor on the student and the reference lambda warm-up
  (``1/lam`` from ``8/lam`` to ``1/lam`` over the first ``mec_warmup`` epochs; SPEC §3.2).
* ``uniformity`` -- Wang & Isola's alignment + uniformity (SPEC §6.1): ``L_align(z1, z2) + lambda
  (L_unif(z1) + L_unif(z2)) / 2`` on the L2-normalised projections of the two views, alpha = 2, t = 2,
  lambda = 1, no target network and no predictor (as they train it).  Their STL-10 recipe (SGD,
  batch 768, lr 0.12 per 256 images, weight decay 1e-4, feature dim 128) becomes this table's
  digits recipe: batch 64 and AdamW lr 2e-3 like the other losses, weight decay 1e-4, q = 128.

Evaluation (rank 0, frozen backbone features, no augmentation): a logistic-regression linear probe
on standardised features and a cosine k-NN (k = 20, similarity-weighted votes), both trained on the
probe-training split and scored on the held-out test split.  Every run also reports the uniformity
(Wang & Isola, t = 2) of the L2-normalised test-split features, trained and random-init
(``probe_uniformity``, ``baseline_probe_uniformity``: ``log(mean_{i != j} exp(-2 ||f_i - f_j||^2))`` on
unit rows, in [-4 n/(n-1), 0]; lower is more uniform).  On digits the probe sees only
``--probe-labels`` labelled images per class (default 5), drawn ``--probe-repeats`` times (default 5)
with fixed seeds 0, 1, ... (independent of ``--seed``); the reported accuracies are means over the
draws.  With all 1257 labels a random convolutional encoder already reaches ~93 % on digits (97-98 %
at width 32) and a trained one 97-99 %: a full-label probe barely tells them apart (it is reported
too, as ``*_all_labels``).  The baseline is the online backbone at its initialisation (same seed), never
trained.

Measured on digits with the defaults (2 CPU cores, 1 compute thread + 1 augmentation worker;
seeds 0, 1, 2): linear probe 0.90-0.93 against 0.75-0.77 for the random-init encoder (raw pixels:
0.82) -- margins hsic +15.7 points on average (min +13.4), sfrik +14.5 (min +13.3), mec +15.9
(min +14.8); 61-77 s wall per run, 85-121 s CPU (user + sys, worker included).  uniformity (seeds 0, 1,
2, measured later on the machine shared with other jobs): linear probe .906 / .903 / .909 against .750 /
.756 / .766, k-NN .880 / .878 / .891 against .544 / .564 / .594; 97-110 s of user CPU per run.

Outputs in ``--out``: ``checkpoint.pt`` (every epoch, written atomically; ``--resume`` continues to
bit-identical results on CPU), ``log.csv`` (one row per epoch: the loss components), ``results.json``
(``seconds`` is the pretraining wall time summed over resumed segments, ``cpu_seconds`` the CPU time
of the main process in it -- data-loader workers not included).

Data: ``--dataset digits`` (default), ``cifar10`` / ``stl10`` (their on-disk formats under
``--data-dir``, read by :mod:`kernelssl.data`; ``--download`` fetches them) or ``imagefolder PATH``
(``python -m kernelssl.train --dataset imagefolder PATH``; PATH is the same as ``--data-dir PATH``).
``--arch smallcnn`` works on every dataset (width 32 on natural images unless ``--width``).  Loader
workers default to the cores each process has left after one compute thread (at most 1 on digits,
4 otherwise): 1 on a 2-core machine, 0 on one core.

MEC's convergence: the estimated spectral radius of C is logged every epoch (``spectral_radius``, the
epoch mean, and ``spectral_radius_max``); ``--mec-check warn|raise`` also checks it at every step
(one host sync per step) and warns or stops when it reaches 1.

Distributed: ``torchrun --nproc_per_node=N -m kernelssl.train ...`` runs DDP (gloo on CPU, NCCL on
CUDA) with a DistributedSampler; ``--batch-size`` is the global batch and the loss is computed on the
gathered global batch (``gather_distributed=True``).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import __version__
from .data import DATASETS, DatasetError, DataBundle, load_dataset
from .functional import mec_lambda_warmup
from .functional import uniformity as _uniformity
from .losses import AlignUniformLoss, HSICLoss, MECLoss, SFRIKLoss
from .models import ARCHS, SSLNet, build_backbone, ema_momentum, ema_update, make_target, mlp

__all__ = ["RECIPES", "main", "parse_args"]

LOSSES = ("hsic", "sfrik", "mec", "uniformity")
CHECKPOINT_VERSION = 1

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
    p = argparse.ArgumentParser(
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
    args = _parser().parse_args(argv)
    if args.data is not None and args.data_dir is not None and args.data != args.data_dir:
        _parser().error(f"PATH {args.data!r} and --data-dir {args.data_dir!r} differ: give one of them")
    args.data_dir = args.data or args.data_dir or os.environ.get("KERNELSSL_DATA", "data")
    if args.workers is not None and args.workers < 0:
        _parser().error(f"--workers must be >= 0, got {args.workers}")
    for name in ("subset", "epochs", "batch_size", "stop_after", "width", "knn_k", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            _parser().error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
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
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda requested but no CUDA device is available")
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


# --------------------------------------------------------------------------------------------------
# RNG and checkpoint state (tensors and primitive containers only: torch.load(weights_only=True))
# --------------------------------------------------------------------------------------------------


def _rng_state(loader_gen: torch.Generator, loss_gen: torch.Generator | None) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
        "loader": loader_gen.get_state(),
        "loss": loss_gen.get_state() if loss_gen is not None else None,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], loader_gen: torch.Generator, loss_gen: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    loader_gen.set_state(state["loader"])
    if loss_gen is not None and state["loss"] is not None:
        loss_gen.set_state(state["loss"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save(obj: Any, path: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write_bytes(path, buf.getvalue())


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    _atomic_write_bytes(path, buf.getvalue().encode())


#: Options that must match between a checkpoint and a resumed run (``epochs`` may grow, which changes
#: the schedules: the result is then no longer the one a single run would give).
_RESUME_KEYS = ("loss", "dataset", "subset", "image_size", "arch", "width", "batch_size", "lr", "weight_decay",
                "warmup_epochs", "proj_hidden", "proj_dim", "pred_hidden", "ema", "seed", "amp",
                "hsic_kernel", "hsic_exact")
# options added after checkpoints were first written: what an older checkpoint's run used
_RESUME_DEFAULTS = {"hsic_kernel": "imq", "hsic_exact": 0}


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset, device: torch.device, batch_size: int = 512,
                     workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features (eval mode, fp32) and labels of every item of ``dataset``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for x, y in loader:
        feats.append(backbone(x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    backbone.train(was_training)
    return torch.cat(feats).numpy().astype(np.float64), torch.cat(labels).numpy()


def _label_subsets(y: np.ndarray, per_class: int, repeats: int) -> list[np.ndarray]:
    if per_class <= 0:
        return [np.arange(len(y))]
    out = []
    for r in range(repeats):
        rng = np.random.default_rng(r)
        idx = []
        for c in np.unique(y):
            members = np.flatnonzero(y == c)
            idx.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
        out.append(np.sort(np.concatenate(idx)))
    return out


def linear_probe(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, yte: np.ndarray, *, c: float = 1.0) -> float:
    """Test accuracy of an L2-regularised logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(ftr)
    clf = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(ftr), ytr)
    return float(clf.score(scaler.transform(fte), yte))


def knn_probe(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, yte: np.ndarray, *, k: int = 20,
              temperature: float = 0.07) -> float:
    """Test accuracy of a cosine k-NN classifier, votes weighted by ``exp(similarity / temperature)``."""
    a = torch.nn.functional.normalize(torch.from_numpy(ftr), dim=1)
    b = torch.nn.functional.normalize(torch.from_numpy(fte), dim=1)
    k = min(k, len(a))
    sim = b @ a.T
    top, idx = sim.topk(k, dim=1)
    ytr_t = torch.from_numpy(ytr).long()
    n_cls = int(max(ytr.max(), yte.max())) + 1
    votes = torch.zeros(len(b), n_cls, dtype=sim.dtype)
    votes.scatter_add_(1, ytr_t[idx], (top / temperature).exp())
    return float((votes.argmax(1).numpy() == yte).mean())


#: t of the uniformity metric of the probe features (Wang & Isola's default).
PROBE_UNIFORMITY_T = 2.0


def feature_uniformity(features: np.ndarray, device: torch.device, t: float = PROBE_UNIFORMITY_T) -> float:
    """Wang & Isola's uniformity ``log(mean_{i != j} exp(-t ||f_i - f_j||^2))`` of the L2-normalised rows
    of ``features`` (fp32 on ``device``, no autograd: O(n q) memory, never the n x n Gram)."""
    with torch.no_grad():
        f = torch.from_numpy(features).to(device=device, dtype=torch.float32)
        return float(_uniformity(f, t))


def evaluate(backbone: nn.Module, data: DataBundle, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Linear-probe and k-NN accuracies (means over the labelled-subset draws) and the uniformity of
    the test features (:func:`feature_uniformity`)."""
    ftr, ytr = extract_features(backbone, data.probe_train, device)
    fte, yte = extract_features(backbone, data.probe_test, device)
    subsets = _label_subsets(ytr, args.probe_labels, args.probe_repeats)
    lin = [linear_probe(ftr[s], ytr[s], fte, yte, c=args.probe_c) for s in subsets]
    knn = [knn_probe(ftr[s], ytr[s], fte, yte, k=args.knn_k) for s in subsets]
    out = {"linear_probe_acc": float(np.mean(lin)), "knn_acc": float(np.mean(knn)),
           "linear_probe_acc_per_draw": lin, "knn_acc_per_draw": knn,
           "probe_uniformity": feature_uniformity(fte, device)}
    if args.probe_labels > 0:
        out["linear_probe_acc_all_labels"] = linear_probe(ftr, ytr, fte, yte, c=args.probe_c)
        out["knn_acc_all_labels"] = knn_probe(ftr, ytr, fte, yte, k=args.knn_k)
    return out


def _pixel_probe(data: DataBundle, args: argparse.Namespace, max_values: int = 2**22) -> float | None:
    """The same linear probe on raw (standardised) pixels, a reference point for small datasets only
    (None when the probe-training set holds more than ``max_values`` pixel values)."""
    n, dims = len(data.probe_train), data.in_channels * data.image_size**2
    if n * dims > max_values:
        return None
    flat = nn.Flatten()
    ftr, ytr = extract_features(flat, data.probe_train, torch.device("cpu"))
    fte, yte = extract_features(flat, data.probe_test, torch.device("cpu"))
    subsets = _label_subsets(ytr, args.probe_labels, args.probe_repeats)
    return float(np.mean([linear_probe(ftr[s], ytr[s], fte, yte, c=args.probe_c) for s in subsets]))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def build_criterion(args: argparse.Namespace, gather: bool) -> nn.Module:
    """The loss module of ``args.loss`` with the recipe's hyper-parameters (the training step calls its
    ``forward_components``, which returns the loss and the terms to log in one pass)."""
    common = dict(gather_distributed=gather, backend=args.backend)
    if args.loss == "hsic":
        return HSICLoss(num_features=args.num_features, gamma=args.gamma, kernel_scale=args.kernel_scale,
                        learn_scale=bool(args.learn_scale), kernel=args.hsic_kernel, exact=bool(args.hsic_exact),
                        normalize=True, seed=args.seed,
                        **common)
    if args.loss == "sfrik":
        return SFRIKLoss(coefficients=args.coefficients, sim_weight=args.sim_weight, mmd_weight=args.mmd_weight,
                         **common)
    if args.loss == "uniformity":
        return AlignUniformLoss(alpha=args.align_alpha, t=args.unif_t, uniformity_weight=args.unif_weight, **common)
    return MECLoss(eps_sq=args.eps_sq, order=args.order, check_convergence=args.mec_check, **common)


def build_model(args: argparse.Namespace, in_channels: int) -> SSLNet:
    """Backbone + projector (+ predictor for hsic and mec), initialised from the current torch RNG."""
    backbone = build_backbone(args.arch, in_channels, width=args.width)
    projector = mlp(backbone.feature_dim, args.proj_hidden, args.proj_dim)
    predictor = mlp(args.proj_dim, args.pred_hidden, args.proj_dim) if args.pred_hidden else None
    return SSLNet(backbone, projector, predictor)


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def _components(loss: str, out) -> dict[str, torch.Tensor]:
    """The loggable terms of a loss' components dataclass, as detached 0-dim tensors."""
    if loss == "hsic":
        d = {"loss": out.loss, "hsic_zy": out.hsic_zy, "hsic_zz": out.hsic_zz, "kernel_scale": out.kernel_scale}
        if out.scale_objective is not None:
            d["scale_objective"] = out.scale_objective
    elif loss == "sfrik":
        d = {"loss": out.loss, "mse": out.mse, "mmd_a": out.mmd_a, "mmd_b": out.mmd_b}
    elif loss == "uniformity":
        d = {"loss": out.loss, "alignment": out.alignment, "uniformity_a": out.uniformity_a,
             "uniformity_b": out.uniformity_b}
    else:
        d = {"loss": out.loss, "t_ab": out.t_ab, "t_ba": out.t_ba, "coding_length": out.coding_length,
             "spectral_radius": out.spectral_radius, "term_ratio": out.term_ratio}
    return {k: v.detach().float().reshape(()) for k, v in d.items()}


class _Trainer:
    """State and one-epoch loop of a run (model, target, optimisers, loader, RNGs)."""

    def __init__(self, args: argparse.Namespace, data: DataBundle, device: torch.device,
                 rank: int, world: int) -> None:
        self.args, self.data, self.device, self.rank, self.world = args, data, device, rank, world
        # Model construction comes first and from the seed alone, so a resumed run rebuilds the same
        # initial weights -- those of the random-init baseline.
        torch.manual_seed(args.seed)
        self.online = build_model(args, data.in_channels).to(device)
        self.init_backbone_state = {k: v.detach().clone() for k, v in self.online.backbone.state_dict().items()}
        self.target = make_target(self.online) if args.loss in ("hsic", "mec") else None
        self.criterion = build_criterion(args, gather=world > 1).to(device)
        self.model: nn.Module = self.online
        if world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.online, device_ids=[device.index] if device.type == "cuda" else None)
        self.opt = torch.optim.AdamW(self.online.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        scale_params = list(self.criterion.parameters())
        self.scale_opt = torch.optim.Adam(scale_params, lr=args.scale_lr) if scale_params else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

        # RNGs: global ones seeded per rank (augmentations), the loader's order generator, and the
        # HSIC random-feature generator (same seed on every rank: identical features everywhere).
        seed = args.seed + 1000 * rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        self.loader_gen = torch.Generator().manual_seed(seed)
        self.loss_gen = (torch.Generator(device=device).manual_seed(args.seed) if args.loss == "hsic" else None)

        per_rank = args.batch_size // world
        if per_rank * world != args.batch_size:
            raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the world size {world}")
        n = len(data.pretrain)
        if n < args.batch_size:
            raise SystemExit(f"error: the pretraining set has {n} images, fewer than --batch-size "
                             f"{args.batch_size}; lower --batch-size or raise --subset")
        self.sampler = None
        if world > 1:
            self.sampler = torch.utils.data.DistributedSampler(
                data.pretrain, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
        self.loader = torch.utils.data.DataLoader(
            data.pretrain, batch_size=per_rank, shuffle=self.sampler is None, sampler=self.sampler,
            drop_last=True, num_workers=args.workers, generator=self.loader_gen,
            pin_memory=device.type == "cuda", persistent_workers=False)
        self.steps_per_epoch = len(self.loader)
        self.total_steps = self.steps_per_epoch * args.epochs
        self.warmup_steps = int(round(args.warmup_epochs * self.steps_per_epoch))
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        self.train_cpu_seconds = 0.0
        self.base_lam = None
        if args.loss == "mec":
            self.base_lam = self.criterion.default_lambda(args.batch_size, args.proj_dim)

    # -- checkpoint ------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        rng = _rng_state(self.loader_gen, self.loss_gen)
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, rng)
            rng_all = gathered
        else:
            rng_all = [rng]
        return {
            "version": CHECKPOINT_VERSION,
            "kernelssl": __version__,
            "epoch": self.epoch,
            "step": self.step,
            "online": self.online.state_dict(),
            "target": self.target.state_dict() if self.target is not None else None,
            "criterion": self.criterion.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scale_optimizer": self.scale_opt.state_dict() if self.scale_opt is not None else None,
            "scaler": self.scaler.state_dict(),
            "rng": rng_all,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "train_cpu_seconds": self.train_cpu_seconds,
            "args": {k: getattr(self.args, k) for k in _RESUME_KEYS + ("epochs",)},
        }

    def load(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise SystemExit(f"error: checkpoint version {ckpt.get('version')} is not {CHECKPOINT_VERSION}")
        saved = ckpt["args"]
        diff = [f"{k}: checkpoint {saved.get(k, _RESUME_DEFAULTS.get(k))!r}, now {getattr(self.args, k)!r}"
                for k in _RESUME_KEYS if saved.get(k, _RESUME_DEFAULTS.get(k)) != getattr(self.args, k)]
        if diff:
            raise SystemExit("error: --resume with options that differ from the checkpoint's:\n  " + "\n  ".join(diff))
        self.online.load_state_dict(ckpt["online"])
        if self.target is not None:
            self.target.load_state_dict(ckpt["target"])
        self.criterion.load_state_dict(ckpt["criterion"])
        self.opt.load_state_dict(ckpt["optimizer"])
        if self.scale_opt is not None:
            self.scale_opt.load_state_dict(ckpt["scale_optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.history = list(ckpt["history"])
        self.train_seconds = float(ckpt["train_seconds"])
        self.train_cpu_seconds = float(ckpt["train_cpu_seconds"])
        rngs = ckpt["rng"]
        if len(rngs) == self.world:
            _set_rng_state(rngs[self.rank], self.loader_gen, self.loss_gen)
        elif self.rank == 0:
            print(f"warning: checkpoint from {len(rngs)} processes, resuming on {self.world}: RNG streams "
                  f"restart (the run continues, but not bit-identically)", file=sys.stderr)

    # -- one step / one epoch --------------------------------------------------------------------

    def _loss(self, x1: torch.Tensor, x2: torch.Tensor, lam: float | None):
        args = self.args
        b = x1.shape[0]
        x = torch.cat([x1, x2]).to(self.device, non_blocking=True)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            z, p = self.model(x)
            zt = None
            if self.target is not None:
                with torch.no_grad():
                    zt, _ = self.target(x)
        # The loss runs outside autocast: kernelssl computes in fp32 from inputs of any float dtype.
        if args.loss == "hsic":
            return self.criterion.forward_components(p[:b], p[b:], zt[b:], zt[:b], generator=self.loss_gen)
        if args.loss in ("sfrik", "uniformity"):
            return self.criterion.forward_components(z[:b], z[b:])
        return self.criterion.forward_components(p[:b], p[b:], zt[:b], zt[b:], lam=lam)

    def train_epoch(self, bar) -> dict[str, Any]:
        args = self.args
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        self.online.train()
        if self.target is not None:
            self.target.train()  # BatchNorm of the target uses batch statistics, as in BYOL
        sums: dict[str, torch.Tensor] = {}
        rho_max: torch.Tensor | None = None
        t0, c0 = time.perf_counter(), time.process_time()
        lam = momentum = lr = None
        images = 0
        for i, (x1, x2) in enumerate(self.loader):
            lr = _lr_at(self.step, self.total_steps, self.warmup_steps, args.lr)
            for g in self.opt.param_groups:
                g["lr"] = lr
            if args.loss == "mec":
                lam = mec_lambda_warmup(self.step, steps_per_epoch=self.steps_per_epoch, base_lam=self.base_lam,
                                        warmup_epochs=args.mec_warmup)
            out = self._loss(x1, x2, lam)
            self.opt.zero_grad(set_to_none=True)
            if self.scale_opt is not None:
                self.scale_opt.zero_grad(set_to_none=True)
            self.scaler.scale(out.loss).backward()
            if self.scale_opt is not None and self.world > 1:
                # the scale is outside DDP: average its gradient over the ranks by hand
                for prm in self.criterion.parameters():
                    if prm.grad is not None:
                        dist.all_reduce(prm.grad)
                        prm.grad /= self.world
            self.scaler.step(self.opt)
            if self.scale_opt is not None:
                self.scaler.step(self.scale_opt)
            self.scaler.update()
            if self.target is not None:
                momentum = ema_momentum(self.step, self.total_steps, args.ema)
                ema_update(self.target, self.online, momentum)
            for k, v in _components(args.loss, out).items():
                sums[k] = sums[k] + v if k in sums else v.clone()
                if k == "spectral_radius":  # the worst step of the epoch too (no host sync here)
                    rho_max = v.clone() if rho_max is None else torch.maximum(rho_max, v)
            self.step += 1
            images += x1.shape[0] * self.world
            if bar is not None:
                bar.update(1)
                if i % max(1, self.steps_per_epoch // 5) == 0 or i == self.steps_per_epoch - 1:
                    bar.set_postfix(epoch=self.epoch + 1, loss=f"{float(out.loss.detach()):.4g}",
                                    img_s=f"{images / max(time.perf_counter() - t0, 1e-9):.0f}")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.train_seconds += seconds
        self.train_cpu_seconds += cpu
        self.epoch += 1
        n = max(1, self.steps_per_epoch)
        row: dict[str, Any] = {"epoch": self.epoch, "step": self.step}
        row.update({k: float(v) / n for k, v in sums.items()})
        if rho_max is not None:
            row["spectral_radius_max"] = float(rho_max)
        if args.loss == "mec":
            row["lam"] = lam
        if momentum is not None:
            row["ema_momentum"] = momentum
        row["lr"] = lr
        row["seconds"] = seconds
        row["images_per_s"] = images / max(seconds, 1e-9)
        self.history.append(row)
        return row


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)


def _summary_line(row: dict[str, Any], loss: str) -> str:
    keys = {"hsic": ("hsic_zy", "hsic_zz", "kernel_scale"), "sfrik": ("mse", "mmd_a"),
            "mec": ("coding_length", "lam", "spectral_radius"), "uniformity": ("alignment", "uniformity_a")}[loss]
    extra = " ".join(f"{k}={row[k]:.4g}" for k in keys if k in row)
    return (f"epoch {row['epoch']:4d}  loss={row['loss']:.5g}  {extra}  lr={row['lr']:.3g}  "
            f"{row['images_per_s']:.0f} img/s")


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train and evaluate as ``args`` says; returns the results dict on rank 0 (None elsewhere, or when
    ``--stop-after`` stopped the run early)."""
    rank, world, local_rank = _dist_env()
    device = _pick_device(args.device, local_rank, world)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    args.workers, threads = machine_defaults(args, _available_cores(), local_world)
    torch.set_num_threads(threads)
    args.threads = threads

    data = load_dataset(args.dataset, data_dir=args.data_dir, download=args.download, subset=args.subset,
                        image_size=args.image_size)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    trainer = _Trainer(args, data, device, rank, world)
    if args.resume and os.path.exists(ckpt_path):
        trainer.load(torch.load(ckpt_path, map_location=device, weights_only=True))
        if rank == 0:
            print(f"resumed from {ckpt_path} at epoch {trainer.epoch}/{args.epochs}", file=sys.stderr)
    elif args.resume and rank == 0:
        print(f"--resume: no checkpoint at {ckpt_path}; starting from scratch", file=sys.stderr)

    if rank == 0:
        print(f"kernelssl {__version__} train: loss={args.loss} dataset={args.dataset} "
              f"({len(data.pretrain)} pretraining images) arch={args.arch} epochs={args.epochs} "
              f"batch={args.batch_size} device={device} world={world} threads={threads} workers={args.workers}",
              file=sys.stderr)
    show_bar = rank == 0 and not args.no_progress and sys.stderr.isatty()
    bar = _progress(trainer.total_steps, trainer.step, show_bar)
    log_every = max(1, args.epochs // 10)
    done_now = 0
    while trainer.epoch < args.epochs:
        row = trainer.train_epoch(bar)
        done_now += 1
        state = trainer.state()  # collective under DDP: every rank takes part
        if rank == 0:
            _atomic_save(state, ckpt_path)
            _write_csv(os.path.join(args.out, "log.csv"), trainer.history)
            if not math.isfinite(row["loss"]):
                raise SystemExit(f"error: the loss is not finite at epoch {row['epoch']} ({row['loss']}); "
                                 f"lower --lr or check the recipe")
            if bar is None and (row["epoch"] % log_every == 0 or row["epoch"] == args.epochs):
                print(_summary_line(row, args.loss), file=sys.stderr)
        if args.stop_after is not None and done_now >= args.stop_after and trainer.epoch < args.epochs:
            if bar is not None:
                bar.close()
            if rank == 0:
                print(f"stopped after {done_now} epoch(s) at epoch {trainer.epoch}/{args.epochs}; "
                      f"continue with --resume", file=sys.stderr)
            return None
    if bar is not None:
        bar.close()

    results = None
    if rank == 0:
        t_eval = time.perf_counter()
        trained = evaluate(trainer.online.backbone, data, args, device)
        baseline_net = build_backbone(args.arch, data.in_channels, width=args.width).to(device)
        baseline_net.load_state_dict(trainer.init_backbone_state)
        base = evaluate(baseline_net, data, args, device)
        pixels = _pixel_probe(data, args)
        eval_seconds = time.perf_counter() - t_eval
        last = trainer.history[-1] if trainer.history else {}
        results = {
            "loss": args.loss,
            "dataset": args.dataset,
            "arch": args.arch,
            "epochs": args.epochs,
            "seed": args.seed,
            "seconds": trainer.train_seconds,
            "cpu_seconds": trainer.train_cpu_seconds,
            "eval_seconds": eval_seconds,
            "final_loss": last.get("loss"),
            "linear_probe_acc": trained["linear_probe_acc"],
            "baseline_linear_probe_acc": base["linear_probe_acc"],
            "knn_acc": trained["knn_acc"],
            "baseline_knn_acc": base["knn_acc"],
            "linear_probe_margin": trained["linear_probe_acc"] - base["linear_probe_acc"],
            "probe_uniformity": trained["probe_uniformity"],
            "baseline_probe_uniformity": base["probe_uniformity"],
            "probe": {"labels_per_class": args.probe_labels, "repeats": args.probe_repeats, "C": args.probe_c,
                      "knn_k": args.knn_k, "uniformity_t": PROBE_UNIFORMITY_T, "train_images": len(data.probe_train),
                      "test_images": len(data.probe_test)},
            "per_draw": {"linear_probe_acc": trained["linear_probe_acc_per_draw"],
                         "baseline_linear_probe_acc": base["linear_probe_acc_per_draw"],
                         "knn_acc": trained["knn_acc_per_draw"], "baseline_knn_acc": base["knn_acc_per_draw"]},
            "world_size": world,
            "device": str(device),
            "kernelssl": __version__,
            "torch": torch.__version__,
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())},
        }
        if pixels is not None:
            results["pixels_linear_probe_acc"] = pixels
        if "linear_probe_acc_all_labels" in trained:
            results["linear_probe_acc_all_labels"] = trained["linear_probe_acc_all_labels"]
            results["baseline_linear_probe_acc_all_labels"] = base["linear_probe_acc_all_labels"]
            results["knn_acc_all_labels"] = trained["knn_acc_all_labels"]
            results["baseline_knn_acc_all_labels"] = base["knn_acc_all_labels"]
        _atomic_write_bytes(os.path.join(args.out, "results.json"),
                            (json.dumps(results, indent=2) + "\n").encode())
        what = (f"{args.probe_labels} labels/class x {args.probe_repeats} draws" if args.probe_labels > 0
                else "all labels")
        print(f"\n{args.loss} on {args.dataset}, {args.epochs} epochs, {trainer.train_seconds:.1f} s "
              f"(probe: {what})")
        print(f"  linear probe: {trained['linear_probe_acc']:.4f}   random-init baseline: {base['linear_probe_acc']:.4f}")
        print(f"  k-NN (k={args.knn_k}): {trained['knn_acc']:.4f}   random-init baseline: {base['knn_acc']:.4f}")
        print(f"  uniformity (t={PROBE_UNIFORMITY_T:g}) of the test features: {trained['probe_uniformity']:.4f}   "
              f"random-init baseline: {base['probe_uniformity']:.4f}")
        if pixels is not None:
            print(f"  linear probe on raw pixels: {pixels:.4f}")
        print(f"  results: {os.path.join(args.out, 'results.json')}")
    if world > 1:
        dist.barrier()
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m kernelssl.train`` (and the ``kernelssl-train`` console script).

    Returns the exit status: 0 on success, 2 when the dataset is missing or unreadable (the message
    says what to do).  Bad options exit through argparse (status 2) or ``SystemExit`` with a message.
    """
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        run(args)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests, notebooks)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
