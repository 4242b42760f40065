"""The select benchmark runs its three contenders on the same images and writes its JSON (smoke sizes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "jobs" / "bench_select.py"


@pytest.mark.slow  # a local Ray and two rounds of CLIP actors: ~40 s on 2 busy cores
def test_bench_select_smoke(tmp_path, local_ray):  # the bench uses the Ray this process holds
    spec = importlib.util.spec_from_file_location("bench_select", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "select.json"
    threads = torch.get_num_threads()  # the bench sets one thread for its single-process contenders
    try:
        rc = bench.main(["--smoke-test", "--out", str(tmp_path / "scratch"), "--results", str(out), "--cpus", "2"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["candidates"] == 10 * 4 == res["stage_summary_images_scored"]  # cifar10, IPC 2 x overgenerate 2
    for name in ("per_image_loop", "serial_scorer", "select_stage"):
        r = res[name]
        rate = pytest.approx(40 / r["seconds"], rel=0.01, abs=0.06)  # both rounded (the rate to 0.1)
        assert r["seconds"] > 0 and r["images_per_s"] == rate
    # same model, same pixels: the per-image loop and the stage agree (only batch shape and preprocessing differ)
    agree = res["scores_vs_per_image_loop"]
    assert agree["compared"] == 40 and agree["max_abs_diff"] < 1e-4 and agree["top1_agreement"] == 1.0
    assert res["serial_scorer_equals_stage"] is True
