"""`python -m gdd_ray <command>` (also the `gdd-ray` console script).

    python -m gdd_ray export --run OUT --format pt --dest distilled.pt --per-class 10
    python -m gdd_ray status OUT

A command is a module with `add_arguments(parser)` and `run_from_args(args) -> int`; add one by naming
it in COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib

from gdd_ray.cli import guarded

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("gdd_ray.export", "write a run's images as a challenge .pt tensor or an ImageFolder tree"),
    "status": ("gdd_ray.status", "per stage: units done/total, images, throughput, failures, complete or not"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gdd_ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(
            name, help=help_text, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(lambda: args._module.run_from_args(args))


if __name__ == "__main__":
    raise SystemExit(main())
