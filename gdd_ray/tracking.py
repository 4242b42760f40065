"""Experiment tracking with MLflow (optional: `pip install 'gdd-ray[track]'`): a run, or a sweep as a parent run
with one child per point, logged from the files the run left, after it ran.

    python -m gdd_ray distill ... --track mlflow [--track-uri URI] [--track-experiment NAME]
    python -m gdd_ray sweep --config sweep.yaml --out ROOT --track mlflow
    mlflow ui --backend-store-uri sqlite:///runs/c100/mlflow.db

What one MLflow run holds: the resolved config (run.json) as params, per-epoch metrics of every evaluation run
(`run0.train_loss`, `run0.test_acc`, `run0.lr` at step = epoch, counted from 1), the final accuracy (mean, std,
each run's) and per-class accuracy (`class_acc.<label>.<name>`), the fingerprints, the train set's digest and
the `official` flag as tags, and report.html, results.json, curve.png and the sample grid as artifacts.

The store: --track-uri (a server, http://..., for a team; a sqlite:///... file; or a folder, which gets
FOLDER/mlflow.db), else $MLFLOW_TRACKING_URI, else OUT/mlflow.db beside the run (./mlflow.db for an s3:// or
gs:// OUT); a local store keeps its artifacts beside its database (mlartifacts/). Nothing is logged unless
asked; a tracking failure is one `[track]` line and never fails the run it describes.

Why not Ray Tune's MLflowLoggerCallback for sweeps: a trial here reports once (its point's final accuracy),
and the callback logs what trials report, one MLflow run per trial attempt (a resumed sweep would make
duplicates). Logging from each point's files after the sweep gives a child exactly the content of a single
run's, whether the point was trained now or on an earlier invocation.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
import time
from typing import Any

from gdd_ray import storage
from gdd_ray.errors import UserError
from gdd_ray.logs import say
from gdd_ray.run import RunDir

DB_FILE = "mlflow.db"
ARTIFACTS = "mlartifacts"
MAX_PARAM = 6000  # MLflow's limit on a param value (longer ones are cut, marked with ...)
BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's limits per log_batch call


def check_available() -> None:
    """Before a run that asks for tracking: one line, exit 2, when MLflow is not installed."""
    if importlib.util.find_spec("mlflow") is None:
        raise UserError("--track mlflow needs MLflow: pip install 'gdd-ray[track]' (or pip install mlflow)")


def resolve_uri(given: str | None, out: str) -> str:
    """The tracking URI: --track-uri, else $MLFLOW_TRACKING_URI, else a sqlite store beside the run."""
    if given:
        if "://" in given or given.startswith(("sqlite:", "databricks")):
            return given
        path = os.path.abspath(os.path.expanduser(given))
        return f"sqlite:///{path if path.endswith('.db') else os.path.join(path, DB_FILE)}"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = out.removeprefix("file://") if not storage.is_uri(out) or out.startswith("file://") else "."
    return f"sqlite:///{os.path.join(os.path.abspath(os.path.expanduser(folder)), DB_FILE)}"


class Tracker:
    """One MLflow store and experiment; every call goes through MlflowClient (no global active run)."""

    def __init__(self, uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        if uri.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(uri.removeprefix("sqlite:///")) or ".", exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            artifacts = None
            if uri.startswith("sqlite:///"):  # a local store keeps its artifacts beside its database
                artifacts = os.path.join(os.path.dirname(uri.removeprefix("sqlite:///")), ARTIFACTS)
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)

    def start(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        if parent:
            tags = {**tags, "mlflow.parentRunId": parent}
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def log(
        self,
        run_id: str,
        params: dict[str, str] | None = None,
        metrics: list[tuple[str, float, int]] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        ps = [Param(k, v) for k, v in (params or {}).items()]
        ms = [Metric(k, float(v), now, int(step)) for k, v, step in metrics or []]
        ts = [RunTag(k, v) for k, v in (tags or {}).items()]
        for i in range(0, len(ps), BATCH["params"]):
            self.client.log_batch(run_id, params=ps[i : i + BATCH["params"]])
        for i in range(0, len(ms), BATCH["metrics"]):
            self.client.log_batch(run_id, metrics=ms[i : i + BATCH["metrics"]])
        for i in range(0, len(ts), BATCH["tags"]):
            self.client.log_batch(run_id, tags=ts[i : i + BATCH["tags"]])

    def artifacts(self, run_id: str, files: dict[str, bytes]) -> None:
        """Files given as name -> bytes (a run's files may be on an object store): written to a temporary
        folder, then logged."""
        with tempfile.TemporaryDirectory(prefix="gdd-ray-track-") as tmp:
            for name, data in files.items():
                path = os.path.join(tmp, name)
                with open(path, "wb") as fh:
                    fh.write(data)
                self.client.log_artifact(run_id, path)

    def finish(self, run_id: str, failed: bool = False) -> None:
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


# ---- what a run's files say, as params, metrics, tags and artifacts ------------------------------------


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """run.json's config as `key` / `section.key` (generate.steps, train.epochs, ...)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if k in ("generate", "clip", "augment", "train") and isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= MAX_PARAM else text[: MAX_PARAM - 3] + "..."


def metric_name(text: str) -> str:
    """A name MLflow accepts (letters, digits, _ - . / and space): a class name may hold anything."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]+", "_", text).strip()[:200] or "_"


def _read(loc: storage.Location, name: str) -> bytes | None:
    try:
        return loc.read_bytes(name) if loc.exists(name) else None
    except OSError:
        return None


def run_content(run_dir: RunDir) -> dict[str, Any]:
    """params, metrics, tags and artifacts of the run at run_dir, from its files (what exists so far)."""
    from gdd_ray import challenge
    from gdd_ray import results as results_doc
    from gdd_ray.report_page.run_page import PAGE, RunFiles, generation_share

    f = RunFiles(run_dir)
    record, res = f.record, f.results or {}
    params = {k: _param(v) for k, v in _flat(record.get("config") or {}).items()}
    params["trained.ipc"] = _param(f.trained_ipc)
    params["trained.variants"] = _param(f.trained_k)
    params["classes.count"] = str(len(f.classes))
    tags = {f"fingerprint.{k}": str(v) for k, v in f.fingerprints.items()}
    tags["gdd_ray.out"] = run_dir.uri
    for stage, folder in f.shared.items():
        tags[f"source.{stage}"] = folder
    if f.point:
        tags["sweep.point"] = str(f.point.get("name"))
        tags["sweep.root"] = str(f.point.get("sweep"))
    metrics: list[tuple[str, float, int]] = []
    if res:
        tags["train_set.digest"] = str((res.get("train_set") or {}).get("digest"))
        tags["protocol"] = str((res.get("protocol") or {}).get("name"))
        tags["official"] = str(challenge.official(res, f.cfg.dataset if f.cfg else None)["official"]).lower()
        tags["lr_drop_epoch"] = str(results_doc.lr_drop_epoch(res.get("protocol") or {}))
        if res.get("accuracy_mean") is not None:
            metrics += [("accuracy_mean", res["accuracy_mean"], 0), ("accuracy_std", res["accuracy_std"], 0)]
        metrics += [(f"accuracy.run{i}", a, 0) for i, a in enumerate(res.get("accuracies") or []) if a is not None]
        for c in res.get("per_class") or []:
            if c.get("accuracy") is not None:
                metrics.append((metric_name(f"class_acc.{c['label']:04d}.{c.get('name')}"), c["accuracy"], 0))
        for line in (_read(run_dir.eval, "metrics.jsonl") or b"").decode().splitlines():
            row = json.loads(line) if line.strip() else {}
            for key in ("train_loss", "train_acc", "test_acc", "lr"):
                if row.get(key) is not None and "run" in row:
                    metrics.append((f"run{row['run']}.{key}", row[key], row["epoch"]))
    gen = f.summaries.get("generate")
    if gen and f.trained_ipc:
        share = generation_share(gen, f.trained_ipc * len(f.classes))
        if share is not None:
            metrics.append(("generation_gpu_s", share, 0))
    files = {PAGE: _read(run_dir.root, PAGE), "results.json": _read(run_dir.eval, "results.json"),
             "curve.png": _read(run_dir.eval, "curve.png")}  # fmt: skip
    loc, name = run_dir.samples_location()
    files["samples.png"] = _read(loc, name)
    name = (f.point or {}).get("name") or run_dir.uri.rstrip("/").rsplit("/", 1)[-1]
    return {"name": str(name), "params": params, "metrics": metrics, "tags": tags,
            "artifacts": {k: v for k, v in files.items() if v is not None}}  # fmt: skip


def log_run(tracker: Tracker, run_dir: RunDir, failed: bool = False, parent: str | None = None) -> str:
    content = run_content(run_dir)
    run_id = tracker.start(content["name"], content["tags"], parent)
    try:
        tracker.log(run_id, content["params"], content["metrics"])
        tracker.artifacts(run_id, content["artifacts"])
    finally:
        tracker.finish(run_id, failed)
    return run_id


def track_run(out: str, uri: str | None, experiment: str, failed: bool = False) -> str | None:
    """Log the run at `out` (after it ran, or failed); returns the MLflow run id, None when it could not be
    logged (one line says why: tracking never fails a run)."""
    where = resolve_uri(uri, out)
    try:
        run_id = log_run(Tracker(where, experiment), RunDir.open(out), failed)
    except Exception as e:  # noqa: BLE001 - whatever the store says, the run itself stands
        say("track", f"not logged to {where}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        return None
    say("track", f"logged run {run_id} to {where} (experiment '{experiment}')")
    return run_id


def track_sweep(
    root: str, rows: list[dict[str, Any]], point_dirs: list[RunDir], values: dict[str, Any], uri: str | None,
    experiment: str,
) -> str | None:  # fmt: skip
    """A sweep as a parent MLflow run (its base and grid as params, the leaderboard, page and plots as
    artifacts, the best accuracy as a metric) with one child run per point; the parent's id, or None."""
    where = resolve_uri(uri, root)
    try:
        tracker = Tracker(where, experiment)
        parent = tracker.start(f"sweep {root.rstrip('/').rsplit('/', 1)[-1]}", {"gdd_ray.sweep": root})
        try:
            params = {f"sweep.{k}": _param(v) for k, v in values.items()}
            scored = [r["accuracy_mean"] for r in rows if r.get("accuracy_mean") is not None]
            metrics = [("points", len(rows), 0)] + ([("best_accuracy_mean", max(scored), 0)] if scored else [])
            tracker.log(parent, params, metrics)
            loc = storage.Location(root)
            names = ("leaderboard.csv", "leaderboard.md", "report.html", "accuracy_vs_ipc.png", "accuracy_vs_cost.png")
            tracker.artifacts(parent, {n: d for n in names if (d := _read(loc, n)) is not None})
            for run_dir in point_dirs:
                log_run(tracker, run_dir, parent=parent)
        finally:
            tracker.finish(parent)
    except Exception as e:  # noqa: BLE001 - the sweep's results stand whatever the store says
        say("track", f"sweep not logged to {where}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        return None
    say("track", f"logged sweep {parent} with {len(point_dirs)} child runs to {where} (experiment '{experiment}')")
    return parent
