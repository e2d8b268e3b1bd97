"""The training script's evaluation: linear and k-NN probes of frozen features, and their uniformity."""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from torch import nn

from ..functional import uniformity as _uniformity
from .data import DataBundle

__all__ = ["extract_features", "linear_probe", "knn_probe", "feature_uniformity", "evaluate", "PROBE_UNIFORMITY_T"]


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
    fewest = min(int((y == c).sum()) for c in np.unique(y))
    if per_class > fewest:  # said, not silent: the run's results record the labels asked for
        warnings.warn(f"--probe-labels {per_class}: a class has only {fewest} probe-train images; every image of "
                      f"such a class is used", RuntimeWarning, stacklevel=2)
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
    if k > len(a):  # said, not silent: the run's results record the k asked for
        warnings.warn(f"--knn-k {k}: only {len(a)} probe-train images; k = {len(a)} is used", RuntimeWarning,
                      stacklevel=2)
        k = len(a)
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
