"""The train stage end to end on a 2-CPU Ray cluster: parallel runs, outputs, skip when done, resume, refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from gen_helpers import write_generated

from gdd_ray import pipeline, storage, synthetic
from gdd_ray.classes import dataset_classes
from gdd_ray.config_loader import build_config
from gdd_ray.errors import UserError
from gdd_ray.plan import eval_run_seed
from gdd_ray.run import RunDir
from gdd_ray.train import stage
from gdd_ray.train.worker import training_here

SIZE = 16
CLASSES = dataset_classes("cifar10")
NAMES = [c.class_id for c in CLASSES]


def make_run(tmp_path, **kw):
    pats = synthetic.patterns(10, SIZE, seed=0)
    x, y = synthetic.sample(pats, 6, seed=1)
    tx, ty = synthetic.sample(pats, 10, seed=2)
    synthetic.write_cifar(str(tmp_path / "test"), tx, ty, NAMES, kind="cifar10")
    values = dict(
        dataset="cifar10", ipc=6, out=str(tmp_path / "run"), stages="train", image_size=SIZE,
        eval_data=str(tmp_path / "test"), epochs=4, eval_runs=3, eval_workers=2, net_width=16,
        train_batch_size=32, eval_every=2, checkpoint_every=2,
    )  # fmt: skip
    values.update(kw)
    cfg = build_config(values)
    write_generated(cfg, CLASSES, x, y)
    return cfg, RunDir(cfg.out)


@pytest.mark.slow
def test_train_stage_runs_in_parallel_writes_outputs_skips_and_resumes(local_ray, tmp_path):
    cfg, run_dir = make_run(tmp_path)
    ctx = pipeline.check(cfg)
    res = stage.run(ctx)
    ev = tmp_path / "run" / "eval"

    assert res["evaluated"] and res["workers"] == 2 and len(res["runs"]) == 3
    assert [r["seed"] for r in res["runs"]] == [eval_run_seed(0, r) for r in range(3)]
    assert len({r["rank"] for r in res["runs"]}) == 2  # the runs were spread over both workers
    accs = [r["test_acc"] for r in res["runs"]]
    assert res["accuracies"] == accs and res["accuracy_mean"] == pytest.approx(np.mean(accs))
    assert res["accuracy_std"] == pytest.approx(np.std(accs))
    assert res["model"]["parameters"] > 0 and res["protocol"]["lr"] == 0.01 and res["config"]["epochs"] == 4
    assert res["train_set"]["images"] == 60 and res["test_set"]["kind"] == "cifar10"
    on_disk = json.loads((ev / "results.json").read_text())
    assert on_disk["fingerprint"] == res["fingerprint"] and on_disk["accuracies"] == accs

    rows = [json.loads(line) for line in (ev / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["run"], r["epoch"]) for r in rows) == [(r, e) for r in range(3) for e in range(1, 5)]
    assert [r["test_acc"] for r in rows if r["epoch"] == 4] == accs
    assert (ev / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(ev / "checkpoints")) == ["run00.pt", "run01.pt", "run02.pt"]

    # Same fingerprint: nothing is redone (no Ray Train job at all).
    again = stage.run(ctx)
    assert again == res

    # A lost result and one more run asked for: run 1 resumes from its checkpoint (its last epoch) and reports
    # the same accuracy, run 3 is new, runs 0 and 2 are not touched. Trained in this process, as a sweep's trial
    # does (the same worker code; --eval-workers decides no number either): test_stores_on_ray resumes through Ray Train.
    (ev / "runs" / "run01.json").unlink()
    (ev / "results.json").unlink()
    with training_here(torch.device("cpu")):
        more = stage.run(pipeline.check(cfg.replace(**{"train.eval_runs": 4})))
    assert more["accuracies"][:3] == accs and len(more["runs"]) == 4 and more["runs"][3]["seed"] == eval_run_seed(0, 3)
    assert more["runs"][1]["resumed_from_epoch"] == 4 and more["runs"][3]["resumed_from_epoch"] == 0
    assert more["runs"][0]["finished"] == res["runs"][0]["finished"]
    assert more["runs"][2]["finished"] == res["runs"][2]["finished"]
    assert more["fingerprint"] == res["fingerprint"]  # nor --eval-runs: finished runs are kept
    assert more["workers"] == 1 and {r["rank"] for r in more["runs"][1::2]} == {0}


@pytest.mark.slow  # the stage puts its data in Ray's object store: a local Ray, which test-fast never starts
def test_train_stage_without_test_set_says_nothing_was_evaluated(local_ray, tmp_path, capsys, monkeypatch):
    """The stage and the worker's own code (run_tasks) with no test set, trained in this process as a sweep's
    trial does (worker.training_here), not in a Ray Train worker group (the test above proves that transport:
    five actor processes to start)."""
    from gdd_ray.train import worker

    fits, tasks_run = [], []
    monkeypatch.setattr(worker, "fit", lambda *a: fits.append(a))  # never called here
    real_run_tasks = worker.run_tasks

    def run_tasks(job, tasks, device, rank=0):
        tasks_run.append((len(tasks), job.test_ref, device))
        real_run_tasks(job, tasks, device, rank)

    monkeypatch.setattr(worker, "run_tasks", run_tasks)
    cfg, run_dir = make_run(tmp_path, eval_data=None, eval_runs=1, epochs=2)
    with worker.training_here(torch.device("cpu")):
        res = stage.run(pipeline.check(cfg))
    assert worker.device_here() is None and not fits
    assert tasks_run == [(1, None, torch.device("cpu"))]  # one run trained, handed no test set
    assert res["workers"] == 1 and res["use_gpu"] is False
    assert res["evaluated"] is False and res["accuracy_mean"] is None and res["runs"][0]["test_acc"] is None
    assert "nothing was evaluated" in capsys.readouterr().out


def test_train_stage_refuses_misaligned_shards_before_training(tmp_path):
    cfg, run_dir = make_run(tmp_path)
    # Shards written under a class list shifted by one: stopped before any Ray work, nothing written to eval/.
    run_dir.generated.delete_tree()
    shifted = [c.__class__(c.label, NAMES[(c.label + 1) % 10], c.name) for c in CLASSES]
    pats = synthetic.patterns(10, SIZE)
    write_generated(cfg, CLASSES, *synthetic.sample(pats, 6, seed=0), shard_classes=shifted)
    with pytest.raises(UserError, match="label alignment: 10 of 10 labels.*label 0: shards 'automobile'"):
        stage.run(pipeline.check(cfg))
    assert not storage.Location(str(tmp_path / "run" / "eval")).exists()
