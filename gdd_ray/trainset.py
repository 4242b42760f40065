"""Which rows of a run a consumer takes: the one function the train stage and the exports share, so the
set a run is trained on and the set exported from it are the same rows.

A row is (label, index, variant): image `index` of class `label`, `variant` 0 the original and 1..K its
augmented copies. Two steps:

1. the prefix: rows with index < ipc and variant <= variants. Image seeds depend on (class, index) only and
   variant seeds on (image, variant) only, so a run generated at IPC 20 with K 4 holds, bit for bit, every
   run of a smaller IPC and K: sweeps train their small points on the prefix of one big run.
2. per class, exactly `per_class` rows (the challenge's 10), chosen by `how`:
     originals  distinct generated images first: (variant, index) order, i.e. the originals of images
                0..n-1 when the class has n of them, else every original and then their variants in turn
     first      the first n in (index, variant) order (2 images x 5 variants at K = 4)
     spread     n rows evenly spaced over the class's rows in (index, variant) order

Whatever was chosen comes back class-major and, within a class, in (index, variant) order: the challenge's
layout (label = position // per_class).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import numpy as np

from gdd_ray.config import Pick, RunConfig
from gdd_ray.errors import UserError

CHOICES: tuple[str, ...] = typing.get_args(Pick)
CHALLENGE_IPC = 10  # images per class the ECCV 2024 DD challenge evaluator trains on (its fixed-IPC track)


@dataclass(frozen=True)
class RowChoice:
    ipc: int | None = None  # rows with index < ipc (None: every index)
    variants: int | None = None  # rows with variant <= variants (None: every variant)
    per_class: int | None = None  # then exactly this many rows of each class (None: every row left)
    how: Pick = "originals"

    def describe(self) -> dict[str, typing.Any]:
        return {"index_below": self.ipc, "variant_at_most": self.variants, "per_class": self.per_class, "how": self.how}


def for_training(cfg: RunConfig, how: Pick | None = None) -> RowChoice:
    """The rows the train stage trains on under `cfg` (also what `export --format challenge` writes)."""
    t = cfg.train
    ipc = min(t.train_ipc or cfg.ipc, cfg.ipc)
    variants = cfg.augment.pda_variants if t.train_variants is None else t.train_variants
    per_class = CHALLENGE_IPC if t.protocol == "challenge" else None
    return RowChoice(ipc, variants, per_class, how or t.pick)


def rows_per_class(choice: RowChoice, available_ipc: int, available_variants: int) -> int:
    """How many rows each class offers after the prefix (what a preflight can check without reading)."""
    ipc = available_ipc if choice.ipc is None else min(choice.ipc, available_ipc)
    variants = available_variants if choice.variants is None else min(choice.variants, available_variants)
    return ipc * (variants + 1)


def _pick(order: np.ndarray, index: np.ndarray, variant: np.ndarray, n: int, how: str) -> np.ndarray:
    """n of one class's rows (`order`: its positions sorted by (index, variant))."""
    if how == "first":
        return order[:n]
    if how == "originals":
        by_variant = order[np.lexsort((index[order], variant[order]))]
        return by_variant[:n]
    if how == "spread":
        return order[(np.arange(n) * len(order)) // n]
    raise UserError(f"unknown selection '{how}': choose one of {', '.join(CHOICES)}")


def choose(
    labels: np.ndarray,
    index: np.ndarray,
    variant: np.ndarray,
    choice: RowChoice,
    num_classes: int | None = None,
) -> np.ndarray:
    """Positions of the chosen rows: class-major, (index, variant) order within a class.

    With `num_classes`, every class 0..num_classes-1 must keep a row: a missing class would shift every later
    label of a position-labelled tensor. Every class present must offer `per_class` rows when that is set."""
    labels, index, variant = (np.asarray(a, dtype=np.int64) for a in (labels, index, variant))
    keep = np.ones(len(labels), dtype=bool)
    if choice.ipc is not None:
        keep &= index < choice.ipc
    if choice.variants is not None:
        keep &= variant <= choice.variants
    kept = np.flatnonzero(keep)
    order = kept[np.lexsort((variant[kept], index[kept], labels[kept]))]
    present, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    missing = sorted(set(range(num_classes or 0)) - set(present.tolist()))
    if missing:
        raise UserError(
            f"class(es) {', '.join(map(str, missing[:5]))} have no images{_within(choice)}; every class needs some"
        )
    if choice.per_class is None:
        return order
    short = counts < choice.per_class
    if short.any():
        first = int(np.flatnonzero(short)[0])
        raise UserError(
            f"{choice.per_class} images per class are needed but class {present[first]} has only "
            f"{counts[first]}{_within(choice)} (IPC x (variants + 1)); generate more images or variants"
        )
    picked = []
    for start, count in zip(starts, counts):
        chosen = _pick(order[start : start + count], index, variant, choice.per_class, choice.how)
        picked.append(chosen[np.lexsort((variant[chosen], index[chosen]))])
    return np.concatenate(picked) if picked else order[:0]


def _within(choice: RowChoice) -> str:
    parts = []
    if choice.ipc is not None:
        parts.append(f"index < {choice.ipc}")
    if choice.variants is not None:
        parts.append(f"variant <= {choice.variants}")
    return f" among the rows with {' and '.join(parts)}" if parts else ""
