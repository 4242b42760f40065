"""Unpack wheels into a folder for PYTHONPATH, without pip or a network: how jobs/gpu_bench.sh brings diffusers
(and requests, which it imports) to a GPU image that has neither.

    python jobs/unpack_wheels.py .whl /tmp/site      # then PYTHONPATH=/tmp/site:...

A wheel is a zip file; a pure-Python one (every wheel listed in docs/gpu.md) works once its files are on the
path. A wheel whose top-level packages this Python can already import is left out, so the image's own copies
(say its requests) are never shadowed by another version. Standard library only: it runs before anything else.
"""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path


def top_level(whl: zipfile.ZipFile) -> list[str]:
    """The importable names a wheel installs (its top_level.txt, else the first parts of its paths)."""
    for name in whl.namelist():
        if name.endswith(".dist-info/top_level.txt"):
            names = whl.read(name).decode().split()
            if names:
                return names
    roots = set()
    for name in whl.namelist():
        first = name.split("/")[0]
        if not first.endswith((".dist-info", ".data")):
            roots.add(first[:-3] if first.endswith(".py") else first)
    return sorted(r for r in roots if r.isidentifier())


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def unpack(folder: Path, target: Path) -> list[str]:
    """Extract every wheel of `folder` whose packages are not importable here into `target`; returns what was
    unpacked. A wheel's `<name>.data/purelib|platlib/` files go to the top, as an installer puts them."""
    target.mkdir(parents=True, exist_ok=True)
    done = []
    for path in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(path) as whl:
            names = top_level(whl)
            if names and all(importable(n) for n in names):
                print(f"[wheels] {path.name}: left out, {', '.join(names)} already importable here", flush=True)
                continue
            for member in whl.infolist():
                parts = member.filename.split("/")
                if len(parts) > 2 and parts[0].endswith(".data") and parts[1] in ("purelib", "platlib"):
                    member.filename = "/".join(parts[2:])
                elif parts[0].endswith(".data"):
                    continue  # scripts and headers: nothing an import needs
                whl.extract(member, target)
        done.append(path.name)
        print(f"[wheels] {path.name}: unpacked", flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python jobs/unpack_wheels.py WHEEL_FOLDER TARGET_FOLDER", file=sys.stderr)
        return 2
    unpack(Path(args[0]), Path(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
