"""The time budget's cost: the IPC a --time-budget run reaches vs what the plain mode's images/s would give.

Same model, classes, unit and batch sizes, same machine, both through the generate stage (in process):
  plain    --ipc N, no budget: images/s = images made / generation seconds (render + encode, start-up excluded)
  budget   --time-budget B with --ipc as a high upper bound: the IPC reached, the seconds it used
The ideal IPC is plain images/s x B / classes; the budgeted run can reach at most that rounded down to whole
rounds (multiples of --unit-size), and it stops one round early when the next would not fit. The JSON keeps
both, and the overhead = 1 - reached / ideal.

CPU (the tiny model; one torch thread stands in for one GPU):
    python jobs/bench_time_budget.py --out bench_results/time_budget.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (CPU), sdxl-random or a real model (GPU)")
    p.add_argument("--classes", type=int, default=10, help="first N CIFAR-100 classes")
    p.add_argument("--plain-ipc", type=int, default=8, help="IPC of the plain run that measures images/s")
    p.add_argument("--max-ipc", type=int, default=1000, help="--ipc of the budgeted run (its upper bound)")
    p.add_argument("--budget", default="30s", help="--time-budget of the budgeted run")
    p.add_argument("--gen-resolution", type=int, default=64)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--unit-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = leave as is)")
    p.add_argument("--out", default="bench_results/time_budget.json")
    return p.parse_args(argv)


def config(a, out: str, classes_file: Path, **extra):
    from gdd_ray.config_loader import build_config

    values = dict(
        classes=str(classes_file), out=out, model=a.model, gen_resolution=a.gen_resolution, image_size=a.image_size,
        batch_size=a.batch_size, unit_size=a.unit_size, stages="generate",
    )  # fmt: skip
    return build_config({**values, **extra})


def generation_seconds(summary: dict) -> float:
    """Render + encode time of the in-process run (sequential there): the generation, start-up excluded."""
    return sum(w["render_s"] + w["encode_s"] for w in summary["per_worker"].values())


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    from gdd_ray import pipeline
    from gdd_ray.classes import dataset_classes
    from gdd_ray.generate import stage

    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_budget_"))
    classes_file = work / "classes.txt"
    classes_file.write_text("".join(f"{c.class_id}\n" for c in dataset_classes("cifar100")[: a.classes]))

    plain = stage.run(pipeline.check(config(a, str(work / "plain"), classes_file, ipc=a.plain_ipc)), serial=True)
    plain_s = generation_seconds(plain)
    rate = plain["totals"]["images_made"] / plain_s

    t0 = time.perf_counter()
    cfg = config(a, str(work / "budget"), classes_file, ipc=a.max_ipc, time_budget=a.budget)
    budgeted = stage.run(pipeline.check(cfg), serial=True)
    wall = time.perf_counter() - t0
    seconds = cfg.generate.time_budget_s
    ideal = rate * seconds / a.classes
    whole_rounds = int(ideal // a.unit_size) * a.unit_size
    reached = budgeted["ipc_reached"]
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "setup": {k: v for k, v in vars(a).items() if k != "out"},
        "plain": {
            "ipc": a.plain_ipc,
            "images": plain["totals"]["images_made"],
            "generation_s": round(plain_s, 3),
            "images_per_s": round(rate, 3),
        },
        "budget": {
            "time_budget_s": seconds,
            "budget_used_s": budgeted["budget_used_s"],
            "stopped_by_budget": budgeted["stopped_by_budget"],
            "ipc_reached": reached,
            "images": budgeted["totals"]["images"],
            "images_made": budgeted["totals"]["images_made"],
            "images_per_s_in_budget": round(budgeted["totals"]["images_made"] / budgeted["budget_used_s"], 3),
            "wall_s_with_startup": round(wall, 3),
        },
        "ideal_ipc": round(ideal, 2),  # plain images/s x budget / classes
        "ideal_ipc_whole_rounds": whole_rounds,  # the best a run that stops evenly can do at this unit size
        "overhead_vs_ideal": round(1 - reached / ideal, 4) if ideal else None,
        "overhead_vs_whole_rounds": round(1 - reached / whole_rounds, 4) if whole_rounds else None,
    }
    print(json.dumps({k: result[k] for k in ("plain", "budget", "ideal_ipc", "ideal_ipc_whole_rounds")}, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("->", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
