"""The main job: check the whole request, then run the asked stages in order (generate -> select -> augment -> train).

Every stage module declares the same few things, so this file stays the only place that knows the order:
    VERSION, OUTPUT_FIELDS      its code version and the config fields that decide its output
    resolved_inputs(cfg)        values it resolves from the config that decide its output too
    source(cfg, run_dir)        the stage whose output it reads (None for generate)
    preflight(ctx)              checks that read only, before anything is written
    run(ctx) -> dict            do the stage (resumably), return its summary
The fingerprints are computed here, once, and handed to the stages in the RunContext. After each stage
(and after a failed one) the run's page OUT/report.html is rewritten from the files (gdd_ray.report_page),
so a partial run shows what exists; the stages know nothing of it.
"""

from __future__ import annotations

from typing import Any

from gdd_ray import lease, report_page, storage
from gdd_ray.augment import stage as augment
from gdd_ray.classes import ClassInfo, check_prompts, class_list_source, load_classes
from gdd_ray.config import STAGES, RunConfig
from gdd_ray.errors import UserError
from gdd_ray.fingerprints import output_inputs, stage_fingerprint
from gdd_ray.generate import stage as generate
from gdd_ray.plan import check_plan_size, plan_run
from gdd_ray.run import RunContext, RunDir, not_writable
from gdd_ray.select import stage as select
from gdd_ray.train import stage as train

STAGE_MODULES = {"generate": generate, "select": select, "augment": augment, "train": train}
# Pipeline switches a library could turn on by what is installed or set in the environment, and how this
# project sets them (recorded in run.json: pixels depend on the config alone).
PIPELINE_SWITCHES = {"watermarker": "off (forced, even with invisible-watermark installed)", "safety_checker": "none"}


def stage_inputs(
    cfg: RunConfig, classes: list[ClassInfo], run_dir: RunDir, resolved: dict[str, dict[str, Any]] | None = None
) -> tuple[dict, dict, dict]:
    """(fingerprints, inputs, sources) of every stage up to the last one asked for: a stage's input is
    its source stage's output, so that stage's fingerprint is part of it. `resolved`: the inputs an earlier
    call gave for this config, reused rather than resolved again (the generate runtime reads model configs)."""
    last = max(STAGES.index(s) for s in cfg.stages)
    fps: dict[str, str] = {}
    inputs: dict[str, dict[str, Any]] = {}
    sources: dict[str, str | None] = {}
    for name in STAGES[: last + 1]:
        if name == "select" and cfg.select.select_by == "none":
            continue  # no select stage in this run: nothing reads its output, so it has no fingerprint
        mod = STAGE_MODULES[name]
        src = mod.source(cfg, run_dir)
        if resolved is not None and name in resolved:
            inputs[name] = dict(resolved[name])
        else:
            inputs[name] = {**output_inputs(cfg, classes, mod.OUTPUT_FIELDS), **mod.resolved_inputs(cfg)}
        fps[name] = stage_fingerprint(name, mod.VERSION, inputs[name], fps.get(src) if src else None, src)
        sources[name] = src
    return fps, inputs, sources


def generation_fingerprint(cfg: RunConfig, classes: list[ClassInfo]) -> str:
    """The fingerprint this config's generate stage has (for stand-in shards: synthetic.write_generated)."""
    return stage_inputs(cfg.replace(stages=("generate",)), classes, RunDir(cfg.out))[0]["generate"]


def refuse_scattered_out(cfg: RunConfig) -> None:
    """A local --out on a cluster of several nodes would leave each node's shards on its own disk.

    Needs Ray only when ray.init() would join an existing cluster (RAY_ADDRESS, `ray start`, or already
    connected): a local Ray that a stage starts later is one node, so a plain local run starts nothing here."""
    if storage.is_uri(cfg.out) or cfg.shared_local_out:
        return
    from gdd_ray import ray_utils

    if not ray_utils.ray_initialized():
        if ray_utils.cluster_address() is None:
            return
        ray_utils.init_ray()
    nodes = ray_utils.alive_nodes()
    if nodes > 1:
        raise UserError(
            f"--out {cfg.out} is a local folder but the Ray cluster has {nodes} nodes, so each node would keep "
            "its shards on its own disk; use shared storage (--out s3://bucket/run or gs://...), or add "
            "--shared-local-out if this path is the same shared mount (NFS) on every node"
        )


def context(cfg: RunConfig, run_dir: RunDir | None = None) -> tuple[RunContext, dict[str, dict[str, Any]]]:
    """The run's context (classes, plan, fingerprints) and what decides each stage; reads, writes nothing.
    `run_dir`: OUT with stage folders shared with other runs (a sweep's); default plain OUT."""
    classes = load_classes(cfg.dataset, cfg.classes)
    check_plan_size(cfg, len(classes))  # arithmetic: before plan_run builds a list that may not fit in memory
    if not cfg.allow_duplicate_prompts:  # two labels for one set of images would train on noise
        check_prompts(classes, cfg.generate.templates, class_list_source(cfg.dataset, cfg.classes))
    run_dir = run_dir or RunDir(cfg.out)
    fps, inputs, sources = stage_inputs(cfg, classes, run_dir)
    plan = plan_run(cfg, len(classes))
    return RunContext(cfg, run_dir, classes, plan, fps, sources, inputs=inputs), inputs


def checked_context(cfg: RunConfig, run_dir: RunDir | None = None) -> tuple[RunContext, dict[str, dict[str, Any]]]:
    """Every check that only reads: classes, fingerprints, each stage's preflight, that --out is reachable
    from every node (joins the cluster only if there is one to join), and that the output folder's stages
    match this config (or --overwrite). `run_dir`: OUT with shared stage folders (a sweep point's)."""
    run_dir = run_dir or RunDir(cfg.out)
    run_dir.refuse_blocked()  # a file in the way fails now, not after the fingerprints import the model library
    ctx, inputs = context(cfg, run_dir)
    for stage in cfg.stages:
        STAGE_MODULES[stage].preflight(ctx)
    refuse_scattered_out(cfg)
    ctx.run_dir.stale_stages(cfg, ctx.fingerprints, inputs)
    return ctx, inputs


def check(cfg: RunConfig, run_dir: RunDir | None = None) -> RunContext:
    """Every check before anything is written, then run.json (written last). Takes no lease: `run` does."""
    ctx, inputs = checked_context(cfg, run_dir)
    ctx.run_dir.prepare(cfg, [vars(c) for c in ctx.classes], ctx.fingerprints, inputs, ctx.sources, PIPELINE_SWITCHES)
    return ctx


def execute(ctx: RunContext) -> dict[str, Any]:
    """Run the asked stages in order on a checked context; the run's page follows each one."""
    out: dict[str, Any] = {}
    try:
        for stage in STAGES:
            if stage in ctx.cfg.stages:
                out[stage] = STAGE_MODULES[stage].run(ctx)
                report_page.write_run_page(ctx.run_dir)
    except BaseException:
        report_page.write_run_page(ctx.run_dir, quiet=True)  # what exists so far; the stage's error wins
        raise
    return out


def take_lease(run_dir: RunDir) -> lease.Lease:
    try:
        return lease.acquire(run_dir.root)
    except OSError as e:
        raise not_writable(run_dir.uri, e) from e


def run(cfg: RunConfig, run_dir: RunDir | None = None) -> dict[str, Any]:
    """The whole job under the run's lease: a second driver on the same --out is refused before it writes
    anything (run.json, --overwrite's deletions and shards all happen while this driver holds it)."""
    from gdd_ray.ray_utils import shutdown_if_started_here

    ctx, inputs = checked_context(cfg, run_dir)
    try:
        with take_lease(ctx.run_dir):
            ctx.run_dir.prepare(
                cfg, [vars(c) for c in ctx.classes], ctx.fingerprints, inputs, ctx.sources, PIPELINE_SWITCHES
            )
            return execute(ctx)
    finally:
        shutdown_if_started_here()
