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
OUT/eval/cells/<net>-<labels>/  the same for every other network and label mode (--eval-nets, --labels)
OUT/eval/baselines/<cell>-<key>/  the same for the random-real and full-data baselines (--real-train-data),
                                under --baselines-dir when given (train.protocols says what is where)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gdd_ray import lifecycle, shards, storage, trainset
from gdd_ray.config import RunConfig, TrainConfig, net_key
from gdd_ray.errors import UserError
from gdd_ray.logs import say
from gdd_ray.run import RunContext, RunDir, Stopwatch, now_iso, stage_summary
from gdd_ray.train import evaluation, protocols, report, testsets
from gdd_ray.train.data import DistilledSet, check_alignment, load_shards, mean_std

VERSION = 3  # 3: the set is class-major (trainset.choose); per-class results; protocols
# What decides the numbers a run computes. Not eval_runs, eval_workers, checkpoint_every or eval_every:
# resume is exact, so changing those reuses finished work (nor runs_at_once: float rounding only, nor
# baselines_dir, full_data_max_gib: where and whether, not what). --select is in resolved_inputs (the rows
# trained on), since it decides nothing under the paper protocol; so are the evaluation protocols' fields.
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
    return "select" if cfg.select.select_by == "clip" else "generate"


# The evaluation protocols' fields (baselines, networks, soft labels): in the fingerprint when set, absent at
# their defaults, so runs made before they existed keep their fingerprint (as generate's prompt_templates).
PROTOCOL_FIELDS = (
    "real_train_data",
    "eval_full_data",
    "eval_nets",
    "labels",
    "teacher",
    "temperature",
    "soft_epochs",
    "soft_lr",
    "soft_weight_decay",
)


SOFT_FIELDS = ("teacher", "temperature", "soft_epochs", "soft_lr", "soft_weight_decay")


def resolved_inputs(cfg: RunConfig) -> dict[str, Any]:
    """The rows trained on, resolved: the prefix (index < IPC, variant <= K) and, under the challenge
    protocol, the 10-per-class selection. IPC is here because the source's fingerprint does not hold it.
    Then the evaluation protocols' fields that differ from their defaults (networks by their key), and the
    teacher's bytes (its digest) rather than its path alone."""
    choice = trainset.for_training(cfg)
    rows = choice.describe()
    if choice.per_class is None:
        rows["how"] = None  # every row of the prefix: --select decides nothing
    out: dict[str, Any] = {"rows": rows}
    default, t = TrainConfig(), cfg.train
    for name in PROTOCOL_FIELDS:
        value, usual = getattr(t, name), getattr(default, name)
        if name == "eval_nets":  # by key: ConvNet-3 is convnet
            value, usual = [net_key(n) for n in value], [net_key(n) for n in usual]
        if t.labels == "hard" and name in SOFT_FIELDS:
            continue  # hard labels only: the soft-label options decide nothing
        if value != usual:
            out[f"train.{name}"] = value
    if cfg.train.labels != "hard" and cfg.train.teacher:
        try:
            out["teacher_digest"] = protocols.file_digest(cfg.train.teacher)
        except OSError:
            out["teacher_digest"] = None  # preflight says why in one line
    return out


def _variants_available(ctx: RunContext) -> int:
    return ctx.cfg.augment.pda_variants if ctx.sources["train"] == "augment" else 0


def _test_what(info: testsets.TestSetInfo) -> str:
    return f"{info.kind} at {info.root}"


def training_rows(ctx: RunContext, source: lifecycle.Source) -> trainset.RowChoice:
    """The rows trained on, never past the IPC its source covers (a time budget may have stopped short)."""
    choice = trainset.for_training(ctx.cfg)
    return dataclasses.replace(choice, ipc=min(choice.ipc or source.ipc, source.ipc))


def preflight(ctx: RunContext) -> None:
    """Everything checkable before the cluster starts; reads only, writes nothing."""
    cfg = ctx.cfg
    ipc = cfg.ipc
    if ctx.sources["train"] not in cfg.stages:
        ipc = lifecycle.read_source(ctx, "train").ipc
    choice = trainset.for_training(cfg)
    offered = trainset.rows_per_class(choice, ipc, _variants_available(ctx))
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
    evaluation.preflight(ctx)
    if cfg.train.eval_data is None:
        return
    info = testsets.describe(cfg.train.eval_data)
    testsets.check_size(info, cfg.image_size, cfg.train.eval_data)
    check_alignment(ctx.classes, info.class_ids, _test_what(info))


def load_data(ctx: RunContext, source: lifecycle.Source) -> tuple[DistilledSet, testsets.TestSet | None, tuple]:
    """The distilled set (decoded once), the real test set and the normalisation, checked against each other."""
    cfg, t = ctx.cfg, ctx.cfg.train
    rows = training_rows(ctx, source)
    distilled = load_shards(source.loc, source.manifest.names, rows, len(ctx.classes))
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

    return distilled, test, ms


def run(ctx: RunContext) -> dict[str, Any]:
    """Train what is not finished, then results.json (last); nothing when it is current (_current)."""
    watch, started, t = Stopwatch(), now_iso(), ctx.cfg.train
    eval_loc = ctx.run_dir.eval
    source = lifecycle.read_source(ctx, "train")
    previous = report.read_results(eval_loc)
    if _current(previous, ctx.fingerprint("train"), source, t.eval_runs):
        say("train", f"nothing to do: {storage.join(eval_loc.uri, report.RESULTS)} is current")
        return previous  # type: ignore[return-value]

    ctx.run_dir.update_stage("train", status="running", started=started, finished=None, read=source.record())
    distilled, test, ms = load_data(ctx, source)
    eval_loc.makedirs()
    eval_loc.remove_stale_temporaries()
    plan = evaluation.make_plan(ctx, distilled, source.manifest.digest)
    pending = plan.pending()
    say("train", _todo_line(ctx, source, distilled, plan, len(pending)))
    workers, use_gpu = 0, False
    if pending:
        workers, use_gpu = _train_pending(ctx, plan, pending, distilled, test, ms)
        plan.refresh()
        if plan.missing():  # never report a mean over fewer runs than asked
            raise RuntimeError(f"{', '.join(plan.missing())} finished without writing their result")
    eval_loc.remove_stale_temporaries()
    results = _results(ctx, source, plan, distilled, test, ms, workers, use_gpu, started, watch)
    summary = stage_summary(
        "train", ctx.fingerprint("train"), started, watch.seconds,
        units=len(plan.cells) * t.eval_runs, units_run=len(pending), images=int(len(distilled.labels)), images_made=0,
        evaluated=results["evaluated"], accuracy_mean=results["accuracy_mean"],
        accuracy_std=results["accuracy_std"], results=report.RESULTS, protocol=t.protocol,
        images_per_class=results["train_set"]["images_per_class"], read=source.record(),
    )  # fmt: skip
    ctx.run_dir.write_summary("train", summary)
    report.write_outputs(eval_loc, results, report.merge_metrics(eval_loc, t.eval_runs, plan.cells[1:]))
    ctx.run_dir.update_stage(
        "train", status="done", finished=results["finished"], accuracy_mean=results["accuracy_mean"]
    )
    for line in _done_lines(ctx, results, test is not None):
        say("train", line)
    return results


def _current(previous: dict[str, Any] | None, fp: str, source: lifecycle.Source, runs: int) -> bool:
    """Whether results.json is this config's, trained on what the source manifest now lists, over every run (a
    time budget that grew the set, or a redone stage, makes it stale)."""
    return bool(
        previous
        and previous.get("fingerprint") == fp
        and (previous.get("read") or {}).get("manifest") == source.manifest.digest
        and len(previous.get("runs", [])) == runs
    )


def _todo_line(ctx: RunContext, source, distilled: DistilledSet, plan, pending: int) -> str:
    t = ctx.cfg.train
    drop = f"lr x0.1 from epoch {t.lr_drop_epoch}" if t.lr_drop_epoch else "no lr drop"
    return (
        f"{len(distilled.labels)} images ({len(ctx.classes)} classes, {distilled.image_size}px) from {source.loc.uri}, "
        f"{t.protocol} protocol ({drop}); {len(plan.cells)} evaluation(s) x {t.eval_runs} runs: "
        f"{len(plan.cells) * t.eval_runs - pending} done, {pending} to do"
    )


def _results(ctx, source, plan, distilled, test, ms, workers, use_gpu, started, watch) -> dict[str, Any]:
    """results.json: the headline cell's runs, what was read, and every other protocol's numbers."""
    first = plan.cells[0]
    runs = [first.done[r] for r in range(ctx.cfg.train.eval_runs)]
    results = report.results_document(
        ctx.cfg, ctx.fingerprint("train"), source.loc.uri, distilled, test, runs, ms, ctx.classes,
        workers=workers, use_gpu=use_gpu, started=started, wall_s=watch.seconds,
    )  # fmt: skip
    results["read"] = source.record()
    results.update(report.protocol_results(ctx.cfg, plan, distilled, test is not None))
    return results


def _done_lines(ctx: RunContext, results: dict[str, Any], evaluated: bool) -> list[str]:
    t = ctx.cfg.train
    if not evaluated:
        return ["done; nothing was evaluated: no --eval-data was given, so no test accuracy exists"]
    where = storage.join(ctx.run_dir.eval.uri, report.RESULTS)
    return [
        f"done: test accuracy {100 * results['accuracy_mean']:.2f} +- {100 * results['accuracy_std']:.2f} % over "
        f"{len(results['accuracies'])} runs (last epoch, {t.protocol} protocol) -> {where}",
        *report.protocol_lines(results),
    ]


def _train_pending(
    ctx: RunContext, plan: evaluation.EvalPlan, pending: list, distilled: DistilledSet, test, ms
) -> tuple[int, bool]:
    """Put the data in the object store once and train the pending runs on a Ray Train worker group (or in
    this process, inside worker.training_here: a sweep's trial)."""
    import ray

    from gdd_ray.ray_utils import init_ray
    from gdd_ray.train.worker import TrainJob, check_checkpoints, default_workers, device_here, fit, run_tasks

    t = ctx.cfg.train
    real, positions = evaluation.real_arrays(ctx, plan, pending)
    tasks = evaluation.tasks(plan, pending, positions, t.eval_seed)
    check_checkpoints(tasks)  # before any worker starts: a planted checkpoint is one line here
    init_ray()  # only now: a rerun over finished runs starts nothing
    evaluation.record_cells(plan)
    here = device_here()
    workers, use_gpu = (1, here.type == "cuda") if here is not None else default_workers(len(tasks), t.eval_workers)
    data = {"distilled": ray.put((distilled.images, distilled.labels))}
    if real is not None:
        data["real"] = ray.put(real)
    teacher_ref = None
    if any(task.labels == "soft" for task in tasks):
        with open(t.teacher, "rb") as fh:  # shipped: a worker on another node need not see the driver's disk
            teacher_ref = ray.put(fh.read())
    job = TrainJob(
        config=t,
        tasks=tasks,
        num_classes=len(ctx.classes),
        mean=ms[0],
        std=ms[1],
        data=data,
        test_ref=ray.put((test.images, test.labels)) if test is not None else None,
        teacher_ref=teacher_ref,
        teacher_name=t.teacher or "",
    )
    if here is not None:
        run_tasks(job, tasks, here)
    else:
        fit(job, ctx.run_dir.eval.child("_ray_train"), workers, use_gpu)
    return workers, use_gpu
