"""The choice per class, and the kept shards written from it. Knows nothing of Ray: the stage maps
`choose_classes` over class labels and then `write_kept_units` over the kept shards.

Kept = the `keep` highest `clip_score`s of a class, ties by the lower index, stored in index order. A kept
image's `index` is its position among its class's kept images (the shards an IPC run would have: every
consumer's "index < IPC" is then the kept set, by construction); it keeps its seed, prompt and PNG bytes, and
its generated index as `source_index`. Kept shards are the plan's kept units: the same cut of the grid as an
IPC run's generated shards (they span classes), so a kept shard is written once every class in it is chosen.
The choice is fully determined by the score files: a kept shard redone after a crash holds the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from gdd_ray import shards, storage
from gdd_ray.plan import WorkUnit, unit_of
from gdd_ray.select.scorer import embeddings_of, read_scores


@dataclass(frozen=True)
class ChooseJob:
    src_uri: str  # the generated shards
    scores_uri: str
    dst_uri: str  # OUT/selected
    fingerprint: str
    image_size: int
    keep: int  # IPC
    candidates: tuple[WorkUnit, ...]  # the generated units (= score files), in plan order
    per_class: int  # candidates per class

    def score_files_of(self, labels: list[int]) -> list[WorkUnit]:
        """The score files holding any candidate of these classes (image i of class c is position i x C + c)."""
        c = self.candidates[0].classes
        needed = {unit_of(self.candidates, i * c + label)[0] for label in labels for i in range(self.per_class)}
        return sorted(needed)


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


def choose_class(table: pa.Table, label: int, keep: int) -> dict[str, Any]:
    """One class's choice from the score rows of its candidates (`table`: score rows of any classes), with
    the figures that describe it; `kept_indices` (generated indices, in index order) is what the kept shards
    are written from, with each kept image's score and zero-shot hit."""
    mine = table.filter(pa.compute.equal(table.column("label"), label))
    scores = mine.column("clip_score").to_numpy()
    indices = mine.column("index").to_numpy()
    top1 = mine.column("clip_top1").to_numpy(zero_copy_only=False)
    emb = embeddings_of(mine)
    kept = rank(scores, indices, keep)
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
        "kept_scores": scores[kept].astype(np.float64).tolist(),
        "kept_top1": top1[kept].astype(bool).tolist(),
    }


def choose_classes(labels: list[int], job: ChooseJob) -> list[dict[str, Any]]:
    """The choice of each of `labels`, reading each score file they need once."""
    scores_loc = storage.Location(job.scores_uri)
    table = pa.concat_tables([read_scores(scores_loc, u.shard_name) for u in job.score_files_of(labels)])
    return [choose_class(table, label, job.keep) for label in labels]


def write_kept_units(names: list[str], job: ChooseJob, kept: dict[int, dict[str, list]], units: dict[str, WorkUnit]):
    """Write the kept shards `names` (kept units) from the classes' choices (`kept`: label -> choose_class's
    kept_indices, kept_scores, kept_top1); each generated shard is read once per call. One stats dict each."""
    src, dst = storage.Location(job.src_uri), storage.Location(job.dst_uri)
    c = job.candidates[0].classes
    generated: dict[str, pa.Table] = {}
    out = []
    for name in names:
        unit = units[name]
        rows, scores, top1, sources = [], [], [], []
        for label, position in unit.images():
            choice = kept[label]
            index = int(choice["kept_indices"][position])
            gen_unit, row = unit_of(job.candidates, index * c + label)
            if gen_unit.shard_name not in generated:
                generated[gen_unit.shard_name] = shards.read_shard(src, gen_unit.shard_name)
            rows.append(generated[gen_unit.shard_name].slice(row, 1))
            scores.append(choice["kept_scores"][position])
            top1.append(choice["kept_top1"][position])
            sources.append(index)
        table = pa.concat_tables(rows).select(shards.GENERATED_SCHEMA.names).cast(shards.GENERATED_SCHEMA)
        positions = pa.array([p for _, p in unit.images()], pa.int32())
        table = table.set_column(table.schema.get_field_index("index"), "index", positions)
        table = table.append_column("clip_score", pa.array(scores, pa.float32()))
        table = table.append_column("clip_top1", pa.array(top1, pa.bool_()))
        table = table.append_column("source_index", pa.array(sources, pa.int32()))
        footer = shards.generated_footer(unit, job.fingerprint, job.image_size)
        out.append(
            {"shard": name, "rows": unit.size, "bytes": shards.write_shard(dst, name, table.combine_chunks(), footer)}
        )
    return out
