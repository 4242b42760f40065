"""The augment benchmark runs its three contenders on smoke sizes and they write the same bytes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "jobs" / "bench_augment.py"


@pytest.mark.slow
def test_bench_augment_smoke(tmp_path, local_ray):  # the bench uses the Ray this process holds
    import torch

    spec = importlib.util.spec_from_file_location("bench_augment", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "augment.json"
    threads = torch.get_num_threads()  # the bench sets one thread for its single-process contenders
    try:
        rc = bench.main(["--smoke-test", "--out", str(tmp_path / "work"), "--results", str(results), "--cpus", "2"])
    finally:
        torch.set_num_threads(threads)
    res = json.loads(results.read_text())
    assert rc == 0 and res["identical_outputs"] is True  # the per-image loop, serial and Ray Data agree
    assert res["images_out"] == res["stage_summary_images_out"] == 10 * 2 * 5
    for contender in ("per_image_loop", "serial_batched", "ray_data"):
        assert res[contender]["images_per_s"] > 0
