"""Tests of the training script ``python -m kernelssl.train`` (CPU, tiny runs on the bundled digits).

* a smoke run per loss: one short epoch on a 256-image subset; results.json has the documented keys
  with finite values, log.csv has the loss components;
* resume: 2 epochs in one go == 1 epoch, stop, ``--resume`` for the second -- bitwise-equal weights,
  EMA target, optimiser state and results;
* bad data: a missing or corrupt cifar10 without ``--download`` exits with status 2 and a clear message
  (the real cifar10/stl10/imagefolder layouts are exercised on generated files in test_data.py);
* DDP under torchrun (2 CPU processes, gloo) once ``gather_distributed`` is available.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from kernelssl import train

# Tiny but complete: smallcnn width 8, batch 128, one label draw.
TINY = ["--subset", "256", "--batch-size", "128", "--width", "8", "--proj-hidden", "64", "--probe-repeats", "1",
        "--workers", "0", "--threads", "1", "--no-progress"]

REQUIRED = ("loss", "epochs", "seconds", "seed", "args", "linear_probe_acc", "baseline_linear_probe_acc",
            "knn_acc", "baseline_knn_acc")
COMPONENTS = {
    "hsic": ("loss", "hsic_zy", "hsic_zz", "kernel_scale", "scale_objective", "ema_momentum"),
    "sfrik": ("loss", "mse", "mmd_a", "mmd_b"),
    "mec": ("loss", "t_ab", "t_ba", "coding_length", "lam", "spectral_radius", "spectral_radius_max", "term_ratio",
            "ema_momentum"),
    "uniformity": ("loss", "alignment", "uniformity_a", "uniformity_b"),
}


def _results(out) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("loss", ["hsic", "sfrik", "mec", "uniformity"])
def test_smoke_one_epoch(tmp_path, loss):
    out = str(tmp_path / loss)
    assert train.main(["--loss", loss, "--epochs", "1", "--out", out, *TINY]) == 0
    r = _results(out)
    for key in REQUIRED:
        assert key in r, key
    assert r["loss"] == loss and r["epochs"] == 1 and r["seed"] == 0
    for key in ("seconds", "linear_probe_acc", "baseline_linear_probe_acc", "knn_acc", "baseline_knn_acc",
                "final_loss"):
        assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r[key])
    for key in ("linear_probe_acc", "baseline_linear_probe_acc", "knn_acc", "baseline_knn_acc"):
        assert 0.0 <= r[key] <= 1.0
    # the uniformity (t = 2) of the unit-norm test features: log mean exp(-2 d^2) with mean d^2 <= 2n/(n-1)
    n_test = r["probe"]["test_images"]
    for key in ("probe_uniformity", "baseline_probe_uniformity"):
        assert -4.0 * n_test / (n_test - 1) <= r[key] <= 0.0, (key, r[key])
    with open(os.path.join(out, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    for key in COMPONENTS[loss]:
        assert math.isfinite(float(rows[0][key])), key
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2  # 256 images / batch 128
    if loss == "uniformity":  # Wang & Isola's two-view setup: no target network, no predictor
        assert ckpt["target"] is None and r["args"]["pred_hidden"] == 0 and r["args"]["ema"] is None
        assert (r["args"]["align_alpha"], r["args"]["unif_t"], r["args"]["unif_weight"]) == (2.0, 2.0, 1.0)
        row = rows[0]  # loss = alignment + (uniformity_a + uniformity_b) / 2 is what was logged
        assert math.isclose(float(row["loss"]), float(row["alignment"]) + (float(row["uniformity_a"])
                            + float(row["uniformity_b"])) / 2, rel_tol=1e-5, abs_tol=1e-6)


def test_feature_uniformity_is_wang_isolas_metric():
    """The probe metric equals their pdist code on the normalised features (float64), any feature scale."""
    import numpy as np

    from kernelssl.ops.gaussian_gram import uniformity_pdist

    f = np.random.default_rng(0).standard_normal((57, 24)) * 30.0 + 5.0
    ref = float(uniformity_pdist(torch.nn.functional.normalize(torch.from_numpy(f), dim=1), 2.0))
    got = train.feature_uniformity(f, torch.device("cpu"))
    # fp32 inputs and sums of 3192 terms: ~1e-6 relative; a missing normalisation or a wrong t is off by >> 1e-3
    assert math.isclose(got, ref, rel_tol=1e-5), (got, ref)


def _assert_state_equal(a, b, path="ckpt"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_state_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.slow  # three whole training runs per case (~3 s); test_smoke_one_epoch runs the command on the fast tier
@pytest.mark.parametrize("loss,workers", [("hsic", "1"), ("mec", "0")])
def test_resume_is_bit_identical(tmp_path, capsys, loss, workers):
    # hsic: EMA target, learned kernel scale (own optimiser), the random-feature generator and a
    # data-loader worker; mec: EMA teacher and the per-step lambda warm-up (over 1 of the 2 epochs).
    args = ["--loss", loss, "--epochs", "2", *TINY, "--workers", workers]
    if loss == "mec":
        args += ["--mec-warmup", "1"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert train.main([*args, "--out", straight]) == 0
    assert train.main([*args, "--out", split, "--stop-after", "1"]) == 0
    assert not os.path.exists(os.path.join(split, "results.json"))
    assert torch.load(os.path.join(split, "checkpoint.pt"), weights_only=True)["epoch"] == 1
    capsys.readouterr()
    assert train.main([*args, "--out", split, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err  # not a silent restart from scratch

    a = torch.load(os.path.join(straight, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "checkpoint.pt"), weights_only=True)
    timing = ("seconds", "images_per_s")
    for ckpt in (a, b):
        ckpt.pop("train_seconds"), ckpt.pop("train_cpu_seconds")
        for row in ckpt["history"]:
            for k in timing:
                row.pop(k)
    _assert_state_equal(a, b)

    ra, rb = _results(straight), _results(split)
    for r in (ra, rb):
        for k in ("seconds", "cpu_seconds", "eval_seconds"):
            r.pop(k)
        r["args"].pop("out"), r["args"].pop("resume"), r["args"].pop("stop_after")
    assert ra == rb


def test_mec_check_stops_a_diverging_run(tmp_path, capsys):
    # eps_sq = 0.5 at d = 128: a collapsed batch has rho = d / eps_sq = 256; the warm-up is off.
    args = ["--loss", "mec", "--epochs", "1", *TINY, "--eps-sq", "0.5", "--mec-warmup", "0"]
    assert train.main([*args, "--out", str(tmp_path / "raise"), "--mec-check", "raise"]) == 2
    err = capsys.readouterr().err
    assert "error: --mec-check raise stopped the run" in err and "the truncated log-det series diverges" in err
    assert train.main([*args, "--out", str(tmp_path / "off")]) == 0  # off: runs, and logs rho >= 1
    with open(os.path.join(tmp_path / "off", "log.csv")) as f:
        row = next(csv.DictReader(f))
    assert float(row["spectral_radius_max"]) >= 1.0
    assert float(row["spectral_radius_max"]) >= float(row["spectral_radius"])


def test_resume_rejects_other_options(tmp_path):
    out = str(tmp_path / "run")
    args = ["--loss", "sfrik", "--epochs", "2", "--out", out, *TINY]
    assert train.main([*args, "--stop-after", "1"]) == 0
    assert train.main([*args, "--resume", "--lr", "0.5"]) == 2


def test_missing_cifar10_exits_2_with_message(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert train.main(["--dataset", "cifar10", "--data-dir", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cifar10 not found in" in err and str(missing) in err and "--download" in err
    assert "Traceback" not in err


def test_corrupt_cifar10_exits_2(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    assert train.main(["--dataset", "cifar10", "--data-dir", str(root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "data_batch_1 is not a CIFAR-10 python batch" in err and "pass --download" in err
    assert "Traceback" not in err


def test_missing_imagefolder_exits_2(tmp_path, capsys):
    assert train.main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "none"),
                       "--out", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.slow  # the real process (~4 s); the exit-2 tests above run the same in-process
def test_command_line_exit_status(tmp_path):
    """The real process: status 2, one line on stderr, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "kernelssl.train", "--dataset", "stl10", "--data-dir", str(tmp_path / "none"),
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "stl10 not found in" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # two training processes under torchrun (~18 s)
def test_torchrun_two_processes(tmp_path):
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "kernelssl.train", "--loss", "hsic", "--epochs", "1", "--out", out, *TINY],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = _results(out)
    assert r["world_size"] == 2 and math.isfinite(r["linear_probe_acc"])


def test_documented_cifar10_recipes_parse():
    """The per-paper CIFAR-10 command lines of docs/training.md are valid options of the script."""
    import re
    import shlex

    page = open(os.path.join(os.path.dirname(__file__), "..", "docs", "training.md"), encoding="utf-8").read()
    commands = re.findall(r"`(python -m kernelssl\.train --loss \w+ --dataset cifar10[^`]*)`", page)
    assert len(commands) == 3, commands
    for cmd in commands:
        args = train.parse_args(shlex.split(cmd)[3:])
        assert args.dataset == "cifar10" and args.download and args.arch == "resnet18"


def test_resume_rejects_another_hsic_kernel_and_checkpoints_without_it(tmp_path):
    """The HSIC kernel family is part of the run: resuming with another one is refused, and so is a
    checkpoint that does not record it."""
    import torch

    out = str(tmp_path / "run")
    args = ["--loss", "hsic", "--epochs", "2", "--out", out, *TINY]
    assert train.main([*args, "--stop-after", "1"]) == 0
    assert train.main([*args, "--resume", "--hsic-kernel", "gaussian"]) == 2
    ckpt_path = next(p for p in (tmp_path / "run").iterdir() if p.suffix in (".pt", ".pth"))
    ckpt = torch.load(ckpt_path, weights_only=False)
    for k in ("hsic_kernel", "hsic_exact"):
        ckpt["args"].pop(k)
    torch.save(ckpt, ckpt_path)
    assert train.main([*args, "--resume"]) == 2
