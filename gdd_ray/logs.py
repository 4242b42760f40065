"""What a run prints: one `[stage] ...` line format, one progress line for every stage, quiet libraries.

    [generate] 40/200 units, 400/2000 images, 96.3 img/s, ETA 00:00:16, 2 workers

Lines go to stdout with a flush, so `ray job logs` and a terminal show them as they happen.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field


def say(stage: str, text: str) -> None:
    # sys.stdout.write, not print(): inside Ray Train workers print() is patched to tee into a logger
    # and every line would show twice.
    sys.stdout.write(f"[{stage}] {text}\n")
    sys.stdout.flush()


def quiet_libraries() -> None:
    """Progress bars and load chatter from diffusers/transformers/Ray Data drown the job log."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Progress:
    """A live status line: units done/total, images, images/s and ETA, at most every `interval_s`."""

    stage: str
    total_units: int
    total_images: int
    unit_name: str = "units"
    interval_s: float = 5.0
    done_units: int = 0
    done_images: int = 0
    t0: float = field(default_factory=time.perf_counter)
    _last: float = 0.0

    def add(self, units: int, images: int, workers: int | None = None) -> None:
        self.done_units += units
        self.done_images += images
        self.maybe_print(workers=workers)

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.done_images / dt if dt > 0 else 0.0

    def line(self, workers: int | None = None) -> str:
        rate = self.rate()
        left = self.total_images - self.done_images
        eta = time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate > 0 else "--:--:--"
        w = f", {workers} workers" if workers is not None else ""
        return (
            f"{self.done_units}/{self.total_units} {self.unit_name}, {self.done_images}/{self.total_images} images, "
            f"{rate:.1f} img/s, ETA {eta}{w}"
        )

    def maybe_print(self, force: bool = False, workers: int | None = None) -> None:
        now = time.perf_counter()
        if force or now - self._last >= self.interval_s or self.done_units == self.total_units:
            self._last = now
            say(self.stage, self.line(workers))
