"""Networks for the training script (:mod:`kernelssl.train`): backbones, MLP heads, EMA targets.

* ``smallcnn`` -- four 3x3 conv layers (BatchNorm, ReLU, one 2x2 max-pool) and a global average
  pool; for tiny images (sklearn's 8x8 digits), works at any input size.
* ``resnet18`` -- torchvision's ResNet-18 with the small-image stem used for CIFAR-sized inputs
  (3x3 stride-1 first convolution, no max-pool) and no classifier; 512-d features.

The projector and predictor are the usual SSL heads: ``Linear -> BatchNorm -> ReLU -> Linear``
(``layers`` hidden blocks).  :func:`ema_update` updates a gradient-free target copy in place.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["ARCHS", "SmallCNN", "build_backbone", "mlp", "SSLNet", "make_target", "ema_update", "ema_momentum"]

ARCHS = ("smallcnn", "resnet18")


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """A small convolutional encoder for tiny images.

    ``conv(c -> w) conv(w -> 2w) maxpool2 conv(2w -> 4w) conv(4w -> 4w) global-avg-pool``, each conv
    3x3 + BatchNorm + ReLU.  Output ``(B, 4w)`` (``feature_dim``).
    """

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_block(in_channels, w),
            *_conv_block(w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_block(2 * w, 4 * w),
            *_conv_block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _resnet18_small(in_channels: int) -> nn.Module:
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.feature_dim = 512
    return net


def build_backbone(arch: str, in_channels: int, *, width: int = 32) -> nn.Module:
    """The encoder for ``arch`` (one of :data:`ARCHS`); it has a ``feature_dim`` attribute."""
    if arch == "smallcnn":
        return SmallCNN(in_channels, width)
    if arch == "resnet18":
        return _resnet18_small(in_channels)
    raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")


def mlp(in_dim: int, hidden_dim: int, out_dim: int, *, layers: int = 1) -> nn.Sequential:
    """``layers`` blocks of ``Linear -> BatchNorm1d -> ReLU`` then a final ``Linear`` to ``out_dim``."""
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers):
        mods += [nn.Linear(d, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        d = hidden_dim
    mods.append(nn.Linear(d, out_dim))
    return nn.Sequential(*mods)


class SSLNet(nn.Module):
    """Backbone + projector (+ optional predictor).  ``forward(x)`` returns ``(projection, prediction)``;
    the prediction is ``None`` without a predictor."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = self.projector(self.backbone(x))
        return z, (self.predictor(z) if self.predictor is not None else None)


def make_target(online: SSLNet) -> SSLNet:
    """A gradient-free copy of ``online``'s backbone and projector (no predictor): the EMA target."""
    target = SSLNet(copy.deepcopy(online.backbone), copy.deepcopy(online.projector))
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: SSLNet, online: SSLNet, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * online`` for the parameters of the backbone and
    projector; buffers (BatchNorm statistics) are copied."""
    for part in ("backbone", "projector"):
        t_mod, o_mod = getattr(target, part), getattr(online, part)
        t_params = list(t_mod.parameters())
        o_params = [p.detach() for p in o_mod.parameters()]
        torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)
        for tb, ob in zip(t_mod.buffers(), o_mod.buffers()):
            tb.copy_(ob)


def ema_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's cosine schedule: ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2`` (base -> 1)."""
    if total_steps <= 0:
        return base
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1.0) / 2.0
