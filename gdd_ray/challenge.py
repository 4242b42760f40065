"""The ECCV 2024 Dataset Distillation Challenge's rules, as its evaluator applies them.

The evaluator loads `<submission dir>/cifar100.pt` and `<submission dir>/tinyimagenet.pt`, each a bare float
tensor N x 3 x H x W normalised with the dataset's mean/std, asserts N = 10 x classes and H = W = 32 / 64,
labels image i as class i // 10 (position only: no label file is read), trains ConvNetD3 for epochs + 1
epochs (lr x0.1 after epoch index epochs // 2 + 1) three times, and scores the mean test accuracy of the
two datasets. The train stage's `--protocol challenge` follows the same schedule (config.TrainConfig);
this module holds the file rules, which the export writes and `load_submission` reads back, and the
combined score:

    python -m gdd_ray score runs/c100 runs/tiny      {"score": ..., "cifar100": ..., "tiny-imagenet": ...}
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from gdd_ray.errors import UserError
from gdd_ray.selection import CHALLENGE_IPC

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


def combined_score(results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The challenge's score from {dataset: results.json} when both datasets have a challenge-protocol
    accuracy: the mean of the two mean accuracies. None while one is missing."""
    accs = {}
    for dataset in FILES:
        res = results.get(dataset) or {}
        if res.get("protocol", {}).get("name") == "challenge" and res.get("accuracy_mean") is not None:
            accs[dataset] = res["accuracy_mean"]
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


def run_from_args(args: argparse.Namespace) -> int:
    results: dict[str, dict[str, Any]] = {}
    for run in args.runs:
        dataset, res = read_results(run)
        if dataset not in FILES:
            raise UserError(
                f"{run} distils {dataset or 'a custom class list'}; the score takes CIFAR-100 and Tiny-ImageNet"
            )
        if (res.get("protocol") or {}).get("name") != "challenge":
            raise UserError(f"{run} was not trained under --protocol challenge: its accuracy is not the challenge's")
        results[dataset] = res
    score = combined_score(results)
    if score is None:
        raise UserError("give one CIFAR-100 run and one Tiny-ImageNet run, both evaluated (--eval-data)")
    print(json.dumps(score))
    return 0
