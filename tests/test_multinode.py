"""Several Ray nodes on one machine (ray.cluster_utils.Cluster), each with one fake GPU.

Proves on a CPU what a GPU cluster needs: generator actors spread over the nodes; a node lost mid-run
(a spot instance reclaimed) costs only time, every image exactly once; a draining (preempted) node gets
no new actor, so the replacement of its worker lands on another node; a local --out on a multi-node
cluster is refused unless --shared-local-out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time

import psutil
import pytest
import ray
from gen_helpers import busy_at_once, read_images, resume, tiny_config

from gdd_ray import pipeline, storage
from gdd_ray.cli import main
from gdd_ray.errors import UserError
from gdd_ray.generate import stage as gen_stage
from gdd_ray.plan import plan_units

pytestmark = pytest.mark.slow

# GPU nodes of the module's cluster: two are the fewest that show spreading, a lost node's units done by a
# survivor and a drained node's replacement kept off it (each node and its actor cost ~20 s of CPU to start).
GPU_NODES = 2

# Detect a dead node in ~10 s instead of the production ~30 s. Not faster: on 2 busy cores a live raylet
# can miss a couple of seconds of heartbeats, and a node wrongly declared dead kills itself (seen in CI).
FAST_FAILURE = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 10,
}


@pytest.fixture(scope="module")
def ray_cluster(gdd_cache, tiny_model, ray_pool):
    """A CPU-only head and GPU_NODES worker nodes with one fake GPU each, shared by the module's tests (starting
    one costs ~13 s): a test that removes or drains a node adds a fresh one, as the autoscaler would, and
    `cluster` checks before each test that GPU_NODES live GPU nodes are there.

    RAY_TMPDIR points at a private folder: the Cluster records its address in RAY_TMPDIR/ray, and a
    plain ray.init() anywhere else on this machine must not find (and join) this module's cluster."""
    from ray.cluster_utils import Cluster

    ray_pool.stop()  # this process joins the module's cluster instead
    tmp = tempfile.mkdtemp(prefix="gddmn", dir="/tmp")  # short: Ray's socket paths live under it
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False, "_system_config": FAST_FAILURE},
    )
    try:
        for _ in range(GPU_NODES):
            c.add_node(num_cpus=2, num_gpus=1)
        c.wait_for_nodes()
        ray.init(address=c.address, configure_logging=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(tmp, ignore_errors=True)


def alive_node_ids() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


@pytest.fixture
def cluster(ray_cluster):
    """(cluster, its GPU nodes): the head and GPU_NODES live GPU nodes, and nothing else alive. A node a
    previous test removed without notice is declared dead within the health check's ~10 s; wait for that."""
    c = ray_cluster
    workers = list(c.worker_nodes)
    deadline = time.time() + 30
    while alive_node_ids() != {c.head_node.node_id, *(n.node_id for n in workers)} and time.time() < deadline:
        time.sleep(0.2)
    assert len(workers) == GPU_NODES and len(alive_node_ids()) == GPU_NODES + 1, "a previous test left another shape"
    yield c, workers


def raylet_pid(node) -> int:
    return node.all_processes[ray._private.ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


class ActorWatcher:
    """Which node each GeneratorActor process lives on (a worker is a child of its node's raylet)."""

    def __init__(self, nodes):
        self.nodes = {raylet_pid(n): n.node_id for n in nodes}
        self.node_of: dict[int, str] = {}

    def add_nodes(self, *nodes):
        self.nodes.update({raylet_pid(n): n.node_id for n in nodes})

    def poll(self) -> list[tuple[int, str, bool]]:
        """(pid, node id, busy rendering) of every live generator actor, remembering each pid's node."""
        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
                if "GeneratorActor" not in cmd:
                    continue
                node = self.node_of.get(p.pid) or self.nodes.get(p.ppid())
            except psutil.Error:
                continue
            if node:
                self.node_of[p.pid] = node
                out.append((p.pid, node, "GeneratorActor.run_unit" in cmd))
        return out

    def nodes_of_workers(self, per_worker: dict) -> dict[str, int]:
        """node id -> units done there, from the summary's per-worker ('host:pid') counts."""
        out: dict[str, int] = {}
        for worker, w in per_worker.items():
            node = self.node_of[int(worker.rsplit(":", 1)[1])]
            out[node] = out.get(node, 0) + w["units"]
        return out


def start_generation(cfg):
    ctx = pipeline.check(cfg)
    box: dict = {}

    def go():
        try:
            box["summary"] = gen_stage.run(ctx)
        except BaseException as e:  # surfaced by the test
            box["error"] = e

    t = threading.Thread(target=go)
    t.start()
    return t, box


def wait_until(cond, timeout: float, what: str, watcher: ActorWatcher | None = None, thread=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if watcher:
            watcher.poll()
        if cond():
            return
        if thread is not None and not thread.is_alive():
            raise AssertionError(f"the run ended before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def all_busy_at_once(watcher: ActorWatcher, thread, timeout: float = 240) -> dict[int, str]:
    """Until an actor is rendering on each GPU node at the same time (`busy_at_once`, reading the nodes'
    actors through the watcher). Returns {pid: node} of them, still frozen: the caller resumes them (SIGCONT),
    or kills one."""
    return busy_at_once(
        GPU_NODES, thread, timeout, rendering=lambda: {pid: node for pid, node, busy in watcher.poll() if busy}
    )


def pending_gpu_demand(gcs_address: str) -> bool:
    """Whether an actor asking for a GPU waits to be placed (the autoscaler's view of demand, from the GCS)."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    demands = get_cluster_status(gcs_address).resource_demands.ray_task_actor_demand
    return any(r.bundle.get("GPU") for d in demands for r in d.bundles_by_count)


def test_local_out_on_several_nodes_is_refused(cluster, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=rf"is a local folder but the Ray cluster has {GPU_NODES + 1} nodes"):
        pipeline.check(tiny_config(out))
    assert not out.exists()  # refused before anything was written
    assert main(["distill", "--dataset", "cifar10", "--ipc", "1", "--model", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "--shared-local-out" in err and err.count("\n") == 1
    assert not out.exists()
    pipeline.check(tiny_config(out, shared_local_out=True))  # the user says it is a shared mount
    assert (out / "run.json").exists()


def test_units_spread_over_nodes_and_a_lost_node_costs_only_time(cluster, tmp_path, capsys):
    c, workers = cluster
    watcher = ActorWatcher(workers)
    cfg = tiny_config(tmp_path / "run", ipc=3, unit_size=1, batch_size=1, shared_local_out=True)  # 30 units
    gen = tmp_path / "run" / "generated"
    t, box = start_generation(cfg)  # default workers: one per GPU
    frozen = all_busy_at_once(watcher, t)
    busy_nodes_before_loss = set(frozen.values())
    victim = workers[1]
    # The victim's actor stays frozen with its units in flight until its node goes: resumed, it could finish
    # its share before the loss on a fast machine, and then nothing would be lost (seen: 30 tiny units take
    # about a second on two actors).
    victim_pid = next(pid for pid, node in frozen.items() if node == victim.node_id)
    try:
        resume(p for p in frozen if p != victim_pid)
        wait_until(lambda: len(storage.Location(str(gen)).list(".parquet")) >= 3, 120, "3 shards", watcher, t)
        c.remove_node(victim, allow_graceful=False)  # the instance is gone, with its actor and units in flight
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):  # and every process on it: a frozen one cannot notice
            psutil.Process(victim_pid).kill()  # that its raylet died
    fresh = c.add_node(num_cpus=2, num_gpus=1)  # what the autoscaler does for a lost spot node
    watcher.add_nodes(fresh)
    original = [n.node_id for n in workers]
    while t.is_alive():
        watcher.poll()
        t.join(timeout=0.1)
    assert "error" not in box, box.get("error")
    summary = box["summary"]
    images = read_images(gen)  # asserts each (label, index) once
    assert sorted(images) == [(c_, i) for c_ in range(10) for i in range(3)]
    assert summary["totals"]["images"] == 30 and summary["workers"] == GPU_NODES
    # the lost node's half-written shard (if any) is swept: every reader sees exactly the planned shards
    assert not [p.name for p in gen.iterdir() if ".tmp-" in p.name]
    planned = sorted(u.shard_name for u in plan_units(10, 3, 1))
    assert sorted(p.name for p in gen.glob("*.parquet")) == planned
    assert sorted(s["name"] for s in json.loads((gen / "_manifest.json").read_text())["shards"]) == planned
    # the victim's units in flight were lost with it and done again elsewhere: the run cost only time
    assert "starting a replacement" in capsys.readouterr().out
    units_by_node = watcher.nodes_of_workers(summary["per_worker"])
    # Spread: before the loss an actor was rendering on each GPU node at once (the wait above), and every
    # surviving node did units. The victim may have been killed in its first unit.
    assert busy_nodes_before_loss == set(original), busy_nodes_before_loss
    assert set(original) - {victim.node_id} <= set(units_by_node), units_by_node
    assert sum(units_by_node.values()) == summary["totals"]["units_run"] >= 30


def test_draining_node_gets_no_new_work(cluster, tmp_path, capsys):
    """Preemption notice: the node is drained and its worker dies first. Its GPU is free again and no other
    node has one, yet the replacement must wait for the new node the autoscaler brings, not go back there."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    c, workers = cluster
    watcher = ActorWatcher(workers)
    cfg = tiny_config(tmp_path / "run", ipc=3, unit_size=1, batch_size=1, shared_local_out=True)  # 30 units
    gen = tmp_path / "run" / "generated"
    t, box = start_generation(cfg)  # one worker per GPU node: no spare GPU anywhere
    # The actors rendering, all held still (frozen), so the queue cannot drain before the replacement is up;
    # the one on the node to drain is killed below, the others stay frozen until then.
    frozen = all_busy_at_once(watcher, t)
    pid, draining = next(iter(frozen.items()))
    others = [p for p in frozen if p != pid]
    before = set(watcher.node_of)
    drained = next(n for n in workers if n.node_id == draining)
    try:
        accepted, why = GcsClient(address=c.gcs_address).drain_node(
            draining,
            autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            "spot instance preemption notice (test)",
            int(time.time() * 1000) + 120_000,
        )
        assert accepted, why
        psutil.Process(pid).kill()  # the preempted worker goes first; the node itself lingers, draining
        # The event: the scheduler reports the replacement as a GPU demand it cannot place (the draining
        # node's GPU is free, but a draining node takes no new work).
        wait_until(lambda: pending_gpu_demand(c.gcs_address), 60, "the replacement waiting for a GPU", watcher)
        placed = {watcher.node_of[p] for p in set(watcher.node_of) - before}
        assert draining not in placed, "the replacement went to the draining node"
        fresh = c.add_node(num_cpus=2, num_gpus=1)  # the autoscaler's answer to the preemption
        watcher.add_nodes(fresh)
        wait_until(
            lambda: any(n == fresh.node_id and b for p, n, b in watcher.poll() if p not in before),
            120,
            "the replacement rendering on the new node",
        )
        resume(others)
        while t.is_alive():
            watcher.poll()
            t.join(timeout=0.1)
    finally:
        resume(others)
        c.remove_node(drained)  # the deadline: the instance goes (and the module's next test finds GPU_NODES)
    assert "error" not in box, box.get("error")
    images = read_images(gen)
    assert sorted(images) == [(c_, i) for c_ in range(10) for i in range(3)]
    assert "starting a replacement" in capsys.readouterr().out
    new_actors = {p: n for p, n in watcher.node_of.items() if p not in before}
    assert set(new_actors.values()) == {fresh.node_id}, (new_actors, draining)
    units_by_node = watcher.nodes_of_workers(box["summary"]["per_worker"])
    assert units_by_node.get(fresh.node_id, 0) > 0  # the replacement did part of the run
