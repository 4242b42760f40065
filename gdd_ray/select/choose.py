"""The choice per class: its score files in, its kept shards out, and the figures that describe it.

Kept = the `keep` highest `clip_score`s of the class, ties by the lower index, stored in index order and
cut by the plan's kept units (positions 0..keep-1 among the kept). A kept image's `index` is its position
among the kept (the shards an IPC run would have: every consumer's "index < IPC" is then the kept set, by
construction); it keeps its seed, prompt and PNG bytes, and its generated index as `source_index`. The
choice is fully determined by the score files: a class redone after a crash writes the same bytes.
Knows nothing of Ray: the stage maps `choose_classes` over labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from gdd_ray import shards, storage
from gdd_ray.plan import WorkUnit
from gdd_ray.select.scorer import embeddings_of, read_scores


@dataclass(frozen=True)
class ChooseJob:
    src_uri: str  # the generated shards
    scores_uri: str
    dst_uri: str  # OUT/selected
    fingerprint: str
    image_size: int
    keep: int  # IPC
    candidates: tuple[WorkUnit, ...]  # the generated units (= score files) of every class
    kept: tuple[WorkUnit, ...]  # the kept units of every class

    def of_class(self, label: int) -> tuple[list[WorkUnit], list[WorkUnit]]:
        by_start = sorted(u for u in self.candidates if u.label == label)
        return by_start, sorted(u for u in self.kept if u.label == label)


def rank(scores: np.ndarray, indices: np.ndarray, keep: int) -> np.ndarray:
    """Positions of the `keep` best (highest score, ties by the lower index), returned in index order."""
    best = np.lexsort((indices, -scores.astype(np.float64)))[:keep]  # lexsort: the last key is the primary one
    return best[np.argsort(indices[best], kind="stable")]


def diversity(embeddings: np.ndarray) -> float | None:
    """Mean pairwise cosine distance of L2-normalised embeddings (0 = all the same picture)."""
    n = len(embeddings)
    if n < 2:
        return None
    e = embeddings.astype(np.float64)
    sims = e @ e.T
    return float(1.0 - (sims.sum() - np.trace(sims)) / (n * (n - 1)))


def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if len(x) else None


def choose_class(job: ChooseJob, label: int, write: bool) -> dict[str, Any]:
    """Choose one class's images; write its kept shards when `write`; return its figures."""
    candidates, kept_units = job.of_class(label)
    scores_loc = storage.Location(job.scores_uri)
    tables = [read_scores(scores_loc, u.shard_name) for u in candidates]
    table = pa.concat_tables(tables)
    scores = table.column("clip_score").to_numpy()
    indices = table.column("index").to_numpy()
    top1 = table.column("clip_top1").to_numpy(zero_copy_only=False)
    emb = embeddings_of(table)
    kept = rank(scores, indices, job.keep)
    if write:
        shard_of = np.repeat(np.arange(len(candidates)), [t.num_rows for t in tables])
        row_of = np.concatenate([np.arange(t.num_rows) for t in tables])
        _write_kept(job, candidates, kept_units, kept, shard_of, row_of, scores, top1)
    return {
        "label": label,
        "candidates": int(len(scores)),
        "kept": int(len(kept)),
        "score_mean": _mean(scores[kept]),
        "score_mean_all": _mean(scores),
        "score_min_kept": float(scores[kept].min()) if len(kept) else None,
        "top1": _mean(top1[kept].astype(np.float64)),
        "top1_all": _mean(top1.astype(np.float64)),
        "diversity": diversity(emb[kept]),
        "diversity_all": diversity(emb),
        "kept_indices": indices[kept].tolist(),
    }


def _write_kept(job: ChooseJob, candidates, kept_units, kept, shard_of, row_of, scores, top1) -> None:
    src, dst = storage.Location(job.src_uri), storage.Location(job.dst_uri)
    needed = sorted(set(shard_of[kept].tolist()))
    generated = {i: shards.read_shard(src, candidates[i].shard_name) for i in needed}  # whole shards, once
    for unit in kept_units:
        pos = kept[unit.start : unit.stop]
        rows = pa.concat_tables([generated[int(shard_of[p])].slice(int(row_of[p]), 1) for p in pos])
        rows = rows.select(shards.GENERATED_SCHEMA.names).cast(shards.GENERATED_SCHEMA)
        generated_index = rows.column("index")
        rows = rows.set_column(
            rows.schema.get_field_index("index"), "index", pa.array(range(unit.start, unit.stop), pa.int32())
        )
        rows = rows.append_column("clip_score", pa.array(scores[pos], pa.float32()))
        rows = rows.append_column("clip_top1", pa.array(top1[pos], pa.bool_()))
        rows = rows.append_column("source_index", generated_index)
        footer = shards.generated_footer(unit, job.fingerprint, job.image_size)
        shards.write_shard(dst, unit.shard_name, rows.combine_chunks(), footer)


def choose_classes(labels: list[int], job: ChooseJob, write: set[int]) -> list[dict[str, Any]]:
    return [choose_class(job, label, label in write) for label in labels]
