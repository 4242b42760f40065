"""Sweeps: a grid of run configs, the work they share done once, the evaluations run by Ray Tune.

    python jobs/sweep.py --config sweep.yaml --out ROOT          (also: python -m gdd_ray sweep ...)

sweep.yaml:
    base: {dataset: cifar100, eval-data: data/cifar-100-python, epochs: 300}   # any distill option
    grid: {ipc: [10, 20], pda-variants: [0, 4], eval-seed: [0, 1]}           # option -> values

What is shared: image seeds depend on (class, index) only and variant seeds on (image, variant) only, so the
points that differ only in IPC, --pda-variants or training options (protocol, eval seed, epochs, ...) read ONE
generation at the largest IPC and ONE PDA at the largest K, each point training on its prefix (--train-ipc,
--train-variants). Generations are keyed by the generate stage's fingerprint: points that differ in pixels
(model, steps, prompt template, seed, ...) get their own, and points whose pixels agree share one whatever else
differs. PDAs are keyed by the augment stage's fingerprint: points that differ only in --pda-ops get their own
PDA over the same generation. Networks (eval-nets), labels and baselines (real-train-data, eval-full-data) are
training options, so axes like any other; the baselines of points of one protocol are trained once. Everything is a resumable run: rerunning the sweep skips every finished stage and
evaluation (fingerprints), and the Tune experiment of the same grid is restored.

    ROOT/data/<generate fp>/              generated/ at the largest IPC of the points that read it
    ROOT/data/<generate fp>/pda-<augment fp>/   augmented/ at the largest K of the points that read it
    ROOT/points/<point>/         run.json (stage_dirs: the shared folders; sweep_point: root, name, values),
                                 eval/, report.html: a run of its own, whose page and status speak of the point
    ROOT/baselines/              random-real and full-data evaluations (--real-train-data), keyed by what decides
                                 them, shared by every point of the same protocol and computed once, first
    ROOT/tune-<grid hash>/       Ray Tune's experiment (one trial per point)
    ROOT/leaderboard.csv, .md    one row per point: its values, accuracy mean +- std (to 0.01 %), images per class
                                 trained, render GPU-seconds of its images, images per render-second, the
                                 shared generation's wall time, and whether it is at the challenge's settings
    ROOT/report.html             the leaderboard (sortable, linking each point's report.html) and the plots
    ROOT/accuracy_vs_ipc.png     one line per --pda-variants, +-1 std error bars;  ROOT/accuracy_vs_cost.png:
                                 every point labelled, the frontier of the non-dominated ones

Before any image is generated, every point is checked as the whole run it stands for (preflight_points): a
grid with a point that cannot run is refused in one line naming it. `--track mlflow` logs the sweep as a
parent MLflow run with one child per point (gdd_ray.tracking).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
from typing import Any

from gdd_ray import schema, storage
from gdd_ray.config_loader import build_config, load_yaml, options
from gdd_ray.errors import UserError
from gdd_ray.logs import say
from gdd_ray.report_page.run_page import generation_cost, generation_share
from gdd_ray.report_page.sweep_page import PERCENT_COLUMNS, write_sweep_page
from gdd_ray.run import RunDir

LEADERBOARD = "leaderboard"
MAX_POINTS = 1000  # each point is a training run (and a Tune trial): more is a typo or a job for several sweeps


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
    unknown = sorted(map(str, set(data) - {"base", "grid"}))
    if unknown:
        raise UserError(f"{path}: unknown section(s) {', '.join(unknown)}; a sweep file holds base: and grid:")
    for section in ("base", "grid"):
        if not isinstance(data.get(section) or {}, dict):
            raise UserError(f"{path}: {section}: must be a mapping of option: value, got {schema.shown(data[section])}")
    base = {_key(k): v for k, v in (data.get("base") or {}).items()}
    grid = {_key(k): v for k, v in (data.get("grid") or {}).items()}
    if not grid or any(not isinstance(v, list) or not v for v in grid.values()):
        raise UserError(f"{path}: grid: must map each option to a non-empty list of values")
    points = math.prod(len(v) for v in grid.values())  # before any point exists: 40 x 40 x 40 is 645 bytes of YAML
    if points > MAX_POINTS:
        raise UserError(
            f"{path}: the grid has {points:,} points; at most {MAX_POINTS:,} (split it into several sweeps)"
        )
    for reserved in ("out", "stages", "train_ipc", "train_variants", "baselines_dir"):
        if reserved in base or reserved in grid:
            raise UserError(f"{path}: '{reserved}' is set by the sweep itself")
    for reserved in ("track", "track_uri", "track_experiment"):
        if reserved in base or reserved in grid:
            raise UserError(f"{path}: '{reserved}' is an option of the sweep command (--{reserved.replace('_', '-')})")
    return base, grid


def plan_sweep(base: dict[str, Any], grid: dict[str, list[Any]], root: str) -> list[dict[str, Any]]:
    """Every point: its grid values, the generation and the PDA it reads (runs shared with other points,
    keyed by their stage fingerprints) and its own training run (values for build_config)."""
    sections = {o.name: o.section for o in options()}
    default = {o.name: o.default for o in options()}
    points = [{**base, **dict(zip(grid, combo))} for combo in itertools.product(*grid.values())]
    if any(str(v.get("select_by", "none")) != "none" for v in points):
        raise UserError("a sweep cannot use --select-by clip yet: the IPC kept is not a prefix of a larger IPC's")

    def count(v: dict[str, Any], key: str) -> int:
        return int(v.get(key, default[key]))

    def pixels(v: dict[str, Any]) -> dict[str, Any]:  # everything but what only training reads
        return {k: x for k, x in v.items() if sections.get(k) != "train"}

    # Group by the stages' own fingerprints: IPC is in neither, and K is fixed here to the grid's largest, so
    # points whose generation (or PDA recipe) is the same share it whatever their IPC (or K) or training.
    k_all = max(1, *(count(v, "pda_variants") for v in points))
    probe = storage.join(root, "data", "_plan")
    keys = [_fingerprints({**pixels(v), "pda_variants": k_all, "out": probe}) for v in points]
    gen_members: dict[str, list[int]] = {}
    pda_members: dict[str, list[int]] = {}
    for i, fps in enumerate(keys):
        gen_members.setdefault(fps["generate"], []).append(i)
        pda_members.setdefault(fps["augment"], []).append(i)

    generations: dict[str, dict[str, Any]] = {}
    for gfp, members in gen_members.items():  # the first member's values: one config per shared folder
        top_ipc = max(count(points[i], "ipc") for i in members)
        gen_out = storage.join(root, "data", gfp)
        generations[gfp] = {**pixels(points[members[0]]), "ipc": top_ipc, "out": gen_out, "stages": "generate"}

    planned: list[dict[str, Any]] = []
    for members in pda_members.values():
        gfp = keys[members[0]]["generate"]
        generation = {k: v for k, v in generations[gfp].items() if k not in ("out", "stages")}
        augment_values = {k: v for k, v in points[members[0]].items() if sections.get(k) == "augment"}
        data = {**generation, **augment_values, "pda_variants": max(count(points[i], "pda_variants") for i in members)}
        afp = _fingerprints({**data, "out": probe})["augment"]
        stage_dirs = {"generate": storage.join(generations[gfp]["out"], "generated")}
        aug_out = storage.join(generations[gfp]["out"], f"pda-{afp}")
        augmentation = {**data, "out": aug_out, "stages": "augment", "stage_dirs": dict(stage_dirs)}
        stage_dirs["augment"] = storage.join(aug_out, "augmented")
        for i in members:
            values = {k: points[i][k] for k in grid}
            name = "-".join(_slug(k, values[k]) for k in grid)
            run = {
                **data,
                **{k: v for k, v in points[i].items() if sections.get(k) == "train"},
                "train_ipc": count(points[i], "ipc"),
                "train_variants": count(points[i], "pda_variants"),
                "out": storage.join(root, "points", name),
                "stages": "train",
                # Random-real and full-data results are keyed by what decides them: one folder for every point.
                "baselines_dir": storage.join(root, "baselines"),
            }
            planned.append({
                "index": i, "name": name, "values": values, "group": gfp, "pda": afp,
                "generation": generations[gfp], "augmentation": augmentation, "run": run, "stage_dirs": stage_dirs,
            })  # fmt: skip
    return sorted(planned, key=lambda p: p["index"])  # grid order: Tune's trials, the leaderboard's ties


def _fingerprints(values: dict[str, Any]) -> dict[str, str]:
    """The generate and augment stages' fingerprints for a data config, as the run itself computes them."""
    from gdd_ray import pipeline  # the stage modules: loaded where a sweep is planned, not for --help
    from gdd_ray.classes import load_classes

    cfg = build_config({**values, "stages": "generate,augment"})
    fps, _, _ = pipeline.stage_inputs(cfg, load_classes(cfg.dataset, cfg.classes), RunDir(cfg.out))
    return fps


def point_identity(point: dict[str, Any], root: str) -> dict[str, Any]:
    """What a point's run.json says of it (`sweep_point`): its sweep, name and grid values."""
    return {"sweep": root, "name": point["name"], "values": point["values"]}


def point_run_dir(point: dict[str, Any], root: str) -> RunDir:
    return RunDir(point["run"]["out"], point["stage_dirs"], point_identity(point, root))


def preflight_points(planned: list[dict[str, Any]], root: str) -> None:
    """Every point's checks as the whole run it stands for (generate, augment and train: model, recipe,
    network, test set, image size, label alignment, its own folder), before anything is generated: a grid with
    a point that cannot run is refused in one line naming that point."""
    from gdd_ray import pipeline  # the stage modules: loaded where a sweep runs, not for --help

    for p in planned:
        try:
            cfg = build_config({**p["run"], "stages": "generate,augment,train"})
            pipeline.checked_context(cfg, point_run_dir(p, root))
        except UserError as e:
            raise UserError(
                f"sweep point {p['name']} ({json.dumps(p['values'])}) cannot run: {e}; nothing was generated"
            ) from e


def _evaluate(config: dict[str, Any]) -> None:
    """One Tune trial: the point's train stage (skipped when its results exist with the same fingerprint),
    trained in this process on the GPU or CPU the trial holds (`trial_resources`)."""
    import ray
    import torch
    from ray import tune

    point = config["point"]
    cfg = build_config(point["run"])
    from gdd_ray import pipeline  # the stages (torch, Ray Data...) load where a run needs them, not for --help
    from gdd_ray.train.worker import training_here

    root = point["run"]["out"][: -len(f"/points/{point['name']}")]  # the sweep's root, as plan_sweep named it
    with training_here(torch.device("cuda" if ray.get_gpu_ids() else "cpu")):
        res = pipeline.run(cfg, point_run_dir(point, root))["train"]
    tune.report({"accuracy_mean": res.get("accuracy_mean") or 0.0, "accuracy_std": res.get("accuracy_std") or 0.0})


def baseline_keys(cfg) -> frozenset[str]:
    """The keys of a point's random-real and full-data evaluations (train.protocols), from its config alone."""
    from gdd_ray import trainset
    from gdd_ray.classes import load_classes
    from gdd_ray.train import protocols

    t = cfg.train
    if not t.real_train_data:
        return frozenset()
    classes = load_classes(cfg.dataset, cfg.classes)
    per = trainset.for_training(cfg).per_class or trainset.rows_per_class(
        trainset.for_training(cfg), cfg.ipc, cfg.augment.pda_variants
    )
    tdig = protocols.file_digest(t.teacher) if t.labels != "hard" and t.teacher else None
    cells = [c for c in protocols.cells(t) if c.data != "distilled"]
    return frozenset(protocols.baseline_key(cfg, classes, c, [per] * len(classes), tdig)[0] for c in cells)


def run_shared_baselines(planned: list[dict[str, Any]]) -> int:
    """Evaluate, one after another, the first point of each set of baselines not yet covered, so that every
    random-real and full-data evaluation is trained once, before Tune runs the points in parallel (they then
    find them done). Returns how many points ran here."""
    from gdd_ray import pipeline

    seen: set[str] = set()
    ran = 0
    for p in planned:
        cfg = build_config(p["run"])
        keys = baseline_keys(cfg)
        if keys and not keys <= seen:
            say("sweep", f"point {p['name']}: its {len(keys - seen)} baseline evaluation(s) first (shared)")
            pipeline.run(cfg, RunDir(cfg.out, p["stage_dirs"]))
            seen |= keys
            ran += 1
    return ran


def trial_resources() -> dict[str, float]:
    """What one trial holds: one training worker, a GPU where the cluster has them, else a CPU. The trial trains
    its point itself (a Ray Train job per point would start a controller and a worker group, ~13 s on 2 cores,
    for a training of seconds); points run side by side up to --concurrent. On a GPU all of a point's ConvNet
    runs train at once (train.at_once)."""
    import ray

    return {"cpu": 1, "gpu": 1} if ray.cluster_resources().get("GPU", 0) >= 1 else {"cpu": 1}


def run_evaluations(planned: list[dict[str, Any]], root: str, concurrent: int) -> None:
    from ray import tune

    name = f"tune-{_short_hash([p['run'] for p in planned])}"
    trainable = tune.with_resources(_evaluate, trial_resources())
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


# Rounded to what was measured: accuracy to the 0.01 % the pages print (a test set of 10,000 images counts in
# steps of 0.01 %), clock readings to the millisecond, rates to 3 significant decimals.
ACCURACY_DECIMALS = 4
SECONDS_DECIMALS = 3


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def leaderboard_rows(planned: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per point. Cost columns mean one thing each: `generation_gpu_s` = render GPU-seconds of the
    images this point trains on (its share of the shared generation), `generation_images_per_gpu_s` = images
    per render-second, `shared_generation_wall_s` = wall time of the whole shared generation (all its points)."""
    rows = []
    for p in planned:
        res = _read_json(storage.Location(p["run"]["out"]).child("eval"), "results.json") or {}
        gen = _read_json(storage.Location(p["stage_dirs"]["generate"]), "_summary.json")
        cost = generation_cost(gen)
        classes = (res.get("train_set") or {}).get("classes") or 0
        gpu_s = generation_share(gen, p["run"]["train_ipc"] * classes) if classes else None
        rows.append({
            "point": p["name"], **p["values"],
            "protocol": (res.get("protocol") or {}).get("name"),
            "accuracy_mean": _round(res.get("accuracy_mean"), ACCURACY_DECIMALS),
            "accuracy_std": _round(res.get("accuracy_std"), ACCURACY_DECIMALS),
            "runs": len(res.get("accuracies") or []),
            "images_per_class": (res.get("train_set") or {}).get("images_per_class"),
            "generation_gpu_s": _round(gpu_s, SECONDS_DECIMALS),
            "generation_images_per_gpu_s": _round(cost["images_per_gpu_s"], 3),
            "shared_generation_wall_s": _round(cost["wall_s"], SECONDS_DECIMALS),
            "official": res.get("official"),
            **protocol_columns(res),
        })  # fmt: skip
    return sorted(rows, key=lambda r: -(r["accuracy_mean"] if r["accuracy_mean"] is not None else -1.0))


def protocol_columns(res: dict[str, Any]) -> dict[str, Any]:
    """The evaluation protocols of a point (train.protocols): its headline network's random-real and full-data
    accuracy and DD-Ranking's scores, and one column per other network and label mode (cross-architecture)."""
    evaluations = res.get("evaluations") or []
    if len(evaluations) < 2:
        return {}
    first = evaluations[0]
    out: dict[str, Any] = {}
    for e in evaluations[1:]:
        if e["data"] == "distilled":
            out[f"{e['net_name']} {e['labels']}"] = e["accuracy_mean"]
        elif e["net"] == first["net"] and e["labels"] in (first["labels"], "hard"):
            out.setdefault("random_real" if e["data"] == "random" else "full_data", e["accuracy_mean"])
    for s in res.get("scores") or []:
        if (s["net"], s["labels"]) == (first["net"], first["labels"]):
            out.update({k: (s[k] or {}).get("mean") for k in ("ior", "hlr", "lrs")})
    return out


def write_leaderboard(root: str, rows: list[dict[str, Any]]) -> None:
    loc = storage.Location(root)
    fields = list(dict.fromkeys(k for r in rows for k in r)) if rows else ["point"]  # points may differ in nets
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    loc.write_bytes(f"{LEADERBOARD}.csv", buf.getvalue().encode())

    def cell(r: dict[str, Any], f: str) -> str:
        if f == "accuracy_mean":
            m, s = r["accuracy_mean"], r["accuracy_std"]
            return "—" if m is None else f"{100 * m:.2f} ± {100 * (s or 0):.2f} %"
        v = r.get(f)
        if isinstance(v, float) and (f in PERCENT_COLUMNS or " " in f):  # accuracies and scores, as fractions
            return f"{100 * v:.2f} %"
        return "" if v is None else str(v)

    shown = [f for f in fields if f != "accuracy_std"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(r, f) for f in shown) + " |" for r in rows]
    loc.write_bytes(f"{LEADERBOARD}.md", ("\n".join(lines) + "\n").encode())


def _read_json(loc: storage.Location, name: str) -> dict[str, Any] | None:
    return schema.read_or_none(loc, name, schema.Map(schema.Anything()))


def sweep(
    path: str, root: str, concurrent: int = 1, track: str = "none", track_uri: str | None = None,
    track_experiment: str = "gdd-ray",
) -> list[dict[str, Any]]:  # fmt: skip
    """Run (or resume) the sweep of `path` under `root`; returns the leaderboard rows. `track`: "mlflow" logs
    the sweep as a parent run with one child per point (gdd_ray.tracking)."""
    from gdd_ray import pipeline
    from gdd_ray.ray_utils import held_ray, init_ray

    if track == "mlflow":
        from gdd_ray import tracking

        tracking.check_available()
    base, grid = load_sweep(path)
    planned = plan_sweep(base, grid, root)
    for p in planned:  # every config is checked before any work: a bad value is one line
        build_config(p["run"])
    generations = {p["group"]: p["generation"] for p in planned}
    augmentations = {p["pda"]: p["augmentation"] for p in planned}
    say("sweep", f"{len(planned)} points, {len(generations)} generation(s), {len(augmentations)} PDA(s) -> {root}")
    with held_ray():  # one Ray for the generations and Tune's evaluations, shut down once (if ours)
        preflight_points(planned, root)  # every point, every stage, before the first image
        init_ray()
        for gen in generations.values():
            pipeline.run(build_config(gen))
        for aug in augmentations.values():
            values = {k: v for k, v in aug.items() if k != "stage_dirs"}
            pipeline.run(build_config(values), RunDir(values["out"], aug["stage_dirs"]))
        run_shared_baselines(planned)
        run_evaluations(planned, root, concurrent)
        rows = leaderboard_rows(planned)
        write_leaderboard(root, rows)
        write_sweep_page(root, rows, f"gdd-ray sweep: {len(rows)} points over {', '.join(grid)}")
    say("sweep", f"done: {storage.join(root, LEADERBOARD + '.md')}")
    if track == "mlflow":
        from gdd_ray import tracking

        values = {**{f"base.{k}": v for k, v in base.items()}, **{f"grid.{k}": v for k, v in grid.items()}}
        dirs = [RunDir.open(p["run"]["out"]) for p in planned]
        tracking.track_sweep(root, rows, dirs, values, track_uri, track_experiment)
    return rows


# ---- command line (python -m gdd_ray sweep, jobs/sweep.py) --------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="The sweep YAML: base: {option: value}, grid: {option: [values]}.")
    p.add_argument("--out", required=True, help="The sweep's root folder (local path or s3://...).")
    p.add_argument(
        "--concurrent", type=int, default=1,
        help="Points evaluated at once (Tune trials, one GPU each where the cluster has GPUs, else one CPU); default 1.",
    )  # fmt: skip
    p.add_argument(
        "--track",
        choices=("none", "mlflow"),
        default="none",
        help="mlflow = log the sweep to MLflow when it ends: a parent run (grid, leaderboard, page) with one "
        "child run per point; needs `pip install 'gdd-ray[track]'`.",
    )
    p.add_argument(
        "--track-uri",
        default=None,
        help="MLflow tracking URI (server, sqlite:///file.db or a folder); default $MLFLOW_TRACKING_URI, else "
        "ROOT/mlflow.db.",
    )
    p.add_argument("--track-experiment", default="gdd-ray", help="MLflow experiment; default gdd-ray.")


def run_from_args(args: argparse.Namespace) -> int:
    if args.concurrent < 1:
        raise UserError(f"--concurrent must be at least 1, got {args.concurrent}")
    if args.track == "none" and (args.track_uri is not None or args.track_experiment != "gdd-ray"):
        raise UserError("--track-uri and --track-experiment say where to log: add --track mlflow")
    schema.check_environment()
    out = args.out if "://" in args.out else os.path.abspath(args.out)
    rows = sweep(args.config, out, args.concurrent, args.track, args.track_uri, args.track_experiment)
    print(storage.Location(out).read_bytes(f"{LEADERBOARD}.md").decode(), end="")
    return 0 if rows else 1
