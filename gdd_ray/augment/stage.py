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

from gdd_ray import shards, storage
from gdd_ray.augment import recipe as recipes
from gdd_ray.augment.shard import augment_shard
from gdd_ray.config import RunConfig
from gdd_ray.errors import UserError
from gdd_ray.logs import Progress, say
from gdd_ray.run import RunContext, RunDir, Stopwatch, now_iso, stage_summary

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
        inputs(ctx)


def inputs(ctx: RunContext) -> shards.Manifest:
    """The shards to augment: the source stage's manifest for this run's config."""
    src = ctx.sources["augment"]
    loc = ctx.run_dir.stage_dir(src)
    manifest = shards.read_manifest(loc, ctx.fingerprint(src))
    made, work = {"generate": ("generated", "generation"), "select": ("selected", "selection")}[src]
    if manifest is None:
        if not loc.list(shards.SHARD_SUFFIX):
            raise UserError(f"{loc.uri} has no {made} shards: run the {src} stage first (--stages {src},augment)")
        raise UserError(
            f"{loc.uri} holds no complete {work} for this config (no current {shards.MANIFEST_FILE}); "
            f"run the {src} stage to finish it (with --overwrite if it was made by another config)"
        )
    shards.require_listed_shards(loc, manifest, src)
    return manifest


def run(ctx: RunContext) -> dict[str, Any]:
    watch = Stopwatch()
    cfg, run_dir = ctx.cfg, ctx.run_dir
    fp, k, ops_applied = ctx.fingerprint("augment"), cfg.augment.pda_variants, recipe(cfg)
    manifest = inputs(ctx)
    source_rows = manifest.rows
    specs = [shards.augmented_spec(n, rows, k, fp) for n, rows in source_rows.items()]

    dst = run_dir.augmented
    dst.remove_stale_temporaries()
    check = shards.check_folder(dst, specs)
    pending = [s.name for s in check.todo]
    say(
        "augment",
        f"{len(specs)} shards ({manifest.images} images, K={k}): {len(check.done)} done, {len(pending)} to do",
    )
    previous = run_dir.read_summary("augment")
    if not pending and not check.foreign and shards.read_manifest(dst, fp) and previous:
        if run_dir.root.exists(SAMPLES_FILE):
            say("augment", "nothing to do: every shard is present and current")
            return previous

    shards.drop_manifest(dst)
    started = now_iso()
    run_dir.update_stage("augment", status="running", started=started, finished=None)
    new_stats: list[dict] = []
    augment_seconds = 0.0
    if pending:
        from gdd_ray.ray_utils import init_ray

        init_ray()
        t_ray = Stopwatch()
        progress = Progress("augment", len(pending), sum(source_rows[n] * (k + 1) for n in pending))
        src = run_dir.stage_dir(ctx.sources["augment"])
        new_stats = _run_ray(src, run_dir, pending, k, ops_applied, fp, progress)
        augment_seconds = t_ray.seconds
    # Outputs of shards outside this plan (a larger --ipc earlier) go only now that the plan's own are all there.
    for n in check.foreign:
        say("augment", f"removing {n}: its input is not part of this plan")
        dst.delete(n)
    dst.remove_stale_temporaries()
    after = shards.check_folder(dst, specs)
    if after.todo:
        raise RuntimeError(f"augment: {len(after.todo)} shards missing after the run, e.g. {after.todo[0].name}")

    from gdd_ray.augment.samples import write_sample_grid

    write_sample_grid(run_dir, ctx.classes, manifest.names, k)
    summary = stage_summary(
        "augment",
        fp,
        started,
        watch.seconds,
        units=len(specs),
        units_run=len(new_stats),
        images=manifest.images * (k + 1),
        images_made=sum(s["rows_out"] for s in new_stats),
        work_s=augment_seconds,
        generate_fingerprint=ctx.fingerprint("generate"),
        source=ctx.sources["augment"],
        variants=k,
        ops=[[n, p] for n, p in ops_applied],
        images_in=manifest.images,
        images_per_class=ctx.ipc * (k + 1),
        samples=SAMPLES_FILE,
    )
    run_dir.write_summary("augment", summary)
    shards.write_manifest(dst, "augment", fp, specs)  # last: its presence means "complete"
    run_dir.update_stage("augment", status="done", finished=summary["finished"], images=summary["totals"]["images"])
    t = summary["totals"]
    rate = f" ({t['images_per_s']:.1f} img/s)" if t["images_per_s"] else ""
    say(
        "augment",
        f"done: {t['images_made']} images written in {augment_seconds:.1f} s{rate}; {t['images']} under {dst.uri}",
    )
    return summary


def _augment_batch(batch: dict[str, np.ndarray], src: str, dst: str, variants: int, recipe: recipes.Recipe, fp: str):
    """Ray Data UDF: a batch of shard names -> one stats row per shard (the images go straight to storage)."""
    src_loc, dst_loc = storage.Location(src), storage.Location(dst)
    stats = [augment_shard(src_loc, dst_loc, str(n), variants, recipe, fp) for n in batch["shard"]]
    return {key: np.array([s[key] for s in stats]) for key in stats[0]}


def _run_ray(
    src: storage.Location,
    run_dir: RunDir,
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
                "dst": run_dir.augmented.uri,
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
