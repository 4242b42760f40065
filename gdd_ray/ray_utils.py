"""Connecting to Ray: the cluster of a `ray job submit`, an address in RAY_ADDRESS, or a local one."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("gdd_ray")


def init_ray() -> bool:
    """Connect (or start a local Ray when there is no cluster); True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    # Inside `ray job submit` RAY_ADDRESS is set and ray.init() joins that cluster; plain `python
    # jobs/distill.py` starts a local one. Only a local one is ours to shut down.
    started_here = not os.environ.get("RAY_ADDRESS")
    ray.init(
        log_to_driver=True,
        include_dashboard=False if started_here else None,
        configure_logging=False,
    )
    return started_here


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))
