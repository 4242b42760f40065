"""A run folder: its layout, its `run.json` record, and the rule for reusing or refusing what is there.

    OUT/run.json            resolved config, classes, per-stage fingerprints, package versions, times
    OUT/generated/*.parquet generation shards (+ _summary.json, written last)
    OUT/augmented/*.parquet PDA output (+ _summary.json)
    OUT/eval/               evaluation metrics, checkpoints, results.json

Each stage has a fingerprint of everything that decides its output (downstream stages include the
upstream fingerprint). An existing output with another fingerprint is never silently mixed with new
work: the run stops with a clear error, or with --overwrite that stage and everything after it are
deleted first.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from gdd_ray import storage
from gdd_ray.config import STAGES, RunConfig
from gdd_ray.errors import UserError

RUN_FILE = "run.json"
SUMMARY_FILE = "_summary.json"
STAGE_DIRS = {"generate": "generated", "augment": "augmented", "train": "eval"}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("gdd-ray", "ray", "torch", "torchvision", "diffusers", "transformers", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


class RunDir:
    def __init__(self, uri: str):
        self.uri = uri
        self.root = storage.Location(uri)
        self.generated = self.root.child(STAGE_DIRS["generate"])
        self.augmented = self.root.child(STAGE_DIRS["augment"])
        self.eval = self.root.child(STAGE_DIRS["train"])

    def stage_dir(self, stage: str) -> storage.Location:
        return self.root.child(STAGE_DIRS[stage])

    # ---- run.json -----------------------------------------------------------------------------

    def read_record(self) -> dict[str, Any] | None:
        try:
            if not self.root.exists(RUN_FILE):
                return None
            return json.loads(self.root.read_bytes(RUN_FILE))
        except (OSError, ValueError) as e:
            raise UserError(f"{storage.join(self.uri, RUN_FILE)} is unreadable ({e}); fix it or use --overwrite") from e

    def write_record(self, record: dict[str, Any]) -> None:
        record["updated"] = now_iso()
        self.root.write_bytes(RUN_FILE, json.dumps(record, indent=2, sort_keys=False).encode())

    def update_stage(self, stage: str, **info: Any) -> None:
        record = self.read_record() or {}
        record.setdefault("stages", {}).setdefault(stage, {}).update(info)
        self.write_record(record)

    def read_summary(self, stage: str) -> dict[str, Any] | None:
        loc = self.stage_dir(stage)
        try:
            return json.loads(loc.read_bytes(SUMMARY_FILE)) if loc.exists(SUMMARY_FILE) else None
        except (OSError, ValueError):
            return None

    def write_summary(self, stage: str, summary: dict[str, Any]) -> None:
        self.stage_dir(stage).write_bytes(SUMMARY_FILE, json.dumps(summary, indent=2).encode())

    # ---- opening a run --------------------------------------------------------------------------

    def _has_output(self, stage: str) -> bool:
        loc = self.stage_dir(stage)
        return bool(loc.exists() and loc.list(include_hidden=True))

    def prepare(self, cfg: RunConfig, classes: list[dict[str, Any]], fingerprints: dict[str, str]) -> None:
        """Check the folder against this config, then (only then) write run.json.

        `fingerprints` maps each stage to run to the fingerprint of its output. Nothing is written
        or deleted before every check passed.
        """
        try:
            record = self.read_record()
        except UserError:
            if not cfg.overwrite:
                raise
            record = None
        stale: list[str] = []
        if record is not None:
            old = record.get("fingerprints", {})
            for stage in STAGES:
                if stage in fingerprints and stage in old and old[stage] != fingerprints[stage]:
                    if self._has_output(stage):
                        stale.append(stage)
        if stale and not cfg.overwrite:
            first = stale[0]
            raise UserError(
                f"{self.uri} holds a run whose {first} config differs from this one "
                f"({_describe_change(record, cfg)}); use the same config to resume it, "
                "another --out for a new run, or --overwrite to delete it and start again"
            )
        try:
            storage.check_writable(self.root)
        except OSError as e:
            raise UserError(f"--out {self.uri} is not writable ({getattr(e, 'strerror', None) or e})") from e

        if stale:  # --overwrite: the first stale stage and everything downstream of it go
            first = min(STAGES.index(s) for s in stale)
            for stage in STAGES[first:]:
                self.stage_dir(stage).delete_tree()
        created = (record or {}).get("created", now_iso())
        merged_fps = dict((record or {}).get("fingerprints", {}))
        if stale:
            first = min(STAGES.index(s) for s in stale)
            for stage in STAGES[first:]:
                merged_fps.pop(stage, None)
        merged_fps.update(fingerprints)
        stages = {} if stale else dict((record or {}).get("stages", {}))
        self.write_record(
            {
                "config": cfg.to_dict(),
                "classes": classes,
                "fingerprints": merged_fps,
                "versions": package_versions(),
                "created": created,
                "updated": now_iso(),
                "stages": stages,
            }
        )


# Sections (described field by field) and options that do not change what a run produces.
_NOT_DESCRIBED = (
    "generate",
    "augment",
    "train",
    "overwrite",
    "stages",
    "out",
    "workers",
    "batch_size",
    "shared_local_out",
)


def _describe_change(record: dict[str, Any] | None, cfg: RunConfig) -> str:
    """'steps 1 -> 2, seed 0 -> 1': the first few options that differ from the stored run."""
    old = (record or {}).get("config", {})
    new = cfg.to_dict()
    diffs = []
    for sec in ("", "generate", "augment", "train"):
        o = old.get(sec, {}) if sec else old
        n = new.get(sec, {}) if sec else new
        for k in n:
            if k in _NOT_DESCRIBED:
                continue
            if k in o and o[k] != n[k]:
                diffs.append(f"{k.replace('_', '-')} {o[k]!r} -> {n[k]!r}")
    return ", ".join(diffs[:4]) or "class list or model changed"


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0
