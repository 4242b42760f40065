"""`python -m gdd_ray status OUT`: complete, partial, broken and empty runs, judged from the files alone."""

from __future__ import annotations

import json
import shutil

import pytest
from gen_helpers import tiny_config

from gdd_ray import pipeline
from gdd_ray.cli import main
from gdd_ray.errors import UserError
from gdd_ray.generate import stage as gen_stage
from gdd_ray.run import RunDir
from gdd_ray.status import run_status


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model):
    """A generated run (10 classes x IPC 3 in units of 2 = 15 shards), made once and copied by each test."""
    out = tmp_path_factory.mktemp("status") / "run"
    gen_stage.run(pipeline.check(tiny_config(out)), serial=True)
    return out


def copy_of(finished_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def by_stage(st):
    return {s["stage"]: s for s in st["stages"]}


def test_complete_run(finished_run, capsys):
    st = run_status(str(finished_run))
    g = by_stage(st)["generate"]
    assert st["complete"] and list(by_stage(st)) == ["generate"]
    assert (g["done"], g["total"], g["images"], g["images_total"]) == (15, 15, 30, 30)
    assert g["state"] == "complete" and g["failures"] == [] and g["images_per_s"] > 0
    assert g["images_per_s"] == RunDir(str(finished_run)).read_summary("generate")["totals"]["images_per_s"]
    assert main(["status", str(finished_run)]) == 0
    text = capsys.readouterr().out
    assert "15/15 shards" in text and "30/30 images" in text and text.strip().endswith("complete")
    assert main(["status", str(finished_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"][0]["done"] == 15


def test_partial_run_names_what_a_rerun_would_redo(finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    gen = out / "generated"
    shards = sorted(gen.glob("u*.parquet"))
    shards[0].unlink()  # missing: not done, not a failure
    shards[5].write_bytes(shards[5].read_bytes()[:100])  # torn: a failure to redo
    (gen / "_manifest.json").unlink()  # an interrupted run has no manifest
    st = run_status(str(out))
    g = by_stage(st)["generate"]
    assert not st["complete"] and g["state"] == "incomplete"
    assert (g["done"], g["total"], g["images"]) == (13, 15, 26)
    assert g["failures"] == [f"{shards[5].name}: unreadable (ArrowInvalid)"]
    assert main(["status", str(out)]) == 1
    text = capsys.readouterr().out
    assert "13/15 shards" in text and f"redo {shards[5].name}" in text and "not complete" in text

    # What status calls done is exactly what the stage's resume skips.
    summary = gen_stage.run(pipeline.check(tiny_config(out)), serial=True)
    assert summary["totals"]["units_run"] == 2
    assert run_status(str(out))["complete"]


def test_augment_stage_in_progress(finished_run, tmp_path):
    from gdd_ray.augment.recipe import resolve_ops
    from gdd_ray.augment.shard import augment_shard

    out = copy_of(finished_run, tmp_path)
    cfg = tiny_config(out, stages="generate,augment", pda_variants=1)
    ctx = pipeline.check(cfg)  # records the augment fingerprint, as a real start does
    run_dir, fps = ctx.run_dir, ctx.fingerprints
    names = sorted(p.name for p in (out / "generated").glob("u*.parquet"))
    for n in names[:7]:  # what 7 finished Ray Data tasks leave behind
        augment_shard(run_dir.generated, run_dir.augmented, n, 1, resolve_ops(None), fps["augment"])
    st = by_stage(run_status(str(out)))
    assert st["generate"]["state"] == "complete"
    a = st["augment"]
    # 7 shards of 2 images, each image + 1 variant
    assert (a["done"], a["total"], a["images"], a["images_total"]) == (7, 15, 7 * 2 * 2, 60)
    assert a["state"] == "incomplete" and a["failures"] == []


def test_train_runs_counted_by_fingerprint(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    run_dir = RunDir(str(out))
    record = run_dir.read_record()
    record["fingerprints"]["train"] = "fp-train"
    record["config"]["train"]["eval_runs"] = 3
    run_dir.write_record(record)
    runs = run_dir.eval.child("runs")
    runs.write_bytes("run00.json", json.dumps({"fingerprint": "fp-train", "test_acc": 0.1}).encode())
    runs.write_bytes("run01.json", json.dumps({"fingerprint": "older"}).encode())
    run_dir.eval.child("checkpoints").write_bytes("run02.pt", b"x")
    t = by_stage(run_status(str(out)))["train"]
    assert (t["done"], t["total"], t["state"], t["checkpoints"]) == (1, 3, "incomplete", 1)
    assert t["failures"] == ["runs/run01.json: another fingerprint"]


def test_empty_or_missing_run_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(UserError, match="run.json does not exist: no run was started at"):
            run_status(str(path))
        assert main(["status", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "missing").exists()  # status never writes


def _damage_one_image(shard, row: int) -> bytes:
    """Rewrite `shard` with the PNG of `row` cut after its header (it still opens, its pixels do not decode);
    rows, footer and fingerprint stay as they were. Returns the original bytes of that image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gdd_ray import shards as contract
    from gdd_ray import storage

    table = pq.read_table(shard)
    footer = {k.decode(): v.decode() for k, v in pq.read_metadata(shard).metadata.items()}
    pngs = contract.png_bytes(table)
    original = pngs[row]
    pngs[row] = original[:60] + bytes(len(original) - 60)  # signature + IHDR intact, IDAT zeroed
    paths = table.column("image").combine_chunks().field("path").to_pylist()
    table = table.set_column(0, pa.field("image", contract.IMAGE_TYPE), contract.image_column(pngs, paths))
    shard.write_bytes(storage.parquet_bytes(table.replace_schema_metadata(None), footer))
    return original


def test_verify_names_a_corrupt_image_and_a_rerun_redoes_exactly_its_shard(finished_run, tmp_path, capsys):
    from gen_helpers import read_images

    out = copy_of(finished_run, tmp_path)
    gen = out / "generated"
    before = read_images(gen)
    shard = sorted(gen.glob("u*.parquet"))[2]  # positions 4, 5: image 0 of classes 4 and 5
    label, index = 5, 0  # row 1
    _damage_one_image(shard, row=1)

    # The footer is intact, but the shard's size is not the one its manifest recorded: status (footers and
    # sizes, no decoding) says it changed since and must be redone.
    assert main(["status", str(out)]) == 1
    assert f"redo {shard.name}: changed since its manifest was written" in capsys.readouterr().out

    assert main(["status", str(out), "--verify"]) == 1
    text = capsys.readouterr().out
    assert f"corrupt {shard.name} row 1 (label {label}, index {index})" in text
    assert "set aside 1 shard(s)" in text and "not complete" in text
    assert not shard.exists() and (gen / (shard.name + ".corrupt")).exists()
    assert not (gen / "_manifest.json").exists()  # the stage is no longer complete for any reader

    assert main(["status", str(out), "--verify", "--json"]) == 1  # now a missing shard, nothing corrupt
    g = json.loads(capsys.readouterr().out)["stages"][0]
    assert (g["done"], g["total"], g["corrupt"], g["set_aside"]) == (14, 15, [], [])

    summary = gen_stage.run(pipeline.check(tiny_config(out)), serial=True)
    assert summary["totals"]["units_run"] == 1 and shard.exists()
    assert read_images(gen) == before  # the same seeds: the redone shard holds the original pixels
    assert main(["status", str(out), "--verify"]) == 0
    capsys.readouterr()
    dest = tmp_path / "exported"
    argv = ["export", "--run", str(out), "--format", "imagefolder", "--source", "generated", "--dest", str(dest)]
    assert main(argv) == 0
    assert len(list(dest.rglob("*.png"))) == 30
