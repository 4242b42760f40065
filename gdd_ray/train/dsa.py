"""Differentiable Siamese Augmentation (Zhao & Bilen, 2021) as the evaluation protocol uses it.

With the standard strategy 'color_crop_cutout_flip_scale_rotate' ONE op is drawn per batch (DSA's
aug_mode 'S'), then applied with per-image random parameters; 'color' is brightness, saturation and
contrast in turn. The parameters are DSA's ParamDiffAug defaults. Unlike the reference code, every
random number comes from one `torch.Generator` on the images' device: a run is reproducible from its
seed, and nothing waits on the host (the reference builds its affine matrices in Python lists).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F

from gdd_ray.config import DsaOp
from gdd_ray.plan import derive_seed

OPS = get_args(DsaOp)
STANDARD_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class DSAParams:
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0  # degrees
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5  # side of the cut square, as a fraction of the image side
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


def _rand(n: int, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, device=x.device, generator=g, dtype=x.dtype)


def brightness(x: torch.Tensor, p: DSAParams, g: torch.Generator) -> torch.Tensor:
    return x + (_rand(x.shape[0], x, g).view(-1, 1, 1, 1) - 0.5) * p.brightness


def saturation(x: torch.Tensor, p: DSAParams, g: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_rand(x.shape[0], x, g).view(-1, 1, 1, 1) * p.saturation) + mean


def contrast(x: torch.Tensor, p: DSAParams, g: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_rand(x.shape[0], x, g).view(-1, 1, 1, 1) + p.contrast) + mean


def color(x: torch.Tensor, p: DSAParams, g: torch.Generator) -> torch.Tensor:
    return contrast(saturation(brightness(x, p, g), p, g), p, g)


def crop(x: torch.Tensor, p: DSAParams, g: torch.Generator) -> torch.Tensor:
    """Pad by 1 px of zeros and translate by up to ratio*size px (the outside repeats the zero border)."""
    n, _, h, w = x.shape
    sx, sy = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
    tx = torch.randint(-sx, sx + 1, (n, 1, 1), device=x.device, generator=g)
    ty = torch.randint(-sy, sy + 1, (n, 1, 1), device=x.device, generator=g)
    gx = torch.arange(h, device=x.device).view(1, h, 1)
    gy = torch.arange(w, device=x.device).view(1, 1, w)
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded[batch, gx, gy].permute(0, 3, 1, 2).contiguous()


def cutout(x: torch.Tensor, p: DSAParams, g: torch.Generator) -> torch.Tensor:
    """Zero one square of side ratio*size per image, centred anywhere (clipped at the border)."""
    n, _, h, w = x.shape
    ch, cw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device, generator=g)
    oy = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device, generator=g)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    # Same pixels as the reference's clamped index grid: [o - c//2, o - c//2 + c) intersected with the image.
    x0, y0 = ox - ch // 2, oy - cw // 2
    inside = (rows >= x0) & (rows < x0 + ch) & (cols >= y0) & (cols < y0 + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def flip(x: torch.Tensor, p: DSAParams, g: torch.Generator) -> torch.Tensor:
    r = _rand(x.shape[0], x, g).view(-1, 1, 1, 1)
    return torch.where(r < p.prob_flip, x.flip(3), x)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def scale(x: torch.Tensor, p: DSAParams, g: torch.Generator) -> torch.Tensor:
    n, r = x.shape[0], p.ratio_scale
    sx = _rand(n, x, g) * (r - 1.0 / r) + 1.0 / r
    sy = _rand(n, x, g) * (r - 1.0 / r) + 1.0 / r
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    return _affine(x, theta)


def rotate(x: torch.Tensor, p: DSAParams, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    a = (_rand(n, x, g) - 0.5) * 2 * p.ratio_rotate / 180 * math.pi
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.stack(
        [torch.stack([cos, -sin, torch.zeros_like(a)], 1), torch.stack([sin, cos, torch.zeros_like(a)], 1)], 1
    )
    return _affine(x, theta)


FUNCTIONS = {"color": color, "crop": crop, "cutout": cutout, "flip": flip, "scale": scale, "rotate": rotate}


def parse_strategy(strategy: str) -> tuple[str, ...]:
    if strategy.lower() == "none" or not strategy:
        return ()
    ops = tuple(strategy.split("_"))
    bad = [o for o in ops if o not in FUNCTIONS]
    if bad:
        raise ValueError(f"unknown DSA op(s) {bad}: choose from {OPS}")
    return ops


class DSA:
    """Callable batch augmenter: draws one op of the strategy per call, then its per-image parameters."""

    def __init__(self, strategy: str, device: torch.device | str, seed: int, params: DSAParams | None = None):
        self.ops = parse_strategy(strategy)
        self.params = params or DSAParams()
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        # The op is chosen on the host from its own generator: reading a GPU random number back with
        # .item() would be a CPU-GPU sync point on every batch.
        self.op_generator = torch.Generator()
        self.op_generator.manual_seed(derive_seed(seed, "dsa-op"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ops:
            return x
        i = int(torch.randint(len(self.ops), (1,), generator=self.op_generator))
        return FUNCTIONS[self.ops[i]](x, self.params, self.generator)

    def state(self) -> dict[str, torch.Tensor]:
        return {"device": self.generator.get_state(), "op": self.op_generator.get_state()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["device"])
        self.op_generator.set_state(state["op"])
