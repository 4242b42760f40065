"""The scoring work: generated shards in, one small score file per shard out. Knows nothing of Ray.

A score file (OUT/selected/scores/<generated shard name>) holds, per image and in the shard's row order,
its label, index and seed, `clip_score` (cosine similarity of the image and its class prompt),
`clip_top1` (its class prompt is the most similar of all the classes' prompts: a zero-shot check) and
its CLIP image embedding (for the diversity figure). No pixels: the choice per class reads only these.

Images are embedded in batches of exactly `batch_size`, and an image always sits in the same row of the
same batch, fixed by the plan alone (`batch_groups`): the plan's shards, in plan order, are cut into groups
of consecutive shards of at most `batch_size` images, and a group is one batch, its images in rows 0, 1, ...
in shard order (a shard larger than a batch is a group of several batches). So batches are full but for
the few rows a group's last shard leaves (the shards of several classes share a batch), and rows a call
does not have are black images. A batched matmul's rounding depends on the batch's shape and on a row's
position in it (measured: the same image in row 0 and in row 2 of a batch of 4 scored differently in the
last bits), never on the other rows' pixels, so fixing both makes every score independent of which shards
were scored together, i.e. of scheduling and of what a resumed run had left to do. A scoring call is one
group (`score_calls`): no batch is split between two calls and computed twice.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gdd_ray import shards, storage
from gdd_ray.plan import WorkUnit

MODEL = "gdd_ray.clip_model"  # footer key: the CLIP model the scores come from


@dataclass(frozen=True)
class ScoreJob:
    """What every scoring actor needs: small, picklable, identical on every node."""

    clip_source: str  # what from_pretrained gets: the resolved hub id or folder
    texts: tuple[str, ...]  # the prompt of every class, by label
    src_uri: str  # the generated shards
    scores_uri: str  # where score files are committed
    fingerprint: str  # the select stage's
    batch_size: int
    units: tuple[WorkUnit, ...]  # the plan's generated shards in plan order: they fix every image's batch and row


score_spec = shards.score_spec  # the contract's: `status` judges score files without importing this stage


def batch_groups(units: tuple[WorkUnit, ...] | list[WorkUnit], batch_size: int) -> list[list[WorkUnit]]:
    """The plan's shards cut into groups of consecutive shards of at most `batch_size` images (a larger shard
    alone): each group is scored as its own batch(es). Depends on the plan and the batch size only."""
    groups: list[list[WorkUnit]] = []
    current: list[WorkUnit] = []
    count = 0
    for u in units:
        if current and count + u.size > batch_size:
            groups.append(current)
            current, count = [], 0
        current.append(u)
        count += u.size
    return groups + [current] * bool(current)


def score_calls(units: tuple[WorkUnit, ...] | list[WorkUnit], batch_size: int, pending: list[str]) -> list[list[str]]:
    """The shards to score as calls: one per group holding any of them (its batch computed once, in one call)."""
    todo = set(pending)
    calls = [[u.shard_name for u in g if u.shard_name in todo] for g in batch_groups(units, batch_size)]
    return [c for c in calls if c]


def score_table(labels, indices, seeds, scores, top1, embeddings: np.ndarray) -> pa.Table:
    dim = embeddings.shape[1]
    flat = pa.array(embeddings.astype(np.float32).reshape(-1))
    return pa.table(
        {
            "label": pa.array(labels, pa.int32()),
            "index": pa.array(indices, pa.int32()),
            "seed": pa.array(seeds, pa.int64()),
            "clip_score": pa.array(scores, pa.float32()),
            "clip_top1": pa.array(top1, pa.bool_()),
            "clip_embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )


def read_scores(loc: storage.Location, name: str) -> pa.Table:
    with loc.fs.open_input_file(loc.file(name)) as fh:
        return pq.read_table(fh).replace_schema_metadata(None)


def embeddings_of(table: pa.Table) -> np.ndarray:
    col = table.column("clip_embedding").combine_chunks()
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(col), col.type.list_size)


class ShardScorer:
    """Scores whole generated shards; the CLIP model and the class prompts' embeddings load once."""

    def __init__(self, job: ScoreJob, device: str | None = None, clip: Any = None):
        self.job = job
        # each shard's group and the offset of its first image in it: an image's batch and row follow
        self.places = {
            u.shard_name: (g, offset)
            for g, group in enumerate(batch_groups(job.units, job.batch_size))
            for u, offset in zip(group, np.cumsum([0] + [u.size for u in group[:-1]]).tolist())
        }
        self.device = device
        self.clip = clip  # loaded on first use; tests may inject one
        self.text = None
        self.src = storage.Location(job.src_uri)
        self.dst = storage.Location(job.scores_uri)
        self._pool: ThreadPoolExecutor | None = None

    def load(self) -> None:
        if self.clip is None:
            from gdd_ray.select.clip import load_clip

            self.clip = load_clip(self.job.clip_source, self.device)
        if self.text is None:
            self.text = self.clip.embed_texts(list(self.job.texts))

    def embed(self, pixels: np.ndarray, batch_of: np.ndarray, slot: np.ndarray):
        """Image embeddings, N x D on the device, each image in its fixed row `slot` of its fixed-shape batch
        `batch_of` (see the module doc and `places_of`)."""
        import torch

        b = self.job.batch_size
        rows: list[np.ndarray] = []
        parts = []
        for key in np.unique(batch_of):  # sorted: the order does not matter, each row's result is its own
            members = np.flatnonzero(batch_of == key)
            padded = np.zeros((b, *pixels.shape[1:]), np.uint8)
            padded[slot[members]] = pixels[members]
            emb = self.clip.embed_images(torch.from_numpy(padded).to(self.clip.device))
            parts.append(emb[torch.from_numpy(slot[members]).to(emb.device)])
            rows.append(members)
        out = torch.cat(parts)
        order = torch.from_numpy(np.argsort(np.concatenate(rows), kind="stable")).to(out.device)
        return out[order]

    def places_of(self, names: list[str], tables: list[pa.Table]) -> tuple[np.ndarray, np.ndarray]:
        """(batch, row) of every image of these shards, in their row order: a group's images take rows
        0, 1, ... in shard order, batch_size to a batch."""
        b = self.job.batch_size
        batch_of, slot = [], []
        for name, t in zip(names, tables):
            group, first = self.places[name]
            offset = first + np.arange(t.num_rows, dtype=np.int64)  # rows are the unit's images in order
            batch_of.append(group * (2**32) + offset // b)  # (group, batch within it)
            slot.append(offset % b)
        return np.concatenate(batch_of), np.concatenate(slot)

    def score(self, names: list[str]) -> list[dict[str, Any]]:
        """Score shards `names` together (one batch stream) and commit one score file each."""
        import torch

        self.load()
        t0 = time.perf_counter()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="png")
        tables = [shards.read_shard(self.src, n, ["image", "label", "index", "seed"]) for n in names]
        pngs = [b for t in tables for b in shards.png_bytes(t)]
        pixels = np.stack(list(self._pool.map(shards.decode_png, pngs)))  # PIL releases the GIL in zlib
        labels = np.concatenate([t.column("label").to_numpy() for t in tables]).astype(np.int64)
        images = self.embed(pixels, *self.places_of(names, tables))
        # N x C cosine similarities, one fixed-shape matrix-vector product per image: one N x D @ D x C
        # matmul would round differently for another N, i.e. for another set of shards scored together.
        sims = torch.stack([self.text @ e for e in images])
        own = torch.from_numpy(labels).to(sims.device)
        scores = sims.gather(1, own[:, None])[:, 0].cpu().numpy()
        top1 = (sims.argmax(1) == own).cpu().numpy()
        images = images.cpu().numpy()
        seconds = (time.perf_counter() - t0) / len(names)
        stats, start = [], 0
        for name, t in zip(names, tables):
            end = start + t.num_rows
            table = score_table(
                labels[start:end], t.column("index").to_numpy(), t.column("seed").to_numpy(),
                scores[start:end], top1[start:end], images[start:end],
            )  # fmt: skip
            footer = {shards.FINGERPRINT: self.job.fingerprint, shards.SOURCE: name, MODEL: self.job.clip_source}
            self.dst.write_bytes(name, storage.parquet_bytes(table, footer))
            stats.append({"shard": name, "rows": t.num_rows, "seconds": seconds})
            start = end
        return stats
