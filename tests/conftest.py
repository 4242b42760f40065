"""Shared fixtures: a per-session cache holding the tiny SDXL-architecture pipeline (built once, ~5 s)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session", autouse=True)
def gdd_cache(tmp_path_factory) -> Path:
    """Point GDD_RAY_CACHE (inherited by subprocesses and Ray workers) at a fresh session folder."""
    path = Path(os.environ.get("GDD_RAY_TEST_CACHE") or tmp_path_factory.mktemp("gdd_cache"))
    os.environ["GDD_RAY_CACHE"] = str(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach for the network
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    return path


@pytest.fixture(scope="session")
def tiny_model(gdd_cache) -> Path:
    from gdd_ray.generate.model import ensure_tiny_model

    return ensure_tiny_model()
