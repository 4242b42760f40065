"""Every stage on an object store: a real S3-protocol server (moto's standalone server) on 127.0.0.1.

pyarrow's S3 filesystem and boto3 find the server through AWS_ENDPOINT_URL, exactly as a user points them at
MinIO or another S3-compatible store. The server and its reader are tests/stores.py's; the Ray workers writing
the bucket (and a Ray Train worker resuming from it) are test_stores_on_ray.
"""

from __future__ import annotations

import pytest
from gen_helpers import generate_serial, images_of, tiny_config
from stores import BUCKET, s3_objects

from gdd_ray import pipeline, storage
from gdd_ray.errors import UserError
from gdd_ray.run import RunDir
from gdd_ray.status import run_status


def test_location_round_trip_on_s3(s3_server):
    loc = storage.Location(f"s3://{BUCKET}/loc-test/sub")
    assert not loc.local and not loc.exists() and loc.list() == []
    storage.check_writable(loc)
    loc.write_bytes("a.bin", b"abc")
    loc.write_bytes("_hidden.json", b"{}")
    assert loc.read_bytes("a.bin") == b"abc" and loc.exists("a.bin") and not loc.exists("b.bin")
    assert loc.list() == ["a.bin"] and loc.list(include_hidden=True) == ["_hidden.json", "a.bin"]
    assert loc.uri == f"s3://{BUCKET}/loc-test/sub" and loc.child("x").uri == f"s3://{BUCKET}/loc-test/sub/x"
    loc.delete("missing")  # no error
    loc.delete_tree()
    assert not loc.exists() and loc.list() == []


@pytest.mark.slow  # generates, breaks and regenerates shards in the bucket
def test_generate_on_s3_resumes_only_what_is_broken(s3_server, tiny_model, capsys):
    client, _ = s3_server
    uri = f"s3://{BUCKET}/serial-run"
    cfg = tiny_config(uri)
    summary = generate_serial(cfg)
    assert summary["totals"]["units_run"] == 15 and summary["totals"]["images"] == 30

    objects = s3_objects(client, "serial-run/")
    shard_keys = sorted(k for k in objects if k.endswith(".parquet"))
    assert len(shard_keys) == 15 and all(k.startswith("serial-run/generated/u") for k in shard_keys)
    assert "serial-run/run.json" in objects and "serial-run/generated/_summary.json" in objects
    assert "serial-run/generated/_manifest.json" in objects
    first = images_of(objects)
    assert sorted(first) == [(c, i) for c in range(10) for i in range(3)]
    record = RunDir(uri).read_record()
    assert record["config"]["out"] == uri and "generate" in record["fingerprints"]
    assert record["stages"]["generate"]["finished"]
    assert not [k for k in objects if ".tmp-" in k]  # no temporary names on an object store

    # Resume: one shard gone, one cut short (a torn upload): only those two are made again.
    gone, torn = shard_keys[3], shard_keys[11]
    client.delete_object(Bucket=BUCKET, Key=gone)
    client.put_object(Bucket=BUCKET, Key=torn, Body=objects[torn][: len(objects[torn]) // 2])
    st = run_status(uri)["stages"][0]  # `python -m gdd_ray status` reads the bucket the same way
    assert (st["done"], st["total"], st["state"]) == (13, 15, "incomplete")
    assert st["failures"] == [
        f"{torn.rsplit('/', 1)[1]}: unreadable (ArrowInvalid)",
        f"_manifest.json: {gone.rsplit('/', 1)[1]} is listed in its manifest but missing (a rerun writes it again)",
    ]
    capsys.readouterr()
    summary = generate_serial(cfg)
    out = capsys.readouterr().out
    assert summary["totals"]["units_run"] == 2, out
    assert f"redoing {torn.rsplit('/', 1)[1]}: unreadable" in out and "13 done, 2 to do" in out
    again = s3_objects(client, "serial-run/")
    assert images_of(again) == first  # the same pixels, each image once
    untouched = [k for k in shard_keys if k not in (gone, torn)]
    assert all(again[k] == objects[k] for k in untouched)

    assert run_status(uri)["complete"]
    # A finished run: nothing to do, nothing rewritten.
    capsys.readouterr()
    generate_serial(cfg)
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.slow  # over 2 s on 2 cores: `make test` runs it, test-fast does not
def test_other_config_on_s3_is_refused_and_nothing_changes(s3_server, tiny_model):
    client, _ = s3_server
    uri = f"s3://{BUCKET}/refuse-run"
    generate_serial(tiny_config(uri, ipc=1))
    before = s3_objects(client, "refuse-run/")
    with pytest.raises(UserError, match="differs from this one .*seed 0 -> 1"):
        pipeline.check(tiny_config(uri, ipc=1, seed=1))
    assert s3_objects(client, "refuse-run/") == before


def test_unwritable_bucket_is_a_clear_error(s3_server):
    with pytest.raises(UserError, match=r"--out s3://no-such-bucket-gdd/run is not writable"):
        pipeline.check(tiny_config("s3://no-such-bucket-gdd/run"))


def test_shared_local_out_is_only_for_local_paths():
    with pytest.raises(UserError, match="--shared-local-out is for a local --out on a shared mount"):
        tiny_config(f"s3://{BUCKET}/run", shared_local_out=True)
    assert tiny_config("/mnt/nfs/run", shared_local_out=True).shared_local_out


def test_one_driver_per_run_on_s3(s3_server):
    """The lease's conditional create (If-None-Match: *) on an S3 server: one winner, a refusal naming it,
    and the next driver after a release."""
    from gdd_ray import lease

    client, _ = s3_server
    root = storage.Location(f"s3://{BUCKET}/leased")
    with lease.acquire(root, expiry=60) as held:
        with pytest.raises(UserError, match="in use by another driver"):
            lease.acquire(root, expiry=60)
        assert not root.create_exclusive(held.name, b"{}")  # the store itself refuses a second create
        assert list(s3_objects(client, "leased/")) == [f"leased/{held.name}"]
    assert [k for k in s3_objects(client, "leased/") if "_lease-" in k] == []  # (pyarrow may leave a folder marker)
    with lease.acquire(root, expiry=60) as again:
        assert again.generation == 1
