"""Stage 1, generate: plan the units, keep the shards that are done, render the rest, write the summary."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from gdd_ray import storage
from gdd_ray.classes import ClassInfo
from gdd_ray.config import RunConfig, generation_fingerprint
from gdd_ray.generate import shards
from gdd_ray.generate.driver import Progress, run_on_ray, run_serial
from gdd_ray.generate.generator import GenerationSpec, UnitGenerator
from gdd_ray.generate.model import resolve_model
from gdd_ray.generate.plan import SHARD_SUFFIX, WorkUnit, parse_shard_name, plan_units
from gdd_ray.run import RunDir, now_iso


def fingerprint(cfg: RunConfig, classes: list[ClassInfo], upstream: dict[str, str]) -> str:
    return generation_fingerprint(cfg, [c.class_id + "\t" + c.name for c in classes])


def preflight(cfg: RunConfig, run_dir: RunDir, classes: list[ClassInfo]) -> None:
    resolve_model(cfg.generate.model)  # one clear line now rather than N dead actors later


def make_spec(cfg: RunConfig, classes: list[ClassInfo], fp: str, out_uri: str) -> GenerationSpec:
    g = cfg.generate
    return GenerationSpec(
        model=resolve_model(g.model),
        vae=g.vae,
        steps=g.steps,
        guidance=g.guidance,
        gen_resolution=g.gen_resolution,
        image_size=cfg.image_size,
        prompt_template=g.prompt_template,
        seed=cfg.seed,
        batch_size=g.batch_size,
        fingerprint=fp,
        out_uri=out_uri,
        classes=tuple(classes),
        compile=g.compile,
    )


def pending_units(loc: storage.Location, plan: list[WorkUnit], fp: str) -> tuple[list[WorkUnit], dict[str, str]]:
    """Units whose shard is missing, unreadable, short or of another fingerprint (judged by footers)."""
    present = set(loc.list(SHARD_SUFFIX))
    by_name = {u.shard_name: u for u in plan}
    metas = storage.footers(loc, sorted(present & set(by_name)))
    problems = {}
    for name, meta in metas.items():
        why = shards.shard_problem(meta, by_name[name], fp)
        if why:
            problems[name] = why
    todo = [u for u in plan if u.shard_name not in present or u.shard_name in problems]
    return todo, problems


def out_of_plan_shards(loc: storage.Location, plan: list[WorkUnit]) -> list[str]:
    """Shards of ours that this plan does not contain (e.g. the run was made with a larger --ipc)."""
    names = {u.shard_name for u in plan}
    return [n for n in loc.list(SHARD_SUFFIX) if parse_shard_name(n) is not None and n not in names]


def default_workers(cfg: RunConfig) -> int:
    if cfg.generate.workers is not None:
        return cfg.generate.workers
    from gdd_ray.ray_utils import cluster_gpus

    return max(1, cluster_gpus())


def run(cfg: RunConfig, run_dir: RunDir, classes: list[ClassInfo], *, serial: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    fp = fingerprint(cfg, classes, {})
    loc = run_dir.generated
    plan = plan_units(len(classes), cfg.ipc, cfg.generate.unit_size)
    loc.makedirs()
    loc.remove_stale_temporaries()
    todo, problems = pending_units(loc, plan, fp)
    for name, why in sorted(problems.items()):
        print(f"[generate] redoing {name}: {why}", flush=True)
    total_images = sum(u.size for u in plan)
    print(
        f"[generate] {len(plan)} units ({total_images} images): {len(plan) - len(todo)} done, {len(todo)} to do",
        flush=True,
    )
    previous = run_dir.read_summary("generate")
    stale = out_of_plan_shards(loc, plan)
    if not todo and not stale and previous and previous.get("fingerprint") == fp:
        print("[generate] nothing to do: every shard is present and current", flush=True)
        return previous

    results = []
    workers = 0
    driver_stats: dict = {}
    started = now_iso()
    if todo:
        run_dir.update_stage("generate", started=started, finished=None)
        spec = make_spec(cfg, classes, fp, loc.uri)
        progress = Progress(len(todo), sum(u.size for u in todo))
        if serial:
            workers = 1
            results = run_serial(todo, lambda: UnitGenerator(spec), cfg.generate.max_retries, progress)
        else:
            from gdd_ray.ray_utils import init_ray

            init_ray()
            workers = default_workers(cfg)
            results = run_on_ray(
                todo, spec, workers, cfg.generate.max_retries, progress, stats=driver_stats,
                worker_gpus=cfg.generate.worker_gpus,
            )  # fmt: skip
    # Out-of-plan shards go only now that the plan's own shards all exist (never fewer images than asked).
    for name in stale:
        print(f"[generate] removing {name}: not part of this plan (--ipc or --unit-size changed)", flush=True)
        loc.delete(name)
    remaining, problems = pending_units(loc, plan, fp)
    if remaining:  # a worker said it wrote a shard that is not there: never report success over a gap
        raise RuntimeError(f"{len(remaining)} shards missing after the run, e.g. {remaining[0].shard_name}")

    wall = time.perf_counter() - t0
    summary = make_summary(fp, plan, results, wall, workers, started)
    summary["driver"] = driver_stats
    run_dir.write_summary("generate", summary)
    run_dir.update_stage("generate", finished=now_iso(), summary=summary["totals"])
    t = summary["totals"]
    print(
        f"[generate] done: {t['images_generated']} images generated in {t['wall_s']:.1f} s "
        f"({t['images_per_s']:.1f} img/s), {t['images']} images in {t['shards']} shards under {loc.uri}",
        flush=True,
    )
    return summary


def make_summary(fp: str, plan: list[WorkUnit], results: list, wall: float, workers: int, started: str) -> dict:
    per_worker: dict[str, dict[str, float]] = defaultdict(
        lambda: {"units": 0, "images": 0, "render_s": 0.0, "encode_s": 0.0}
    )
    for r in results:
        w = per_worker[r.worker]
        w["units"] += 1
        w["images"] += r.images
        w["render_s"] += r.render_s
        w["encode_s"] += r.encode_s
    for w in per_worker.values():
        w["images_per_render_s"] = w["images"] / w["render_s"] if w["render_s"] else 0.0
    generated = sum(r.images for r in results)
    return {
        "stage": "generate",
        "fingerprint": fp,
        "started": started,
        "finished": now_iso(),
        "totals": {
            "shards": len(plan),
            "images": sum(u.size for u in plan),
            "units_run": len(results),
            "images_generated": generated,
            "wall_s": round(wall, 3),
            "images_per_s": round(generated / wall, 3) if wall > 0 else 0.0,
            "workers": workers,
        },
        "per_worker": dict(per_worker),
    }
