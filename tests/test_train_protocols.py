"""The evaluation protocols end to end on a 2-CPU Ray cluster: random-real and full-data baselines with IOR, HLR
and LRS, soft labels from a teacher, cross-architecture networks; resume per cell, shared baselines, the page."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gen_helpers import write_generated

from gdd_ray import lifecycle, pipeline, synthetic
from gdd_ray.classes import dataset_classes
from gdd_ray.config_loader import build_config
from gdd_ray.errors import UserError
from gdd_ray.train import evaluation, protocols, scores, stage

CLASSES = dataset_classes("cifar10")
NAMES = [c.class_id for c in CLASSES]


class TinyTeacher(torch.nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1))


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    """A CIFAR-10 test set and training set (8 per class) in the real format, a random TorchScript teacher."""
    root = tmp_path_factory.mktemp("real")
    pats = synthetic.patterns(10, 16, seed=0)
    synthetic.write_cifar(str(root / "cifar"), *synthetic.sample(pats, 8, seed=3), NAMES, kind="cifar10", split="train")
    synthetic.write_cifar(str(root / "cifar"), *synthetic.sample(pats, 3, seed=2), NAMES, kind="cifar10")
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(TinyTeacher(10)), str(root / "teacher.pt"))
    return root


def make_run(out, real, **kw):
    pats = synthetic.patterns(10, 16, seed=0)
    x, y = synthetic.sample(pats, 2, seed=1)
    values = dict(
        dataset="cifar10", ipc=2, out=str(out), stages="train", image_size=16, eval_data=str(real / "cifar"),
        epochs=2, eval_runs=2, eval_workers=2, net_width=8, train_batch_size=8, eval_every=2, checkpoint_every=1,
    )  # fmt: skip
    values.update(kw)
    cfg = build_config(values)
    write_generated(cfg, CLASSES, x, y)
    return cfg


@pytest.mark.slow
def test_baselines_soft_labels_scores_resume_and_sharing(trains_here, real_data, tmp_path):
    shared = str(tmp_path / "baselines")
    kw = dict(
        real_train_data=str(real_data / "cifar"), eval_full_data=True, labels="both",
        teacher=str(real_data / "teacher.pt"), soft_epochs=2, baselines_dir=shared,
    )  # fmt: skip
    # One worker: its ten runs take a fraction of the seconds a second worker process takes to start.
    cfg = make_run(tmp_path / "run", real_data, **kw, eval_workers=1)
    res = stage.run(pipeline.check(cfg))

    cells = {c["name"]: c for c in res["evaluations"]}
    assert sorted(cells) == sorted(
        f"{d}-convnet-{lab}" for d, lab in [("distilled", "hard"), ("distilled", "soft"), ("random", "hard"),
                                             ("random", "soft"), ("full", "hard")]
    )  # fmt: skip
    assert all(len(c["accuracies"]) == 2 for c in cells.values())
    assert res["accuracies"] == cells["distilled-convnet-hard"]["accuracies"]  # the headline evaluation
    assert cells["distilled-convnet-soft"]["epochs"] == 2
    # DD-Ranking's scores, per run, from the cells' own accuracies.
    acc = {n: np.array(c["accuracies"]) for n, c in cells.items()}
    by_labels = {s["labels"]: s for s in res["scores"]}
    for lab in ("hard", "soft"):
        s = by_labels[lab]
        assert s["ior"]["values"] == pytest.approx(acc[f"distilled-convnet-{lab}"] - acc[f"random-convnet-{lab}"])
        assert s["hlr"]["values"] == pytest.approx(acc["full-convnet-hard"] - acc["distilled-convnet-hard"])
        assert s["lrs"]["values"] == pytest.approx(
            [scores.lrs(i, h) for i, h in zip(s["ior"]["values"], s["hlr"]["values"])]
        )
    # The random subsets: 2 per class (the distilled set's), drawn per run, recorded.
    subsets = res["baselines"]["random_subsets"]
    assert [s["run"] for s in subsets] == [0, 1] and all(s["images"] == 20 for s in subsets)
    assert subsets[0]["digest"] != subsets[1]["digest"]
    assert subsets[0]["seed"] == protocols.subset_seed(0, 0)
    assert res["baselines"]["images"] == 80 and res["baselines"]["kind"] == "cifar10"

    # Rerunning does nothing.
    assert stage.run(pipeline.check(cfg)) == res

    # Another run of the same protocol (another distilled set) shares every baseline: only its own are to do.
    other = make_run(tmp_path / "other", real_data, **kw, seed=5)
    ctx = pipeline.check(other)
    source = lifecycle.read_source(ctx, "train")
    distilled, _, _ = stage.load_data(ctx, source)
    plan = evaluation.make_plan(ctx, distilled, source.manifest.digest)
    assert {c.cell.name for c, _ in plan.pending()} == {"distilled-convnet-hard", "distilled-convnet-soft"}
    assert {c.loc.uri for c in plan.cells if c.cell.data != "distilled"} == {
        c["folder"] for c in cells.values() if c["data"] != "distilled"
    }

    # A lost baseline run is all there is to redo (from its start: its checkpoint went too), on the same subset.
    random_hard = cells["random-convnet-hard"]["folder"]
    os.unlink(os.path.join(random_hard, "runs", "run01.json"))
    os.unlink(os.path.join(random_hard, "checkpoints", "run01.pt"))
    ctx = pipeline.check(cfg)
    source = lifecycle.read_source(ctx, "train")
    distilled, _, _ = stage.load_data(ctx, source)
    plan = evaluation.make_plan(ctx, distilled, source.manifest.digest)
    assert [(c.cell.name, r) for c, r in plan.pending()] == [("random-convnet-hard", 1)]
    assert plan.real.describe()["random_subsets"] == subsets
    task = evaluation.tasks(plan, plan.pending(), {1: np.arange(20)}, 0)[0]
    assert task.extra["subset_digest"] == subsets[1]["digest"] and task.loc_uri == random_hard


def test_defaults_keep_the_train_fingerprint_and_new_options_change_it(real_data, tmp_path):
    cfg = make_run(tmp_path / "run", real_data)
    assert set(stage.resolved_inputs(cfg)) == {"rows"}  # nothing new at the defaults: old runs keep theirs
    fp = pipeline.context(cfg)[0].fingerprint("train")
    for change in ({"train.eval_nets": ("convnet", "resnet18")}, {"train.real_train_data": str(real_data / "cifar")}):
        assert pipeline.context(cfg.replace(**change))[0].fingerprint("train") != fp
    # Names as DC-bench and DD-Ranking write them are the same network.
    a = stage.resolved_inputs(cfg.replace(**{"train.eval_nets": ("ResNet-18-BN",)}))
    b = stage.resolved_inputs(cfg.replace(**{"train.eval_nets": ("resnet18bn",)}))
    assert a == b
    # What decides nothing stays out: ConvNet-3 is the default network, a temperature without soft labels.
    same = {"train.eval_nets": ("ConvNet-3",), "train.temperature": 2.0, "train.runs_at_once": 3}
    assert set(stage.resolved_inputs(cfg.replace(**same))) == {"rows"}


def test_protocol_refusals_are_one_line_and_write_nothing(real_data, tmp_path):
    with pytest.raises(UserError, match="--eval-full-data trains on the real training set"):
        make_run(tmp_path / "a", real_data, eval_full_data=True)
    with pytest.raises(UserError, match="--labels soft relabels every batch with a teacher"):
        make_run(tmp_path / "b", real_data, labels="soft")
    with pytest.raises(UserError, match="unknown network 'resnet50'"):
        make_run(tmp_path / "c", real_data, eval_nets="convnet,resnet50")
    with pytest.raises(UserError, match="--eval-nets vgg11: VGG-11 pools a 16px image away"):
        pipeline.check(make_run(tmp_path / "d", real_data, eval_nets="vgg11"))
    bound = make_run(tmp_path / "e", real_data, real_train_data=str(real_data / "cifar"), eval_full_data=True,
                     full_data_max_gib=0.00001)  # fmt: skip
    with pytest.raises(UserError, match=r"80 images of 16 px = 0.00 GiB as uint8, over --full-data-max-gib 1e-05"):
        pipeline.check(bound)
    shifted = tmp_path / "shifted"
    pats = synthetic.patterns(10, 16, seed=0)
    synthetic.write_cifar(str(shifted), *synthetic.sample(pats, 2, seed=3), NAMES[1:] + NAMES[:1], "cifar10", "train")
    with pytest.raises(UserError, match="label alignment: 10 of 10 labels name another class than the real training"):
        pipeline.check(make_run(tmp_path / "f", real_data, real_train_data=str(shifted)))
    assert not (tmp_path / "f" / "eval").exists()


def test_random_subset_is_seeded_per_class_and_a_prefix_across_ipc():
    labels = np.repeat(np.arange(4), 50)
    a = protocols.random_subset(labels, [3] * 4, seed=7)
    assert np.array_equal(a, protocols.random_subset(labels, [3] * 4, seed=7))
    assert (np.bincount(labels[a]) == 3).all() and (np.diff(a) > 0).all()
    assert not np.array_equal(a, protocols.random_subset(labels, [3] * 4, seed=8))
    bigger = protocols.random_subset(labels, [5] * 4, seed=7)
    assert set(a) <= set(bigger)
    with pytest.raises(ValueError, match="class 0 has 50 real training images, fewer than the 51"):
        protocols.random_subset(labels, [51] * 4, seed=7)


def test_lrs_is_dd_rankings():
    # alpha = 0.5 IOR - 0.5 HLR; LRS = (e^a - e^-1) / (e - e^-1): 0 at a = -1, 1 at a = 1.
    assert scores.lrs(1.0, -1.0) == pytest.approx(1.0) and scores.lrs(-1.0, 1.0) == pytest.approx(0.0)
    assert scores.lrs(0.1, 0.3) == pytest.approx((np.exp(-0.1) - np.exp(-1)) / (np.e - np.exp(-1)))
    s = scores.scores([0.5, 0.6], [0.3, 0.2], None, [0.5, 0.6])
    assert s["ior"]["values"] == pytest.approx([0.2, 0.4]) and s["hlr"] is None and s["lrs"] is None
