"""Export a run's images: the DD challenge .pt tensor or an ImageFolder tree of PNGs.

    # challenge format, fixed-IPC track (10 per class), normalised with the run's dataset mean/std
    python jobs/export.py --run /tmp/gdd-demo --format pt --dest /tmp/gdd-demo/export/distilled.pt --per-class 10
    # every augmented image as class folders of PNGs
    python jobs/export.py --run /tmp/gdd-demo --format imagefolder --dest /tmp/gdd-demo/export/imagefolder

Same as `python -m gdd_ray export ...`; see gdd_ray/export.py for the formats.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def main(argv: list[str] | None = None) -> int:
    from gdd_ray.cli import main as gdd_main

    return gdd_main(["export", *(sys.argv[1:] if argv is None else argv)], prog="jobs/export.py")


if __name__ == "__main__":
    sys.exit(main())
