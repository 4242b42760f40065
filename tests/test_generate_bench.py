"""The generation benchmark's engine matrix runs on the tiny model and writes its JSON and table (smoke sizes)."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "jobs" / "bench_generate.py"


C, CL = "contiguous", "channels_last"
# The fast engine's rows: (UNet layout, decoder layout, decoder), each component's layout measured apart.
VARIANTS = [(C, C, "vae"), (CL, C, "vae"), (C, CL, "vae"), (CL, CL, "vae"), (C, C, "taesdxl")]


@pytest.mark.slow
def test_bench_generate_engine_matrix_smoke(tmp_path, tiny_model, capsys, monkeypatch):
    scratch = tmp_path / "tmp"  # where its temporary folders go: removed when it ends
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    spec = importlib.util.spec_from_file_location("bench_generate", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "generate.json"
    args = ["--model", "tiny", "--classes", "2", "--gen-resolution", "32", "--image-size", "8", "--threads", "1",
            "--batch-sizes", "1,2", "--batches", "2", "--repeats", "2", "--engines-only", "--channels-last",
            "--tiny-decoder", "--out", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    assert not list(scratch.iterdir())
    res = json.loads(out.read_text())
    rows = res["engines"]["rows"]
    fast = [("fast", "fp32", b, *v) for b in (1, 2) for v in VARIANTS]
    got = [(r["engine"], r["vae_dtype"], r["batch_size"], r["unet_memory_format"], r["vae_memory_format"], r["decoder"])
           for r in rows]  # fmt: skip
    assert got == fast + [(engine, "fp32", b, C, C, "vae") for engine in ("diffusers", "pipeline-call") for b in (1, 2)]
    for r in rows:
        assert r["images_per_timed_run"] == 2 * r["batch_size"]
        if r["engine"] == "pipeline-call":  # the loop before padding: the 1-image comparison ran at batch 1
            assert r["executed_batch_sizes"] == sorted({1, r["batch_size"]})
        else:  # padded: the model only ever saw --batch-size, the 1-image comparison included
            assert r["executed_batch_sizes"] == [r["batch_size"]]
        assert 0 < r["images_per_s_min"] <= r["images_per_s_median"] <= r["images_per_s_max"]
        if r["decoder"] == "taesdxl":  # another decoder: other pixels (its cost in quality, on random weights)
            assert r["diff_to_diffusers_fp32"]["mean_0_255"] > 1 and r["not_blank"]
        else:
            assert r["diff_to_diffusers_fp32"]["max_0_255"] <= 1 and r["not_blank"]
        phases = {"pipeline"} if r["engine"] == "pipeline-call" else {"upload", "denoise", "decode"}
        assert phases | {"resize_copy", "span"} <= set(r["phase_s"])
    for baseline in ("fast_over_diffusers", "fast_over_pipeline_call"):  # one per fast row with that baseline
        assert [(s["batch_size"], s["unet_memory_format"], s["vae_memory_format"], s["decoder"])
                for s in res["engines"][baseline]] == [(b, *v) for b in (1, 2) for v in VARIANTS]  # fmt: skip
    assert res["versions"]["torch"] and "a_paper_loop" not in res
    printed = capsys.readouterr().out
    assert "| engine | VAE | batch (executed) |" in printed and printed.count("| fast | fp32 |") >= 2


@pytest.mark.slow  # over 2 s on 2 cores: `make test` runs it, test-fast does not
def test_bench_packing_smoke(tmp_path, tiny_model, monkeypatch):
    """The packing benchmark renders the same images both ways (same pixels) and counts what each executed."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_packing", BENCH.parent / "bench_packing.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "packing.json"
    scratch = tmp_path / "tmp"  # where its temporary folder goes: removed when it ends
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert bench.main(["--smoke-test", "--results", str(out)]) == 0
    assert not list(scratch.iterdir())
    res = json.loads(out.read_text())
    one, packed = res["layouts"]["one class per unit"], res["layouts"]["packed"]
    assert (one["images_executed"], packed["images_executed"]) == (160, 16) and res["max_pixel_difference"] <= 1
