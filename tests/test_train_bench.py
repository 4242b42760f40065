"""The training benchmark runs and writes its JSON (smoke sizes)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "jobs" / "bench_train.py"


def test_bench_train_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "train.json"
    res = bench.main(["--smoke-test", "--out", str(out), "--device", "cpu"])
    on_disk = json.loads(out.read_text())
    assert on_disk == res
    sec = res["seconds_per_epoch"]
    assert sec["ours"] > 0 and sec["baseline"] > 0
    assert res["ratio_ours_over_baseline"] == pytest.approx(sec["ours"] / sec["baseline"], rel=0.02)
    assert len(res["all_epoch_seconds"]["ours"]) == res["timed_epochs"] == 1
    # Same init, same data: both loops trained the same model to a finite loss.
    assert res["init_checksum"]["ours"] == res["init_checksum"]["baseline"]
    assert set(res["final_loss"]) == {"ours", "baseline"}
    assert all(math.isfinite(v) and v > 0 for v in res["final_loss"].values())


def test_bench_runs_at_once_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, fig = tmp_path / "at_once.json", tmp_path / "at_once.png"
    args = ["--runs-at-once", "3", "--smoke-test", "--out", str(out), "--figure", str(fig), "--device", "cpu"]
    res = bench.main([*args, "--repeats", "1"])
    bench.main([*args, "--repeats", "1", "--append"])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and rows[0] == res and fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["runs"] == 3 and res["seconds"]["at_once"] > 0 and res["seconds"]["one_after_another"] > 0
    # The same numbers: each run trained with the others is the run alone, up to float rounding.
    assert res["same_numbers"]["max_train_loss_difference"] < 1e-4
    assert all(res["same_numbers"]["same_test_accuracy"])
