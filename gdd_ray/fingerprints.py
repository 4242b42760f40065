"""Fingerprints: a short stable hash of what decides a stage's output.

Each stage declares, beside its own code, the config values that decide its output (`OUTPUT_FIELDS`,
dotted paths into RunConfig, plus "classes" for the class list); its fingerprint hashes those values,
the stage's code version and its input's fingerprint. The pipeline computes them once per run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from gdd_ray.classes import ClassInfo, template_fields
from gdd_ray.config import RunConfig


def digest(obj: Any) -> str:
    """Short stable hash of a JSON-able object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def class_list(cfg: RunConfig, classes: list[ClassInfo]) -> list[list[str]]:
    """The class list as it decides an output: id and name, and the description when the prompt uses it
    (so a run whose template ignores descriptions keeps its fingerprint when they change)."""
    with_desc = any("desc" in template_fields(t) for t in cfg.generate.templates)
    return [[c.class_id, c.name, c.desc] if with_desc else [c.class_id, c.name] for c in classes]


def output_inputs(cfg: RunConfig, classes: list[ClassInfo], fields: tuple[str, ...]) -> dict[str, Any]:
    """The values of `fields` for this run: what a fingerprint hashes and a refusal message compares."""
    return {f: (class_list(cfg, classes) if f == "classes" else cfg.value(f)) for f in fields}


def stage_fingerprint(
    stage: str, version: int, inputs: dict[str, Any], upstream: str | None, source: str | None = None
) -> str:
    return digest({"stage": stage, "version": version, "inputs": inputs, "upstream": upstream, "source": source})
