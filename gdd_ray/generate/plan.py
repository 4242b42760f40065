"""Work units: which images exist, which shard holds each, and the seed of every image.

A unit is (class, index range); its shard name is derived from it alone, so the same run planned on
any machine, today or after a crash, names the same files. The unit grid depends on --unit-size but
not on --ipc: raising IPC later adds units and keeps every shard already made.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SHARD_SUFFIX = ".parquet"


@dataclass(frozen=True, order=True)
class WorkUnit:
    label: int
    start: int  # first image index within the class (inclusive)
    stop: int  # last image index + 1

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def shard_name(self) -> str:
        return f"c{self.label:05d}-i{self.start:06d}-{self.stop:06d}{SHARD_SUFFIX}"

    def __str__(self) -> str:
        return f"class {self.label} images {self.start}..{self.stop - 1}"


def parse_shard_name(name: str) -> WorkUnit | None:
    """The unit a shard name stands for, or None if the name is not one of ours."""
    if not (name.startswith("c") and name.endswith(SHARD_SUFFIX)):
        return None
    try:
        label, rng = name[1 : -len(SHARD_SUFFIX)].split("-i", 1)
        start, stop = rng.split("-")
        unit = WorkUnit(int(label), int(start), int(stop))
    except ValueError:
        return None
    return unit if unit.shard_name == name else None


def plan_units(num_classes: int, ipc: int, unit_size: int) -> list[WorkUnit]:
    """Units in the order to hand them out: index range major, so early shards cover every class."""
    units = []
    for start in range(0, ipc, unit_size):
        for label in range(num_classes):
            units.append(WorkUnit(label, start, min(start + unit_size, ipc)))
    return units


def image_seed(run_seed: int, label: int, index: int) -> int:
    """Seed of one image, from (run seed, class, index) only: any worker, any batch, same image."""
    digest = hashlib.blake2b(f"gdd-ray:{run_seed}:{label}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
