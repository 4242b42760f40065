"""What the train stage leaves to read: the results document, the merged metrics and the curves.

OUT/eval/results.json     accuracy of each run, mean, std, the protocol, the rows trained on, per-class
                          accuracy and the confusion matrix, every hyperparameter, wall time (written last)
OUT/eval/metrics.jsonl    one line per (run, epoch): lr, train loss/acc, test acc every --eval-every
OUT/eval/curve.png        training curves of every run
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np

from gdd_ray import schema, selection, storage
from gdd_ray.classes import ClassInfo
from gdd_ray.config import RunConfig
from gdd_ray.run import eval_run_name, now_iso
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
    from gdd_ray.train.convnet import ConvNet, num_parameters  # torch: not for reading results

    t = cfg.train
    accs = [r["test_acc"] for r in runs] if test is not None else []
    net = ConvNet.from_config(t, len(distilled.class_ids), distilled.image_size)
    per_class = distilled.per_class
    counts = _summed_confusion(runs)
    return {
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
            "selection": selection.for_training(cfg).describe(),
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
            "lr_drop_epoch": t.lr_drop_epoch,
            "hard_labels": True,
            "reported": "last epoch",
        },  # fmt: skip
        "normalization": {"mean": mean_std[0], "std": mean_std[1]},
        "config": {"dataset": cfg.dataset, "ipc": cfg.ipc, **vars(t)},
        "workers": workers,
        "use_gpu": use_gpu,
        "started": started,
        "finished": now_iso(),
        "wall_s": round(wall_s, 3),
    }


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


def worst_classes(results: dict[str, Any], n: int = 5) -> list[dict[str, Any]]:
    """The n classes with the lowest test accuracy (ties: label order)."""
    rows = [r for r in results.get("per_class") or [] if r.get("accuracy") is not None]
    return sorted(rows, key=lambda r: (r["accuracy"], r["label"]))[:n]


def json_text(obj: Any) -> str:
    """Indented JSON with each list of numbers on one line (a 200 x 200 confusion matrix stays readable)."""
    text = json.dumps(obj, indent=2)
    return re.sub(r"\[\s+([-0-9.eE+,\s]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)


def finished_runs(eval_loc: storage.Location, fp: str, wanted: int) -> dict[int, dict[str, Any]]:
    """Runs 0..wanted-1 whose result file exists and carries this fingerprint."""
    done = {}
    runs = eval_loc.child("runs")
    for r in range(wanted):
        name = f"{eval_run_name(r)}.json"
        res = schema.read_or_none(runs, name, schema.EVAL_RUN)  # unreadable = not finished: redone from its checkpoint
        if res is not None and res["fingerprint"] == fp:
            done[r] = res
    return done


def read_results(eval_loc: storage.Location) -> dict[str, Any] | None:
    return schema.read_or_none(eval_loc, RESULTS, schema.RESULTS)


def merge_metrics(eval_loc: storage.Location, n_runs: int) -> list[dict[str, Any]]:
    """Every run's metrics (eval/metrics/runNN.jsonl) as one list, run by run."""
    rows = []
    metrics = eval_loc.child("metrics")
    for r in range(n_runs):
        name = f"{eval_run_name(r)}.jsonl"
        if metrics.exists(name):
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
    title = (
        f"ConvNet depth {results['model']['depth']} width {results['model']['width']} on "
        f"{results['train_set']['images']} images, {len(results['runs'])} runs, {results['protocol']['name']} protocol"
    )
    if accs:
        title += f": test accuracy {100 * np.mean(accs):.2f} +- {100 * np.std(accs):.2f} % (last epoch)"
    lr_drop = results["protocol"]["lr_drop_epoch"]
    eval_loc.write_bytes("curve.png", plot_curves(history, len(results["runs"]), lr_drop, title))
    eval_loc.write_bytes(RESULTS, json_text(results).encode())


def plot_curves(history: list[dict[str, Any]], n_runs: int, lr_drop: int | None = None, title: str = "") -> bytes:
    """PNG: training loss (left) and train/test accuracy (right) per epoch, one colour per run."""
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
    for ax in (ax_loss, ax_acc):
        if lr_drop:
            ax.axvline(lr_drop + 0.5, color="grey", linestyle=":", linewidth=1, label="lr x0.1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
