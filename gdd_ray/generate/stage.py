"""Stage 1, generate: take the plan, keep the shards that are done, render the rest, write the manifest."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from gdd_ray import lifecycle, shards
from gdd_ray.classes import ClassInfo
from gdd_ray.config import RunConfig
from gdd_ray.generate import fetch, runtime
from gdd_ray.generate.budget import TimeBudget, ipc_reached
from gdd_ray.generate.driver import actor_options, run_on_ray, run_serial
from gdd_ray.generate.generator import GenerationJob, UnitGenerator, UnitResult
from gdd_ray.generate.model import SDXL_RANDOM, SDXL_RANDOM_WEIGHTS, resolve_model, resolve_revision
from gdd_ray.logs import Progress, say
from gdd_ray.plan import generated_per_class
from gdd_ray.run import RunContext, RunDir

VERSION = 3  # 3: packed units (a shard spans classes); 2: engines, decoder precision set once, static batches
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
    # How sdxl-random's weights are drawn: another draw is other pixels (other models: fingerprints as before).
    weights = {"random_weights": SDXL_RANDOM_WEIGHTS} if cfg.generate.model == SDXL_RANDOM else {}
    return {**runtime.resolve(cfg).inputs(), **pinned, **templates, **weights}


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
    """A line when padding costs more than 5 % of the device's work (every batch runs full; units are whole
    batches, so only the run's last one can be short)."""
    b = cfg.generate.batch_size
    useful = sum(u.size for u in units)
    executed = sum(-(-u.size // b) * b for u in units)
    if executed and (executed - useful) / executed > 0.05:
        return (
            f"{(executed - useful) / executed:.0%} of the device's work is padding: {useful} images to render in "
            f"batches of {b}; a smaller --batch-size would waste less on so few images"
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


class Generate(lifecycle.ShardStage):
    name = "generate"

    def __init__(self, ctx: RunContext, serial: bool = False):
        super().__init__(ctx, serial)
        budget_s = ctx.cfg.generate.time_budget_s if ctx.cfg.generate.time_budget is not None else None
        self.budget = TimeBudget(budget_s) if budget_s is not None else None

    def ipc(self, after: shards.Check) -> int:
        """The IPC every class has; with a time budget the rounds it finished (the rest is a later run's)."""
        reached = ipc_reached(self.ctx.plan.units, {s.name for s in after.done})
        return super().ipc(after) if self.budget is None or not reached else reached

    def work(self, todo: list[shards.ShardSpec]) -> lifecycle.Work:
        units, stats = self.ctx.plan.by_name(), {}
        results = render(self.ctx, [units[s.name] for s in todo], self.budget, self.serial, stats)
        return lifecycle.Work(
            len(results), sum(r.images for r in results), details={
                "executed_batch_size": self.ctx.cfg.generate.batch_size,
                "images_executed": sum(r.executed for r in results),  # padding included
                "workers": stats.pop("workers", 0), "per_worker": per_worker(results), "driver": stats,
                "ipc_planned": generated_per_class(self.ctx.cfg), **(self.budget.describe() if self.budget else {}),
            },
        )  # fmt: skip

    def nothing_to_do(self) -> None:
        super().nothing_to_do()
        if self.budget is not None:
            planned = generated_per_class(self.ctx.cfg)
            say("generate", f"the time budget has nothing left to grow: the run has its planned IPC, {planned}")

    def done_line(self, summary: dict[str, Any]) -> str:
        t = summary["totals"]
        rate = f" ({t['images_per_s']:.1f} img/s)" if t["images_per_s"] else ""
        line = f"done: {t['images_made']} images generated in {t['wall_s']:.1f} s{rate}, {t['images']} images in {t['units']} shards under {self.output.uri}"
        if self.budget is not None:
            line += "\n" + budget_line(self.budget, summary["ipc"], generated_per_class(self.ctx.cfg), t["images_made"])
        return line


def run(ctx: RunContext, *, serial: bool = False) -> dict[str, Any]:
    return lifecycle.run(Generate(ctx, serial))


def render(ctx: RunContext, todo: list, budget: TimeBudget | None, serial: bool, stats: dict) -> list[UnitResult]:
    """Render the units `todo` (in-process with `serial`, else on the cluster's actors); `stats` gets the driver's."""
    if not todo:
        return []
    cfg = ctx.cfg
    job = make_job(cfg, ctx.classes, ctx.fingerprint("generate"), ctx.run_dir.generated.uri, ctx.inputs.get("generate"))
    say("generate", f"engine {job.engine}, decoder {cfg.generate.decoder} in {job.vae_dtype}")
    note = padding_note(cfg, todo)
    if note:
        say("generate", note)
    progress = Progress("generate", len(todo), sum(u.size for u in todo))
    if serial:
        stats["workers"] = 1
        return run_serial(todo, lambda: UnitGenerator(job), cfg.generate.max_retries, progress, budget)
    from gdd_ray.ray_utils import init_ray

    init_ray()
    stats["workers"] = workers = default_workers(cfg)
    fetch_pinned_model(job, cfg.generate.worker_gpus, stats)
    return run_on_ray(
        todo, job, workers, cfg.generate.max_retries, progress, stats=stats,
        worker_gpus=cfg.generate.worker_gpus, budget=budget,
    )  # fmt: skip


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
