"""Several evaluation runs of one ConvNet trained at once on one device, as one model of grouped convolutions.

R runs' ConvNets become one network whose every layer holds the R copies side by side: convolutions with
groups=R over the R batches stacked on the channel axis, the per-channel norms over R x C channels (instance
norm is one group per channel, group norm 4 groups per run, batch norm per channel: each stays per run), and
the R classifiers as one batched matrix product. Each run's batch, its permutation and its DSA draws still
come from its own generators (train.loop does that part), and its parameters are rows of stacked tensors that
SGD and AdamW update element by element, so run r computes what it computes alone up to float rounding
(grouped kernels add in another order; tests/test_train_at_once.py states the tolerance).

Why grouped convolutions and not torch.func.vmap: in a one-off timing of single training steps on this
project's CPU (2 cores), vmap over functional_call was 0.8-1.5x the speed of the runs one after another, the
grouped model 1.0-2.5x (the overhead of R small steps is paid once); on a GPU the point is the same, fewer
and larger kernels. Whole runs: bench_results/train_at_once.json (docs/evaluation.md). `train_runs_at_once`
is the entry point without Ray (benchmarks, jobs/gpu_bench.sh).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gdd_ray.train.convnet import ConvNet


class StackedConvNet(nn.Module):
    """R ConvNets of the same shape as one module: forward([R, B, 3, H, W]) -> [R, B, classes]."""

    def __init__(self, models: list[ConvNet]):
        super().__init__()
        if not models or not all(isinstance(m, ConvNet) for m in models):
            raise TypeError("StackedConvNet stacks ConvNets")
        self.runs = len(models)
        self.template = [(type(m), m) for m in models[0].features]  # kinds and hyper-parameters, not weights
        states = [m.state_dict() for m in models]
        self.param_names = [n for n, _ in models[0].named_parameters()]
        self.buffer_names = [n for n, _ in models[0].named_buffers()]
        self.stacked = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.stack([s[n] for s in states]).detach().clone()) for n in self.param_names}
        )
        for n in self.buffer_names:
            self.register_buffer(_key(n), torch.stack([s[n] for s in states]).clone())

    def ordered_parameters(self) -> list[nn.Parameter]:
        """In a single ConvNet's parameters() order: an optimizer's state maps onto each run's by position."""
        return [self.stacked[_key(n)] for n in self.param_names]

    def _p(self, name: str) -> torch.Tensor:
        return self.stacked[_key(name)]

    def forward(self, xs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """xs: R batches ([R, B, C, H, W] or a list of R [B, C, H, W]) -> [R, B, classes]."""
        if isinstance(xs, (list, tuple)):  # stacked on the channel axis directly: one copy, not two
            r, b = len(xs), xs[0].shape[0]
            h = torch.stack(xs, dim=1).reshape(b, r * xs[0].shape[1], *xs[0].shape[2:])
        else:
            r, b = xs.shape[0], xs.shape[1]
            h = xs.transpose(0, 1).reshape(b, r * xs.shape[2], *xs.shape[3:])
        for i, (kind, mod) in enumerate(self.template):
            name = f"features.{i}"
            if kind is nn.Conv2d:
                w = self._p(f"{name}.weight")
                h = F.conv2d(
                    h, w.reshape(-1, *w.shape[2:]), self._p(f"{name}.bias").reshape(-1),
                    mod.stride, mod.padding, mod.dilation, groups=r,
                )  # fmt: skip
            elif kind is nn.GroupNorm:
                w, bias = self._p(f"{name}.weight").reshape(-1), self._p(f"{name}.bias").reshape(-1)
                h = F.group_norm(h, mod.num_groups * r, w, bias, mod.eps)
            elif kind is nn.BatchNorm2d:
                mean, var = getattr(self, _key(f"{name}.running_mean")), getattr(self, _key(f"{name}.running_var"))
                if self.training:
                    getattr(self, _key(f"{name}.num_batches_tracked")).add_(1)
                h = F.batch_norm(
                    h, mean.view(-1), var.view(-1), self._p(f"{name}.weight").reshape(-1),
                    self._p(f"{name}.bias").reshape(-1), self.training, mod.momentum, mod.eps,
                )  # fmt: skip
            else:  # activations, pooling, Identity: per channel already
                h = mod(h)
        feats = h.reshape(b, r, -1).transpose(0, 1)  # [R, B, C*h*w], each run's channels in its own order
        weight, bias = self._p("classifier.weight"), self._p("classifier.bias")
        return torch.baddbmm(bias.unsqueeze(1), feats, weight.transpose(1, 2))

    def run_state_dict(self, run: int) -> dict[str, torch.Tensor]:
        """Run `run`'s weights as a single ConvNet's state_dict (its checkpoint loads into one alone)."""
        out = {n: self._p(n)[run].detach().clone() for n in self.param_names}
        out.update({n: getattr(self, _key(n))[run].clone() for n in self.buffer_names})
        return out

    def load_run_state_dicts(self, states: list[dict[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for n in self.param_names:
                self._p(n).copy_(torch.stack([s[n] for s in states]))
            for n in self.buffer_names:
                getattr(self, _key(n)).copy_(torch.stack([s[n] for s in states]))


def _key(name: str) -> str:
    return name.replace(".", "__")


def split_optimizer_state(state: dict[str, Any], runs: int) -> list[dict[str, Any]]:
    """A stacked model's optimizer state_dict -> one per run, each what that run's optimizer alone would hold."""
    out = []
    for r in range(runs):
        per = {
            i: {k: (v[r].clone() if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in s.items()}
            for i, s in state["state"].items()
        }
        out.append({"state": per, "param_groups": [dict(g) for g in state["param_groups"]]})
    return out


def stack_optimizer_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The inverse of split_optimizer_state (every run at the same step, so scalars such as Adam's step agree)."""
    first = states[0]
    stacked = {}
    for i, s in first["state"].items():
        stacked[i] = {
            k: (torch.stack([st["state"][i][k] for st in states]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
            for k, v in s.items()
        }
    return {"state": stacked, "param_groups": first["param_groups"]}


def train_runs_at_once(
    images: np.ndarray,
    labels: np.ndarray,
    test_images: np.ndarray | None,
    test_labels: np.ndarray | None,
    config,
    num_classes: int,
    runs: list[int],
    mean: list[float],
    std: list[float],
    device: str | torch.device = "cpu",
    net: str = "convnet",
    labels_mode: str = "hard",
    teacher: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Train evaluation runs `runs` (seeds from config.eval_seed, as the train stage derives them) of one network
    on one device, all at once; no Ray, no checkpoints. images: uint8 N x H x W x 3, labels: int N. Returns each
    run's result as train.loop.train_runs does (test accuracy, losses, history, confusion)."""
    from gdd_ray.plan import eval_run_seed
    from gdd_ray.train.loop import host_tensor, to_device_images, train_runs

    device = torch.device(device)
    x = to_device_images(images, mean, std, device)
    y = torch.as_tensor(labels, device=device)
    test_x = host_tensor(test_images).to(device) if test_images is not None else None
    test_y = torch.as_tensor(test_labels, device=device) if test_labels is not None else None
    return train_runs(
        train_x=[x] * len(runs),
        train_y=[y] * len(runs),
        test_x_u8=test_x,
        test_y=test_y,
        config=config,
        num_classes=num_classes,
        seeds=[eval_run_seed(config.eval_seed, r) for r in runs],
        mean=mean,
        std=std,
        net=net,
        labels=labels_mode,
        teacher=teacher,
        tags=[{"run": r} for r in runs],
    )
