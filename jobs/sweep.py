"""Sweeps: a grid of distill configs sharing one generation and one PDA, evaluated by Ray Tune, with a leaderboard.

    python jobs/sweep.py --config sweep.yaml --out runs/sweep
    ray job submit --working-dir . -- python jobs/sweep.py --config sweep.yaml --out s3://bucket/sweep

Rerun the same command to resume. Same as `python -m gdd_ray sweep ...` (see gdd_ray/sweep.py).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def main(argv: list[str] | None = None) -> int:
    from gdd_ray.cli import main as gdd_main

    return gdd_main(["sweep", *(sys.argv[1:] if argv is None else argv)], prog="jobs/sweep.py")


if __name__ == "__main__":
    sys.exit(main())
