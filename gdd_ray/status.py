"""Where a run stands, from its files alone (no driver, no Ray): works on a dead run, a live one, any machine.

    python -m gdd_ray status runs/c100
    python -m gdd_ray status s3://bucket/c100 --json

Per stage: units done/total, images, throughput, failures (shards that exist but must be redone), and
whether it is complete (a run that a --time-budget stopped short of --ipc shows "time budget reached" and
the IPC every class has, which counts as complete). Exit code 0 when every stage of the run is complete,
1 when not, 2 when OUT holds no run. The rules are the stages' own resume rules (footers judged by the
same functions), so "done" here means exactly what a rerun would skip; a stage is complete when its
manifest (written last) is current.

    python -m gdd_ray status runs/c100 --verify

also checks every stored image and row (footers cannot vouch for the bytes under them): each image must be a
PNG, RGB, of the footer's image size, and decode; each row's label must be its unit's class and its index in
the unit's range (kept images: among the class's generated ones), no (index, variant) twice. Each one that is
not is named (shard, row, label, index, why). Such a shard is set aside as NAME.corrupt (kept for a look, outside
every reader's `*.parquet`) and its stage's manifest dropped, so the stage is "not complete" everywhere and
the next run redoes exactly those shards, by the missing-shard rule every stage already has. Under a live
driver nothing is moved (that driver may be rewriting them); the report stands and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs

from gdd_ray import lease, schema, shards, storage
from gdd_ray.config import STAGES, RunConfig
from gdd_ray.errors import UserError
from gdd_ray.generate.budget import budgeted
from gdd_ray.plan import check_plan_size, generated_per_class, plan_run
from gdd_ray.run import RUN_FILE, RunDir, eval_run_name

# A stage is `complete` when every unit is done and its summary (written last) is current; `incomplete`
# when it has work on disk or a start time but is not complete (running now, or stopped: files cannot tell).


def _when(iso: str | None) -> datetime | None:
    if not iso:
        return None
    t = datetime.fromisoformat(iso)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _mtimes(loc: storage.Location, names: set[str]) -> dict[str, datetime]:
    if not loc.exists():
        return {}
    out = {}
    for e in loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True)):
        name = e.path.rsplit("/", 1)[-1]
        if name in names and e.mtime is not None:
            out[name] = e.mtime if e.mtime.tzinfo else e.mtime.replace(tzinfo=timezone.utc)
    return out


def _rate(images_by_name: dict[str, int], mtimes: dict[str, datetime], started: datetime | None) -> float | None:
    """Images/s of the current attempt: shards committed since it started, over the time to the last one."""
    if started is None:
        return None
    recent = [n for n in images_by_name if n in mtimes and mtimes[n] >= started]
    if not recent:
        return None
    span = (max(mtimes[n] for n in recent) - started).total_seconds()
    return round(sum(images_by_name[n] for n in recent) / span, 3) if span > 0 else None


def _shard_stage(
    run_dir: RunDir,
    stage: str,
    record: dict[str, Any],
    specs: list[shards.ShardSpec],
    verify: bool,
    candidates: int | None = None,
) -> dict[str, Any]:
    """Status of a stage made of one shard per unit, judged against the specs its own run would use.
    `candidates`: its shards hold kept images (indices among the class's first `candidates` generated ones)."""
    loc = run_dir.stage_dir(stage)
    check = shards.check_folder(loc, specs, decode=verify, candidates=candidates)
    done = {s.name: s.rows for s in check.done}
    info = record.get("stages", {}).get(stage, {})
    summary = run_dir.read_summary(stage) or {}
    fp = record.get("fingerprints", {}).get(stage)
    complete = not check.todo and shards.read_manifest(loc, fp) is not None
    if complete:
        rate = summary.get("totals", {}).get("images_per_s")
    else:
        rate = _rate(done, _mtimes(loc, set(done)), _when(info.get("started")))
    return {
        "stage": stage,
        "unit": "shards",
        "done": len(done),
        "total": len(specs),
        "images": sum(done.values()),
        "images_total": sum(s.rows for s in specs),
        "images_per_s": rate,
        "failures": [f"{n}: {why}" for n, why in sorted(check.problems.items())],
        "started": info.get("started"),
        "finished": info.get("finished") if complete else None,
        "state": _state(complete, len(done) + len(check.problems), info),
        "corrupt": [{"shard": n, **img} for n, bad in check.corrupt.items() for img in bad],
    }


BUDGET_REACHED = "time budget reached"


def _state(complete: bool, on_disk: int, info: dict[str, Any]) -> str:
    if complete:
        return "complete"
    return "incomplete" if on_disk or info.get("started") else "not started"


def generate_status(run_dir: RunDir, record: dict[str, Any], cfg: RunConfig, verify: bool = False) -> dict[str, Any]:
    fp = record["fingerprints"]["generate"]
    plan = plan_run(cfg, len(record["classes"]))
    st = _shard_stage(run_dir, "generate", record, [shards.generated_spec(u, fp) for u in plan.units], verify)
    summary = run_dir.read_summary("generate")
    if budgeted(summary, fp):
        st["ipc_reached"] = summary.get("ipc_reached")
        # A time budget that stopped short of --ipc: done for this budget (its manifest lists every shard
        # below the IPC reached, and later stages read those); a rerun with the budget grows it.
        if st["state"] != "complete" and not st["corrupt"] and shards.read_manifest(run_dir.generated, fp):
            st["state"] = BUDGET_REACHED
    return st


def select_status(run_dir: RunDir, record: dict[str, Any], cfg: RunConfig, verify: bool = False) -> dict[str, Any]:
    """Units are the kept shards (IPC per class); the score files are the stage's own bookkeeping."""
    fp = record["fingerprints"]["select"]
    plan = plan_run(cfg, len(record["classes"]))
    specs = [shards.selected_spec(u, fp) for u in plan.kept]
    st = _shard_stage(run_dir, "select", record, specs, verify, generated_per_class(cfg))
    if st["state"] != "complete":  # the kept shards come last, after every score file: say how far scoring is
        scores = shards.check_folder(
            run_dir.selected.child(shards.SCORES_DIR), [shards.score_spec(u, fp) for u in plan.units]
        )
        st["scored"] = [len(scores.done), len(plan.units)]
        if scores.done or scores.problems:
            st["state"] = "incomplete"  # work is on disk: stopped or running, not "not started"
    return st


def augment_status(run_dir: RunDir, record: dict[str, Any], cfg: RunConfig, verify: bool = False) -> dict[str, Any]:
    """Inputs: the source stage's manifest (the select stage's with --select-by clip, else the generate
    stage's) when it is complete, else the plan (the same shards, to be)."""
    fps = record["fingerprints"]
    src = "select" if cfg.clip.select_by == "clip" else "generate"
    manifest = shards.read_manifest(run_dir.stage_dir(src), fps.get(src))
    plan = plan_run(cfg, len(record["classes"]))
    rows_in = manifest.rows if manifest else {u.shard_name: u.size for u in (plan.kept or plan.units)}
    k = cfg.augment.pda_variants
    specs = [shards.augmented_spec(n, r, k, fps["augment"]) for n, r in rows_in.items()]
    kept = generated_per_class(cfg) if src == "select" else None
    return _shard_stage(run_dir, "augment", record, specs, verify, kept)


def train_status(run_dir: RunDir, record: dict[str, Any], cfg: RunConfig, verify: bool = False) -> dict[str, Any]:
    """Units are evaluation runs (independent seeds): finished ones have eval/runs/runNN.json (`verify`: runs
    hold numbers, no images to decode)."""
    fp = record["fingerprints"]["train"]
    wanted = cfg.train.eval_runs
    runs_loc = run_dir.eval.child("runs")
    present = set(runs_loc.list(".json"))
    done, failures = [], []
    for r in range(wanted):
        name = f"{eval_run_name(r)}.json"
        if name not in present:
            continue
        try:
            res = schema.read(runs_loc, name, schema.EVAL_RUN) or {}
        except (OSError, ValueError) as e:
            failures.append(f"runs/{name}: unreadable ({type(e).__name__})")
            continue
        if res.get("fingerprint") == fp:
            done.append(res)
        else:
            failures.append(f"runs/{name}: another fingerprint")
    checkpoints = len(run_dir.eval.child("checkpoints").list(".pt"))
    summary = run_dir.read_summary("train")
    complete = len(done) == wanted and bool(summary) and summary.get("fingerprint") == fp
    info = record.get("stages", {}).get("train", {})
    out = {
        "stage": "train",
        "unit": "runs",
        "done": len(done),
        "total": wanted,
        "images": (summary or {}).get("totals", {}).get("images") if complete else None,
        "images_total": None,
        "images_per_s": None,
        "failures": failures,
        "started": info.get("started"),
        "finished": info.get("finished") if complete else None,
        "state": _state(complete, len(done) + len(failures) + checkpoints, info),
        "checkpoints": checkpoints,
    }
    if complete:
        out["accuracy_mean"] = summary.get("accuracy_mean")
        out["accuracy_std"] = summary.get("accuracy_std")
        out["wall_s"] = summary.get("wall_s")
    return out


def _driver(run_dir: RunDir) -> str | None:
    """Who holds the run's lease (one live driver per run), or None when nobody does."""
    held = lease.current(run_dir.root)
    if held is None:
        return None
    if held["state"] == "live":
        return f"running: {lease.describe(held)}, heartbeat {held['heartbeat_age_s']:.0f} s ago"
    why = "its process is gone" if held["state"] == "gone" else f"no heartbeat for {held['heartbeat_age_s']:.0f} s"
    return f"stopped: {lease.describe(held)} ({why}); a rerun takes over"


STATUS_OF = {"generate": generate_status, "select": select_status, "augment": augment_status, "train": train_status}


def run_status(out: str, verify: bool = False) -> dict[str, Any]:
    """The status of every stage the run at `out` was opened with (raises UserError if there is no run).
    `verify`: decode every stored image too, and set aside the shards holding one that does not decode."""
    run_dir = RunDir(out)
    try:
        record = run_dir.read_record()
    except OSError as e:  # e.g. a bucket that does not exist or no credentials
        raise UserError(f"cannot read {out} ({e})") from e
    if record is None:
        raise UserError(f"{storage.join(out, RUN_FILE)} does not exist: no run was started at {out}")
    run_dir = RunDir(out, record.get("stage_dirs"))  # a sweep point reads shared generate/augment folders
    stages = [s for s in STAGES if s in record.get("fingerprints", {})]
    cfg = RunConfig.from_dict(record.get("config") or {}, storage.join(out, RUN_FILE))  # schema.Invalid: one line
    check_plan_size(cfg, len(record.get("classes", [])))  # a run.json edited by hand: before any plan is built
    result = {
        "run": out,
        "dataset": cfg.dataset or cfg.classes,
        "classes": len(record.get("classes", [])),
        "ipc": cfg.ipc,
        "created": record.get("created"),
        "updated": record.get("updated"),
        "stages": [STATUS_OF[s](run_dir, record, cfg, verify) for s in stages],
        "driver": _driver(run_dir),
    }
    if verify:
        live = (lease.current(run_dir.root) or {}).get("state") == "live"
        for s in result["stages"]:
            s["set_aside"] = [] if live else _set_aside(run_dir.stage_dir(s["stage"]), s.get("corrupt", []))
    done_states = ("complete", BUDGET_REACHED)
    result["complete"] = bool(result["stages"]) and all(s["state"] in done_states for s in result["stages"])
    return result


def _set_aside(loc: storage.Location, corrupt: list[dict[str, Any]]) -> list[str]:
    """Move each shard holding a corrupt image to NAME.corrupt, the manifest first: from then on the stage is
    not complete for any reader, and a rerun redoes the shards as missing ones. Returns the names moved."""
    names = list(dict.fromkeys(c["shard"] for c in corrupt))
    if names:
        shards.drop_manifest(loc)
    for name in names:
        loc.rename(name, name + shards.SET_ASIDE_SUFFIX)
    return names


def format_status(st: dict[str, Any]) -> str:
    lines = [
        f"{st['run']}: {st['dataset']}, {st['classes']} classes, IPC {st['ipc']} "
        f"(created {st['created']}, updated {st['updated']})"
    ]
    if st.get("driver"):
        lines.append(f"  driver: {st['driver']}")
    for s in st["stages"]:
        done = f"{s['done']}/{s['total']} {s['unit']}"
        if s["images_total"] is not None:
            images = f"{s['images']}/{s['images_total']} images"
        else:
            images = f"{s['images']} images" if s["images"] is not None else ""
        rate = f"{s['images_per_s']:.1f} img/s" if s["images_per_s"] else ""
        extra = ""
        if s.get("accuracy_mean") is not None:
            extra = f"accuracy {100 * s['accuracy_mean']:.2f} +- {100 * s['accuracy_std']:.2f} %"
        elif s.get("checkpoints"):
            extra = f"{s['checkpoints']} checkpoints"
        fails = f"{len(s['failures'])} to redo" if s["failures"] else ""
        if s.get("scored"):
            extra = f"{s['scored'][0]}/{s['scored'][1]} generated shards scored"
        cols = [f"{s['stage']:<9}", f"{done:<16}", f"{images:<22}", f"{rate:<14}", s["state"], fails, extra]
        lines.append("  " + "  ".join(c for c in cols if c is not None).rstrip())
        if s["state"] == BUDGET_REACHED:
            lines.append(
                f"      every class at IPC {s['ipc_reached']} of {st['ipc']} within the time budget; a rerun with "
                "--time-budget grows it"
            )
        lines.extend(f"      redo {f}" for f in s["failures"][:10])
        if len(s["failures"]) > 10:
            lines.append(f"      ... and {len(s['failures']) - 10} more")
        for c in s.get("corrupt", [])[:10]:
            where = "its data pages" if c["row"] is None else f"row {c['row']} (label {c['label']}, index {c['index']})"
            lines.append(f"      corrupt {c['shard']} {where}: {c['why']}")
        if len(s.get("corrupt", [])) > 10:
            lines.append(f"      ... and {len(s['corrupt']) - 10} more corrupt images")
        if s.get("set_aside"):
            lines.append(
                f"      set aside {len(s['set_aside'])} shard(s) as NAME{shards.SET_ASIDE_SUFFIX} and dropped the "
                "manifest: the next run redoes them"
            )
        elif s.get("corrupt") and (st.get("driver") or "").startswith("running"):
            lines.append("      not set aside: a driver is running on this run; verify again once it has finished")
    lines.append("complete" if st["complete"] else "not complete: run the same command again to finish it")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="The run's --out: a local folder or s3://, gs:// URI.")
    parser.add_argument("--json", action="store_true", help="Print the status as JSON (for scripts and dashboards).")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="Also check every stored image (a PNG, RGB, of the run's size, decoding) and row (label and index those of "
        "its unit); shards with one that is not are named (shard, row, label, index, why), set aside as "
        "NAME.corrupt and redone by the next run. Reads every shard in full.",
    )


def run_from_args(args: argparse.Namespace) -> int:
    st = run_status(args.out, verify=args.verify)
    print(json.dumps(st, indent=2) if args.json else format_status(st), flush=True)
    return 0 if st["complete"] else 1
