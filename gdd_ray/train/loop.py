"""One evaluation run of the standard DD protocol: train a fresh ConvNet on the distilled set, test it.

    SGD(lr, momentum, weight decay), cross-entropy, hard labels, batches of 256 with one DSA op per batch;
    at `lr_drop_epoch` the lr drops x0.1 and the optimizer is recreated (its momentum is reset); the
    accuracy reported is the test accuracy after the LAST epoch, never the best one seen, with the last
    test's confusion matrix (per-class accuracy comes from it).

How many epochs and where the lr drops is the protocol's (TrainConfig.epochs_run / lr_drop_epoch): `paper`
runs exactly `epochs` and drops at epochs // 2, as the protocol is usually stated; `challenge` runs
epochs + 1 and drops after epoch index epochs // 2 + 1, as the DC/MTT reference code and the ECCV 2024
challenge evaluator do. The protocol's values are the train section of the run config itself.

The whole training set lives on the device as one normalised tensor and batches are index slices of a
device-side permutation: no DataLoader, no host-to-device copy per batch. Checkpoints hold everything
(model, optimizer, lr, both random generators, the metrics so far), so a resumed run computes the same
numbers as one that never stopped.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gdd_ray.config import TrainConfig
from gdd_ray.plan import derive_seed
from gdd_ray.train.convnet import ConvNet
from gdd_ray.train.dsa import DSA


class Checkpointer:
    """Where one run keeps its checkpoint; `load` returns None when there is none."""

    def load(self) -> dict[str, Any] | None:
        raise NotImplementedError

    def save(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


def load_checkpoint(data: bytes, where: str) -> dict[str, Any]:
    """A checkpoint's state, read by torch's weights-only unpickler: tensors, numbers, strings, lists and dicts,
    never an object of another class, so a file planted in the run folder (a shared bucket) cannot run code in
    the workers that resume from it. Anything else, or a damaged file, is a UserError: it is left as it is."""
    import pickle

    from gdd_ray.errors import UserError

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        why = " ".join(str(e).split())[:160] or type(e).__name__
        raise UserError(
            f"{where} is not a checkpoint gdd-ray wrote ({type(e).__name__}: {why}); it was not loaded: look at it, "
            "then delete it to train that run from its first epoch"
        ) from e
    if not isinstance(state, dict):
        raise UserError(f"{where} is not a checkpoint gdd-ray wrote (it holds a {type(state).__name__}); delete it")
    return state


class LocationCheckpointer(Checkpointer):
    """A checkpoint file in a storage.Location (local or object store), replaced atomically."""

    def __init__(self, loc, name: str):
        self.loc, self.name = loc, name

    def load(self) -> dict[str, Any] | None:
        if not self.loc.exists(self.name):
            return None
        from gdd_ray import storage

        return load_checkpoint(self.loc.read_bytes(self.name), storage.join(self.loc.uri, self.name))

    def save(self, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        self.loc.write_bytes(self.name, buf.getvalue())


def host_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Wrap without copying. Arrays from the object store are read-only and torch warns about that; nothing
    here writes to them (they are only ever copied to the device)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(array)


def to_device_images(images: np.ndarray | torch.Tensor, mean: list[float], std: list[float], device) -> torch.Tensor:
    """uint8 N x H x W x 3 -> normalised float N x 3 x H x W on `device` (the upload happens once, as uint8)."""
    x = host_tensor(images).to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def _optimizer(model: torch.nn.Module, lr: float, p: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=p.momentum, weight_decay=p.weight_decay)


@torch.no_grad()
def confusion(
    model: torch.nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, num_classes: int, mean, std, batch: int
) -> torch.Tensor:
    """C x C counts (row = true class, column = predicted) on uint8 NHWC images already on the device,
    normalised batch by batch (a test set can be big)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(num_classes * num_classes, dtype=torch.long, device=labels.device)
    for i in range(0, len(labels), batch):
        x = to_device_images(images_u8[i : i + batch], mean, std, labels.device)
        pairs = labels[i : i + batch] * num_classes + model(x).argmax(1)
        counts += torch.bincount(pairs, minlength=num_classes * num_classes)
    model.train(was_training)
    return counts.view(num_classes, num_classes).cpu()


def accuracy(counts: torch.Tensor) -> float:
    return counts.diagonal().sum().item() / max(1, counts.sum().item())


def evaluate(model: torch.nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, mean, std, batch: int) -> float:
    """Accuracy on uint8 NHWC images already on the device."""
    return accuracy(confusion(model, images_u8, labels, model.classifier.out_features, mean, std, batch))


def train_run(
    *,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x_u8: torch.Tensor | None,
    test_y: torch.Tensor | None,
    config: TrainConfig,
    num_classes: int,
    seed: int,
    mean: list[float],
    std: list[float],
    checkpointer: Checkpointer | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    tag: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one ConvNet from `seed`; train_x is normalised NCHW on the device, test_x_u8 raw NHWC on the device.

    Returns the run's result and its per-epoch metrics. `on_epoch` sees each epoch's metrics (and may
    raise: the tests use it to simulate a crash between checkpoints).
    """
    device = train_x.device
    p = config
    torch.manual_seed(derive_seed(seed, "init"))
    model = ConvNet.from_config(p, num_classes, int(train_x.shape[-1])).to(device)
    shuffle = torch.Generator(device=device)
    shuffle.manual_seed(derive_seed(seed, "shuffle"))
    dsa = DSA(p.dsa_strategy, device, derive_seed(seed, "dsa"))
    lr = p.lr
    optimizer = _optimizer(model, lr, p)
    history: list[dict[str, Any]] = []
    start_epoch, seconds_before = 0, 0.0
    last_confusion: torch.Tensor | None = None

    state = checkpointer.load() if checkpointer else None
    if state is not None:
        model.load_state_dict(state["model"])
        lr = state["lr"]
        optimizer = _optimizer(model, lr, p)
        optimizer.load_state_dict(state["optimizer"])
        shuffle.set_state(state["shuffle"])
        dsa.load_state(state["dsa"])
        history, start_epoch, seconds_before = state["history"], state["epoch"], state["seconds"]
        last_confusion = state.get("confusion")

    n = len(train_y)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, p.epochs_run):
        if epoch == p.lr_drop_epoch and epoch > 0:
            lr *= 0.1
            optimizer = _optimizer(model, lr, p)
        te = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        perm = torch.randperm(n, device=device, generator=shuffle)
        for i in range(0, n, p.train_batch_size):
            idx = perm[i : i + p.train_batch_size]
            x, y = dsa(train_x[idx]), train_y[idx]
            out = model(x)
            loss = F.cross_entropy(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Accumulated on the device: one host sync per epoch instead of one per batch.
            loss_sum += loss.detach() * len(y)
            correct += (out.argmax(1) == y).sum()
        row: dict[str, Any] = dict(tag or {})
        row.update(
            epoch=epoch + 1,
            lr=lr,
            train_loss=loss_sum.item() / n,
            train_acc=correct.item() / n,
            epoch_s=round(time.perf_counter() - te, 4),
        )
        last = epoch + 1 == p.epochs_run
        if test_x_u8 is not None and (last or (epoch + 1) % p.eval_every == 0):
            counts = confusion(model, test_x_u8, test_y, num_classes, mean, std, max(p.train_batch_size, 1024))
            row["test_acc"] = accuracy(counts)
            if last:
                last_confusion = counts
        history.append(row)
        if on_epoch:
            on_epoch(row)
        if checkpointer and ((epoch + 1) % p.checkpoint_every == 0 or last):
            checkpointer.save(
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "lr": lr,
                    "shuffle": shuffle.get_state(),
                    "dsa": dsa.state(),
                    "history": history,
                    "seconds": seconds_before + time.perf_counter() - t0,
                    "config": asdict(p),
                    "seed": seed,
                    "confusion": last_confusion,
                }
            )
    final = history[-1] if history else {}
    return {
        "seed": seed,
        "test_acc": final.get("test_acc"),
        "train_acc": final.get("train_acc"),
        "train_loss": final.get("train_loss"),
        "epochs": p.epochs_run,
        "resumed_from_epoch": start_epoch,
        "confusion": last_confusion.tolist() if last_confusion is not None else None,
        "train_s": round(seconds_before + time.perf_counter() - t0, 3),
        "history": history,
    }
