"""Evaluation runs: train fresh networks on a training set (the distilled one, or a real baseline), test them.

Hard labels (the standard DD protocol): SGD(lr, momentum, weight decay), cross-entropy, batches of 256 with
one DSA op per batch; from epoch `lr_drop_epoch` on (epochs counted from 1, as in metrics.jsonl) the lr is x0.1
and the optimizer is recreated (its momentum is reset); the accuracy reported is the test accuracy after the
LAST epoch, never the best one seen, with the last test's confusion matrix (per-class accuracy comes from it).
Soft labels: the same batches relabelled by a teacher on the device, KL divergence at a temperature, AdamW with
a cosine lr over --soft-epochs.

How many epochs and where the lr drops is the protocol's (TrainConfig.epochs_run / lr_drop_epoch): `paper`
runs exactly `epochs` and drops from epoch epochs // 2 + 1, as the protocol is usually stated; `challenge`
runs epochs + 1 and drops after epoch index epochs // 2 + 1 (from epoch epochs // 2 + 3), as the DC/MTT
reference code and the ECCV 2024 challenge evaluator do. The protocol's values are the train section of the
run config itself.

The whole training set lives on the device as one tensor and batches are index slices of a device-side
permutation: no DataLoader, no host-to-device copy per batch. Several runs of one ConvNet can train at once
(train.at_once); each keeps its own generators, so its batches and augmentations are the ones it draws alone.
Checkpoints hold everything of a run (model, optimizer, lr, both random generators, the metrics so far), so a
resumed run computes the same numbers as one that never stopped, alone or in a group.
"""

from __future__ import annotations

import io
import math
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
from gdd_ray.train.at_once import StackedConvNet, split_optimizer_state, stack_optimizer_states
from gdd_ray.train.dsa import DSA
from gdd_ray.train.nets import build as build_net


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


class Schedule:
    """The optimizer and the learning rate of each epoch. Hard labels (the DD protocol): SGD, lr x0.1 from
    `lr_drop_epoch` (counted from 1), where the optimizer is recreated (its momentum reset) as the reference code does. Soft
    labels (SRe2L/RDED-style): AdamW with a cosine decay of the lr per epoch, over --soft-epochs."""

    def __init__(self, p: TrainConfig, labels: str = "hard"):
        self.p, self.soft = p, labels == "soft"
        self.epochs = p.soft_epochs if self.soft else p.epochs_run
        self.first_lr = p.soft_lr if self.soft else p.lr

    def make(self, params, lr: float) -> torch.optim.Optimizer:
        p = self.p
        if self.soft:
            return torch.optim.AdamW(params, lr=lr, weight_decay=p.soft_weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=p.momentum, weight_decay=p.weight_decay)

    def at_epoch(self, epoch: int, lr: float, optimizer, params) -> tuple[float, torch.optim.Optimizer]:
        """(lr, optimizer) for `epoch`, called at its start."""
        if self.soft:
            lr = self.p.soft_lr * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
            for group in optimizer.param_groups:
                group["lr"] = lr
            return lr, optimizer
        if self.p.lr_drop_epoch is not None and epoch + 1 == self.p.lr_drop_epoch:  # `epoch` counts from 0 here
            lr *= 0.1
            optimizer = self.make(params, lr)
        return lr, optimizer


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


class Models:
    """The models of the runs trained together: one plain model (R = 1: exactly the single-run arithmetic),
    or R ConvNets stacked into one (train.at_once). The loop sees [R, B, classes] logits either way."""

    def __init__(self, models: list[torch.nn.Module]):
        self.runs = len(models)
        self.module = models[0] if self.runs == 1 else StackedConvNet(models)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.module.parameters()) if self.runs == 1 else self.module.ordered_parameters()

    def logits(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.module(xs[0]).unsqueeze(0) if self.runs == 1 else self.module(xs)

    def state(self, run: int) -> dict[str, torch.Tensor]:
        return self.module.state_dict() if self.runs == 1 else self.module.run_state_dict(run)

    def load(self, states: list[dict[str, torch.Tensor]]) -> None:
        if self.runs == 1:
            self.module.load_state_dict(states[0])
        else:
            self.module.load_run_state_dicts(states)

    def optimizer_states(self, optimizer) -> list[dict[str, Any]]:
        state = optimizer.state_dict()
        return [state] if self.runs == 1 else split_optimizer_state(state, self.runs)

    def load_optimizer(self, optimizer, states: list[dict[str, Any]]) -> None:
        optimizer.load_state_dict(states[0] if self.runs == 1 else stack_optimizer_states(states))

    @torch.no_grad()
    def confusions(self, images_u8, labels, num_classes: int, mean, std, batch: int) -> list[torch.Tensor]:
        if self.runs == 1:
            return [confusion(self.module, images_u8, labels, num_classes, mean, std, batch)]
        was_training = self.module.training
        self.module.eval()
        counts = torch.zeros(self.runs, num_classes * num_classes, dtype=torch.long, device=labels.device)
        for i in range(0, len(labels), batch):
            x = to_device_images(images_u8[i : i + batch], mean, std, labels.device)
            pred = self.module(x.unsqueeze(0).expand(self.runs, *x.shape)).argmax(2)
            for r in range(self.runs):
                counts[r] += torch.bincount(labels[i : i + batch] * num_classes + pred[r], minlength=num_classes**2)
        self.module.train(was_training)
        return [c.view(num_classes, num_classes).cpu() for c in counts]


def hard_loss(outs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Each run's mean cross-entropy, [R]."""
    if outs.shape[0] == 1:  # the single run's own arithmetic, bit for bit
        return F.cross_entropy(outs[0], ys[0]).unsqueeze(0)
    return F.cross_entropy(outs.flatten(0, 1), ys.flatten(), reduction="none").view(ys.shape).mean(1)


def soft_loss(outs: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each run's KL(teacher || student) at the temperature, x T^2 (Hinton et al.), batch mean, [R]."""
    log_s = F.log_softmax(outs / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean(-1) * temperature * temperature


def take(x: torch.Tensor, idx: torch.Tensor, mean, std) -> torch.Tensor:
    """Rows `idx` as normalised NCHW: a small set is held normalised, a whole real training set as uint8 NHWC
    (a quarter of the memory) and normalised batch by batch, by the same arithmetic."""
    return to_device_images(x[idx], mean, std, x.device) if x.dtype == torch.uint8 else x[idx]


def train_run(*, seed: int, checkpointer: Checkpointer | None = None, tag: dict[str, Any] | None = None, **kw) -> dict:
    """One run: train_runs with R = 1 (train_x a tensor, not a list)."""
    kw["train_x"], kw["train_y"] = [kw["train_x"]], [kw["train_y"]]
    return train_runs(seeds=[seed], checkpointers=[checkpointer] if checkpointer else None, tags=[tag or {}], **kw)[0]


def train_runs(
    *,
    train_x: list[torch.Tensor],
    train_y: list[torch.Tensor],
    test_x_u8: torch.Tensor | None,
    test_y: torch.Tensor | None,
    config: TrainConfig,
    num_classes: int,
    seeds: list[int],
    mean: list[float],
    std: list[float],
    net: str = "convnet",
    labels: str = "hard",
    teacher: torch.nn.Module | None = None,
    checkpointers: list[Checkpointer] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    tags: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Train one network per seed, all at once (R = len(seeds) > 1 stacks ConvNets: train.at_once); run r
    trains on train_x[r] (normalised NCHW, or uint8 NHWC for a large set) on the device, is tested on
    test_x_u8 (raw NHWC on the device). Every run's checkpoint must be at the same epoch (or absent).

    Returns each run's result with its per-epoch metrics. `on_epoch` sees each run's epoch metrics (and may
    raise: the tests use it to simulate a crash between checkpoints).
    """
    device = train_x[0].device
    p, runs = config, len(seeds)
    n = len(train_y[0])
    if any(len(y) != n for y in train_y):
        raise ValueError("runs trained at once need training sets of the same size")
    if labels == "soft" and teacher is None:
        raise ValueError("soft labels need a teacher")
    size = int(train_x[0].shape[-1] if train_x[0].dtype != torch.uint8 else train_x[0].shape[1])
    built = []
    for seed in seeds:
        torch.manual_seed(derive_seed(seed, "init"))
        built.append(build_net(net, p, num_classes, size).to(device))
    models = Models(built)
    shuffles = [torch.Generator(device=device) for _ in seeds]
    for g, seed in zip(shuffles, seeds):
        g.manual_seed(derive_seed(seed, "shuffle"))
    dsas = [DSA(p.dsa_strategy, device, derive_seed(seed, "dsa")) for seed in seeds]
    schedule = Schedule(p, labels)
    params = models.parameters()
    lr = schedule.first_lr
    optimizer = schedule.make(params, lr)
    histories: list[list[dict[str, Any]]] = [[] for _ in seeds]
    start_epoch, seconds_before = 0, [0.0] * runs
    last_confusion: list[torch.Tensor | None] = [None] * runs
    tags = tags or [{} for _ in seeds]

    states = [c.load() for c in checkpointers] if checkpointers else [None] * runs
    if any(s is not None for s in states):
        if any(s is None for s in states) or len({s["epoch"] for s in states}) != 1:
            raise ValueError("runs trained at once must resume from the same epoch")
        models.load([s["model"] for s in states])
        lr = states[0]["lr"]
        optimizer = schedule.make(params, lr)
        models.load_optimizer(optimizer, [s["optimizer"] for s in states])
        for r, s in enumerate(states):
            shuffles[r].set_state(s["shuffle"])
            dsas[r].load_state(s["dsa"])
            histories[r], seconds_before[r] = s["history"], s["seconds"]
            last_confusion[r] = s.get("confusion")
        start_epoch = states[0]["epoch"]

    t0 = time.perf_counter()
    models.module.train()
    bs = p.train_batch_size
    for epoch in range(start_epoch, schedule.epochs):
        lr, optimizer = schedule.at_epoch(epoch, lr, optimizer, params)
        te = time.perf_counter()
        loss_sums = torch.zeros(runs, device=device)
        corrects = torch.zeros(runs, dtype=torch.long, device=device)
        perms = [torch.randperm(n, device=device, generator=g) for g in shuffles]
        for i in range(0, n, bs):
            idx = [perm[i : i + bs] for perm in perms]
            xs = [dsas[r](take(train_x[r], idx[r], mean, std)) for r in range(runs)]
            ys = torch.stack([train_y[r][idx[r]] for r in range(runs)])
            outs = models.logits(xs)
            if labels == "soft":
                with torch.no_grad():  # on the training device; never read back on the host
                    target = teacher(torch.cat(xs)).view(runs, len(idx[0]), -1)
                losses = soft_loss(outs, target, p.temperature)
            else:
                losses = hard_loss(outs, ys)
            loss = losses[0] if runs == 1 else losses.sum()  # runs are independent: each gets its own gradient
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Accumulated on the device: one host sync per epoch instead of one per batch.
            loss_sums += losses.detach() * ys.shape[1]
            corrects += (outs.detach().argmax(2) == ys).sum(1)
        epoch_s = round(time.perf_counter() - te, 4)
        last = epoch + 1 == schedule.epochs
        tested = test_x_u8 is not None and (last or (epoch + 1) % p.eval_every == 0)
        counts = models.confusions(test_x_u8, test_y, num_classes, mean, std, max(bs, 1024)) if tested else None
        sums, hits = loss_sums.tolist(), corrects.tolist()  # the epoch's one read back to the host
        for r in range(runs):
            row: dict[str, Any] = dict(tags[r])
            row.update(
                epoch=epoch + 1,
                lr=lr,
                train_loss=sums[r] / n,
                train_acc=hits[r] / n,
                epoch_s=epoch_s,
            )
            if counts is not None:
                row["test_acc"] = accuracy(counts[r])
                if last:
                    last_confusion[r] = counts[r]
            histories[r].append(row)
            if on_epoch:
                on_epoch(row)
        if checkpointers and ((epoch + 1) % p.checkpoint_every == 0 or last):
            model_states, optimizer_states = [models.state(r) for r in range(runs)], models.optimizer_states(optimizer)
            for r in range(runs):
                checkpointers[r].save(
                    {
                        "epoch": epoch + 1,
                        "model": model_states[r],
                        "optimizer": optimizer_states[r],
                        "lr": lr,
                        "shuffle": shuffles[r].get_state(),
                        "dsa": dsas[r].state(),
                        "history": histories[r],
                        "seconds": seconds_before[r] + time.perf_counter() - t0,
                        "config": asdict(p),
                        "seed": seeds[r],
                        "confusion": last_confusion[r],
                        "net": net,
                        "labels": labels,
                    }
                )
    results = []
    for r in range(runs):
        final = histories[r][-1] if histories[r] else {}
        results.append(
            {
                "seed": seeds[r],
                "test_acc": final.get("test_acc"),
                "train_acc": final.get("train_acc"),
                "train_loss": final.get("train_loss"),
                "epochs": schedule.epochs,
                "resumed_from_epoch": start_epoch,
                "confusion": last_confusion[r].tolist() if last_confusion[r] is not None else None,
                "train_s": round(seconds_before[r] + time.perf_counter() - t0, 3),
                "history": histories[r],
                "net": net,
                "labels": labels,
                "trained_with": runs,  # runs on the device at once (1: alone)
            }
        )
    return results
