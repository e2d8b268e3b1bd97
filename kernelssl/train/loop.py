"""The training loop, its checkpoints and the whole run of ``python -m kernelssl.train``."""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import json
import math
import os
import random
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import __version__
from ..functional import mec_lambda_warmup
from ..losses import AlignUniformLoss, HSICLoss, MECLoss, SFRIKLoss
from .cli import LOSS_FLAGS, UsageError, _available_cores, _dist_env, _pick_device, flag, machine_defaults, parse_args
from .data import DataBundle, DatasetError, load_dataset
from .models import SSLNet, build_backbone, ema_momentum, ema_update, make_target, mlp
from .probes import PROBE_UNIFORMITY_T, _pixel_probe, evaluate

__all__ = ["CHECKPOINT_VERSION", "build_criterion", "build_model", "run", "main"]

CHECKPOINT_VERSION = 1


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
                "hsic_kernel", "hsic_exact", *(name for names in LOSS_FLAGS.values() for name in names))


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
            raise UsageError(f"--batch-size {args.batch_size} is not divisible by the world size {world}")
        n = len(data.pretrain)
        if n < args.batch_size:
            raise UsageError(f"the pretraining set has {n} images, fewer than --batch-size "
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
            raise UsageError(f"--resume: checkpoint version {ckpt.get('version')} is not {CHECKPOINT_VERSION}")
        saved = ckpt["args"]
        diff = [f"{flag(k)} {saved.get(k)!r} in the checkpoint, {getattr(self.args, k)!r} now"
                for k in _RESUME_KEYS if saved.get(k) != getattr(self.args, k)]
        if diff:
            raise UsageError("--resume with options that differ from the checkpoint's: " + "; ".join(diff))
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
        try:
            return self.criterion.forward_components(p[:b], p[b:], zt[:b], zt[b:], lam=lam)
        except ValueError as e:  # --mec-check raise: the series diverged
            if args.mec_check != "raise":
                raise
            raise UsageError(f"--mec-check raise stopped the run at step {self.step}: {e}") from None

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


_CKPT_KEYS = ("version", "args", "online", "criterion", "optimizer", "epoch", "step", "rng", "history")


def _read_checkpoint(path: str, device: torch.device) -> dict[str, Any]:
    """``torch.load`` of ``path``, refused with one line when it is not a kernelssl checkpoint."""
    try:
        with warnings.catch_warnings():  # torch's note on a foreign pickle protocol: the error says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # random bytes, a truncated file, a directory, a pickle of other objects
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--resume: {path} is not a kernelssl checkpoint "
                         f"({type(e).__name__}: {reason[:200]})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _CKPT_KEYS):
        raise UsageError(f"--resume: {path} is not a kernelssl checkpoint (a {type(ckpt).__name__} without "
                         f"the keys {', '.join(_CKPT_KEYS)})")
    return ckpt


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train and evaluate as ``args`` says; returns the results dict on rank 0 (None elsewhere, or when
    ``--stop-after`` stopped the run early)."""
    rank, world, local_rank = _dist_env()
    device = _pick_device(args.device, local_rank, world)
    if args.backend == "triton":
        from .. import dispatch

        problem = dispatch._triton_problem("rff_hsic", device)
        if problem is not None:
            raise UsageError(f"--backend triton cannot run: {problem}")
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
        trainer.load(_read_checkpoint(ckpt_path, device))
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
        print(f"  linear probe: {trained['linear_probe_acc']:.4f}   "
              f"random-init baseline: {base['linear_probe_acc']:.4f}")
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
    says what to do).  Every user error (an option out of range, a device, a path, a checkpoint that is not one or
    was trained with other settings) exits with status 2 and one ``error:`` line on stderr.
    """
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        run(args)
    except (DatasetError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests, notebooks)
        if dist.is_available() and dist.is_initialized():
            gc.collect()  # free graphs held in reference cycles first: they hold the group (docs/api.md)
            dist.destroy_process_group()
    return 0

