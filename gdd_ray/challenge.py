"""The ECCV 2024 Dataset Distillation Challenge's rules, as its evaluator applies them.

The evaluator loads `<submission dir>/cifar100.pt` and `<submission dir>/tinyimagenet.pt`, each a bare float
tensor N x 3 x H x W normalised with the dataset's mean/std, asserts N = 10 x classes and H = W = 32 / 64,
labels image i as class i // 10 (position only: no label file is read), trains ConvNetD3 for epochs + 1
epochs (lr x0.1 after epoch index epochs // 2 + 1) three times, and scores the mean test accuracy of the
two datasets. The train stage's `--protocol challenge` follows the same schedule (config.TrainConfig);
this module holds the file rules, which the export writes and `load_submission` reads back.
"""

from __future__ import annotations

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
