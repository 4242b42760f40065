"""ConvNet: the evaluation model of the dataset-distillation literature (DC, DSA, DM, MTT, the ECCV 2024 challenge).

Each block is conv 3x3 (padding 1) -> norm -> activation -> pool 2x2, then one linear classifier. ConvNetD3
(depth 3, width 128, instance norm, ReLU, average pooling) has 504,420 parameters for CIFAR-100 at 32 px and
1,938,120 for Tiny-ImageNet at 64 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NORMS = ("instance", "batch", "group", "none")
ACTS = ("relu", "leakyrelu", "sigmoid")
POOLS = ("avg", "max", "none")


@dataclass(frozen=True)
class NetSpec:
    channels: int = 3
    num_classes: int = 10
    image_size: int = 32
    depth: int = 3
    width: int = 128
    norm: str = "instance"
    act: str = "relu"
    pool: str = "avg"


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
    def __init__(self, spec: NetSpec):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = spec.channels, spec.image_size
        for _ in range(spec.depth):
            layers += [nn.Conv2d(c, spec.width, 3, padding=1), _norm(spec.norm, spec.width), _act(spec.act)]
            c = spec.width
            if spec.pool != "none":
                layers.append(_pool(spec.pool))
                size //= 2
        if size < 1:
            raise ValueError(f"depth {spec.depth} pools a {spec.image_size}px image away; use a smaller depth")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * size * size, spec.num_classes)
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
