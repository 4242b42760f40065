"""Stage 2: OUT/generated/*.parquet -> post data augmentation -> OUT/augmented/*.parquet (+ OUT/samples.png).

For each generated image: the original plus --pda-variants augmented variants. One augmented shard
per input shard, same name; the inputs are the shards the source stage's manifest lists (the select
stage's, OUT/selected/, with --select-by clip; else the generate stage's). Ray Data
streams the shard names through tasks (shard_map); each task reads its shards, augments them as one
uint8 batch, encodes and commits each output whole, and hands back one small stats row per shard, so the
driver never holds an image. (Ray Data's read_parquet blocks do not follow file boundaries, so a task
that owns whole shards is what makes "one output per input, committed atomically" hold.)

Resume = list the outputs whose footer says complete for this fingerprint, redo the rest.
Faults: Ray Data retries a task whose worker died (lost node, OOM kill) and it rewrites the same names
with the same bytes; an exception in the work stops the stage with that error, and a rerun resumes.
"""

from __future__ import annotations

from typing import Any

from gdd_ray import lifecycle, shard_map, shards, storage
from gdd_ray.augment import recipe as recipes
from gdd_ray.augment.shard import augment_shard
from gdd_ray.config import RunConfig
from gdd_ray.logs import Progress
from gdd_ray.run import RunContext, RunDir, Stopwatch

SAMPLES_FILE = "samples.png"
# Shards per Ray task: a 10-image CIFAR shard takes ~10 ms to augment, so a task per shard would be
# mostly scheduling overhead; 8 keeps tasks around 100 ms while a crash still loses at most one shard.
SHARDS_PER_TASK = 8
VERSION = 2  # bump when ops.py, recipe.py or shard.py change pixels for the same recipe (2: repeats redrawn)
# What decides the augmented pixels (with the generated images and the resolved recipe below): not
# batch or worker counts.
OUTPUT_FIELDS = ("augment.pda_variants",)


def source(cfg: RunConfig, run_dir: RunDir) -> str:
    """With --select-by clip the kept images, never every candidate; else every generated image."""
    return "select" if cfg.select.select_by == "clip" else "generate"


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

    def covers(self) -> int:
        return self.source.ipc  # what its source covers (a time budget may have stopped it short)

    def other_work(self) -> bool:
        return not self.ctx.run_dir.root.exists(SAMPLES_FILE)  # write_sample_grid's place

    def work(self, todo: list[shards.ShardSpec]) -> lifecycle.Work:
        k, watch = self.ctx.cfg.augment.pda_variants, Stopwatch()
        if todo and not self.serial:
            from gdd_ray.ray_utils import init_ray

            init_ray()
        progress = Progress("augment", len(todo), sum(s.rows for s in todo))
        stats = shard_map.map_shards(
            [s.name for s in todo], augment_shards,
            dict(src=self.source.loc.uri, dst=self.output.uri, variants=k, recipe=recipe(self.ctx.cfg), fp=self.fp),
            per_call=SHARDS_PER_TASK, serial=self.serial, on_result=lambda s: progress.add(1, s["rows_out"]),
        )  # fmt: skip
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


def run(ctx: RunContext, *, serial: bool = False) -> dict[str, Any]:
    return lifecycle.run(Augment(ctx, serial))


def augment_shards(
    names: list[str], src: str, dst: str, variants: int, recipe: recipes.Recipe, fp: str
) -> list[dict[str, Any]]:
    """The work shard_map fans out: shards `names` augmented one by one, one stats dict each."""
    src_loc, dst_loc = storage.Location(src), storage.Location(dst)
    return [augment_shard(src_loc, dst_loc, n, variants, recipe, fp) for n in names]
