"""The distilled set as arrays (decoded once), its normalisation, and the label-alignment check.

A distilled set is small (IPC x classes images), so each Ray Train worker holds all of it in device
memory; this module reads the shards once on the driver, which puts the arrays in the object store.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from gdd_ray import shards, storage
from gdd_ray.classes import MEAN_STD, ClassInfo
from gdd_ray.errors import UserError


def mean_std(dataset: str | None) -> tuple[list[float], list[float]]:
    """The dataset's own statistics; a custom class list gets ImageNet's (natural photographs)."""
    return MEAN_STD.get(dataset or "", MEAN_STD["imagenet-1k"])


@dataclass
class DistilledSet:
    images: np.ndarray  # uint8, N x H x W x 3
    labels: np.ndarray  # int64, N
    class_ids: dict[int, str]  # label -> class_id written in the shards
    class_names: dict[int, str]
    shards: int

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])


def load_shards(loc: storage.Location, names: list[str]) -> DistilledSet:
    """The images of shards `names` (a stage's manifest lists them), decoded, with their labels."""
    if not names:
        raise UserError(f"{loc.uri} holds no shards to train on: run the generate stage first")
    table = shards.read_shards(loc, names, columns=["image", "label", "class_id", "class_name"])
    labels = np.asarray(table.column("label").to_numpy(), dtype=np.int64)
    ids, cnames = table.column("class_id").to_pylist(), table.column("class_name").to_pylist()
    class_ids: dict[int, str] = {}
    class_names: dict[int, str] = {}
    for lab, cid, cname in zip(labels.tolist(), ids, cnames):
        if class_ids.setdefault(lab, cid) != cid:
            raise UserError(f"{loc.uri}: label {lab} is written for two classes ('{class_ids[lab]}', '{cid}')")
        class_names.setdefault(lab, cname)
    pngs = shards.png_bytes(table)
    # PNG decoding releases the GIL; a few threads make 50k small images a matter of seconds.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        arrays = list(pool.map(shards.decode_png, pngs))
    sizes = sorted({a.shape for a in arrays})
    if len(sizes) != 1 or sizes[0][0] != sizes[0][1]:
        raise UserError(f"{loc.uri}: shard images have mixed or non-square sizes {sizes[:3]}; regenerate them")
    return DistilledSet(np.stack(arrays), labels, class_ids, class_names, len(names))


def _norm(s: str) -> str:
    return s.strip().lower().replace(" ", "_")


def alignment_problems(ours: list[tuple[int, str]], theirs: list[str], what: str, short: str) -> str | None:
    """A one-line message showing the first labels whose class differs from the test set's, or None."""
    bad = [(lab, cid, theirs[lab] if lab < len(theirs) else None) for lab, cid in ours]
    bad = [(lab, a, b) for lab, a, b in bad if b is None or _norm(a) != _norm(b)]
    if not bad:
        return None
    shown = "; ".join(f"label {lab}: shards '{a}' vs {short} '{b}'" for lab, a, b in bad[:5])
    return (
        f"label alignment: {len(bad)} of {len(ours)} labels name another class than the {what} "
        f"(a shifted or reordered class list trains at chance accuracy): {shown}"
    )


def check_alignment(
    classes: list[ClassInfo], test_ids: list[str] | None, test_what: str, distilled: DistilledSet | None = None
) -> None:
    """Stop on any label whose class differs between the shards (or the run's class list) and the test set."""
    if distilled is not None:
        run_ids = [c.class_id for c in classes]
        msg = alignment_problems(sorted(distilled.class_ids.items()), run_ids, "run's class list", "class list")
        if msg:
            raise UserError(msg)
        missing = sorted(set(range(len(classes))) - set(distilled.class_ids))
        if missing:
            raise UserError(
                f"the shards hold no images of {len(missing)} classes (labels {missing[:5]}...); finish the generate stage"
            )
    if test_ids is None:
        return
    if len(test_ids) != len(classes):
        raise UserError(
            f"the test set ({test_what}) has {len(test_ids)} classes but the run has {len(classes)}; "
            "evaluate on the test set of the dataset you distilled"
        )
    ours = [(c.label, c.class_id) for c in classes]
    if distilled is not None:
        ours = sorted(distilled.class_ids.items())
    msg = alignment_problems(ours, test_ids, f"test set ({test_what})", "test set")
    if msg:
        raise UserError(msg)
