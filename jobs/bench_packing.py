"""Render cost per kept image at IPC 1: units of one class each (each padded to a batch) against packed units.

Same images (the run's seeds), same model, same generator: the one-class layout is the generator asked for one
class's image at a time, which pads it to a full batch exactly as the old per-class unit of an IPC-1 run did.
Measured: device render seconds and images executed, per kept image.

    python jobs/bench_packing.py                                    # CIFAR-100, tiny model, 128 px
    python jobs/bench_packing.py --dataset cifar10 --resolution 64
    python jobs/bench_packing.py --smoke-test                       # seconds: checks the plumbing
Results: bench_results/packing.json (a smoke test writes only where --results says).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from jobs.bench_common import write_results  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar100", help="whose classes (their number sets the grid)")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call, as --batch-size")
    p.add_argument("--unit-size", type=int, default=64, help="images per packed unit, as --unit-size")
    p.add_argument("--resolution", type=int, default=128, help="--gen-resolution of the tiny model")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one = one worker's share of a node)")
    p.add_argument("--results", default="bench_results/packing.json", help="where the JSON goes")
    p.add_argument("--smoke-test", action="store_true", help="10 classes at IPC 1, 32 px: the plumbing only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke_test:
        args.dataset, args.resolution = "cifar10", 32
    import tempfile

    import torch

    from gdd_ray.classes import load_classes

    torch.set_num_threads(args.threads)
    classes = load_classes(args.dataset, None)
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as work:  # the generator's run folder, removed after
        return _bench(args, classes, work)


def _bench(args, classes, work: str) -> int:
    import torch

    from gdd_ray.config_loader import build_config
    from gdd_ray.generate.generator import UnitGenerator
    from gdd_ray.generate.model import load_pipeline
    from gdd_ray.generate.stage import make_job
    from gdd_ray.plan import WorkUnit, plan_units

    c = len(classes)
    cfg = build_config({
        "dataset": args.dataset, "ipc": 1, "out": work, "model": "tiny", "gen_resolution": args.resolution,
        "image_size": 32, "batch_size": args.batch_size, "unit_size": args.unit_size, "stages": "generate",
    })  # fmt: skip
    pipe = load_pipeline("tiny", device="cpu")
    gen = UnitGenerator(make_job(cfg, classes, "bench", work), pipeline=pipe)
    gen.load()
    gen.render(WorkUnit(0, min(args.batch_size, c), c))  # warm-up batch, excluded (first-call allocations)
    layouts = {  # one class per unit: class L's one image (position L) rendered alone, padded to a batch
        "one class per unit": [WorkUnit(label, label + 1, c) for label in range(c)],
        "packed": plan_units(c, 1, args.unit_size),
    }
    out = {"dataset": args.dataset, "classes": c, "ipc": 1, "kept": c,
           "batch_size": args.batch_size, "unit_size": args.unit_size, "resolution": args.resolution,
           "threads": args.threads, "machine": platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "layouts": {}}  # fmt: skip
    pixels = {}
    for name, units in layouts.items():
        executed, seconds, images = 0, 0.0, {}
        for unit in units:
            t = time.perf_counter()
            rendered = gen.render(unit)
            seconds += time.perf_counter() - t
            executed += rendered.executed
            images.update(zip(unit.images(), rendered.pixels))
        pixels[name] = images
        kept = len(images)
        out["layouts"][name] = {
            "render_s": round(seconds, 3), "images_executed": executed, "images_kept": kept,
            "render_s_per_kept_image": round(seconds / kept, 4), "executed_per_kept": round(executed / kept, 3),
        }  # fmt: skip
        print(f"[bench] {name}: {kept} images kept, {executed} executed, {seconds:.1f} s render", flush=True)
    old, new = (out["layouts"][k]["render_s_per_kept_image"] for k in ("one class per unit", "packed"))
    out["speedup_per_kept_image"] = round(old / new, 2)
    import numpy as np

    a, b = pixels["one class per unit"], pixels["packed"]
    out["max_pixel_difference"] = int(max(np.abs(a[k].astype(int) - b[k].astype(int)).max() for k in a))
    print(f"[bench] packed: {out['speedup_per_kept_image']}x less render time per kept image; "
          f"pixels differ by at most {out['max_pixel_difference']} level(s) (batch rounding)", flush=True)  # fmt: skip
    write_results(out, args.results, keep=not args.smoke_test or args.results != parse_args([]).results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
