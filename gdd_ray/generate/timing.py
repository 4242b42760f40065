"""Device time per phase of a batch, without syncing inside the loop.

On a GPU each `mark` records a CUDA event on the current stream; the durations are read once, at the end
(`totals`), so timing does not change what it measures. On a CPU work is synchronous and a mark is the
wall clock. A phase's time is from the previous mark to its own; the gap from a batch's last mark to the
next batch's first ('idle') is time the device waited for the host.
"""

from __future__ import annotations

import time


class PhaseClock:
    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list[tuple[str, object]] = []

    def mark(self, phase: str) -> None:
        """The end of `phase` (the first mark of a batch is 'start': what precedes it counts as idle)."""
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((phase, event))
        else:
            self.marks.append((phase, time.perf_counter()))

    def reset(self) -> None:
        self.marks.clear()

    def _seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a

    def totals(self) -> dict[str, float]:
        """Seconds per phase over every mark so far, 'idle' included, and 'span' from first to last mark."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for (_, a), (phase, b) in zip(self.marks, self.marks[1:]):
            key = "idle" if phase == "start" else phase
            out[key] = out.get(key, 0.0) + self._seconds(a, b)
        if self.marks:
            out["span"] = self._seconds(self.marks[0][1], self.marks[-1][1])
        return out
