"""Stage 2: OUT/generated/*.parquet -> post data augmentation -> OUT/augmented/*.parquet (+ OUT/samples.png).

For each generated image: the original plus --pda-variants augmented variants. One augmented shard
per generated shard, same name. Ray Data streams the shard names through `map_batches`; each task
reads its shards, augments them as one uint8 batch, encodes and commits each output whole, and hands
back one small stats row per shard, so the driver never holds an image. (Ray Data's read_parquet
blocks do not follow file boundaries, so a task that owns whole shards is what makes "one output per
input, committed atomically" hold.)

Resume = list the outputs whose footer says complete for this fingerprint, redo the rest.
Faults: Ray Data retries a task whose worker died (lost node, OOM kill) and it rewrites the same names
with the same bytes; an exception in the work stops the stage with that error, and a rerun resumes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gdd_ray import config, storage
from gdd_ray.augment import ops
from gdd_ray.augment.shard import augment_shard, output_problem
from gdd_ray.classes import ClassInfo
from gdd_ray.config import RunConfig
from gdd_ray.errors import UserError
from gdd_ray.generate import shards
from gdd_ray.generate.plan import parse_shard_name, plan_units
from gdd_ray.run import RunDir, Stopwatch, now_iso

SAMPLES_FILE = "samples.png"
# Shards per Ray task: a 10-image CIFAR shard takes ~10 ms to augment, so a task per shard would be
# mostly scheduling overhead; 8 keeps tasks around 100 ms while a crash still loses at most one shard.
SHARDS_PER_TASK = 8
RECIPE_VERSION = 1  # bump when ops.py changes pixels for the same recipe


def fingerprint(cfg: RunConfig, classes: list[ClassInfo], upstream: dict[str, str]) -> str:
    """What decides the augmented pixels: the generated images and the recipe (not batch or worker counts)."""
    return config.fingerprint(
        {
            "generate": upstream["generate"],
            "variants": cfg.augment.pda_variants,
            # a list, not a dict: the ops' order changes the pixels and fingerprint() sorts dict keys
            # (with K=0 the recipe decides nothing, so changing it keeps the output)
            "ops": [[name, params] for name, params in ops.resolve_ops(cfg.augment.pda_ops)]
            if cfg.augment.pda_variants
            else [],
            "version": RECIPE_VERSION,
        }
    )


def expected_inputs(cfg: RunConfig, classes: list[ClassInfo]) -> list[str]:
    """The generated shards this run is made of (the generate stage's plan), in plan order."""
    return [u.shard_name for u in plan_units(len(classes), cfg.ipc, cfg.generate.unit_size)]


def preflight(cfg: RunConfig, run_dir: RunDir, classes: list[ClassInfo]) -> None:
    """Checks that need no cluster and write nothing."""
    ops.resolve_ops(cfg.augment.pda_ops)
    if cfg.augment.pda_variants < 0:
        raise UserError(f"--pda-variants must be >= 0, got {cfg.augment.pda_variants}")
    if "generate" not in cfg.stages:
        _check_inputs_present(cfg, run_dir, classes)


def _check_inputs_present(cfg: RunConfig, run_dir: RunDir, classes: list[ClassInfo]) -> list[str]:
    expected = expected_inputs(cfg, classes)
    present = set(run_dir.generated.list(".parquet"))
    if not present:
        raise UserError(
            f"{run_dir.generated.uri} has no generated shards: run the generate stage first (--stages generate,augment)"
        )
    missing = [n for n in expected if n not in present]
    if missing:
        raise UserError(
            f"{run_dir.generated.uri} lacks {len(missing)} of the {len(expected)} shards of this run "
            f"(first: {missing[0]}); run the generate stage to finish it"
        )
    return expected


def run(cfg: RunConfig, run_dir: RunDir, classes: list[ClassInfo]) -> dict[str, Any]:
    watch = Stopwatch()
    record = run_dir.read_record() or {}
    fps = record.get("fingerprints", {})
    gen_fp = fps.get("generate")
    if gen_fp is None:
        raise UserError(f"{run_dir.uri}/run.json has no generate fingerprint; open the run with jobs/distill.py")
    fp = fingerprint(cfg, classes, {"generate": gen_fp})
    recipe = ops.resolve_ops(cfg.augment.pda_ops)
    k = cfg.augment.pda_variants

    names = _check_inputs_present(cfg, run_dir, classes)
    in_meta = storage.footers(run_dir.generated, names)
    source_rows: dict[str, int] = {}
    for name in names:
        meta = in_meta[name]
        if isinstance(meta, Exception):
            raise UserError(f"{run_dir.generated.uri}/{name} is unreadable ({meta}); rerun the generate stage")
        if storage.footer_metadata(meta).get(shards.META_FINGERPRINT) != gen_fp:
            raise UserError(
                f"{run_dir.generated.uri}/{name} was made by another generation config; "
                "rerun the generate stage (with --overwrite if it refuses)"
            )
        source_rows[name] = meta.num_rows

    dst = run_dir.augmented
    dst.remove_stale_temporaries()
    have = set(dst.list(".parquet"))
    out_meta = storage.footers(dst, [n for n in names if n in have])
    pending = [
        n for n in names if n not in out_meta or output_problem(out_meta[n], n, source_rows[n], k, fp) is not None
    ]
    done_before = len(names) - len(pending)
    print(
        f"[augment] {len(names)} shards ({sum(source_rows.values())} images, K={k}): "
        f"{done_before} done, {len(pending)} to do",
        flush=True,
    )
    stale = [n for n in have if parse_shard_name(n) is not None and n not in source_rows]
    previous = run_dir.read_summary("augment")
    if (
        not pending
        and not stale
        and previous
        and previous.get("fingerprint") == fp
        and run_dir.root.exists(SAMPLES_FILE)
    ):
        print("[augment] nothing to do: every shard is present and current", flush=True)
        return {**previous, "skipped": True}

    run_dir.update_stage("augment", status="running", started=now_iso(), finished=None)
    new_stats: list[dict] = []
    augment_seconds = 0.0
    if pending:
        from gdd_ray.ray_utils import init_ray

        init_ray()
        t_ray = Stopwatch()
        new_stats = _run_ray(run_dir, pending, k, recipe, fp)
        augment_seconds = t_ray.seconds
    # Outputs of shards outside this plan (a larger --ipc earlier) go only now that the plan's own are all there.
    for n in stale:
        print(f"[augment] removing {n}: its input is not part of this plan", flush=True)
        dst.delete(n)

    from gdd_ray.augment.samples import write_sample_grid

    write_sample_grid(run_dir, classes, names, k)

    images_in = sum(source_rows.values())
    made = sum(s["rows_out"] for s in new_stats)
    summary = {
        "fingerprint": fp,
        "generate_fingerprint": gen_fp,
        "variants": k,
        "ops": [[n, p] for n, p in recipe],
        "shards": len(names),
        "shards_done_now": len(new_stats),
        "shards_done_before": done_before,
        "images_in": images_in,
        "images_out": images_in * (k + 1),
        "images_per_class": cfg.ipc * (k + 1),
        "images_written_now": made,
        "seconds": round(watch.seconds, 3),
        "augment_seconds": round(augment_seconds, 3),
        "images_per_s": round(made / augment_seconds, 1) if made else None,
        "samples": SAMPLES_FILE,
        "skipped": False,
        "finished": now_iso(),
    }
    run_dir.write_summary("augment", summary)
    run_dir.update_stage("augment", status="done", finished=summary["finished"], images=summary["images_out"])
    rate = f" ({summary['images_per_s']} img/s)" if made else ""
    print(
        f"[augment] done: {made} images written in {augment_seconds:.1f} s{rate}; {summary['images_out']} under {dst.uri}",
        flush=True,
    )
    return summary


def _augment_batch(batch: dict[str, np.ndarray], src: str, dst: str, variants: int, recipe: ops.Recipe, fp: str):
    """Ray Data UDF: a batch of shard names -> one stats row per shard (the images go straight to storage)."""
    src_loc, dst_loc = storage.Location(src), storage.Location(dst)
    stats = [augment_shard(src_loc, dst_loc, str(n), variants, recipe, fp) for n in batch["shard"]]
    return {key: np.array([s[key] for s in stats]) for key in stats[0]}


def _run_ray(run_dir: RunDir, pending: list[str], variants: int, recipe: ops.Recipe, fp: str) -> list[dict]:
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    blocks = max(1, math.ceil(len(pending) / SHARDS_PER_TASK))
    ctx = ray.data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    # The per-operator reservation keeps the operators of a longer pipeline from starving one another;
    # this one has a single map operator, and with it on, a 2-CPU node ran about one task at a time
    # (measured: 0.9 -> 1.5 tasks in flight on average without it). A dataset copies the context when
    # it is created, so the switch comes first.
    ctx.op_resource_reservation_enabled = False
    try:
        ds = ray.data.from_items([{"shard": n} for n in pending], override_num_blocks=blocks)
        ds = ds.map_batches(
            _augment_batch,
            batch_size=None,  # one block of shard names = one call
            fn_kwargs={
                "src": run_dir.generated.uri,
                "dst": run_dir.augmented.uri,
                "variants": variants,
                "recipe": recipe,
                "fp": fp,
            },
            compute=ray.data.TaskPoolStrategy(size=min(cpus, blocks)),
            num_cpus=1,
        )
        stats: list[dict] = []
        every = max(1, len(pending) // 10)
        for row in ds.iter_rows():
            stats.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
            if len(stats) % every == 0 or len(stats) == len(pending):
                print(f"[augment] {len(stats)}/{len(pending)} shards", flush=True)
    finally:
        ctx.op_resource_reservation_enabled = saved
    done = {s["shard"] for s in stats}
    if done != set(pending):
        raise RuntimeError(f"augment: {len(set(pending) - done)} shards were not written; rerun to finish them")
    return stats
