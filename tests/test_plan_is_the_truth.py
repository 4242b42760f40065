"""What the select stage kept is what trains and exports, and a manifest that disagrees with the plan or the files
is repaired by a rerun, never believed over them (issue 21, items 1, 2 and 4).

Every stage runs in this process (serial: shard_map's in-process mode, the same per-shard work as on Ray) on
synthetic generated shards and the tiny random CLIP: no Ray, no diffusion model."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from gen_helpers import tree_digest, write_generated

from gdd_ray import export, pipeline, shards
from gdd_ray.augment import stage as augment
from gdd_ray.classes import load_classes
from gdd_ray.cli import main
from gdd_ray.config_loader import build_config
from gdd_ray.errors import UserError
from gdd_ray.generate import stage as generate
from gdd_ray.select import stage as select
from gdd_ray.train import stage as train

pytestmark = pytest.mark.slow  # stage runs end to end (in this process): ~2 min together on 2 busy cores


def config(out, stages: str, **kw):
    values = dict(dataset="cifar10", out=str(out), ipc=4, unit_size=2, image_size=16, stages=stages)
    return build_config({**values, **kw})


def three_classes(tmp_path) -> str:
    path = tmp_path / "classes.txt"
    path.write_text("cat\ndog\nship\n")
    return str(path)


class SeededScoring:
    """Stands in for the CLIP scoring work (select.ShardScoring): writes each candidate shard's score file with a
    score drawn from the image's seed, so which images win differs from class to class and is no index prefix.
    What is kept, and what trains and exports, is the select stage's own code; CLIP's part is tested elsewhere."""

    def __init__(self, job):
        self.job = job

    def __call__(self, calls: list[str]) -> list[dict]:
        from gdd_ray import storage
        from gdd_ray.select.scorer import score_table

        src, dst = storage.Location(self.job.src_uri), storage.Location(self.job.scores_uri)
        stats = []
        for call in calls:  # a call: one batch group's shard names, newline-separated; one stats dict each
            rows = 0
            for name in call.split("\n"):
                t = shards.read_shard(src, name, ["label", "index", "seed"])
                seeds = t.column("seed").to_numpy()
                scores = (seeds % 1000) / 1000.0
                emb = np.stack([np.cos(s % 7 + np.arange(4)) for s in seeds])
                table = score_table(t.column("label").to_numpy(), t.column("index").to_numpy(), seeds, scores,
                                    scores > 0.5, emb)  # fmt: skip
                footer = {shards.FINGERPRINT: self.job.fingerprint, shards.SOURCE: name}
                dst.write_bytes(name, storage.parquet_bytes(table, footer))
                rows += t.num_rows
            stats.append({"shards": call.split("\n"), "rows": rows})
        return stats


def selected_run(out, ipc=4, overgenerate=2.0, pda_variants=1, dataset="cifar10", image_size=16, unit_size=2):
    """generate (synthetic) -> select (seeded scores) -> augment, each stage in this process."""
    stages = "select,augment,train" if pda_variants else "select,train"
    cfg = config(out, stages, dataset=dataset, ipc=ipc, select_by="clip", clip_model="tiny", image_size=image_size,
                 overgenerate=overgenerate, pda_variants=pda_variants, clip_batch_size=8, unit_size=unit_size)  # fmt: skip
    write_generated(cfg, load_classes(dataset, None))
    ctx = pipeline.check(cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(select, "ShardScoring", SeededScoring)
        select.run(ctx, serial=True)
    if pda_variants:
        augment.run(ctx, serial=True)
    return cfg, ctx


@pytest.fixture(scope="module")
def overgenerated(tmp_path_factory):
    return selected_run(tmp_path_factory.mktemp("sel") / "run")


def test_training_takes_every_kept_image_of_every_class(overgenerated):
    cfg, ctx = overgenerated
    kept = Counter()
    for name in ctx.run_dir.selected.list(".parquet"):
        table = shards.read_shard(ctx.run_dir.selected, name, ["label", "index", "source_index"])
        kept.update(table.column("label").to_pylist())
        assert max(table.column("index").to_pylist()) < cfg.ipc  # positions among the kept
    assert kept == {label: 4 for label in range(10)}  # 4 kept of 8 candidates, whatever their generated index
    sources = [
        shards.read_shard(ctx.run_dir.selected, n, ["source_index"]) for n in ctx.run_dir.selected.list(".parquet")
    ]
    assert max(max(t.column("source_index").to_pylist()) for t in sources) >= cfg.ipc  # the case that lost images

    source = train.lifecycle.read_source(ctx, "train")
    distilled = train.load_data(ctx, source)[0]
    assert distilled.per_class == [8] * 10  # IPC 4 x (1 + 1 variant), every class alike
    assert ctx.run_dir.read_record()["stages"]["augment"]["read"]["stage"] == "select"


def test_every_export_writes_the_set_that_trains(overgenerated, tmp_path):
    cfg, ctx = overgenerated
    distilled = train.load_data(ctx, train.lifecycle.read_source(ctx, "train"))[0]
    trained = set(zip(distilled.labels.tolist(), distilled.index.tolist(), distilled.variant.tolist()))

    dest = tmp_path / "pt" / "set.pt"
    info = export.export_pt(ctx.run_dir.uri, str(dest))
    assert (
        info["shape"][0] == 80 and torch.load(tmp_path / "pt" / "set_labels.pt").tolist() == distilled.labels.tolist()
    )
    listed = export.list_images(ctx.run_dir.uri, "augmented")
    exported = set(zip(*(listed.column(c).to_pylist() for c in ("label", "index", "variant"))))
    assert exported == trained

    folder = tmp_path / "folder"
    export.export_imagefolder(ctx.run_dir.uri, str(folder))
    assert Counter(p.parent.name for p in folder.rglob("*.png")) == {c.class_id: 8 for c in ctx.classes}
    # the bytes exported are the bytes trained on, image for image
    pngs = {tuple(int(x) for x in p.stem.split("_v")[0].split("_")) + (int(p.stem.split("_v")[1]),): p.read_bytes()
            for p in folder.rglob("*.png")}  # fmt: skip
    for row, key in enumerate(zip(distilled.labels.tolist(), distilled.index.tolist(), distilled.variant.tolist())):
        assert np.array_equal(shards.decode_png(pngs[key]), distilled.images[row])


def test_generate_select_train_without_augment_at_ipc_2(tmp_path):
    cfg, ctx = selected_run(tmp_path / "run", ipc=2, pda_variants=0)
    distilled = train.load_data(ctx, train.lifecycle.read_source(ctx, "train"))[0]
    assert ctx.sources["train"] == "select" and distilled.per_class == [2] * 10


def test_challenge_export_of_cifar100_ipc_10_overgenerated_twice(tmp_path):
    # Units of 10 (a class's kept images in one shard): 200 candidate shards, not 1,000; the shape is the point.
    cfg, ctx = selected_run(tmp_path / "run", ipc=10, pda_variants=0, dataset="cifar100", image_size=32, unit_size=10)
    info = export.export_challenge(ctx.run_dir.uri, str(tmp_path / "sub"))
    assert info["shape"] == [1000, 3, 32, 32] and info["source"] == "selected"


# ---- a manifest is a claim, the plan the truth ------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished generate (the tiny model) + augment run, made once; tests work on copies."""
    out = tmp_path_factory.mktemp("fin") / "run"
    cfg = config(out, "generate,augment", dataset=None, classes=three_classes(out.parent), pda_variants=2,
                 model="tiny", gen_resolution=16, batch_size=2)  # fmt: skip
    ctx = pipeline.check(cfg)
    generate.run(ctx, serial=True)
    augment.run(ctx, serial=True)
    return cfg


def copy_run(cfg, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(cfg.out, out)
    return cfg.replace(out=str(out)), out


def edit_manifest(folder, change) -> None:
    path = folder / shards.MANIFEST_FILE
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def rerun(cfg):
    ctx = pipeline.check(cfg)
    return generate.run(ctx, serial=True), augment.run(ctx, serial=True)


def augmented_keys(out) -> Counter:
    t = export.list_images(str(out), "augmented")
    return Counter(zip(*(t.column(c).to_pylist() for c in ("label", "index", "variant"))))


def test_a_manifest_missing_a_shard_never_deletes_its_data(finished, tmp_path, capsys):
    cfg, out = copy_run(finished, tmp_path)
    before = tree_digest(out / "augmented")
    edit_manifest(
        out / "generated", lambda d: d["shards"].pop(3)
    )  # positions 6..7 (image 2 of classes 0 and 1) no longer listed

    only_augment = cfg.replace(stages=("augment",))
    assert main(["status", str(out)]) == 1
    assert (
        "its manifest lacks 1 of the 6 shards of the plan (first: u0000000006-0000000008.parquet)"
        in capsys.readouterr().out
    )
    with pytest.raises(UserError, match="lacks 1 of the 6 shards of the plan.*run the generate stage again"):
        pipeline.check(only_augment)
    assert tree_digest(out / "augmented") == before  # refused before anything was touched

    gen, _ = rerun(cfg)  # the way out the message names: generate rewrites its manifest, augment has nothing to do
    assert gen["totals"]["units_run"] == 0
    text = capsys.readouterr().out
    assert "writing it again" in text and "[augment] nothing to do" in text
    assert tree_digest(out / "augmented") == before
    assert augmented_keys(out) == {(c, i, v): 1 for c in range(3) for i in range(4) for v in range(3)}
    assert main(["status", str(out)]) == 0


@pytest.mark.parametrize("damage", ["extra entry", "wrong rows", "wrong bytes", "no ipc"])
def test_a_manifest_that_disagrees_is_rewritten_by_a_rerun(damage, finished, tmp_path, capsys):
    cfg, out = copy_run(finished, tmp_path)
    if damage == "extra entry":
        change = lambda d: d["shards"].append({"name": "u0000000098-0000000100.parquet", "rows": 2, "bytes": 1})  # noqa: E731
        message = "lists 1 entries the plan does not have"
    elif damage == "wrong rows":
        change = lambda d: d["shards"][0].update(rows=3)  # noqa: E731
        message = "says 3 rows for u0000000000-0000000002.parquet, the plan 2"
    elif damage == "wrong bytes":
        change = lambda d: d["shards"][5].update(bytes=8320)  # noqa: E731
        message = "changed since its manifest was written (8320 bytes"
    else:
        change = lambda d: d.pop("ipc")  # noqa: E731
        message = "does not say which images it covers"
    edit_manifest(out / "generated", change)
    before = tree_digest(out / "augmented")
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        pipeline.check(cfg.replace(stages=("augment",)))
    gen, _ = rerun(cfg)
    # a shard that is not what was recorded is redone (deterministic: the same bytes), nothing else
    assert gen["totals"]["units_run"] == (1 if damage == "wrong bytes" else 0)
    assert "[augment] nothing to do" in capsys.readouterr().out and tree_digest(out / "augmented") == before
    assert main(["status", str(out)]) == 0
    assert shards.manifest_problem(
        shards.read_manifest(pipeline.check(cfg).run_dir.generated), generate.lifecycle.planned_specs(
            pipeline.check(cfg), "generate"), pipeline.check(cfg).run_dir.generated.sizes(".parquet")) is None  # fmt: skip
