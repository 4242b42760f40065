"""What the train stage leaves to read: the results document, the merged metrics and the curves.

OUT/eval/results.json     accuracy of each run, mean, std, every hyperparameter, wall time (written last)
OUT/eval/metrics.jsonl    one line per (run, epoch): lr, train loss/acc, test acc every --eval-every
OUT/eval/curve.png        training curves of every run
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from gdd_ray import storage
from gdd_ray.config import RunConfig
from gdd_ray.run import eval_run_name, now_iso
from gdd_ray.train.convnet import ConvNet, num_parameters
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
    *,
    workers: int,
    use_gpu: bool,
    started: str,
    wall_s: float,
) -> dict[str, Any]:
    """results.json: every run, the mean and std of their last-epoch accuracy, and what produced them."""
    t = cfg.train
    accs = [r["test_acc"] for r in runs] if test is not None else []
    net = ConvNet.from_config(t, len(distilled.class_ids), distilled.image_size)
    return {
        "stage": "train",
        "fingerprint": fp,
        "evaluated": test is not None,
        "accuracy_mean": float(np.mean(accs)) if accs else None,
        "accuracy_std": float(np.std(accs)) if accs else None,  # population std over runs, as DC/DSA/MTT report
        "accuracies": accs,
        "runs": runs,
        "train_set": {
            "source": source_uri,
            "images": int(len(distilled.labels)),
            "classes": len(distilled.class_ids),
            "image_size": distilled.image_size,
            "shards": distilled.shards,
        },
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
            "epochs": t.epochs,
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


def finished_runs(eval_loc: storage.Location, fp: str, wanted: int) -> dict[int, dict[str, Any]]:
    """Runs 0..wanted-1 whose result file exists and carries this fingerprint."""
    done = {}
    runs = eval_loc.child("runs")
    for r in range(wanted):
        name = f"{eval_run_name(r)}.json"
        try:
            if runs.exists(name):
                res = json.loads(runs.read_bytes(name))
                if res.get("fingerprint") == fp:
                    done[r] = res
        except (OSError, ValueError):
            pass  # unreadable = not finished; the run is redone from its checkpoint
    return done


def read_results(eval_loc: storage.Location) -> dict[str, Any] | None:
    try:
        return json.loads(eval_loc.read_bytes(RESULTS)) if eval_loc.exists(RESULTS) else None
    except (OSError, ValueError):
        return None


def merge_metrics(eval_loc: storage.Location, n_runs: int) -> list[dict[str, Any]]:
    """Every run's metrics (eval/metrics/runNN.jsonl) as one list, run by run."""
    rows = []
    metrics = eval_loc.child("metrics")
    for r in range(n_runs):
        name = f"{eval_run_name(r)}.jsonl"
        if metrics.exists(name):
            rows += [json.loads(line) for line in metrics.read_bytes(name).decode().splitlines() if line.strip()]
    return rows


def write_outputs(eval_loc: storage.Location, results: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """metrics.jsonl, curve.png, then results.json last: its presence means the evaluation is done."""
    eval_loc.write_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())
    accs = results["accuracies"]
    title = (
        f"ConvNet depth {results['model']['depth']} width {results['model']['width']} on "
        f"{results['train_set']['images']} images, {len(results['runs'])} runs"
    )
    if accs:
        title += f": test accuracy {100 * np.mean(accs):.2f} +- {100 * np.std(accs):.2f} % (last epoch)"
    lr_drop = results["protocol"]["lr_drop_epoch"]
    eval_loc.write_bytes("curve.png", plot_curves(history, len(results["runs"]), lr_drop, title))
    eval_loc.write_bytes(RESULTS, json.dumps(results, indent=2).encode())


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
