"""The Ray workers read and write the object stores themselves: generator actors and Ray Data tasks on S3 and on
GCS, and a Ray Train worker resuming from its checkpoint in an S3 bucket.

Both servers (tests/stores.py) and one local Ray whose workers see both endpoints, as a user's cluster sees its
store through its workers' environment: one Ray start for the two stores, not one each."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
from gen_helpers import EVAL_FILES, assert_same_images, bucket_train_config, generate_serial, images_of, tiny_config
from stores import BUCKET, gcs_objects, s3_objects

from gdd_ray import pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_stores(s3_server, gcs_server, ray_pool):
    """A local Ray whose workers see the S3 server's endpoint and credentials and the GCS emulator."""
    _, s3_env = s3_server
    ray_pool.use(runtime_env={"env_vars": {**s3_env, "STORAGE_EMULATOR_HOST": gcs_server}})


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_generate_and_augment_through_ray(scheme, s3_server, ray_stores, tiny_model):
    """The Ray actors and Ray Data tasks write to the bucket themselves; pixels equal the serial run's."""
    client, _ = s3_server

    def objects(run: str) -> dict[str, bytes]:  # read back by the store's own client, not through our storage layer
        return s3_objects(client, run + "/") if scheme == "s3" else gcs_objects(run)

    summaries = pipeline.run(tiny_config(f"{scheme}://{BUCKET}/ray-run", stages="generate,augment", pda_variants=1))
    assert summaries["generate"]["totals"]["units_run"] == 15 and summaries["augment"]["totals"]["images"] == 60
    generate_serial(tiny_config(f"{scheme}://{BUCKET}/serial-run"))  # the same run, in this process
    objs = objects("ray-run")
    gen = {k: v for k, v in objs.items() if k.startswith("ray-run/generated/")}
    assert_same_images(images_of(gen), images_of(objects("serial-run")))  # whichever runner and process made them
    aug = [k for k in objs if k.startswith("ray-run/augmented/") and k.endswith(".parquet")]
    assert len(aug) == 15 and "ray-run/augmented/_summary.json" in objs and "ray-run/samples.png" in objs
    assert sum(pq.read_metadata(io.BytesIO(objs[k])).num_rows for k in aug) == 60


def test_train_stage_checkpoints_and_resumes_in_the_bucket(s3_server, ray_stores, tmp_path):
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

    objects = s3_objects(client, "train-run/eval/")
    for name in EVAL_FILES:
        assert f"train-run/eval/{name}" in objects, sorted(objects)

    client.delete_object(Bucket=BUCKET, Key="train-run/eval/runs/run01.json")
    client.delete_object(Bucket=BUCKET, Key="train-run/eval/results.json")
    again = train_stage.run(ctx)
    assert again["runs"][1]["resumed_from_epoch"] == 2  # from the checkpoint in the bucket
    assert again["accuracies"] == res["accuracies"] and again["runs"][0] == res["runs"][0]
    objects = s3_objects(client, "train-run/eval/")
    assert "train-run/eval/runs/run01.json" in objects and "train-run/eval/results.json" in objects
    assert any(k.startswith("train-run/eval/_ray_train/") for k in objects)  # Ray Train's own storage_path
