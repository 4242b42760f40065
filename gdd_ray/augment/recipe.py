"""The PDA recipe: which ops, with which parameters, and each image's random draws (numpy only).

Kept apart from the torch ops (ops.py) so that the driver's checks and fingerprints, and a rerun with
nothing to do, never import torch: the recipe is all they need. See ops.py for what each op does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gdd_ray.errors import UserError

# name -> default parameters. Order = the order the paper applies them.
DEFAULT_OPS: dict[str, dict[str, Any]] = {
    "hflip": {"p": 0.8},
    "vflip": {"p": 0.8},
    "brightness_contrast": {"p": 0.5, "brightness": 0.2, "contrast": 0.2},
    "rotate": {"p": 0.8, "degrees": 60.0, "border": "reflect"},
    "gamma": {"p": 0.5, "low": 0.8, "high": 1.2},
}
BORDERS = {"reflect": "reflection", "edge": "border", "zeros": "zeros"}

Recipe = list[tuple[str, dict[str, Any]]]


def resolve_ops(pda_ops: dict[str, Any] | None) -> Recipe:
    """The recipe to apply: [(op, full parameters)] in order, checked. Raises UserError naming the mistake."""
    if pda_ops is None:
        return [(name, dict(params)) for name, params in DEFAULT_OPS.items()]
    if not isinstance(pda_ops, dict):
        raise UserError(f"pda-ops must be a mapping of op name -> parameters, got {pda_ops!r}")
    recipe: Recipe = []
    for name, given in pda_ops.items():
        if not isinstance(name, str) or name not in DEFAULT_OPS:
            raise UserError(f"pda-ops: unknown op '{name}'; choose from {', '.join(DEFAULT_OPS)}")
        given = {} if given is None else given
        if not isinstance(given, dict):
            raise UserError(f"pda-ops: '{name}' takes a mapping of parameters, got {given!r}")
        unknown = sorted(set(given) - set(DEFAULT_OPS[name]))
        if unknown:
            raise UserError(
                f"pda-ops: '{name}' has no parameter(s) {', '.join(unknown)}; it takes {', '.join(DEFAULT_OPS[name])}"
            )
        # -0.0 is 0.0: one value, one fingerprint (other numbers keep their spelling, and so their fingerprint)
        given = {k: 0.0 if isinstance(v, float) and v == 0 else v for k, v in given.items()}
        params = {**DEFAULT_OPS[name], **given}
        _check(name, params)
        recipe.append((name, params))
    return recipe


def _check(name: str, params: dict[str, Any]) -> None:
    def number(key: str, low: float, high: float) -> float:
        v = params[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (low <= v <= high):
            raise UserError(f"pda-ops: {name}.{key} must be a number in [{low}, {high}], got {v!r}")
        return float(v)

    number("p", 0.0, 1.0)
    if name == "brightness_contrast":
        number("brightness", 0.0, 1.0)
        number("contrast", 0.0, 1.0)
    elif name == "rotate":
        number("degrees", 0.0, 180.0)
        if not isinstance(params["border"], str) or params["border"] not in BORDERS:
            raise UserError(f"pda-ops: rotate.border must be one of {', '.join(BORDERS)}, got {params['border']!r}")
    elif name == "gamma":
        low, high = number("low", 0.01, 10.0), number("high", 0.01, 10.0)
        if low > high:
            raise UserError(f"pda-ops: gamma.low ({low}) must not exceed gamma.high ({high})")


def sample_params(recipe: Recipe, seeds: list[int]) -> list[dict[str, np.ndarray]]:
    """Per op, per image: whether it applies and its random values (one generator per image)."""
    draws = np.zeros((len(seeds), 3 * len(recipe)), dtype=np.float64)
    for i, s in enumerate(seeds):
        # Three draws per op whatever the op, so changing one op never shifts another op's randomness.
        draws[i] = np.random.default_rng(s).random(3 * len(recipe))
    out = []
    for k, (name, prm) in enumerate(recipe):
        u, a, b = draws[:, 3 * k], draws[:, 3 * k + 1], draws[:, 3 * k + 2]
        d: dict[str, np.ndarray] = {"apply": u < prm["p"]}
        if name == "brightness_contrast":
            d["beta"] = (2 * a - 1) * prm["brightness"]
            d["alpha"] = 1 + (2 * b - 1) * prm["contrast"]
        elif name == "rotate":
            d["angle"] = (2 * a - 1) * prm["degrees"]
        elif name == "gamma":
            d["gamma"] = prm["low"] + a * (prm["high"] - prm["low"])
        out.append(d)
    return out
