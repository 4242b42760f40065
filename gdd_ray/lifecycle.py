"""The lifecycle every shard stage shares, and the one answer to "which shards should this folder hold?".

A shard stage (generate, select, augment) says only what is particular to it, as a `ShardStage`: where it
writes, the specs the plan asks of that folder, the work for the shards that are missing, what its summary
adds. `run` does the rest, always in this order:

    check      list the folder once, judge every shard by its footer (shards.check_folder)
    skip       nothing to do when every shard is present and current, the manifest is the record of exactly
               these shards (names, rows, bytes: shards.manifest_problem) and the summary is this fingerprint's
    drop       the manifest goes first: from here on no reader takes the folder for complete
    work       the stage's own work on the missing shards; run.json records what it read (its source manifest)
    sweep      shards outside the plan (another --ipc or --unit-size) go, then temporaries
    re-check   every planned shard must now be there (a worker that said it wrote one is not believed)
    record     the summary, then the manifest, last; run.json says done

`planned_specs` is what every stage, `status` and `export` expect of a stage's folder, from the plan alone.
`read_source` gives a consuming stage its source stage's output, after checking that source's manifest
against the plan and the files: the plan is the truth, a manifest only a claim about it. A manifest that
lacks a shard, lists one too many, or disagrees with a file's rows or bytes is refused with a way out that
works (rerunning that stage rewrites it; nothing is ever deleted because a manifest omitted it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gdd_ray import shards, storage
from gdd_ray.errors import UserError
from gdd_ray.logs import say
from gdd_ray.plan import WorkUnit, generated_per_class
from gdd_ray.run import RunContext, Stopwatch, now_iso, stage_summary

# What each shard stage's output is called in messages: (its shards, the work that makes them).
MADE = {"generate": ("generated", "generation"), "select": ("selected", "selection"), "augment": ("augmented", "PDA")}


def planned_units(ctx: RunContext, stage: str) -> list[WorkUnit]:
    """The units whose shards `stage` makes, in plan order: generate every unit of the plan; select the kept
    units; augment one output per shard of its source."""
    if stage == "generate":
        return list(ctx.plan.units)
    if stage == "select":
        return list(ctx.plan.kept)
    if stage == "augment":
        return planned_units(ctx, ctx.sources["augment"])
    raise ValueError(f"{stage} is not a shard stage")


def planned_specs(ctx: RunContext, stage: str, ipc: int | None = None) -> list[shards.ShardSpec]:
    """What `stage`'s folder must hold under this run's plan: every planned shard, or with `ipc` those holding
    images 0..ipc-1 of every class (a time budget that stopped short, and what a later stage reads of it; the
    last of them may hold some later images too, which readers leave out: rows with index < ipc)."""
    fp = ctx.fingerprint(stage)
    units = [u for u in planned_units(ctx, stage) if ipc is None or u.start < ipc * u.classes]
    if stage == "generate":
        return [shards.generated_spec(u, fp) for u in units]
    if stage == "select":
        return [shards.selected_spec(u, fp) for u in units]
    k = ctx.cfg.augment.pda_variants
    return [shards.augmented_spec(u.shard_name, u.size, k, fp) for u in units]


def full_ipc(ctx: RunContext, stage: str) -> int:
    """The IPC a complete output of `stage` holds: what is generated per class (over-generation included), else IPC."""
    if stage == "generate" or (stage == "augment" and ctx.sources["augment"] == "generate"):
        return generated_per_class(ctx.cfg)
    return ctx.cfg.ipc


@dataclass(frozen=True)
class Source:
    """A stage's input: its source stage's folder and manifest, checked against the plan."""

    stage: str
    loc: storage.Location
    manifest: shards.Manifest

    @property
    def ipc(self) -> int:
        return int(self.manifest.ipc or 0)

    def record(self) -> dict[str, Any]:
        """What run.json and the summary keep of what was read: every reader takes this, none re-derives it."""
        return {"stage": self.stage, "uri": self.loc.uri, "manifest": self.manifest.digest, "ipc": self.ipc}


def read_source(ctx: RunContext, consumer: str, need_ipc: int | None = None) -> Source:
    """`consumer`'s source stage's output, refused in one line unless its manifest is current for this run's
    fingerprints, covers the plan up to its IPC (all of it with `need_ipc`) and matches the files on storage."""
    src = ctx.sources[consumer]
    loc = ctx.run_dir.stage_dir(src)
    made, work = MADE[src]
    manifest = shards.read_manifest(loc, ctx.fingerprint(src))
    if manifest is None:
        if not loc.list(shards.SHARD_SUFFIX):
            raise UserError(f"{loc.uri} has no {made} shards: run the {src} stage first (--stages {src},{consumer})")
        raise UserError(
            f"{loc.uri} holds no complete {work} for this config (no current {shards.MANIFEST_FILE}); run the {src} "
            "stage to finish it (with --overwrite if it was made by another config)"
        )
    if manifest.ipc is None or manifest.ipc > full_ipc(ctx, src):
        why = "does not say which images it covers (an earlier version)" if manifest.ipc is None else "covers more"
        raise UserError(
            f"{loc.uri}: its manifest {why}; run the {src} stage again (it checks every shard and writes the "
            "manifest again)"
        )
    if need_ipc is not None and manifest.ipc < need_ipc:
        raise UserError(
            f"{loc.uri} holds {manifest.ipc} images per class but the {consumer} stage chooses from {need_ipc} "
            f"(--overgenerate {ctx.cfg.select.overgenerate:g} x --ipc {ctx.cfg.ipc}); run the {src} stage to make them"
        )
    shards.require_shards(loc, manifest, src, planned_specs(ctx, src, manifest.ipc), manifest.ipc)
    return Source(src, loc, manifest)


@dataclass
class Work:
    """What one invocation's work did, for the summary: units and images made, and the seconds they took."""

    units_run: int = 0
    images_made: int = 0
    work_s: float | None = None
    details: dict[str, Any] = field(default_factory=dict)  # the stage's own summary entries


class ShardStage:
    """What is particular to one shard stage; `run` does everything else, the same way for every stage."""

    name: str  # the stage: generate, select, augment

    def __init__(self, ctx: RunContext, serial: bool = False):
        self.ctx = ctx
        self.serial = serial  # do the work in this process (shard_map's serial mode), not on Ray
        self.fp = ctx.fingerprint(self.name)
        self.output = ctx.run_dir.stage_dir(self.name)
        self.source: Source | None = None  # set by `read` (generate reads no stage)

    def read(self) -> None:
        """Read and check the input, before the folder is judged (its specs may depend on it)."""

    def specs(self) -> list[shards.ShardSpec]:
        """The shards this invocation must leave in the folder, in plan order."""
        return planned_specs(self.ctx, self.name)

    def covers(self) -> int:
        """The IPC a complete folder of this stage covers now (its manifest lists the planned shards up to it)."""
        return full_ipc(self.ctx, self.name)

    def ipc(self, after: shards.Check) -> int:
        """The IPC the finished folder covers; refuses if a planned shard is missing (a worker said it wrote a
        shard that is not there: never report success)."""
        if after.todo:
            raise RuntimeError(
                f"{self.name}: {len(after.todo)} shards missing after the run, e.g. {after.todo[0].name}"
            )
        return self.covers()

    def other_work(self) -> bool:
        """Whether something besides missing shards is left to do (select's score files, augment's sample grid)."""
        return False

    def work(self, todo: list[shards.ShardSpec]) -> Work:
        raise NotImplementedError

    def finish(self, listed: list[shards.ShardSpec]) -> None:
        """After every planned shard is there and before the summary (augment draws its sample grid)."""

    def nothing_to_do(self) -> None:
        say(self.name, "nothing to do: every shard is present and current")

    def done_line(self, summary: dict[str, Any]) -> str:
        t = summary["totals"]
        rate = f" ({t['images_per_s']:.1f} img/s)" if t["images_per_s"] else ""
        return f"done: {t['images_made']} images made{rate}; {t['images']} images in {t['units']} shards under {self.output.uri}"


def run(stage: ShardStage) -> dict[str, Any]:
    """The lifecycle (module docstring) of one shard stage; returns its summary (the stored one when nothing
    was left to do)."""
    watch = Stopwatch()
    name, loc, ctx, fp = stage.name, stage.output, stage.ctx, stage.fp
    stage.read()
    specs = stage.specs()
    planned = {u.shard_name for u in planned_units(ctx, name)}  # beyond this IPC's specs, still the plan's
    loc.makedirs()
    loc.remove_stale_temporaries()
    manifest = shards.read_manifest(loc, fp)
    check = shards.check_folder(loc, specs, manifest=manifest)
    foreign = [n for n in check.foreign if n not in planned]
    for shard, why in sorted(check.problems.items()):
        say(name, f"redoing {shard}: {why}")
    say(
        name,
        f"{len(specs)} shards ({sum(s.rows for s in specs)} images): {len(check.done)} done, {len(check.todo)} to do",
    )
    previous = ctx.run_dir.read_summary(name)
    ledger = shards.manifest_problem(manifest, specs, check.sizes, stage.covers())
    if not check.todo and not foreign and not stage.other_work() and (previous or {}).get("fingerprint") == fp:
        if ledger is None:
            stage.nothing_to_do()
            return previous  # type: ignore[return-value]
        say(name, f"every shard is present and current but {ledger}: writing it again")

    shards.drop_manifest(loc)
    started = now_iso()
    read = {"read": stage.source.record()} if stage.source is not None else {}
    ctx.run_dir.update_stage(name, status="running", started=started, finished=None, **read)
    work = stage.work(check.todo)
    for shard in foreign:  # only now that the plan's own shards exist: never fewer images than asked
        say(name, f"removing {shard}: not part of this plan (--ipc or --unit-size changed)")
        loc.delete(shard)
    loc.remove_stale_temporaries()  # a killed worker's leftovers (its units were redone elsewhere)
    after = shards.check_folder(loc, specs)
    ipc = stage.ipc(after)
    listed = planned_specs(ctx, name, ipc)
    stage.finish(listed)
    summary = stage_summary(
        name, fp, started, watch.seconds,
        units=len(listed), units_run=work.units_run, images=sum(s.rows for s in listed),
        images_made=work.images_made, work_s=work.work_s, ipc=ipc, **read, **work.details,
    )  # fmt: skip
    ctx.run_dir.write_summary(name, summary)
    shards.write_manifest(loc, name, fp, listed, ipc, after.sizes)  # last: its presence means "complete"
    ctx.run_dir.update_stage(
        name, status="done", finished=summary["finished"], images=summary["totals"]["images"], ipc=ipc
    )
    for line in stage.done_line(summary).splitlines():
        say(name, line)
    return summary
