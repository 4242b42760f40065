"""The ECCV 2024 Dataset Distillation Challenge's rules, as its evaluator applies them.

The evaluator loads `<submission dir>/cifar100.pt` and `<submission dir>/tinyimagenet.pt`, each a bare float
tensor N x 3 x H x W normalised with the dataset's mean/std, asserts N = 10 x classes and H = W = 32 / 64,
labels image i as class i // 10 (position only: no label file is read), trains ConvNetD3 for epochs + 1
epochs (lr x0.1 after epoch index epochs // 2 + 1) three times, and scores the mean test accuracy of the
two datasets. The train stage's `--protocol challenge` follows the same schedule (config.TrainConfig);
this module holds the file rules, which the export writes and `load_submission` reads back, and the
combined score, and what makes a number the challenge's score: the evaluator's own settings (OFFICIAL). A run
at any other setting gets no score unless asked (`--unofficial`), and then one marked `"official": false` with
every difference named:

    python -m gdd_ray score runs/c100 runs/tiny      {"score": ..., "cifar100": ..., "tiny-imagenet": ..., "official": true}
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from gdd_ray.errors import UserError
from gdd_ray.trainset import CHALLENGE_IPC

# dataset (our name) -> (the file the evaluator opens, classes, image size)
FILES = {"cifar100": ("cifar100.pt", 100, 32), "tiny-imagenet": ("tinyimagenet.pt", 200, 64)}


def submission_file(dataset: str | None) -> str:
    if dataset not in FILES:
        raise UserError(
            f"the challenge takes CIFAR-100 and Tiny-ImageNet only; this run distils {dataset or 'a custom class list'}"
        )
    return FILES[dataset][0]


def expected_shape(dataset: str) -> tuple[int, int, int, int]:
    _, classes, size = FILES[dataset]
    return (CHALLENGE_IPC * classes, 3, size, size)


def position_labels(num_classes: int, per_class: int = CHALLENGE_IPC):
    """What the evaluator makes of a tensor's order: image i is class i // per_class."""
    import torch

    return torch.arange(num_classes, dtype=torch.long).repeat_interleave(per_class)


def load_submission(folder: str, dataset: str):
    """(images, labels) as the evaluator gets them from `folder`: the file it opens, torch.load, its shape
    asserts, labels by position. Raises UserError where the evaluator would fail."""
    import os

    import torch

    path = os.path.join(folder, submission_file(dataset))
    data = torch.load(path)
    if not isinstance(data, torch.Tensor):
        raise UserError(f"{path} holds a {type(data).__name__}; the evaluator needs a bare tensor")
    want = expected_shape(dataset)
    if tuple(data.shape) != want:
        raise UserError(f"{path} is {tuple(data.shape)}; the evaluator asserts {want}")
    return data.float(), position_labels(FILES[dataset][1])


# What the official evaluator does, setting by setting (its evaluate.py: ConvNetD3, 3 rounds of epochs + 1 epochs,
# SGD, DSA, 10 images per class, the full real test set). (results.json path, official value, how it is named).
OFFICIAL_DSA = "color_crop_cutout_flip_scale_rotate"
OFFICIAL_TEST_IMAGES = 10_000  # CIFAR-100's test set, Tiny-ImageNet's val set: the evaluator tests on all of it
OFFICIAL: tuple[tuple[str, Any, str], ...] = (
    ("protocol.name", "challenge", "protocol"),
    ("protocol.epochs", 1000, "epochs"),
    ("runs", 3, "runs (--eval-runs)"),
    ("model.depth", 3, "net-depth"),
    ("model.width", 128, "net-width"),
    ("model.norm", "instance", "net-norm"),
    ("model.act", "relu", "net-act"),
    ("model.pool", "avg", "net-pool"),
    ("protocol.batch_size", 256, "train-batch-size"),
    ("protocol.lr", 0.01, "lr"),
    ("protocol.momentum", 0.9, "momentum"),
    ("protocol.weight_decay", 5e-4, "weight-decay"),
    ("protocol.dsa_strategy", OFFICIAL_DSA, "dsa-strategy"),
    ("train_set.images_per_class", CHALLENGE_IPC, "images per class"),
)


def _field(results: dict[str, Any], path: str) -> Any:
    if path == "runs":  # how many runs were averaged: the accuracies themselves
        return len(results.get("accuracies") or results.get("runs") or [])
    value: Any = results
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _same(path: str, got: Any, want: Any) -> bool:
    if path == "protocol.dsa_strategy":  # one op drawn per batch: the order of the list changes no distribution
        return isinstance(got, str) and sorted(got.lower().split("_")) == sorted(want.split("_"))
    if isinstance(want, float):
        return isinstance(got, (int, float)) and abs(got - want) <= 1e-12 * max(1.0, abs(want))
    return got == want


def differences(results: dict[str, Any], dataset: str | None) -> list[str]:
    """Every setting of a run's results.json that is not the official evaluator's, as 'epochs 4 (official
    1000)'; [] when the run's accuracy is what the evaluator would compute on its set."""
    out = []
    if dataset not in FILES:
        out.append(f"dataset {dataset or 'a custom class list'} (official: cifar100 or tiny-imagenet)")
    for path, want, name in OFFICIAL:
        got = _field(results, path)
        if not _same(path, got, want):
            out.append(f"{name} {_shown(got)} (official {_shown(want)})")
    if dataset in FILES:
        size = (results.get("train_set") or {}).get("image_size")
        if size != FILES[dataset][2]:
            out.append(f"image size {_shown(size)} (official {FILES[dataset][2]})")
    test = results.get("test_set") or {}
    if not results.get("evaluated") or not test:
        out.append("no test set (official: the real test set)")
    elif test.get("images") != OFFICIAL_TEST_IMAGES:
        out.append(f"test images {test.get('images')} (official: the full test set, {OFFICIAL_TEST_IMAGES})")
    return out


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return f"{min(value)}..{max(value)}" if value else "none"
    return "none" if value is None else str(value)


def official(results: dict[str, Any], dataset: str | None) -> dict[str, Any]:
    """{"official": bool, "differences": [...]}: what results.json and the report page carry."""
    diffs = differences(results, dataset)
    return {"official": not diffs, "differences": diffs}


def combined_score(accuracies: dict[str, float]) -> dict[str, Any] | None:
    """The challenge's score from {dataset: mean test accuracy}: the mean of the two. None while one is missing."""
    accs = {d: accuracies[d] for d in FILES if accuracies.get(d) is not None}
    if len(accs) != len(FILES):
        return None
    return {"score": sum(accs.values()) / len(accs), **accs}


# ---- command line (python -m gdd_ray score): the combined score of a CIFAR-100 run and a Tiny-ImageNet run ----


def read_results(run: str) -> tuple[str, dict[str, Any]]:
    """(dataset, results.json) of the run at `run`, from its run.json and OUT/eval/results.json."""
    from gdd_ray import schema, storage
    from gdd_ray.run import RunDir

    run_dir = RunDir.open(run)
    record = run_dir.read_record()
    if record is None:
        raise UserError(f"{storage.join(run, 'run.json')} does not exist: no run was started at {run}")
    name = "results.json"
    if not run_dir.eval.exists(name):
        raise UserError(f"{storage.join(run_dir.eval.uri, name)} does not exist: run the train stage first")
    from gdd_ray.config import RunConfig

    dataset = RunConfig.from_dict(record.get("config") or {}, storage.join(run, "run.json")).dataset
    return dataset, schema.read(run_dir.eval, name, schema.RESULTS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs=2, metavar="RUN", help="A CIFAR-100 run and a Tiny-ImageNet run (--out folders).")
    p.add_argument(
        "--unofficial",
        action="store_true",
        help="Score runs that are not at the official evaluator's settings (fewer epochs or runs, another network, "
        'optimizer, augmentation...): the output says "official": false and names each difference.',
    )


def score(runs: list[str], unofficial: bool = False) -> dict[str, Any]:
    """The combined score of a CIFAR-100 run and a Tiny-ImageNet run; UserError when it cannot be one."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for run in runs:
        dataset, res = read_results(run)
        if dataset not in FILES:
            raise UserError(
                f"{run} distils {dataset or 'a custom class list'}; the score takes CIFAR-100 and Tiny-ImageNet"
            )
        if dataset in found:
            raise UserError(
                f"{found[dataset][0]} and {run} are both {dataset} runs: the score is the mean of one CIFAR-100 run "
                "and one Tiny-ImageNet run"
            )
        if not res.get("evaluated") or res.get("accuracy_mean") is None:
            raise UserError(f"{run} has no test accuracy: it was trained without --eval-data")
        found[dataset] = (run, res)
    diffs = {d: differences(res, d) for d, (_, res) in found.items()}
    named = "; ".join(f"{found[d][0]}: {', '.join(v)}" for d, v in diffs.items() if v)
    if named and not unofficial:
        raise UserError(
            f"not the challenge's settings, so not its score ({named}); rerun at the official settings, "
            'or add --unofficial for a number marked "official": false'
        )
    out = combined_score({d: res["accuracy_mean"] for d, (_, res) in found.items()})
    assert out is not None  # one run of each dataset, both evaluated
    out["official"] = not named
    if named:
        out["differences"] = {d: v for d, v in diffs.items() if v}
    return out


def run_from_args(args: argparse.Namespace) -> int:
    print(json.dumps(score(args.runs, args.unofficial)))
    return 0
