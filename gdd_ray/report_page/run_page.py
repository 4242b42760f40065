"""OUT/report.html: one run on one page, built from its files alone (run.json, the summaries, the shards,
samples.png, eval/results.json, eval/curve.png), so it shows whatever exists: the pipeline rewrites it
after every stage, and a run stopped half way has a page of what it finished.

Sections: accuracy with its protocol (and whether it is at the challenge evaluator's settings), the
cross-architecture and baseline table (networks, labels, random-real and full-data accuracy, DD-Ranking's
IOR/HLR/LRS), the stages (images, images/s, generation GPU-seconds and this run's share of them, the folders
shared with other runs), the select stage's CLIP figures, the sample grid, a per-class gallery of the images
trained on, training curves, per-class accuracy bars, the worst classes with their prompt and images, and the
config with every fingerprint. A sweep point's page speaks of the point: its IPC and K, its share of the shared
generation.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from gdd_ray import challenge, schema, shards, storage, trainset
from gdd_ray import results as results_doc
from gdd_ray.config import STAGES, RunConfig
from gdd_ray.errors import UserError
from gdd_ray.logs import say
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
    """The generation's cost, each figure one thing: render GPU-seconds per image (the workers' render time;
    CPU seconds on a CPU-only run), images per render-second, and the stage's wall time (model load, queueing
    and encoding included) apart."""
    if not summary:
        return {"gpu_s_per_image": None, "images_per_gpu_s": None, "wall_s": None, "images_per_s": None}
    totals = summary.get("totals", {})
    made = totals.get("images_made") or 0
    render = sum(w.get("render_s", 0.0) for w in (summary.get("per_worker") or {}).values())
    return {
        "gpu_s_per_image": render / made if made and render else None,
        "images_per_gpu_s": made / render if made and render else None,
        "wall_s": totals.get("wall_s"),
        "images_per_s": totals.get("images_per_s"),  # wall-clock: images made over the stage's work time
    }


def generation_share(summary: dict[str, Any] | None, images_used: int) -> float | None:
    """Render GPU-seconds of the `images_used` generated images a run trains on (a sweep point reads a prefix
    of a larger shared generation: its share, not the whole)."""
    per_image = generation_cost(summary)["gpu_s_per_image"]
    return per_image * images_used if per_image else None


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
        self.point: dict[str, Any] | None = self.record.get("sweep_point")
        self.shared: dict[str, str] = dict(self.record.get("stage_dirs") or {})

    @property
    def trained_ipc(self) -> int | None:
        """Images per class (before PDA) the run trains on: its --train-ipc prefix (a sweep point's IPC), else
        --ipc (or the IPC a time budget reached)."""
        if self.cfg is None:
            return None
        ipc = self.cfg.ipc
        gen = self.summaries.get("generate") or {}
        if isinstance(gen.get("ipc_reached"), int) and gen.get("fingerprint") == self.fingerprints.get("generate"):
            ipc = min(ipc, gen["ipc_reached"])
        t = self.cfg.train
        return min(t.train_ipc, ipc) if t.train_ipc is not None and "train" in self.fingerprints else ipc

    @property
    def trained_k(self) -> int | None:
        """PDA variants per image the run trains on; None without an augment stage."""
        if self.cfg is None or "augment" not in self.fingerprints:
            return None
        k, t = self.cfg.augment.pda_variants, self.cfg.train
        return min(t.train_variants, k) if t.train_variants is not None and "train" in self.fingerprints else k

    def stage_state(self, stage: str) -> str:
        summary = self.summaries.get(stage)
        if summary and summary.get("fingerprint") == self.fingerprints.get(stage):
            return "complete"
        started = self.record.get("stages", {}).get(stage, {}).get("started")
        return "incomplete" if started else "not run yet"

    def image_source(self) -> tuple[storage.Location, list[str]] | None:
        """The shards the run trains on, as run.json records the train stage's source (an earlier record: its
        augmented set, else its selected one, else its generated one); those that exist so far when that stage is not finished."""
        recorded = (self.record.get("sources") or {}).get("train")
        for stage in [recorded] if recorded else ("augment", "select", "generate"):
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
        choice = trainset.for_training(self.cfg)
        k1 = (choice.variants or 0) + 1
        enough = max(n * 8, (choice.per_class or 0) * k1)  # the protocol's pick looks at a class's first rows
        rows = shards.first_rows(
            loc, names, len(self.classes), labels, enough, ["image", "index", "variant"], choice.ipc
        )
        out = {}
        for label in labels:
            table = rows.filter(pa.compute.equal(rows.column("label"), label))
            if not table.num_rows:
                continue
            cols = [table.column(c).to_numpy() for c in ("label", "index", "variant")]
            try:
                keep = trainset.choose(*cols, choice)[:n]
            except UserError:  # fewer rows than the protocol takes (an unfinished run): show what exists
                keep = trainset.choose(*cols, trainset.RowChoice(choice.ipc, choice.variants))[:n]
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
    verdict = challenge.official(res, f.cfg.dataset if f.cfg else None)
    if verdict["official"]:
        settings = "the official evaluator's: this accuracy is what `score` takes"
    else:
        settings = "not the official evaluator's: " + "; ".join(verdict["differences"])
    rows = [
        ("protocol", f"{results_doc.schedule(p)} (epochs counted from 1), accuracy of the "
         f"{p.get('reported', 'last epoch')}" if p.get("hard_labels", True) else
         f"soft labels: {p['soft']['epochs']} epochs, AdamW + cosine, KL at T = {p['soft']['temperature']}, "
         f"teacher {p['soft']['teacher']}, accuracy of the {p.get('reported', 'last epoch')}"),
        ("challenge settings", settings),
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


def _protocols_section(f: RunFiles) -> str:
    """Every network and label mode on the distilled set and its real baselines, with DD-Ranking's scores."""
    res = f.results or {}
    evaluations = res.get("evaluations") or []
    if len(evaluations) < 2:
        return ""
    acc = {(e["data"], e["net"], e["labels"]): e for e in evaluations}
    scores = {(s["net"], s["labels"]): s for s in res.get("scores") or []}
    rows = []
    for e in evaluations:
        if e["data"] != "distilled":
            continue
        key = (e["net"], e["labels"])

        def cell(data: str, labels: str, key=key) -> str:
            got = acc.get((data, key[0], labels))
            return h.percent(got["accuracy_mean"], got["accuracy_std"]) if got else ""

        s = scores.get(key) or {}
        score = [h.percent(s[k]["mean"], s[k]["std"]) if s.get(k) else "" for k in ("ior", "hlr", "lrs")]
        rows.append([e["net_name"], e["labels"], f"{e['parameters']:,}", cell("distilled", e["labels"]),
                     cell("random", e["labels"]), cell("full", "hard"), *score])  # fmt: skip
    headers = ["network", "labels", "parameters", "distilled", "random real", "full real (hard)", "IOR", "HLR", "LRS"]
    note = ""
    if res.get("scores_definition"):
        note = f"<p class='muted'>{h.esc(res['scores_definition'])}</p>"
    base = res.get("baselines")
    if base:
        subsets = ", ".join(
            f"run {s['run']}: {s['images']} images, digest {s['digest']}" for s in base["random_subsets"]
        )
        note += f"<p class='muted'>real training set {h.esc(base['real_train_data'])} ({base['images']} images); "
        note += f"random subsets {h.esc(subsets)}</p>"
    table = h.table(headers, rows, numeric=[False, False, True, True, True, True, True, True, True])
    return h.section("Cross-architecture and baselines", table + note, "protocols")


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
        where = f"shared: {f.shared[stage]}" if stage in f.shared else "this run's"
        rows.append([
            stage, f.stage_state(stage), where, totals.get("images", ""), totals.get("images_per_s") or "",
            totals.get("wall_s", ""), round(gpu * made, 3) if gpu else "", f.fingerprints[stage],
        ])  # fmt: skip
    headers = ["stage", "state", "output", "images", "images/s", "wall s", "render GPU-s", "fingerprint"]
    table = h.table(headers, rows, numeric=[False, False, False, True, True, True, True, False])
    return h.section("Stages", table + _share_note(f))


def _share_note(f: RunFiles) -> str:
    """What the run's own images cost when it trains on fewer than its generation holds (a sweep point)."""
    gen = f.summaries.get("generate")
    ipc = f.trained_ipc
    if not gen or ipc is None or gen.get("fingerprint") != f.fingerprints.get("generate"):
        return ""
    used = ipc * len(f.classes)
    total = (gen.get("totals") or {}).get("images") or 0
    share = generation_share(gen, used)
    if share is None:
        return ""
    whole = generation_share(gen, total) if total else None
    if used >= total or whole is None:
        return f"<p>Generation cost of this run: {share:.3f} render GPU-s ({used} images).</p>"
    return (
        f"<p>Generation cost of this run: <b>{share:.3f} render GPU-s</b>, its share: it trains on images "
        f"0..{ipc - 1} of each class, {used} of the {total} images the generation holds ({whole:.3f} GPU-s in all, "
        "shared with the runs that read it).</p>"
    )


def _select_section(f: RunFiles) -> str:
    """The select stage's figures (OUT/selected/clip_stats.json): kept vs every candidate, overall and per class."""
    if "select" not in f.fingerprints:
        return ""
    stats = read_json(f.run_dir.selected, "clip_stats.json")
    if not stats or stats.get("fingerprint") != f.fingerprints["select"]:
        return h.section("CLIP selection", h.missing("the select stage has not finished: no figures yet"))

    def num(v: Any, pct: bool = False) -> Any:
        if v is None:
            return "—"
        return f"{100 * v:.1f} %" if pct else f"{v:.4f}"

    o = stats.get("overall") or {}
    overall = h.table(
        ["", "kept", "all candidates"],
        [
            ["CLIP score (image vs its class prompt, mean)", num(o.get("score_mean")), num(o.get("score_mean_all"))],
            ["zero-shot top-1 (its prompt is the closest)", num(o.get("top1"), True), num(o.get("top1_all"), True)],
            ["diversity (mean pairwise cosine distance)", num(o.get("diversity")), num(o.get("diversity_all"))],
        ],
        numeric=[False, True, True],
    )
    per_class = []
    for c in stats.get("classes") or []:
        per_class.append([
            c.get("label"), c.get("name"), c.get("candidates"), c.get("kept"),
            (num(c.get("score_mean")), c.get("score_mean") or 0), (num(c.get("score_mean_all")), c.get("score_mean_all") or 0),
            (num(c.get("top1"), True), c.get("top1") or 0), (num(c.get("top1_all"), True), c.get("top1_all") or 0),
            (num(c.get("diversity")), c.get("diversity") or 0), (num(c.get("diversity_all")), c.get("diversity_all") or 0),
        ])  # fmt: skip
    headers = ["label", "class", "candidates", "kept", "score kept", "score all", "top-1 kept", "top-1 all",
               "diversity kept", "diversity all"]  # fmt: skip
    table = h.table(headers, per_class, sortable=True, numeric=[True, False] + [True] * 8)
    intro = (
        f"<p class='muted'>{h.esc(stats.get('clip_model'))}: every generated candidate scored against every class "
        "prompt; the IPC best-scored kept per class.</p>"
    )
    inner = intro + overall + f"<details><summary>Per class ({len(per_class)})</summary>{table}</details>"
    return h.section("CLIP selection (kept vs all candidates)", inner, "select-section")


def _samples_section(f: RunFiles) -> str:
    loc, name = f.run_dir.samples_location()
    data = read_file(loc, name)
    if data is None:
        return ""
    made_k = (f.summaries.get("augment") or {}).get("variants")
    if f.trained_k is not None and made_k is not None and f.trained_k < made_k:
        note = (
            f"The PDA this run reads made K = {made_k} variants per image; this run trains on K = {f.trained_k} "
            "(variants 0..K), so its sample grid would show images it never trained on: the gallery below shows "
            "what it trained on."
        )
        return h.section("Sample grid", f"<p class='muted'>{h.esc(note)}</p>")
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
    if f.shared:
        shared = "<h3>Sources: stage folders shared with other runs</h3>" + h.key_values(sorted(f.shared.items()))
    if f.point:
        shared += "<h3>Sweep point</h3>" + h.key_values([
            ("sweep", f.point.get("sweep")), ("point", f.point.get("name")),
            *((k, json.dumps(v)) for k, v in (f.point.get("values") or {}).items()),
        ])  # fmt: skip
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
    ident = f"IPC {f.trained_ipc if cfg else '?'}" + (f", K {f.trained_k}" if f.trained_k is not None else "")
    if f.point:
        title = f"gdd-ray sweep point {f.point.get('name')}: {what}, {ident}"
    else:
        title = f"gdd-ray run: {what}, {ident}"
    subtitle = f"{run_dir.uri} · {len(f.classes)} classes · updated {f.record.get('updated', '?')}"
    if f.point:
        subtitle += f" · a point of the sweep {f.point.get('sweep')}"
    return h.page(
        title,
        subtitle,
        [
            _accuracy_section(f),
            _protocols_section(f),
            _stages_section(f),
            _select_section(f),
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
