"""Reading a run's eval/results.json, by today's conventions whatever release wrote it: every reader (the report
page, `score`, `compare`, tracking) takes its numbers through here, so an old document is read one way.

Since the 1-based epoch convention (`protocol.epochs_counted_from` = 1), `protocol.lr_drop_epoch` is the
first epoch trained at lr x 0.1, counted as metrics.jsonl and the plots count, or null when no drop happened.
Earlier documents held the 0-based index and announced a drop even when the schedule ended first.
"""

from __future__ import annotations

import json
from typing import Any

from gdd_ray import storage

RESULTS = "results.json"


def read(eval_loc: storage.Location, fingerprint: str | None = None) -> dict[str, Any] | None:
    """OUT/eval/results.json, or None when absent, unreadable, or (with `fingerprint`) of another config."""
    try:
        res = json.loads(eval_loc.read_bytes(RESULTS)) if eval_loc.exists(RESULTS) else None
    except (OSError, ValueError):
        return None
    if not isinstance(res, dict) or (fingerprint is not None and res.get("fingerprint") != fingerprint):
        return None
    return res


def lr_drop_epoch(protocol: dict[str, Any]) -> int | None:
    """The first epoch (counted from 1) at lr x 0.1, or None when the run never dropped it."""
    value = protocol.get("lr_drop_epoch")
    if protocol.get("epochs_counted_from") == 1:
        return value if isinstance(value, int) else None
    ran = protocol.get("epochs_run", protocol.get("epochs"))
    if isinstance(value, int) and isinstance(ran, int) and 0 < value < ran:  # the 0-based index the loop reached
        return value + 1
    return None


def schedule(protocol: dict[str, Any]) -> str:
    """'paper: 24 epochs, lr x0.1 from epoch 13' (no drop named when there was none)."""
    ran = protocol.get("epochs_run", protocol.get("epochs"))
    drop = lr_drop_epoch(protocol)
    text = f"{protocol.get('name', 'paper')}: {ran} epochs"
    return text + (f", lr x0.1 from epoch {drop}" if drop else ", no lr drop")


def trained_ipc(results: dict[str, Any]) -> int | list[int] | None:
    return (results.get("train_set") or {}).get("images_per_class")
