"""Two or more runs side by side, from their files alone (run.json, the summaries, eval/results.json): sweep
points too (their shared folders are followed).

    python -m gdd_ray compare runs/a runs/b [runs/c ...] [--html compare.html] [--classes 5]

Prints a text table and writes compare.html (one self-contained page in the report pages' style):
  - the config keys that differ (run.json's resolved config; what each run trains on: IPC and K)
  - accuracy mean ± std over runs and its delta from the first run, the protocol and whether it is at the
    challenge evaluator's settings
  - per class (when the runs share a class list): the classes that gained and lost most against the first
    run, with the prompts their images were drawn from
  - the digest of the set each trained on (equal digests: the same pixels, labels and order), the generation's
    render GPU-seconds of the images each trained on, and its wall time
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from gdd_ray import challenge, storage
from gdd_ray import results as results_doc
from gdd_ray.errors import UserError
from gdd_ray.report_page import html as h
from gdd_ray.report_page.run_page import RunFiles, generation_cost, generation_share, read_file
from gdd_ray.run import RunDir

IGNORED = ("out", "overwrite", "track", "track_uri", "track_experiment", "shared_local_out")  # not what a run is


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if k in ("generate", "clip", "augment", "train") and isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        elif k not in IGNORED:
            out[k] = v
    return out


def load(run: str) -> dict[str, Any]:
    """What compare needs of one run; UserError when there is no run at `run`."""
    run_dir = RunDir.open(run)
    f = RunFiles(run_dir)
    if not f.record.get("config"):
        raise UserError(f"{storage.join(run, 'run.json')} does not exist: no run was started at {run}")
    res = f.results or {}
    gen = f.summaries.get("generate")
    used = (f.trained_ipc or 0) * len(f.classes)
    cost = generation_cost(gen)
    config = _flat(f.record["config"])
    config["trained IPC"], config["trained K"] = f.trained_ipc, f.trained_k
    return {
        "path": run,
        "name": (f.point or {}).get("name") or run.rstrip("/").rsplit("/", 1)[-1],
        "files": f,
        "config": config,
        "results": res,
        "accuracy_mean": res.get("accuracy_mean"),
        "accuracy_std": res.get("accuracy_std"),
        "runs": len(res.get("accuracies") or []),
        "schedule": results_doc.schedule(res["protocol"]) if res.get("protocol") else None,
        "official": challenge.official(res, f.cfg.dataset if f.cfg else None)["official"] if res else None,
        "digest": (res.get("train_set") or {}).get("digest"),
        "generation_gpu_s": generation_share(gen, used) if used else None,
        "generation_wall_s": cost["wall_s"],
        "per_class": {c["label"]: c for c in res.get("per_class") or []},
        "class_ids": [c.get("class_id") for c in f.classes],
    }


def differing_keys(runs: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in runs for k in r["config"]})
    return [k for k in keys if len({json.dumps(r["config"].get(k), sort_keys=True) for r in runs}) > 1]


def class_changes(a: dict[str, Any], b: dict[str, Any], n: int) -> tuple[list[dict], list[dict]] | None:
    """(the n classes that gained most, the n that lost most) from run a to run b; None when the two do not
    share a class list or lack per-class accuracy."""
    if a["class_ids"] != b["class_ids"] or not a["per_class"] or not b["per_class"]:
        return None
    rows = []
    for label, ca in a["per_class"].items():
        cb = b["per_class"].get(label)
        if cb is None or ca.get("accuracy") is None or cb.get("accuracy") is None:
            continue
        rows.append({
            "label": label, "name": ca.get("name"), "before": ca["accuracy"], "after": cb["accuracy"],
            "delta": cb["accuracy"] - ca["accuracy"], "prompt_a": ca.get("prompt"), "prompt_b": cb.get("prompt"),
        })  # fmt: skip
    gained = sorted((r for r in rows if r["delta"] > 0), key=lambda r: (-r["delta"], r["label"]))[:n]
    lost = sorted((r for r in rows if r["delta"] < 0), key=lambda r: (r["delta"], r["label"]))[:n]
    return gained, lost


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def _delta(v: float | None, base: float | None) -> str:
    return "" if v is None or base is None else f"{100 * (v - base):+.2f}"


def _num(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def summary_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    base = runs[0]["accuracy_mean"]
    rows = []
    for i, r in enumerate(runs):
        acc = "not trained" if r["accuracy_mean"] is None else f"{_pct(r['accuracy_mean'])} ± {_pct(r['accuracy_std'])}"
        rows.append([
            "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[i] if i < 26 else str(i), r["name"], acc, "" if i == 0 else _delta(r["accuracy_mean"], base),
            str(r["runs"]), {True: "yes", False: "no", None: "—"}[r["official"]], r["digest"] or "—",
            _num(r["generation_gpu_s"]), _num(r["generation_wall_s"], 1),
        ])  # fmt: skip
    return rows


SUMMARY_HEADERS = ["", "run", "accuracy %", "Δ vs A (pp)", "runs", "official", "train-set digest",
                   "gen GPU-s (its images)", "gen wall s (whole generation)"]  # fmt: skip


def text_report(runs: list[dict[str, Any]], n: int) -> str:
    """The terminal's table: the runs, the keys that differ, the classes that moved most."""

    def table(headers: list[str], rows: list[list[str]]) -> list[str]:
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        return [fmt.format(*headers), fmt.format(*("-" * w for w in widths))] + [fmt.format(*map(str, r)) for r in rows]

    lines = table(SUMMARY_HEADERS, summary_rows(runs))
    letters = [row[0] for row in summary_rows(runs)]
    lines += [f"  {x}: {r['path']}" for x, r in zip(letters, runs)]
    keys = differing_keys(runs)
    lines.append("")
    if keys:
        rows = [[k, *(_short(r["config"].get(k)) for r in runs)] for k in keys]
        lines += table(["config (differs)", *letters], rows)
    else:
        lines.append("config: the same in every run (but --out)")
    if all(r["digest"] and r["digest"] == runs[0]["digest"] for r in runs[1:]):
        lines.append("every run trained on the same set (equal digests)")
    for x, r in zip(letters[1:], runs[1:]):
        changes = class_changes(runs[0], r, n)
        lines.append("")
        if changes is None:
            lines.append(f"per class, A -> {x}: not comparable (another class list, or no per-class accuracy)")
            continue
        for title, items in (("gained most", changes[0]), ("lost most", changes[1])):
            lines.append(f"per class, A -> {x}, {title}:")
            lines += [
                f"  {c['label']:>4} {c['name']:<24.24} {_pct(c['before']):>6} -> {_pct(c['after']):>6} "
                f"({_delta(c['after'], c['before'])} pp)  prompt: {_prompts(c)}"
                for c in items
            ] or ["  (none)"]
    return "\n".join(lines)


def _short(v: Any, limit: int = 40) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _prompts(c: dict[str, Any]) -> str:
    a, b = c.get("prompt_a"), c.get("prompt_b")
    return f"{a!r}" if a == b else f"{a!r} -> {b!r}"


def html_report(runs: list[dict[str, Any]], n: int) -> str:
    letters = [row[0] for row in summary_rows(runs)]
    sections = [
        h.section(
            "Runs",
            h.table(
                SUMMARY_HEADERS,
                summary_rows(runs),
                sortable=True,
                numeric=[False, False, True, True, True, False, False, True, True],
            )  # fmt: skip
            + h.key_values((x, f"{r['path']} — {r['schedule'] or 'not trained'}") for x, r in zip(letters, runs)),
        )
    ]
    keys = differing_keys(runs)
    if keys:
        rows = [[k, *(_short(r["config"].get(k), 80) for r in runs)] for k in keys]
        sections.append(h.section("Config keys that differ", h.table(["key", *letters], rows)))
    else:
        sections.append(h.section("Config keys that differ", "<p>none (but --out)</p>"))
    for x, r in zip(letters[1:], runs[1:]):
        changes = class_changes(runs[0], r, n)
        if changes is None:
            sections.append(h.section(f"Per class, A → {x}", h.missing("not comparable: another class list, or no "
                                                                       "per-class accuracy")))  # fmt: skip
            continue
        inner = ""
        for title, items in (("gained most", changes[0]), ("lost most", changes[1])):
            rows = [[c["label"], c["name"], _pct(c["before"]), _pct(c["after"]), _delta(c["after"], c["before"]),
                     _prompts(c)] for c in items]  # fmt: skip
            inner += f"<h3>{h.esc(title)}</h3>" + (
                h.table(
                    ["label", "class", "A %", f"{x} %", "Δ pp", "prompt"],
                    rows,
                    numeric=[True, False, True, True, True, False],
                )  # fmt: skip
                if rows
                else "<p class='muted'>none</p>"
            )
        sections.append(h.section(f"Per class, A → {x}: the classes that moved most", inner))
    curves = []
    for x, r in zip(letters, runs):
        data = read_file(r["files"].run_dir.eval, "curve.png") if r["results"] else None
        if data:
            curves.append(f"<h3>{h.esc(x)}: {h.esc(r['name'])}</h3>" + h.png(data, f"curves of {r['name']}", "plot"))
    if curves:
        sections.append(h.section("Training curves", "".join(curves)))
    title = "gdd-ray compare: " + " vs ".join(r["name"] for r in runs)
    return h.page(title, f"{len(runs)} runs · A is the reference of every delta", sections)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="Two or more run folders (--out of distill, or sweep points)."
    )
    p.add_argument("--html", default="compare.html", help="Where to write the HTML page (default ./compare.html).")
    p.add_argument("--classes", type=int, default=5, help="Classes shown that gained and lost most (default 5).")


def run_from_args(args: argparse.Namespace) -> int:
    if len(args.runs) < 2:
        raise UserError("compare takes two or more runs")
    if args.classes < 1:
        raise UserError(f"--classes must be at least 1, got {args.classes}")
    runs = [load(r if "://" in r else os.path.abspath(r)) for r in args.runs]
    print(text_report(runs, args.classes))
    html_path = os.path.abspath(args.html)
    storage.Location(os.path.dirname(html_path)).write_bytes(
        os.path.basename(html_path), html_report(runs, args.classes).encode()
    )
    print(f"[compare] {html_path}")
    return 0
