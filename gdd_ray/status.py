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

from gdd_ray import lease, lifecycle, schema, shards, storage
from gdd_ray.config import STAGES, RunConfig
from gdd_ray.errors import UserError
from gdd_ray.plan import check_plan_size, is_class_unit_name, plan_run
from gdd_ray.run import RUN_FILE, RunContext, RunDir, eval_run_name

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


def _shard_stage(ctx: RunContext, stage: str, record: dict[str, Any], verify: bool) -> dict[str, Any]:
    """Status of a stage made of one shard per unit, judged against the specs its own run uses (lifecycle), its
    manifest against the plan and the files as a rerun judges them."""
    run_dir = ctx.run_dir
    loc = run_dir.stage_dir(stage)
    manifest = shards.read_manifest(loc, ctx.fingerprint(stage))
    source_ipc = None
    if stage == "augment":  # its shards follow what its source covers (all of the plan unless a budget stopped it)
        src = shards.read_manifest(run_dir.stage_dir(ctx.sources["augment"]), ctx.fingerprint(ctx.sources["augment"]))
        source_ipc = src.ipc if src is not None else None
    specs = lifecycle.planned_specs(ctx, stage, source_ipc)
    check = shards.check_folder(loc, specs, decode=verify, manifest=manifest)
    done = {s.name: s.rows for s in check.done}
    info = record.get("stages", {}).get(stage, {})
    summary = run_dir.read_summary(stage) or {}
    covers = source_ipc if source_ipc is not None else lifecycle.full_ipc(ctx, stage)
    ledger = shards.manifest_problem(manifest, specs, check.sizes, covers)
    complete = not check.todo and ledger is None
    budget = None
    if stage == "generate" and manifest is not None and manifest.ipc and manifest.ipc < lifecycle.full_ipc(ctx, stage):
        # A time budget that stopped short of --ipc: done for this budget if its manifest is the record of
        # every shard below the IPC reached (later stages read those); a rerun with the budget grows it.
        budget = manifest.ipc
        prefix = lifecycle.planned_specs(ctx, stage, budget)
        ledger = shards.manifest_problem(manifest, prefix, check.sizes, budget)
        complete = False
    if complete:
        rate = summary.get("totals", {}).get("images_per_s")
    else:
        rate = _rate(done, _mtimes(loc, set(done)), _when(info.get("started")))
    failures = [f"{n}: {why}" for n, why in sorted(check.problems.items())]
    if ledger is not None and (manifest is not None or not check.todo):
        failures.append(f"{shards.MANIFEST_FILE}: {ledger} (a rerun writes it again)")
    st = {
        "stage": stage,
        "unit": "shards",
        "done": len(done),
        "total": len(specs),
        "images": sum(done.values()),
        "images_total": sum(s.rows for s in specs),
        "images_per_s": rate,
        "failures": failures,
        "started": info.get("started"),
        "finished": info.get("finished") if complete else None,
        "state": _state(complete, len(done) + len(check.problems), info),
        "corrupt": [{"shard": n, **img} for n, bad in check.corrupt.items() for img in bad],
    }
    if budget is not None and "time_budget_s" in summary:
        st["ipc_reached"] = budget
        if ledger is None and not st["corrupt"]:
            st["state"] = BUDGET_REACHED
    if stage == "select" and not complete:  # the kept shards come last, after every score file: how far is scoring
        fp, units = ctx.fingerprint("select"), ctx.plan.units
        scores = shards.check_folder(loc.child(shards.SCORES_DIR), [shards.score_spec(u, fp) for u in units])
        st["scored"] = [len(scores.done), len(units)]
        if scores.done or scores.problems:
            st["state"] = "incomplete"  # work is on disk: stopped or running, not "not started"
    return st


BUDGET_REACHED = "time budget reached"


def _state(complete: bool, on_disk: int, info: dict[str, Any]) -> str:
    if complete:
        return "complete"
    return "incomplete" if on_disk or info.get("started") else "not started"


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
        read = record.get("stages", {}).get("train", {}).get("read") or {}
        if res.get("fingerprint") != fp:
            failures.append(f"runs/{name}: another fingerprint")
        elif read.get("manifest") not in (None, res.get("source_manifest")):
            failures.append(f"runs/{name}: trained on another {read.get('stage', 'source')} output")
        else:
            done.append(res)
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


def _context(run_dir: RunDir, record: dict[str, Any], cfg: RunConfig) -> RunContext:
    """What the run's own stages saw: its plan, the fingerprints and the sources its run.json records."""
    fps = record.get("fingerprints", {})
    sources = record.get("sources") or {}
    if "augment" in fps and "augment" not in sources:  # run.json of an earlier version: the rule it had
        sources = {**sources, "augment": "select" if "select" in fps else "generate"}
    plan = plan_run(cfg, len(record["classes"]))
    return RunContext(cfg, run_dir, [], plan, fps, sources)


def _stage_status(ctx: RunContext, stage: str, record: dict[str, Any], verify: bool) -> dict[str, Any]:
    if stage == "train":
        return train_status(ctx.run_dir, record, ctx.cfg, verify)
    loc = ctx.run_dir.stage_dir(stage)
    if any(is_class_unit_name(n) for n in loc.list(shards.SHARD_SUFFIX)):
        return _earlier_layout(ctx, stage, record)
    return _shard_stage(ctx, stage, record, verify)


EARLIER_LAYOUT = "complete, earlier layout (read only)"


def _earlier_layout(ctx: RunContext, stage: str, record: dict[str, Any]) -> dict[str, Any]:
    """A stage made by a gdd-ray before packed units (one class per shard): what its manifest lists, checked
    against its files as export checks them; it can be read (status, export, its page), not resumed."""
    loc = ctx.run_dir.stage_dir(stage)
    manifest = shards.read_manifest(loc, ctx.fingerprint(stage))
    problem = None
    if manifest is not None:
        check = shards.check_folder(loc, shards.manifest_specs(manifest), manifest=manifest)
        if check.todo:  # problems are among the todo: name the first one, or the first missing shard
            first = check.todo[0].name
            problem = (first, check.problems.get(first, "missing"))
    complete = manifest is not None and problem is None
    info = record.get("stages", {}).get(stage, {})
    return {
        "stage": stage, "unit": "shards", "done": len(manifest.names) if manifest else 0,
        "total": len(manifest.names) if manifest else 0, "images": manifest.images if manifest else 0,
        "images_total": manifest.images if manifest else None, "images_per_s": None,
        "failures": [f"{problem[0]}: {problem[1]}"] if problem else [], "started": info.get("started"),
        "finished": info.get("finished") if complete else None,
        "state": EARLIER_LAYOUT if complete else "incomplete, earlier layout (cannot be resumed)", "corrupt": [],
    }  # fmt: skip


def _driver(run_dir: RunDir) -> str | None:
    """Who holds the run's lease (one live driver per run), or None when nobody does."""
    held = lease.current(run_dir.root)
    if held is None:
        return None
    if held["state"] == "live":
        return f"running: {lease.describe(held)}, heartbeat {held['heartbeat_age_s']:.0f} s ago"
    why = "its process is gone" if held["state"] == "gone" else f"no heartbeat for {held['heartbeat_age_s']:.0f} s"
    return f"stopped: {lease.describe(held)} ({why}); a rerun takes over"


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
    ctx = _context(run_dir, record, cfg)
    trained = cfg.train.train_ipc if cfg.train.train_ipc is not None and "train" in stages else None
    result = {
        "run": out,
        "dataset": cfg.dataset or cfg.classes,
        "classes": len(record.get("classes", [])),
        # what this run trains on (a sweep point: its own IPC); generated_ipc: what its generation holds
        "ipc": min(trained, cfg.ipc) if trained is not None else cfg.ipc,
        "generated_ipc": cfg.ipc,
        "variants": _trained_variants(cfg, stages),
        "sweep_point": record.get("sweep_point"),
        "stage_dirs": dict(record.get("stage_dirs") or {}),  # the shared folders a sweep point reads
        "created": record.get("created"),
        "updated": record.get("updated"),
        "stages": [_stage_status(ctx, s, record, verify) for s in stages],
        "driver": _driver(run_dir),
    }
    if verify:
        live = (lease.current(run_dir.root) or {}).get("state") == "live"
        for s in result["stages"]:
            s["set_aside"] = [] if live else _set_aside(run_dir.stage_dir(s["stage"]), s.get("corrupt", []))
    done_states = ("complete", BUDGET_REACHED, EARLIER_LAYOUT)
    result["complete"] = bool(result["stages"]) and all(s["state"] in done_states for s in result["stages"])
    return result


def _trained_variants(cfg: RunConfig, stages: list[str]) -> int | None:
    """K the run trains on (variants per image besides the original); None without an augment stage."""
    if "augment" not in stages:
        return None
    k = cfg.augment.pda_variants
    return min(cfg.train.train_variants, k) if cfg.train.train_variants is not None and "train" in stages else k


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
    generated = st.get("generated_ipc", st["ipc"])
    what = f"IPC {st['ipc']}" + (f", K {st['variants']}" if st.get("variants") is not None else "")
    lines = [
        f"{st['run']}: {st['dataset']}, {st['classes']} classes, {what} (created {st['created']}, updated {st['updated']})"
    ]
    point = st.get("sweep_point")
    if point:
        lines.append(f"  sweep point {point.get('name')} of {point.get('sweep')}: {json.dumps(point.get('values'))}")
    if generated != st["ipc"]:
        lines.append(f"  trains on images 0..{st['ipc'] - 1} of each class of a generation at IPC {generated}")
    for stage, folder in (st.get("stage_dirs") or {}).items():
        lines.append(f"  {stage}: shared with other runs, read from {folder}")
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
                f"      every class at IPC {s['ipc_reached']} of {generated} within the time budget; a rerun with "
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
