"""Resume, skip, redo and refuse: the generate stage's rules, run in process with the serial runner."""

import json

import pytest
from gen_helpers import read_images, tiny_config, tree_digest

from gdd_ray import pipeline
from gdd_ray.errors import UserError
from gdd_ray.generate import stage as gen_stage
from gdd_ray.plan import plan_units


def run_serial(cfg):
    return gen_stage.run(pipeline.check(cfg), serial=True)


def test_fresh_run_then_noop_rerun(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path / "run")
    summary = run_serial(cfg)
    gen = tmp_path / "run" / "generated"
    images = read_images(gen)
    assert len(images) == 10 * 3
    assert summary["totals"]["images_made"] == 30 and summary["totals"]["units"] == 15  # 30 images, units of 2
    assert (tmp_path / "run" / "run.json").exists() and (gen / "_summary.json").exists()
    manifest = json.loads((gen / "_manifest.json").read_text())
    assert manifest["fingerprint"] == summary["fingerprint"] and len(manifest["shards"]) == 15
    assert summary["images_executed"] == 30  # every batch full: nothing rendered to be thrown away
    assert sum(s["rows"] for s in manifest["shards"]) == 30
    before = tree_digest(gen)
    again = run_serial(cfg)
    assert again["totals"]["units_run"] == 0 or again == summary
    assert tree_digest(gen) == before


@pytest.mark.slow  # over 2 s on 2 cores: `make test` runs it, test-fast does not
def test_broken_short_and_missing_shards_are_redone_only(tmp_path, tiny_model, capsys):
    cfg = tiny_config(tmp_path / "run", unit_size=4)  # 30 images: 7 units of 4 and the run's last, of 2
    run_serial(cfg)
    gen = tmp_path / "run" / "generated"
    reference = read_images(gen)
    names = sorted(p.name for p in gen.glob("*.parquet"))
    (gen / names[0]).unlink()  # missing
    (gen / names[1]).write_bytes((gen / names[1]).read_bytes()[:100])  # truncated: unreadable
    (gen / names[2]).write_bytes((gen / names[-1]).read_bytes())  # 2 rows where 4 belong
    (gen / names[4]).write_bytes((gen / names[6]).read_bytes())  # another unit's rows
    (gen / ".u0000000000-0000000004.parquet.tmp-dead").write_bytes(b"half")  # a crashed writer's leftover
    untouched = {n: (gen / n).stat().st_mtime_ns for n in names[5:]}
    summary = run_serial(cfg)
    assert summary["totals"]["units_run"] == 4
    assert {n: (gen / n).stat().st_mtime_ns for n in names[5:]} == untouched
    assert read_images(gen) == reference
    assert not [p for p in gen.iterdir() if ".tmp-" in p.name]
    out = capsys.readouterr().out
    assert "unreadable" in out and "short (2 of 4 rows)" in out and "written for another unit" in out


@pytest.mark.slow  # over 2 s on 2 cores: `make test` runs it, test-fast does not
def test_changed_pixel_config_is_refused_and_nothing_touched(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path / "run")
    run_serial(cfg)
    before = tree_digest(tmp_path / "run")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["inputs"]["generate"]["generate.engine"] == "fast"  # resolved, never 'auto'
    assert record["inputs"]["generate"]["generate.vae_dtype"] == "fp32"
    changes = [{"seed": 1}, {"generate.steps": 2}, {"generate.prompt_template": "a photo of a {name}"}]
    changes += [{"generate.engine": "diffusers"}, {"generate.vae_dtype": "bf16"}, {"generate.decoder": "taesdxl"}]
    for change in changes:
        with pytest.raises(UserError, match="differs from this one"):
            pipeline.check(cfg.replace(**change))
    assert tree_digest(tmp_path / "run") == before
    # workers and batch size do not decide pixels: resuming with other values is fine
    pipeline.check(cfg.replace(**{"generate.batch_size": 1, "generate.workers": 3}))


@pytest.mark.slow  # over 2 s on 2 cores: `make test` runs it, test-fast does not
def test_overwrite_replaces_a_run(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path / "run")
    run_serial(cfg)
    old = read_images(tmp_path / "run" / "generated")
    new_cfg = cfg.replace(seed=7, overwrite=True)
    run_serial(new_cfg)
    new = read_images(tmp_path / "run" / "generated")
    assert set(new) == set(old) and all(new[k] != old[k] for k in old)


@pytest.mark.slow  # over 2 s on 2 cores: `make test` runs it, test-fast does not
def test_raising_ipc_extends_and_lowering_trims(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path / "run", ipc=4, unit_size=4)  # 40 images in 10 units
    run_serial(cfg)
    gen = tmp_path / "run" / "generated"
    first = read_images(gen)
    s = run_serial(cfg.replace(ipc=6))
    assert s["totals"]["units_run"] == 5  # only the new images: 20 in units of 4
    bigger = read_images(gen)
    assert len(bigger) == 60 and all(bigger[k] == v for k, v in first.items())
    run_serial(cfg.replace(ipc=3))  # 30 images: seven units of 4 are kept, the run's new last unit [28, 30) is made
    trimmed = read_images(gen)
    assert sorted(trimmed) == sorted((c, i) for c in range(10) for i in range(3))
    assert all(trimmed[k] == v for k, v in first.items() if k in trimmed)  # the same images, whatever the unit
    assert {p.name for p in gen.glob("*.parquet")} == {u.shard_name for u in plan_units(10, 3, 4)}
    assert json.loads((gen / "_manifest.json").read_text())["shards"][-1] == {
        "name": "u0000000028-0000000030.parquet",
        "rows": 2,
        "bytes": (gen / "u0000000028-0000000030.parquet").stat().st_size,
    }
