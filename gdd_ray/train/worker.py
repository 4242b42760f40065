"""The Ray Train side of the train stage: the per-worker function, its checkpointer, and the launch.

Worker k of W trains the tasks k, k+W, ... (a task = one run of one cell: training set x network x labels,
train.protocols), independent seeds, no gradient sync, the training sets in device memory; runs of one
ConvNet cell can train together (train.at_once). Each finished run writes <cell folder>/runs/runNN.json.

A process that already holds one worker's resources (a sweep's Tune trial: gdd_ray.sweep) trains its tasks
itself inside `training_here`, with the same `run_tasks`: no Ray Train job, whose controller and worker group
cost more to start (~13 s on 2 cores) than a small point's training.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

from gdd_ray import storage
from gdd_ray.config import TrainConfig
from gdd_ray.logs import Progress, say
from gdd_ray.plan import eval_run_seed
from gdd_ray.run import eval_run_name, now_iso
from gdd_ray.train.loop import LocationCheckpointer
from gdd_ray.train.report import json_text


class RunCheckpointer(LocationCheckpointer):
    """A run's checkpoint, plus its metrics so far as JSON lines next to it (object stores cannot append)."""

    def __init__(self, cell_uri: str, run: int, fp: str, source_manifest: str | None = None):
        self.eval = storage.Location(cell_uri)
        self.stem = eval_run_name(run)
        super().__init__(self.eval.child("checkpoints"), f"{self.stem}.pt")
        # this config, on this input (the digest of the source manifest the distilled set was read from; None
        # for a baseline, whose input is the real training set its key already names)
        self.key = {"fingerprint": fp, "source_manifest": source_manifest}

    preloaded: Any = False  # the state read when the worker grouped its runs (read once, not twice)

    def load(self) -> dict[str, Any] | None:
        if self.preloaded is not False:
            state, self.preloaded = self.preloaded, False
            return state
        state = super().load()
        return state if state is not None and all(state.get(k) == v for k, v in self.key.items()) else None

    def save(self, state: dict[str, Any]) -> None:
        state.update(self.key)
        super().save(state)
        lines = "".join(json.dumps(r) + "\n" for r in state["history"])
        self.eval.child("metrics").write_bytes(f"{self.stem}.jsonl", lines.encode())


def check_checkpoints(tasks: list[Task]) -> None:
    """Read every pending run's checkpoint on the driver first, as the workers will (weights only): one that is
    not ours is refused here in one line, before any worker starts (in a worker it would be Ray's error)."""
    for task in tasks:
        RunCheckpointer(task.loc_uri, task.run, task.key, task.source_manifest).load()


@dataclass(frozen=True)
class Task:
    """One evaluation run of one cell (train.protocols): where its files go and what it trains on."""

    cell: str  # the cell's name, for the logs
    net: str
    labels: str
    run: int
    loc_uri: str  # the cell's folder: runs/, metrics/, checkpoints/
    key: str  # the fingerprint its files carry
    source_manifest: str | None  # ... and the digest of what the distilled set was read from (None: a baseline)
    data: str  # "distilled" or "real" (an object-store array of TrainJob.data)
    rows: Any = None  # rows of that array it trains on (a random subset); None = every row
    extra: dict | None = None  # written into its result (the subset's seed and digest)
    primary: bool = False  # the headline cell (its metrics rows carry no cell name, as before)


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, put in the object store once (the arrays by reference)."""

    config: TrainConfig
    tasks: list[Task]  # the runs still to do, grouped by cell (a worker trains runs of one cell at once)
    num_classes: int
    mean: list[float]
    std: list[float]
    data: dict[str, Any]  # "distilled"/"real" -> ObjectRef of (uint8 N x H x W x 3, labels)
    test_ref: Any  # ObjectRef of (uint8 test images, labels) or None
    teacher_ref: Any = None  # ObjectRef of the teacher file's bytes (--labels soft/both)
    teacher_name: str = ""


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train per-worker function: the tasks assigned to this rank, several runs of a cell at once."""
    import ray
    import ray.train
    import ray.train.torch

    job: TrainJob = loop_config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    mine = job.tasks[rank::world]
    if mine:
        run_tasks(job, mine, device, rank)
    # Every worker reports exactly once: report() is a barrier across the worker group.
    ray.train.report({"runs_done": len(mine)})


class DeviceData:
    """The training arrays on the device, uploaded once per worker: a small set normalised, the whole real
    training set as uint8 (normalised batch by batch: train.loop.take)."""

    def __init__(self, job: TrainJob, device):
        self.job, self.device, self.cache = job, device, {}

    def _array(self, name: str, raw: bool):
        import ray
        import torch

        from gdd_ray.train.loop import host_tensor, to_device_images

        if (name, raw) not in self.cache:
            images, labels = ray.get(self.job.data[name])
            x = (
                host_tensor(images).to(self.device)
                if raw
                else to_device_images(images, self.job.mean, self.job.std, self.device)
            )
            self.cache[(name, raw)] = (x, torch.as_tensor(labels, device=self.device))
        return self.cache[(name, raw)]

    def for_task(self, task: Task):
        import torch

        from gdd_ray.train.loop import to_device_images

        if task.rows is None:  # the distilled set normalised once; the whole real set kept as uint8
            return self._array(task.data, raw=task.data == "real")
        x, y = self._array(task.data, raw=True)  # a random subset: its rows of the uint8 pool, normalised
        rows = torch.as_tensor(task.rows, device=self.device)
        return to_device_images(x[rows], self.job.mean, self.job.std, self.device), y[rows]


def _groups(job: TrainJob, tasks: list[Task], device) -> list[list[tuple[Task, RunCheckpointer]]]:
    """Tasks of one cell whose checkpoints are at the same epoch, in chunks of --runs-at-once (default: all of
    them on a GPU, one on a CPU); only ConvNets stack (train.at_once)."""
    at_once = job.config.runs_at_once or (len(tasks) if getattr(device, "type", str(device)) == "cuda" else 1)
    by_key: dict[tuple, list[tuple[Task, RunCheckpointer]]] = {}
    for task in tasks:
        ckpt = RunCheckpointer(task.loc_uri, task.run, task.key, task.source_manifest)
        state = ckpt.load()
        ckpt.preloaded = state
        by_key.setdefault((task.loc_uri, state["epoch"] if state else 0), []).append((task, ckpt))
    groups = []
    for members in by_key.values():
        size = at_once if members[0][0].net.startswith("convnet") else 1
        groups += [members[i : i + size] for i in range(0, len(members), size)]
    return groups


def run_tasks(job: TrainJob, tasks: list[Task], device, rank: int = 0) -> None:
    """Train `tasks` on `device`, writing each finished run's result file (the work of one Ray Train worker)."""
    import io

    import ray
    import torch

    from gdd_ray.train.loop import host_tensor, train_runs
    from gdd_ray.train.teacher import load_teacher

    t = job.config
    data = DeviceData(job, device)
    test_x = test_y = None
    if job.test_ref is not None:
        test_u8, test_labels = ray.get(job.test_ref)
        test_x = host_tensor(test_u8).to(device)
        test_y = torch.as_tensor(test_labels, device=device)
    teacher = None
    if any(task.labels == "soft" for task in tasks):
        teacher = load_teacher(io.BytesIO(ray.get(job.teacher_ref)), device, job.teacher_name)
    groups = _groups(job, tasks, device)
    epochs = {id(g): t.soft_epochs if g[0][0].labels == "soft" else t.epochs_run for g in groups}
    sizes = {id(g): len(data.for_task(g[0][0])[1]) for g in groups}  # the runs of a group: one size
    progress = Progress(
        "train",
        sum(len(g) * epochs[id(g)] for g in groups),
        sum(len(g) * epochs[id(g)] * sizes[id(g)] for g in groups),
        unit_name=f"run-epochs (rank {rank})",
    )
    for group in groups:
        first = group[0][0]
        xs, ys = zip(*(data.for_task(task) for task, _ in group))
        runs = [task.run for task, _ in group]

        def on_epoch(row: dict[str, Any], first: Task = first, size: int = len(ys[0])) -> None:
            progress.add(1, size)
            if row.get("test_acc") is not None:
                say(
                    "train",
                    f"{first.cell} run {row['run']} epoch {row['epoch']}: loss {row['train_loss']:.4f}, "
                    f"train acc {row['train_acc']:.4f}, test acc {row['test_acc']:.4f} on {device}",
                )

        seeds = [eval_run_seed(t.eval_seed, r) for r in runs]
        results = train_runs(
            train_x=list(xs),
            train_y=list(ys),
            test_x_u8=test_x,
            test_y=test_y,
            config=t,
            num_classes=job.num_classes,
            seeds=seeds,
            mean=job.mean,
            std=job.std,
            net=first.net,
            labels=first.labels,
            teacher=teacher,
            checkpointers=[ckpt for _, ckpt in group],
            on_epoch=on_epoch,
            tags=[{"run": task.run, "seed": s, **({} if task.primary else {"cell": task.cell})}
                  for (task, _), s in zip(group, seeds)],
        )  # fmt: skip
        for (task, ckpt), result in zip(group, results):
            result.pop("history")
            result.update(
                **ckpt.key, run=task.run, rank=rank, device=str(device), finished=now_iso(),
                cell=task.cell, data=task.data, **(task.extra or {}),
            )  # fmt: skip
            storage.Location(task.loc_uri).child("runs").write_bytes(
                f"{eval_run_name(task.run)}.json", json_text(result).encode()
            )


_DEVICE_HERE: list = []  # the device of the innermost `training_here` block of this process


@contextlib.contextmanager
def training_here(device):
    """Within the block the train stage trains in this process, on `device`, instead of a Ray Train job."""
    _DEVICE_HERE.append(device)
    try:
        yield
    finally:
        _DEVICE_HERE.pop()


def device_here():
    """The device of the enclosing `training_here`, or None (the stage starts a Ray Train worker group)."""
    return _DEVICE_HERE[-1] if _DEVICE_HERE else None


def default_workers(pending: int, asked: int | None) -> tuple[int, bool]:
    """(workers, use_gpu): one per GPU; on a CPU-only cluster one single-threaded worker per CPU, since
    independent runs scale better than intra-op threads on small convs."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    workers = max(1, min(pending, gpus if gpus else int(res.get("CPU", 1))))
    if asked is not None:
        workers = min(asked, pending)
    return workers, gpus > 0


def fit(job: TrainJob, storage_loc: storage.Location, workers: int, use_gpu: bool) -> None:
    """Run the job's pending runs on a Ray Train worker group; a restarted group resumes from checkpoints."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RayRunConfig(
            name=f"eval-{job.tasks[0].key}-{int(time.time())}",
            # The storage layer's own filesystem (its endpoint, credentials, retry limit): from a bare gs:// or
            # s3:// URI Ray would build a default client, blind to STORAGE_EMULATOR_HOST and without a bound.
            storage_path=storage_loc.path,
            storage_filesystem=None if storage_loc.local else storage_loc.fs,
            # A restarted worker group resumes every run from its checkpoint.
            failure_config=FailureConfig(max_failures=2),
        ),
    )
    trainer.fit()
