"""The Ray Train side of the train stage: the per-worker function, its checkpointer, and the launch.

Worker k of W trains the evaluation runs k, k+W, ... one after another (independent seeds, no gradient
sync) with the whole distilled set in device memory; each finished run writes eval/runs/runNN.json.
"""

from __future__ import annotations

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

    def __init__(self, eval_uri: str, run: int, fp: str):
        self.eval = storage.Location(eval_uri)
        self.stem = eval_run_name(run)
        super().__init__(self.eval.child("checkpoints"), f"{self.stem}.pt")
        self.fp = fp

    def load(self) -> dict[str, Any] | None:
        state = super().load()
        return state if state is not None and state.get("fingerprint") == self.fp else None

    def save(self, state: dict[str, Any]) -> None:
        state["fingerprint"] = self.fp
        super().save(state)
        lines = "".join(json.dumps(r) + "\n" for r in state["history"])
        self.eval.child("metrics").write_bytes(f"{self.stem}.jsonl", lines.encode())


def check_checkpoints(eval_uri: str, runs: list[int], fp: str) -> None:
    """Read every pending run's checkpoint on the driver first, as the workers will (weights only): one that is
    not ours is refused here in one line, before any worker starts (in a worker it would be Ray's error)."""
    for run in runs:
        RunCheckpointer(eval_uri, run, fp).load()


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, put in the object store once (the arrays by reference)."""

    config: TrainConfig
    runs: list[int]  # the runs still to do
    num_classes: int
    mean: list[float]
    std: list[float]
    fingerprint: str
    eval_uri: str
    train_ref: Any  # ObjectRef of (uint8 N x H x W x 3, labels)
    test_ref: Any  # ObjectRef of (uint8 test images, labels) or None
    images: int  # training images per epoch (for the progress line)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train per-worker function: the runs assigned to this rank, one after another."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from gdd_ray.train.loop import host_tensor, to_device_images, train_run

    job: TrainJob = loop_config["job"]
    t = job.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    mine = job.runs[rank::world]
    if mine:
        # Uploaded once per worker, then every epoch of every run reads device memory only.
        train_u8, train_labels = ray.get(job.train_ref)
        train_x = to_device_images(train_u8, job.mean, job.std, device)
        train_y = torch.as_tensor(train_labels, device=device)
        test_x = test_y = None
        if job.test_ref is not None:
            test_u8, test_labels = ray.get(job.test_ref)
            test_x = host_tensor(test_u8).to(device)
            test_y = torch.as_tensor(test_labels, device=device)
        eval_loc = storage.Location(job.eval_uri)
        progress = Progress(
            "train", len(mine) * t.epochs_run, len(mine) * t.epochs_run * job.images, unit_name=f"epochs (rank {rank})"
        )
        for run in mine:
            seed = eval_run_seed(t.eval_seed, run)
            ckpt = RunCheckpointer(job.eval_uri, run, job.fingerprint)

            def on_epoch(row: dict[str, Any], run: int = run) -> None:
                progress.add(1, job.images)
                if row.get("test_acc") is not None:
                    say(
                        "train",
                        f"run {run} epoch {row['epoch']}/{t.epochs_run}: loss {row['train_loss']:.4f}, "
                        f"train acc {row['train_acc']:.4f}, test acc {row['test_acc']:.4f} on {device}",
                    )

            result = train_run(
                train_x=train_x,
                train_y=train_y,
                test_x_u8=test_x,
                test_y=test_y,
                config=t,
                num_classes=job.num_classes,
                seed=seed,
                mean=job.mean,
                std=job.std,
                checkpointer=ckpt,
                on_epoch=on_epoch,
                tag={"run": run, "seed": seed},
            )
            result.pop("history")
            result.update(run=run, rank=rank, fingerprint=job.fingerprint, device=str(device), finished=now_iso())
            eval_loc.child("runs").write_bytes(f"{eval_run_name(run)}.json", json_text(result).encode())
    # Every worker reports exactly once: report() is a barrier across the worker group.
    ray.train.report({"runs_done": len(mine)})


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
            name=f"eval-{job.fingerprint}-{int(time.time())}",
            # The storage layer's own filesystem (its endpoint, credentials, retry limit): from a bare gs:// or
            # s3:// URI Ray would build a default client, blind to STORAGE_EMULATOR_HOST and without a bound.
            storage_path=storage_loc.path,
            storage_filesystem=None if storage_loc.local else storage_loc.fs,
            # A restarted worker group resumes every run from its checkpoint.
            failure_config=FailureConfig(max_failures=2),
        ),
    )
    trainer.fit()
