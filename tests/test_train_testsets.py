"""Test sets in their real file formats, and the checks that stop a run before it wastes a cluster."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from gen_helpers import write_generated
from PIL import Image

from gdd_ray import pipeline, storage, synthetic
from gdd_ray.classes import dataset_classes
from gdd_ray.config_loader import build_config
from gdd_ray.errors import UserError
from gdd_ray.run import RunDir
from gdd_ray.train import stage, testsets
from gdd_ray.train.data import check_alignment, load_shards, mean_std

CIFAR10 = [c.class_id for c in dataset_classes("cifar10")]


def _images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_tiny(root, wnids, per_class=2, size=64, words=None):
    """tiny-imagenet-200/{wnids.txt (unsorted, as shipped), words.txt, val/val_annotations.txt, val/images/}."""
    base = os.path.join(root, "tiny-imagenet-200")
    os.makedirs(os.path.join(base, "val", "images"))
    with open(os.path.join(base, "wnids.txt"), "w") as fh:
        fh.write("\n".join(wnids) + "\n")
    with open(os.path.join(base, "words.txt"), "w") as fh:
        for w in wnids:
            fh.write(f"{w}\t{(words or {}).get(w, 'thing ' + w)}, other name\n")
    lines, k = [], 0
    for w in wnids:
        for _ in range(per_class):
            name = f"val_{k}.JPEG"
            Image.fromarray(_images(1, size, k)[0]).save(os.path.join(base, "val", "images", name), quality=95)
            lines.append(f"{name}\t{w}\t0\t0\t{size - 1}\t{size - 1}")
            k += 1
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return base


def test_cifar100_python_folder_roundtrip(tmp_path):
    names = [f"name_{i}" for i in range(100)]
    x, y = _images(50, 32), np.arange(50) % 100
    folder = synthetic.write_cifar(str(tmp_path), x, y, names, kind="cifar100")
    for path in (str(tmp_path), folder):  # the unpacked folder or its parent
        info = testsets.describe(path)
        assert (info.kind, info.num_images, info.image_size, info.class_ids) == ("cifar100", 50, 32, names)
    t = testsets.load(str(tmp_path), 32, mean_std("cifar100"))
    assert np.array_equal(t.images, x) and np.array_equal(t.labels, y)


def test_cifar10_batches_folder(tmp_path):
    x, y = _images(20, 32), np.arange(20) % 10
    synthetic.write_cifar(str(tmp_path), x, y, CIFAR10, kind="cifar10")
    t = testsets.load(str(tmp_path), 32, mean_std("cifar10"))
    assert t.info.kind == "cifar10" and t.info.class_ids == CIFAR10
    assert np.array_equal(t.images, x) and np.array_equal(t.labels, y)


def test_tiny_imagenet_val_labels_follow_sorted_wnids(tmp_path):
    wnids = ["n03", "n01", "n02"]  # wnids.txt is not sorted; labels follow ImageFolder's sorted order
    base = write_tiny(str(tmp_path), wnids, words={"n01": "goldfish"})
    info = testsets.describe(str(tmp_path))
    assert info.kind == "tiny-imagenet" and info.class_ids == ["n01", "n02", "n03"]
    assert info.class_names[0] == "goldfish" and info.image_size == 64
    t = testsets.load(base, 64, mean_std("tiny-imagenet"))
    assert t.labels.tolist() == [2, 2, 0, 0, 1, 1] and t.images.shape == (6, 64, 64, 3)
    with pytest.raises(UserError, match="64px but the shards are 32px"):
        testsets.load(base, 32, mean_std("tiny-imagenet"))


def test_imagenet_style_folder_is_resized_and_centre_cropped(tmp_path):
    for i, w in enumerate(["n01440764", "n01443537"]):
        os.makedirs(tmp_path / "val" / w)
        for j in range(2):
            Image.fromarray(_images(1, 40, i * 2 + j)[0][:30]).save(tmp_path / "val" / w / f"{j}.JPEG")  # 40x30
    info = testsets.describe(str(tmp_path))
    assert info.kind == "folder" and info.class_ids == ["n01440764", "n01443537"]
    assert info.class_names == ["tench", "goldfish"] and info.image_size is None
    t = testsets.load(str(tmp_path), 16, mean_std("imagenet-1k"))
    assert t.images.shape == (4, 16, 16, 3) and t.labels.tolist() == [0, 0, 1, 1]


def test_challenge_pt_uint8_and_normalised(tmp_path):
    x = _images(6, 32)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.save({"images_val": torch.as_tensor(x).permute(0, 3, 1, 2), "labels_val": y}, tmp_path / "a.pt")
    t = testsets.load(str(tmp_path / "a.pt"), 32, mean_std("cifar100"))
    assert t.info.class_ids is None and np.array_equal(t.images, x) and t.labels.tolist() == y.tolist()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std("cifar100"))
    normed = (torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.save({"images_val": normed, "labels_val": y}, tmp_path / "b.pt")
    t = testsets.load(str(tmp_path / "b.pt"), 32, mean_std("cifar100"))
    assert np.abs(t.images.astype(int) - x.astype(int)).max() <= 1


def test_bad_test_sets_say_what_is_wrong(tmp_path):
    with pytest.raises(UserError, match="does not exist.*cifar-100-python.tar.gz"):
        testsets.describe(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a test set this stage reads"):
        testsets.describe(str(tmp_path / "empty"))
    folder = synthetic.write_cifar(str(tmp_path / "c"), _images(4, 32), np.arange(4), [f"n{i}" for i in range(100)])
    data = open(os.path.join(folder, "test"), "rb").read()
    with open(os.path.join(folder, "test"), "wb") as fh:
        fh.write(data[: len(data) // 2])  # a download cut short
    with pytest.raises(UserError, match="test is not a readable CIFAR pickle"):
        testsets.describe(str(tmp_path / "c"))
    with open(os.path.join(folder, "test"), "wb") as fh:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"fine_labels": [0] * 4}, fh)
    with pytest.raises(UserError, match="corrupt"):
        testsets.describe(str(tmp_path / "c"))
    (tmp_path / "x.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a readable torch file"):
        testsets.describe(str(tmp_path / "x.pt"))
    torch.save({"images": torch.zeros(1)}, tmp_path / "y.pt")
    with pytest.raises(UserError, match="'images_val' and 'labels_val'"):
        testsets.describe(str(tmp_path / "y.pt"))


def context(cfg):
    return pipeline.context(cfg)[0]


def _cfg(tmp_path, eval_data, **kw):
    values = dict(dataset="cifar10", ipc=2, out=str(tmp_path / "run"), stages="generate,train", eval_data=eval_data)
    values.update(kw)
    return build_config(values)


def test_preflight_label_alignment_count_and_size(tmp_path):
    shifted = CIFAR10[1:] + CIFAR10[:1]  # the most common silent failure: a class list off by one
    synthetic.write_cifar(str(tmp_path / "shift"), _images(10, 32), np.arange(10), shifted, kind="cifar10")
    cfg = _cfg(tmp_path, str(tmp_path / "shift"))
    with pytest.raises(UserError) as e:
        stage.preflight(context(cfg))
    msg = str(e.value)
    assert "10 of 10 labels" in msg and "label 0: shards 'airplane' vs test set 'automobile'" in msg
    assert "\n" not in msg

    synthetic.write_cifar(str(tmp_path / "c100"), _images(10, 32), np.arange(10), [f"n{i}" for i in range(100)])
    with pytest.raises(UserError, match="has 100 classes but the run has 10"):
        stage.preflight(context(_cfg(tmp_path, str(tmp_path / "c100"))))

    synthetic.write_cifar(str(tmp_path / "ok"), _images(10, 32), np.arange(10), CIFAR10, kind="cifar10")
    stage.preflight(context(_cfg(tmp_path, str(tmp_path / "ok"))))  # passes
    with pytest.raises(UserError, match="32px but the shards are 16px"):
        stage.preflight(context(_cfg(tmp_path, str(tmp_path / "ok"), image_size=16)))
    assert not os.path.exists(cfg.out)  # preflight writes nothing


def test_preflight_needs_shards_when_not_generating(tmp_path):
    cfg = _cfg(tmp_path, None, stages="train")
    with pytest.raises(UserError, match="has no generated shards: run the generate stage first"):
        stage.preflight(context(cfg))
    assert not os.path.exists(cfg.out)


def test_shards_checked_against_the_run_class_list(tmp_path):
    classes = dataset_classes("cifar10")
    x, y = _images(20, 8), np.arange(20) % 10
    reordered = [c.__class__(c.label, CIFAR10[(c.label + 3) % 10], c.name) for c in classes]
    cfg = _cfg(tmp_path, None, image_size=8)
    names = write_generated(cfg, classes, x, y, shard_classes=reordered)
    loc = RunDir(cfg.out).generated
    ds = load_shards(loc, names)
    assert ds.images.shape == (20, 8, 8, 3) and sorted(ds.labels.tolist()) == sorted(y.tolist())
    with pytest.raises(UserError, match="run's class list.*label 0: shards 'cat' vs class list 'airplane'"):
        check_alignment(classes, CIFAR10, "cifar10", ds)
    with pytest.raises(UserError, match="holds no shards to train on"):
        load_shards(storage.Location(str(tmp_path / "none")), [])
