"""A small separable image set in the real file formats, for tests, the benchmark and offline demos.

Each class is a fixed random low-frequency RGB pattern; an image is its class's pattern plus noise, so a
ConvNet separates the classes in a few epochs even under DSA (which changes colour and geometry but not
which pattern it is). Written as our own Parquet shards (the train set) and as CIFAR's python pickles
(the test set), byte-compatible with the files the stage reads in real use.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from gdd_ray import storage
from gdd_ray.classes import ClassInfo
from gdd_ray.generate import shards
from gdd_ray.generate.plan import WorkUnit


def patterns(num_classes: int, size: int, seed: int = 0) -> np.ndarray:
    """num_classes x size x size x 3 float patterns in [0, 1]: 4x4 random colour grids, smoothly upsampled."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
    fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return fine.permute(0, 2, 3, 1).numpy()


def sample(pats: np.ndarray, per_class: int, seed: int, noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x H x W x 3 images and int64 labels, per_class of each class, class-major order."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(pats)), per_class)
    x = pats[labels] + rng.normal(0.0, noise, size=(len(labels), *pats.shape[1:]))
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.int64)


def write_shards(
    loc: storage.Location, classes: list[ClassInfo], images: np.ndarray, labels: np.ndarray, unit_size: int = 10
) -> int:
    """Write images as generated-format shards (one per class and index range); returns the shard count."""
    n = 0
    for c in classes:
        idx = np.flatnonzero(labels == c.label)
        for start in range(0, len(idx), unit_size):
            part = idx[start : start + unit_size]
            unit = WorkUnit(c.label, start, start + len(part))
            rows = shards.ShardRows(unit, c.class_id, c.name, c.name, [int(i) for i in part])
            table = shards.build_table(rows, [shards.encode_png(images[i]) for i in part])
            shards.write_shard(loc, unit, table, "synthetic", images.shape[1])
            n += 1
    return n


def write_cifar(root: str, images: np.ndarray, labels: np.ndarray, names: list[str], kind: str = "cifar100") -> str:
    """A CIFAR python-version test set (`cifar-100-python/{test,meta}` or `cifar-10-batches-py/...`); returns it."""
    folder = os.path.join(root, "cifar-100-python" if kind == "cifar100" else "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # rows of R plane, G plane, B plane
    filenames = [f"img_{i:05d}.png".encode() for i in range(len(images))]
    if kind == "cifar100":
        test = {b"filenames": filenames, b"batch_label": b"testing batch 1 of 1", b"fine_labels": labels.tolist()}
        test[b"coarse_labels"] = [0] * len(labels)
        test[b"data"] = data
        meta = {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"all"]}
        test_name, meta_name = "test", "meta"
    else:
        test = {b"batch_label": b"testing batch 1 of 1", b"labels": labels.tolist(), b"data": data}
        test[b"filenames"] = filenames
        meta = {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": 10000, b"num_vis": 3072}
        test_name, meta_name = "test_batch", "batches.meta"
    with open(os.path.join(folder, test_name), "wb") as fh:
        pickle.dump(test, fh, protocol=2)
    with open(os.path.join(folder, meta_name), "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return folder
