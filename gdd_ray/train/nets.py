"""The networks of cross-architecture evaluation, as the DC/DSA/MTT code (`networks.py`) defines them.

    convnet       the --net-* ConvNet (train.convnet; ConvNet-3 = ConvNetD3 by default), unchanged
    convnet-bn    the same ConvNet with batch norm
    alexnet       5 convs (128-192-256-192-192), 3 max-pools, one linear layer; -bn: a BatchNorm after each conv
    vgg11         VGG-11 (64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M), instance norm; -bn: batch norm
    resnet18      ResNet-18 with a 3x3 stem and no max-pool (the CIFAR variant), instance norm; -bn: batch norm

"Instance norm" is the DC code's: GroupNorm with one group per channel, affine. At the reference's 32 px every
layer and parameter count is the reference's (tests/test_train_nets.py counts them from the definitions); at
other sizes the classifier takes the feature map the size gives (ResNet-18 averages it to 1x1, which at 32 px
is the reference's avg_pool2d(4)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gdd_ray.config import NETS, TrainConfig, net_key
from gdd_ray.train.convnet import ConvNet


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.GroupNorm(channels, channels, affine=True) if kind == "instance" else nn.BatchNorm2d(channels)


class AlexNet(nn.Module):
    def __init__(self, num_classes: int, image_size: int, norm: str = "none"):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"AlexNet pools a {image_size}px image away (3 max-pools need >= 8 px)")

        def block(cin: int, cout: int, k: int, pad: int) -> list[nn.Module]:
            conv = [nn.Conv2d(cin, cout, kernel_size=k, padding=pad)]
            return conv + ([nn.BatchNorm2d(cout)] if norm == "batch" else []) + [nn.ReLU(inplace=True)]

        pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.features = nn.Sequential(
            *block(3, 128, 5, 2), pool,
            *block(128, 192, 5, 2), nn.MaxPool2d(2, 2),
            *block(192, 256, 3, 1), *block(256, 192, 3, 1), *block(192, 192, 3, 1), nn.MaxPool2d(2, 2),
        )  # fmt: skip
        side = image_size // 8
        self.fc = nn.Linear(192 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    def __init__(self, num_classes: int, image_size: int, norm: str = "instance"):
        super().__init__()
        if image_size < 32:
            raise ValueError(f"VGG-11 pools a {image_size}px image away (5 max-pools need >= 32 px)")
        layers: list[nn.Module] = []
        cin = 3
        for v in VGG11_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), _norm(norm, v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        side = image_size // 32
        self.classifier = nn.Linear(512 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, planes, kernel_size=1, stride=stride, bias=False), _norm(norm, planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int, image_size: int, norm: str = "instance"):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"ResNet-18 strides a {image_size}px image away (needs >= 8 px)")
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = _norm(norm, 64)
        layers, cin = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, planes, stride, norm), BasicBlock(planes, planes, 1, norm)))
            cin = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


def build(name: str, t: TrainConfig, num_classes: int, image_size: int) -> nn.Module:
    """A fresh network `name` (an --eval-nets name) for `num_classes` classes at `image_size` px."""
    key = net_key(name)
    base, _, bn = key.partition("-")
    norm = "batch" if bn else "instance"
    if base == "convnet":
        return ConvNet(
            num_classes, image_size, t.net_depth, t.net_width, "batch" if bn else t.net_norm, t.net_act, t.net_pool
        )
    if base == "alexnet":
        return AlexNet(num_classes, image_size, "batch" if bn else "none")
    if base == "vgg11":
        return VGG11(num_classes, image_size, norm)
    return ResNet18(num_classes, image_size, norm)


def display_name(name: str, t: TrainConfig | None = None) -> str:
    """The name a table shows: DD-Ranking's, with the ConvNet's own depth when it is not 3."""
    key = net_key(name)
    if key.startswith("convnet") and t is not None and t.net_depth != 3:
        return NETS[key].replace("ConvNet-3", f"ConvNet-{t.net_depth}")
    return NETS[key]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
