"""One way to fan per-shard work out: map items (shard names, class labels) through the work a few at a
time, collecting one stats dict per item, on Ray Data or in this process.

The work is a function `work(items, **kwargs) -> [stats]` (Ray Data tasks), or a class whose `__init__(**kwargs)`
loads something once per worker (CLIP) and whose `__call__(items) -> [stats]` does the work (an actor pool).
Either writes its outputs to storage itself and returns small stats, one dict per item in order, so the
driver never holds an image. `serial=True` runs the same calls in this process (tests, a laptop), with the
same results: the work knows nothing of Ray, the engine nothing of the work.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any


def _call(batch: dict[str, Any], work: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Ray Data task UDF: one call of the work on a block of items; stats travel as JSON, one row per item."""
    import numpy as np

    stats = work(batch["item"].tolist(), **kwargs)
    return {"stats": np.array([json.dumps(s) for s in stats])}


class _Actor:
    """Ray Data actor UDF: the work's class built once per actor, then called on each block of items."""

    def __init__(self, work: type, kwargs: dict[str, Any]):
        from gdd_ray.logs import quiet_libraries

        quiet_libraries()
        self.work = work(**kwargs)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        return {"stats": np.array([json.dumps(s) for s in self.work(batch["item"].tolist())])}


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def map_shards(
    items: Sequence[Any],
    work: Callable | type,
    kwargs: dict[str, Any],
    *,
    per_call: int,
    workers: int | None = None,
    gpus: float = 0.0,
    serial: bool = False,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    what: str = "shards",
) -> list[dict[str, Any]]:
    """Every item's stats, in completion order. `per_call` items go to one call; `workers` tasks or actors run
    at once (default: one per CPU of the cluster, at most one per call); `gpus` per actor. Raises unless every
    item came back (a worker that vanished without an error must not pass for done)."""
    items = list(items)
    if not items:
        return []
    out: list[dict[str, Any]] = []

    def collect(stats: dict[str, Any]) -> None:
        out.append(stats)
        if on_result is not None:
            on_result(stats)

    if serial:
        run = work(**kwargs) if isinstance(work, type) else (lambda chunk: work(chunk, **kwargs))
        for i in range(0, len(items), per_call):
            for stats in run(items[i : i + per_call]):
                collect(stats)
    else:
        import ray

        from gdd_ray.ray_utils import quiet_data

        calls = math.ceil(len(items) / per_call)
        size = max(1, min(workers or cluster_cpus(), calls))
        with quiet_data():
            ds = ray.data.from_items([{"item": i} for i in items], override_num_blocks=calls)
            if isinstance(work, type):
                ds = ds.map_batches(
                    _Actor, batch_size=per_call, fn_constructor_kwargs={"work": work, "kwargs": kwargs},
                    compute=ray.data.ActorPoolStrategy(size=size), num_gpus=gpus, num_cpus=0 if gpus else 1,
                )  # fmt: skip
            else:
                ds = ds.map_batches(
                    _call, batch_size=per_call, fn_kwargs={"work": work, "kwargs": kwargs},
                    compute=ray.data.TaskPoolStrategy(size=size), num_cpus=1,
                )  # fmt: skip
            for row in ds.iter_rows():
                collect(json.loads(row["stats"]))
    if len(out) != len(items):
        raise RuntimeError(
            f"{len(items) - len(out)} of {len(items)} {what} came back without a result; rerun to finish them"
        )
    return out
