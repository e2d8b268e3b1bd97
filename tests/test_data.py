"""The training script on real on-disk layouts, on tiny generated files.

* CIFAR-10's python version: ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``, each a
  protocol-2 pickle written byte for byte the way the distributed files were (Python 2 ``cPickle``:
  ``str`` keys and the image buffer as BINSTRING, a ``numpy.core.multiarray._reconstruct`` array of
  uint8 ``(N, 3072)``, a list of int labels, a batch label and file names);
* STL-10's binary version: ``stl10_binary/{train,test,unlabeled}_X.bin`` (uint8, 3x96x96 per image,
  each channel stored column by column) and ``{train,test}_y.bin`` (uint8 labels 1..10);
* an image folder of PNG files (``train/`` and ``val/``, one folder per class).

kernelssl reads the CIFAR/STL files itself (kernelssl.train.data.read_cifar10 / read_stl10); torchvision's
readers only accept files with the official MD5, so they cannot read generated files.  As a check
that the generated files ARE the formats torchvision reads, each reader is compared with
torchvision's on the same files with only torchvision's checksum test bypassed (monkeypatched); the
training runs go through kernelssl's loader, checksum-free by design.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from kernelssl import train
from kernelssl.train import data as D

TINY_RUN = ["--epochs", "1", "--batch-size", "8", "--width", "4", "--proj-hidden", "16", "--proj-dim", "8",
            "--workers", "0", "--threads", "1", "--no-progress",
            "--knn-k", "3"]


# ------------------------------------------------------------------------------------------------
# writers of the on-disk formats
# ------------------------------------------------------------------------------------------------


def _py2_str(s: str | bytes) -> bytes:
    """A Python 2 ``str`` as cPickle protocol 2 writes it: SHORT_BINSTRING ('U') or BINSTRING ('T')."""
    b = s.encode("latin1") if isinstance(s, str) else s
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b


def _int(v: int) -> bytes:
    return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)


def _uint8_array(a: np.ndarray) -> bytes:
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), 'b')`` + BUILD with the py2 state tuple
    ``(1, shape, dtype('uint8'), False, <raw bytes as a py2 str>)``."""
    assert a.dtype == np.uint8 and a.ndim == 2
    out = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _int(0) + b"\x85" + _py2_str("b") + b"\x87R"
    out += b"(" + _int(1) + _int(a.shape[0]) + _int(a.shape[1]) + b"\x86"
    out += b"cnumpy\ndtype\n" + _py2_str("u1") + _int(0) + _int(1) + b"\x87R"
    out += b"(" + _int(3) + _py2_str("|") + b"NNN" + struct.pack("<ci", b"J", -1) + struct.pack("<ci", b"J", -1)
    out += _int(0) + b"tb"  # TUPLE, BUILD: the dtype's state
    out += b"\x89" + _py2_str(a.tobytes()) + b"tb"  # NEWFALSE (fortran order), the data; TUPLE, BUILD
    return out


def write_cifar10_batch(path, images: np.ndarray, labels: list[int], batch_label: str) -> None:
    """One CIFAR-10 python batch: ``images`` uint8 (N, 3, 32, 32)."""
    n = len(images)
    body = b"\x80\x02}(" + _py2_str("data") + _uint8_array(images.reshape(n, 3072))
    body += _py2_str("labels") + b"](" + b"".join(_int(int(v)) for v in labels) + b"e"
    body += _py2_str("batch_label") + _py2_str(batch_label)
    body += _py2_str("filenames") + b"](" + b"".join(_py2_str(f"img_{i:05d}.png") for i in range(n)) + b"e"
    path.write_bytes(body + b"u.")


def make_cifar10(root, per_batch=6, seed=0):
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    made = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        write_cifar10_batch(d / name, x, y, f"training batch {name}")
        made[name] = (x, y)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = b"\x80\x02}(" + _py2_str("num_cases_per_batch") + _int(per_batch)
    meta += _py2_str("label_names") + b"](" + b"".join(_py2_str(n) for n in names) + b"e"
    meta += _py2_str("num_vis") + _int(3072) + b"u."
    (d / "batches.meta").write_bytes(meta)
    return made


def make_stl10(root, n_train=10, n_test=6, n_unlabeled=8, seed=0):
    rng = np.random.default_rng(seed)
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    made = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        x = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)
        # each channel stored column by column: the file holds x transposed in its last two axes
        (d / f"{split}_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())
        y = None
        if split != "unlabeled":
            y = rng.integers(1, 11, size=n).astype(np.uint8)
            (d / f"{split}_y.bin").write_bytes(y.tobytes())
        made[split] = (x, y)
    return made


def make_imagefolder(root, classes=2, per_class=(6, 3), size=16, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(px).save(folder / f"{i}.png")


def _torchvision_reads(monkeypatch, cls, root, **kw):
    """torchvision's own reader on the generated files, with ONLY its MD5 checks bypassed."""
    import importlib

    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    module = importlib.import_module(cls.__module__)
    if hasattr(module, "check_integrity"):  # cifar.py also hashes batches.meta with it
        monkeypatch.setattr(module, "check_integrity", lambda *a, **k: True)
    return cls(str(root), download=False, **kw)


# ------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------


def test_read_cifar10_generated_batches(tmp_path, monkeypatch):
    made = make_cifar10(tmp_path)
    x, y = D.read_cifar10(str(tmp_path), train=True)
    want_x = np.concatenate([made[f"data_batch_{i}"][0] for i in range(1, 6)])
    want_y = sum((made[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert x.dtype == torch.uint8 and x.shape == (30, 3, 32, 32)
    assert np.array_equal(x.numpy(), want_x) and y.tolist() == want_y
    tx, ty = D.read_cifar10(str(tmp_path), train=False)
    assert np.array_equal(tx.numpy(), made["test_batch"][0]) and ty.tolist() == made["test_batch"][1]
    # the generated files are the format torchvision reads (only its checksum test bypassed)
    from torchvision.datasets import CIFAR10

    tv = _torchvision_reads(monkeypatch, CIFAR10, tmp_path, train=True)
    assert np.array_equal(tv.data, x.numpy().transpose(0, 2, 3, 1)) and tv.targets == y.tolist()
    assert tv.classes[0] == "airplane" and len(tv.classes) == 10


def test_read_cifar10_bad_files(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(D.DatasetError, match="data_batch_3 is not a CIFAR-10 python batch"):
        D.read_cifar10(str(tmp_path), train=True)
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(FileNotFoundError):
        D.read_cifar10(str(tmp_path), train=False)


def test_read_stl10_generated_files(tmp_path, monkeypatch):
    made = make_stl10(tmp_path)
    for split in ("train", "test", "unlabeled"):
        ds = D.read_stl10(str(tmp_path), split)
        x, y = made[split]
        assert len(ds) == len(x)
        for i in (0, len(x) - 1):
            img, label = ds[i]
            assert img.dtype == torch.uint8 and img.shape == (3, 96, 96)
            assert np.array_equal(img.numpy(), x[i])
            assert label == (int(y[i]) - 1 if y is not None else -1)
    both = D.read_stl10(str(tmp_path), "train+unlabeled")
    assert len(both) == 18 and np.array_equal(both[12][0].numpy(), made["unlabeled"][0][2])
    from torchvision.datasets import STL10

    tv = _torchvision_reads(monkeypatch, STL10, tmp_path, split="train")
    assert np.array_equal(tv.data, made["train"][0]) and tv.labels.tolist() == (made["train"][1] - 1).tolist()


def test_read_stl10_bad_files(tmp_path):
    make_stl10(tmp_path)
    with open(tmp_path / "stl10_binary" / "test_X.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(D.DatasetError, match=r"test_X.bin has \d+ bytes, not a multiple of 27648"):
        D.read_stl10(str(tmp_path), "test")
    (tmp_path / "stl10_binary" / "train_y.bin").write_bytes(bytes([1, 2]))
    with pytest.raises(D.DatasetError, match="train_y.bin holds 2 labels"):
        D.read_stl10(str(tmp_path), "train")


# ------------------------------------------------------------------------------------------------
# the training script on them
# ------------------------------------------------------------------------------------------------


def _results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


# cifar10's run (~3 s: six batch files) in the slow tier; the same training path on stl10's files on the fast one
@pytest.mark.parametrize("dataset", [pytest.param("cifar10", marks=pytest.mark.slow), "stl10"])
def test_train_on_generated_dataset(tmp_path, dataset):
    root = tmp_path / "data"
    (make_cifar10 if dataset == "cifar10" else make_stl10)(root)
    out = str(tmp_path / "out")
    extra = ["--image-size", "16"] if dataset == "stl10" else []
    assert train.main(["--dataset", dataset, "--data-dir", str(root), "--arch", "smallcnn", "--loss", "sfrik",
                       "--out", out, *TINY_RUN, *extra]) == 0
    r = _results(out)
    assert r["dataset"] == dataset and r["probe"]["test_images"] == 6
    assert r["probe"]["train_images"] == (30 if dataset == "cifar10" else 10)
    assert 0.0 <= r["linear_probe_acc"] <= 1.0


@pytest.mark.parametrize("arch,loss", [("smallcnn", "hsic"), ("resnet18", "mec")])
def test_train_imagefolder_positional_path(tmp_path, arch, loss):
    # `--dataset imagefolder --arch smallcnn` crashed: the natural-image recipes had no width.
    make_imagefolder(tmp_path / "imgs")
    out = str(tmp_path / "out")
    assert train.main(["--dataset", "imagefolder", str(tmp_path / "imgs"), "--arch", arch, "--loss", loss,
                       "--image-size", "16", "--out", out, *TINY_RUN]) == 0
    r = _results(out)
    assert r["arch"] == arch and r["probe"]["train_images"] == 12 and r["probe"]["test_images"] == 6


@pytest.mark.slow  # the real process (~5 s); test_train_imagefolder_positional_path runs the same in-process
def test_train_imagefolder_command_line(tmp_path):
    """The real process, exactly as documented: python -m kernelssl.train --dataset imagefolder PATH."""
    make_imagefolder(tmp_path / "imgs")
    out = str(tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "kernelssl.train", "--dataset", "imagefolder", str(tmp_path / "imgs"),
         "--arch", "smallcnn", "--image-size", "16", "--out", out, *TINY_RUN],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _results(out)["dataset"] == "imagefolder"


def test_path_and_data_dir_must_agree(tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--dataset", "imagefolder", "a", "--data-dir", "b"])
    assert train.parse_args(["--dataset", "imagefolder", "a"]).data_dir == "a"


@pytest.mark.parametrize("dataset", ["digits", "cifar10", "imagefolder"])
def test_default_workers_respect_the_cpu_count(dataset):
    args = train.parse_args(["--dataset", dataset])
    assert train.machine_defaults(args, cores=2, local_world=1) == (1, 1)  # was 4 workers on 2 cores
    assert train.machine_defaults(args, cores=1, local_world=1) == (0, 1)
    assert train.machine_defaults(args, cores=4, local_world=2) == (1, 1)  # 2 processes x (1 worker + 1 thread)
    cap = 1 if dataset == "digits" else 4
    assert train.machine_defaults(args, cores=64, local_world=1) == (cap, 64 - cap)
    explicit = train.parse_args(["--dataset", dataset, "--workers", "3", "--threads", "2"])
    assert train.machine_defaults(explicit, cores=2, local_world=1) == (3, 2)
