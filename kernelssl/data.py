"""Datasets and augmentations for the training script (:mod:`kernelssl.train`).

``load_dataset(name, ...)`` returns a :class:`DataBundle`: an unlabelled two-view pretraining set
and the labelled train/test sets of the evaluation (no augmentation).

* ``digits`` -- scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; no network).
  A fixed stratified split (``random_state=0``, independent of ``--seed``): 1257 training images
  (pretraining pool and probe labels) and 540 held-out test images.
* ``cifar10``, ``stl10`` -- torchvision datasets under ``data_dir`` (``download=True`` fetches them).
  STL-10 pretrains on ``train+unlabeled``, probes on ``train``, tests on ``test``.
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
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

__all__ = ["DATASETS", "DatasetError", "DataBundle", "load_dataset", "digits_augment"]

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
        f"(torchvision said: {err})"
    )


def _download_failed(name: str, data_dir: str, err: Exception) -> DatasetError:
    return DatasetError(
        f"could not download {name} into {os.path.abspath(data_dir)} ({type(err).__name__}: {err}); "
        f"check the network, or place the dataset there yourself and pass --data-dir"
    )


def _torchvision(name: str, data_dir: str, download: bool, subset: int | None, image_size: int | None) -> DataBundle:
    from torchvision import datasets

    def make(cls, **kw):
        try:
            return cls(data_dir, download=download, **kw)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. ..."
            if download:
                raise _download_failed(name, data_dir, e) from e
            raise _missing(name, data_dir, e) from e
        except (OSError, ValueError) as e:  # network errors (URLError is an OSError), bad archives
            if download:
                raise _download_failed(name, data_dir, e) from e
            raise DatasetError(f"{name} in {os.path.abspath(data_dir)} is unreadable ({type(e).__name__}: {e}); "
                               f"delete it and pass --download") from e

    if name == "cifar10":
        size = image_size or 32
        mean, std = _CIFAR_MEAN, _CIFAR_STD
        train = make(datasets.CIFAR10, train=True)
        test = make(datasets.CIFAR10, train=False)
        pre_base = train
        classes = 10
    else:  # stl10
        size = image_size or 64
        mean, std = _IMAGENET_MEAN, _IMAGENET_STD
        pre_base = make(datasets.STL10, split="train+unlabeled")
        train = make(datasets.STL10, split="train")
        test = make(datasets.STL10, split="test")
        classes = 10
    native = 32 if name == "cifar10" else 96
    if subset is not None:
        pre_base = Subset(pre_base, range(min(subset, len(pre_base))))
        train = Subset(train, range(min(subset, len(train))))
    aug = _natural_augment(size, mean, std, blur=size >= 64)
    ev = _natural_eval(size, mean, std, resize=size != native)
    return DataBundle(
        name=name,
        pretrain=TwoViews(pre_base, aug),
        probe_train=Labelled(train, None, ev),
        probe_test=Labelled(test, None, ev),
        in_channels=3,
        image_size=size,
        num_classes=classes,
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
        return _torchvision(name, data_dir, download, subset, image_size)
    if name == "imagefolder":
        return _imagefolder(data_dir, subset, image_size)
    raise DatasetError(f"dataset: expected one of {DATASETS}, got {name!r}")
