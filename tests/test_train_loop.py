"""The training protocol on a small separable set in the real CIFAR format: it learns, and it resumes exactly."""

from __future__ import annotations

import pytest
import torch

from gdd_ray import storage, synthetic
from gdd_ray.config import TrainConfig
from gdd_ray.train import testsets
from gdd_ray.train.data import mean_std
from gdd_ray.train.loop import LocationCheckpointer, to_device_images, train_run

SIZE, CLASSES = 16, 10


def protocol(**kw) -> TrainConfig:
    return TrainConfig(net_width=32, **kw)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    pats = synthetic.patterns(CLASSES, SIZE, seed=0)
    train_u8, train_y = synthetic.sample(pats, 20, seed=1)
    test_u8, test_y = synthetic.sample(pats, 30, seed=2)
    root = tmp_path_factory.mktemp("cifar")
    names = [f"class_{i}" for i in range(CLASSES)]
    synthetic.write_cifar(str(root), test_u8, test_y, names, kind="cifar10")
    test = testsets.load(str(root), SIZE, mean_std("cifar10"))  # through the real reader
    assert test.info.kind == "cifar10" and test.info.class_ids == names
    mean, std = mean_std("cifar10")
    return {
        "train_x": to_device_images(train_u8, mean, std, "cpu"),
        "train_y": torch.as_tensor(train_y),
        "test_x_u8": torch.as_tensor(test.images),
        "test_y": torch.as_tensor(test.labels),
        "mean": mean,
        "std": std,
    }


@pytest.mark.slow  # over 2 s on 2 cores: `make test` runs it, test-fast does not
def test_short_run_learns_well_above_chance(data):
    proto = protocol(epochs=25, train_batch_size=32, eval_every=5)
    res = train_run(**data, config=proto, num_classes=CLASSES, seed=0)
    h = res["history"]
    assert len(h) == 25 and [r["epoch"] for r in h] == list(range(1, 26))
    assert res["test_acc"] == h[-1]["test_acc"]  # the last epoch's accuracy, not the best one
    assert res["test_acc"] >= 0.6, res["test_acc"]  # chance is 0.10
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert [r["lr"] for r in h[:12]] == [0.01] * 12 and all(abs(r["lr"] - 0.001) < 1e-12 for r in h[12:])
    assert proto.lr_drop_epoch == h[12]["epoch"] == 13  # one epoch count: the first at lr x0.1, as logged
    assert [r["epoch"] for r in h if "test_acc" in r] == [5, 10, 15, 20, 25]


def test_seeds_differ_and_repeat(data):
    proto = protocol(epochs=2, train_batch_size=64)
    a = train_run(**data, config=proto, num_classes=CLASSES, seed=3)
    b = train_run(**data, config=proto, num_classes=CLASSES, seed=3)
    c = train_run(**data, config=proto, num_classes=CLASSES, seed=4)
    assert a["train_loss"] == b["train_loss"] and a["test_acc"] == b["test_acc"]
    assert a["train_loss"] != c["train_loss"]


class Crash(Exception):
    pass


def _numbers(history):
    return [{k: v for k, v in r.items() if k != "epoch_s"} for r in history]


def test_resume_after_a_crash_gives_the_same_run(data, tmp_path):
    proto = protocol(epochs=6, train_batch_size=64, eval_every=2, checkpoint_every=2)  # lr drops at epoch 3: crosses it
    whole = train_run(**data, config=proto, num_classes=CLASSES, seed=7)

    ckpt = LocationCheckpointer(storage.Location(str(tmp_path)), "run.pt")

    def crash_at_5(row):
        if row["epoch"] == 5:
            raise Crash

    with pytest.raises(Crash):
        train_run(**data, config=proto, num_classes=CLASSES, seed=7, checkpointer=ckpt, on_epoch=crash_at_5)
    assert ckpt.load()["epoch"] == 4  # the last checkpoint before the crash
    resumed = train_run(**data, config=proto, num_classes=CLASSES, seed=7, checkpointer=ckpt)
    assert resumed["resumed_from_epoch"] == 4
    assert _numbers(resumed["history"]) == _numbers(whole["history"])
    assert resumed["test_acc"] == whole["test_acc"]
    # A finished run's checkpoint holds the last epoch: running again trains nothing and reports the same.
    again = train_run(**data, config=proto, num_classes=CLASSES, seed=7, checkpointer=ckpt)
    assert again["resumed_from_epoch"] == 6 and again["test_acc"] == whole["test_acc"]
