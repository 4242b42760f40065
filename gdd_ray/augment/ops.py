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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as F

from gdd_ray.errors import UserError

# name -> default parameters. Order = the order the paper applies them.
DEFAULT_OPS: dict[str, dict[str, Any]] = {
    "hflip": {"p": 0.8},
    "vflip": {"p": 0.8},
    "brightness_contrast": {"p": 0.5, "brightness": 0.2, "contrast": 0.2},
    "rotate": {"p": 0.8, "degrees": 60.0, "border": "reflect"},
    "gamma": {"p": 0.5, "low": 0.8, "high": 1.2},
}
BORDERS = {"reflect": "reflection", "edge": "border", "zeros": "zeros"}

Recipe = list[tuple[str, dict[str, Any]]]


def resolve_ops(pda_ops: dict[str, Any] | None) -> Recipe:
    """The recipe to apply: [(op, full parameters)] in order, checked. Raises UserError naming the mistake."""
    if pda_ops is None:
        return [(name, dict(params)) for name, params in DEFAULT_OPS.items()]
    if not isinstance(pda_ops, dict):
        raise UserError(f"pda-ops must be a mapping of op name -> parameters, got {pda_ops!r}")
    recipe: Recipe = []
    for name, given in pda_ops.items():
        if name not in DEFAULT_OPS:
            raise UserError(f"pda-ops: unknown op '{name}'; choose from {', '.join(DEFAULT_OPS)}")
        given = {} if given is None else given
        if not isinstance(given, dict):
            raise UserError(f"pda-ops: '{name}' takes a mapping of parameters, got {given!r}")
        unknown = sorted(set(given) - set(DEFAULT_OPS[name]))
        if unknown:
            raise UserError(
                f"pda-ops: '{name}' has no parameter(s) {', '.join(unknown)}; it takes {', '.join(DEFAULT_OPS[name])}"
            )
        params = {**DEFAULT_OPS[name], **given}
        _check(name, params)
        recipe.append((name, params))
    return recipe


def _check(name: str, params: dict[str, Any]) -> None:
    def number(key: str, low: float, high: float) -> float:
        v = params[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (low <= v <= high):
            raise UserError(f"pda-ops: {name}.{key} must be a number in [{low}, {high}], got {v!r}")
        return float(v)

    number("p", 0.0, 1.0)
    if name == "brightness_contrast":
        number("brightness", 0.0, 1.0)
        number("contrast", 0.0, 1.0)
    elif name == "rotate":
        number("degrees", 0.0, 180.0)
        if params["border"] not in BORDERS:
            raise UserError(f"pda-ops: rotate.border must be one of {', '.join(BORDERS)}, got {params['border']!r}")
    elif name == "gamma":
        low, high = number("low", 0.01, 10.0), number("high", 0.01, 10.0)
        if low > high:
            raise UserError(f"pda-ops: gamma.low ({low}) must not exceed gamma.high ({high})")


def sample_params(recipe: Recipe, seeds: list[int]) -> list[dict[str, np.ndarray]]:
    """Per op, per image: whether it applies and its random values (one generator per image)."""
    draws = np.zeros((len(seeds), 3 * len(recipe)), dtype=np.float64)
    for i, s in enumerate(seeds):
        # Three draws per op whatever the op, so changing one op never shifts another op's randomness.
        draws[i] = np.random.default_rng(s).random(3 * len(recipe))
    out = []
    for k, (name, prm) in enumerate(recipe):
        u, a, b = draws[:, 3 * k], draws[:, 3 * k + 1], draws[:, 3 * k + 2]
        d: dict[str, np.ndarray] = {"apply": u < prm["p"]}
        if name == "brightness_contrast":
            d["beta"] = (2 * a - 1) * prm["brightness"]
            d["alpha"] = 1 + (2 * b - 1) * prm["contrast"]
        elif name == "rotate":
            d["angle"] = (2 * a - 1) * prm["degrees"]
        elif name == "gamma":
            d["gamma"] = prm["low"] + a * (prm["high"] - prm["low"])
        out.append(d)
    return out


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
