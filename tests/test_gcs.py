"""gs:// tested like s3://: a real GCS JSON-API server (`gcp-storage-emulator`) on a loopback port.

pyarrow's GcsFileSystem and the lease's conditional create find it through STORAGE_EMULATOR_HOST, the
variable Google's own clients read. The emulator ignores `ifGenerationMatch`, so the lease test here proves
the protocol (refusal, release, takeover), not the store's atomicity (GCS itself enforces it). The server
and its reader are tests/stores.py's; the Ray workers writing the bucket are test_stores_on_ray."""

from __future__ import annotations

import pytest
from gen_helpers import generate_serial, images_of, tiny_config
from stores import BUCKET, gcs_objects

from gdd_ray import lease, pipeline, storage
from gdd_ray.errors import UserError
from gdd_ray.run import RunDir
from gdd_ray.status import run_status


def test_location_round_trip_on_gcs(gcs_server):
    loc = storage.Location(f"gs://{BUCKET}/loc-test/sub")
    assert not loc.local and loc.list() == []
    storage.check_writable(loc)
    loc.write_bytes("a.bin", b"abc")
    loc.write_bytes("_hidden.json", b"{}")
    assert loc.read_bytes("a.bin") == b"abc" and loc.exists("a.bin") and not loc.exists("b.bin")
    assert loc.list() == ["a.bin"] and loc.list(include_hidden=True) == ["_hidden.json", "a.bin"]
    loc.delete_tree()
    assert loc.list() == []


def test_one_driver_per_run_on_gcs(gcs_server):
    root = storage.Location(f"gs://{BUCKET}/leased")
    with lease.acquire(root, expiry=60) as held:
        with pytest.raises(UserError, match="in use by another driver"):
            lease.acquire(root, expiry=60)
        assert [k for k in gcs_objects("leased") if "_lease-" in k] == [f"leased/{held.name}"]
    assert [k for k in gcs_objects("leased") if "_lease-" in k] == []
    with lease.acquire(root, expiry=60) as again:
        assert again.generation == 1


@pytest.mark.slow  # generates, breaks and regenerates shards in the bucket, then exports them
def test_generate_on_gcs_resumes_only_what_is_broken_then_exports(gcs_server, tiny_model, tmp_path, capsys):
    from gdd_ray.cli import main

    uri = f"gs://{BUCKET}/serial-run"
    cfg = tiny_config(uri)
    assert generate_serial(cfg)["totals"]["units_run"] == 15
    objs = gcs_objects("serial-run")
    shard_keys = sorted(k for k in objs if k.endswith(".parquet"))
    assert len(shard_keys) == 15 and all(k.startswith("serial-run/generated/u") for k in shard_keys)
    assert {"serial-run/run.json", "serial-run/generated/_summary.json", "serial-run/generated/_manifest.json"} <= set(
        objs
    )
    first = images_of(objs)
    assert sorted(first) == [(c, i) for c in range(10) for i in range(3)]
    assert not [k for k in objs if ".tmp-" in k]  # no temporary names on an object store
    assert RunDir(uri).read_record()["config"]["out"] == uri

    # Resume: one shard gone, one cut short (a torn upload): only those two are made again.
    gone, torn = shard_keys[3], shard_keys[11]
    fs, _ = storage.resolve(f"gs://{BUCKET}")
    fs.delete_file(f"{BUCKET}/{gone}")
    with fs.open_output_stream(f"{BUCKET}/{torn}") as fh:
        fh.write(objs[torn][: len(objs[torn]) // 2])
    st = run_status(uri)["stages"][0]
    assert (st["done"], st["total"], st["state"]) == (13, 15, "incomplete")
    assert st["failures"] == [
        f"{torn.rsplit('/', 1)[1]}: unreadable (ArrowInvalid)",
        f"_manifest.json: {gone.rsplit('/', 1)[1]} is listed in its manifest but missing (a rerun writes it again)",
    ]
    capsys.readouterr()
    summary = generate_serial(cfg)
    out = capsys.readouterr().out
    assert summary["totals"]["units_run"] == 2 and "13 done, 2 to do" in out, out
    again = gcs_objects("serial-run")
    assert images_of(again) == first  # the same pixels, each image once
    assert all(again[k] == objs[k] for k in shard_keys if k not in (gone, torn))

    # status (with --verify: every image decoded through the bucket) and export read the bucket too
    assert main(["status", uri, "--verify"]) == 0
    assert capsys.readouterr().out.strip().endswith("complete")
    dest = tmp_path / "exported"
    argv = ["export", "--run", uri, "--format", "imagefolder", "--source", "generated", "--dest", str(dest)]
    assert main(argv) == 0
    exported = {p.name: p.read_bytes() for p in dest.rglob("*.png")}
    assert sorted(exported.values()) == sorted(first.values())
    capsys.readouterr()
    generate_serial(cfg)
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.slow  # a serial generate first
def test_other_config_on_gcs_is_refused_and_nothing_changes(gcs_server, tiny_model):
    uri = f"gs://{BUCKET}/refuse-run"
    generate_serial(tiny_config(uri, ipc=1, unit_size=2))  # 5 shards of 2 images
    before = gcs_objects("refuse-run")
    with pytest.raises(UserError, match="differs from this one .*seed 0 -> 1"):
        pipeline.check(tiny_config(uri, ipc=1, unit_size=2, seed=1))
    assert gcs_objects("refuse-run") == before
