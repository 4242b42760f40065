"""Post data augmentation (PDA): the paper's recipe as named ops over batched uint8 image tensors.

The default recipe is the paper's code (albumentations there):
    hflip               p=0.8
    vflip               p=0.8
    brightness_contrast p=0.5, brightness +-0.2 (added, in units of the max value), contrast +-0.2 (a gain)
    rotate              p=0.8, angle uniform in +-60 degrees, bilinear, reflected borders
    gamma               p=0.5, gamma uniform in [0.8, 1.2]

`pda_ops` in the config replaces the recipe: a mapping op name -> parameters, applied in the mapping's
order; a parameter left out keeps the default above, an op left out is not applied.

Determinism: every random choice of one augmented image comes from its own generator, seeded by
`gdd_ray.plan.variant_seed(image_seed, variant)`, and the same number of draws is made whatever was chosen. So an
image's pixels depend on (its seed, the variant, the recipe) only, never on the batch it shares or the
worker that ran it. The ops are batched: flips through torchvision.transforms.v2 on the selected
sub-batch; colour ops as per-image gains on the whole batch; rotation as one `grid_sample` with a
per-image angle (v2's rotate takes one angle per call and fills borders instead of reflecting them).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as F

from gdd_ray.augment.recipe import BORDERS, Recipe, sample_params


def _rotate(x: torch.Tensor, degrees: torch.Tensor, border: str) -> torch.Tensor:
    """Rotate each image of x (N,C,H,W float) about its centre by its own angle, counter-clockwise."""
    t = degrees * (math.pi / 180.0)
    cos, sin = torch.cos(t), torch.sin(t)
    zero = torch.zeros_like(t)
    h, w = x.shape[-2:]
    # affine_grid maps output -> input in normalised coords; the aspect terms keep non-square images unsheared.
    theta = torch.stack(
        [torch.stack([cos, sin * h / w, zero], -1), torch.stack([-sin * w / h, cos, zero], -1)], dim=1
    ).to(x.dtype)
    grid = nnf.affine_grid(theta, list(x.shape), align_corners=False)
    return nnf.grid_sample(x, grid, mode="bilinear", padding_mode=BORDERS[border], align_corners=False)


def augment(images: torch.Tensor, seeds: list[int], recipe: Recipe) -> torch.Tensor:
    """(N,3,H,W) uint8 + one variant seed per image -> (N,3,H,W) uint8 augmented images."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected an (N,C,H,W) uint8 batch, got {tuple(images.shape)} {images.dtype}")
    if len(seeds) != images.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {images.shape[0]} images")
    if not recipe or images.shape[0] == 0:
        return images.clone()
    x = F.to_dtype(images, torch.float32, scale=True)
    for (name, prm), d in zip(recipe, sample_params(recipe, seeds)):
        idx = torch.from_numpy(np.flatnonzero(d["apply"]))
        if idx.numel() == 0:
            continue
        sub = x[idx]
        if name == "hflip":
            sub = F.horizontal_flip(sub)
        elif name == "vflip":
            sub = F.vertical_flip(sub)
        elif name == "brightness_contrast":
            alpha = torch.from_numpy(d["alpha"]).to(x.dtype)[idx].view(-1, 1, 1, 1)
            beta = torch.from_numpy(d["beta"]).to(x.dtype)[idx].view(-1, 1, 1, 1)
            sub = (sub * alpha + beta).clamp_(0.0, 1.0)
        elif name == "rotate":
            sub = _rotate(sub, torch.from_numpy(d["angle"])[idx], prm["border"]).clamp_(0.0, 1.0)
        elif name == "gamma":
            g = torch.from_numpy(d["gamma"]).to(x.dtype)[idx].view(-1, 1, 1, 1)
            sub = sub.pow(g)
        x[idx] = sub
    return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
