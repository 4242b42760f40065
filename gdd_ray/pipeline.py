"""The main job: check the whole request, then run the asked stages in order (generate -> augment -> train).

Every stage module has the same two functions, so this file stays the only place that knows the order:
    fingerprint(cfg, classes, upstream) -> str   what decides the stage's output (upstream = earlier stages' fps)
    run(cfg, run_dir, classes) -> dict           do the stage (resumably), return its summary
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from gdd_ray import storage
from gdd_ray.classes import ClassInfo, load_classes
from gdd_ray.config import STAGES, RunConfig
from gdd_ray.errors import UserError
from gdd_ray.run import RunDir

log = logging.getLogger("gdd_ray")

STAGE_MODULES = {
    "generate": "gdd_ray.generate.stage",
    "augment": "gdd_ray.augment.stage",
    "train": "gdd_ray.train.stage",
}


def stage_module(stage: str):
    return importlib.import_module(STAGE_MODULES[stage])


def stage_fingerprints(cfg: RunConfig, classes: list[ClassInfo]) -> dict[str, str]:
    """Fingerprints of every stage up to the last one asked for (a stage's input is its upstream's output)."""
    last = max(STAGES.index(s) for s in cfg.stages)
    fps: dict[str, str] = {}
    for stage in STAGES[: last + 1]:
        fps[stage] = stage_module(stage).fingerprint(cfg, classes, dict(fps))
    return fps


def refuse_scattered_out(cfg: RunConfig) -> None:
    """A local --out on a cluster of several nodes would leave each node's shards on its own disk.

    Needs Ray only when ray.init() would join an existing cluster (RAY_ADDRESS, `ray start`, or already
    connected): a local Ray that a stage starts later is one node, so a plain local run starts nothing here."""
    if storage.is_uri(cfg.out) or cfg.shared_local_out:
        return
    import ray

    from gdd_ray import ray_utils

    if not ray.is_initialized():
        if ray_utils.cluster_address() is None:
            return
        ray_utils.init_ray()
    nodes = ray_utils.alive_nodes()
    if nodes > 1:
        raise UserError(
            f"--out {cfg.out} is a local folder but the Ray cluster has {nodes} nodes, so each node would keep "
            "its shards on its own disk; use shared storage (--out s3://bucket/run or gs://...), or add "
            "--shared-local-out if this path is the same shared mount (NFS) on every node"
        )


def check(cfg: RunConfig) -> tuple[RunDir, list[ClassInfo], dict[str, str]]:
    """Every check before anything is written: classes, fingerprints, that --out is reachable from every
    node (joins the cluster only if there is one to join), the output folder; run.json is written last."""
    classes = load_classes(cfg.dataset, cfg.classes)
    fps = stage_fingerprints(cfg, classes)
    # Stages before the first one asked for are inputs: their recorded fingerprint must match too.
    run_dir = RunDir(cfg.out)
    for stage in cfg.stages:
        stage_module(stage).preflight(cfg, run_dir, classes)
    refuse_scattered_out(cfg)
    run_dir.prepare(cfg, [vars(c) for c in classes], fps)
    return run_dir, classes, fps


def run(cfg: RunConfig) -> dict[str, Any]:
    from gdd_ray.ray_utils import shutdown_if_started_here

    run_dir, classes, _ = check(cfg)
    try:
        summaries = {}
        for stage in STAGES:
            if stage in cfg.stages:
                summaries[stage] = stage_module(stage).run(cfg, run_dir, classes)
        return summaries
    finally:
        shutdown_if_started_here()
