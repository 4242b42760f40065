"""Every command, one entry point family: `python -m gdd_ray <command>`, the `gdd-ray` console script and
the thin `jobs/*.py` wrappers (for `ray job submit`) all land in `main`.

    python -m gdd_ray distill --dataset cifar100 --ipc 20 --out runs/c100
    python -m gdd_ray status runs/c100
    python -m gdd_ray export --run runs/c100 --format pt --dest distilled.pt --per-class 10
    python -m gdd_ray compare runs/c100 runs/c100-k0          (text table + compare.html)

A command is a module with `add_arguments(parser)` and `run_from_args(args) -> int`. User errors end as one
line `error: ...` on stderr with exit code 2; anything else is a bug: its traceback goes to stderr (the job
log), then one summary line `internal error: ...` last, and the exit code is 1. Ctrl-C and SIGTERM (`ray job
stop`, Kubernetes) end in one line `interrupted...`, exit 130 and 143.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from collections.abc import Callable

from gdd_ray.errors import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    Terminated,
    UserError,
    sigterm_received,
    stop_on_sigterm,
)
from gdd_ray.logs import quiet_libraries

DISTILL_DOC = """Generative dataset distillation: class names -> SDXL-Turbo images -> PDA -> ConvNet accuracy.

Run the same command again to resume: finished shards are kept, missing or broken ones redone."""


class DistillCommand:
    """`distill`: the main job (generate -> augment -> train); flags and YAML keys come from the config."""

    __doc__ = DISTILL_DOC

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        from gdd_ray.config_loader import add_arguments

        add_arguments(parser)

    @staticmethod
    def run_from_args(args: argparse.Namespace) -> int:
        from gdd_ray import schema
        from gdd_ray.config_loader import build_config

        schema.check_environment()
        values = {k: v for k, v in vars(args).items() if k not in ("config", "command", "_command")}
        cfg = build_config(values, args.config)  # a bad flag is one line before torch or Ray is imported
        from gdd_ray import pipeline

        if cfg.track == "none":
            pipeline.run(cfg)
            return 0
        from gdd_ray import tracking

        tracking.check_available()
        try:
            pipeline.run(cfg)
        except UserError:
            raise  # refused before it ran: nothing to log
        except BaseException:
            tracking.track_run(cfg.out, cfg.track_uri, cfg.track_experiment, failed=True)  # what exists so far
            raise
        tracking.track_run(cfg.out, cfg.track_uri, cfg.track_experiment)
        return 0


def _commands() -> dict[str, tuple[object, str]]:
    from gdd_ray import challenge, compare, export, status, sweep

    return {
        "distill": (
            DistillCommand,
            "run the pipeline: generate, augment, train (resumable; same flags as jobs/distill.py)",
        ),
        "status": (status, "per stage: units done/total, images, throughput, failures, complete or not"),
        "export": (export, "write a run's images as a challenge .pt tensor or an ImageFolder tree"),
        "sweep": (sweep, "a grid of runs sharing generation and PDA, evaluated by Ray Tune, with a leaderboard"),
        "score": (challenge, "the ECCV 2024 challenge's combined score of a CIFAR-100 and a Tiny-ImageNet run"),
        "compare": (compare, "two or more runs side by side: config, accuracy and delta, classes, digests, cost"),
    }


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (`error: ...`, exit 2) like every other user error."""

    def error(self, message: str):
        print(f"error: {self.prog}: {one_line(message)} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)


def build_parser(prog: str = "gdd-ray") -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (command, help_text) in _commands().items():
        p = sub.add_parser(
            name, help=help_text, description=command.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        command.add_arguments(p)
        p.set_defaults(_command=command)
    return parser


def one_line(text: str, limit: int = 2000) -> str:
    """A message as one line: a user error's text may quote what the user gave (newlines included)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def guarded(fn: Callable[[], int | None]) -> int:
    """Run fn. A UserError becomes 'error: <message>' on stderr and exit code 2, with no traceback; any other
    exception is a bug: its traceback (the job log keeps it), then 'internal error: ...' last, exit code 1."""
    try:
        code = fn() or 0
        if sigterm_received():  # its Terminated was caught on the way (a library's broad except): say so all the same
            raise Terminated()
        return code
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except (KeyboardInterrupt, SystemExit) as e:
        # SystemExit(15): SIGTERM while ray.init runs, whose own handler is sys.exit(15) (ours is back after it)
        if isinstance(e, SystemExit) and e.code != signal.SIGTERM:
            raise
        terminated = not isinstance(e, KeyboardInterrupt) or isinstance(e, Terminated) or sigterm_received()
        why = " (SIGTERM)" if terminated else ""
        print(f"interrupted{why}: run the same command again to resume", file=sys.stderr, flush=True)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        summary = one_line(f"{type(e).__name__}: {e}", 500)
        print(
            f"internal error: {summary} (a bug in gdd-ray, not in your input; the traceback is above)",
            file=sys.stderr,
            flush=True,
        )
        return 1


def main(argv: list[str] | None = None, prog: str = "gdd-ray") -> int:
    stop_on_sigterm()  # SIGTERM ends a command like Ctrl-C: one line, exit 143 (errors.Terminated)
    quiet_libraries()
    args = build_parser(prog).parse_args(argv)
    return guarded(lambda: args._command.run_from_args(args))
