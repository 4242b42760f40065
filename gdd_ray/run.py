"""A run folder: its layout, its `run.json` record, the summary every stage writes, and the rule for
reusing or refusing what is there.

    OUT/run.json                 resolved config, classes, per-stage fingerprints and inputs, versions, times
    OUT/generated/*.parquet      generation shards (+ _summary.json, then _manifest.json, written last)
    OUT/selected/*.parquet       with --select-by clip: the IPC best-scored images per class (+ scores/,
                                 clip_stats.json, _summary.json, _manifest.json)
    OUT/augmented/*.parquet      PDA output (+ _summary.json, _manifest.json)
    OUT/eval/                    evaluation runs, metrics, checkpoints, results.json (+ _summary.json)

A run may read a stage's output from a folder outside OUT (`stage_dirs`, kept in run.json): a sweep's
points share one generation and one PDA, each folder keyed by its fingerprint and written by one run only.
A sweep point's run.json also names its sweep, point and grid values (`sweep_point`).

Each stage has a fingerprint of everything that decides its output (downstream stages include the
upstream fingerprint). An existing output with another fingerprint is never silently mixed with new
work: the run stops with a clear error, or with --overwrite that stage and everything after it are
deleted first.
"""

from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from gdd_ray import logs, schema, storage
from gdd_ray.classes import ClassInfo
from gdd_ray.config import STAGES, RunConfig
from gdd_ray.errors import UserError
from gdd_ray.plan import Plan

RUN_FILE = "run.json"
SUMMARY_FILE = "_summary.json"
STAGE_DIRS = {"generate": "generated", "select": "selected", "augment": "augmented", "train": "eval"}
# What each stage writes, by folder (relative to OUT) and name pattern: --overwrite deletes these and
# nothing else (a user's notes in OUT/generated/ stay). A stage that writes a new kind of file adds it here.
SHARD_GLOB = "u[0-9]*-[0-9]*.parquet"
CLASS_UNIT_GLOB = "c[0-9]*-i[0-9]*-[0-9]*.parquet"  # the layout before packed units: --overwrite removes it too
# NAME.parquet.corrupt: a shard `status --verify` set aside (one with an image that does not decode).
BOOKKEEPING = [
    "_summary.json", "_manifest.json", SHARD_GLOB + ".corrupt", CLASS_UNIT_GLOB, CLASS_UNIT_GLOB + ".corrupt",
    ".*.tmp-*", ".tmp-*",
]  # fmt: skip
OWN_FILES: dict[str, dict[str, list[str]]] = {
    "generate": {"generated": [SHARD_GLOB, *BOOKKEEPING]},
    "select": {
        "selected": [SHARD_GLOB, "clip_stats.json", *BOOKKEEPING],
        "selected/scores": [SHARD_GLOB, *BOOKKEEPING],
    },
    "augment": {"augmented": [SHARD_GLOB, *BOOKKEEPING], "": ["samples.png", ".samples.png.tmp-*"]},
    "train": {
        "eval": ["results.json", "metrics.jsonl", "curve.png", *BOOKKEEPING],
        "eval/runs": ["run[0-9]*.json", ".*.tmp-*"],
        "eval/metrics": ["run[0-9]*.jsonl", ".*.tmp-*"],
        "eval/checkpoints": ["run[0-9]*.pt", ".*.tmp-*"],
    },
}
# Folders only Ray Train, or the train stage's other evaluations, write into, under names of ours (a
# --baselines-dir outside OUT is shared, and never deleted by one run's --overwrite).
OWN_TREES = {"train": ["eval/_ray_train", "eval/cells", "eval/baselines"]}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def eval_run_name(run: int) -> str:
    """The stem of evaluation run `run`'s files: eval/runs/<stem>.json, metrics/<stem>.jsonl, checkpoints/<stem>.pt."""
    return f"run{run:02d}"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("gdd-ray", "ray", "torch", "torchvision", "diffusers", "transformers", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def stage_summary(
    stage: str,
    fingerprint: str,
    started: str,
    wall_s: float,
    *,
    units: int,
    units_run: int,
    images: int,
    images_made: int,
    work_s: float | None = None,
    **details: Any,
) -> dict[str, Any]:
    """The one summary shape: what the stage's output holds, what this invocation did, and how fast.
    `work_s` is the time spent doing units (rate = images_made / work_s); the wall time otherwise."""
    busy = work_s if work_s is not None else wall_s
    return {
        "stage": stage,
        "fingerprint": fingerprint,
        "started": started,
        "finished": now_iso(),
        "totals": {
            "units": units,
            "units_run": units_run,
            "images": images,
            "images_made": images_made,
            "wall_s": round(wall_s, 3),
            "work_s": round(busy, 3),
            "images_per_s": round(images_made / busy, 3) if images_made and busy > 0 else None,
        },
        **details,
    }


def not_writable(uri: str, e: OSError) -> UserError:
    """The one line for an --out that cannot be written, whichever check found it."""
    return UserError(f"--out {uri} is not writable ({storage.reason(e)})")


class RunDir:
    def __init__(self, uri: str, stage_dirs: dict[str, str] | None = None, sweep_point: dict[str, Any] | None = None):
        """`stage_dirs`: stage -> the folder holding its output when that is not under OUT (shared).
        `sweep_point`: the sweep this run is a point of (its root, name and grid values), kept in run.json."""
        self.uri = uri
        self.root = storage.Location(uri)
        self.shared = dict(stage_dirs or {})
        self.sweep_point = sweep_point
        self.generated = self.stage_dir("generate")
        self.selected = self.stage_dir("select")
        self.augmented = self.stage_dir("augment")
        self.eval = self.stage_dir("train")

    @classmethod
    def open(cls, uri: str) -> RunDir:
        """The run at `uri` with the shared stage folders its run.json names (readers: status, export, report)."""
        record = cls(uri).read_record() or {}
        return cls(uri, record.get("stage_dirs"))

    def stage_dir(self, stage: str) -> storage.Location:
        if stage in self.shared:
            return storage.Location(self.shared[stage])
        return self.root.child(STAGE_DIRS[stage])

    def samples_location(self) -> tuple[storage.Location, str]:
        """Where the augment stage's sample grid is: beside the augmented folder that made it (OUT/samples.png)."""
        aug = self.augmented.uri.rstrip("/")
        parent = aug.rsplit("/", 1)[0] if "/" in aug else "."
        return storage.Location(parent), "samples.png"

    # ---- run.json -----------------------------------------------------------------------------

    def read_record(self) -> dict[str, Any] | None:
        """run.json, checked by its schema (every field a reader uses has its type); None when there is none."""
        try:
            if not self.root.exists(RUN_FILE):
                return None
        except OSError as e:  # the store itself: endpoint, bucket, credentials
            raise storage.Unreachable(f"cannot read {self.uri} ({storage.reason(e)})") from e
        where = storage.join(self.uri, RUN_FILE)
        try:
            return schema.run_record(self.root.read_bytes(RUN_FILE), where)
        except OSError as e:
            raise UserError(f"{where} is unreadable ({storage.reason(e)}); fix it or use --overwrite") from e
        except schema.Invalid as e:
            raise schema.Invalid(f"{e}; {where} is not a run record gdd-ray wrote: fix it or use --overwrite") from e

    def write_record(self, record: dict[str, Any]) -> None:
        record["updated"] = now_iso()
        self.root.write_bytes(RUN_FILE, json.dumps(record, indent=2, sort_keys=False).encode())

    def update_stage(self, stage: str, **info: Any) -> None:
        record = self.read_record() or {}
        record.setdefault("stages", {}).setdefault(stage, {}).update(info)
        self.write_record(record)

    def read_summary(self, stage: str) -> dict[str, Any] | None:
        """The stage's summary; None when it is missing or damaged (the stage rewrites it when it next finishes)."""
        return schema.read_or_none(self.stage_dir(stage), SUMMARY_FILE, schema.SUMMARY)

    def write_summary(self, stage: str, summary: dict[str, Any]) -> None:
        self.stage_dir(stage).write_bytes(SUMMARY_FILE, json.dumps(summary, indent=2).encode())

    # ---- opening a run --------------------------------------------------------------------------

    def _has_output(self, stage: str) -> bool:
        loc = self.stage_dir(stage)
        return bool(loc.exists() and loc.list(include_hidden=True))

    def stale_stages(
        self, cfg: RunConfig, fingerprints: dict[str, str], inputs: dict[str, dict[str, Any]]
    ) -> tuple[dict[str, Any] | None, list[str]]:
        """(the run record, the stages whose output was made by another config); reads only. Without
        --overwrite a stale stage is refused here, naming the change."""
        try:
            record = self.read_record()
        except storage.Unreachable:
            raise
        except UserError:
            if not cfg.overwrite:
                raise
            record = None
        stale: list[str] = []
        if record is not None:
            old = record.get("fingerprints")
            old = old if isinstance(old, dict) else {}
            for stage in STAGES:
                if stage in self.shared:  # keyed by its fingerprint by whoever shares it: never a mix
                    continue
                if stage in fingerprints and stage in old and old[stage] != fingerprints[stage]:
                    if self._has_output(stage):
                        stale.append(stage)
        if stale and not cfg.overwrite:
            first = stale[0]
            if first == "generate" and self.has_class_units():
                raise UserError(
                    f"{self.uri} was generated by an earlier gdd-ray, one class per shard; this version packs "
                    "several classes into a shard, so it cannot resume or grow that run (status, export and its "
                    "report still read it): give another --out, or --overwrite to generate it again"
                )
            raise UserError(
                f"{self.uri} holds a run whose {first} config differs from this one "
                f"({_describe_change(record, inputs, first)}); use the same config to resume it, "
                "another --out for a new run, or --overwrite to delete it and start again"
            )
        return record, stale

    def has_class_units(self) -> bool:
        """Whether its generated folder holds shards of the layout before packed units (one class per shard)."""
        from gdd_ray.plan import is_class_unit_name

        return any(is_class_unit_name(n) for n in self.generated.list(".parquet"))

    def delete_stage_output(self, stage: str) -> int:
        """--overwrite: delete the files `stage` writes (OWN_FILES, OWN_TREES) and nothing else; returns how many."""
        n = 0
        for folder, patterns in OWN_FILES[stage].items():
            loc = self.root.child(folder) if folder else self.root
            names = loc.list(include_hidden=True)
            for name in names:
                if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                    loc.delete(name)
                    n += 1
        for tree in OWN_TREES.get(stage, []):
            self.root.child(tree).delete_tree()
        for folder in sorted(OWN_FILES[stage], key=len, reverse=True):  # deepest first
            if folder:
                self.root.child(folder).remove_if_empty()
        return n

    def refuse_blocked(self) -> None:
        """Fail fast, reading only, where OUT can never be written (storage.refuse_blocked_local): before the
        checks that cost seconds; prepare's write probe stays the proof."""
        try:
            storage.refuse_blocked_local(self.uri)
        except OSError as e:
            raise not_writable(self.uri, e) from e

    def prepare(
        self,
        cfg: RunConfig,
        classes: list[dict[str, Any]],
        fingerprints: dict[str, str],
        inputs: dict[str, dict[str, Any]],
        sources: dict[str, str | None] | None = None,
        environment: dict[str, Any] | None = None,
    ) -> None:
        """Check the folder against this config, then (only then) write run.json.

        `fingerprints` maps each stage to run (and its inputs) to the fingerprint of its output, `inputs`
        to the values that decide it (kept in run.json, so a refusal can name what changed), `sources` to the
        stage whose output it reads (kept, so readers never re-derive what a stage reads), `environment`
        to what else could change pixels and is recorded only (pipeline switches). Nothing is written or
        deleted before every check passed; --overwrite deletes only the files a stale stage of this run
        wrote (never a stage this run never made, never a user's file).
        """
        record, stale = self.stale_stages(cfg, fingerprints, inputs)
        try:
            storage.check_writable(self.root)
        except OSError as e:
            raise not_writable(self.uri, e) from e

        old_fps = (record or {}).get("fingerprints")
        merged_fps = dict(old_fps) if isinstance(old_fps, dict) else {}
        old_inputs = (record or {}).get("inputs")
        merged_inputs = dict(old_inputs) if isinstance(old_inputs, dict) else {}
        old_sources = (record or {}).get("sources")
        merged_sources = dict(old_sources) if isinstance(old_sources, dict) else {}
        if stale:  # --overwrite: the first stale stage and everything downstream of it that this run made
            first = min(STAGES.index(s) for s in stale)
            for stage in STAGES[first:]:
                if stage in merged_fps and stage not in self.shared:  # a shared folder is not this run's
                    n = self.delete_stage_output(stage)
                    if n:
                        logs.say("run", f"--overwrite: deleted {n} {stage} files of the previous config")
                merged_fps.pop(stage, None)
                merged_inputs.pop(stage, None)
                merged_sources.pop(stage, None)
        merged_fps.update(fingerprints)
        merged_inputs.update(inputs)
        merged_sources.update(sources or {})
        old_stages = (record or {}).get("stages")
        new_record = {
            "config": cfg.to_dict(),
            "classes": classes,
            "fingerprints": merged_fps,
            "inputs": merged_inputs,
            "sources": merged_sources,
            "environment": environment or {},
            "versions": package_versions(),
            "created": (record or {}).get("created", now_iso()),
            "updated": now_iso(),
            "stages": {} if stale or not isinstance(old_stages, dict) else dict(old_stages),
        }
        if self.shared:
            new_record["stage_dirs"] = self.shared
        if self.sweep_point:
            new_record["sweep_point"] = self.sweep_point
        self.write_record(new_record)


def _describe_change(record: dict[str, Any] | None, inputs: dict[str, dict[str, Any]], stage: str) -> str:
    """'steps 1 -> 2, seed 0 -> 1': the first few values deciding `stage` that differ from the stored run, a value
    given only before or only now included ('prompt-templates [...] -> (none)'). The class list comes last: a
    changed template or flag can change how it is recorded, and the option is what the user changed."""
    old = (record or {}).get("inputs", {}).get(stage, {})
    new = inputs.get(stage, {})
    diffs, classes = [], False
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key, _ABSENT) == new.get(key, _ABSENT):
            continue
        if key == "classes":
            classes = True
            continue
        name = key.rsplit(".", 1)[-1].replace("_", "-")
        before, after = (_shown(d.get(key, _ABSENT)) for d in (old, new))
        diffs.append(f"{name} {before} -> {after}")
    if classes:
        diffs.append("class list changed")
    return ", ".join(diffs[:4]) or "its input or the code version changed"


_ABSENT = object()


def _shown(value: Any) -> str:
    if value is _ABSENT:
        return "(none)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class RunContext:
    """What every stage gets: the config, the run folder, the classes, the plan and every fingerprint."""

    cfg: RunConfig
    run_dir: RunDir
    classes: list[ClassInfo]
    plan: Plan
    fingerprints: dict[str, str]
    sources: dict[str, str | None]  # stage -> the stage whose output it reads
    # stage -> what it resolved from the config (engine, revision, recipe ...) as fingerprinted: resolved
    # once, before run.json, so a stage runs with exactly the values its fingerprint and run.json hold
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def fingerprint(self, stage: str) -> str:
        return self.fingerprints[stage]


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0
