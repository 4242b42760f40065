"""Stage 1, generate: take the plan, keep the shards that are done, render the rest, write the manifest."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from gdd_ray import shards
from gdd_ray.classes import ClassInfo
from gdd_ray.config import RunConfig
from gdd_ray.generate import fetch, runtime
from gdd_ray.generate.budget import TimeBudget, ipc_reached
from gdd_ray.generate.driver import actor_options, run_on_ray, run_serial
from gdd_ray.generate.generator import GenerationJob, UnitGenerator, UnitResult
from gdd_ray.generate.model import resolve_model, resolve_revision
from gdd_ray.logs import Progress, say
from gdd_ray.plan import generated_per_class
from gdd_ray.run import RunContext, RunDir, now_iso, stage_summary

VERSION = 2  # 2: engines (fast one-step path), decoder precision set once, static batches
# What decides the pixels of a generated image; not IPC, batch size, worker count or --compile (float
# rounding only). The engine and the VAE precision count too, as resolved: see resolved_inputs.
OUTPUT_FIELDS = (
    "generate.model",
    "generate.vae",
    "generate.decoder",
    "generate.steps",
    "generate.guidance",
    "generate.gen_resolution",
    "image_size",
    "generate.prompt_template",
    "seed",
    "classes",
)


def source(cfg: RunConfig, run_dir: RunDir) -> None:
    return None


def resolved_inputs(cfg: RunConfig) -> dict[str, Any]:
    """The engine and the VAE precision as the workers will run them ('auto' made concrete, see runtime), and
    the commit a hub model is loaded at: in the fingerprint, so a changed snapshot is never mixed in."""
    revision = resolve_revision(cfg.generate.model, cfg.generate.model_revision)
    pinned = {"model_revision": revision} if revision else {}  # local models: fingerprints as before
    # The template list's contents (not the file's path); absent without one, so such runs keep their fingerprint.
    templates = {"prompt_templates": list(cfg.generate.prompt_templates)} if cfg.generate.prompt_templates else {}
    return {**runtime.resolve(cfg).inputs(), **pinned, **templates}


def preflight(ctx: RunContext) -> None:
    resolve_model(ctx.cfg.generate.model)  # one clear line now rather than N dead actors later
    runtime.check(ctx.cfg, runtime.Runtime.from_inputs(ctx.inputs["generate"]))


def make_job(
    cfg: RunConfig, classes: list[ClassInfo], fingerprint: str, out_uri: str, inputs: dict[str, Any] | None = None
) -> GenerationJob:
    """`inputs`: the stage's resolved inputs as fingerprinted (RunContext.inputs); resolved here if not given."""
    inputs = resolved_inputs(cfg) if inputs is None else inputs
    chosen = runtime.Runtime.from_inputs(inputs)
    return GenerationJob(
        config=cfg.generate,
        model=resolve_model(cfg.generate.model),
        image_size=cfg.image_size,
        seed=cfg.seed,
        classes=tuple(classes),
        fingerprint=fingerprint,
        out_uri=out_uri,
        engine=chosen.engine,
        vae_dtype=chosen.vae_dtype,
        model_revision=inputs.get("model_revision"),
    )


def padding_note(cfg: RunConfig, units: list) -> str | None:
    """A line when padding costs more than a tenth of the device's work (every batch runs full)."""
    b = cfg.generate.batch_size
    useful = sum(u.size for u in units)
    executed = sum(-(-u.size // b) * b for u in units)
    if executed and (executed - useful) / executed > 0.1:
        return (
            f"{(executed - useful) / executed:.0%} of the device's work is padding: units of {units[0].size} "
            f"images run in batches of {b}; a --batch-size that divides the unit size (or a unit size that is "
            "a multiple of it) wastes nothing"
        )
    return None


def fetch_pinned_model(job: GenerationJob, worker_gpus: float | None, stats: dict) -> None:
    """A pinned hub model downloaded once per node before the actors start, which then load it offline
    (fetch.py); local and built-in models need nothing."""
    if job.model_revision is None:
        return
    from gdd_ray.ray_utils import cluster_gpus

    t0 = time.perf_counter()
    needs_gpu = "num_gpus" in actor_options(cluster_gpus(), worker_gpus)
    nodes = fetch.fetch_on_nodes(job.model, job.model_revision, needs_gpu)
    seconds = round(time.perf_counter() - t0, 3)
    stats["model_fetch"] = {"nodes": len(nodes), "s": seconds}
    where = (
        f"in the cache of {len(nodes)} node(s) ({seconds:.1f} s)"
        if nodes
        else "to be fetched by each node's first worker"
    )
    say("generate", f"{job.model} at {job.model_revision[:12]} {where}")  # no node up yet: an autoscaling cluster


def default_workers(cfg: RunConfig) -> int:
    if cfg.generate.workers is not None:
        return cfg.generate.workers
    from gdd_ray.ray_utils import cluster_gpus

    return max(1, cluster_gpus())


def run(ctx: RunContext, *, serial: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg, run_dir, fp = ctx.cfg, ctx.run_dir, ctx.fingerprint("generate")
    loc = run_dir.generated
    units = ctx.plan.by_name()
    specs = [shards.generated_spec(u, fp) for u in ctx.plan.units]
    loc.makedirs()
    loc.remove_stale_temporaries()
    check = shards.check_folder(loc, specs)
    for name, why in sorted(check.problems.items()):
        say("generate", f"redoing {name}: {why}")
    say(
        "generate",
        f"{len(specs)} units ({ctx.plan.images} images): {len(check.done)} done, {len(check.todo)} to do",
    )
    previous = run_dir.read_summary("generate")
    if not check.todo and not check.foreign and shards.read_manifest(loc, fp) and previous:
        say("generate", "nothing to do: every shard is present and current")
        if cfg.generate.time_budget is not None:
            say(
                "generate",
                f"the time budget has nothing left to grow: the run has its planned IPC, {generated_per_class(cfg)}",
            )
        return previous

    shards.drop_manifest(loc)
    todo = [units[s.name] for s in check.todo]
    results: list[UnitResult] = []
    workers = 0
    driver_stats: dict = {}
    budget = TimeBudget(cfg.generate.time_budget_s) if cfg.generate.time_budget is not None else None
    started = now_iso()
    if todo:
        run_dir.update_stage("generate", started=started, finished=None)
        job = make_job(cfg, ctx.classes, fp, loc.uri, ctx.inputs.get("generate"))
        say("generate", f"engine {job.engine}, decoder {cfg.generate.decoder} in {job.vae_dtype}")
        note = padding_note(cfg, todo)
        if note:
            say("generate", note)
        progress = Progress("generate", len(todo), sum(u.size for u in todo))
        if serial:
            workers = 1
            results = run_serial(todo, lambda: UnitGenerator(job), cfg.generate.max_retries, progress, budget)
        else:
            from gdd_ray.ray_utils import init_ray

            init_ray()
            workers = default_workers(cfg)
            fetch_pinned_model(job, cfg.generate.worker_gpus, driver_stats)
            results = run_on_ray(
                todo, job, workers, cfg.generate.max_retries, progress, stats=driver_stats,
                worker_gpus=cfg.generate.worker_gpus, budget=budget,
            )  # fmt: skip
    # Out-of-plan shards go only now that the plan's own shards all exist (never fewer images than asked).
    for name in check.foreign:
        say("generate", f"removing {name}: not part of this plan (--ipc or --unit-size changed)")
        loc.delete(name)
    loc.remove_stale_temporaries()  # a killed worker's leftovers (its units were redone elsewhere)
    after = shards.check_folder(loc, specs)
    reached = ipc_reached(ctx.plan.units, {s.name for s in after.done})
    # Without a budget every shard must be there; with one, every shard below the IPC reached (the rest of
    # the plan is for a later run). A worker said it wrote a shard that is not there: never report success.
    gap = after.todo if budget is None or not reached else []
    if gap:
        raise RuntimeError(f"{len(gap)} shards missing after the run, e.g. {gap[0].name}")
    listed = [spec for unit, spec in zip(ctx.plan.units, specs) if unit.stop <= reached]

    summary = stage_summary(
        "generate",
        fp,
        started,
        time.perf_counter() - t0,
        units=len(listed),
        units_run=len(results),
        images=sum(s.rows for s in listed),
        images_made=sum(r.images for r in results),
        executed_batch_size=cfg.generate.batch_size,
        images_executed=sum(r.executed for r in results),  # padding included
        workers=workers,
        per_worker=per_worker(results),
        driver=driver_stats,
        ipc_planned=generated_per_class(cfg),
        ipc_reached=reached,  # every class has images 0..ipc_reached-1; later stages use these
        **(budget.describe() if budget else {}),
    )
    run_dir.write_summary("generate", summary)
    shards.write_manifest(loc, "generate", fp, listed)  # last: its presence means "complete" (up to the IPC reached)
    run_dir.update_stage("generate", finished=summary["finished"], summary=summary["totals"], ipc_reached=reached)
    t = summary["totals"]
    rate = f" ({t['images_per_s']:.1f} img/s)" if t["images_per_s"] else ""
    say(
        "generate",
        f"done: {t['images_made']} images generated in {t['wall_s']:.1f} s{rate}, "
        f"{t['images']} images in {t['units']} shards under {loc.uri}",
    )
    if budget is not None:
        say("generate", budget_line(budget, reached, generated_per_class(cfg), t["images_made"]))
    return summary


def budget_line(budget: TimeBudget, reached: int, planned: int, made: int) -> str:
    """What the budget did, next to the images/s it was spent at."""
    rate = made / budget.used_s if budget.used_s > 0 and made else 0.0
    spent = f"time budget {budget.seconds:g} s: {budget.used_s:.1f} s generating ({rate:.1f} img/s)"
    if reached < planned:
        return f"{spent}; stopped with every class at IPC {reached} of the planned {planned} (a rerun grows it)"
    return f"{spent}; every class reached the planned IPC {planned}"


def per_worker(results: list[UnitResult]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(
        lambda: {"units": 0, "images": 0, "executed": 0, "render_s": 0.0, "encode_s": 0.0}
    )
    for r in results:
        w = out[r.worker]
        w["units"] += 1
        w["images"] += r.images
        w["executed"] += r.executed
        w["render_s"] += r.render_s
        w["encode_s"] += r.encode_s
    for w in out.values():
        w["images_per_render_s"] = w["images"] / w["render_s"] if w["render_s"] else 0.0
    return dict(out)
