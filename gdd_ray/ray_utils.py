"""Connecting to Ray: the cluster of a `ray job submit`, an address in RAY_ADDRESS, or a local one."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from contextlib import contextmanager

from gdd_ray.errors import UserError, stop_on_sigterm, stopping_on_sigterm

_started_here = False
_holders = 0  # callers that run several pipelines on one Ray (a sweep): no inner run shuts it down


def init_ray() -> None:
    """Connect, or start a local Ray when there is no cluster. Stages call it only when they have work,
    so a rerun over a finished run ends in a second without starting anything."""
    global _started_here
    import ray

    if ray.is_initialized():
        return
    # Inside `ray job submit` RAY_ADDRESS is set and ray.init() joins that cluster, as it does on a node
    # where `ray start` ran; otherwise plain `python jobs/distill.py` starts a local one, ours to shut down.
    address = cluster_address()
    if address is not None:  # Ray's client would retry a dead or silent address for many minutes
        from gdd_ray import reach, schema

        host, port = schema.host_port(address.removeprefix("ray://"), "RAY_ADDRESS")
        reach.check_grpc(host, port, f"the Ray cluster at {address}")
    _started_here = address is None
    # A local Ray gets its dashboard, on loopback only: it serves the State API, which Ray Train's
    # placement-group cleaner polls every second (without it, each poll logs a warning for the whole
    # train stage), and it lets `ray status`/`ray list actors` look at a running job.
    kwargs = {"include_dashboard": True, "dashboard_host": "127.0.0.1"} if _started_here else {}
    ours = stopping_on_sigterm()
    ray.init(log_to_driver=True, configure_logging=False, **kwargs)
    if ours:  # ray.init replaced it with sys.exit(15) from wherever the main thread is
        stop_on_sigterm()


def ray_installed() -> bool:
    """Whether Ray can be imported here, without importing it (a bare GPU image has torch but no Ray)."""
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        return False


def ray_initialized() -> bool:
    """ray.is_initialized() without importing Ray: a process that never imported it has not initialised it."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def cluster_address() -> str | None:
    """The cluster a plain ray.init() would join: RAY_ADDRESS, else the last `ray start` on this machine.
    None = it would start a local, single-node Ray, or Ray is not installed (no cluster to join). Uses Ray's
    own lookup, so the two never disagree."""
    if not ray_installed():
        return None
    from ray._private.services import canonicalize_bootstrap_address

    from gdd_ray import schema

    given = os.environ.get("RAY_ADDRESS", "").strip()
    if given:
        schema.ray_address(given)  # one line for a malformed one, before Ray tries it
        if given.startswith("ray://"):
            return given
    try:
        return canonicalize_bootstrap_address(None)
    except Exception as e:  # e.g. a host name that does not resolve
        raise UserError(f"RAY_ADDRESS={given}: not a reachable Ray address ({e}); unset it to start a local Ray") from e


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


@contextmanager
def held_ray():
    """Keep the Ray this process starts up across several pipeline runs (each run's own shutdown waits),
    and shut it down at the end if it was started here."""
    global _holders
    _holders += 1
    try:
        yield
    finally:
        _holders -= 1
        shutdown_if_started_here()


def shutdown_if_started_here() -> None:
    global _started_here
    import ray

    if _holders:
        return
    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


@contextmanager
def quiet_data():
    """Ray Data set up the way our stages use it, restored on the way out.

    The per-operator reservation keeps the operators of a longer pipeline from starving one another; our
    stages run a single map operator, and with it on, a 2-CPU node ran about one task at a time (measured:
    0.9 -> 1.5 tasks in flight on average without it). A dataset copies the context when it is created, so
    create datasets inside the block. Ray Data's own progress bars would interleave with our progress line,
    and the notes it logs at INFO/WARNING say what we just chose; real warnings come from elsewhere."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.op_resource_reservation_enabled, ctx.enable_progress_bars, ctx.print_on_execution_start)
    ctx.op_resource_reservation_enabled = False
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    quiet = {
        logging.getLogger("ray.data._internal.progress"): logging.ERROR,
        logging.getLogger("ray.data._internal.execution.streaming_executor"): logging.WARNING,
    }
    levels = {logger: logger.level for logger in quiet}
    for logger, level in quiet.items():
        logger.setLevel(level)
    try:
        yield
    finally:
        ctx.op_resource_reservation_enabled, ctx.enable_progress_bars, ctx.print_on_execution_start = saved
        for logger, level in levels.items():
            logger.setLevel(level)
