"""The select stage: CLIP scores every candidate, keeps the IPC best per class (ties by index), resumably.

Runs on synthetic generated shards (written through the shard contract) and the tiny random CLIP, whose
scores are noise: the tests check the machinery (what is kept given the scores, resume, determinism),
not that CLIP likes the images."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from gen_helpers import actor_threads, write_generated

from gdd_ray import pipeline, shards, storage
from gdd_ray.classes import load_classes
from gdd_ray.config_loader import build_config
from gdd_ray.errors import UserError
from gdd_ray.plan import plan_run, plan_units
from gdd_ray.select import stage
from gdd_ray.select.choose import diversity, rank
from gdd_ray.select.scorer import ScoreJob, ShardScorer, batch_groups, embeddings_of, read_scores, score_calls

CLASSES = "cat\ndog\nship\ntruck\n"


def make_cfg(tmp_path, **kw):
    classes = tmp_path / "classes.txt"
    classes.write_text(CLASSES)
    values = dict(
        classes=str(classes), out=str(tmp_path / "run"), ipc=3, unit_size=2, batch_size=2, image_size=16, select_by="clip",
        clip_model="tiny", overgenerate=2, stages="select", clip_batch_size=8,
    )  # fmt: skip
    values.update(kw)
    return build_config(values)


def make_run(tmp_path, **kw):
    cfg = make_cfg(tmp_path, **kw)
    write_generated(cfg, load_classes(None, cfg.classes))
    ctx = pipeline.check(cfg)
    return cfg, ctx, ctx.run_dir


def kept_rows(run_dir):
    """label -> [(generated index, seed, clip_score, clip_top1, png bytes)] over the kept shards, in shard-name
    order; asserts each kept image's `index` is its position among its class's kept images (0..IPC-1)."""
    out, positions = {}, {}
    for name in run_dir.selected.list(".parquet"):
        t = shards.read_shard(run_dir.selected, name)
        for img, lab, pos, idx, seed, s, top in zip(
            t["image"].to_pylist(), t["label"].to_pylist(), t["index"].to_pylist(), t["source_index"].to_pylist(),
            t["seed"].to_pylist(), t["clip_score"].to_pylist(), t["clip_top1"].to_pylist(),
        ):  # fmt: skip
            out.setdefault(lab, []).append((idx, seed, s, top, img["bytes"]))
            positions.setdefault(lab, []).append(pos)
    assert all(p == list(range(len(p))) for p in positions.values()), positions
    return out


def test_rank_keeps_the_best_ties_by_index_in_index_order():
    scores = np.array([0.5, 0.7, 0.5, 0.7, 0.1], np.float32)
    indices = np.array([3, 2, 1, 0, 4])
    kept = rank(scores, indices, 3)
    assert indices[kept].tolist() == [0, 1, 2]  # 0.7 (index 0), 0.7 (index 2), then the 0.5 with the lower index
    assert rank(scores, indices, 5).tolist() == [3, 2, 1, 0, 4]
    e = np.eye(3, dtype=np.float32)
    assert diversity(e) == pytest.approx(1.0) and diversity(np.ones((4, 3)) / np.sqrt(3)) == pytest.approx(0.0)
    assert diversity(e[:1]) is None


@pytest.fixture(scope="module")
def selected_folder(tmp_path_factory, gdd_cache, ray_pool):
    """One select stage run over synthetic candidates (Ray, a CLIP actor, the choice tasks: ~25 s on 2 busy cores),
    made once for the module: each test works on its own copy (`selected_run`). One CLIP actor, not one per CPU:
    each costs ~10 s of CPU to start, and what is chosen does not depend on how many score (the resume test below
    scores serially and must write these bytes)."""
    ray_pool.use()
    folder = tmp_path_factory.mktemp("selected")
    _, ctx, _ = make_run(folder, select_workers=1)
    return folder, stage.run(ctx)


@pytest.fixture
def selected_run(selected_folder, tmp_path, local_ray):
    """(ctx, run_dir, summary) of this test's own copy of the module's selected run."""
    folder, summary = selected_folder
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    ctx = pipeline.check(make_cfg(tmp_path))
    return ctx, ctx.run_dir, summary


@pytest.mark.slow  # the module's select run (~25 s), then reads
def test_keeps_exactly_ipc_per_class_the_best_scored(selected_run):
    ctx, run_dir, summary = selected_run
    assert len(ctx.plan.units) == 12 and len(ctx.plan.kept) == 6  # 4 classes x 6 candidates, 3 kept, units of 2
    gen = {}
    for name in run_dir.generated.list(".parquet"):
        t = shards.read_shard(run_dir.generated, name)
        for img, lab, idx in zip(t["image"].to_pylist(), t["label"].to_pylist(), t["index"].to_pylist()):
            gen[(lab, idx)] = img["bytes"]
    scores_loc = run_dir.selected.child(stage.SCORES_DIR)
    scored = {}
    for name in scores_loc.list(".parquet"):
        t = read_scores(scores_loc, name)
        assert embeddings_of(t).shape == (t.num_rows, 32)
        for lab, idx, s, top in zip(*(t[c].to_pylist() for c in ("label", "index", "clip_score", "clip_top1"))):
            scored[(lab, idx)] = (s, top)
    assert sorted(scored) == [(c, i) for c in range(4) for i in range(6)]

    kept = kept_rows(run_dir)
    assert sorted(kept) == [0, 1, 2, 3]
    for label, rows in kept.items():
        best = sorted(range(6), key=lambda i: (-scored[(label, i)][0], i))[:3]
        assert [r[0] for r in rows] == sorted(best)  # exactly IPC, the best by score, stored in index order
        for idx, _, s, top, png in rows:
            assert (s, top) == scored[(label, idx)] and png == gen[(label, idx)]  # the generated image, untouched
    first = run_dir.selected.file("u0000000000-0000000002.parquet")
    assert pq.read_table(first).schema.names == shards.SELECTED_SCHEMA.names
    assert "clip_score" in storage.footer_metadata(pq.read_metadata(first))["huggingface"]

    manifest = shards.read_manifest(run_dir.selected, summary["fingerprint"])
    assert manifest.images == 4 * 3 and sorted(manifest.names) == sorted(u.shard_name for u in ctx.plan.kept)
    assert summary["totals"]["images"] == 12 and summary["candidates_per_class"] == 6
    assert [c["kept"] for c in summary["per_class"]] == [3] * 4
    for c in summary["per_class"]:
        assert c["score_mean"] == pytest.approx(np.mean([r[2] for r in kept[c["label"]]]), abs=1e-6)
        assert c["top1"] == pytest.approx(np.mean([r[3] for r in kept[c["label"]]]))
        assert c["diversity"] is not None and c["prompt"] == c["name"]
    stats = json.loads(run_dir.selected.read_bytes(stage.STATS_FILE))
    assert stats["classes"] == summary["per_class"] and set(stats["overall"]) >= {"score_mean", "top1", "diversity"}
    assert run_dir.read_record()["stages"]["select"]["status"] == "done"
    assert stage.run(ctx) == summary  # nothing to do: the stored summary comes back
    from gdd_ray import report_page  # the run's page shows the stage's figures: kept vs every candidate

    report_page.write_run_page(run_dir)
    page = run_dir.root.read_bytes("report.html").decode()
    o = stats["overall"]
    assert "CLIP selection (kept vs all candidates)" in page and f"Per class ({len(stats['classes'])})" in page
    assert f"<td class='num'>{o['score_mean']:.4f}</td><td class='num'>{o['score_mean_all']:.4f}</td>" in page


@pytest.mark.slow  # a copy of the module's select run, broken, then resumed
def test_resume_redoes_only_what_is_missing_with_the_same_bytes(selected_run):
    """The module's run was made on Ray (a CLIP actor, the choice tasks); the resume runs in this process with
    one torch thread, as an actor has: the redone files must be those bytes (the serial runner and the actors
    score and choose alike), and a CLIP actor fewer to start."""
    ctx, run_dir, _ = selected_run
    scores_loc = run_dir.selected.child(stage.SCORES_DIR)
    kept_before = {n: run_dir.selected.read_bytes(n) for n in run_dir.selected.list(".parquet")}
    scores_before = {n: scores_loc.read_bytes(n) for n in scores_loc.list(".parquet")}
    # a killed run: one score file never written, one kept shard cut short, a temporary left behind
    scores_loc.delete("u0000000010-0000000012.parquet")  # candidates: image 2 of classes 2 and 3
    with open(run_dir.selected.file("u0000000004-0000000006.parquet"), "wb") as fh:  # kept: classes 0, 1's second
        fh.write(kept_before["u0000000004-0000000006.parquet"][:50])
    with open(run_dir.selected.file(".u0000000006-0000000008.tmp-deadbeef"), "wb") as fh:
        fh.write(b"partial")
    shards.drop_manifest(run_dir.selected)
    untouched = {
        n: os.stat(scores_loc.file(n)).st_mtime_ns for n in scores_before if n != "u0000000010-0000000012.parquet"
    }

    with actor_threads():
        summary = stage.run(ctx, serial=True)
    assert summary["totals"]["units_run"] == 1  # one score file redone
    assert summary["kept_shards_written"] == 1  # the cut one only (the redone scores came back the same)
    assert {n: run_dir.selected.read_bytes(n) for n in run_dir.selected.list(".parquet")} == kept_before
    assert {n: scores_loc.read_bytes(n) for n in scores_loc.list(".parquet")} == scores_before
    assert all(os.stat(scores_loc.file(n)).st_mtime_ns == m for n, m in untouched.items())
    assert not [n for n in run_dir.selected.list(include_hidden=True) if ".tmp-" in n]
    assert shards.read_manifest(run_dir.selected, summary["fingerprint"]) is not None


@pytest.mark.slow  # the tiny CLIP built and loaded, every shard scored twice: ~6 s
def test_scores_do_not_depend_on_what_is_scored_together(tmp_path, gdd_cache):
    cfg = make_cfg(tmp_path, ipc=2, overgenerate=1.5)
    classes = load_classes(None, cfg.classes)
    names = write_generated(cfg, classes)
    from gdd_ray.select.clip import resolve_clip_model

    texts = tuple(c.prompt("{name}") for c in classes)
    loc = lambda sub: str(tmp_path / sub)  # noqa: E731
    units = plan_run(cfg, len(classes)).units  # 4 classes x 3 in shards of 2, 1: batches of 4 mix classes
    job = ScoreJob(resolve_clip_model("tiny"), texts, str(tmp_path / "run" / "generated"), loc("a"), "fp", 4, units)
    together = ShardScorer(job)
    together.score(names)
    apart = ShardScorer(dataclasses.replace(job, scores_uri=loc("b")))
    for n in reversed(names):
        apart.score([n])
    a, b = storage.Location(loc("a")), storage.Location(loc("b"))
    for n in names:
        assert read_scores(a, n).equals(read_scores(b, n)), n


def test_batches_are_groups_of_consecutive_shards_fixed_by_the_plan():
    units = plan_units(3, 5, 2)  # 15 images in plan order: 7 units of 2, then the run's last one, of 1
    groups = batch_groups(units, 4)  # consecutive shards while they fit in a batch of 4
    assert [[u.start for u in g] for g in groups] == [[0, 2], [4, 6], [8, 10], [12, 14]]
    assert batch_groups(units, 1) == [[u] for u in units]  # a shard larger than a batch is a group of its own
    names = [u.shard_name for u in units]
    assert score_calls(units, 4, [names[7], names[0], names[6]]) == [[names[0]], [names[6], names[7]]]
    scorer = ShardScorer(ScoreJob("clip", ("a", "b", "c"), "src", "dst", "fp", 4, tuple(units)))
    batch, row = scorer.places_of([names[3], names[7]], [pa.table({"index": [2, 3]}), pa.table({"index": [4]})])
    assert batch.tolist() == [2**32, 2**32, 3 * 2**32] and row.tolist() == [2, 3, 2]  # group 1 rows 2-3, group 3 row 2


def test_fingerprints_and_config(tmp_path):
    cfg = make_cfg(tmp_path, stages="generate,select,augment")
    classes = load_classes(None, cfg.classes)

    def fps(c):
        return pipeline.stage_inputs(c, classes, pipeline.RunDir(c.out))[0]

    base = fps(cfg)
    assert set(base) == {"generate", "select", "augment"}
    assert fps(cfg.replace(**{"select.select_workers": 2, "generate.batch_size": 3})) == base
    assert fps(cfg.replace(**{"select.clip_batch_size": 3}))["select"] != base["select"]
    more = fps(cfg.replace(**{"select.overgenerate": 3.0}))
    assert more["generate"] == base["generate"] and more["select"] != base["select"]
    assert fps(cfg.replace(**{"select.clip_model": "/some/clip"}))["select"] != base["select"]
    sources = pipeline.stage_inputs(
        cfg.replace(stages=("generate", "select", "train")), classes, pipeline.RunDir(cfg.out)
    )[2]
    assert sources == {"generate": None, "select": "generate", "augment": "select", "train": "select"}
    plain = fps(build_config({"classes": cfg.classes, "out": cfg.out, "ipc": 3, "unit_size": 2, "batch_size": 2,
                              "image_size": 16}))  # fmt: skip
    assert "select" not in plain and plain["augment"] != base["augment"]  # augment reads the kept images

    full = build_config({"dataset": "cifar10", "ipc": 1, "out": "x", "select_by": "clip"})
    assert full.stages == ("generate", "select", "augment", "train")
    assert build_config({"dataset": "cifar10", "ipc": 1, "out": "x"}).stages == ("generate", "augment", "train")
    for values, msg in [
        ({"overgenerate": 2}, "--overgenerate makes more images"),
        ({"stages": "generate,select"}, "--stages select needs something to select by"),
        ({"select_by": "clip", "overgenerate": 0.5}, "overgenerate"),
    ]:
        with pytest.raises(UserError, match=msg):
            build_config({"dataset": "cifar10", "ipc": 1, "out": "x", **values})


def test_missing_candidates_and_bad_clip_model_are_one_clear_line(tmp_path, gdd_cache):
    cfg = make_cfg(tmp_path)
    write_generated(cfg.replace(**{"select.overgenerate": 1.0}), load_classes(None, cfg.classes))
    with pytest.raises(UserError, match="select stage chooses from"):
        pipeline.check(cfg)  # generated with --overgenerate 1: too few candidates
    with pytest.raises(UserError, match="not a transformers model folder"):
        pipeline.check(cfg.replace(**{"select.clip_model": str(tmp_path)}))
    assert not (tmp_path / "run" / "selected").exists()


@pytest.mark.slow  # the tiny SDXL draws 16 images, then they are scored, chosen and augmented
def test_tiny_sdxl_overgenerate_select_augment(tmp_path, tiny_model):
    """The three stages chained on the tiny SDXL twin, each with the in-process runner (the same per-shard work;
    the select stage's Ray transport is the module's selected run, augment's is test_augment_stage's)."""
    from gdd_ray.augment import stage as augment
    from gdd_ray.generate import stage as generate

    cfg = make_cfg(
        tmp_path, ipc=2, overgenerate=2, model="tiny", gen_resolution=64, batch_size=2, pda_variants=1,
        stages="generate,select,augment", prompt_template="a photo of {desc}",
    )  # fmt: skip
    ctx = pipeline.check(cfg)
    generate.run(ctx, serial=True)
    summary = stage.run(ctx, serial=True)
    augmented = augment.run(ctx, serial=True)
    run_dir = ctx.run_dir
    assert len(run_dir.generated.list(".parquet")) == 4 * 2  # 4 candidates per class, unit 2
    kept = kept_rows(run_dir)
    assert {label: len(rows) for label, rows in kept.items()} == {0: 2, 1: 2, 2: 2, 3: 2}
    assert summary["overall"]["diversity"] is not None and summary["candidates_per_class"] == 4
    assert augmented["source"] == "select" and augmented["totals"]["images"] == 4 * 2 * 2
    aug = {n: shards.read_shard(run_dir.augmented, n) for n in run_dir.augmented.list(".parquet")}
    assert sorted(aug) == sorted(u.shard_name for u in ctx.plan.kept)
    seen = {}
    for t in aug.values():  # the kept images, by their position and seed, each with its variant
        for label, pos, seed in zip(t["label"].to_pylist(), t["index"].to_pylist(), t["seed"].to_pylist()):
            seen.setdefault(label, []).append((pos, seed))
    assert {label: sorted(rows) for label, rows in seen.items()} == {
        label: sorted((p, r[1]) for p, r in enumerate(rows) for _ in range(2)) for label, rows in kept.items()
    }
