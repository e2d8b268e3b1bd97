"""Does each loss learn when dropped into a plain lightly-style two-view loop?

No EMA target, no predictor, no recipe: a backbone, a lightly-style projection head
(Linear -> BatchNorm -> ReLU -> Linear), two augmentations per image, ``loss = criterion(z0, z1)`` on
the RAW projector outputs, Adam.  On scikit-learn's digits with kernelssl's own data and model code
(lightly itself is not needed).  Reports the mean row norm of the projector outputs, then a cosine
k-NN (k = 20, all 1257 training labels) and a logistic-regression linear probe (5 labels per class,
5 draws) of the frozen backbone, against the same backbone at its random initialisation.  Run from the
repository root::

    PYTHONPATH=. python benchmarks/lightly_style_digits.py [--epochs 15] [--seed 0]

Configurations: ``HSICLoss(normalize=False)`` (raw embeddings), ``HSICLoss()`` (the default,
``normalize=True``), with the paper's learned scale, with gamma = 1 (normalised or not),
``SFRIKLoss(sim_weight=4000 q / 8192)``, ``MECLoss()``.  About 10 minutes on 2 busy CPU cores.
"""
from __future__ import annotations

import argparse
import copy
import time
from types import SimpleNamespace

import torch
from torch import nn

from kernelssl.losses import HSICLoss, MECLoss, SFRIKLoss
from kernelssl.train import evaluate
from kernelssl.train.data import load_dataset
from kernelssl.train.models import build_backbone

Q = 128  # projector output dim


def head(in_dim: int) -> nn.Module:  # lightly's ProjectionHead layout (SimCLR/BYOL style)
    return nn.Sequential(nn.Linear(in_dim, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, Q))


def run(name: str, make_loss, data, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    backbone = build_backbone("smallcnn", 1, width=16)
    projector = head(backbone.feature_dim)
    init = copy.deepcopy(backbone)
    criterion = make_loss()
    params = list(backbone.parameters()) + list(projector.parameters()) + list(criterion.parameters())
    opt = torch.optim.Adam(params, lr=2e-3, weight_decay=1e-5)
    loader = torch.utils.data.DataLoader(data.pretrain, batch_size=128, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    norms, losses = [], []
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x0, x1 in loader:
            z0, z1 = projector(backbone(x0)), projector(backbone(x1))
            norms.append(float(z0.detach().norm(dim=1).mean()))
            loss = criterion(z0, z1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    args = SimpleNamespace(probe_labels=5, probe_repeats=5, probe_c=1.0, knn_k=20)
    out = {"name": name, "seconds": seconds, "norm_first": norms[0], "norm_last": norms[-1],
           "loss_first": losses[0], "loss_last": losses[-1]}
    for tag, net in (("trained", backbone), ("init", init)):
        ev = evaluate(net, data, args, torch.device("cpu"))
        out[f"{tag}_knn_all_labels"] = ev["knn_acc_all_labels"]
        out[f"{tag}_linear_5_labels"] = ev["linear_probe_acc"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("digits")
    configs = [
        ("HSICLoss(normalize=False) [raw embeddings]", lambda: HSICLoss(normalize=False)),
        ("HSICLoss() [default: normalize=True]", lambda: HSICLoss()),
        ("HSICLoss(learn_scale=True)", lambda: HSICLoss(learn_scale=True)),
        ("HSICLoss(gamma=1)", lambda: HSICLoss(gamma=1.0)),
        ("HSICLoss(gamma=1, normalize=False)", lambda: HSICLoss(gamma=1.0, normalize=False)),
        ("SFRIKLoss(sim_weight=4000*q/8192)", lambda: SFRIKLoss(sim_weight=4000.0 * Q / 8192)),
        ("MECLoss()", lambda: MECLoss()),
    ]
    print(f"digits, smallcnn width 16, lightly-style head to q = {Q}, batch 128, Adam 2e-3, "
          f"{a.epochs} epochs, seed {a.seed}")
    print(f"{'loss':45s} {'|z| first/last':>15s} {'loss first/last':>20s} {'kNN init->trained':>18s} "
          f"{'lin5 init->trained':>19s} {'s':>5s}")
    for name, make in configs:
        r = run(name, make, data, a.epochs, a.seed)
        print(f"{name:45s} {r['norm_first']:6.2f}/{r['norm_last']:<8.2f} "
              f"{r['loss_first']:9.4g}/{r['loss_last']:<10.4g} "
              f"{r['init_knn_all_labels']:.3f} -> {r['trained_knn_all_labels']:.3f}    "
              f"{r['init_linear_5_labels']:.3f} -> {r['trained_linear_5_labels']:.3f} {r['seconds']:5.0f}",
              flush=True)


if __name__ == "__main__":
    main()
