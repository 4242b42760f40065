"""What the benchmark scripts share: the timing rule (interleaved rounds, best of each) and writing results."""

from __future__ import annotations

import json
import os
import time
from typing import Any


def interleaved_rounds(contenders: dict[str, Any], repeats: int, images: int) -> dict[str, dict[str, Any]]:
    """Time each contender `repeats` times. Rounds interleave the contenders so that they share whatever else
    the machine is doing; the best round of each is reported (the least disturbed), every round kept."""
    times: dict[str, list[float]] = {label: [] for label in contenders}
    for r in range(repeats):
        for label, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
            print(f"[bench] round {r + 1} {label}: {times[label][-1]:.2f} s", flush=True)
    results = {}
    for label, ts in times.items():
        best = min(ts)
        results[label] = {
            "seconds": round(best, 3),
            "images_per_s": round(images / best, 1),
            "rounds_s": [round(t, 3) for t in ts],
        }
        print(f"[bench] {label}: best {best:.2f} s, {images / best:.0f} images/s", flush=True)
    return results


def write_results(out: dict[str, Any], path: str, keep: bool) -> None:
    """The results JSON (a smoke test writes it only when given a path: never over the measured figures)."""
    if keep:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(out, fh, indent=2)
        print(f"[bench] results -> {path}", flush=True)


def start_ray(cpus: int | None) -> bool:
    """A local Ray for the bench, or the one this process already holds (a test's): True when started here,
    so that the bench stops only what it started."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    return True
