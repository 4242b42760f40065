"""Stage 2: OUT/generated/*.parquet -> post data augmentation -> OUT/augmented/*.parquet (+ OUT/samples.png).

For each generated image: the original plus --pda-variants augmented variants. One augmented shard
per input shard, same name; the inputs are the shards the source stage's manifest lists (the select
stage's, OUT/selected/, with --select-by clip; else the generate stage's). Ray Data
streams the shard names through `map_batches`; each task reads its shards, augments them as one uint8
batch, encodes and commits each output whole, and hands back one small stats row per shard, so the
driver never holds an image. (Ray Data's read_parquet blocks do not follow file boundaries, so a task
that owns whole shards is what makes "one output per input, committed atomically" hold.)

Resume = list the outputs whose footer says complete for this fingerprint, redo the rest.
Faults: Ray Data retries a task whose worker died (lost node, OOM kill) and it rewrites the same names
with the same bytes; an exception in the work stops the stage with that error, and a rerun resumes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gdd_ray import lifecycle, shards, storage
from gdd_ray.augment import recipe as recipes
from gdd_ray.augment.shard import augment_shard
from gdd_ray.config import RunConfig
from gdd_ray.logs import Progress
from gdd_ray.run import RunContext, RunDir, Stopwatch

SAMPLES_FILE = "samples.png"
# Shards per Ray task: a 10-image CIFAR shard takes ~10 ms to augment, so a task per shard would be
# mostly scheduling overhead; 8 keeps tasks around 100 ms while a crash still loses at most one shard.
SHARDS_PER_TASK = 8
VERSION = 1  # bump when ops.py or recipe.py changes pixels for the same recipe
# What decides the augmented pixels (with the generated images and the resolved recipe below): not
# batch or worker counts.
OUTPUT_FIELDS = ("augment.pda_variants",)


def source(cfg: RunConfig, run_dir: RunDir) -> str:
    """With --select-by clip the kept images, never every candidate; else every generated image."""
    return "select" if cfg.clip.select_by == "clip" else "generate"


def resolved_inputs(cfg: RunConfig) -> dict[str, Any]:
    """The recipe as applied: defaults filled in, a list (the ops' order changes the pixels), [] at K = 0."""
    return {"recipe": [[name, params] for name, params in recipe(cfg)]}


def recipe(cfg: RunConfig) -> recipes.Recipe:
    """The ops applied (checked); with K = 0 there are none, whatever --pda-ops says."""
    resolved = recipes.resolve_ops(cfg.augment.pda_ops)
    return resolved if cfg.augment.pda_variants else []


def preflight(ctx: RunContext) -> None:
    """Checks that need no cluster and write nothing."""
    recipe(ctx.cfg)
    if ctx.sources["augment"] not in ctx.cfg.stages:
        lifecycle.read_source(ctx, "augment")


class Augment(lifecycle.ShardStage):
    """One output per shard its source's manifest lists (those of the plan up to the IPC the source covers)."""

    name = "augment"

    def read(self) -> None:
        self.source = lifecycle.read_source(self.ctx, "augment")

    def specs(self) -> list[shards.ShardSpec]:
        return lifecycle.planned_specs(self.ctx, "augment", self.source.ipc)

    def ipc(self, after: shards.Check) -> int:
        super().ipc(after)
        return self.source.ipc  # what its source covers (a time budget may have stopped it short)

    def other_work(self) -> bool:
        return not self.ctx.run_dir.root.exists(SAMPLES_FILE)  # write_sample_grid's place

    def work(self, todo: list[shards.ShardSpec]) -> lifecycle.Work:
        k, watch = self.ctx.cfg.augment.pda_variants, Stopwatch()
        stats = []
        if todo:
            from gdd_ray.ray_utils import init_ray

            init_ray()
            progress = Progress("augment", len(todo), sum(s.rows for s in todo))
            stats = _run_ray(
                self.source.loc, self.output, [s.name for s in todo], k, recipe(self.ctx.cfg), self.fp, progress
            )
        return lifecycle.Work(
            len(stats), sum(s["rows_out"] for s in stats), watch.seconds, details={
                "generate_fingerprint": self.ctx.fingerprint("generate"), "source": self.source.stage, "variants": k,
                "ops": [[n, p] for n, p in recipe(self.ctx.cfg)], "images_in": self.source.manifest.images,
                "images_per_class": self.source.ipc * (k + 1), "samples": SAMPLES_FILE,
            },
        )  # fmt: skip

    def finish(self, listed: list[shards.ShardSpec]) -> None:
        from gdd_ray.augment.samples import write_sample_grid

        write_sample_grid(
            self.ctx.run_dir, self.ctx.classes, [s.name for s in listed], self.ctx.cfg.augment.pda_variants
        )

    def done_line(self, summary: dict[str, Any]) -> str:
        t = summary["totals"]
        rate = f" ({t['images_per_s']:.1f} img/s)" if t["images_per_s"] else ""
        return f"done: {t['images_made']} images written in {t['work_s']:.1f} s{rate}; {t['images']} under {self.output.uri}"


def run(ctx: RunContext) -> dict[str, Any]:
    return lifecycle.run(Augment(ctx))


def _augment_batch(batch: dict[str, np.ndarray], src: str, dst: str, variants: int, recipe: recipes.Recipe, fp: str):
    """Ray Data UDF: a batch of shard names -> one stats row per shard (the images go straight to storage)."""
    src_loc, dst_loc = storage.Location(src), storage.Location(dst)
    stats = [augment_shard(src_loc, dst_loc, str(n), variants, recipe, fp) for n in batch["shard"]]
    return {key: np.array([s[key] for s in stats]) for key in stats[0]}


def _run_ray(
    src: storage.Location,
    dst: storage.Location,
    pending: list[str],
    variants: int,
    recipe: recipes.Recipe,
    fp: str,
    progress: Progress,
) -> list[dict]:
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    blocks = max(1, math.ceil(len(pending) / SHARDS_PER_TASK))
    from gdd_ray.ray_utils import quiet_data

    with quiet_data():
        ds = ray.data.from_items([{"shard": n} for n in pending], override_num_blocks=blocks)
        ds = ds.map_batches(
            _augment_batch,
            batch_size=None,  # one block of shard names = one call
            fn_kwargs={
                "src": src.uri,
                "dst": dst.uri,
                "variants": variants,
                "recipe": recipe,
                "fp": fp,
            },
            compute=ray.data.TaskPoolStrategy(size=min(cpus, blocks)),
            num_cpus=1,
        )
        stats: list[dict] = []
        for row in ds.iter_rows():
            stats.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
            progress.add(1, stats[-1]["rows_out"])
    done = {s["shard"] for s in stats}
    if done != set(pending):
        raise RuntimeError(f"augment: {len(set(pending) - done)} shards were not written; rerun to finish them")
    return stats
