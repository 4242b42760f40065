"""The time budget's cost: the IPC a --time-budget run reaches vs what the plain mode's images/s would give.

Same model, classes, unit and batch sizes, same machine, both through the generate stage (in process):
  plain    --ipc N: images/s = images made / seconds from the first unit out to the last one done (start-up
           excluded; the same clock as the budget's, started by a budget it never reaches)
  budget   --time-budget B with --ipc as a high upper bound: the IPC reached, the seconds it used
A throwaway run warms up first. The ideal IPC is plain images/s x B / classes; the budgeted run can reach at most that rounded down to whole
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
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (CPU), sdxl-random or a real model (GPU)")
    p.add_argument("--classes", type=int, default=10, help="first N CIFAR-100 classes")
    p.add_argument("--plain-ipc", type=int, default=40, help="IPC of the plain run that measures images/s")
    p.add_argument("--max-ipc", type=int, default=1000, help="--ipc of the budgeted run (its upper bound)")
    p.add_argument("--budget", default="30s", help="--time-budget of the budgeted run")
    p.add_argument("--gen-resolution", type=int, default=64)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--unit-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = leave as is)")
    p.add_argument("--repeats", type=int, default=2, help="plain/budget pairs, alternated; medians reported")
    p.add_argument("--out", default="bench_results/time_budget.json")
    return p.parse_args(argv)


def config(a, out: str, classes_file: Path, **extra):
    from gdd_ray.config_loader import build_config

    values = dict(
        classes=str(classes_file), out=out, model=a.model, gen_resolution=a.gen_resolution, image_size=a.image_size,
        batch_size=a.batch_size, unit_size=a.unit_size, stages="generate",
    )  # fmt: skip
    return build_config({**values, **extra})


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

    # Warm-up (first calls, allocator, caches) in a throwaway run, so neither timed mode pays it.
    stage.run(pipeline.check(config(a, str(work / "warm-up"), classes_file, ipc=1)), serial=True)
    plains, budgets = [], []
    for r in range(a.repeats):  # alternated, so a busy moment of a shared machine hits both modes alike
        # The plain mode is a fixed IPC; a budget it never reaches only starts the same clock (first unit out).
        cfg = config(a, str(work / f"plain{r}"), classes_file, ipc=a.plain_ipc, time_budget="168h")
        plains.append(stage.run(pipeline.check(cfg), serial=True))
        cfg = config(a, str(work / f"budget{r}"), classes_file, ipc=a.max_ipc, time_budget=a.budget)
        budgets.append(stage.run(pipeline.check(cfg), serial=True))
    rates = [p["totals"]["images_made"] / p["budget_used_s"] for p in plains]
    rate = statistics.median(rates)
    seconds = cfg.generate.time_budget_s
    ideal = rate * seconds / a.classes
    whole_rounds = int(ideal // a.unit_size) * a.unit_size
    reached = statistics.median(b["ipc"] for b in budgets)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "setup": {k: v for k, v in vars(a).items() if k != "out"},
        "plain": {
            "ipc": a.plain_ipc,
            "images": plains[0]["totals"]["images_made"],
            "generation_s": [p["budget_used_s"] for p in plains],
            "images_per_s": [round(x, 3) for x in rates],
            "images_per_s_median": round(rate, 3),
        },
        "budget": {
            "time_budget_s": seconds,
            "budget_used_s": [b["budget_used_s"] for b in budgets],
            "stopped_by_budget": [b["stopped_by_budget"] for b in budgets],
            "ipc_reached": [b["ipc"] for b in budgets],
            "ipc_reached_median": reached,
            "images_per_s_in_budget": [round(b["totals"]["images_made"] / b["budget_used_s"], 3) for b in budgets],
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
