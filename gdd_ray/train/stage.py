"""Stage 3: evaluate the distilled set, the way the field does, as a Ray Train job.

driver   read the shards its source stage's manifest lists (OUT/augmented/ when that stage runs or ran,
         else OUT/generated/) and the real test set once, check labels, sizes and class lists against
         each other, put both in the object store
workers  train.worker: TorchTrainer workers (one per GPU; one per CPU on a CPU-only cluster), each training
         its share of the independent runs
driver   gather the runs; train.report writes results.json, metrics.jsonl and curve.png

OUT/eval/runs/run00.json        a finished run (a rerun skips it)
OUT/eval/metrics/run00.jsonl    a run's metrics so far (rewritten at each checkpoint)
OUT/eval/checkpoints/run00.pt   a run's latest checkpoint (every --checkpoint-every epochs; a rerun resumes)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from gdd_ray import selection, shards, storage
from gdd_ray.config import RunConfig
from gdd_ray.errors import UserError
from gdd_ray.logs import say
from gdd_ray.run import RunContext, RunDir, now_iso, stage_summary
from gdd_ray.train import report, testsets
from gdd_ray.train.data import DistilledSet, check_alignment, load_shards, mean_std

VERSION = 3  # 3: the set is class-major (selection.choose); per-class results; protocols
# What decides the numbers a run computes. Not eval_runs, eval_workers, checkpoint_every or eval_every:
# resume is exact, so changing those reuses finished work. --select is in resolved_inputs (the rows
# trained on), since it decides nothing under the paper protocol.
OUTPUT_FIELDS = (
    "dataset",
    "classes",
    "train.eval_data",
    "train.epochs",
    "train.eval_seed",
    "train.lr",
    "train.momentum",
    "train.weight_decay",
    "train.train_batch_size",
    "train.net_depth",
    "train.net_width",
    "train.net_norm",
    "train.net_act",
    "train.net_pool",
    "train.dsa_strategy",
    "train.protocol",
    "train.train_ipc",
    "train.train_variants",
)


def source(cfg: RunConfig, run_dir: RunDir) -> str:
    """The data trained on: the augment stage's output when it runs or has run, else the selected images
    (with --select-by clip), else the generated shards."""
    if "augment" in cfg.stages or run_dir.augmented.list(shards.SHARD_SUFFIX):
        return "augment"
    return "select" if cfg.clip.select_by == "clip" else "generate"


def resolved_inputs(cfg: RunConfig) -> dict[str, Any]:
    """The rows trained on, resolved: the prefix (index < IPC, variant <= K) and, under the challenge
    protocol, the 10-per-class selection. IPC is here because the source's fingerprint does not hold it."""
    choice = selection.for_training(cfg)
    rows = choice.describe()
    if choice.per_class is None:
        rows["how"] = None  # every row of the prefix: --select decides nothing
    return {"rows": rows}


def _variants_available(ctx: RunContext) -> int:
    return ctx.cfg.augment.pda_variants if ctx.sources["train"] == "augment" else 0


def _test_what(info: testsets.TestSetInfo) -> str:
    return f"{info.kind} at {info.root}"


def training_rows(ctx: RunContext) -> selection.RowChoice:
    """The rows trained on, never past the IPC a time budget reached (the manifests list no more either)."""
    choice = selection.for_training(ctx.cfg)
    return dataclasses.replace(choice, ipc=min(choice.ipc or ctx.ipc, ctx.ipc))


def training_shards(ctx: RunContext) -> tuple[storage.Location, shards.Manifest]:
    """The source stage's folder and its manifest (which must be current for this run)."""
    src = ctx.sources["train"]
    loc = ctx.run_dir.stage_dir(src)
    manifest = shards.read_manifest(loc, ctx.fingerprint(src))
    if manifest is None:
        raise UserError(
            f"{loc.uri} holds no shards to train on for this config (no current {shards.MANIFEST_FILE}): "
            f"run the {src} stage first"
        )
    return loc, manifest


def preflight(ctx: RunContext) -> None:
    """Everything checkable before the cluster starts; reads only, writes nothing."""
    cfg = ctx.cfg
    if ctx.sources["train"] not in cfg.stages:
        training_shards(ctx)
    choice = selection.for_training(cfg)
    offered = selection.rows_per_class(choice, ctx.ipc, _variants_available(ctx))
    if choice.per_class is not None and offered < choice.per_class:
        raise UserError(
            f"--protocol challenge trains on {choice.per_class} images per class but this run offers {offered} "
            "(IPC x (variants + 1)); raise --ipc or --pda-variants"
        )
    from gdd_ray.train.convnet import ConvNet  # torch: imported by runs that train, not by importing the pipeline

    try:
        ConvNet.from_config(cfg.train, len(ctx.classes), cfg.image_size)
    except ValueError as e:
        raise UserError(f"--net-depth/--net-pool: {e}") from e
    if cfg.train.eval_data is None:
        return
    info = testsets.describe(cfg.train.eval_data)
    testsets.check_size(info, cfg.image_size, cfg.train.eval_data)
    check_alignment(ctx.classes, info.class_ids, _test_what(info))


def load_data(ctx: RunContext) -> tuple[storage.Location, DistilledSet, testsets.TestSet | None, tuple]:
    """The distilled set (decoded once), the real test set and the normalisation, checked against each other."""
    cfg, t = ctx.cfg, ctx.cfg.train
    src_loc, manifest = training_shards(ctx)
    distilled = load_shards(src_loc, manifest.names, training_rows(ctx), len(ctx.classes))
    ms = mean_std(cfg.dataset)
    test = None
    if t.eval_data is not None:
        test = testsets.load(t.eval_data, distilled.image_size, ms)
        if len(test.labels) and test.labels.max() >= len(ctx.classes):
            raise UserError(
                f"--eval-data {t.eval_data}: labels go up to {test.labels.max()} but the run has {len(ctx.classes)} classes"
            )
    check_alignment(
        ctx.classes, test.info.class_ids if test else None, _test_what(test.info) if test else "", distilled
    )
    if test is not None and test.info.class_ids is None:
        say("train", f"{t.eval_data} names no classes: label alignment checked by class count only")

    return src_loc, distilled, test, ms


def run(ctx: RunContext) -> dict[str, Any]:
    t0 = time.perf_counter()
    started = now_iso()
    cfg, t, fp = ctx.cfg, ctx.cfg.train, ctx.fingerprint("train")
    eval_loc = ctx.run_dir.eval

    previous = report.read_results(eval_loc)
    if previous and previous.get("fingerprint") == fp and len(previous.get("runs", [])) == t.eval_runs:
        say("train", f"nothing to do: {storage.join(eval_loc.uri, report.RESULTS)} is current")
        return previous

    src_loc, distilled, test, ms = load_data(ctx)
    eval_loc.makedirs()
    eval_loc.remove_stale_temporaries()
    done = report.finished_runs(eval_loc, fp, t.eval_runs)
    pending = [r for r in range(t.eval_runs) if r not in done]
    say(
        "train",
        f"{len(distilled.labels)} images ({len(ctx.classes)} classes, {distilled.image_size}px) from {src_loc.uri}, "
        f"{t.protocol} protocol; {t.eval_runs} runs x {t.epochs_run} epochs: {len(done)} done, {len(pending)} to do",
    )
    workers, use_gpu = 0, False
    if pending:
        workers, use_gpu = _train_pending(ctx, pending, distilled, test, ms)
        done = report.finished_runs(eval_loc, fp, t.eval_runs)
        missing = [r for r in range(t.eval_runs) if r not in done]
        if missing:  # never report a mean over fewer runs than asked
            raise RuntimeError(f"runs {missing} finished without writing their result under {eval_loc.uri}/runs")
    eval_loc.remove_stale_temporaries()

    runs = [done[r] for r in range(t.eval_runs)]
    results = report.results_document(
        cfg, fp, src_loc.uri, distilled, test, runs, ms, ctx.classes,
        workers=workers, use_gpu=use_gpu, started=started, wall_s=time.perf_counter() - t0,
    )  # fmt: skip
    accs = results["accuracies"]
    summary = stage_summary(
        "train", fp, started, time.perf_counter() - t0,
        units=t.eval_runs, units_run=len(pending), images=int(len(distilled.labels)), images_made=0,
        evaluated=results["evaluated"], accuracy_mean=results["accuracy_mean"],
        accuracy_std=results["accuracy_std"], results=report.RESULTS, protocol=t.protocol,
        images_per_class=results["train_set"]["images_per_class"],
    )  # fmt: skip
    ctx.run_dir.write_summary("train", summary)
    report.write_outputs(eval_loc, results, report.merge_metrics(eval_loc, t.eval_runs))
    ctx.run_dir.update_stage("train", finished=results["finished"], accuracy_mean=results["accuracy_mean"])
    if test is None:
        say("train", "done; nothing was evaluated: no --eval-data was given, so no test accuracy exists")
    else:
        say(
            "train",
            f"done: test accuracy {100 * results['accuracy_mean']:.2f} +- {100 * results['accuracy_std']:.2f} % "
            f"over {len(accs)} runs (last epoch, {t.protocol} protocol) -> {storage.join(eval_loc.uri, report.RESULTS)}",
        )
    return results


def _train_pending(
    ctx: RunContext, pending: list[int], distilled: DistilledSet, test: testsets.TestSet | None, ms
) -> tuple[int, bool]:
    """Put the data in the object store once and train the pending runs on a Ray Train worker group."""
    import ray

    from gdd_ray.ray_utils import init_ray
    from gdd_ray.train.worker import TrainJob, check_checkpoints, default_workers, fit

    check_checkpoints(ctx.run_dir.eval.uri, pending, ctx.fingerprint("train"))
    init_ray()  # only now: a rerun over finished runs starts nothing
    workers, use_gpu = default_workers(len(pending), ctx.cfg.train.eval_workers)
    job = TrainJob(
        config=ctx.cfg.train,
        runs=pending,
        num_classes=len(ctx.classes),
        mean=ms[0],
        std=ms[1],
        fingerprint=ctx.fingerprint("train"),
        eval_uri=ctx.run_dir.eval.uri,
        train_ref=ray.put((distilled.images, distilled.labels)),
        test_ref=ray.put((test.images, test.labels)) if test is not None else None,
        images=int(len(distilled.labels)),
    )
    fit(job, ctx.run_dir.eval.child("_ray_train"), workers, use_gpu)
    return workers, use_gpu
