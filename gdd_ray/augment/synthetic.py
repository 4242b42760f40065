"""Stand-in generated shards (patterned images, no diffusion model) for tests and the PDA benchmark.

They are written exactly as the generate stage writes its shards (same plan, names, seeds, columns and
footer), so the augment stage and the exports cannot tell them apart from real ones.
"""

from __future__ import annotations

import numpy as np

from gdd_ray.classes import ClassInfo
from gdd_ray.config import RunConfig
from gdd_ray.generate import shards
from gdd_ray.generate.plan import image_seed, plan_units
from gdd_ray.run import RunDir


def pattern_image(seed: int, size: int) -> np.ndarray:
    """An asymmetric picture (gradient, a bar, a disc) so that flips and rotations are visible."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    base = rng.uniform(0, 255, 3).astype(np.float32)
    img = np.stack([base[c] * (0.3 + 0.7 * (xx if c == 0 else yy if c == 1 else 1 - xx)) for c in range(3)], -1)
    bar = slice(size // 8, size // 8 + max(1, size // 8))
    img[bar, : size * 3 // 4] = rng.uniform(0, 255, 3)
    cy, cx, r = rng.uniform(0.4, 0.8), rng.uniform(0.2, 0.6), rng.uniform(0.1, 0.2)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return img.clip(0, 255).astype(np.uint8)


def write_generated(cfg: RunConfig, run_dir: RunDir, classes: list[ClassInfo], fingerprint: str) -> list[str]:
    """Write every shard of the run's plan under OUT/generated; returns their names."""
    names = []
    size = cfg.image_size
    for unit in plan_units(len(classes), cfg.ipc, cfg.generate.unit_size):
        c = classes[unit.label]
        seeds = [image_seed(cfg.seed, unit.label, i) for i in range(unit.start, unit.stop)]
        pngs = [shards.encode_png(pattern_image(s, size)) for s in seeds]
        rows = shards.ShardRows(unit, c.class_id, c.name, c.prompt(cfg.generate.prompt_template), seeds)
        shards.write_shard(run_dir.generated, unit, shards.build_table(rows, pngs), fingerprint, size)
        names.append(unit.shard_name)
    return names
