"""What the train stage leaves to read: the results document, the merged metrics and the curves.

OUT/eval/results.json     accuracy of each run, mean, std, the protocol, the rows trained on, per-class
                          accuracy and the confusion matrix, every hyperparameter, wall time (written last)
                          + every evaluation (set x network x labels: `evaluations`), `cross_architecture`,
                          the real `baselines` (random subsets) and DD-Ranking's `scores` (IOR, HLR, LRS)
OUT/eval/metrics.jsonl    one line per (run, epoch): lr, train loss/acc, test acc every --eval-every
OUT/eval/curve.png        training curves of every run
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np

from gdd_ray import challenge, schema, storage, trainset
from gdd_ray.classes import ClassInfo
from gdd_ray.config import RunConfig
from gdd_ray.run import eval_run_name, now_iso
from gdd_ray.train import protocols, scores
from gdd_ray.train.data import DistilledSet
from gdd_ray.train.testsets import TestSet

RESULTS = "results.json"


def results_document(
    cfg: RunConfig,
    fp: str,
    source_uri: str,
    distilled: DistilledSet,
    test: TestSet | None,
    runs: list[dict[str, Any]],
    mean_std: tuple[list[float], list[float]],
    classes: list[ClassInfo],
    *,
    workers: int,
    use_gpu: bool,
    started: str,
    wall_s: float,
) -> dict[str, Any]:
    """results.json: every run, the mean and std of their last-epoch accuracy, per class, and what produced them."""
    from gdd_ray.train.convnet import num_parameters  # torch: not for reading results
    from gdd_ray.train.nets import build, display_name

    t = cfg.train
    first = protocols.cells(t)[0]
    accs = [r["test_acc"] for r in runs] if test is not None else []
    net = build(first.net, t, len(distilled.class_ids), distilled.image_size)
    per_class = distilled.per_class
    counts = _summed_confusion(runs)
    doc: dict[str, Any] = {
        "stage": "train",
        "fingerprint": fp,
        "evaluated": test is not None,
        "accuracy_mean": float(np.mean(accs)) if accs else None,
        "accuracy_std": float(np.std(accs)) if accs else None,  # population std over runs, as DC/DSA/MTT report
        "accuracies": accs,
        "runs": [{k: v for k, v in r.items() if k != "confusion"} for r in runs],  # each run's: runs/runNN.json
        "train_set": {
            "source": source_uri,
            "images": int(len(distilled.labels)),
            "classes": len(distilled.class_ids),
            "image_size": distilled.image_size,
            "shards": distilled.shards,
            "images_per_class": per_class[0] if len(set(per_class)) == 1 else per_class,
            "selection": trainset.for_training(cfg).describe(),
            "digest": distilled.digest(),
        },
        "per_class": per_class_results(classes, distilled, counts, len(runs)),
        # rows = true class, columns = predicted, summed over the runs (each run's: runs/runNN.json)
        "confusion": counts.tolist() if counts is not None else None,
        "test_set": (
            {
                "path": t.eval_data,
                "kind": test.info.kind,
                "images": int(len(test.labels)),
                "classes": test.info.num_classes,
            }
            if test is not None
            else None
        ),
        "model": {
            "net": first.net,
            "name": display_name(first.net, t),
            "depth": t.net_depth,
            "width": t.net_width,
            "norm": t.net_norm,
            "act": t.net_act,
            "pool": t.net_pool,
            "num_classes": len(distilled.class_ids),
            "image_size": distilled.image_size,
            "parameters": num_parameters(net),
        },  # fmt: skip
        "protocol": {
            "name": t.protocol,
            "epochs": t.epochs,
            "epochs_run": t.epochs_run,
            "lr": t.lr,
            "momentum": t.momentum,
            "weight_decay": t.weight_decay,
            "batch_size": t.train_batch_size,
            "dsa_strategy": t.dsa_strategy,
            "lr_drop_epoch": t.lr_drop_epoch,  # the first epoch at lr x0.1, or None: no drop within the run
            "epochs_counted_from": 1,  # as metrics.jsonl, the logs and the plots count
            "hard_labels": first.labels == "hard",
            "labels": first.labels,
            **({"soft": soft_protocol(t)} if first.labels == "soft" else {}),
            "reported": "last epoch",
        },  # fmt: skip
        "normalization": {"mean": mean_std[0], "std": mean_std[1]},
        "config": {"dataset": cfg.dataset, "ipc": cfg.ipc, **json.loads(json.dumps(vars(t)))},  # as read back
        "workers": workers,
        "use_gpu": use_gpu,
        "started": started,
        "finished": now_iso(),
        "wall_s": round(wall_s, 3),
    }
    # Whether this accuracy is what the ECCV 2024 evaluator would compute: the same flag `score` applies.
    verdict = challenge.official(doc, cfg.dataset)
    doc["official"], doc["official_differences"] = verdict["official"], verdict["differences"]
    return doc


def soft_protocol(t) -> dict[str, Any]:
    return {
        "epochs": t.soft_epochs, "optimizer": "AdamW", "lr": t.soft_lr, "weight_decay": t.soft_weight_decay,
        "schedule": "cosine per epoch", "temperature": t.temperature, "loss": "KL(teacher || student) x T^2",
        "teacher": t.teacher,
    }  # fmt: skip


def _acc_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    accs = [r.get("test_acc") for r in runs]
    if not accs or any(a is None for a in accs):
        return {"accuracies": [], "accuracy_mean": None, "accuracy_std": None}
    return {"accuracies": accs, "accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs))}


def protocol_results(cfg: RunConfig, plan, distilled: DistilledSet, evaluated: bool) -> dict[str, Any]:
    """results.json's evaluations beyond the headline one: every cell (training set x network x labels) with
    its accuracy, the cross-architecture table, the real baselines and DD-Ranking's scores (train.scores)."""
    from gdd_ray.train.convnet import num_parameters
    from gdd_ray.train.nets import build, display_name

    t = cfg.train
    params = {
        c.cell.net: num_parameters(build(c.cell.net, t, len(distilled.class_ids), distilled.image_size))
        for c in plan.cells
    }
    cells = []
    by: dict[tuple[str, str, str], list[float] | None] = {}
    for c in plan.cells:
        runs = [c.done[r] for r in range(plan.runs)]
        stats = _acc_stats(runs) if evaluated else _acc_stats([])
        by[(c.cell.data, c.cell.net, c.cell.labels)] = stats["accuracies"] or None
        cells.append({
            "name": c.cell.name, "data": c.cell.data, "net": c.cell.net, "net_name": display_name(c.cell.net, t),
            "labels": c.cell.labels, "parameters": params[c.cell.net], **stats,
            "epochs": runs[0].get("epochs") if runs else None, "folder": c.loc.uri, "key": c.key,
        })  # fmt: skip
    cross = []
    score_rows = []
    for net in dict.fromkeys(c.cell.net for c in plan.cells):
        row: dict[str, Any] = {"net": net, "net_name": display_name(net, t), "parameters": params[net]}
        for c in cells:
            if c["net"] == net and c["data"] == "distilled":
                row[c["labels"]] = {"mean": c["accuracy_mean"], "std": c["accuracy_std"]}
        cross.append(row)
        for labels in t.label_modes:
            distilled_accs = by.get(("distilled", net, labels))
            if distilled_accs is None:
                continue
            s = scores.scores(
                distilled_accs, by.get(("random", net, labels)), by.get(("full", net, "hard")),
                by.get(("distilled", net, "hard")) or distilled_accs,
            )  # fmt: skip
            score_rows.append({"net": net, "net_name": display_name(net, t), "labels": labels, **s})
    out: dict[str, Any] = {"evaluations": cells, "cross_architecture": cross}
    if t.labels != "hard":
        out["soft_protocol"] = soft_protocol(t)
    if plan.real is not None:
        out["baselines"] = {
            "real_train_data": t.real_train_data, "full_data": t.eval_full_data, **plan.real.describe(),
        }  # fmt: skip
        out["scores"] = score_rows
        out["scores_definition"] = scores.CITATION
    elif t.labels == "both":
        out["scores"] = score_rows
        out["scores_definition"] = scores.CITATION + " (IOR, HLR and LRS need --real-train-data --eval-full-data)"
    return out


def protocol_lines(results: dict[str, Any]) -> list[str]:
    """One log line per evaluation beyond the headline, and the scores."""
    lines = []
    for c in (results.get("evaluations") or [])[1:]:
        if c["accuracy_mean"] is not None:
            lines.append(
                f"{c['data']} {c['net_name']} {c['labels']} labels: {100 * c['accuracy_mean']:.2f} +- "
                f"{100 * c['accuracy_std']:.2f} %"
            )
    for s in results.get("scores") or []:
        parts = [
            f"{k.upper()} {100 * s[k]['mean']:.2f} +- {100 * s[k]['std']:.2f}" for k in ("ior", "hlr", "lrs") if s[k]
        ]
        if parts:
            lines.append(f"{s['net_name']} {s['labels']} labels (DD-Ranking): " + ", ".join(parts))
    return lines


def _summed_confusion(runs: list[dict[str, Any]]) -> np.ndarray | None:
    mats = [np.asarray(r["confusion"], dtype=np.int64) for r in runs if r.get("confusion") is not None]
    return np.sum(mats, axis=0) if mats and len(mats) == len(runs) else None


def per_class_results(
    classes: list[ClassInfo], distilled: DistilledSet, counts: np.ndarray | None, n_runs: int
) -> list[dict[str, Any]]:
    """Per class: its ids, prompt, images trained on, and test accuracy (mean over runs; None untested)."""
    trained = distilled.per_class
    out = []
    for c in classes:
        row: dict[str, Any] = {"label": c.label, "class_id": c.class_id, "name": c.name}
        row["prompt"] = (distilled.prompts or {}).get(c.label)
        row["images"] = trained[c.label] if c.label < len(trained) else 0
        if counts is not None and c.label < len(counts):
            tested = int(counts[c.label].sum())
            row["test_images"] = tested // max(1, n_runs)
            row["accuracy"] = float(counts[c.label, c.label]) / tested if tested else None
        out.append(row)
    return out


def json_text(obj: Any) -> str:
    """Indented JSON with each list of numbers on one line (a 200 x 200 confusion matrix stays readable)."""
    text = json.dumps(obj, indent=2)
    return re.sub(r"\[\s+([-0-9.eE+,\s]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)


def finished_runs(
    eval_loc: storage.Location, fp: str, wanted: int, source_manifest: str | None
) -> dict[int, dict[str, Any]]:
    """Runs 0..wanted-1 whose result file exists and was trained under this fingerprint on the set read from
    the source manifest of this digest (None: any, for readers that only count)."""
    done = {}
    runs = eval_loc.child("runs")
    for r in range(wanted):
        name = f"{eval_run_name(r)}.json"
        res = schema.read_or_none(runs, name, schema.EVAL_RUN)  # unreadable = not finished: redone from its checkpoint
        if res is not None and res["fingerprint"] == fp and source_manifest in (None, res.get("source_manifest")):
            done[r] = res
    return done


def read_results(eval_loc: storage.Location) -> dict[str, Any] | None:
    return schema.read_or_none(eval_loc, RESULTS, schema.RESULTS)


def merge_metrics(eval_loc: storage.Location, n_runs: int, others: list | None = None) -> list[dict[str, Any]]:
    """Every run's metrics (eval/metrics/runNN.jsonl) as one list, run by run, then those of the other cells
    (their rows carry the cell's name)."""
    rows = []
    for loc in [eval_loc, *(c.loc for c in others or [])]:
        metrics = loc.child("metrics")
        for r in range(n_runs):
            name = f"{eval_run_name(r)}.jsonl"
            if not metrics.exists(name):
                continue
            for line in metrics.read_bytes(name).decode(errors="replace").split("\n"):
                if not line.strip():
                    continue
                try:  # a damaged line (the file is rewritten whole at each checkpoint) loses that row only
                    rows.append(schema.load(line, schema.METRICS_ROW, name, limit=2**20))
                except ValueError:
                    continue
    return rows


def write_outputs(eval_loc: storage.Location, results: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """metrics.jsonl, curve.png, then results.json last: its presence means the evaluation is done."""
    eval_loc.write_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())
    accs = results["accuracies"]
    history = [h for h in history if "cell" not in h]  # the headline evaluation's curves
    model = results["model"]
    name = model.get("name") or f"ConvNet depth {model['depth']} width {model['width']}"
    title = (
        f"{name} on "
        f"{results['train_set']['images']} images, {len(results['runs'])} runs, {results['protocol']['name']} protocol"
    )
    if accs:
        title += f": test accuracy {100 * np.mean(accs):.2f} +- {100 * np.std(accs):.2f} % (last epoch)"
    lr_drop = results["protocol"]["lr_drop_epoch"] if results["protocol"].get("hard_labels", True) else None
    eval_loc.write_bytes("curve.png", plot_curves(history, len(results["runs"]), lr_drop, title))
    eval_loc.write_bytes(RESULTS, json_text(results).encode())


def plot_curves(history: list[dict[str, Any]], n_runs: int, lr_drop: int | None = None, title: str = "") -> bytes:
    """PNG: training loss (left) and train/test accuracy (right) per epoch (counted from 1), one colour per run;
    `lr_drop`: the first epoch at lr x0.1, marked between it and the epoch before."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for r in range(n_runs):
        rows = [h for h in history if h.get("run") == r]
        if not rows:
            continue
        ep = [h["epoch"] for h in rows]
        color = f"C{r % 10}"
        ax_loss.plot(ep, [h["train_loss"] for h in rows], color=color, label=f"run {r}")
        ax_acc.plot(ep, [h["train_acc"] for h in rows], color=color, alpha=0.5, label=f"run {r} train")
        tests = [(h["epoch"], h["test_acc"]) for h in rows if h.get("test_acc") is not None]
        if tests:
            ax_acc.plot(*zip(*tests), color=color, marker="o", linestyle="--", label=f"run {r} test")
    ax_loss.set(xlabel="epoch", ylabel="train loss (cross-entropy)", title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy (train: augmented batches)", ylim=(0, 1))
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers, counted from 1
        if lr_drop:
            ax.axvline(lr_drop - 0.5, color="grey", linestyle=":", linewidth=1, label=f"lr x0.1 from epoch {lr_drop}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
