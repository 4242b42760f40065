"""`python -m gdd_ray <command>`: the same commands as the `gdd-ray` console script (see gdd_ray.cli)."""

from gdd_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m gdd_ray"))
