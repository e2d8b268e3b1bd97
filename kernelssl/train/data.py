"""Datasets and augmentations for the training script (:mod:`kernelssl.train`).

``load_dataset(name, ...)`` returns a :class:`DataBundle`: an unlabelled two-view pretraining set
and the labelled train/test sets of the evaluation (no augmentation).

* ``digits`` -- scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; no network).
  A fixed stratified split (``random_state=0``, independent of ``--seed``): 1257 training images
  (pretraining pool and probe labels) and 540 held-out test images.
* ``cifar10``, ``stl10`` -- the datasets' own on-disk formats under ``data_dir``, read here
  (:func:`read_cifar10`, :func:`read_stl10`): CIFAR-10's python pickle batches
  (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``) and STL-10's binary files
  (``stl10_binary/{train,test,unlabeled}_X.bin``, ``{train,test}_y.bin``; images memory-mapped, so
  the 100 000 unlabelled images are never all in memory).  ``download=True`` fetches and extracts
  them with torchvision, which verifies the archive's checksum; reading does not re-hash the files
  (torchvision's readers refuse any file whose MD5 differs from the official one, so they cannot read
  a subset or a generated test file -- ours check sizes and structure instead, and a file that does
  not parse raises :class:`DatasetError`).  STL-10 pretrains on ``train+unlabeled``, probes on
  ``train``, tests on ``test``.
* ``imagefolder`` -- ``data_dir`` holds ``train/`` and ``val/`` (one folder per class); a single
  class-folder tree is split 80/20 with a fixed seed instead.

A missing or unreadable dataset raises :class:`DatasetError` with a message that says what to do;
the script prints it and exits with status 2.

Augmentations are ``torchvision.transforms.v2``, drawn per sample from torch's global RNG (in the
main process) or from the DataLoader's worker seeds (derived from the loader's generator): both are
checkpointed, so ``--resume`` is bit-identical.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

__all__ = ["DATASETS", "DatasetError", "DataBundle", "load_dataset", "digits_augment", "read_cifar10",
           "read_stl10", "CIFAR10_DIR", "STL10_DIR"]

DATASETS = ("digits", "cifar10", "stl10", "imagefolder")

_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DatasetError(RuntimeError):
    """The dataset is missing, corrupt or cannot be downloaded; the message says what to do."""


@dataclass
class DataBundle:
    """What the training script needs from a dataset."""

    name: str
    pretrain: Dataset  #: items are ``(view_1, view_2)`` augmented tensors
    probe_train: Dataset  #: items are ``(image, label)``, evaluation transform
    probe_test: Dataset  #: items are ``(image, label)``, evaluation transform
    in_channels: int
    image_size: int
    num_classes: int


class TwoViews(Dataset):
    """Two independent augmentations of each image of ``base`` (labels dropped).

    ``base`` is a tensor ``(N, C, H, W)`` or a dataset of ``(image, label)`` items."""

    def __init__(self, base, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x = self.base[i] if isinstance(self.base, torch.Tensor) else self.base[i][0]
        return self.transform(x), self.transform(x)


class Labelled(Dataset):
    """``(transform(image), label)`` over an image tensor and a label tensor (or a base dataset)."""

    def __init__(self, images, labels=None, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        if self.labels is None:
            x, y = self.images[i]
        else:
            x, y = self.images[i], int(self.labels[i])
        return (self.transform(x) if self.transform is not None else x), y


# --------------------------------------------------------------------------------------------------
# Augmentations
# --------------------------------------------------------------------------------------------------


def digits_augment(strength: float = 1.0):
    """Augmentation for 8x8 digits (float tensors in [0, 1], shape ``(1, 8, 8)``); no flips.

    Random resized crop (area 0.4..1) back to 8x8, a small random affine (rotation 10 deg, shear
    10 deg), random erasing of a small patch, Gaussian pixel noise, then standardisation.
    ``strength`` scales the rotation, shear and noise (1.0 is the default recipe).
    """
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(8, scale=(0.4, 1.0), ratio=(0.75, 1.333), antialias=True),
            v2.RandomAffine(degrees=10 * strength, shear=10 * strength),
            v2.RandomErasing(p=0.25, scale=(0.02, 0.12), ratio=(0.5, 2.0), value=0.0),
            v2.GaussianNoise(mean=0.0, sigma=0.1 * strength, clip=False),
            v2.Normalize(mean=[0.3], std=[0.4]),
        ]
    )


def _digits_eval():
    from torchvision.transforms import v2

    return v2.Normalize(mean=[0.3], std=[0.4])


def _natural_augment(size: int, mean, std, *, blur: bool):
    """SimCLR/BYOL-style augmentation for natural images (PIL in, float tensor out)."""
    from torchvision.transforms import v2

    ops = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if blur:
        k = max(3, (size // 10) | 1)
        ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


def _natural_eval(size: int, mean, std, *, resize: bool):
    from torchvision.transforms import v2

    ops = [v2.ToImage()]
    if resize:
        ops += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


def _digits(subset: int | None, image_size: int | None) -> DataBundle:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - sklearn is a dependency of the script
        raise DatasetError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    if image_size not in (None, 8):
        raise DatasetError(f"digits images are 8x8; --image-size {image_size} is not supported")
    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    labels = torch.tensor(d.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=540, random_state=0, stratify=d.target
    )
    idx_train, idx_test = torch.from_numpy(np.sort(idx_train)), torch.from_numpy(np.sort(idx_test))
    if subset is not None:
        idx_train = idx_train[:subset]
    tr_x, tr_y = images[idx_train], labels[idx_train]
    return DataBundle(
        name="digits",
        pretrain=TwoViews(tr_x, digits_augment()),
        probe_train=Labelled(tr_x, tr_y, _digits_eval()),
        probe_test=Labelled(images[idx_test], labels[idx_test], _digits_eval()),
        in_channels=1,
        image_size=8,
        num_classes=10,
    )


def _missing(name: str, data_dir: str, err: Exception) -> DatasetError:
    return DatasetError(
        f"{name} not found in {os.path.abspath(data_dir)}; pass --download or --data-dir "
        f"({type(err).__name__}: {err})"
    )


def _download_failed(name: str, data_dir: str, err: Exception) -> DatasetError:
    return DatasetError(
        f"could not download {name} into {os.path.abspath(data_dir)} ({type(err).__name__}: {err}); "
        f"check the network, or place the dataset there yourself and pass --data-dir"
    )


CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_FILES = {True: tuple(f"data_batch_{i}" for i in range(1, 6)), False: ("test_batch",)}
STL10_DIR = "stl10_binary"
_STL10_SIZE = 96


def read_cifar10(root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from its python version on disk: ``root/cifar-10-batches-py/data_batch_1..5`` (train)
    or ``test_batch``.  Each is a pickled dict (Python 2 strings, hence ``encoding="latin1"``) with
    ``"data"``, a uint8 ``(N, 3072)`` array of 32x32 images stored channel-major (1024 red, 1024
    green, 1024 blue values, each row-major), and ``"labels"``, N ints in 0..9.  Returns uint8 images
    ``(N, 3, 32, 32)`` and int64 labels ``(N,)``.  Raises ``FileNotFoundError`` for a missing file and
    :class:`DatasetError` for one that does not parse.  (The files are pickles, as distributed: only
    read files from a source you trust.)"""
    images, labels = [], []
    for name in _CIFAR10_FILES[train]:
        path = os.path.join(root, CIFAR10_DIR, name)
        with open(path, "rb") as f:
            try:
                entry = pickle.load(f, encoding="latin1")
                data = np.asarray(entry["data"], dtype=np.uint8)
                lab = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64)
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
                raise DatasetError(f"cifar10: {path} is not a CIFAR-10 python batch ({type(e).__name__}: {e}); "
                                   f"delete {os.path.join(root, CIFAR10_DIR)} and pass --download") from e
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(lab) != len(data):
            raise DatasetError(f"cifar10: {path} holds data of shape {data.shape} and {len(lab)} labels; "
                               f"expected (N, 3072) and N labels")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(lab))
    return torch.cat(images), torch.cat(labels)


class STL10Binary(Dataset):
    """One STL-10 split in its binary format: ``X`` is uint8, ``N * 3 * 96 * 96`` bytes, each image
    channel-major with every channel stored column by column (Fortran order); ``y`` (optional) is
    uint8 labels 1..10, returned 0-based (-1 without labels, the unlabelled split).  Items are
    ``(uint8 tensor (3, 96, 96), label)``; the images are memory-mapped (opened lazily, per process)."""

    def __init__(self, x_path: str, y_path: str | None = None) -> None:
        per_image = 3 * _STL10_SIZE * _STL10_SIZE
        size = os.path.getsize(x_path)  # FileNotFoundError when missing
        if size == 0 or size % per_image:
            raise DatasetError(f"stl10: {x_path} has {size} bytes, not a multiple of {per_image} (3x96x96 images); "
                               f"delete {os.path.dirname(x_path)} and pass --download")
        self.x_path, self.n = x_path, size // per_image
        self.labels = None
        if y_path is not None:
            y = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
            if len(y) != self.n or (len(y) and (y.min() < 0 or y.max() > 9)):
                raise DatasetError(f"stl10: {y_path} holds {len(y)} labels (expected {self.n}, each 1..10)")
            self.labels = torch.from_numpy(y)
        self._x: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self._x is None:
            self._x = np.memmap(self.x_path, dtype=np.uint8, mode="r",
                                shape=(self.n, 3, _STL10_SIZE, _STL10_SIZE))
        img = torch.from_numpy(np.ascontiguousarray(self._x[i].transpose(0, 2, 1)))
        return img, (int(self.labels[i]) if self.labels is not None else -1)

    def __getstate__(self):  # workers open their own memory map
        return {**self.__dict__, "_x": None}


def read_stl10(root: str, split: str) -> Dataset:
    """STL-10 split ``"train"``, ``"test"``, ``"unlabeled"`` or ``"train+unlabeled"`` from
    ``root/stl10_binary`` (see :class:`STL10Binary`).  ``FileNotFoundError`` for a missing file."""
    d = os.path.join(root, STL10_DIR)
    parts = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
             "unlabeled": ("unlabeled_X.bin", None)}
    if split == "train+unlabeled":
        return ConcatDataset([read_stl10(root, "train"), read_stl10(root, "unlabeled")])
    x, y = parts[split]
    return STL10Binary(os.path.join(d, x), os.path.join(d, y) if y else None)


def _download(name: str, data_dir: str) -> None:
    """Fetch and extract ``name`` with torchvision (which verifies the archive's MD5)."""
    from torchvision import datasets

    try:
        if name == "cifar10":
            datasets.CIFAR10(data_dir, train=True, download=True)
        else:
            datasets.STL10(data_dir, split="train", download=True)
    except (RuntimeError, OSError, ValueError) as e:  # network errors (URLError is an OSError), bad archives
        raise _download_failed(name, data_dir, e) from e


def _natural(name: str, data_dir: str, download: bool, subset: int | None, image_size: int | None) -> DataBundle:
    """cifar10 / stl10 from their on-disk formats (read by :func:`read_cifar10` / :func:`read_stl10`)."""

    def read(fn, *a):
        try:
            return fn(data_dir, *a)
        except FileNotFoundError as e:
            raise _missing(name, data_dir, e) from e

    if download:
        try:
            read(read_cifar10, False) if name == "cifar10" else read(read_stl10, "test")
        except DatasetError:
            _download(name, data_dir)
    if name == "cifar10":
        size = image_size or 32
        mean, std = _CIFAR_MEAN, _CIFAR_STD
        tr_x, tr_y = read(read_cifar10, True)
        te_x, te_y = read(read_cifar10, False)
        if subset is not None:
            tr_x, tr_y = tr_x[:subset], tr_y[:subset]
        pre_base, train, test = tr_x, (tr_x, tr_y), (te_x, te_y)
    else:  # stl10
        size = image_size or 64
        mean, std = _IMAGENET_MEAN, _IMAGENET_STD
        pre_base = read(read_stl10, "train+unlabeled")
        train = read(read_stl10, "train")
        test = read(read_stl10, "test")
        if subset is not None:
            pre_base = Subset(pre_base, range(min(subset, len(pre_base))))
            train = Subset(train, range(min(subset, len(train))))
    native = 32 if name == "cifar10" else 96
    aug = _natural_augment(size, mean, std, blur=size >= 64)
    ev = _natural_eval(size, mean, std, resize=size != native)
    probe = [Labelled(*t, ev) if isinstance(t, tuple) else Labelled(t, None, ev) for t in (train, test)]
    return DataBundle(
        name=name,
        pretrain=TwoViews(pre_base, aug),
        probe_train=probe[0],
        probe_test=probe[1],
        in_channels=3,
        image_size=size,
        num_classes=10,
    )


def _imagefolder(data_dir: str, subset: int | None, image_size: int | None) -> DataBundle:
    from torchvision import datasets

    root = os.path.abspath(data_dir)
    if not os.path.isdir(root):
        raise DatasetError(f"imagefolder: {root} is not a directory; pass --data-dir PATH "
                           f"(PATH/train and PATH/val with one folder per class, or one class-folder tree)")
    size = image_size or 64
    aug = _natural_augment(size, _IMAGENET_MEAN, _IMAGENET_STD, blur=size >= 64)
    ev = _natural_eval(size, _IMAGENET_MEAN, _IMAGENET_STD, resize=True)
    try:
        if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
            train = datasets.ImageFolder(os.path.join(root, "train"))
            test = datasets.ImageFolder(os.path.join(root, "val"))
            if train.classes != test.classes:
                raise DatasetError(f"imagefolder: class folders of {root}/train and {root}/val differ")
        else:
            full = datasets.ImageFolder(root)
            perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(0)).tolist()
            cut = int(0.8 * len(full))
            train, test = Subset(full, perm[:cut]), Subset(full, perm[cut:])
            train.classes = full.classes  # type: ignore[attr-defined]
    except (FileNotFoundError, OSError) as e:
        raise DatasetError(f"imagefolder: no usable images under {root} ({e})") from e
    classes = len(train.classes)  # type: ignore[attr-defined]
    if subset is not None:
        train = Subset(train, range(min(subset, len(train))))
    return DataBundle(
        name="imagefolder",
        pretrain=TwoViews(train, aug),
        probe_train=Labelled(train, None, ev),
        probe_test=Labelled(test, None, ev),
        in_channels=3,
        image_size=size,
        num_classes=classes,
    )


def load_dataset(
    name: str,
    *,
    data_dir: str = "data",
    download: bool = False,
    subset: int | None = None,
    image_size: int | None = None,
) -> DataBundle:
    """Load ``name`` (one of :data:`DATASETS`); see the module docstring.  ``subset`` keeps the first
    ``subset`` images of the pretraining and probe-training sets (for quick runs)."""
    if name == "digits":
        return _digits(subset, image_size)
    if name in ("cifar10", "stl10"):
        return _natural(name, data_dir, download, subset, image_size)
    if name == "imagefolder":
        return _imagefolder(data_dir, subset, image_size)
    raise DatasetError(f"dataset: expected one of {DATASETS}, got {name!r}")
