"""Stage 1b, select (on with --select-by clip): score every generated image with CLIP, keep the IPC best per class.

    score    Ray Data streams the generated shard names through an actor pool (one actor per GPU, or
             per CPU on a CPU-only cluster; each loads CLIP and embeds every class prompt once): each
             call scores a few shards in fixed-shape batches and commits one score file per shard
             under OUT/selected/scores/ (scorer.py). The driver never holds an image.
    choose   Ray Data tasks over the class labels: each reads its classes' score files, keeps the IPC
             best (ties by index) and writes the kept images, with `clip_score` and `clip_top1`, as the
             plan's kept units under OUT/selected/ (choose.py), returning the class's figures.
    finish   OUT/selected/clip_stats.json (per class: mean score, zero-shot top-1, diversity), the
             summary, then _manifest.json, last.

Resume = list the score files and kept shards whose footer says complete for this fingerprint, redo
the rest: a score file is redone per generated shard, a class's kept shards per class.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from gdd_ray import shards
from gdd_ray.config import RunConfig
from gdd_ray.errors import UserError
from gdd_ray.logs import Progress, say
from gdd_ray.plan import generated_per_class
from gdd_ray.run import RunContext, RunDir, Stopwatch, now_iso, stage_summary
from gdd_ray.select import clip
from gdd_ray.select.choose import ChooseJob, choose_classes
from gdd_ray.select.scorer import ScoreJob, ShardScorer, score_calls, score_spec

VERSION = 2  # bump when scoring or the choice changes for the same config; 2: batches of consecutive shards
# What decides which images are kept, with the generated images (the upstream fingerprint: model,
# prompts, seeds...) and the counts below; the batch shape moves scores by rounding (scorer.py), the
# actor count does not.
OUTPUT_FIELDS = ("clip.select_by", "clip.clip_model", "clip.clip_batch_size")
SCORES_DIR = "scores"
STATS_FILE = "clip_stats.json"
CLASSES_PER_TASK = 8  # a class's choice reads its score files only (no pixels) unless it writes


def source(cfg: RunConfig, run_dir: RunDir) -> str:
    return "generate"


def resolved_inputs(cfg: RunConfig) -> dict[str, Any]:
    """How many candidates each class has and how many it keeps, and the rule between them."""
    out = {
        "candidates_per_class": generated_per_class(cfg),
        "kept_per_class": cfg.ipc,
        "rule": "clip_score desc, index asc",
    }
    if cfg.clip.clip_model == clip.TINY:
        out["tiny_clip"] = clip.TINY_VERSION
    return out


def preflight(ctx: RunContext) -> None:
    """Checks that need no cluster and write nothing: the CLIP model loads, the generated shards are there."""
    clip.resolve_clip_model(ctx.cfg.clip.clip_model)
    if "generate" not in ctx.cfg.stages:
        inputs(ctx)


def inputs(ctx: RunContext) -> shards.Manifest:
    """The generate stage's manifest, which must hold every candidate of this plan."""
    loc = ctx.run_dir.generated
    manifest = shards.read_manifest(loc, ctx.fingerprint("generate"))
    if manifest is None:
        raise UserError(
            f"{loc.uri} holds no complete generation for this config (no current {shards.MANIFEST_FILE}): "
            "run the generate stage first (--stages generate,select)"
        )
    listed, present = set(manifest.names), set(loc.list(shards.SHARD_SUFFIX))
    missing = [u.shard_name for u in ctx.plan.units if u.shard_name not in listed or u.shard_name not in present]
    if missing:
        raise UserError(
            f"{loc.uri} lacks {len(missing)} of the {len(ctx.plan.units)} shards the select stage chooses from "
            f"(first: {missing[0]}; --overgenerate {ctx.cfg.clip.overgenerate} x --ipc {ctx.cfg.ipc}); "
            "run the generate stage to make them"
        )
    return manifest


def _prompts(ctx: RunContext) -> tuple[str, ...]:
    return tuple(c.prompt(ctx.cfg.generate.prompt_template) for c in ctx.classes)


def run(ctx: RunContext) -> dict[str, Any]:
    watch = Stopwatch()
    cfg, run_dir, fp = ctx.cfg, ctx.run_dir, ctx.fingerprint("select")
    inputs(ctx)
    dst, scores_loc = run_dir.selected, run_dir.selected.child(SCORES_DIR)
    score_specs = [score_spec(u, fp) for u in ctx.plan.units]
    kept_specs = [shards.selected_spec(u, fp) for u in ctx.plan.kept]
    for loc in (dst, scores_loc):
        loc.makedirs()
        loc.remove_stale_temporaries()
    scored, kept = shards.check_folder(scores_loc, score_specs), shards.check_folder(dst, kept_specs)
    for name, why in sorted({**scored.problems, **kept.problems}.items()):
        say("select", f"redoing {name}: {why}")
    to_write = sorted({s_unit.label for s_unit in ctx.plan.kept if s_unit.shard_name in {s.name for s in kept.todo}})
    n_cand, n_keep = generated_per_class(cfg), cfg.ipc
    say(
        "select",
        f"{len(ctx.classes)} classes, keep {n_keep} of {n_cand} each by CLIP score ({cfg.clip.clip_model}): "
        f"{len(scored.done)}/{len(score_specs)} shards scored, {len(ctx.classes) - len(to_write)} classes chosen",
    )
    previous = run_dir.read_summary("select")
    if not scored.todo and not to_write and not kept.foreign and shards.read_manifest(dst, fp) and previous:
        say("select", "nothing to do: every score file and kept shard is present and current")
        return previous

    shards.drop_manifest(dst)
    started = now_iso()
    run_dir.update_stage("select", status="running", started=started, finished=None)
    from gdd_ray.ray_utils import init_ray

    init_ray()
    pending = [s.name for s in scored.todo]
    score_stats, score_s, workers = [], 0.0, 0
    if pending:
        t_score = Stopwatch()
        job = ScoreJob(
            clip.resolve_clip_model(cfg.clip.clip_model), _prompts(ctx), run_dir.generated.uri, scores_loc.uri,
            fp, cfg.clip.clip_batch_size, ctx.plan.units,
        )  # fmt: skip
        progress = Progress("select", len(pending), sum(s.rows for s in scored.todo), unit_name="shards scored")
        score_stats, workers = _score_on_ray(job, pending, cfg, progress)
        score_s = t_score.seconds
    for loc, check in ((scores_loc, scored), (dst, kept)):
        for name in check.foreign:  # outputs of another unit grid (--unit-size changed); the plan's are all there
            loc.delete(name)
    if shards.check_folder(scores_loc, score_specs).todo:
        raise RuntimeError("select: score files missing after scoring; rerun to finish them")

    t_choose = Stopwatch()
    cjob = ChooseJob(
        run_dir.generated.uri, scores_loc.uri, dst.uri, fp, cfg.image_size, n_keep, ctx.plan.units, ctx.plan.kept
    )
    per_class = _choose_on_ray(cjob, len(ctx.classes), set(to_write))
    choose_s = t_choose.seconds
    for loc in (dst, scores_loc):
        loc.remove_stale_temporaries()
    after = shards.check_folder(dst, kept_specs)
    if after.todo:
        raise RuntimeError(f"select: {len(after.todo)} kept shards missing after the run, e.g. {after.todo[0].name}")

    for c in ctx.classes:
        per_class[c.label].update(class_id=c.class_id, name=c.name, prompt=c.prompt(cfg.generate.prompt_template))
    stats = clip_stats(cfg, fp, [per_class[c.label] for c in ctx.classes])
    dst.write_bytes(STATS_FILE, json.dumps(stats, indent=1).encode())
    summary = stage_summary(
        "select", fp, started, watch.seconds,
        units=len(score_specs), units_run=len(score_stats), images=len(ctx.classes) * n_keep,
        images_made=sum(s["rows"] for s in score_stats), work_s=score_s,
        generate_fingerprint=ctx.fingerprint("generate"), clip_model=cfg.clip.clip_model,
        candidates_per_class=n_cand, kept_per_class=n_keep, workers=workers, choose_s=round(choose_s, 3),
        classes_written=len(to_write), overall=stats["overall"], per_class=stats["classes"], stats=STATS_FILE,
    )  # fmt: skip
    run_dir.write_summary("select", summary)
    shards.write_manifest(dst, "select", fp, kept_specs)  # last: its presence means "complete"
    run_dir.update_stage("select", status="done", finished=summary["finished"], images=summary["totals"]["images"])
    o, t = stats["overall"], summary["totals"]
    rate = f" ({t['images_per_s']:.1f} img/s)" if t["images_per_s"] else ""
    say(
        "select",
        f"done: {t['images_made']} images scored in {score_s:.1f} s{rate}, {len(to_write)} classes chosen in "
        f"{choose_s:.1f} s; kept mean score {o['score_mean']:.4f} (all {o['score_mean_all']:.4f}), zero-shot "
        f"top-1 {100 * o['top1']:.1f} % (all {100 * o['top1_all']:.1f} %) -> {dst.uri}",
    )
    return summary


def clip_stats(cfg: RunConfig, fp: str, classes: list[dict[str, Any]]) -> dict[str, Any]:
    """The select stage's figures: per class, and their means over classes (None where undefined)."""

    def mean(key: str) -> float | None:
        vals = [c[key] for c in classes if c[key] is not None]
        return round(float(np.mean(vals)), 6) if vals else None

    keys = ("score_mean", "score_mean_all", "top1", "top1_all", "diversity", "diversity_all")
    return {
        "stage": "select",
        "fingerprint": fp,
        "clip_model": cfg.clip.clip_model,
        "prompt_template": cfg.generate.prompt_template,
        # score: cosine similarity of an image and its class prompt; top1: the class prompt is the most
        # similar of all classes' (zero-shot); diversity: mean pairwise cosine distance of image embeddings
        "overall": {k: mean(k) for k in keys},
        "classes": classes,
    }


def default_workers(cfg: RunConfig, pending_calls: int) -> tuple[int, float]:
    """(actors, GPUs per actor): one per GPU when the cluster has GPUs, else one per CPU."""
    from gdd_ray.ray_utils import cluster_gpus

    gpus = cluster_gpus()
    if cfg.clip.select_workers is not None:
        n = cfg.clip.select_workers
    else:
        import ray

        n = gpus or max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(n, pending_calls)), (1.0 if gpus else 0.0)


class _ScoreActor:
    """Ray Data actor: one ShardScorer (CLIP loaded once) for every batch of shard names it is given."""

    def __init__(self, job: ScoreJob):
        from gdd_ray.logs import quiet_libraries

        quiet_libraries()
        self.scorer = ShardScorer(job)
        self.scorer.load()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stats = self.scorer.score([n for call in batch["shards"] for n in str(call).split("\n")])
        return {key: np.array([s[key] for s in stats]) for key in stats[0]}


def _score_on_ray(job: ScoreJob, pending: list[str], cfg: RunConfig, progress: Progress) -> tuple[list[dict], int]:
    import ray

    from gdd_ray.ray_utils import quiet_data

    # A call scores one CLIP batch, whole: the group of shards that share it (shards are small, batches are not).
    calls = score_calls(job.units, job.batch_size, pending)
    workers, gpus = default_workers(cfg, len(calls))
    with quiet_data():
        ds = ray.data.from_items([{"shards": "\n".join(c)} for c in calls], override_num_blocks=len(calls))
        ds = ds.map_batches(
            _ScoreActor,
            batch_size=1,
            fn_constructor_kwargs={"job": job},
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=gpus,
            num_cpus=0 if gpus else 1,
        )
        stats: list[dict] = []
        for row in ds.iter_rows():
            stats.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
            progress.add(1, stats[-1]["rows"], workers=workers)
    if {s["shard"] for s in stats} != set(pending):
        raise RuntimeError("select: some shards were not scored; rerun to finish them")
    return stats, workers


def _choose_batch(batch: dict[str, np.ndarray], job: ChooseJob, write: set[int]) -> dict[str, np.ndarray]:
    """Ray Data UDF: class labels -> one row per class, its figures as JSON (the images go straight to storage)."""
    rows = choose_classes(job, [int(x) for x in batch["label"]], write)
    return {"label": np.array([r["label"] for r in rows]), "stats": np.array([json.dumps(r) for r in rows])}


def _choose_on_ray(job: ChooseJob, num_classes: int, write: set[int]) -> dict[int, dict[str, Any]]:
    import ray

    from gdd_ray.ray_utils import quiet_data

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    blocks = max(1, math.ceil(num_classes / CLASSES_PER_TASK))
    with quiet_data():
        ds = ray.data.from_items([{"label": c} for c in range(num_classes)], override_num_blocks=blocks)
        ds = ds.map_batches(
            _choose_batch,
            batch_size=None,
            fn_kwargs={"job": job, "write": write},
            compute=ray.data.TaskPoolStrategy(size=min(cpus, blocks)),
            num_cpus=1,
        )
        out = {int(r["label"]): json.loads(r["stats"]) for r in ds.iter_rows()}
    if len(out) != num_classes:
        raise RuntimeError(f"select: {num_classes - len(out)} classes were not chosen; rerun to finish them")
    return out
