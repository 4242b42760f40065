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
from gdd_ray.digest import set_digest
from gdd_ray.errors import UserError
from gdd_ray.plan import parse_shard_name
from gdd_ray.trainset import RowChoice, choose


def mean_std(dataset: str | None) -> tuple[list[float], list[float]]:
    """The dataset's own statistics; a custom class list gets ImageNet's (natural photographs)."""
    return MEAN_STD.get(dataset or "", MEAN_STD["imagenet-1k"])


@dataclass
class DistilledSet:
    images: np.ndarray  # uint8, N x H x W x 3, class-major, (index, variant) order within a class
    labels: np.ndarray  # int64, N
    class_ids: dict[int, str]  # label -> class_id written in the shards
    class_names: dict[int, str]
    shards: int
    index: np.ndarray | None = None  # int64, N: each image's index within its class
    variant: np.ndarray | None = None  # int64, N: 0 = the generated image, 1..K its augmented copies
    prompts: dict[int, str] | None = None  # label -> the prompt its images were drawn from

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def per_class(self) -> list[int]:
        """Images of each class, in label order."""
        return np.bincount(self.labels, minlength=len(self.class_ids)).tolist()

    def digest(self) -> str:
        """Hash of exactly what is trained on (pixels, labels, order): the same set gives the same digest."""
        return set_digest(self.labels, self.images)  # the rule an export's digest follows too


def load_shards(
    loc: storage.Location, names: list[str], choice: RowChoice | None = None, num_classes: int | None = None
) -> DistilledSet:
    """The images of shards `names` (a stage's manifest lists them) that `choice` keeps, decoded, with their
    labels, class-major. Shards wholly past the choice's IPC are not read."""
    if not names:
        raise UserError(f"{loc.uri} holds no shards to train on: run the generate stage first")
    choice = choice or RowChoice()
    if choice.ipc is not None:
        if num_classes:  # a shard whose first image is past the IPC holds none of the rows asked for
            names = [n for n in names if (u := parse_shard_name(n, num_classes)) is None or u.round < choice.ipc]
    columns = ["label", "class_id", "class_name", "prompt", "index", "variant"]
    table = shards.read_shards(loc, names, columns=[*columns, "image"])
    labels = np.asarray(table.column("label").to_numpy(), dtype=np.int64)
    index = np.asarray(table.column("index").to_numpy(), dtype=np.int64)
    variant = np.asarray(table.column("variant").to_numpy(), dtype=np.int64)
    keep = choose(labels, index, variant, choice, num_classes)
    table = table.take(keep)
    labels, index, variant = labels[keep], index[keep], variant[keep]
    ids, cnames = table.column("class_id").to_pylist(), table.column("class_name").to_pylist()
    prompts_col = table.column("prompt").to_pylist()
    class_ids: dict[int, str] = {}
    class_names: dict[int, str] = {}
    prompts: dict[int, str] = {}
    for lab, cid, cname, prompt in zip(labels.tolist(), ids, cnames, prompts_col):
        if class_ids.setdefault(lab, cid) != cid:
            raise UserError(f"{loc.uri}: label {lab} is written for two classes ('{class_ids[lab]}', '{cid}')")
        class_names.setdefault(lab, cname)
        prompts.setdefault(lab, prompt)
    pngs = shards.png_bytes(table)
    # PNG decoding releases the GIL; a few threads make 50k small images a matter of seconds.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        arrays = list(pool.map(shards.decode_png, pngs))
    sizes = sorted({a.shape for a in arrays})
    if len(sizes) != 1 or sizes[0][0] != sizes[0][1]:
        raise UserError(f"{loc.uri}: shard images have mixed or non-square sizes {sizes[:3]}; regenerate them")
    return DistilledSet(np.stack(arrays), labels, class_ids, class_names, len(names), index, variant, prompts)


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
