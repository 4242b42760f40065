"""The object stores tests run against, each a real server on a loopback port: S3 (moto's standalone server)
and GCS (`gcp-storage-emulator`, a child process), with one bucket each, and independent readers of what they
hold. Every client finds them the way a user points one at a store: AWS_ENDPOINT_URL for S3 (MinIO and
other S3-compatible stores the same), STORAGE_EMULATOR_HOST for GCS (the variable Google's own clients read).

The GCS emulator runs as a child process. Started in the tests' process (its `create_server` thread), a serial
generate hung at its first footer check after the shards were written (faulthandler: the emulator's one
thread stopped inside a Python-level socket write in `end_headers`, every reader thread inside pyarrow's
GcsFileSystem open). The same single-threaded emulator in a child process answers the same run, so the hang
needs server and clients in one interpreter: most likely a pyarrow GCS call that keeps the GIL while it waits
for the answer of a server that needs the GIL to send it. A real GCS is never in the driver's process."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from gdd_ray import storage

BUCKET = "gdd-test"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextmanager
def s3_server():
    """(boto3 client, the env that points every client at it): a moto S3 server with the bucket BUCKET."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    try:
        with pytest.MonkeyPatch.context() as mp:  # what this process and the Ray it starts see, restored after
            for k, v in env.items():
                mp.setenv(k, v)
            import boto3

            client = boto3.client("s3")
            client.create_bucket(Bucket=BUCKET)
            yield client, env
    finally:
        server.stop()


@contextmanager
def gcs_server():
    """The emulator's URL (STORAGE_EMULATOR_HOST): `gcp-storage-emulator start` as a child on a free loopback
    port, in memory, with the bucket BUCKET; stopped by pid."""
    pytest.importorskip("gcp_storage_emulator")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    url = f"http://127.0.0.1:{port}"
    exe = str(Path(sys.executable).parent / "gcp-storage-emulator")
    cmd = [exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket", BUCKET, "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:  # until it answers (a process start: no event to wait on but the port itself)
            assert proc.poll() is None, "gcp-storage-emulator exited at start"
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1):
                    break
            except OSError:
                assert time.time() < deadline, "gcp-storage-emulator did not answer within 60 s"
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", url)
            yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def s3_objects(client, prefix: str) -> dict[str, bytes]:
    """Every object under s3://BUCKET/prefix with its bytes (fetched with boto3: an independent reader)."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
    return out


def gcs_objects(prefix: str) -> dict[str, bytes]:
    """Every object under gs://BUCKET/prefix with its bytes, read through pyarrow's own GCS client."""
    fs, inner = storage.resolve(f"gs://{BUCKET}/{prefix}")
    out = {}
    for info in fs.get_file_info(storage.pafs.FileSelector(inner, recursive=True, allow_not_found=True)):
        if info.type == storage.pafs.FileType.File:
            with fs.open_input_stream(info.path) as fh:
                out[info.path.split("/", 1)[1]] = fh.read()
    return out
