"""The main job: check the whole request, then run the asked stages in order (generate -> augment -> train).

Every stage module has the same two functions, so this file stays the only place that knows the order:
    fingerprint(cfg, classes, upstream) -> str   what decides the stage's output (upstream = earlier stages' fps)
    run(cfg, run_dir, classes) -> dict           do the stage (resumably), return its summary
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from gdd_ray.classes import ClassInfo, load_classes
from gdd_ray.config import STAGES, RunConfig
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


def check(cfg: RunConfig) -> tuple[RunDir, list[ClassInfo], dict[str, str]]:
    """Every check that needs no cluster: classes, fingerprints, the output folder (writes run.json last)."""
    classes = load_classes(cfg.dataset, cfg.classes)
    fps = stage_fingerprints(cfg, classes)
    # Stages before the first one asked for are inputs: their recorded fingerprint must match too.
    run_dir = RunDir(cfg.out)
    for stage in cfg.stages:
        stage_module(stage).preflight(cfg, run_dir, classes)
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
