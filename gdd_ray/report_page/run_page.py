"""OUT/report.html: one run on one page, built from its files alone (run.json, the summaries, the shards,
samples.png, eval/results.json, eval/curve.png), so it shows whatever exists: the pipeline rewrites it
after every stage, and a run stopped half way has a page of what it finished.

Sections: accuracy with its protocol, the stages (images, images/s, generation GPU-seconds), the sample
grid, a per-class gallery of the images trained on, training curves, per-class accuracy bars, the worst
classes with their prompt and images, and the config with every fingerprint.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from gdd_ray import schema, selection, shards, storage
from gdd_ray.config import STAGES, RunConfig
from gdd_ray.errors import UserError
from gdd_ray.logs import say
from gdd_ray.plan import parse_shard_name
from gdd_ray.report_page import html as h
from gdd_ray.run import RunDir

PAGE = "report.html"
RESULTS = "results.json"  # the train stage's, under OUT/eval/
CURVE = "curve.png"
GALLERY_CLASSES = 40  # a 1000-class run would be a page of 6000 images; the worst classes are shown anyway
GALLERY_IMAGES = 6
WORST = 5
LOW_ACCURACY = 0.5  # bars below this are red: which classes to look at first


def read_json(loc: storage.Location, name: str) -> dict[str, Any] | None:
    """A JSON mapping the page shows (results.json, clip_stats.json); None when missing or damaged."""
    return schema.read_or_none(loc, name, schema.Map(schema.Anything()))


def read_file(loc: storage.Location, name: str) -> bytes | None:
    try:
        return loc.read_bytes(name) if loc.exists(name) else None
    except OSError:
        return None


def generation_cost(summary: dict[str, Any] | None) -> dict[str, float | None]:
    """GPU-seconds per generated image (the workers' render time; CPU seconds on a CPU-only run) and images/s."""
    if not summary:
        return {"gpu_s_per_image": None, "images_per_s": None}
    made = summary.get("totals", {}).get("images_made") or 0
    render = sum(w.get("render_s", 0.0) for w in (summary.get("per_worker") or {}).values())
    return {
        "gpu_s_per_image": render / made if made and render else None,
        "images_per_s": summary.get("totals", {}).get("images_per_s"),
    }


class RunFiles:
    """What a run folder holds right now, read once."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self.record = run_dir.read_record() or {}
        self.fingerprints: dict[str, str] = self.record.get("fingerprints", {})
        self.cfg = RunConfig.from_dict(self.record["config"]) if self.record.get("config") else None
        self.classes = self.record.get("classes") or []
        self.summaries = {s: run_dir.read_summary(s) for s in STAGES if s in self.fingerprints}
        results = read_json(run_dir.eval, RESULTS)
        self.results = results if results and results.get("fingerprint") == self.fingerprints.get("train") else None

    def stage_state(self, stage: str) -> str:
        summary = self.summaries.get(stage)
        if summary and summary.get("fingerprint") == self.fingerprints.get(stage):
            return "complete"
        started = self.record.get("stages", {}).get(stage, {}).get("started")
        return "incomplete" if started else "not run yet"

    def image_source(self) -> tuple[storage.Location, list[str]] | None:
        """The shards the run trains on: augmented when that stage ran, else generated (what exists)."""
        for stage in ("augment", "generate"):
            if stage not in self.fingerprints:
                continue
            loc = self.run_dir.stage_dir(stage)
            manifest = shards.read_manifest(loc, self.fingerprints[stage])
            names = manifest.names if manifest else loc.list(shards.SHARD_SUFFIX)
            if names:
                return loc, names
        return None

    def class_images(self, labels: list[int], n: int) -> dict[int, list[tuple[bytes, str]]]:
        """Up to n images of each class in `labels`, the first of the rows the run trains on."""
        source = self.image_source()
        if source is None or self.cfg is None:
            return {}
        loc, names = source
        choice = selection.for_training(self.cfg)
        by_label: dict[int, list[tuple[int, str]]] = {}
        for name in names:
            unit = parse_shard_name(name)
            if unit is not None and unit.label in labels and (choice.ipc is None or unit.start < choice.ipc):
                by_label.setdefault(unit.label, []).append((unit.start, name))
        out = {}
        for label, items in by_label.items():
            tables = []
            for _, name in sorted(items):
                tables.append(shards.read_shard(loc, name, ["image", "label", "index", "variant"]))
                if choice.per_class is None and sum(t.num_rows for t in tables) >= n * 8:
                    break  # every row is trained on: the first shard(s) hold the first images
            table = pa.concat_tables(tables)
            cols = [table.column(c).to_numpy() for c in ("label", "index", "variant")]
            try:
                keep = selection.choose(*cols, choice)[:n]
            except UserError:  # fewer rows than the protocol takes (an unfinished run): show what exists
                keep = selection.choose(*cols, selection.RowChoice(choice.ipc, choice.variants))[:n]
            pngs = shards.png_bytes(table.take(keep))
            index, variant = cols[1][keep], cols[2][keep]
            out[label] = [(p, f"image {i}, variant {v}") for p, i, v in zip(pngs, index, variant)]
        return out


def _accuracy_section(f: RunFiles) -> str:
    res = f.results
    if res is None:
        if f.cfg is not None and "train" in f.fingerprints:
            return h.section("Accuracy", h.missing("the train stage has not finished: no accuracy yet"))
        return ""
    t, p = res["train_set"], res["protocol"]
    if not res.get("evaluated"):
        head = h.missing("trained without a test set (no --eval-data): nothing was evaluated")
    else:
        head = f"<p class='big' id='accuracy'>{h.percent(res['accuracy_mean'], res['accuracy_std'])}</p>"
    ipc = t.get("images_per_class")
    rows = [
        ("protocol", f"{p.get('name', 'paper')}: {p.get('epochs_run', p['epochs'])} epochs, lr x0.1 from epoch "
         f"{p['lr_drop_epoch']}, accuracy of the {p.get('reported', 'last epoch')}"),
        ("images per class trained", ipc if isinstance(ipc, int) else f"{min(ipc)}..{max(ipc)}"),
        ("selection", json.dumps(t.get("selection"))),
        ("images trained on", f"{t['images']} ({t['classes']} classes, {t['image_size']} px), digest {t.get('digest')}"),
        ("runs", ", ".join(h.percent(a) for a in res["accuracies"]) or len(res["runs"])),
        ("test set", (res.get("test_set") or {}).get("path")),
    ]  # fmt: skip
    if res.get("challenge_score"):
        cs = res["challenge_score"]
        rows.append(("challenge score", f"{h.percent(cs['score'])} (mean of CIFAR-100 and Tiny-ImageNet)"))
    return h.section("Accuracy", head + h.key_values(rows), "accuracy-section")


def _stages_section(f: RunFiles) -> str:
    rows = []
    for stage in STAGES:
        if stage not in f.fingerprints:
            continue
        s = f.summaries.get(stage) or {}
        totals = s.get("totals", {})
        cost = generation_cost(s) if stage == "generate" else {}
        gpu = cost.get("gpu_s_per_image")
        made = totals.get("images_made") or 0
        rows.append([
            stage, f.stage_state(stage), totals.get("images", ""), totals.get("images_per_s") or "",
            totals.get("wall_s", ""), round(gpu * made, 2) if gpu else "", f.fingerprints[stage],
        ])  # fmt: skip
    headers = ["stage", "state", "images", "images/s", "wall s", "GPU-s (generation)", "fingerprint"]
    return h.section("Stages", h.table(headers, rows, numeric=[False, False, True, True, True, True, False]))


def _samples_section(f: RunFiles) -> str:
    loc, name = f.run_dir.samples_location()
    data = read_file(loc, name)
    if data is None:
        return ""
    return h.section("Sample grid (originals and their PDA variants)", h.png(data, "sample grid", "plot"))


def _gallery_section(f: RunFiles, images: dict[int, list[tuple[bytes, str]]]) -> str:
    if not images:
        return h.section("Per-class gallery", h.missing("no images yet: the generate stage has written no shard"))
    rows = []
    for c in f.classes[:GALLERY_CLASSES]:
        imgs = "".join(h.png(p, c["name"], "pix", cap) for p, cap in images.get(c["label"], []))
        rows.append(f"<div class='gallery-row'><span class='name'>{c['label']}: {h.esc(c['name'])}</span>{imgs}</div>")
    note = ""
    if len(f.classes) > GALLERY_CLASSES:
        note = f"<p class='muted'>the first {GALLERY_CLASSES} of {len(f.classes)} classes</p>"
    return h.section("Per-class gallery (the first images trained on)", note + "\n".join(rows))


def _curves_section(f: RunFiles) -> str:
    data = read_file(f.run_dir.eval, CURVE) if f.results else None
    if data is None:
        return ""
    return h.section("Training curves", h.png(data, "training curves", "plot"))


def _per_class_section(f: RunFiles) -> str:
    per_class = [r for r in (f.results or {}).get("per_class") or [] if r.get("accuracy") is not None]
    if not per_class:
        return ""
    rows = sorted(per_class, key=lambda r: (r["accuracy"], r["label"]))
    bars = h.bars(((f"{r['label']}: {r['name']}", r["accuracy"], h.percent(r["accuracy"])) for r in rows), LOW_ACCURACY)
    return h.section("Per-class test accuracy (mean over runs, lowest first)", bars, "per-class")


def _worst_section(f: RunFiles, images: dict[int, list[tuple[bytes, str]]]) -> str:
    rows = sorted(
        (r for r in (f.results or {}).get("per_class") or [] if r.get("accuracy") is not None),
        key=lambda r: (r["accuracy"], r["label"]),
    )[:WORST]
    if not rows:
        return ""
    names = {c["label"]: c["name"] for c in f.classes}
    confusion = (f.results or {}).get("confusion")
    cards = []
    for r in rows:
        confused = ""
        if confusion:
            row = list(confusion[r["label"]])
            row[r["label"]] = -1
            top = max(range(len(row)), key=row.__getitem__)
            if row[top] > 0:
                confused = f"<br>most often taken for: {h.esc(names.get(top, top))} ({row[top]} test images)"
        imgs = "".join(h.png(p, r["name"], "pix", cap) for p, cap in images.get(r["label"], []))
        cards.append(
            f"<div><b>{r['label']}: {h.esc(r['name'])}</b> ({h.esc(r['class_id'])}) — {h.percent(r['accuracy'])}"
            f"<br>prompt: <span class='mono'>{h.esc(r.get('prompt'))}</span>{confused}<br>{imgs}</div>"
        )
    return h.section("Worst classes", f"<div class='worst'>{''.join(cards)}</div>", "worst")


def _config_section(f: RunFiles) -> str:
    fps = h.key_values(sorted(f.fingerprints.items()))
    cfg = json.dumps(f.record.get("config"), indent=2)
    shared = ""
    if f.record.get("stage_dirs"):
        shared = "<h3>Shared stage folders</h3>" + h.key_values(sorted(f.record["stage_dirs"].items()))
    inner = (
        f"<h3>Fingerprints</h3>{fps}{shared}<details><summary>Resolved config (run.json)</summary>"
        f"<pre class='mono'>{h.esc(cfg)}</pre></details>"
    )
    return h.section("Config and fingerprints", inner)


def run_page(run_dir: RunDir) -> str:
    f = RunFiles(run_dir)
    cfg = f.cfg
    labels = [c["label"] for c in f.classes[:GALLERY_CLASSES]]
    worst = [r["label"] for r in sorted(
        (r for r in (f.results or {}).get("per_class") or [] if r.get("accuracy") is not None),
        key=lambda r: (r["accuracy"], r["label"]),
    )[:WORST]]  # fmt: skip
    images = f.class_images(sorted(set(labels) | set(worst)), GALLERY_IMAGES)
    what = (cfg.dataset or cfg.classes) if cfg else "?"
    title = f"gdd-ray run: {what}, IPC {cfg.ipc if cfg else '?'}"
    subtitle = f"{run_dir.uri} · {len(f.classes)} classes · updated {f.record.get('updated', '?')}"
    return h.page(
        title,
        subtitle,
        [
            _accuracy_section(f),
            _stages_section(f),
            _samples_section(f),
            _gallery_section(f, images),
            _curves_section(f),
            _per_class_section(f),
            _worst_section(f, images),
            _config_section(f),
        ],
    )


def write_run_page(run_dir: RunDir, quiet: bool = False) -> str | None:
    """Write OUT/report.html; returns its path, or None when it could not be made: the page is a view of the
    run, never a reason to fail one, so the error is one line (none with `quiet`: a failed stage's own error
    is the one to see)."""
    try:
        text = run_page(run_dir)
        run_dir.root.write_bytes(PAGE, text.encode())
    except Exception as e:  # noqa: BLE001 - any bug in the page must not stop a run that finished its stage
        if not quiet:
            say("report", f"{storage.join(run_dir.uri, PAGE)} not written ({type(e).__name__}: {e})")
        return None
    return storage.join(run_dir.uri, PAGE)
