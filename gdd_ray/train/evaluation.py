"""The train stage's plan: every cell (train.protocols) with its folder, its key and its finished runs; the real
training data the baselines need; the tasks the Ray Train workers get; the checks before anything starts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gdd_ray import storage
from gdd_ray.errors import UserError
from gdd_ray.run import RunContext
from gdd_ray.train import protocols, report, testsets
from gdd_ray.train.data import DistilledSet, alignment_problems
from gdd_ray.train.protocols import Cell

CELL_RECORD = "cell.json"


@dataclass
class CellPlan:
    cell: Cell
    loc: storage.Location
    key: str
    source_manifest: str | None = None  # a distilled cell: the digest of what the set was read from
    inputs: dict[str, Any] | None = None  # what a baseline's key hashes (written as cell.json)
    done: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class RealTrain:
    """--real-train-data as read: its description, every image's label and each run's random subset."""

    info: testsets.TestSetInfo
    labels: np.ndarray
    subsets: dict[int, np.ndarray]  # run -> rows of the real training set
    eval_seed: int

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.info.kind,
            "root": self.info.root,
            "images": int(len(self.labels)),
            "classes": self.info.num_classes,
            "random_subsets": [
                {
                    "run": r,
                    "seed": protocols.subset_seed(self.eval_seed, r),
                    "images": int(len(rows)),
                    "digest": protocols.rows_digest(rows),
                }
                for r, rows in sorted(self.subsets.items())
            ],
        }


@dataclass
class EvalPlan:
    cells: list[CellPlan]
    runs: int
    real: RealTrain | None = None

    def pending(self) -> list[tuple[CellPlan, int]]:
        return [(c, r) for c in self.cells for r in range(self.runs) if r not in c.done]

    def refresh(self) -> None:
        for c in self.cells:
            c.done = report.finished_runs(c.loc, c.key, self.runs, c.source_manifest)

    def missing(self) -> list[str]:
        return [f"{c.cell.name} run {r}" for c, r in self.pending()]


def teacher_digest(ctx: RunContext) -> str | None:
    t = ctx.cfg.train
    if t.labels == "hard" or t.teacher is None:
        return None
    try:
        return protocols.file_digest(t.teacher)
    except OSError as e:
        raise UserError(f"--teacher {t.teacher}: cannot be read ({e.strerror or e})") from e


def make_plan(ctx: RunContext, distilled: DistilledSet, source_manifest: str) -> EvalPlan:
    """Every cell, where its runs go and which are finished; the random subsets of this run's seed.
    `source_manifest`: the digest of the manifest the distilled set was read from (its runs carry it)."""
    cfg, t = ctx.cfg, ctx.cfg.train
    fp, eval_loc = ctx.fingerprint("train"), ctx.run_dir.eval
    all_cells = protocols.cells(t)
    tdig = teacher_digest(ctx)
    per_class = distilled.per_class
    plans = []
    for cell in all_cells:
        key, inputs, read = fp, None, source_manifest
        if cell.data != "distilled":
            key, inputs = protocols.baseline_key(cfg, ctx.classes, cell, per_class, tdig)
            read = None
        plans.append(CellPlan(cell, protocols.location(cfg, eval_loc, cell, all_cells[0], key), key, read, inputs))
    plan = EvalPlan(plans, t.eval_runs)
    plan.refresh()
    if t.real_train_data:
        info, labels = testsets.describe_train(t.real_train_data)
        check_real_train(ctx, info, labels)
        subsets = {}
        for r in range(t.eval_runs):
            try:
                subsets[r] = protocols.random_subset(labels, per_class, protocols.subset_seed(t.eval_seed, r))
            except ValueError as e:
                raise UserError(f"--real-train-data {t.real_train_data}: {e}") from e
        plan.real = RealTrain(info, labels, subsets, t.eval_seed)
    return plan


def check_real_train(ctx: RunContext, info: testsets.TestSetInfo, labels: np.ndarray) -> None:
    """The real training set's classes in the run's label order, its size the run's, the whole set bounded."""
    cfg, t = ctx.cfg, ctx.cfg.train
    shown = f"--real-train-data {t.real_train_data}"
    if info.class_ids is not None:
        if len(info.class_ids) != len(ctx.classes):
            raise UserError(f"{shown}: has {len(info.class_ids)} classes but the run has {len(ctx.classes)}")
        ours = [(c.label, c.class_id) for c in ctx.classes]
        msg = alignment_problems(ours, info.class_ids, f"real training set ({info.kind})", "training set")
        if msg:
            raise UserError(msg)
    testsets.check_size(info, cfg.image_size, t.real_train_data)
    if t.eval_full_data:
        gib = len(labels) * cfg.image_size**2 * 3 / 2**30
        if gib > t.full_data_max_gib:
            raise UserError(
                f"{shown}: the whole set is {len(labels)} images of {cfg.image_size} px = {gib:.2f} GiB as uint8, over "
                f"--full-data-max-gib {t.full_data_max_gib:g} (held by the driver, the object store and each training "
                "device); raise it if they hold that much, or drop --eval-full-data"
            )


def preflight(ctx: RunContext) -> None:
    """The checks of the new protocols that only read: networks fit the image size, the real training set
    and the teacher are readable and agree with the run."""
    cfg, t = ctx.cfg, ctx.cfg.train
    from gdd_ray.train.nets import build  # torch: loaded by runs that train

    for name in t.eval_nets:
        try:
            build(name, t, len(ctx.classes), cfg.image_size)
        except ValueError as e:
            raise UserError(f"--eval-nets {name}: {e}") from e
    if t.real_train_data:
        info, labels = testsets.describe_train(t.real_train_data)
        check_real_train(ctx, info, labels)
    if t.labels != "hard":
        from gdd_ray.train.teacher import check_classes, load_teacher

        teacher = load_teacher(t.teacher, "cpu")
        check_classes(teacher, len(ctx.classes), cfg.image_size, "cpu", t.teacher)


def record_cells(plan: EvalPlan) -> None:
    """Each baseline folder says what its key hashes (for a person; the key is what is checked)."""
    for c in plan.cells:
        if c.inputs is not None and not c.loc.exists(CELL_RECORD):
            c.loc.write_bytes(CELL_RECORD, json.dumps({"key": c.key, "inputs": c.inputs}, indent=2).encode())


def real_arrays(ctx: RunContext, plan: EvalPlan, pending: list[tuple[CellPlan, int]]) -> tuple[Any, dict[int, Any]]:
    """((images, labels) of the real rows the pending baseline runs read, run -> its subset's positions in them):
    the whole set when a full-data run is pending, else only the pending subsets' images."""
    if plan.real is None or all(c.cell.data == "distilled" for c, _ in pending):
        return None, {}
    t = ctx.cfg.train
    if any(c.cell.data == "full" for c, _ in pending):
        real = testsets.load_train(t.real_train_data, ctx.cfg.image_size)
        return (real.images, real.labels), {r: rows for r, rows in plan.real.subsets.items()}
    runs = sorted({r for c, r in pending if c.cell.data == "random"})
    union = np.unique(np.concatenate([plan.real.subsets[r] for r in runs]))
    real = testsets.load_train(t.real_train_data, ctx.cfg.image_size, union)
    return (real.images, real.labels), {r: np.searchsorted(union, plan.real.subsets[r]) for r in runs}


def tasks(plan: EvalPlan, pending: list[tuple[CellPlan, int]], positions: dict[int, Any], eval_seed: int) -> list:
    """The Ray Train tasks, grouped by cell so that a worker's share holds runs it can train together."""
    from gdd_ray.train.worker import Task

    out = []
    first = plan.cells[0]
    for c, r in pending:
        extra, rows, data = None, None, "distilled"
        if c.cell.data != "distilled":
            data = "real"
        if c.cell.data == "random":
            rows = positions[r]
            subset = plan.real.subsets[r]
            extra = {"subset_seed": protocols.subset_seed(eval_seed, r), "subset_digest": protocols.rows_digest(subset)}
        out.append(
            Task(
                cell=c.cell.name, net=c.cell.net, labels=c.cell.labels, run=r, loc_uri=c.loc.uri, key=c.key,
                source_manifest=c.source_manifest,
                data=data, rows=rows, extra=extra, primary=c is first,
            )
        )  # fmt: skip
    return out
