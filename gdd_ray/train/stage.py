"""Stage 3: evaluate the distilled set, the way the field does, as a Ray Train job.

driver   read the shards once (OUT/augmented/ when present, else OUT/generated/), read the real test set,
         check labels, sizes and class lists against each other, put both in the object store
workers  TorchTrainer workers (one per GPU; one per CPU on a CPU-only cluster); worker k trains the runs
         k, k+W, ... (independent seeds, no gradient sync) with the whole set in device memory
driver   gather the runs, write results.json, metrics.jsonl and curve.png

OUT/eval/results.json           accuracy of each run, mean, std, every hyperparameter, wall time (written last)
OUT/eval/_summary.json          the same document, under the name every stage's summary has
OUT/eval/metrics.jsonl          one line per (run, epoch): lr, train loss/acc, test acc every --eval-every
OUT/eval/curve.png              training curves of every run
OUT/eval/runs/run00.json        a finished run (a rerun skips it)
OUT/eval/metrics/run00.jsonl    a run's metrics so far (rewritten at each checkpoint)
OUT/eval/checkpoints/run00.pt   a run's latest checkpoint (every --checkpoint-every epochs; a rerun resumes)
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import Any

import numpy as np

from gdd_ray import storage
from gdd_ray.classes import ClassInfo
from gdd_ray.config import RunConfig
from gdd_ray.config import fingerprint as hash_of
from gdd_ray.errors import UserError
from gdd_ray.run import RunDir, now_iso
from gdd_ray.train import testsets
from gdd_ray.train.convnet import ConvNet, NetSpec, num_parameters
from gdd_ray.train.data import check_alignment, load_shards, mean_std
from gdd_ray.train.loop import LocationCheckpointer, Protocol

RESULTS = "results.json"
# Options that change no number a run computes (resume is exact), so changing them reuses finished work.
NOT_IN_FINGERPRINT = ("eval_runs", "eval_workers", "checkpoint_every", "eval_every")


def source_stage(cfg: RunConfig) -> str:
    """The data trained on: the augment stage's output when it runs or has run, else the generated shards."""
    if "augment" in cfg.stages:
        return "augment"
    if cfg.out and RunDir(cfg.out).augmented.list(".parquet"):
        return "augment"
    return "generate"


def fingerprint(cfg: RunConfig, classes: list[ClassInfo], upstream: dict[str, str]) -> str:
    src = source_stage(cfg)
    t = {k: v for k, v in vars(cfg.train).items() if k not in NOT_IN_FINGERPRINT}
    t["eval_data"] = os.path.abspath(cfg.train.eval_data) if cfg.train.eval_data else None
    return hash_of(
        {
            "data": src,
            "data_fingerprint": upstream.get(src),
            "dataset": cfg.dataset,
            "classes": [c.class_id for c in classes],
            "train": t,
        }
    )


def protocol(cfg: RunConfig) -> Protocol:
    t = cfg.train
    return Protocol(
        epochs=t.epochs,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        batch_size=t.train_batch_size,
        dsa_strategy=t.dsa_strategy,
        eval_every=t.eval_every,
        checkpoint_every=t.checkpoint_every,
    )


def net_spec(cfg: RunConfig, num_classes: int, image_size: int) -> NetSpec:
    t = cfg.train
    return NetSpec(3, num_classes, image_size, t.net_depth, t.net_width, t.net_norm, t.net_act, t.net_pool)


def _test_what(info: testsets.TestSetInfo) -> str:
    return f"{info.kind} at {info.root}"


def preflight(cfg: RunConfig, run_dir: RunDir, classes: list[ClassInfo]) -> None:
    """Everything checkable before the cluster starts; reads only, writes nothing."""
    src = source_stage(cfg)
    if src == "generate" and "generate" not in cfg.stages and not run_dir.generated.list(".parquet"):
        raise UserError(f"{run_dir.generated.uri} holds no shards to train on: run the generate stage first")
    try:
        ConvNet(net_spec(cfg, len(classes), cfg.image_size))
    except ValueError as e:
        raise UserError(f"--net-depth/--net-pool: {e}") from e
    if cfg.train.eval_data is None:
        return
    info = testsets.describe(cfg.train.eval_data)
    testsets.check_size(info, cfg.image_size, cfg.train.eval_data)
    check_alignment(classes, info.class_ids, _test_what(info))


# ---- the Ray Train worker -------------------------------------------------------------------------


class _RunCheckpointer(LocationCheckpointer):
    """The run's checkpoint, plus its metrics so far as JSON lines next to it (object stores cannot append)."""

    def __init__(self, eval_uri: str, run: int, fp: str):
        self.eval = storage.Location(eval_uri)
        super().__init__(self.eval.child("checkpoints"), f"run{run:02d}.pt")
        self.run, self.fp = run, fp

    def load(self) -> dict[str, Any] | None:
        state = super().load()
        return state if state is not None and state.get("fingerprint") == self.fp else None

    def save(self, state: dict[str, Any]) -> None:
        state["fingerprint"] = self.fp
        super().save(state)
        lines = "".join(json.dumps(r) + "\n" for r in state["history"])
        self.eval.child("metrics").write_bytes(f"run{self.run:02d}.jsonl", lines.encode())


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker function: the runs assigned to this rank, one after another."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from gdd_ray.train.loop import host_tensor, to_device_images, train_run

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    mine = config["runs"][rank::world]
    if mine:
        # Uploaded once per worker, then every epoch of every run reads device memory only.
        train_u8, train_labels = ray.get(config["train_ref"])
        train_x = to_device_images(train_u8, config["mean"], config["std"], device)
        train_y = torch.as_tensor(train_labels, device=device)
        test_x = test_y = None
        if config["test_ref"] is not None:
            test_u8, test_labels = ray.get(config["test_ref"])
            test_x = host_tensor(test_u8).to(device)
            test_y = torch.as_tensor(test_labels, device=device)
        spec, proto = NetSpec(**config["spec"]), Protocol(**config["protocol"])
        eval_loc = storage.Location(config["eval_uri"])
        for run in mine:
            seed = config["seed"] + run
            ckpt = _RunCheckpointer(config["eval_uri"], run, config["fingerprint"])

            def progress(row: dict[str, Any], run: int = run) -> None:
                if row["epoch"] % proto.eval_every == 0 or row["epoch"] == proto.epochs:
                    test = f", test acc {row['test_acc']:.4f}" if "test_acc" in row else ""
                    # Not print(): Ray Train patches it to tee into its logger, and every line would show twice.
                    sys.stdout.write(
                        f"[train] run {run} epoch {row['epoch']}/{proto.epochs}: loss {row['train_loss']:.4f}, "
                        f"train acc {row['train_acc']:.4f}{test} ({row['epoch_s']:.2f} s/epoch on {device})\n"
                    )
                    sys.stdout.flush()

            result = train_run(
                train_x=train_x,
                train_y=train_y,
                test_x_u8=test_x,
                test_y=test_y,
                spec=spec,
                protocol=proto,
                seed=seed,
                mean=config["mean"],
                std=config["std"],
                checkpointer=ckpt,
                on_epoch=progress,
                tag={"run": run, "seed": seed},
            )
            result.pop("history")
            result.update(run=run, rank=rank, fingerprint=config["fingerprint"], device=str(device), finished=now_iso())
            eval_loc.child("runs").write_bytes(f"run{run:02d}.json", json.dumps(result, indent=2).encode())
    # Every worker reports exactly once: report() is a barrier across the worker group.
    ray.train.report({"runs_done": len(mine)})


# ---- the driver -----------------------------------------------------------------------------------


def _finished_runs(eval_loc: storage.Location, fp: str, wanted: int) -> dict[int, dict[str, Any]]:
    done = {}
    runs = eval_loc.child("runs")
    for r in range(wanted):
        name = f"run{r:02d}.json"
        try:
            if runs.exists(name):
                res = json.loads(runs.read_bytes(name))
                if res.get("fingerprint") == fp:
                    done[r] = res
        except (OSError, ValueError):
            pass  # unreadable = not finished; the run is redone from its checkpoint
    return done


def _read_results(eval_loc: storage.Location) -> dict[str, Any] | None:
    try:
        return json.loads(eval_loc.read_bytes(RESULTS)) if eval_loc.exists(RESULTS) else None
    except (OSError, ValueError):
        return None


def _default_workers(pending: int) -> tuple[int, bool]:
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus:
        return max(1, min(pending, gpus)), True
    # One single-threaded worker per CPU: independent runs scale better than intra-op threads on small convs.
    return max(1, min(pending, int(res.get("CPU", 1)))), False


def _ray_storage(loc: storage.Location) -> str:
    return loc.path if loc.local else loc.uri


def run(cfg: RunConfig, run_dir: RunDir, classes: list[ClassInfo]) -> dict[str, Any]:
    import ray
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    started = now_iso()
    t = cfg.train
    record = run_dir.read_record() or {}
    # pipeline.check() recorded every stage's fingerprint in run.json; a direct call computes it from there.
    fp = record.get("fingerprints", {}).get("train") or fingerprint(cfg, classes, record.get("fingerprints", {}))
    eval_loc = run_dir.eval

    previous = _read_results(eval_loc)
    if previous and previous.get("fingerprint") == fp and len(previous.get("runs", [])) == t.eval_runs:
        print(f"[train] nothing to do: {storage.join(eval_loc.uri, RESULTS)} is current", flush=True)
        return previous

    src = source_stage(cfg)
    src_loc = run_dir.augmented if src == "augment" else run_dir.generated
    distilled = load_shards(src_loc)
    ms = mean_std(cfg.dataset)
    test = None
    if t.eval_data is not None:
        test = testsets.load(t.eval_data, distilled.image_size, ms)
        if len(test.labels) and test.labels.max() >= len(classes):
            raise UserError(
                f"--eval-data {t.eval_data}: labels go up to {test.labels.max()} but the run has {len(classes)} classes"
            )
    check_alignment(classes, test.info.class_ids if test else None, _test_what(test.info) if test else "", distilled)
    if test is not None and test.info.class_ids is None:
        print(f"[train] {t.eval_data} names no classes: label alignment checked by class count only", flush=True)

    spec = net_spec(cfg, len(classes), distilled.image_size)
    proto = protocol(cfg)
    eval_loc.makedirs()
    eval_loc.remove_stale_temporaries()
    done = _finished_runs(eval_loc, fp, t.eval_runs)
    pending = [r for r in range(t.eval_runs) if r not in done]
    print(
        f"[train] {len(distilled.labels)} images ({len(classes)} classes, {distilled.image_size}px) from {src_loc.uri}; "
        f"{t.eval_runs} runs x {t.epochs} epochs: {len(done)} done, {len(pending)} to do",
        flush=True,
    )
    workers, use_gpu = 0, False
    if pending:
        from gdd_ray.ray_utils import init_ray

        init_ray()  # only now: a rerun over finished runs starts nothing
        workers, use_gpu = _default_workers(len(pending))
        if t.eval_workers is not None:
            workers = min(t.eval_workers, len(pending))
        config = {
            "runs": pending,
            "seed": t.eval_seed,
            "spec": vars(spec),
            "protocol": vars(proto),
            "mean": ms[0],
            "std": ms[1],
            "fingerprint": fp,
            "eval_uri": eval_loc.uri,
            "train_ref": ray.put((distilled.images, distilled.labels)),
            "test_ref": ray.put((test.images, test.labels)) if test is not None else None,
        }
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            run_config=RayRunConfig(
                name=f"eval-{fp}-{int(time.time())}",
                storage_path=_ray_storage(eval_loc.child("_ray_train")),
                # A restarted worker group resumes every run from its checkpoint.
                failure_config=FailureConfig(max_failures=2),
            ),
        )
        trainer.fit()
        done = _finished_runs(eval_loc, fp, t.eval_runs)
        missing = [r for r in range(t.eval_runs) if r not in done]
        if missing:  # never report a mean over fewer runs than asked
            raise RuntimeError(f"runs {missing} finished without writing their result under {eval_loc.uri}/runs")

    runs = [done[r] for r in range(t.eval_runs)]
    history = _merge_metrics(eval_loc, t.eval_runs)
    eval_loc.write_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())
    accs = [r["test_acc"] for r in runs] if test is not None else []
    title = f"ConvNet depth {spec.depth} width {spec.width} on {len(distilled.labels)} images, {t.eval_runs} runs"
    if accs:
        title += f": test accuracy {100 * np.mean(accs):.2f} +- {100 * np.std(accs):.2f} % (last epoch)"
    eval_loc.write_bytes("curve.png", plot_curves(history, t.eval_runs, proto.lr_drop_epoch, title))
    results = {
        "stage": "train",
        "fingerprint": fp,
        "evaluated": test is not None,
        "accuracy_mean": float(np.mean(accs)) if accs else None,
        "accuracy_std": float(np.std(accs)) if accs else None,  # population std over runs, as DC/DSA/MTT report
        "accuracies": accs,
        "runs": runs,
        "train_set": {
            "source": src_loc.uri,
            "images": int(len(distilled.labels)),
            "classes": len(classes),
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
        "model": {**vars(spec), "parameters": num_parameters(ConvNet(spec))},
        "protocol": {
            **vars(proto),
            "lr_drop_epoch": proto.lr_drop_epoch,
            "hard_labels": True,
            "reported": "last epoch",
        },
        "normalization": {"mean": ms[0], "std": ms[1]},
        "config": {"dataset": cfg.dataset, "ipc": cfg.ipc, **vars(t)},
        "workers": workers,
        "use_gpu": use_gpu,
        "started": started,
        "finished": now_iso(),
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    run_dir.write_summary("train", results)
    eval_loc.write_bytes(RESULTS, json.dumps(results, indent=2).encode())  # last: its presence means "done"
    run_dir.update_stage("train", finished=results["finished"], accuracy_mean=results["accuracy_mean"])
    if test is None:
        print("[train] done; nothing was evaluated: no --eval-data was given, so no test accuracy exists", flush=True)
    else:
        print(
            f"[train] done: test accuracy {100 * results['accuracy_mean']:.2f} +- {100 * results['accuracy_std']:.2f} % "
            f"over {len(accs)} runs (last epoch) -> {storage.join(eval_loc.uri, RESULTS)}",
            flush=True,
        )
    return results


def _merge_metrics(eval_loc: storage.Location, n_runs: int) -> list[dict[str, Any]]:
    rows = []
    metrics = eval_loc.child("metrics")
    for r in range(n_runs):
        name = f"run{r:02d}.jsonl"
        if metrics.exists(name):
            rows += [json.loads(line) for line in metrics.read_bytes(name).decode().splitlines() if line.strip()]
    return rows


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
