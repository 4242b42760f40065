"""Stand-in data for tests, benchmarks and offline demos: no diffusion model, no dataset download.

- `write_generated` writes a run's generated shards exactly as the generate stage does (same plan, names,
  seeds, columns, footers, manifest), from patterned pictures or from given images, so the later stages
  and the exports cannot tell them from real ones.
- `patterns`/`sample` make a small separable image set (each class a fixed random low-frequency pattern
  plus noise: a ConvNet separates them in a few epochs even under DSA); `write_cifar` writes it as CIFAR's
  python pickles, byte-compatible with the real test sets.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from gdd_ray import shards
from gdd_ray.classes import ClassInfo
from gdd_ray.config import RunConfig
from gdd_ray.plan import generated_per_class, image_seed, plan_run
from gdd_ray.run import RunDir


def pattern_image(seed: int, size: int) -> np.ndarray:
    """An asymmetric picture (gradient, a bar, a disc) so that flips and rotations are visible."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    base = rng.uniform(0, 255, 3).astype(np.float32)
    img = np.stack([base[c] * (0.3 + 0.7 * (xx if c == 0 else yy if c == 1 else 1 - xx)) for c in range(3)], -1)
    bar = slice(size // 8, size // 8 + max(1, size // 8))
    img[bar, : size * 3 // 4] = rng.uniform(0, 255, 3)
    cy, cx, r = rng.uniform(0.4, 0.8), rng.uniform(0.2, 0.6), rng.uniform(0.1, 0.2)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return img.clip(0, 255).astype(np.uint8)


def write_generated(
    cfg: RunConfig,
    classes: list[ClassInfo],
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    shard_classes: list[ClassInfo] | None = None,
    *,
    fingerprint: str,
) -> list[str]:
    """Every shard of the run's plan under OUT/generated, then its manifest; returns the shard names.

    Pixels: `pattern_image(seed)` per image, or image i of class c is the i-th of `images` labelled c.
    `shard_classes` writes other class ids/names into the shards (to test label-alignment checks);
    `fingerprint`: the generate stage's (pipeline.generation_fingerprint; another one to test refusals)."""
    fp = fingerprint
    plan = plan_run(cfg, len(classes))
    loc = RunDir(cfg.out).generated
    size = cfg.image_size if images is None else images.shape[1]
    by_class = {c.label: np.flatnonzero(labels == c.label) for c in classes} if labels is not None else {}
    specs = []
    for unit in plan.units:
        infos = [(shard_classes or classes)[label] for label, _ in unit.images()]
        seeds = [image_seed(cfg.seed, label, i) for label, i in unit.images()]
        if images is None:
            pixels = [pattern_image(s, size) for s in seeds]
        else:
            pixels = [images[by_class[label][i]] for label, i in unit.images()]
        prompts = [c.prompt(cfg.generate.prompt_template) for c in infos]
        table = shards.generated_table(
            unit, [c.class_id for c in infos], [c.name for c in infos], prompts, seeds,
            [shards.encode_png(p) for p in pixels],
        )  # fmt: skip
        shards.write_shard(loc, unit.shard_name, table, shards.generated_footer(unit, fp, size))
        specs.append(shards.generated_spec(unit, fp))
    shards.write_manifest(loc, "generate", fp, specs, generated_per_class(cfg), loc.sizes(shards.SHARD_SUFFIX))
    return plan.names


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


def write_cifar(
    root: str, images: np.ndarray, labels: np.ndarray, names: list[str], kind: str = "cifar100", split: str = "test"
) -> str:
    """A CIFAR python-version test set (`cifar-100-python/{test,meta}` or `cifar-10-batches-py/...`), or with
    split="train" its training set (`train`, or CIFAR-10's `data_batch_1..5`, the images dealt over 5 batches)
    next to it; returns the folder."""
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
    if split == "train" and kind == "cifar100":
        test[b"batch_label"], test_name = b"training batch 1 of 1", "train"
    if split == "train" and kind != "cifar100":
        for b, part in enumerate(np.array_split(np.arange(len(images)), 5), 1):
            batch = {k: ([v[i] for i in part] if isinstance(v, list) else v) for k, v in test.items()}
            batch[b"data"], batch[b"batch_label"] = data[part], f"training batch {b} of 5".encode()
            with open(os.path.join(folder, f"data_batch_{b}"), "wb") as fh:
                pickle.dump(batch, fh, protocol=2)
    else:
        with open(os.path.join(folder, test_name), "wb") as fh:
            pickle.dump(test, fh, protocol=2)
    with open(os.path.join(folder, meta_name), "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return folder
