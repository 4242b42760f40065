"""The soft-label teacher: a torchvision ResNet state dict or a TorchScript file, loaded onto the training device.

A state dict is read with `torch.load(weights_only=True)`: tensors only, never arbitrary pickled objects. Its
architecture is read from its keys (BasicBlock or Bottleneck, blocks per stage, classes) and built as
torchvision's ResNet adapted to small images the way SRe2L/RDED/D4M do for CIFAR and Tiny-ImageNet: a 3x3
stride-1 stem and no max-pool (a stem of 7x7 in the file is kept as it is: an ImageNet teacher). A TorchScript
file (`torch.jit.save`) is run as it is.

The teacher sees the same augmented, normalised batch as the student, on the same device, under no_grad:
its logits never go to the host (tests/test_train_soft.py counts host reads).
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import BinaryIO

import torch
from torch import nn

from gdd_ray.errors import UserError


def _err(path: str, what: str) -> UserError:
    return UserError(f"--teacher {path}: {what}")


def _is_torchscript(source) -> bool:
    try:
        with zipfile.ZipFile(source) as z:
            return any("/code/" in n for n in z.namelist())  # torch.save archives hold data.pkl, no code/
    except (zipfile.BadZipFile, OSError):
        return False
    finally:
        if hasattr(source, "seek"):
            source.seek(0)


def resnet_from_state_dict(state: dict[str, torch.Tensor], path: str = "") -> nn.Module:
    """torchvision's ResNet with the blocks, classes and stem the keys describe, the weights loaded."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "fc.weight" not in state or "conv1.weight" not in state:
        raise _err(path, f"not a torchvision ResNet state dict (keys {sorted(state)[:4]}...)")
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        if not ids:
            raise _err(path, f"has no layer{stage}: not a torchvision ResNet state dict")
        blocks.append(max(ids) + 1)
    block = Bottleneck if any(k.endswith(".conv3.weight") for k in state) else BasicBlock
    model = ResNet(block, blocks, num_classes=int(state["fc.weight"].shape[0]))
    stem = state["conv1.weight"]
    if stem.shape[-1] == 3:  # the small-image teacher of SRe2L/RDED: 3x3 stride 1, no max-pool
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise _err(path, f"does not fit a torchvision ResNet ({str(e).splitlines()[0][:200]})") from e
    return model


def load_teacher(source: str | BinaryIO, device: torch.device | str, shown: str | None = None) -> nn.Module:
    """The teacher in eval mode on `device`, from its path or its bytes (the driver ships them to workers)."""
    shown = shown or str(source)
    if isinstance(source, str) and not os.path.isfile(source):
        raise _err(shown, "does not exist")
    if _is_torchscript(source):
        try:
            model = torch.jit.load(source, map_location=device)
        except Exception as e:  # torch raises many types for a bad file; all mean the same to the user
            raise _err(shown, f"not a loadable TorchScript file ({type(e).__name__}: {_first(e)})") from e
    else:
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:
            raise _err(shown, f"not a weights-only torch file ({type(e).__name__}: {_first(e)})") from e
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise _err(shown, "holds no state dict of tensors")
        model = resnet_from_state_dict(state, shown).to(device)
    model.eval()
    return model


def _first(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:200]


def check_classes(teacher: nn.Module, num_classes: int, image_size: int, device, path: str) -> None:
    """One forward pass on zeros: the teacher must give one logit per class of the run."""
    with torch.no_grad():
        out = teacher(torch.zeros(2, 3, image_size, image_size, device=device))
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise _err(path, f"gives outputs of shape {tuple(out.shape)}; the run has {num_classes} classes")
