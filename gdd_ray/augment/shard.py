"""The augmented-shard format and the per-shard worker: one generated shard in, one augmented shard out.

An augmented shard has the generated columns plus `variant` (0 = the original, its PNG bytes untouched)
and `variant_seed`; rows are image-major (image 0 variants 0..K, image 1 variants 0..K, ...). It is
named after its input shard and committed whole (storage.Location.write_bytes), so after any crash a
shard is either complete or absent; its footer says which input, recipe and row count it was made
for, so completeness is judged from the footer alone.

The worker knows nothing of Ray: the stage maps it over shard names with Ray Data, tests call it directly.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gdd_ray import storage
from gdd_ray.augment import ops
from gdd_ray.generate import shards

SCHEMA = shards.SCHEMA.append(pa.field("variant", pa.int32())).append(pa.field("variant_seed", pa.int64()))
META_SOURCE = "gdd_ray.source"
META_SOURCE_ROWS = "gdd_ray.source_rows"
META_SOURCE_FINGERPRINT = "gdd_ray.source_fingerprint"
META_VARIANTS = "gdd_ray.variants"


def _hf_features() -> str:
    feats = json.loads(shards.HF_FEATURES)
    f = feats["info"]["features"]
    f["variant"] = {"dtype": "int32", "_type": "Value"}
    f["variant_seed"] = {"dtype": "int64", "_type": "Value"}
    return json.dumps(feats)


HF_FEATURES = _hf_features()


def output_problem(
    meta: pq.FileMetaData | Exception, source: str, source_rows: int, variants: int, fp: str
) -> str | None:
    """Why an augmented shard must be redone (None = complete and current), from its footer."""
    if isinstance(meta, Exception):
        return f"unreadable ({type(meta).__name__})"
    kv = storage.footer_metadata(meta)
    if kv.get(META_SOURCE) != source:
        return "made from another input"
    if kv.get(shards.META_FINGERPRINT) != fp:
        return "another fingerprint"
    if meta.num_rows != source_rows * (variants + 1):
        return f"short ({meta.num_rows} of {source_rows * (variants + 1)} rows)"
    return None


def augment_table(table: pa.Table, variants: int, recipe: ops.Recipe) -> pa.Table:
    """Generated rows -> the originals and `variants` augmented copies of each, image-major."""
    n = table.num_rows
    k1 = variants + 1
    images = table.column("image").combine_chunks()
    raw = images.field("bytes").to_pylist()
    paths = images.field("path").to_pylist()
    seeds = table.column("seed").to_pylist()

    out_bytes: list[list[bytes]] = [[b] for b in raw]  # variant 0 keeps the generated PNG bit for bit
    if variants and n:
        pixels = torch.from_numpy(np.stack([shards.decode_png(b) for b in raw])).permute(0, 3, 1, 2)
        batch = pixels.repeat(variants, 1, 1, 1)  # variant-major: rows v*n .. v*n+n-1 are variant v+1
        vseeds = [ops.variant_seed(s, v) for v in range(1, k1) for s in seeds]
        augmented = ops.augment(batch, vseeds, recipe).permute(0, 2, 3, 1).contiguous().numpy()
        for j in range(variants * n):
            out_bytes[j % n].append(shards.encode_png(augmented[j]))

    take = pa.array(np.repeat(np.arange(n), k1))
    out_paths = [variant_path(p, v) for p in paths for v in range(k1)]
    cols = {
        "image": pa.array(
            [{"bytes": b, "path": p} for b, p in zip((b for row in out_bytes for b in row), out_paths)],
            type=shards.IMAGE_TYPE,
        )
    }
    for name in shards.SCHEMA.names[1:]:
        cols[name] = table.column(name).take(take)
    cols["variant"] = pa.array([v for _ in range(n) for v in range(k1)], pa.int32())
    cols["variant_seed"] = pa.array([ops.variant_seed(s, v) for s in seeds for v in range(k1)], pa.int64())
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def variant_path(path: str, variant: int) -> str:
    stem = path[:-4] if path.endswith(".png") else path
    return f"{stem}_v{variant}.png"


def augment_shard(
    src: storage.Location, dst: storage.Location, name: str, variants: int, recipe: ops.Recipe, fp: str
) -> dict[str, Any]:
    """Read generated shard `name` from src, write its augmented shard under the same name to dst."""
    t0 = time.perf_counter()
    data = src.read_bytes(name)
    pf = pq.ParquetFile(pa.BufferReader(data))
    kv = storage.footer_metadata(pf.metadata)
    table = pf.read().replace_schema_metadata(None)
    out = augment_table(table, variants, recipe)
    meta = {
        shards.META_FINGERPRINT: fp,
        META_SOURCE: name,
        META_SOURCE_ROWS: str(table.num_rows),
        META_SOURCE_FINGERPRINT: kv.get(shards.META_FINGERPRINT, ""),
        META_VARIANTS: str(variants),
        shards.META_IMAGE_SIZE: kv.get(shards.META_IMAGE_SIZE, ""),
        "huggingface": HF_FEATURES,
    }
    blob = storage.parquet_bytes(out, meta)
    dst.write_bytes(name, blob)
    return {
        "shard": name,
        "rows_in": table.num_rows,
        "rows_out": out.num_rows,
        "bytes": len(blob),
        "seconds": time.perf_counter() - t0,
    }
