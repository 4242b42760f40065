"""The plan of a run: which images exist, which work unit (= shard) holds each, and every derived seed.

The run's images form a grid, class x index, laid out index-major: position p is image p // C of class p % C
(C classes), so every class's image 0 comes first, then every class's image 1, and so on. A work unit is a
run of --unit-size consecutive positions (a multiple of --batch-size): units span classes, every batch the
model executes is full of kept images, and only the run's last unit may be shorter. Its shard name comes
from the unit alone, so the same run planned on any machine, today or after a crash, names the same files.
The grid's cut depends on C and --unit-size, not on --ipc: IPC k is the first k x C positions, so raising IPC
later keeps every shard already made (but the old last one, when it was short) and a smaller IPC is a
prefix of a larger one.

`plan_run` is the one place that turns --ipc into shards: the pipeline calls it once per run, and
`status` calls it on the config saved in run.json. Every later stage reads its input's manifest.
With --select-by clip the plan generates ceil(--overgenerate x IPC) images per class and the select
stage keeps IPC of them: its output units are `kept`, the same cut of the grid of positions 0..IPC-1 among
the kept images of each class, so downstream stages see the shards an IPC run would have.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gdd_ray.config import RunConfig

SHARD_SUFFIX = ".parquet"
_NAME = re.compile(r"u(\d{10})-(\d{10})\.parquet")
# The layout before packed units (one class per shard, c<label>-i<start>-<stop>): recognised, never written.
_CLASS_UNIT_NAME = re.compile(r"c\d{5}-i\d{6}-\d{6}\.parquet")


@dataclass(frozen=True, order=True)
class WorkUnit:
    start: int  # first position in the grid (inclusive): image start // classes of class start % classes
    stop: int  # last position + 1
    classes: int  # C, the grid's width: the run's number of classes

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def shard_name(self) -> str:
        return f"u{self.start:010d}-{self.stop:010d}{SHARD_SUFFIX}"

    @property
    def key(self) -> str:
        """How a shard's footer names the unit it holds (with the grid's width, which its name leaves out)."""
        return f"{self.start}:{self.stop}:{self.classes}"

    @property
    def round(self) -> int:
        """The image index of its first image: a round is every class's image i (positions i x C ...)."""
        return self.start // self.classes

    def images(self) -> list[tuple[int, int]]:
        """(label, index) of each of its images, in position order."""
        c = self.classes
        return [(p % c, p // c) for p in range(self.start, self.stop)]

    def __str__(self) -> str:
        c = self.classes
        first, last = (self.start % c, self.start // c), ((self.stop - 1) % c, (self.stop - 1) // c)
        return f"{self.start}..{self.stop - 1} (class {first[0]} image {first[1]} to class {last[0]} image {last[1]})"


def is_shard_name(name: str) -> bool:
    """Whether `name` is one of ours (any grid): what a folder holds besides a user's files."""
    return _NAME.fullmatch(name) is not None


def is_class_unit_name(name: str) -> bool:
    """A shard of the earlier layout (one class per unit): a run made before packed units."""
    return _CLASS_UNIT_NAME.fullmatch(name) is not None


def parse_shard_name(name: str, classes: int) -> WorkUnit | None:
    """The unit a shard name stands for in a grid `classes` wide, or None if the name is not one of ours."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    start, stop = int(m.group(1)), int(m.group(2))
    return WorkUnit(start, stop, classes) if start < stop else None


def parse_unit_key(key: str | None) -> WorkUnit | None:
    """The unit a footer's `gdd_ray.unit` names (start:stop:classes), or None."""
    try:
        start, stop, classes = (int(x) for x in str(key).split(":"))
    except (TypeError, ValueError):
        return None
    return WorkUnit(start, stop, classes) if 0 <= start < stop and classes > 0 else None


def plan_units(num_classes: int, ipc: int, unit_size: int) -> list[WorkUnit]:
    """Units in the order to hand them out (position order: early shards cover every class's first images)."""
    total = num_classes * ipc
    return [WorkUnit(s, min(s + unit_size, total), num_classes) for s in range(0, total, unit_size)]


def unit_of(units: list[WorkUnit] | tuple[WorkUnit, ...], position: int) -> tuple[WorkUnit, int]:
    """(the unit holding `position`, its row there) in a plan's units (equal sizes but the last)."""
    size = units[0].size
    unit = units[position // size]
    return unit, position - unit.start


@dataclass(frozen=True)
class Plan:
    """Every unit of a run, in dispatch order."""

    units: tuple[WorkUnit, ...]  # what the generate stage makes
    kept: tuple[WorkUnit, ...] = ()  # what the select stage writes (positions among kept images), when it runs

    @property
    def images(self) -> int:
        return sum(u.size for u in self.units)

    @property
    def names(self) -> list[str]:
        return [u.shard_name for u in self.units]

    def by_name(self) -> dict[str, WorkUnit]:
        return {u.shard_name: u for u in self.units}


def generated_per_class(cfg: RunConfig) -> int:
    """Images generated per class: IPC, or ceil(F x IPC) for the select stage to choose IPC from."""
    if cfg.select.select_by == "none":
        return cfg.ipc
    return math.ceil(round(cfg.ipc * cfg.select.overgenerate, 6))  # 1.1 x 10 is 11, not 11.000000000000002


def plan_run(cfg: RunConfig, num_classes: int) -> Plan:
    units = plan_units(num_classes, generated_per_class(cfg), cfg.generate.unit_size)
    kept = plan_units(num_classes, cfg.ipc, cfg.generate.unit_size) if cfg.select.select_by != "none" else []
    return Plan(tuple(units), tuple(kept))


# The most one stage folder may hold. Each shard is one entry of the in-memory plan, one file to list (1,000
# names a LIST request) and one footer to read at every resume, and one line of the manifest; at 1,000,000
# that is already 1,000 LIST requests and a ~70 MB manifest. 100,000,000 images is 100x ImageNet-1K at IPC
# 1,000: 300 GB of 32 px PNGs, 40 TB at 512 px.
MAX_SHARDS = 1_000_000
MAX_IMAGES = 100_000_000


def check_plan_size(cfg: RunConfig, num_classes: int) -> None:
    """Refuse, before any list is built, a run whose stage folders would exceed MAX_SHARDS or MAX_IMAGES:
    classes x images per class (--ipc, x --overgenerate) and x (1 + --pda-variants) for the augmented set,
    in plain arithmetic (the bounds on each option alone still allow products of 10^13)."""
    from gdd_ray.errors import UserError

    unit = cfg.generate.unit_size
    per_class = generated_per_class(cfg)
    sizes = [("generated", num_classes * per_class, -(-num_classes * per_class // unit))]
    if "augment" in cfg.stages:
        rows = num_classes * cfg.ipc * (cfg.augment.pda_variants + 1)
        sizes.append(("augmented", rows, -(-num_classes * cfg.ipc // unit)))
    for folder, images, shards in sizes:
        if images > MAX_IMAGES or shards > MAX_SHARDS:
            raise UserError(
                f"the plan is too large: {images:,} {folder} images in {shards:,} shards ({num_classes:,} classes "
                f"x {per_class if folder == 'generated' else cfg.ipc:,} per class in units of {unit:,}"
                f"{f', each + {cfg.augment.pda_variants:,} variants' if folder == 'augmented' else ''}); "
                f"a stage holds at most {MAX_IMAGES:,} images in {MAX_SHARDS:,} shards (fewer per class, a "
                "larger --unit-size, or split the classes over several --out)"
            )


# ---- seeds ----------------------------------------------------------------------------------------


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from named parts: the same parts give the same seed on every machine and Python."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def image_seed(run_seed: int, label: int, index: int) -> int:
    """Seed of one image, from (run seed, class, index) only: any worker, any batch, same image."""
    return derive_seed("gdd-ray", run_seed, label, index)


def template_choice(run_seed: int, label: int, index: int, templates: int) -> int:
    """Which of `templates` prompt templates image (label, index) is drawn from: its own derived stream, so
    the choice depends on the image alone (never on batching, unit size or reruns), and 0 with one template."""
    return 0 if templates == 1 else derive_seed("gdd-ray-template", run_seed, label, index) % templates


def variant_seed(image_seed: int, variant: int) -> int:
    """Seed of one augmented variant; variant 0 is the original image and keeps the image's own seed."""
    return int(image_seed) if variant == 0 else derive_seed("gdd-ray-pda", int(image_seed), variant)


def eval_run_seed(eval_seed: int, run: int) -> int:
    """Seed of evaluation run `run` (model init, shuffling, DSA draws all derive from it)."""
    return derive_seed("gdd-ray-eval", eval_seed, run)
