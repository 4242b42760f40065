"""Helpers shared by the generation tests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import psutil

from gdd_ray import shards, storage
from gdd_ray.config_loader import build_config


def tiny_config(out, **overrides):
    values = dict(
        dataset="cifar10", ipc=3, out=str(out), model="tiny", gen_resolution=64, image_size=16, unit_size=2,
        batch_size=2, stages="generate",
    )  # fmt: skip
    values.update(overrides)
    return build_config(values)


def read_images(folder: Path | str) -> dict[tuple[int, int], bytes]:
    """(label, index) -> PNG bytes over every shard; asserts no (label, index) appears twice.

    Lists through the storage layer, as every reader does (temporaries are never mistaken for shards)."""
    loc = storage.Location(str(folder))
    out: dict[tuple[int, int], bytes] = {}
    for name in loc.list(".parquet"):
        t = shards.read_shard(loc, name)
        for img, label, index in zip(t["image"].to_pylist(), t["label"].to_pylist(), t["index"].to_pylist()):
            assert (label, index) not in out, f"duplicate {(label, index)}"
            out[(label, index)] = img["bytes"]
    return out


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under folder with its content hash and mtime: to prove a failed command touched nothing."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = Path(root) / name
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest() + f":{p.stat().st_mtime_ns}"
    return out


def generator_actor_pids(busy: bool = False) -> list[int]:
    """GeneratorActor processes of the Ray this test started (descendants of this process only).

    Ray titles a worker process after what it runs: `ray::GeneratorActor.run_unit` while rendering."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if ("GeneratorActor.run_unit" if busy else "GeneratorActor") in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out
