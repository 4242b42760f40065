"""The time budget of a generation (--time-budget): when to stop handing out units, and the IPC reached.

Units go out in position order (plan.plan_units: the grid is index-major, every class's image 0 first), so a
"round" is the units whose first image has one index (WorkUnit.round); when they are done, with every
round before, every class has that many images (a unit that runs into the next round brings some of it). A round is started only while what is still
owed (the units out, the rest of the round being dispatched) plus the whole next round fits in the time
left, estimated from the images/s measured so far in this invocation (all workers together). The first
round of an invocation always goes out (nothing is measured yet); the next one waits until a unit has
finished, so every decision rests on a measurement.

The clock starts with the first unit handed out: model load, prompt encoding and compile are not
counted, as the challenge counted generation only. `clock` is module-level so tests can drive it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from gdd_ray.plan import WorkUnit

clock = time.monotonic  # tests replace it with a fake


def budgeted(summary: dict | None, generate_fp: str) -> bool:
    """Whether a generate summary is of this generation (`generate_fp`) run under a time budget, so its
    `ipc_reached` says how far every class got."""
    return bool(summary) and summary.get("fingerprint") == generate_fp and "time_budget_s" in summary


class TimeBudget:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.t0: float | None = None
        self.images_done = 0
        self.round_start = -1  # the latest round (WorkUnit.round) handed out
        self.stopped = False  # a round was refused: the run ends short of its plan

    def now(self) -> float:
        return clock()

    @property
    def used_s(self) -> float:
        return 0.0 if self.t0 is None else self.now() - self.t0

    def finished(self, images: int) -> None:
        self.images_done += images

    def may_start(self, unit: WorkUnit, outstanding_images: int, round_images: int) -> bool | None:
        """Whether `unit` may go out now: True; False = stop (the budget is spent, drop the rest); None = not
        yet known (no unit has finished to measure by: wait). `outstanding_images`: handed out, not finished,
        plus what is left of the current round; `round_images`: the round `unit` starts."""
        if self.t0 is None:
            self.t0 = self.now()
        if unit.round <= self.round_start:  # within a round already started (or a retry): always
            return True
        if self.stopped:
            return False
        if self.round_start >= 0:  # a new round after the first of this invocation
            if self.images_done == 0:
                return None
            rate = self.images_done / max(self.used_s, 1e-9)
            if self.used_s + (outstanding_images + round_images) / rate > self.seconds:
                self.stopped = True
                return False
        self.round_start = unit.round
        return True

    def allows(self, queue: Sequence[WorkUnit], in_flight_images: int) -> bool | None:
        """may_start for the unit at the head of `queue` (the units not handed out, in dispatch order)."""
        unit = queue[0]
        if unit.round > self.round_start:  # the sums only when a round would start
            owed = in_flight_images + round_images(queue, self.round_start)
            return self.may_start(unit, owed, round_images(queue, unit.round))
        return self.may_start(unit, 0, 0)

    def describe(self) -> dict:
        return {
            "time_budget_s": self.seconds,
            "budget_used_s": round(self.used_s, 3),
            "stopped_by_budget": self.stopped,
        }


def round_images(units: Iterable[WorkUnit], round_: int) -> int:
    """Images of the units of round `round_` among `units`."""
    return sum(u.size for u in units if u.round == round_)


def ipc_reached(units: Iterable[WorkUnit], done: set[str]) -> int:
    """The largest IPC complete for every class: the images before the first unit (in position order) that is
    not in `done` (shard names), in whole rounds. `units`: the plan."""
    end, classes = 0, 1
    for u in sorted(units):
        if u.shard_name not in done:
            break
        end, classes = u.stop, u.classes
    return end // classes
