"""Every stage on an object store: a real S3-protocol server (moto's standalone server) on 127.0.0.1.

pyarrow's S3 filesystem, boto3 and the Ray workers started here all find the server through
AWS_ENDPOINT_URL, exactly as a user points them at MinIO or another S3-compatible store.
"""

from __future__ import annotations

import io
import logging
import os

import pyarrow.parquet as pq
import pytest
from gen_helpers import EVAL_FILES, actor_threads, assert_same_images, bucket_train_config, images_of, tiny_config

from gdd_ray import pipeline, storage
from gdd_ray.errors import UserError
from gdd_ray.generate import stage as gen_stage
from gdd_ray.run import RunDir
from gdd_ray.status import run_status

BUCKET = "gdd-test"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free loopback port with one bucket; the env points every client at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client, env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def keys(client, prefix: str) -> dict[str, bytes]:
    """Every object under prefix with its bytes (fetched with boto3: an independent reader)."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
    return out


def generate_serial(cfg):
    ctx = pipeline.check(cfg)
    with actor_threads():  # its images are compared with the Ray actors' byte for byte
        return ctx.run_dir, gen_stage.run(ctx, serial=True)


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
    _, summary = generate_serial(cfg)
    assert summary["totals"]["units_run"] == 15 and summary["totals"]["images"] == 30

    objects = keys(client, "serial-run/")
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
    _, summary = generate_serial(cfg)
    out = capsys.readouterr().out
    assert summary["totals"]["units_run"] == 2, out
    assert f"redoing {torn.rsplit('/', 1)[1]}: unreadable" in out and "13 done, 2 to do" in out
    again = keys(client, "serial-run/")
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
    before = keys(client, "refuse-run/")
    with pytest.raises(UserError, match="differs from this one .*seed 0 -> 1"):
        pipeline.check(tiny_config(uri, ipc=1, seed=1))
    assert keys(client, "refuse-run/") == before


def test_unwritable_bucket_is_a_clear_error(s3_server):
    with pytest.raises(UserError, match=r"--out s3://no-such-bucket-gdd/run is not writable"):
        pipeline.check(tiny_config("s3://no-such-bucket-gdd/run"))


@pytest.fixture(scope="module")
def ray_s3(s3_server, ray_pool):
    """A local Ray whose workers see the same S3 endpoint and credentials."""
    _, env = s3_server
    ray_pool.use(runtime_env={"env_vars": env})


@pytest.mark.slow
def test_generate_and_augment_through_ray_on_s3(s3_server, ray_s3, tiny_model):
    """The Ray actors and Ray Data tasks write to the bucket themselves; pixels equal the serial run's."""
    client, _ = s3_server
    uri = f"s3://{BUCKET}/ray-run"
    cfg = tiny_config(uri, stages="generate,augment", pda_variants=1)
    summaries = pipeline.run(cfg)
    assert summaries["generate"]["totals"]["units_run"] == 15
    assert summaries["augment"]["totals"]["images"] == 60

    objects = keys(client, "ray-run/")
    serial = keys(client, "ray-run-serial/")
    if not serial:
        generate_serial(tiny_config(f"s3://{BUCKET}/ray-run-serial"))
        serial = keys(client, "ray-run-serial/")
    gen = {k: v for k, v in objects.items() if k.startswith("ray-run/generated/")}
    assert_same_images(images_of(gen), images_of(serial))  # whichever runner and process made them
    aug = [k for k in objects if k.startswith("ray-run/augmented/") and k.endswith(".parquet")]
    assert len(aug) == 15 and "ray-run/augmented/_summary.json" in objects and "ray-run/samples.png" in objects
    rows = sum(pq.read_metadata(io.BytesIO(objects[k])).num_rows for k in aug)
    assert rows == 60


@pytest.mark.slow
def test_train_stage_checkpoints_and_resumes_in_the_bucket(s3_server, ray_s3, tmp_path):
    """Checkpoints, run records and results go to s3://, and a lost run resumes from its checkpoint in the bucket
    on a Ray Train worker (which reads and writes the bucket itself). The first training runs the same worker
    code in this process (worker.training_here, as a sweep's trial): a Ray Train job fewer to start. The test set
    is a local folder read by the driver only."""
    import torch

    from gdd_ray.train import stage as train_stage
    from gdd_ray.train.worker import training_here

    client, _ = s3_server
    cfg = bucket_train_config(f"s3://{BUCKET}/train-run", tmp_path / "test")
    cfg = cfg.replace(**{"train.eval_workers": 1})  # both runs on one worker: a worker process fewer to start
    ctx = pipeline.check(cfg)
    with training_here(torch.device("cpu")):
        res = train_stage.run(ctx)
    assert res["evaluated"] and len(res["runs"]) == 2

    objects = keys(client, "train-run/eval/")
    for name in EVAL_FILES:
        assert f"train-run/eval/{name}" in objects, sorted(objects)

    client.delete_object(Bucket=BUCKET, Key="train-run/eval/runs/run01.json")
    client.delete_object(Bucket=BUCKET, Key="train-run/eval/results.json")
    again = train_stage.run(ctx)
    assert again["runs"][1]["resumed_from_epoch"] == 2  # from the checkpoint in the bucket
    assert again["accuracies"] == res["accuracies"] and again["runs"][0] == res["runs"][0]
    objects = keys(client, "train-run/eval/")
    assert "train-run/eval/runs/run01.json" in objects and "train-run/eval/results.json" in objects
    assert any(k.startswith("train-run/eval/_ray_train/") for k in objects)  # Ray Train's own storage_path


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
        assert list(keys(client, "leased/")) == [f"leased/{held.name}"]
    assert [k for k in keys(client, "leased/") if "_lease-" in k] == []  # (pyarrow may leave a folder marker)
    with lease.acquire(root, expiry=60) as again:
        assert again.generation == 1
