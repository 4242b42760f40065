"""ConvNet: the evaluation model of the dataset-distillation literature (DC, DSA, DM, MTT, the ECCV 2024 challenge).

Each block is conv 3x3 (padding 1) -> norm -> activation -> pool 2x2, then one linear classifier. ConvNetD3
(depth 3, width 128, instance norm, ReLU, average pooling) has 504,420 parameters for CIFAR-100 at 32 px and
1,938,120 for Tiny-ImageNet at 64 px.
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import nn

from gdd_ray.config import Activation, Norm, Pooling, TrainConfig

NORMS, ACTS, POOLS = get_args(Norm), get_args(Activation), get_args(Pooling)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":  # the DC codebase's "instancenorm": GroupNorm with one group per channel, affine
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels, track_running_stats=True)
    if kind == "group":
        return nn.GroupNorm(4, channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: choose from {NORMS}")


def _act(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leakyrelu":
        return nn.LeakyReLU(0.01)
    if kind == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"unknown activation {kind!r}: choose from {ACTS}")


def _pool(kind: str) -> nn.Module:
    if kind == "avg":
        return nn.AvgPool2d(2, 2)
    if kind == "max":
        return nn.MaxPool2d(2, 2)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown pooling {kind!r}: choose from {POOLS}")


class ConvNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        image_size: int,
        depth: int = 3,
        width: int = 128,
        norm: Norm = "instance",
        act: Activation = "relu",
        pool: Pooling = "avg",
        channels: int = 3,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = channels, image_size
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), _norm(norm, width), _act(act)]
            c = width
            if pool != "none":
                layers.append(_pool(pool))
                size //= 2
        if size < 1:
            raise ValueError(f"depth {depth} pools a {image_size}px image away; use a smaller depth")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * size * size, num_classes)

    @classmethod
    def from_config(cls, t: TrainConfig, num_classes: int, image_size: int) -> ConvNet:
        return cls(num_classes, image_size, t.net_depth, t.net_width, t.net_norm, t.net_act, t.net_pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
