"""The challenge protocol: which 10 images per class (selection), the evaluator's schedule, per-class results,
and `export --format challenge` read back by the evaluator's loading rules being the very set trained on."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from gen_helpers import augmented_run

from gdd_ray import challenge, export, pipeline, synthetic, trainset
from gdd_ray.classes import load_classes
from gdd_ray.cli import main as cli_main
from gdd_ray.config import TrainConfig
from gdd_ray.config_loader import build_config
from gdd_ray.errors import UserError
from gdd_ray.run import RunDir
from gdd_ray.train import stage
from gdd_ray.train.loop import to_device_images

K = 2
IPC = 4
UNIT = 20  # images per shard: CIFAR-100 at IPC 4 is 20 shards, not the 200 of 2-image units (13 CPU-s to write)


def rows(ipc: int, k: int, classes: int = 2, shuffle: bool = True):
    """(label, index, variant) of a run of `classes` classes, in a scrambled order (a reader's order is no promise)."""
    grid = np.array([(c, i, v) for c in range(classes) for i in range(ipc) for v in range(k + 1)], dtype=np.int64)
    if shuffle:
        grid = grid[np.random.default_rng(0).permutation(len(grid))]
    return grid[:, 0], grid[:, 1], grid[:, 2]


def picked(made_ipc, made_k, how, **prefix):
    labels, index, variant = rows(made_ipc, made_k)
    keep = trainset.choose(labels, index, variant, trainset.RowChoice(per_class=10, how=how, **prefix))
    assert labels[keep].tolist() == [0] * 10 + [1] * 10  # class-major: the evaluator labels by position
    return [(int(i), int(v)) for i, v in zip(index[keep][:10], variant[keep][:10])]


def test_selection_originals_first_spread():
    # IPC >= 10: originals = 10 distinct generated images, no augmented copy.
    assert picked(12, 4, "originals") == [(i, 0) for i in range(10)]
    # IPC 4, K 4: every original, then their first variants, then the second variants of images 0 and 1.
    assert picked(4, 4, "originals") == sorted(
        [(i, 0) for i in range(4)] + [(i, 1) for i in range(4)] + [(0, 2), (1, 2)]
    )
    # first: (index, variant) order, i.e. 2 images x 5 variants at K = 4.
    assert picked(4, 4, "first") == [(i, v) for i in range(2) for v in range(5)]
    # spread: every other row of the 20 in (index, variant) order.
    assert picked(4, 4, "spread") == [(i, v) for i in range(4) for v in range(5)][::2]
    # The prefix first: IPC 12 K 4 read as IPC 3 K 3 offers 12 rows, of which the originals come first.
    assert picked(12, 4, "originals", ipc=3, variants=3) == sorted(
        [(i, v) for i in range(3) for v in (0, 1, 2)] + [(0, 3)]
    )


def test_selection_refuses_short_or_missing_classes():
    labels, index, variant = rows(3, 2)  # 9 rows per class
    with pytest.raises(UserError, match="10 images per class are needed but class 0 has only 9"):
        trainset.choose(labels, index, variant, trainset.RowChoice(per_class=10))
    with pytest.raises(UserError, match="class\\(es\\) 2 have no images"):
        trainset.choose(labels, index, variant, trainset.RowChoice(), num_classes=3)


def test_challenge_schedule_is_the_evaluators():
    # The evaluator: for epoch in range(epochs + 1), lr x0.1 after epoch index epochs // 2 + 1.
    # Our schedule counts epochs from 1 (as metrics.jsonl and the plots do): lr_drop_epoch is the first at 0.001.
    for epochs in (1, 2, 3, 4, 7, 1000):
        t = TrainConfig(epochs=epochs, protocol="challenge")
        lrs = [0.01 if e <= epochs // 2 + 1 else 0.001 for e in range(epochs + 1)]
        ours = [0.01 if t.lr_drop_epoch is None or e + 1 < t.lr_drop_epoch else 0.001 for e in range(t.epochs_run)]
        assert ours == lrs
        assert (t.lr_drop_epoch is None) == (0.001 not in lrs)  # no drop announced that does not happen
    t = TrainConfig(epochs=1000, protocol="challenge")
    assert (t.epochs_run, t.lr_drop_epoch) == (1001, 503)  # epochs 1..502 at 0.01, then 503..1001 at 0.001
    assert (TrainConfig(epochs=1000).epochs_run, TrainConfig(epochs=1000).lr_drop_epoch) == (1000, 501)
    assert TrainConfig(epochs=1).lr_drop_epoch is None and TrainConfig(epochs=2).lr_drop_epoch == 2


def make_run(out, dataset="cifar100", num_classes=None, **train):
    """Generated + augmented shards (IPC 4, K 2: 12 rows per class); the config to train them with."""
    augmented_run(out, dataset, IPC, K, num_classes, unit_size=UNIT, **train)
    values = {"out": str(out), "dataset": dataset, "ipc": IPC, "unit_size": UNIT, "pda_variants": K, **train}
    return build_config({**values, "stages": "train"}), None


def test_challenge_export_refusals_write_nothing(tmp_path, capsys):
    cfg, _ = make_run(tmp_path / "run", num_classes=5)
    dest = tmp_path / "sub"
    with pytest.raises(UserError, match="offers 50 images.*needs 1000"):
        export.export_challenge(cfg.out, str(dest))
    with pytest.raises(UserError, match="submission folder"):
        export.export_challenge(cfg.out, str(dest / "cifar100.pt"))
    assert (
        cli_main(["export", "--run", cfg.out, "--format", "challenge", "--dest", str(dest), "--per-class", "10"]) == 2
    )
    assert "drop --per-class" in capsys.readouterr().err
    assert not dest.exists()
    c10, _ = make_run(tmp_path / "c10", dataset="cifar10")
    with pytest.raises(UserError, match="CIFAR-100 and Tiny-ImageNet only; this run distils cifar10"):
        export.export_challenge(c10.out, str(dest))
    assert not dest.exists()


@pytest.mark.slow
def test_challenge_protocol_trains_on_the_exported_submission(trains_here, tmp_path):
    classes = load_classes("cifar100", None)
    pats = synthetic.patterns(100, 32, seed=0)
    tx, ty = synthetic.sample(pats, 2, seed=2)
    synthetic.write_cifar(str(tmp_path / "test"), tx, ty, [c.class_id for c in classes])
    cfg, _ = make_run(
        tmp_path / "run", protocol="challenge", pick="spread", eval_data=str(tmp_path / "test"), epochs=4,
        eval_runs=2, eval_workers=1, net_width=8, train_batch_size=256, eval_every=5,
    )  # fmt: skip
    res = pipeline.run(cfg)["train"]

    # The submission, loaded by the evaluator's rules (file name, bare tensor, exact shape, labels by position).
    sub = tmp_path / "submission"
    info = export.export_challenge(cfg.out, str(sub))
    assert os.listdir(sub) == ["cifar100.pt"] and info["selection"]["how"] == "spread"
    images, labels = challenge.load_submission(str(sub), "cifar100")
    assert images.shape == (1000, 3, 32, 32) and labels.tolist() == [c for c in range(100) for _ in range(10)]

    # ...is, tensor for tensor, the set the train stage trained on.
    ctx = pipeline.check(cfg)
    distilled, _, ms = stage.load_data(ctx, stage.lifecycle.read_source(ctx, "train"))
    assert torch.equal(images, to_device_images(distilled.images, *ms, "cpu"))
    assert torch.equal(labels, torch.as_tensor(distilled.labels))
    assert res["train_set"]["digest"] == distilled.digest() == info["digest"] and info["trained_on"] is True
    with pytest.raises(UserError, match="cifar100.pt exists already; add --overwrite"):
        export.export_challenge(cfg.out, str(sub))  # the same export twice: refused, not replaced in silence
    assert export.export_challenge(cfg.out, str(sub), overwrite=True)["digest"] == info["digest"]
    other = export.export_challenge(cfg.out, str(tmp_path / "other"), pick="first")
    assert other["selection"]["how"] == "first" and other["trained_on"] is False  # a set never evaluated
    assert not torch.equal(torch.load(str(tmp_path / "other" / "cifar100.pt")), images)

    # results.json names the protocol, the rows and carries per-class accuracy and the confusion matrix.
    on_disk = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert on_disk["protocol"]["name"] == "challenge" and on_disk["protocol"]["epochs_run"] == 5
    assert on_disk["protocol"]["lr_drop_epoch"] == 5 and on_disk["protocol"]["epochs_counted_from"] == 1
    assert on_disk["official"] is False and "epochs 4 (official 1000)" in on_disk["official_differences"]
    assert on_disk["train_set"]["images_per_class"] == 10 and on_disk["train_set"]["images"] == 1000
    assert on_disk["train_set"]["selection"] == {
        "index_below": 4,
        "variant_at_most": 2,
        "per_class": 10,
        "how": "spread",
    }
    conf = np.array(on_disk["confusion"])
    assert conf.shape == (100, 100) and conf.sum() == 2 * len(ty)  # summed over the 2 runs
    per_class = on_disk["per_class"]
    assert [r["label"] for r in per_class] == list(range(100)) and all(r["images"] == 10 for r in per_class)
    assert per_class[7]["accuracy"] == pytest.approx(conf[7, 7] / conf[7].sum())
    assert np.mean([r["accuracy"] for r in per_class]) == pytest.approx(on_disk["accuracy_mean"])
    assert per_class[0]["prompt"] and "apple" in per_class[0]["prompt"]
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(round(lr, 6) for lr in lrs) == [0.001] * 2 + [0.01] * 8  # 2 runs x (4 at 0.01, 1 at 0.001)

    # The run's page came with it.
    page = (tmp_path / "run" / "report.html").read_text()
    assert "challenge" in page and "Worst classes" in page and "data:image/png;base64," in page
    assert "lr x0.1 from epoch 5" in page and "not the official evaluator&#x27;s: " in page


def _results(protocol="challenge", acc=0.5, epochs=1000, runs=3, width=128, ipc=10, size=32, test_images=10_000):
    """A results.json as the train stage writes it, at the given settings (the official evaluator's by default)."""
    return {
        "fingerprint": "0123456789abcdef", "runs": [{"test_acc": acc}] * runs,
        "evaluated": True, "accuracy_mean": acc, "accuracies": [acc] * runs,
        "protocol": {"name": protocol, "epochs": epochs, "batch_size": 256, "lr": 0.01, "momentum": 0.9,
                     "weight_decay": 0.0005, "dsa_strategy": "color_crop_cutout_flip_scale_rotate"},
        "model": {"depth": 3, "width": width, "norm": "instance", "act": "relu", "pool": "avg"},
        "train_set": {"images_per_class": ipc, "image_size": size}, "test_set": {"images": test_images},
    }  # fmt: skip


def test_score_is_the_challenges_only_at_the_evaluators_settings(tmp_path, capsys):
    def fake_run(name, dataset, **settings):
        run = tmp_path / name
        (run / "eval").mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"config": {"dataset": dataset, "ipc": 10, "out": str(run)}}))
        (run / "eval" / "results.json").write_text(json.dumps(_results(**settings)))
        return str(run)

    c100, tiny = fake_run("c", "cifar100", acc=0.5), fake_run("t", "tiny-imagenet", acc=0.25, size=64)
    assert cli_main(["score", c100, tiny]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "score": 0.375, "cifar100": 0.5, "tiny-imagenet": 0.25, "official": True
    }  # fmt: skip

    # The runs: 4 epochs / 1 run, and 1 epoch / 1 run / width 32: refused, every difference named.
    short = fake_run("s", "cifar100", epochs=4, runs=1)
    narrow = fake_run("n", "tiny-imagenet", epochs=1, runs=1, width=32, size=64, test_images=400)
    assert cli_main(["score", short, narrow]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not the challenge's settings" in err and "--unofficial" in err
    for words in ("epochs 4 (official 1000)", "runs (--eval-runs) 1 (official 3)", "epochs 1 (official 1000)",
                  "net-width 32 (official 128)", "test images 400 (official: the full test set, 10000)"):  # fmt: skip
        assert words in err, words
    assert cli_main(["score", short, narrow, "--unofficial"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["official"] is False and out["score"] == 0.5
    assert out["differences"]["cifar100"] == ["epochs 4 (official 1000)", "runs (--eval-runs) 1 (official 3)"]
    assert "net-width 32 (official 128)" in out["differences"]["tiny-imagenet"]

    paper = fake_run("p", "tiny-imagenet", protocol="paper", size=64)
    assert cli_main(["score", c100, paper]) == 2
    assert "protocol paper (official challenge)" in capsys.readouterr().err
    # Two runs of one dataset: the real problem, named.
    other = fake_run("c2", "cifar100")
    assert cli_main(["score", c100, other]) == 2
    assert f"{c100} and {other} are both cifar100 runs" in capsys.readouterr().err
    assert cli_main(["score", c100, c100, "--unofficial"]) == 2
    assert "are both cifar100 runs" in capsys.readouterr().err
    assert challenge.combined_score({"cifar100": 0.5}) is None
    # results.json and the page carry the same verdict as `score`
    assert challenge.official(_results(), "cifar100") == {"official": True, "differences": []}
    assert challenge.official(_results(runs=1), "cifar100")["differences"] == ["runs (--eval-runs) 1 (official 3)"]


def test_report_page_of_a_partial_run_shows_what_exists(tmp_path):
    import base64
    import io
    import re

    from PIL import Image

    from gdd_ray import report_page

    make_run(tmp_path / "run", num_classes=5)  # generated and augmented, never trained
    path = report_page.write_run_page(RunDir.open(str(tmp_path / "run")))
    page = (tmp_path / "run" / "report.html").read_text()
    assert path.endswith("report.html") and page.startswith("<!DOCTYPE html>")
    assert "Per-class gallery" in page and "Worst classes" not in page and "Config and fingerprints" in page
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 5 * 6  # 6 images of each of the 5 classes
    for b64 in images:
        Image.open(io.BytesIO(base64.b64decode(b64))).load()  # every image decodes
