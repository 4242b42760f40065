"""Sweeps: a grid of run configs, the work they share done once, the evaluations run by Ray Tune.

    python jobs/sweep.py --config sweep.yaml --out ROOT          (also: python -m gdd_ray sweep ...)

sweep.yaml:
    base: {dataset: cifar100, eval-data: data/cifar-100-python, epochs: 300}   # any distill option
    grid: {ipc: [10, 20], pda-variants: [0, 4], eval-seed: [0, 1]}           # option -> values

What is shared: image seeds depend on (class, index) only and variant seeds on (image, variant) only, so the
points that differ only in IPC, --pda-variants or training options read ONE generation at the largest IPC and
ONE PDA at the largest K (ROOT/data/<group>/, a normal run), each point training on its prefix (--train-ipc,
--train-variants). Points that differ in pixels (model, steps, template, seed, ...) form their own group with
its own generation. Everything is a resumable run: rerunning the sweep skips every finished stage and
evaluation (fingerprints), and the Tune experiment of the same grid is restored.

    ROOT/data/<group>/           generated/ + augmented/ at the group's largest IPC and K
    ROOT/points/<point>/         run.json (stage_dirs: the group's folders), eval/, report.html
    ROOT/tune-<grid hash>/       Ray Tune's experiment (one trial per point)
    ROOT/leaderboard.csv, .md    one row per point: its values, accuracy mean +- std, images per class trained,
                                 generation GPU-seconds and images/s of its group
    ROOT/report.html             the leaderboard (sortable, linking each point's report.html) and the plots
    ROOT/accuracy_vs_ipc.png     one line per --pda-variants;  ROOT/accuracy_vs_cost.png: the compute frontier
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import os
import re
from typing import Any

from gdd_ray import storage
from gdd_ray.config_loader import build_config, load_yaml, options
from gdd_ray.errors import UserError
from gdd_ray.logs import say
from gdd_ray.report_page.run_page import generation_cost
from gdd_ray.report_page.sweep_page import write_sweep_page
from gdd_ray.run import RunDir

# Options that do not change a group's pixels: a smaller value is a prefix of the group's run, or it only
# decides training. Every other option in the grid gives the points their own generation.
PREFIX_KEYS = ("ipc", "pda_variants")
LEADERBOARD = "leaderboard"


def _key(name: str) -> str:
    return str(name).replace("-", "_")


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _slug(key: str, value: Any) -> str:
    text = re.sub(r"[^A-Za-z0-9.]+", "", str(value))
    if text != str(value) or len(text) > 16:
        text = text[:8] + _short_hash(value)[:6]
    return f"{key.replace('_', '')}{text}"


def load_sweep(path: str) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    data = load_yaml(path)
    base = {_key(k): v for k, v in (data.get("base") or {}).items()}
    grid = {_key(k): v for k, v in (data.get("grid") or {}).items()}
    unknown = sorted(set(data) - {"base", "grid"})
    if unknown:
        raise UserError(f"{path}: unknown section(s) {', '.join(unknown)}; a sweep file holds base: and grid:")
    if not grid or any(not isinstance(v, list) or not v for v in grid.values()):
        raise UserError(f"{path}: grid: must map each option to a non-empty list of values")
    for reserved in ("out", "stages", "train_ipc", "train_variants"):
        if reserved in base or reserved in grid:
            raise UserError(f"{path}: '{reserved}' is set by the sweep itself")
    return base, grid


def plan_sweep(base: dict[str, Any], grid: dict[str, list[Any]], root: str) -> list[dict[str, Any]]:
    """Every point: its grid values, its group's data run and its own run (values for build_config)."""
    train_keys = {o.name for o in options() if o.section == "train"}
    default = {o.name: o.default for o in options()}
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        pixels = {k: v for k, v in p.items() if k not in PREFIX_KEYS and k not in train_keys}
        groups.setdefault(_short_hash({**base, **pixels}), []).append(p)
    planned = []
    for gid, members in groups.items():
        values = [{**base, **p} for p in members]
        top_ipc = max(int(v.get("ipc", default["ipc"])) for v in values)
        top_k = max(int(v.get("pda_variants", default["pda_variants"])) for v in values)
        pixels = {k: v for k, v in values[0].items() if k not in PREFIX_KEYS and k not in train_keys}
        data_out = storage.join(root, "data", gid)
        data = {**pixels, "ipc": top_ipc, "pda_variants": top_k, "out": data_out, "stages": "generate,augment"}
        for p, v in zip(members, values):
            name = "-".join(_slug(k, p[k]) for k in grid)
            run = {
                **v,
                "ipc": top_ipc,
                "pda_variants": top_k,
                "train_ipc": int(v.get("ipc", default["ipc"])),
                "train_variants": int(v.get("pda_variants", default["pda_variants"])),
                "out": storage.join(root, "points", name),
                "stages": "train",
            }
            stage_dirs = {
                "generate": storage.join(data_out, "generated"),
                "augment": storage.join(data_out, "augmented"),
            }
            planned.append(
                {"name": name, "values": p, "group": gid, "data": data, "run": run, "stage_dirs": stage_dirs}
            )
    return planned


def _evaluate(config: dict[str, Any]) -> None:
    """One Tune trial: the point's train stage (skipped when its results exist with the same fingerprint)."""
    from ray import tune

    point = config["point"]
    cfg = build_config(point["run"])
    from gdd_ray import pipeline  # the stages (torch, Ray Data...) load where a run needs them, not for --help

    res = pipeline.run(cfg, RunDir(cfg.out, point["stage_dirs"]))["train"]
    tune.report({"accuracy_mean": res.get("accuracy_mean") or 0.0, "accuracy_std": res.get("accuracy_std") or 0.0})


def run_evaluations(planned: list[dict[str, Any]], root: str, concurrent: int) -> None:
    from ray import tune

    name = f"tune-{_short_hash([p['run'] for p in planned])}"
    # A token share of a CPU: the trial only drives; its train stage asks Ray Train for the workers that compute.
    trainable = tune.with_resources(_evaluate, {"cpu": 0.01})
    path = os.path.join(os.path.abspath(root), name)
    if tune.Tuner.can_restore(path):
        say("sweep", f"resuming the Tune experiment {path}")
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search(planned)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=name, storage_path=os.path.abspath(root), verbose=0),
        )
    results = tuner.fit()
    errors = [str(e).splitlines()[0] for e in results.errors]
    if errors:
        raise UserError(f"{len(errors)} evaluation(s) failed; rerun the sweep to resume. First: {errors[0]}")


def leaderboard_rows(planned: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for p in planned:
        res = _read_json(storage.Location(p["run"]["out"]).child("eval"), "results.json") or {}
        gen = _read_json(storage.Location(p["stage_dirs"]["generate"]), "_summary.json")
        cost = generation_cost(gen)
        classes = (res.get("train_set") or {}).get("classes") or 0
        gpu_s = cost["gpu_s_per_image"] * p["run"]["train_ipc"] * classes if cost["gpu_s_per_image"] else None
        rows.append({
            "point": p["name"], **p["values"],
            "protocol": (res.get("protocol") or {}).get("name"),
            "accuracy_mean": res.get("accuracy_mean"), "accuracy_std": res.get("accuracy_std"),
            "runs": len(res.get("accuracies") or []),
            "images_per_class": (res.get("train_set") or {}).get("images_per_class"),
            "generation_gpu_s": round(gpu_s, 3) if gpu_s is not None else None,
            "generation_images_per_s": cost["images_per_s"],
        })  # fmt: skip
    return sorted(rows, key=lambda r: -(r["accuracy_mean"] if r["accuracy_mean"] is not None else -1.0))


def write_leaderboard(root: str, rows: list[dict[str, Any]]) -> None:
    loc = storage.Location(root)
    fields = list(rows[0]) if rows else ["point"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    loc.write_bytes(f"{LEADERBOARD}.csv", buf.getvalue().encode())

    def cell(r: dict[str, Any], f: str) -> str:
        if f == "accuracy_mean":
            m, s = r["accuracy_mean"], r["accuracy_std"]
            return "—" if m is None else f"{100 * m:.2f} ± {100 * (s or 0):.2f} %"
        return "" if r[f] is None else str(r[f])

    shown = [f for f in fields if f != "accuracy_std"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(r, f) for f in shown) + " |" for r in rows]
    loc.write_bytes(f"{LEADERBOARD}.md", ("\n".join(lines) + "\n").encode())


def _read_json(loc: storage.Location, name: str) -> dict[str, Any] | None:
    try:
        return json.loads(loc.read_bytes(name)) if loc.exists(name) else None
    except (OSError, ValueError):
        return None


def sweep(path: str, root: str, concurrent: int = 1) -> list[dict[str, Any]]:
    """Run (or resume) the sweep of `path` under `root`; returns the leaderboard rows."""
    from gdd_ray import pipeline
    from gdd_ray.ray_utils import held_ray, init_ray

    base, grid = load_sweep(path)
    planned = plan_sweep(base, grid, root)
    for p in planned:  # every config is checked before any work: a bad value is one line
        build_config(p["data"])
        build_config(p["run"])
    groups = {p["group"]: p["data"] for p in planned}
    say("sweep", f"{len(planned)} points, {len(groups)} generation(s) -> {root}")
    with held_ray():  # one Ray for the generations and Tune's evaluations, shut down once (if ours)
        init_ray()
        for data in groups.values():
            pipeline.run(build_config(data))
        run_evaluations(planned, root, concurrent)
        rows = leaderboard_rows(planned)
        write_leaderboard(root, rows)
        write_sweep_page(root, rows, f"gdd-ray sweep: {len(rows)} points over {', '.join(grid)}")
    say("sweep", f"done: {storage.join(root, LEADERBOARD + '.md')}")
    return rows


# ---- command line (python -m gdd_ray sweep, jobs/sweep.py) --------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="The sweep YAML: base: {option: value}, grid: {option: [values]}.")
    p.add_argument("--out", required=True, help="The sweep's root folder (local path or s3://...).")
    p.add_argument("--concurrent", type=int, default=1, help="Evaluations at once (Tune trials); default 1.")


def run_from_args(args: argparse.Namespace) -> int:
    if args.concurrent < 1:
        raise UserError(f"--concurrent must be at least 1, got {args.concurrent}")
    out = args.out if "://" in args.out else os.path.abspath(args.out)
    rows = sweep(args.config, out, args.concurrent)
    print(storage.Location(out).read_bytes(f"{LEADERBOARD}.md").decode(), end="")
    return 0 if rows else 1
