"""Stage 1b, select (on with --select-by clip): score every generated image with CLIP, keep the IPC best per class.

    score    Ray Data streams the generated shard names through an actor pool (one actor per GPU, or
             per CPU on a CPU-only cluster; each loads CLIP and embeds every class prompt once): each
             call scores a few shards in fixed-shape batches and commits one score file per shard
             under OUT/selected/scores/ (scorer.py). The driver never holds an image.
    choose   tasks over the class labels: each reads the score files holding its classes' candidates and
             keeps the IPC best (ties by index), returning the class's choice and figures (no pixels);
    write    tasks over the kept shards still to make (the plan's kept units, which span classes): each
             writes its kept images, with `clip_score`, `clip_top1` and `source_index`, under
             OUT/selected/ (choose.py), reading the generated shards they come from.
    finish   OUT/selected/clip_stats.json (per class: mean score, zero-shot top-1, diversity), the
             summary, then _manifest.json, last (lifecycle.py).

Resume = list the score files and kept shards whose footer says complete for this fingerprint, redo
the rest: a score file is redone per generated shard, a kept shard per kept unit (the choice is cheap and
always made again from the score files: the same files, the same choice).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from gdd_ray import lifecycle, shard_map, shards
from gdd_ray.config import RunConfig
from gdd_ray.logs import Progress, say
from gdd_ray.plan import generated_per_class
from gdd_ray.run import RunContext, RunDir, Stopwatch
from gdd_ray.select import clip
from gdd_ray.select.choose import ChooseJob, choose_classes, write_kept_units
from gdd_ray.select.scorer import ScoreJob, ShardScorer, score_calls, score_spec

VERSION = 2  # 2: a kept image's index is its position among the kept (source_index: the generated one); batches of
# consecutive shards (scorer.batch_groups)
# What decides which images are kept, with the generated images (the upstream fingerprint: model,
# prompts, seeds...) and the counts below; the batch shape moves scores by rounding (scorer.py), the
# actor count does not.
OUTPUT_FIELDS = ("select.select_by", "select.clip_model", "select.clip_batch_size")
SCORES_DIR = shards.SCORES_DIR
STATS_FILE = "clip_stats.json"
CLASSES_PER_TASK = 8  # a class's choice reads its score files only (no pixels)
KEPT_SHARDS_PER_TASK = 4  # a kept shard reads the generated shards its images come from


def source(cfg: RunConfig, run_dir: RunDir) -> str:
    return "generate"


def resolved_inputs(cfg: RunConfig) -> dict[str, Any]:
    """How many candidates each class has and how many it keeps, and the rule between them."""
    out = {
        "candidates_per_class": generated_per_class(cfg),
        "kept_per_class": cfg.ipc,
        "rule": "clip_score desc, index asc",
    }
    if cfg.select.clip_model == clip.TINY:
        out["tiny_clip"] = clip.TINY_VERSION
    return out


def preflight(ctx: RunContext) -> None:
    """Checks that need no cluster and write nothing: the CLIP model loads, the generated shards are there."""
    clip.resolve_clip_model(ctx.cfg.select.clip_model)
    if "generate" not in ctx.cfg.stages:
        lifecycle.read_source(ctx, "select", need_ipc=generated_per_class(ctx.cfg))


def _prompts(ctx: RunContext) -> tuple[str, ...]:
    return tuple(c.prompt(ctx.cfg.generate.prompt_template) for c in ctx.classes)


class Select(lifecycle.ShardStage):
    """Its shards are the kept units; its score files (one per candidate shard) are its own bookkeeping."""

    name = "select"

    def read(self) -> None:
        self.source = lifecycle.read_source(self.ctx, "select", need_ipc=generated_per_class(self.ctx.cfg))
        self.scores = self.output.child(SCORES_DIR)
        self.score_specs = [score_spec(u, self.fp) for u in self.ctx.plan.units]
        self.scores.makedirs()
        self.scores.remove_stale_temporaries()
        self.scored = shards.check_folder(self.scores, self.score_specs)
        for name, why in sorted(self.scored.problems.items()):
            say("select", f"redoing score file {name}: {why}")

    def other_work(self) -> bool:
        return bool(self.scored.todo)

    def work(self, todo: list[shards.ShardSpec]) -> lifecycle.Work:
        cfg, ctx = self.ctx.cfg, self.ctx
        if not self.serial:
            from gdd_ray.ray_utils import init_ray

            init_ray()
        score_stats, workers = self.score()
        watch = Stopwatch()
        job = ChooseJob(
            self.source.loc.uri, self.scores.uri, self.output.uri, self.fp, cfg.image_size, cfg.ipc, ctx.plan.units,
            generated_per_class(cfg),
        )  # fmt: skip
        chosen = shard_map.map_shards(
            list(range(len(ctx.classes))), choose_classes, {"job": job}, per_call=CLASSES_PER_TASK,
            serial=self.serial, what="classes",
        )  # fmt: skip
        per_class = {int(c["label"]): c for c in chosen}
        kept = {label: {k: c.pop(k) for k in ("kept_scores", "kept_top1")} | {"kept_indices": c["kept_indices"]}
                for label, c in per_class.items()}  # fmt: skip
        units = {u.shard_name: u for u in ctx.plan.kept}  # a kept shard spans classes: written once all are chosen
        shard_map.map_shards(
            [s.name for s in todo], write_kept_units, {"job": job, "kept": kept, "units": units},
            per_call=KEPT_SHARDS_PER_TASK, serial=self.serial,
        )  # fmt: skip
        self.choose_s = watch.seconds
        for c in ctx.classes:
            per_class[c.label].update(class_id=c.class_id, name=c.name, prompt=c.prompt(cfg.generate.prompt_template))
        self.stats = clip_stats(cfg, self.fp, [per_class[c.label] for c in ctx.classes])
        self.output.write_bytes(STATS_FILE, json.dumps(self.stats, indent=1).encode())
        self.shards_written = len(todo)
        return lifecycle.Work(
            sum(len(s["shards"]) for s in score_stats), sum(s["rows"] for s in score_stats), self.score_s, details={
                "generate_fingerprint": ctx.fingerprint("generate"), "clip_model": cfg.select.clip_model,
                "candidates_per_class": generated_per_class(cfg), "kept_per_class": cfg.ipc, "workers": workers,
                "choose_s": round(self.choose_s, 3), "kept_shards_written": len(todo),
                "overall": self.stats["overall"], "per_class": self.stats["classes"], "stats": STATS_FILE,
            },
        )  # fmt: skip

    def score(self) -> tuple[list[dict[str, Any]], int]:
        """Score the candidate shards that have no current score file: (one stats dict per call, actors)."""
        cfg, pending, watch = self.ctx.cfg, [s.name for s in self.scored.todo], Stopwatch()
        score_stats, workers = [], 0
        if pending:
            job = ScoreJob(
                clip.resolve_clip_model(cfg.select.clip_model), _prompts(self.ctx), self.source.loc.uri,
                self.scores.uri, self.fp, cfg.select.clip_batch_size, self.ctx.plan.units,
            )  # fmt: skip
            progress = Progress(
                "select", len(pending), sum(s.rows for s in self.scored.todo), unit_name="shards scored"
            )
            workers, gpus = (1, 0.0) if self.serial else default_workers(cfg)
            # A call scores one CLIP batch, whole: the group of shards that share it (shards are small, batches not).
            calls = ["\n".join(c) for c in score_calls(job.units, job.batch_size, pending)]
            score_stats = shard_map.map_shards(
                calls, ShardScoring, {"job": job}, per_call=1, workers=workers, gpus=gpus, serial=self.serial,
                on_result=lambda s: progress.add(len(s["shards"]), s["rows"], workers=workers), what="score calls",
            )  # fmt: skip
        self.score_s = watch.seconds
        for name in self.scored.foreign:  # score files of another unit grid (--unit-size changed)
            self.scores.delete(name)
        self.scores.remove_stale_temporaries()
        if shards.check_folder(self.scores, self.score_specs).todo:
            raise RuntimeError("select: score files missing after scoring; rerun to finish them")
        return score_stats, workers

    def nothing_to_do(self) -> None:
        say("select", "nothing to do: every score file and kept shard is present and current")

    def done_line(self, summary: dict[str, Any]) -> str:
        o, t = self.stats["overall"], summary["totals"]
        rate = f" ({t['images_per_s']:.1f} img/s)" if t["images_per_s"] else ""
        return (
            f"done: {t['images_made']} images scored in {self.score_s:.1f} s{rate}, every class chosen and "
            f"{self.shards_written} kept shards written in {self.choose_s:.1f} s; kept mean score {o['score_mean']:.4f} (all {o['score_mean_all']:.4f}), "
            f"zero-shot top-1 {100 * o['top1']:.1f} % (all {100 * o['top1_all']:.1f} %) -> {self.output.uri}"
        )


def run(ctx: RunContext, *, serial: bool = False) -> dict[str, Any]:
    return lifecycle.run(Select(ctx, serial))


def clip_stats(cfg: RunConfig, fp: str, classes: list[dict[str, Any]]) -> dict[str, Any]:
    """The select stage's figures: per class, and their means over classes (None where undefined)."""

    def mean(key: str) -> float | None:
        vals = [c[key] for c in classes if c[key] is not None]
        return round(float(np.mean(vals)), 6) if vals else None

    keys = ("score_mean", "score_mean_all", "top1", "top1_all", "diversity", "diversity_all")
    return {
        "stage": "select",
        "fingerprint": fp,
        "clip_model": cfg.select.clip_model,
        "prompt_template": cfg.generate.prompt_template,
        # score: cosine similarity of an image and its class prompt; top1: the class prompt is the most
        # similar of all classes' (zero-shot); diversity: mean pairwise cosine distance of image embeddings
        "overall": {k: mean(k) for k in keys},
        "classes": classes,
    }


def default_workers(cfg: RunConfig) -> tuple[int, float]:
    """(actors, GPUs per actor): one per GPU when the cluster has GPUs, else one per CPU."""
    from gdd_ray.ray_utils import cluster_gpus

    gpus = cluster_gpus()
    n = cfg.select.select_workers if cfg.select.select_workers is not None else gpus or shard_map.cluster_cpus()
    return max(1, n), (1.0 if gpus else 0.0)


class ShardScoring:
    """The scoring work shard_map fans out over an actor pool: one ShardScorer (CLIP loaded once) per actor; an
    item is one call, the shard names of one batch group joined by newlines; one stats dict per call."""

    def __init__(self, job: ScoreJob):
        self.scorer = ShardScorer(job)
        self.scorer.load()

    def __call__(self, calls: list[str]) -> list[dict[str, Any]]:
        out = []
        for call in calls:
            stats = self.scorer.score(str(call).split("\n"))
            out.append({"shards": [s["shard"] for s in stats], "rows": sum(s["rows"] for s in stats)})
        return out
