"""The augment stage end to end on a local Ray: counts, determinism, pass-through, resume, bad input.

Tests whose point is what the stage writes or refuses, not the transport, run the stage's in-process runner
(`serial=True`: the same per-shard work, in this process), so `make test-fast` starts no Ray; the Ray Data
runs are the slow ones (counts and skip, determinism against the serial worker, resume, a killed driver)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from gen_helpers import write_generated

from gdd_ray import pipeline, shards, storage
from gdd_ray.augment import shard as aug_shard
from gdd_ray.augment import stage
from gdd_ray.augment.recipe import resolve_ops
from gdd_ray.classes import load_classes
from gdd_ray.config_loader import build_config
from gdd_ray.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cfg(out, **kw):
    values = {"out": str(out), "dataset": "cifar10", "ipc": 4, "unit_size": 2, "pda_variants": 2, "stages": "augment"}
    values.update(kw)
    return build_config(values)


def make_run(out, **kw):
    """Synthetic generated shards + an opened run, as distill.py --stages augment would see it."""
    cfg = make_cfg(out, **kw)
    write_generated(cfg, load_classes(cfg.dataset, None))
    ctx = pipeline.check(cfg)
    return cfg, ctx, ctx.run_dir


def read_dir(loc: storage.Location):
    return {n: pq.read_table(loc.file(n)) for n in loc.list(".parquet")}


@pytest.mark.slow  # ~15 s with the first Ray Data run on 2 cores
def test_counts_layout_and_skip(tmp_path, local_ray):
    cfg, ctx, run_dir = make_run(tmp_path / "run")
    summary = stage.run(ctx)
    assert summary["totals"]["images"] == 10 * 4 * 3 and summary["images_per_class"] == 12
    assert summary["totals"]["units_run"] == 20

    gen, aug = read_dir(run_dir.generated), read_dir(run_dir.augmented)
    assert set(aug) == set(gen)  # one output per input, same name
    for name, t in aug.items():
        g = gen[name]
        assert t.schema.names == shards.GENERATED_SCHEMA.names + ["variant", "variant_seed"]
        assert t.column("variant").to_pylist() == [0, 1, 2] * g.num_rows
        # variant 0 is the generated PNG, bit for bit; the others are new images of the same size
        orig = [b for b, v in zip(t.column("image").to_pylist(), t.column("variant").to_pylist()) if v == 0]
        assert [o["bytes"] for o in orig] == [x["bytes"] for x in g.column("image").to_pylist()]
        assert t.column("seed").to_pylist() == [s for s in g.column("seed").to_pylist() for _ in range(3)]
        meta = storage.footer_metadata(pq.read_metadata(run_dir.augmented.file(name)))
        assert meta[shards.SOURCE] == name and "variant" in meta["huggingface"]

    rows = [
        (lab, idx, v)
        for t in aug.values()
        for lab, idx, v in zip(
            t.column("label").to_pylist(), t.column("index").to_pylist(), t.column("variant").to_pylist()
        )
    ]
    assert len(rows) == len(set(rows)) == 120  # each (class, image, variant) exactly once
    assert sorted(rows) == [(c, i, v) for c in range(10) for i in range(4) for v in range(3)]
    vseeds = [s for t in aug.values() for s in t.column("variant_seed").to_pylist()]
    assert len(set(vseeds)) == 120
    # the grid: 10 class rows, 2 images each with their variants; the first cell is class 0's first original
    from PIL import Image

    from gdd_ray.augment import samples

    grid = np.asarray(Image.open(run_dir.root.file("samples.png")).convert("RGB"))
    assert grid.shape == (
        10 * (samples.CELL + 4) + 18,
        samples.LABEL_WIDTH + 2 * (3 * (samples.CELL + 2) + samples.GAP),
        3,
    )
    first = shards.decode_png(gen["u0000000000-0000000002.parquet"].column("image")[0].as_py()["bytes"])
    cell = grid[18 : 18 + samples.CELL, samples.LABEL_WIDTH : samples.LABEL_WIDTH + samples.CELL]
    assert np.array_equal(cell, first.repeat(2, 0).repeat(2, 1))
    assert run_dir.read_record()["stages"]["augment"]["status"] == "done"

    manifest = shards.read_manifest(run_dir.augmented, summary["fingerprint"])
    assert sorted(manifest.names) == sorted(gen) and manifest.images == 120
    assert all(s["bytes"] == os.path.getsize(run_dir.augmented.file(s["name"])) for s in manifest.shards)
    again = stage.run(ctx)
    assert again == summary  # nothing redone: the stored summary comes back


@pytest.mark.slow  # two full augment runs through Ray Data
def test_deterministic_across_runs_and_matches_the_serial_worker(tmp_path, local_ray):
    _, ctx_a, dir_a = make_run(tmp_path / "a", ipc=2, unit_size=1, dataset="cifar10", pda_variants=3)
    _, ctx_b, dir_b = make_run(tmp_path / "b", ipc=2, unit_size=2, dataset="cifar10", pda_variants=3)
    stage.run(ctx_a)
    stage.run(ctx_b)

    def pixels(loc):
        out = {}
        for tab in read_dir(loc).values():
            for img, lab, idx, v in zip(
                tab.column("image").to_pylist(),
                tab.column("label").to_pylist(),
                tab.column("index").to_pylist(),
                tab.column("variant").to_pylist(),
            ):
                out[(lab, idx, v)] = shards.decode_png(img["bytes"])
        return out

    a, b = pixels(dir_a.augmented), pixels(dir_b.augmented)
    assert a.keys() == b.keys() and len(a) == 10 * 2 * 4
    assert all(np.array_equal(a[k], b[k]) for k in a)  # other shard grouping, same pixels
    assert any(not np.array_equal(a[(0, 0, 0)], a[(0, 0, v)]) for v in (1, 2, 3))

    # the per-shard worker alone (no Ray) writes the same bytes
    name = dir_a.augmented.list(".parquet")[0]
    solo = storage.Location(str(tmp_path / "solo"))
    fp = dir_a.read_record()["fingerprints"]["augment"]
    aug_shard.augment_shard(dir_a.generated, solo, name, 3, resolve_ops(None), fp)
    assert solo.read_bytes(name) == dir_a.augmented.read_bytes(name)


def test_pass_through(tmp_path):
    cfg, ctx, run_dir = make_run(tmp_path / "run", ipc=2, pda_variants=0)
    summary = stage.run(ctx, serial=True)
    assert summary["totals"]["images"] == summary["images_in"] == 20
    gen, aug = read_dir(run_dir.generated), read_dir(run_dir.augmented)
    for name, t in aug.items():
        assert t.column("image").to_pylist() != [] and t.column("variant").to_pylist() == [0] * t.num_rows
        assert [x["bytes"] for x in t.column("image").to_pylist()] == [
            x["bytes"] for x in gen[name].column("image").to_pylist()
        ]


@pytest.mark.slow  # over 2 s on 2 cores: `make test` runs it, test-fast does not
def test_resume_redoes_only_missing_or_broken_shards(tmp_path, local_ray):
    cfg, ctx, run_dir = make_run(tmp_path / "run")
    stage.run(ctx)
    before = {n: run_dir.augmented.read_bytes(n) for n in run_dir.augmented.list(".parquet")}
    names = sorted(before)
    # an interrupted run: two outputs never written, one cut short, a temp file left behind
    run_dir.augmented.delete(names[0])
    run_dir.augmented.delete(names[5])
    with open(run_dir.augmented.file(names[7]), "wb") as fh:
        fh.write(before[names[7]][:100])
    with open(run_dir.augmented.file(f".{names[9]}.tmp-deadbeef"), "wb") as fh:
        fh.write(b"partial")
    mtimes = {
        n: os.stat(run_dir.augmented.file(n)).st_mtime_ns for n in names if n not in (names[0], names[5], names[7])
    }

    summary = stage.run(ctx)
    assert summary["totals"]["units_run"] == 3 and summary["totals"]["units"] == len(names)
    after = {n: run_dir.augmented.read_bytes(n) for n in run_dir.augmented.list(".parquet")}
    assert after == before  # same names, same bytes: nothing duplicated, nothing changed
    assert run_dir.augmented.list(include_hidden=True) == sorted(["_manifest.json", "_summary.json", *names])
    assert all(os.stat(run_dir.augmented.file(n)).st_mtime_ns == m for n, m in mtimes.items())


def test_changed_recipe_needs_overwrite(tmp_path):
    cfg, ctx, run_dir = make_run(tmp_path / "run", ipc=2)
    stage.run(ctx, serial=True)
    changed = make_cfg(tmp_path / "run", ipc=2, pda_variants=3)
    with pytest.raises(UserError, match=r"augment config differs from this one \(pda-variants 2 -> 3"):
        pipeline.check(changed)
    ctx2 = pipeline.check(changed.replace(overwrite=True))
    assert not ctx2.run_dir.augmented.list(".parquet")  # the old outputs went; the generated ones stayed
    assert ctx2.run_dir.generated.list(".parquet")
    summary = stage.run(ctx2, serial=True)
    assert summary["totals"]["images"] == 10 * 2 * 4


def test_bad_input_is_one_clear_line(tmp_path):
    cfg = make_cfg(tmp_path / "empty")
    with pytest.raises(UserError, match="has no generated shards: run the generate stage first"):
        pipeline.check(cfg)
    assert not (tmp_path / "empty").exists()  # preflight wrote nothing

    cfg, ctx, run_dir = make_run(tmp_path / "run", ipc=4)
    run_dir.generated.delete(run_dir.generated.list(".parquet")[3])
    with pytest.raises(UserError, match="lacks 1 of the 20 shards"):
        stage.preflight(ctx)

    bad_ops = build_config({"out": str(tmp_path / "x"), "dataset": "cifar10", "ipc": 2, "stages": "augment"})
    bad_ops = bad_ops.replace(**{"augment.pda_ops": {"sharpen": {}}})
    with pytest.raises(UserError, match="unknown op 'sharpen'"):
        pipeline.check(bad_ops)


def test_inputs_of_another_generation_config_are_refused(tmp_path):
    cfg, ctx, run_dir = make_run(tmp_path / "run", ipc=2)
    classes = load_classes(cfg.dataset, None)
    write_generated(cfg, classes, fingerprint="0123456789abcdef")  # same names, foreign generation
    with pytest.raises(UserError, match="holds no complete generation for this config"):
        stage.run(ctx, serial=True)


@pytest.mark.slow
def test_resume_after_a_kill(tmp_path, local_ray):
    """Kill the stage's process mid-run (SIGKILL: no cleanup), run again on Ray, get exactly the full output.

    The killed run is the stage's in-process runner (the same per-shard work and commits as a Ray Data task;
    a Ray of its own would cost the subprocess seconds of start): its work holds still once 10 outputs exist
    (a gate around it), so the kill always lands mid-run: no race between the kill and the end of the stage.
    Temporaries of writes cut short are swept by the lifecycle every stage shares (test_job_submit kills a
    driver whose actors were mid-write)."""
    cfg, ctx, run_dir = make_run(tmp_path / "run", ipc=24, unit_size=1, pda_variants=4)
    n = len(run_dir.generated.list(".parquet"))
    script = textwrap.dedent(
        f"""
        import time
        from gdd_ray import pipeline, storage
        from gdd_ray.augment import stage
        from gdd_ray.config_loader import build_config

        def gated(names, **kw):
            out = stage_work(names, **kw)
            while len(storage.Location(kw["dst"]).list(".parquet")) >= 10:
                time.sleep(1)  # hold until the test kills this process
            return out

        stage_work = stage.augment_shards
        stage.augment_shards = gated
        cfg = build_config({{"out": {str(run_dir.uri)!r}, "dataset": "cifar10", "ipc": 24, "unit_size": 1,
                             "pda_variants": 4, "stages": "augment"}})
        stage.SHARDS_PER_TASK = 1
        stage.run(pipeline.check(cfg), serial=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180  # a safety net only: the gate makes the wait end on an event
        while time.time() < deadline and len(run_dir.augmented.list(".parquet")) < 10 and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = len(run_dir.augmented.list(".parquet"))
    assert 10 <= partial < n

    summary = stage.run(ctx)
    # outputs are committed whole, so every file seen before the kill counts as done
    assert summary["totals"]["units"] - summary["totals"]["units_run"] >= partial
    assert sorted(run_dir.augmented.list(".parquet")) == sorted(run_dir.generated.list(".parquet"))
    assert not [f for f in os.listdir(run_dir.augmented.path) if ".tmp-" in f]  # no temporary survives
    keys = [
        k
        for t in read_dir(run_dir.augmented).values()
        for k in zip(t.column("label").to_pylist(), t.column("index").to_pylist(), t.column("variant").to_pylist())
    ]
    assert len(keys) == len(set(keys)) == 10 * 24 * 5
