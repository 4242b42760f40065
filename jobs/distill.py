"""Generative dataset distillation: class names -> SDXL-Turbo images -> PDA -> ConvNet accuracy.

On a Ray cluster (one generator actor per GPU):
    ray job submit --working-dir . -- python jobs/distill.py --dataset cifar100 --ipc 20 --out s3://bucket/c100
On one machine (starts a local Ray):
    python jobs/distill.py --dataset cifar100 --ipc 20 --out runs/c100
Tiny offline run on a CPU (random-weight model, images are noise; what `make demo` runs):
    python jobs/distill.py --dataset cifar10 --ipc 4 --model tiny --gen-resolution 64 --out runs/demo

Run the same command again to resume: finished shards are kept, missing or broken ones redone.
Same as `python -m gdd_ray distill ...` and `gdd-ray distill ...`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def main(argv: list[str] | None = None) -> int:
    from gdd_ray.cli import main as gdd_main

    return gdd_main(["distill", *(sys.argv[1:] if argv is None else argv)], prog="jobs/distill.py")


if __name__ == "__main__":
    sys.exit(main())
