"""DD-Ranking's scores of a distilled set against real-data baselines trained under the same protocol.

DD-Ranking (Li et al., "DD-Ranking: Rethinking the Evaluation of Dataset Distillation", NUS-HPC-AI-Lab, 2025,
arXiv:2505.13300), per evaluation round i (here: run i, the same seed for every training set):

    HLR_i = acc(full real set, hard labels) - acc(distilled, hard labels)        hard-label recovery (lower: better)
    IOR_i = acc(distilled, L) - acc(random real subset of the same IPC, L)      improvement over random (higher: better)
    LRS_i = (e^a - e^-1) / (e - e^-1),  a = lam * IOR_i - (1 - lam) * HLR_i,    label-robust score, lam = 0.5

with accuracies as fractions, L the label mode (DD-Ranking's soft-label evaluator takes IOR with soft labels,
its hard-label one with hard labels); each is reported as mean and (population) std over the rounds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

LRS_LAMBDA = 0.5
CITATION = (
    "DD-Ranking (Li et al., 2025, arXiv:2505.13300): HLR = full - distilled (hard labels), IOR = distilled - "
    "random real subset of the same IPC (same labels), LRS = (exp(a) - exp(-1)) / (e - exp(-1)) with "
    "a = 0.5 IOR - 0.5 HLR; per run (seed), then mean and std over runs"
)


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": [float(v) for v in values]}


def lrs(ior: float, hlr: float, lam: float = LRS_LAMBDA) -> float:
    a = lam * ior - (1 - lam) * hlr
    return (math.exp(a) - math.exp(-1)) / (math.exp(1) - math.exp(-1))


def scores(
    distilled: list[float], random: list[float] | None, full: list[float] | None, distilled_hard: list[float]
) -> dict[str, Any]:
    """IOR, HLR and LRS of one network and label mode from per-run accuracies (None where a baseline is absent).
    `distilled_hard` is the same network's hard-label accuracy (HLR is a hard-label score)."""
    out: dict[str, Any] = {"ior": None, "hlr": None, "lrs": None}
    if random is not None:
        out["ior"] = _stats([d - r for d, r in zip(distilled, random)])
    if full is not None:
        out["hlr"] = _stats([f - d for f, d in zip(full, distilled_hard)])
    if out["ior"] is not None and out["hlr"] is not None:
        out["lrs"] = _stats([lrs(i, h) for i, h in zip(out["ior"]["values"], out["hlr"]["values"])])
    return out
