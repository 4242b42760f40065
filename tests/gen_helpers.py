"""Helpers shared by the generation tests."""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
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


def three_class_config(out, **overrides):
    """tiny_config on a three-class list (cat, dog, bird): a stage run of a few seconds on a CPU."""
    classes = Path(out).parent / "three_classes.txt"
    classes.write_text("cat\ndog\nbird\n")
    values = dict(
        classes=str(classes), ipc=3, out=str(out), model="tiny", gen_resolution=64, image_size=16, unit_size=2,
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


def assert_same_images(got: dict[tuple[int, int], bytes], want: dict[tuple[int, int], bytes]) -> None:
    """The same (label, index) set and the same PNG bytes for each, whichever process made them. The two
    runs must have the same --batch-size (another batch shape is another float rounding), and an in-process
    reference compared with Ray actors' images is made inside `actor_threads()`."""
    assert sorted(got) == sorted(want)
    differ = sorted(k for k in want if got[k] != want[k])
    if differ:
        import numpy as np

        k = differ[0]
        levels = np.abs(shards.decode_png(got[k]).astype(int) - shards.decode_png(want[k]).astype(int)).max()
        raise AssertionError(f"{len(differ)} of {len(want)} images differ, e.g. {k} by up to {levels} levels")


@contextmanager
def actor_threads():
    """Torch's CPU thread count of a 1-CPU Ray actor (Ray sets OMP_NUM_THREADS=1), for an in-process run whose
    images are compared with actors' byte for byte. CPU kernels split their sums by thread, so the floats
    differ with the thread count (by ~1e-6 on the tiny model) and a pixel now and then rounds to the next
    level (measured: 1 of 400 images between 2 threads and 1; 0 of 400 between 1 thread and the actors)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def generate_serial(cfg) -> dict:
    """The generate stage of `cfg` run in this process (the serial runner) with an actor's one torch thread: its
    images equal the Ray actors' byte for byte. Returns the stage's summary."""
    from gdd_ray import pipeline
    from gdd_ray.generate import stage as gen_stage

    with actor_threads():
        return gen_stage.run(pipeline.check(cfg), serial=True)


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


def busy_at_once(n: int, thread, timeout: float = 120, rendering=None) -> dict[int, object]:
    """Until `n` generator actors render at the same time. Actors start one after another (each imports torch
    and loads the model), and the first would finish a small run alone: so each is frozen (SIGSTOP) as soon as
    it renders, until the last one does. `rendering()` gives {pid: what to record} of the actors rendering now
    (default: this machine's, by pid). Returns that record of each, in the order seen, still frozen: the caller
    resumes (`resume`) or kills them."""
    import signal
    import time

    if rendering is None:
        rendering = lambda: {pid: pid for pid in generator_actor_pids(busy=True)}  # noqa: E731
    frozen: dict[int, object] = {}
    deadline = time.time() + timeout
    try:
        while len(frozen) < n:
            for pid, what in rendering().items():
                if pid not in frozen:
                    os.kill(pid, signal.SIGSTOP)
                    frozen[pid] = what
            if not thread.is_alive():
                raise AssertionError(f"the run ended with {len(frozen)} of {n} actors seen rendering")
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {n} busy actors ({len(frozen)} seen)")
            time.sleep(0.05)
    except BaseException:
        resume(frozen)
        raise
    return frozen


def resume(pids) -> None:
    """SIGCONT to each of `pids` that is still there."""
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def write_generated(cfg, classes, *args, **kw) -> list[str]:
    """synthetic.write_generated with the generate stage's fingerprint for `cfg` (unless one is given)."""
    from gdd_ray import pipeline, synthetic

    kw.setdefault("fingerprint", pipeline.generation_fingerprint(cfg, classes))
    return synthetic.write_generated(cfg, classes, *args, **kw)


def augmented_run(out, dataset: str, ipc: int, k: int, num_classes: int | None = None, **values):
    """Generated + augmented shards written by the real per-shard worker (serially, no Ray needed), with the
    manifests the stages write last; `values`: more config (train fields). Returns (run_dir, classes)."""
    from gdd_ray import pipeline
    from gdd_ray.augment.recipe import resolve_ops
    from gdd_ray.augment.shard import augment_shard
    from gdd_ray.classes import load_classes
    from gdd_ray.run import RunDir

    cfg = build_config({"out": str(out), "dataset": dataset, "ipc": ipc, "unit_size": 2, "pda_variants": k,
                        **values, "stages": "augment"})  # fmt: skip
    classes = load_classes(dataset, None)[:num_classes]
    names = write_generated(cfg, classes)
    run_dir = RunDir(cfg.out)
    fps, inputs, sources = pipeline.stage_inputs(cfg, classes, run_dir)  # a subset of the dataset's classes
    run_dir.prepare(cfg, [vars(c) for c in classes], fps, inputs, sources)
    for n in names:
        augment_shard(run_dir.generated, run_dir.augmented, n, k, resolve_ops(None), fps["augment"])
    rows = shards.read_manifest(run_dir.generated).rows
    specs = [shards.augmented_spec(n, rows[n], k, fps["augment"]) for n in names]
    sizes = run_dir.augmented.sizes(shards.SHARD_SUFFIX)
    shards.write_manifest(run_dir.augmented, "augment", fps["augment"], specs, ipc, sizes)
    return run_dir, classes


def bucket_train_config(uri: str, test_dir: Path):
    """A train-only run at `uri` (an object store) on synthetic generated shards written there, with a local
    CIFAR-10-format test set in `test_dir`: 2 evaluation runs of 2 epochs, checkpointed every epoch."""
    from gdd_ray import synthetic
    from gdd_ray.classes import dataset_classes

    classes = dataset_classes("cifar10")
    pats = synthetic.patterns(10, 16, seed=0)
    tx, ty = synthetic.sample(pats, 4, seed=2)
    synthetic.write_cifar(str(test_dir), tx, ty, [c.class_id for c in classes], kind="cifar10")
    cfg = build_config(
        dict(dataset="cifar10", ipc=4, out=uri, stages="train", image_size=16, eval_data=str(test_dir), epochs=2,
             eval_runs=2, eval_workers=2, net_width=8, train_batch_size=20, checkpoint_every=1)
    )  # fmt: skip
    write_generated(cfg, classes, *synthetic.sample(pats, 4, seed=1))
    return cfg


EVAL_FILES = ("results.json", "_summary.json", "metrics.jsonl", "curve.png", "runs/run00.json", "runs/run01.json",
              "checkpoints/run00.pt", "checkpoints/run01.pt")  # fmt: skip


def images_of(objects: dict[str, bytes]) -> dict[tuple[int, int], bytes]:
    """(label, index) -> PNG bytes over every shard object of a bucket listing; asserts no image appears twice."""
    import io

    import pyarrow.parquet as pq

    out: dict[tuple[int, int], bytes] = {}
    for key, data in sorted(objects.items()):
        if key.endswith(".parquet"):
            t = pq.read_table(io.BytesIO(data))
            for img, label, index in zip(t["image"].to_pylist(), t["label"].to_pylist(), t["index"].to_pylist()):
                assert (label, index) not in out, f"duplicate {(label, index)} in {key}"
                out[(label, index)] = img["bytes"]
    return out


def trained_run(out, test_dir, ipc: int = 2, k: int = 1, num_classes: int = 3, **train):
    """A small CIFAR-10 run (its first `num_classes` classes) taken through the train stage's own pieces in this
    process, no Ray: synthetic generated + augmented shards, the rows the stage reads (load_shards), each
    evaluation run trained by train_run on a synthetic CIFAR-format test set read by the real reader, then
    results.json, metrics.jsonl, curve.png and the run's page as the stage and pipeline write them. Seconds.
    `train`: train options (epochs 2, eval-runs 2, net-width 8 unless given). Returns the RunDir."""
    import torch

    from gdd_ray import pipeline, report_page, synthetic, trainset
    from gdd_ray.augment.samples import write_sample_grid
    from gdd_ray.plan import eval_run_seed
    from gdd_ray.run import now_iso
    from gdd_ray.train import report, testsets
    from gdd_ray.train.data import load_shards, mean_std
    from gdd_ray.train.loop import to_device_images, train_run

    values = {"epochs": 2, "eval_runs": 2, "net_width": 8, "train_batch_size": 8, **train}
    run_dir, classes = augmented_run(out, "cifar10", ipc, k, num_classes, image_size=16, **values)
    if not Path(test_dir).exists():
        pats = synthetic.patterns(num_classes, 16, seed=0)
        names = [c.class_id for c in classes]
        synthetic.write_cifar(str(test_dir), *synthetic.sample(pats, 3, seed=2), names, kind="cifar10")
    cfg = build_config({"out": str(out), "dataset": "cifar10", "ipc": ipc, "unit_size": 2, "pda_variants": k,
                        "image_size": 16, "eval_data": str(test_dir), **values, "stages": "train"})  # fmt: skip
    fps, inputs, _ = pipeline.stage_inputs(cfg, classes, run_dir)
    run_dir.prepare(cfg, [vars(c) for c in classes], fps, inputs)
    names = shards.read_manifest(run_dir.augmented, fps["augment"]).names
    write_sample_grid(run_dir, classes, names, k)  # as the augment stage does
    distilled = load_shards(run_dir.augmented, names, trainset.for_training(cfg), num_classes)
    ms = mean_std("cifar10")
    test = testsets.load(str(test_dir), 16, ms)
    runs, history = [], []
    for r in range(cfg.train.eval_runs):
        seed = eval_run_seed(cfg.train.eval_seed, r)
        res = train_run(
            train_x=to_device_images(distilled.images, *ms, "cpu"), train_y=torch.as_tensor(distilled.labels),
            test_x_u8=torch.as_tensor(test.images), test_y=torch.as_tensor(test.labels), config=cfg.train,
            num_classes=num_classes, seed=seed, mean=ms[0], std=ms[1], tag={"run": r, "seed": seed},
        )  # fmt: skip
        history += res.pop("history")
        runs.append({**res, "run": r, "fingerprint": fps["train"]})
    results = report.results_document(
        cfg, fps["train"], run_dir.augmented.uri, distilled, test, runs, ms, classes,
        workers=1, use_gpu=False, started=now_iso(), wall_s=1.0,
    )  # fmt: skip
    report.write_outputs(run_dir.eval, results, history)
    report_page.write_run_page(run_dir)
    return run_dir
