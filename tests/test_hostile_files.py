"""Damaged run files and a hostile environment, through the real CLI (`cli.main` in process): run.json, the
manifest, the summary, a lease, a footer, and the environment variables gdd-ray reads.

Each case ends one of three ways, and says which:
- refused: one line `error: ...`, exit 2, no traceback, the run folder byte-identical (digest before/after);
- held: the command goes on (status reports, export exports) without a traceback, the folder untouched;
- repaired: the rerun rewrites the damaged bookkeeping file from the shards, and every shard is byte-identical
  (nothing lost, nothing duplicated: the shards are never rewritten).

The run is a finished generation by the tiny model (3 classes x IPC 2, one shard a class, 8 px) made once by the
real generate stage in this process (its serial runner: no Ray); a repair that regenerates a shard runs the
same stage the same way, so its images are byte-identical to the first ones.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from gen_helpers import three_class_config, tree_digest

from gdd_ray import lease, pipeline, storage
from gdd_ray.cli import main
from gdd_ray.generate import stage as gen_stage

IPC = 2
CONFIG = dict(ipc=IPC, unit_size=2, image_size=8)
SHARD = "u0000000000-0000000002.parquet"  # image 0 of classes 0 and 1


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("hostile") / "run"
    gen_stage.run(pipeline.check(three_class_config(out, **CONFIG)), serial=True)
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    (tmp_path / "three_classes.txt").write_text("cat\ndog\nbird\n")  # the class file the config names
    return dst


def shard_digest(out) -> dict[str, str]:
    return {k: v.split(":")[0] for k, v in tree_digest(out).items() if k.endswith(".parquet")}


def distill_argv(out) -> list[str]:
    classes = str(out.parent / "three_classes.txt")
    flags = ["--ipc", str(IPC), "--unit-size", "2", "--image-size", "8", "--gen-resolution", "64", "--batch-size", "2"]
    return ["distill", "--classes", classes, "--model", "tiny", *flags, "--stages", "generate", "--out", str(out)]


def commands(out, tmp_path) -> dict[str, list[str]]:
    return {
        "status": ["status", str(out)],
        "verify": ["status", str(out), "--verify"],
        "export": ["export", "--run", str(out), "--format", "imagefolder", "--source", "generated",
                   "--dest", str(tmp_path / "dest")],
        "distill": distill_argv(out),
    }  # fmt: skip


def cli(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "internal error" not in captured.err, captured.err
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def refused(argv, out, capsys, message: str) -> None:
    before = tree_digest(out)
    code, _, err = cli(argv, capsys)
    assert code == 2 and message in one_error_line(err)
    assert tree_digest(out) == before


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


# ---- run.json --------------------------------------------------------------------------------------------


def _set(path: str, value):
    def edit(record: dict) -> dict:
        node = record
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
        return record

    return edit


# (case, edit of the record or raw text, message, whether distill repairs it: its own config rewrites run.json)
RUN_RECORDS = [
    ("nested 100000", nested(100_000), "nests deeper than 32 levels", False),
    ("nested in config", _set("config.generate.pda", json.loads(nested(40))), "nests deeper than 32 levels", False),
    ("NaN", '{"config": {"ipc": NaN}}', "not valid JSON", False),
    ("unit_size 0", _set("config.generate.unit_size", 0), "--unit-size must be at least 1", True),
    ("ipc abc", _set("config.ipc", "abc"), "'ipc' must be an integer, got 'abc'", True),
    ("ipc null", _set("config.ipc", None), "--ipc is required", True),
    ("ipc 1.5", _set("config.ipc", 1.5), "'ipc' must be an integer", True),
    ("generate [1]", _set("config.generate", [1]), "config.generate must be a mapping", True),
    ("seed -1", _set("config.seed", -1), "--seed must be at least 0", True),
    ("dataset", _set("config.dataset", "imagenet-22k"), "unknown dataset 'imagenet-22k'", True),
    ("templates file", _set("config.generate.prompt_templates", "/etc/passwd"), "must be a list of templates", True),
    ("templates nested", _set("config.generate.prompt_templates", [["{name}"]]), "list of at most 256 strings", True),
    ("guidance inf", _set("config.generate.guidance", 1e400), "not valid JSON", False),
    ("stage_dirs x", _set("stage_dirs", "x"), "stage_dirs must be a mapping, got 'x'", False),
    ("stage_dirs int", _set("stage_dirs", {"generate": 5}), "stage_dirs.generate must be a string", False),
    ("fingerprints list", _set("fingerprints", ["generate"]), "fingerprints must be a mapping", False),
    ("fingerprint int", _set("fingerprints.generate", 5), "fingerprints.generate must be a string", False),
    ("fingerprint stage", _set("fingerprints.paint", "x"), "must be one of generate, select, augment, train", False),
    ("classes text", _set("classes", "cat"), "classes must be a list", False),
    ("class label", _set("classes", [{"label": "0", "class_id": "c", "name": "c"}]), "label must be an integer", False),
    ("class order", _set("classes", [{"label": 1, "class_id": "c", "name": "c"}]), "labelled 0..C-1", False),
    ("started", _set("stages", {"generate": {"started": "yesterday"}}), "not an ISO time", False),
    ("record list", "[1, 2]", "must be a mapping", False),
]  # fmt: skip


def damage_record(out, edit) -> None:
    path = out / "run.json"
    if isinstance(edit, str):
        path.write_text(edit)
    else:
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))


@pytest.mark.parametrize("command", ["status", "verify", "export", "distill"])
@pytest.mark.parametrize("edit, message, repaired", [c[1:] for c in RUN_RECORDS], ids=[c[0] for c in RUN_RECORDS])
def test_a_damaged_run_record(edit, message, repaired, command, run, tmp_path, capsys):
    damage_record(run, edit)
    argv = commands(run, tmp_path)[command]
    if command == "distill" and repaired:  # distill never reads the old config: it writes its own record
        shards_before = shard_digest(run)
        code, _, _ = cli(argv, capsys)
        assert code == 0 and shard_digest(run) == shards_before
        assert main(["status", str(run)]) == 0
        return
    refused(argv, run, capsys, message if command != "distill" else "fix it or use --overwrite")
    assert not (tmp_path / "dest").exists()


# ---- the manifest, the summary ----------------------------------------------------------------------------

MANIFESTS = [
    ("nested", nested(50_000)),
    ("not JSON", "{"),
    ("NaN rows", '{"stage": "generate", "fingerprint": "x", "shards": [{"name": "c00000-i000000-000001.parquet", "rows": NaN}]}'),
    ("shards text", '{"stage": "generate", "fingerprint": "x", "shards": "all"}'),
    ("rows -1", '{"stage": "generate", "fingerprint": "x", "shards": [{"name": "c00000-i000000-000001.parquet", "rows": -1}]}'),
    ("name escapes", '{"stage": "generate", "fingerprint": "x", "shards": [{"name": "../../x.parquet", "rows": 1}]}'),
    ("bytes text", '{"stage": "generate", "fingerprint": "x", "shards": [{"name": "c00000-i000000-000001.parquet", "rows": 1, "bytes": "big"}]}'),
]  # fmt: skip


@pytest.mark.parametrize("text", [t for _, t in MANIFESTS], ids=[n for n, _ in MANIFESTS])
def test_a_damaged_manifest_is_not_complete_and_the_rerun_repairs_it(text, run, tmp_path, capsys):
    manifest = run / "generated" / "_manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text(text)
    shards_before, before = shard_digest(run), tree_digest(run)

    code, out, _ = cli(["status", str(run)], capsys)  # held: reported, not crashed
    assert code == 1 and "not complete" in out
    refused(commands(run, tmp_path)["export"], run, capsys, "no complete generate stage")
    assert tree_digest(run) == before

    code, _, _ = cli(distill_argv(run), capsys)  # repaired from the shards
    assert code == 0 and shard_digest(run) == shards_before
    assert json.loads(manifest.read_text())["shards"] == good["shards"]
    assert main(["status", str(run)]) == 0


SUMMARIES = [
    ("nested", nested(50_000)),
    ("totals list", '{"stage": "generate", "fingerprint": "x", "started": "2026-01-01T00:00:00", "finished": "2026-01-01T00:00:00", "totals": [1]}'),
    ("per_worker", None),
    ("started", None),
]  # fmt: skip


@pytest.mark.parametrize("name, text", SUMMARIES, ids=[n for n, _ in SUMMARIES])
def test_a_damaged_summary_is_held_and_the_rerun_repairs_it(name, text, run, tmp_path, capsys):
    path = run / "generated" / "_summary.json"
    good = json.loads(path.read_text())
    if name == "per_worker":
        text = json.dumps({**good, "per_worker": {"w": {"render_s": "slow"}}})
    elif name == "started":
        text = json.dumps({**good, "started": "at dawn"})
    path.write_text(text)
    shards_before, before = shard_digest(run), tree_digest(run)
    code, out, _ = cli(["status", str(run)], capsys)
    assert code == 0 and out.strip().endswith("complete")  # the manifest says complete; the summary only informs
    assert tree_digest(run) == before
    code, _, _ = cli(commands(run, tmp_path)["export"], capsys)
    assert code == 0 and len(list((tmp_path / "dest").rglob("*.png"))) == 3 * IPC

    code, _, _ = cli(distill_argv(run), capsys)
    assert code == 0 and shard_digest(run) == shards_before
    assert json.loads(path.read_text())["totals"]["images"] == 3 * IPC


# ---- leases ------------------------------------------------------------------------------------------------


def lease_record(**changes) -> dict:
    record = {
        "holder": {"host": "elsewhere", "pid": 4242, "pid_start": "1", "machine": "m:1", "ray_job": None},
        "token": "t",
        "generation": 1,
        "started": "2026-01-01T00:00:00+00:00",
        "heartbeat": "",
        "heartbeat_t": time.time(),
        "expiry_s": 60.0,
    }
    record.update(changes)
    return record


LEASES = [  # (case, text, file age in seconds)
    ("nested", nested(50_000), 0),
    ("not JSON", "{", 0),
    ("expiry forever", json.dumps(lease_record(expiry_s=1e300)), 0),
    ("heartbeat text", json.dumps(lease_record(heartbeat_t="now")), 0),
    ("holder list", json.dumps(lease_record(holder=[1])), 0),
    ("future heartbeat, old file", json.dumps(lease_record(heartbeat_t=time.time() + 1e9, expiry_s=5.0)), 3600),
]


@pytest.mark.parametrize("text, age", [c[1:] for c in LEASES], ids=[c[0] for c in LEASES])
def test_a_damaged_or_stale_lease_is_taken_over(text, age, run, capsys):
    path = run / lease.lease_name(1)
    path.write_text(text)
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    shards_before = shard_digest(run)
    code, out, _ = cli(["status", str(run)], capsys)
    assert code == 0 and "running" not in out
    code, said, _ = cli(distill_argv(run), capsys)
    assert code == 0 and "taking over" in said
    assert shard_digest(run) == shards_before and not list(run.glob("_lease-*"))


def test_a_heartbeat_from_the_future_expires_after_the_normal_window(run, capsys):
    """Written just now with a heartbeat 30 years ahead: live for its expiry (measured from the write), not forever."""
    (run / lease.lease_name(1)).write_text(json.dumps(lease_record(heartbeat_t=time.time() + 1e9, expiry_s=60.0)))
    before = tree_digest(run)
    code, _, err = cli(distill_argv(run), capsys)
    line = one_error_line(err)
    assert code == 2 and "in use by another driver" in line
    left = int(line.split("expires in ")[1].split(" s")[0])
    assert 50 <= left <= 60
    assert tree_digest(run) == before


@pytest.mark.parametrize("planted", [[999_999], [999_999, 5], [999_999, 1_000_000]])
def test_planted_leases_never_give_two_holders(planted, run):
    """Expired leases at any sequence numbers: one driver takes the next one, the next driver is refused."""
    for g in planted:
        path = run / lease.lease_name(g)
        path.write_text(json.dumps(lease_record(expiry_s=1.0, heartbeat_t=time.time() - 100)))
        os.utime(path, (time.time() - 100, time.time() - 100))
    root = storage.Location(str(run))
    with lease.acquire(root, expiry=60) as held:
        assert held.generation == max(planted) + 1 and lease.generations(root) == [held.generation]
        from gdd_ray.errors import UserError

        with pytest.raises(UserError, match="in use by another driver"):
            lease.acquire(root, expiry=60)
        assert lease.current(root)["state"] == "live"
    assert lease.generations(root) == []


def test_a_lease_under_another_spelling_is_not_a_lease(run):
    """`_lease-0000002.json` is not generation 2's file: it neither blocks nor hides the real lease."""
    (run / "_lease-0000002.json").write_text(json.dumps(lease_record()))
    root = storage.Location(str(run))
    assert lease.generations(root) == []
    with lease.acquire(root, expiry=60) as held:
        assert held.generation == 1
    assert (run / "_lease-0000002.json").exists()  # a stranger's file: left alone


# ---- footers -----------------------------------------------------------------------------------------------


def test_a_footer_that_is_not_text_is_a_shard_to_redo(run, tmp_path, capsys):
    import pyarrow.parquet as pq

    name = SHARD
    path = run / "generated" / name
    table = pq.read_table(path)
    meta = {k: v for k, v in (table.schema.metadata or {}).items()}
    meta[b"gdd_ray.fingerprint"] = b"\xff\xfe not utf-8"
    pq.write_table(table.replace_schema_metadata(meta), path)
    code, out, _ = cli(["status", str(run)], capsys)
    assert code == 1 and f"redo {name}: another fingerprint" in out
    refused(commands(run, tmp_path)["export"], run, capsys, "another fingerprint")


# ---- the environment -----------------------------------------------------------------------------------------

ENVIRONMENT = [
    ("GDD_RAY_CACHE", "FILE", "is not a folder"),
    ("GDD_RAY_CACHE", "FILE/below", "is a file, not a folder"),
    ("GDD_RAY_LEASE_EXPIRY_S", "soon", "GDD_RAY_LEASE_EXPIRY_S must be a number between 1 and 86400"),
    ("GDD_RAY_LEASE_EXPIRY_S", "nan", "GDD_RAY_LEASE_EXPIRY_S must be a number"),
    ("GDD_RAY_TIMEOUT_S", "-1", "GDD_RAY_TIMEOUT_S must be a number between 1 and 3600"),
    ("RAY_ADDRESS", "not-an-address", "RAY_ADDRESS: expected host:port"),
    ("RAY_ADDRESS", "10.0.0.1:99999", "RAY_ADDRESS: expected host:port"),
    ("RAY_ADDRESS", "http://127.0.0.1:8265", "is a dashboard address"),
]


@pytest.mark.parametrize("name, value, message", ENVIRONMENT, ids=[f"{n}={v}" for n, v, _ in ENVIRONMENT])
def test_environment_variables(name, value, message, run, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "FILE"
    blocker.write_text("x")
    monkeypatch.setenv(name, value.replace("FILE", str(blocker)))
    refused(distill_argv(run), run, capsys, message)
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("value", ["::::garbage", "ftp://host:1", "host:0", "http://", "h st:80"])
def test_storage_emulator_host_that_is_not_an_endpoint(value, monkeypatch, capsys):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", value)
    storage._gcs_filesystem.cache_clear()
    for argv in (["status", "gs://bucket/run"], ["export", "--run", "gs://bucket/run", "--format", "pt",
                                                  "--dest", "gs://bucket/x.pt"]):  # fmt: skip
        code, _, err = cli(argv, capsys)
        assert code == 2 and "STORAGE_EMULATOR_HOST" in one_error_line(err)


# ---- status --verify: images that decode but are wrong, rows that are not their unit's --------------------


def png_of(mode: str, size: tuple[int, int], fmt: str = "PNG") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 0 if mode in ("1", "L", "P") else (0, 0, 0)[: len(mode)]).save(buf, format=fmt)
    return buf.getvalue()


VERIFY = [  # (case, column, value of row 1, what status --verify says of it)
    ("17x23", "image", lambda: png_of("RGB", (17, 23)), "17x23 px, not the footer's 8x8"),
    ("64x64", "image", lambda: png_of("RGB", (64, 64)), "64x64 px, not the footer's 8x8"),
    ("50 MP", "image", lambda: png_of("1", (7072, 7072)), "7072x7072 px, not the footer's 8x8"),  # header only
    ("JPEG", "image", lambda: png_of("RGB", (8, 8), "JPEG"), "JPEG bytes, not a PNG"),
    ("greyscale", "image", lambda: png_of("L", (8, 8)), "mode L, not RGB"),
    ("RGBA", "image", lambda: png_of("RGBA", (8, 8)), "mode RGBA, not RGB"),
    ("palette", "image", lambda: png_of("P", (8, 8)), "mode P, not RGB"),
    ("no bytes", "image", lambda: b"", "no bytes"),
    ("relabelled", "label", lambda: 2, "(label 2, index 0, variant 0) where the unit has (1, 0, 0)"),
    ("index past the unit", "index", lambda: 7, "(label 1, index 7, variant 0) where the unit has (1, 0, 0)"),
    ("an image twice", "label", lambda: 0, "(label 0, index 0, variant 0) where the unit has (1, 0, 0)"),
]


def rewrite_row(path, column: str, value) -> None:
    """Row 1 of a shard changed in one column, the footer (fingerprint, unit, image size) kept as written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gdd_ray import shards

    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[1] = {"bytes": value, "path": values[1]["path"]} if column == "image" else value
    i = table.schema.get_field_index(column)
    table = table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))
    assert table.schema.metadata[shards.IMAGE_SIZE.encode()] == b"8"
    pq.write_table(table, path, compression="none")


@pytest.mark.parametrize("column, value, why", [c[1:] for c in VERIFY], ids=[c[0] for c in VERIFY])
def test_verify_flags_each_wrong_but_decodable_image_and_the_rerun_rebuilds_it(column, value, why, run, capsys):
    from gen_helpers import read_images

    gen = run / "generated"
    original = read_images(gen)
    rewrite_row(gen / SHARD, column, value())
    code, out, _ = cli(["status", str(run)], capsys)
    # The footer passes. A rewrite that changes the shard's size is caught without decoding (its manifest's
    # byte count), one that keeps it (a label or an index changed in place) only by --verify.
    changed = f"redo {SHARD}: changed since its manifest was written" in out
    assert code == (1 if changed else 0) and (changed or column != "image")
    code, out, _ = cli(["status", str(run), "--verify"], capsys)
    label, index = (value() if column == "label" else 1), (value() if column == "index" else 0)
    assert code == 1 and f"corrupt {SHARD} row 1 (label {label}, index {index}): {why}" in out, out
    assert (gen / f"{SHARD}.corrupt").exists() and not (gen / "_manifest.json").exists()
    assert "set aside 1 shard(s)" in out
    code, out, _ = cli(["status", str(run)], capsys)
    assert code == 1 and "2/3 shards" in out  # the shard is now one the next run makes
    if why not in (VERIFY[0][3], VERIFY[8][3]):  # one image case and one row case are rebuilt (10 s each here)
        return

    gen_stage.run(pipeline.check(three_class_config(run, **CONFIG)), serial=True)  # the rerun redoes it
    assert read_images(gen) == original  # every image once, byte-identical
    code, out, _ = cli(["status", str(run), "--verify"], capsys)
    assert code == 0 and "corrupt" not in out.replace(".corrupt", "")


def test_verify_holds_augmented_and_kept_shards(tmp_path):
    """What --verify must not flag, and what it must: augmented shards hold each image of their unit with its
    variants 0..K in order (K in the footer); kept shards hold their unit's images by position among the kept."""
    import numpy as np
    import pyarrow as pa

    from gdd_ray import shards
    from gdd_ray.plan import WorkUnit

    loc = storage.Location(str(tmp_path / "shards"))
    png = shards.encode_png(np.zeros((8, 8, 3), np.uint8))
    unit = WorkUnit(0, 2, 1)  # images 0 and 1 of the one class
    base = shards.generated_table(unit, ["c"] * 2, ["c"] * 2, ["c"] * 2, [1, 2], [png] * 2)
    augmented = base.take(pa.array([0, 0, 0, 1, 1, 1]))  # image-major: each image's variants 0, 1, 2
    augmented = augmented.append_column("variant", pa.array([0, 1, 2, 0, 1, 2], pa.int32()))
    augmented = augmented.append_column("variant_seed", pa.array(range(6), pa.int64()))
    footer = {shards.FINGERPRINT: "fp", shards.SOURCE: unit.shard_name, shards.VARIANTS: "2", shards.IMAGE_SIZE: "8",
              shards.UNIT: unit.key}  # fmt: skip
    shards.write_shard(loc, unit.shard_name, augmented, footer)
    assert shards.corrupt_images(loc, unit.shard_name) == []
    shards.write_shard(loc, unit.shard_name, augmented, {**footer, shards.VARIANTS: "1"})
    assert shards.corrupt_images(loc, unit.shard_name)[0]["why"] == (
        "(label 0, index 0, variant 2) where the unit has (0, 1, 0)"
    )

    # kept images whose index is their generated one, not their position among the kept (select VERSION 1)
    kept = base.set_column(6, "index", pa.array([3, 5], pa.int32()))
    shards.write_shard(loc, unit.shard_name, kept, shards.generated_footer(unit, "fp", 8))
    assert shards.corrupt_images(loc, unit.shard_name)[0]["why"] == (
        "(label 0, index 3, variant 0) where the unit has (0, 0, 0)"
    )


# ---- checkpoints: never unpickled as code ---------------------------------------------------------------------


class _Planted:
    """What an attacker who can write the run folder plants: unpickling it calls open(marker, "w")."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("planted", ["foreign object", "not a pickle", "a list"])
def test_a_checkpoint_that_is_not_ours_is_refused_and_never_run(planted, tmp_path):
    """The train stage reads every pending run's checkpoint with torch's weights-only unpickler before a worker
    starts: a planted object is refused in one line (no code runs: the marker file is never made), the file left."""
    import io

    import torch

    from gdd_ray.errors import UserError
    from gdd_ray.train import stage as train_stage
    from tests.gen_helpers import bucket_train_config

    cfg = bucket_train_config(str(tmp_path / "run"), tmp_path / "test")
    ctx = pipeline.check(cfg)
    marker = tmp_path / "code-ran"
    buf = io.BytesIO()
    if planted == "foreign object":
        torch.save({"epoch": 1, "model": _Planted(str(marker))}, buf)
    elif planted == "a list":
        torch.save([1, 2], buf)
    else:
        buf.write(b"\x00not a pickle")
    checkpoints = tmp_path / "run" / "eval" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "run00.pt").write_bytes(buf.getvalue())
    with pytest.raises(UserError, match=r"run00.pt is not a checkpoint gdd-ray wrote") as e:
        train_stage.run(ctx)
    assert "\n" not in str(e.value) and not marker.exists()
    assert (checkpoints / "run00.pt").read_bytes() == buf.getvalue()
    assert not (tmp_path / "run" / "eval" / "runs").exists()  # no run trained


def test_a_cifar_test_set_is_unpickled_without_running_code(tmp_path):
    """--eval-data's CIFAR pickles are read by an unpickler that builds numpy arrays and nothing else."""
    import pickle

    import numpy as np

    from gdd_ray import synthetic
    from gdd_ray.errors import UserError
    from gdd_ray.train import testsets

    folder = synthetic.write_cifar(str(tmp_path), np.zeros((4, 8, 8, 3), np.uint8), np.arange(4) % 2, ["a", "b"])
    assert testsets.load(str(tmp_path / "cifar-100-python"), 8, ([0.5] * 3, [0.5] * 3)).labels.tolist() == [0, 1, 0, 1]
    marker = tmp_path / "code-ran"
    with open(f"{folder}/meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [b"a", b"b"], b"x": _Planted(str(marker))}, fh, protocol=2)
    with pytest.raises(UserError, match=r"meta is not a readable CIFAR pickle .*it names io.open"):
        testsets.load(str(tmp_path / "cifar-100-python"), 8, ([0.5] * 3, [0.5] * 3))
    assert not marker.exists()
