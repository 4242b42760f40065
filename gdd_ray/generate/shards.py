"""The generated-shard format (a contract: the augment and train stages and users read it).

Columns: `image` {bytes: PNG, path: str} (Hugging Face `datasets` reads it as an Image feature),
`label`, `class_id`, `class_name`, `prompt`, `seed`, `index`. File metadata holds the generation
fingerprint and the unit, so a shard can be judged complete from its footer alone.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from gdd_ray import storage
from gdd_ray.generate.plan import WorkUnit

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [
        ("image", IMAGE_TYPE),
        ("label", pa.int32()),
        ("class_id", pa.string()),
        ("class_name", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("index", pa.int32()),
    ]
)
META_FINGERPRINT = "gdd_ray.fingerprint"
META_UNIT = "gdd_ray.unit"
META_IMAGE_SIZE = "gdd_ray.image_size"
# Hugging Face `datasets` reads this to type the `image` column as an Image feature.
HF_FEATURES = (
    '{"info": {"features": {"image": {"_type": "Image"}, "label": {"dtype": "int32", "_type": "Value"}, '
    '"class_id": {"dtype": "string", "_type": "Value"}, "class_name": {"dtype": "string", "_type": "Value"}, '
    '"prompt": {"dtype": "string", "_type": "Value"}, "seed": {"dtype": "int64", "_type": "Value"}, '
    '"index": {"dtype": "int32", "_type": "Value"}}}}'
)


def encode_png(pixels: np.ndarray) -> bytes:
    """HxWx3 uint8 -> PNG bytes. compress_level 1: PNG of small images is CPU-bound, ratio barely changes."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@dataclass(frozen=True)
class ShardRows:
    """Everything but the pixels, for one unit."""

    unit: WorkUnit
    class_id: str
    class_name: str
    prompt: str
    seeds: list[int]


def build_table(rows: ShardRows, pngs: list[bytes]) -> pa.Table:
    u = rows.unit
    assert len(pngs) == u.size == len(rows.seeds)
    paths = [f"{u.label:05d}_{i:06d}.png" for i in range(u.start, u.stop)]
    images = pa.array([{"bytes": b, "path": p} for b, p in zip(pngs, paths)], type=IMAGE_TYPE)
    return pa.Table.from_arrays(
        [
            images,
            pa.array([u.label] * u.size, pa.int32()),
            pa.array([rows.class_id] * u.size, pa.string()),
            pa.array([rows.class_name] * u.size, pa.string()),
            pa.array([rows.prompt] * u.size, pa.string()),
            pa.array(rows.seeds, pa.int64()),
            pa.array(list(range(u.start, u.stop)), pa.int32()),
        ],
        schema=SCHEMA,
    )


def shard_metadata(unit: WorkUnit, fingerprint: str, image_size: int) -> dict[str, str]:
    return {
        META_FINGERPRINT: fingerprint,
        META_UNIT: f"{unit.label}:{unit.start}:{unit.stop}",
        META_IMAGE_SIZE: str(image_size),
        "huggingface": HF_FEATURES,
    }


def write_shard(loc: storage.Location, unit: WorkUnit, table: pa.Table, fingerprint: str, image_size: int) -> int:
    data = storage.parquet_bytes(table, shard_metadata(unit, fingerprint, image_size))
    loc.write_bytes(unit.shard_name, data)
    return len(data)


def shard_problem(meta: pq.FileMetaData | Exception, unit: WorkUnit, fingerprint: str) -> str | None:
    """Why a shard must be redone (None = it is complete and current), judged from its footer."""
    if isinstance(meta, Exception):
        return f"unreadable ({type(meta).__name__})"
    kv = storage.footer_metadata(meta)
    if meta.num_rows != unit.size:
        return f"short ({meta.num_rows} of {unit.size} rows)"
    if kv.get(META_UNIT) != f"{unit.label}:{unit.start}:{unit.stop}":
        return "written for another unit"
    if kv.get(META_FINGERPRINT) != fingerprint:
        return "another fingerprint"
    return None


def read_generated(loc: storage.Location, columns: list[str] | None = None) -> pa.Table:
    """All shards of a folder as one table (small runs, tests, exports); big runs use Ray Data."""
    tables = [pq.read_table(io.BytesIO(loc.read_bytes(n)), columns=columns) for n in loc.list(".parquet")]
    if not tables:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
