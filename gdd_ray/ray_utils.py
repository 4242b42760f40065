"""Connecting to Ray: the cluster of a `ray job submit`, an address in RAY_ADDRESS, or a local one."""

from __future__ import annotations

import os

_started_here = False


def init_ray() -> None:
    """Connect, or start a local Ray when there is no cluster. Stages call it only when they have work,
    so a rerun over a finished run ends in a second without starting anything."""
    global _started_here
    import ray

    if ray.is_initialized():
        return
    # Inside `ray job submit` RAY_ADDRESS is set and ray.init() joins that cluster; plain `python
    # jobs/distill.py` starts a local one, which is ours to shut down at the end.
    _started_here = not os.environ.get("RAY_ADDRESS")
    kwargs = {"include_dashboard": False} if _started_here else {}
    ray.init(log_to_driver=True, configure_logging=False, **kwargs)


def shutdown_if_started_here() -> None:
    global _started_here
    import ray

    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))
