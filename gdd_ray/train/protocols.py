"""What one evaluation trains: its cells (training set x network x labels), where each keeps its runs, and
the key that says when a finished run can be reused.

    distilled   the distilled set (every network of --eval-nets, every label mode of --labels)
    random      a random real subset of --real-train-data with the distilled set's images per class, drawn
                per run from derive_seed("gdd-ray-random-real", eval seed, run): the same subset for run r
                of every network, label mode, rerun and sweep point of that seed
    full        the whole real training set, hard labels (HLR is a hard-label score), with --eval-full-data

Where a cell's runs live (each as runs/runNN.json, metrics/runNN.jsonl, checkpoints/runNN.pt, as before):

    OUT/eval/                             the first cell (the first network, the first label mode): as today
    OUT/eval/cells/<net>-<labels>/        every other distilled cell
    BASELINES/<data>-<net>-<labels>-<key>/  random and full cells; BASELINES = --baselines-dir, else
                                          OUT/eval/baselines. The key hashes everything that decides them
                                          (never the distilled set), so runs and sweep points share them.

Distilled cells carry the train stage's fingerprint; a baseline cell its key, recorded in its cell.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gdd_ray import storage
from gdd_ray.classes import ClassInfo
from gdd_ray.config import RunConfig, TrainConfig, net_key
from gdd_ray.fingerprints import digest
from gdd_ray.plan import derive_seed

BASELINE_VERSION = 1  # bumped when the code changes what a baseline computes for the same key


@dataclass(frozen=True)
class Cell:
    data: str  # distilled | random | full
    net: str  # a config.NETS key
    labels: str  # hard | soft

    @property
    def name(self) -> str:
        return f"{self.data}-{self.net}-{self.labels}"


def cells(t: TrainConfig) -> list[Cell]:
    """Every cell of the evaluation, the headline one first."""
    nets = [net_key(n) for n in t.eval_nets]
    out = [Cell("distilled", n, lab) for n in nets for lab in t.label_modes]
    if t.real_train_data:
        out += [Cell("random", n, lab) for n in nets for lab in t.label_modes]
        if t.eval_full_data:
            out += [Cell("full", n, "hard") for n in nets]
    return out


def protocol_values(t: TrainConfig, cell: Cell, teacher_digest: str | None) -> dict[str, Any]:
    """The training options that decide a run of `cell` (its network's, its labels')."""
    values: dict[str, Any] = {
        "eval_seed": t.eval_seed,
        "train_batch_size": t.train_batch_size,
        "dsa_strategy": t.dsa_strategy,
    }
    if cell.net.startswith("convnet"):
        values.update(net_depth=t.net_depth, net_width=t.net_width, net_act=t.net_act, net_pool=t.net_pool)
        values["net_norm"] = "batch" if cell.net.endswith("-bn") else t.net_norm
    if cell.labels == "soft":
        values.update(
            soft_epochs=t.soft_epochs, soft_lr=t.soft_lr, soft_weight_decay=t.soft_weight_decay,
            temperature=t.temperature, teacher=teacher_digest,
        )  # fmt: skip
    else:
        values.update(protocol=t.protocol, epochs=t.epochs, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return values


def baseline_key(
    cfg: RunConfig, classes: list[ClassInfo], cell: Cell, per_class: list[int], teacher_digest: str | None
) -> tuple[str, dict[str, Any]]:
    """(key, what it hashes) of a random or full cell: nothing of the distilled set but its images per class."""
    t = cfg.train
    inputs = {
        "version": BASELINE_VERSION,
        "cell": cell.name,
        "real_train_data": t.real_train_data,
        "eval_data": t.eval_data,
        "image_size": cfg.image_size,
        "dataset": cfg.dataset,  # the normalisation
        "classes": [c.class_id for c in classes],
        "protocol": protocol_values(t, cell, teacher_digest),
    }
    if cell.data == "random":
        inputs["per_class"] = per_class
    return digest(inputs), inputs


def baselines_root(cfg: RunConfig, eval_loc: storage.Location) -> storage.Location:
    t = cfg.train
    return storage.Location(t.baselines_dir) if t.baselines_dir else eval_loc.child("baselines")


def location(cfg: RunConfig, eval_loc: storage.Location, cell: Cell, first: Cell, key: str) -> storage.Location:
    if cell == first:
        return eval_loc
    if cell.data == "distilled":
        return eval_loc.child("cells").child(f"{cell.net}-{cell.labels}")
    return baselines_root(cfg, eval_loc).child(f"{cell.name}-{key}")


# ---- the random real subsets ---------------------------------------------------------------------------


def subset_seed(eval_seed: int, run: int) -> int:
    return derive_seed("gdd-ray-random-real", eval_seed, run)


def random_subset(labels: np.ndarray, per_class: list[int], seed: int) -> np.ndarray:
    """Row numbers of per_class[c] images of each class c, in (class, row) order: each class's rows ranked by
    derive_seed(seed, row), the first taken. Machine- and numpy-independent; a smaller IPC's subset is a
    prefix of a larger one's."""
    rows = []
    for c, k in enumerate(per_class):
        candidates = np.flatnonzero(labels == c)
        if len(candidates) < k:
            raise ValueError(f"class {c} has {len(candidates)} real training images, fewer than the {k} asked for")
        ranked = sorted(candidates.tolist(), key=lambda i: derive_seed(seed, i))
        rows.append(np.sort(np.asarray(ranked[:k], dtype=np.int64)))
    return np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)


def rows_digest(rows: np.ndarray) -> str:
    return digest(np.asarray(rows, dtype=np.int64).tolist())


def file_digest(path: str) -> str:
    """Hash of a file's bytes (the teacher: soft-label results depend on its weights, not on its path)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
