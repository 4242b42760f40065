"""The per-shard worker: one generated shard in, one augmented shard (same name) out.

The output holds the generated columns plus `variant` (0 = the original, its PNG bytes untouched) and
`variant_seed` (the seed the variant was drawn from: its own, or a redraw's when the first draw repeated an
image), image-major (the contract in gdd_ray.shards). No variant repeats its original or an earlier variant
of the same image, pixel for pixel, unless no draw of the recipe changes that image (_redraw_repeats). Its footer names the input, the recipe's
fingerprint and the row count, so completeness is judged from the footer alone.

The worker knows nothing of Ray: the stage maps it over shard names with Ray Data, tests call it directly.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gdd_ray import shards, storage
from gdd_ray.augment.recipe import Recipe
from gdd_ray.plan import derive_seed, variant_seed


def augment_table(table: pa.Table, variants: int, recipe: Recipe) -> pa.Table:
    """Generated rows -> the originals and `variants` augmented copies of each, image-major."""
    n = table.num_rows
    k1 = variants + 1
    raw = shards.png_bytes(table)
    paths = table.column("image").combine_chunks().field("path").to_pylist()
    seeds = table.column("seed").to_pylist()

    out_bytes: list[list[bytes]] = [[b] for b in raw]  # variant 0 keeps the generated PNG bit for bit
    used_seeds = [[variant_seed(s, v) for v in range(k1)] for s in seeds]
    if variants and n:
        import torch  # here, where pixels are made: the driver's checks never pay for torch

        from gdd_ray.augment import ops

        pixels = torch.from_numpy(np.stack([shards.decode_png(b) for b in raw])).permute(0, 3, 1, 2)
        batch = pixels.repeat(variants, 1, 1, 1)  # variant-major: rows v*n .. v*n+n-1 are variant v+1
        vseeds = [variant_seed(s, v) for v in range(1, k1) for s in seeds]
        augmented = ops.augment(batch, vseeds, recipe).permute(0, 2, 3, 1).contiguous().numpy()
        augmented = _redraw_repeats(pixels, augmented, vseeds, recipe, used_seeds)
        for j in range(variants * n):
            out_bytes[j % n].append(shards.encode_png(augmented[j]))

    take = pa.array(np.repeat(np.arange(n), k1))
    out_paths = [variant_path(p, v) for p in paths for v in range(k1)]
    cols = {"image": shards.image_column([b for row in out_bytes for b in row], out_paths)}
    for name in shards.GENERATED_SCHEMA.names[1:]:
        cols[name] = table.column(name).take(take)
    cols["variant"] = pa.array([v for _ in range(n) for v in range(k1)], pa.int32())
    cols["variant_seed"] = pa.array([s for row in used_seeds for s in row], pa.int64())
    return pa.Table.from_pydict(cols, schema=shards.AUGMENTED_SCHEMA)


def _redraw_repeats(pixels, augmented: np.ndarray, vseeds: list[int], recipe: Recipe, used_seeds: list[list[int]]):
    """A variant whose pixels equal its original's or an earlier variant's of the same image (all ops skipped
    by their p, two flips making a turn of 180 degrees on a symmetric image, ...) is drawn again from
    redraw_seed(seed, attempt), variant by variant in order, until it differs or MAX_REDRAWS tries are spent
    (a recipe or image that no draw changes keeps its repeat). Deterministic: a variant depends on its own
    seed and on the variants before it of the same image only, so a run of smaller K is still a prefix.
    `used_seeds[i][v]` becomes the seed variant v of image i was drawn from (the shard's variant_seed column)."""
    from gdd_ray.augment import ops

    n = pixels.shape[0]
    if n == 0:
        return augmented
    variants = len(augmented) // n
    originals = pixels.permute(0, 2, 3, 1).numpy()
    for v in range(variants):
        rows = range(v * n, (v + 1) * n)
        for attempt in range(1, MAX_REDRAWS + 1):
            repeats = [j for j in rows if _repeats(augmented, originals, j, n)]
            if not repeats:
                break
            seeds = [redraw_seed(vseeds[j], attempt) for j in repeats]
            again = ops.augment(pixels[[j % n for j in repeats]], seeds, recipe).permute(0, 2, 3, 1).numpy()
            for j, s, img in zip(repeats, seeds, again):
                augmented[j] = img
                used_seeds[j % n][v + 1] = s
    return augmented


MAX_REDRAWS = 8  # p(no change) of the paper's recipe is ~0.5 %: 8 redraws leave ~1e-18 of images unchanged


def redraw_seed(seed: int, attempt: int) -> int:
    """The seed of redraw `attempt` (1, 2, ...) of a variant first drawn from `seed`."""
    return derive_seed("gdd-ray-pda-redraw", int(seed), attempt)


def _repeats(augmented: np.ndarray, originals: np.ndarray, j: int, n: int) -> bool:
    """Variant row j (variant-major) equals its image's original or one of its earlier variants."""
    img = augmented[j]
    if np.array_equal(img, originals[j % n]):
        return True
    return any(np.array_equal(img, augmented[k]) for k in range(j % n, j, n))


def variant_path(path: str, variant: int) -> str:
    stem = path[:-4] if path.endswith(".png") else path
    return f"{stem}_v{variant}.png"


def augment_shard(
    src: storage.Location, dst: storage.Location, name: str, variants: int, recipe: Recipe, fp: str
) -> dict[str, Any]:
    """Read generated shard `name` from src, write its augmented shard under the same name to dst."""
    t0 = time.perf_counter()
    pf = pq.ParquetFile(pa.BufferReader(src.read_bytes(name)))
    kv = storage.footer_metadata(pf.metadata)
    table = pf.read().replace_schema_metadata(None)
    out = augment_table(table, variants, recipe)
    footer = {
        shards.FINGERPRINT: fp,
        shards.SOURCE: name,
        shards.SOURCE_ROWS: str(table.num_rows),
        shards.SOURCE_FINGERPRINT: kv.get(shards.FINGERPRINT, ""),
        shards.VARIANTS: str(variants),
        shards.IMAGE_SIZE: kv.get(shards.IMAGE_SIZE, ""),
        shards.UNIT: kv.get(shards.UNIT, ""),  # the input's unit: the rows are its images, each with its variants
    }
    nbytes = shards.write_shard(dst, name, out, footer)
    return {
        "shard": name,
        "rows_in": table.num_rows,
        "rows_out": out.num_rows,
        "bytes": nbytes,
        "seconds": time.perf_counter() - t0,
    }
