"""Shared entry-point plumbing: parse, run, and turn user errors into one line and an exit code."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from gdd_ray.errors import UserError


def quiet_libraries() -> None:
    """Progress bars and load chatter from diffusers/transformers drown the job log."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def guarded(fn: Callable[[], int | None]) -> int:
    """Run fn; a UserError becomes 'error: <message>' on stderr and exit code 2, with no traceback."""
    try:
        return fn() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr, flush=True)
        return 130


def run_main(argv: list[str] | None, doc: str | None = None) -> int:
    quiet_libraries()

    def go() -> int:
        from gdd_ray import pipeline
        from gdd_ray.config import config_from_args

        cfg = config_from_args(argv, prog="distill.py", doc=doc)
        pipeline.run(cfg)
        return 0

    return guarded(go)
