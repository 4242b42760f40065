"""Exports: challenge .pt and ImageFolder round-trips, the Parquet as a Hugging Face Image dataset, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from gen_helpers import augmented_run, tree_digest

from gdd_ray import export, shards
from gdd_ray.augment import stage
from gdd_ray.cli import main as cli_main

K = 2
IPC = 4


def make_run(out, dataset="cifar100", ipc=IPC, num_classes=None):
    return augmented_run(out, dataset, ipc, K, num_classes)


@pytest.fixture(scope="module")
def run5(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"), num_classes=5)


def stored_pixels(run_dir):
    """(label, index, variant) -> HxWx3 uint8, straight from the augmented Parquet."""
    t = export.load_images(run_dir.uri)
    keys = zip(t.column("label").to_pylist(), t.column("index").to_pylist(), t.column("variant").to_pylist())
    return {k: shards.decode_png(img["bytes"]) for k, img in zip(keys, t.column("image").to_pylist())}


def test_challenge_pt_round_trip(run5, tmp_path):
    run_dir, classes = run5
    dest = str(tmp_path / "out" / "distilled.pt")
    info = export.export_pt(run_dir.uri, dest)
    n = IPC * (K + 1)
    assert info["shape"] == [5 * n, 3, 32, 32] and info["per_class"] == n
    x = torch.load(dest)
    labels = torch.load(str(tmp_path / "out" / "distilled_labels.pt"))
    assert x.dtype == torch.float32 and x.shape == (5 * n, 3, 32, 32)
    assert labels.tolist() == [i // n for i in range(5 * n)]  # label follows from position
    mean, std = export.MEAN_STD["cifar100"]
    assert info["mean"] == list(mean)
    back = (x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)) * 255
    back = back.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pix = stored_pixels(run_dir)
    order = [(c, i, v) for c in range(5) for i in range(IPC) for v in range(K + 1)]
    for row, key in enumerate(order):
        assert np.abs(back[row].astype(int) - pix[key].astype(int)).max() <= 1, key
    lines = (tmp_path / "out" / "distilled_classes.txt").read_text().splitlines()
    assert lines[3] == f"3\t{classes[3].class_id}\t{classes[3].name}"


def test_first_n_per_class_and_mean_override(run5, tmp_path):
    run_dir, _ = run5
    dest = str(tmp_path / "d10.pt")
    info = export.export_pt(run_dir.uri, dest, per_class=4, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], pick="first")
    x, labels = torch.load(dest), torch.load(str(tmp_path / "d10_labels.pt"))
    assert x.shape[0] == 20 and info["per_class"] == 4 and labels.tolist() == [c for c in range(5) for _ in range(4)]
    pix = stored_pixels(run_dir)
    # the first 4 of class 2 in (index, variant) order: image 0 v0..v2, image 1 v0
    for j, key in enumerate([(2, 0, 0), (2, 0, 1), (2, 0, 2), (2, 1, 0)]):
        got = ((x[8 + j] * 0.5 + 0.5) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.abs(got.astype(int) - pix[key].astype(int)).max() <= 1


def exported_rows(x, run_dir, per_class):
    """(label, index, variant) of each exported image, found by its pixels among the stored ones."""
    mean, std = export.MEAN_STD["cifar100"]
    back = (x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)) * 255
    back = back.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)
    pix = stored_pixels(run_dir)
    out = []
    for row in range(len(back)):
        hits = [k for k, p in pix.items() if k[0] == row // per_class and np.abs(back[row] - p).max() <= 1]
        assert len(hits) == 1, (row, hits)
        out.append(hits[0])
    return out


def test_pt_per_class_picks_by_the_train_stage_rule(run5, tmp_path):
    """--per-class N takes each class's N through gdd_ray.trainset (the run's --pick unless given), not the
    first N by (index, variant): by default N distinct generated images, not 2 images x their variants."""
    from gdd_ray import trainset

    run_dir, _ = run5
    table = export.list_images(run_dir.uri)
    cols = [table.column(c).to_numpy() for c in ("label", "index", "variant")]
    for how in (None, "spread", "first"):
        dest = str(tmp_path / f"{how}.pt")
        info = export.export_pt(run_dir.uri, dest, per_class=4, pick=how)
        assert info["selection"] == (how or "originals")  # the run's --pick: the default, originals
        rule = trainset.RowChoice(per_class=4, how=how or "originals")
        want = [tuple(int(c[i]) for c in cols) for i in trainset.choose(*cols, rule)]
        assert exported_rows(torch.load(dest), run_dir, 4) == want
    assert want[:4] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0)]  # 'first': what --per-class took before
    dest = str(tmp_path / "default.pt")
    export.export_pt(run_dir.uri, dest, per_class=4)
    assert exported_rows(torch.load(dest), run_dir, 4)[:4] == [(0, i, 0) for i in range(IPC)]  # originals


def test_pt_per_class_follows_the_runs_select(tmp_path, capsys):
    run_dir, _ = augmented_run(tmp_path / "run", "cifar100", IPC, K, 2, pick="spread")
    dest = str(tmp_path / "s.pt")
    assert cli_main(["export", "--run", run_dir.uri, "--format", "pt", "--dest", dest, "--per-class", "3"]) == 0
    assert exported_rows(torch.load(dest), run_dir, 3)[:3] == [(0, 0, 0), (0, 1, 1), (0, 2, 2)]  # rows 0, 4, 8 of 12
    assert cli_main(["export", "--run", run_dir.uri, "--format", "pt", "--dest", dest, "--pick", "first"]) == 2
    assert "--pick applies to --format challenge, and to --format pt with --per-class" in capsys.readouterr().err


def test_imagefolder_round_trip(run5, tmp_path):
    from torchvision.datasets import ImageFolder

    run_dir, classes = run5
    info = export.export_imagefolder(run_dir.uri, str(tmp_path / "if"))
    assert info["images"] == 5 * IPC * (K + 1) and info["sorted_folders_match_labels"]
    ds = ImageFolder(str(tmp_path / "if"))
    assert ds.classes == [c.class_id for c in classes]  # ImageFolder's labels are the dataset's labels
    pix = stored_pixels(run_dir)
    for path, label in ds.samples:
        name = path.rsplit("/", 1)[1][:-4]
        lab, idx, v = name.split("_")
        assert int(lab) == label
        assert np.array_equal(np.asarray(ds.loader(path)), pix[(label, int(idx), int(v[1:]))])  # lossless


def test_parquet_loads_with_hugging_face_datasets(run5, tmp_path):
    datasets = pytest.importorskip("datasets")
    run_dir, _ = run5
    files = [run_dir.augmented.file(n) for n in run_dir.augmented.list(".parquet")]
    ds = datasets.Dataset.from_parquet(files, cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["variant"].dtype == "int32" and len(ds) == 5 * IPC * (K + 1)
    row = ds[0]
    pix = stored_pixels(run_dir)
    assert np.array_equal(np.asarray(row["image"].convert("RGB")), pix[(row["label"], row["index"], row["variant"])])
    # what a user types: the folder itself (its _summary.json is not data)
    folder = datasets.load_dataset(run_dir.augmented.path, split="train", cache_dir=str(tmp_path / "hf2"))
    assert isinstance(folder.features["image"], datasets.Image) and len(folder) == len(ds)


def test_cli_export_and_errors(run5, tmp_path, capsys):
    run_dir, _ = run5
    assert cli_main(["export", "--run", run_dir.uri, "--format", "pt", "--dest", str(tmp_path / "c.pt")]) == 0
    assert "(60, 3, 32, 32)" in capsys.readouterr().out

    def error(*args):
        assert cli_main(["export", "--run", run_dir.uri, *args]) == 2
        return capsys.readouterr().err.strip()

    assert "class 0 has only 12 images" in error(
        "--format", "pt", "--dest", str(tmp_path / "x.pt"), "--per-class", "13"
    )
    assert "must be a .pt file" in error("--format", "pt", "--dest", str(tmp_path / "x.npy"))
    assert "give both --mean and --std" in error("--format", "pt", "--dest", str(tmp_path / "x.pt"), "--mean", "0,0,0")
    assert "apply to --format pt only" in error(
        "--format", "imagefolder", "--dest", str(tmp_path / "f"), "--mean", "0,0,0", "--std", "1,1,1"
    )
    err = cli_main(["export", "--run", str(tmp_path / "nothing"), "--format", "pt", "--dest", str(tmp_path / "y.pt")])
    assert err == 2 and "holds no complete augment stage" in capsys.readouterr().err


def test_unequal_or_missing_classes_are_refused(tmp_path):
    run_dir, _ = make_run(tmp_path / "run", dataset="cifar10", num_classes=3)
    table = export.list_images(run_dir.uri)
    labels, index = table.column("label").to_numpy(), table.column("index").to_numpy()
    short = table.filter(~((labels == 1) & (index >= 2)))  # class 1 lost 2 images (6 rows)
    with pytest.raises(export.UserError, match="between 6 and 12 images; pass --per-class"):
        export.select_per_class(short, None, 3)
    assert export.select_per_class(short, 6, 3)[0].num_rows == 18
    with pytest.raises(export.UserError, match="class\\(es\\) 2 have no images"):
        export.select_per_class(table.filter(labels != 2), 6, 3)  # positions would shift the labels
    # a shard listed by the manifest but gone from the folder: the run is refused, nothing is written
    run_dir.augmented.delete(run_dir.augmented.list(".parquet")[4])
    with pytest.raises(export.UserError, match="lacks 1 of the 6 shards"):
        export.export_pt(run_dir.uri, str(tmp_path / "a.pt"))
    assert not (tmp_path / "a.pt").exists()


def test_generated_source_and_tiny_imagenet_stats(tmp_path):
    run_dir, classes = make_run(tmp_path / "run", dataset="tiny-imagenet", ipc=2, num_classes=2)
    info = export.export_pt(run_dir.uri, str(tmp_path / "g.pt"), source="generated")
    assert info["shape"] == [4, 3, 64, 64] and info["mean"] == [0.485, 0.456, 0.406]
    info = export.export_imagefolder(run_dir.uri, str(tmp_path / "if"), source="generated")
    assert sorted(p.name for p in (tmp_path / "if").iterdir()) == sorted(c.class_id for c in classes)
    assert stage.SAMPLES_FILE == "samples.png"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-class run (IPC 2, K 1) with the train stage's results.json: the digest of the very set it trains on
    (the paper protocol: every row), as the train stage computes it."""
    from gdd_ray import pipeline, trainset
    from gdd_ray.config_loader import build_config
    from gdd_ray.train.data import load_shards

    out = tmp_path_factory.mktemp("trained") / "run"
    run_dir, classes = augmented_run(out, "cifar100", 2, 1, 3)
    cfg = build_config({"out": str(out), "dataset": "cifar100", "ipc": 2, "unit_size": 2, "pda_variants": 1,
                        "stages": "train"})  # fmt: skip
    fps, inputs, _ = pipeline.stage_inputs(cfg, classes, run_dir)  # the run's own 3 classes
    run_dir.prepare(cfg, [vars(c) for c in classes], fps, inputs)
    names = shards.read_manifest(run_dir.augmented, fps["augment"]).names
    distilled = load_shards(run_dir.augmented, names, trainset.for_training(cfg), 3)  # what the stage reads
    results = {"fingerprint": fps["train"], "train_set": {"digest": distilled.digest()}}
    run_dir.eval.write_bytes("results.json", json.dumps(results).encode())
    return str(out), distilled.digest()


def test_exports_never_overwrite_in_silence_and_print_their_digest(trained, tmp_path, capsys):
    run, digest = trained

    def export_(*args):
        code = cli_main(["export", "--run", run, *args])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    # pt: the digest of what it wrote is the train stage's; a second export onto it is refused, --overwrite replaces
    dest = str(tmp_path / "d.pt")
    code, out = export_("--format", "pt", "--dest", dest)
    assert code == 0 and f"digest {digest}: the set the train stage trained on" in out
    before = tree_digest(tmp_path)
    code, out = export_("--format", "pt", "--dest", dest)
    assert code == 2 and "exist(s) already; add --overwrite" in out and out.count("\n") == 1
    assert tree_digest(tmp_path) == before  # nothing touched
    (tmp_path / "e_labels.pt").write_bytes(b"mine")  # a companion file alone is refused too
    assert export_("--format", "pt", "--dest", str(tmp_path / "e.pt"))[0] == 2
    code, out = export_("--format", "pt", "--dest", dest, "--per-class", "2", "--pick", "first", "--overwrite")
    assert code == 0 and "NOT the set the train stage trained on" in out and digest in out

    # imagefolder: a second export is refused; --overwrite replaces an earlier export, never a user's files
    folder = str(tmp_path / "if")
    assert export_("--format", "imagefolder", "--dest", folder)[0] == 0
    code, out = export_("--format", "imagefolder", "--dest", folder)
    assert code == 2 and "not empty; add --overwrite" in out
    code, out = export_("--format", "imagefolder", "--dest", folder, "--per-class", "1", "--overwrite")
    assert code == 0 and "replacing an earlier export of 12 PNGs" in out
    assert sum(len(os.listdir(os.path.join(folder, d))) for d in os.listdir(folder)) == 3
    (tmp_path / "if" / "notes.txt").write_text("mine")
    code, out = export_("--format", "imagefolder", "--dest", folder, "--overwrite")
    assert code == 2 and "holds notes.txt, which no export writes" in out
    assert (tmp_path / "if" / "notes.txt").read_text() == "mine"

    # challenge: the submission folder may hold the other dataset's file, nothing else without --overwrite
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "cifar100.pt").write_bytes(b"earlier")
    code, out = export_("--format", "challenge", "--dest", str(sub))
    assert code == 2 and "cifar100.pt exists already; add --overwrite" in out
    (sub / "cifar100.pt").unlink()
    (sub / "notes.txt").write_text("mine")
    code, out = export_("--format", "challenge", "--dest", str(sub))
    assert code == 2 and "holds notes.txt, which is no submission file" in out
    (sub / "notes.txt").unlink()
    (sub / "tinyimagenet.pt").write_bytes(b"the other half")
    code, out = export_("--format", "challenge", "--dest", str(sub))  # past the folder check: the 3-class run's shape
    assert code == 2 and "10 images per class are needed" in out
    assert sorted(os.listdir(sub)) == ["tinyimagenet.pt"]
