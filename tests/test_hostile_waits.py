"""Bounded waits: a Ray address, an S3 or GCS endpoint, or the hub that is closed, or that accepts a connection
and never answers (a tarpit), ends in one line (`error: ...`, exit 2) well within 60 s, touching nothing.

The tests set GDD_RAY_TIMEOUT_S=1, the least it takes (the code's setting for every wait); that the default is
30 s, and that the clients are given it, is tested apart. Everything runs in this process through `cli.main`; no Ray starts."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from gen_helpers import tree_digest

from gdd_ray import reach, storage
from gdd_ray.cli import main

LIMIT_S = 1  # each tarpit case waits this long: ten of them are most of the module's time
WITHIN_S = 60


@pytest.fixture(scope="module")
def tarpit():
    """A port that accepts every connection and never sends a byte. On every interface: Ray turns 127.0.0.1 into
    the node's own address before it connects, and so does the probe."""
    server = socket.socket()
    server.bind(("", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture(scope="module")
def closed_port():
    """A loopback port nothing listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch):
    monkeypatch.setenv(reach.TIMEOUT_ENV, str(LIMIT_S))
    monkeypatch.setattr(reach, "_probed", {})  # every case probes for itself
    storage._gcs_filesystem.cache_clear()
    yield
    storage._gcs_filesystem.cache_clear()


@pytest.fixture
def existing_run(tmp_path):
    run = tmp_path / "run"
    (run / "generated").mkdir(parents=True)
    (run / "generated" / "c00000-i000000-000001.parquet").write_bytes(b"precious")
    return run


def timed_one_line(argv, capsys) -> tuple[str, float]:
    # What came before the command is not its output: e.g. the last worker logs of an earlier test's Ray, which
    # Ray's driver prints as it shuts down (`no_ray`).
    capsys.readouterr()
    t0 = time.monotonic()
    code = main(argv)
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert took < WITHIN_S
    return lines[0], took


DISTILL = ["distill", "--dataset", "cifar10", "--ipc", "1", "--model", "tiny", "--stages", "generate"]

S3_ENV = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip


def store_commands(uri: str, tmp_path) -> dict[str, list[str]]:
    return {
        "status": ["status", uri],
        "export": ["export", "--run", uri, "--format", "imagefolder", "--dest", str(tmp_path / "dest")],
        "distill": [*DISTILL, "--out", uri],
    }


@pytest.mark.parametrize("endpoint", ["tarpit", "closed"])
@pytest.mark.parametrize("command", ["status", "export", "distill"])
def test_s3_endpoint(endpoint, command, tarpit, closed_port, monkeypatch, tmp_path, capsys, tiny_model):
    port = tarpit if endpoint == "tarpit" else closed_port
    for k, v in {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(k, v)
    line, took = timed_one_line(store_commands("s3://bucket/run", tmp_path)[command], capsys)
    if endpoint == "tarpit":
        assert f"did not answer within {LIMIT_S} s" in line and reach.TIMEOUT_ENV in line and took >= LIMIT_S
    else:
        assert "cannot reach" in line and "refused" in line.lower()
    assert "s3://bucket" in line and not (tmp_path / "dest").exists()


@pytest.mark.parametrize("endpoint", ["tarpit", "closed"])
@pytest.mark.parametrize("command", ["status", "export", "distill"])
def test_gcs_endpoint(endpoint, command, tarpit, closed_port, monkeypatch, tmp_path, capsys, tiny_model):
    port = tarpit if endpoint == "tarpit" else closed_port
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{port}")
    line, took = timed_one_line(store_commands("gs://bucket/run", tmp_path)[command], capsys)
    assert "STORAGE_EMULATOR_HOST" in line
    if endpoint == "tarpit":
        assert f"did not answer within {LIMIT_S} s" in line and took >= LIMIT_S
    else:
        assert "cannot reach" in line


@pytest.mark.parametrize("endpoint", ["tarpit", "closed", "unknown host"])
def test_ray_address(endpoint, tarpit, closed_port, existing_run, monkeypatch, capsys, tiny_model, no_ray):
    import ray

    assert not ray.is_initialized()
    address = {"tarpit": f"127.0.0.1:{tarpit}", "closed": f"127.0.0.1:{closed_port}", "unknown host": "no-such-host.invalid:6379"}[endpoint]  # fmt: skip
    monkeypatch.setenv("RAY_ADDRESS", address)
    before = tree_digest(existing_run)
    line, _ = timed_one_line([*DISTILL, "--out", str(existing_run)], capsys)
    assert "the Ray cluster at" in line and address.rsplit(":")[-1] in line
    assert ("did not answer" if endpoint == "tarpit" else "cannot reach") in line
    assert tree_digest(existing_run) == before and not ray.is_initialized()


@pytest.mark.parametrize("endpoint", ["tarpit", "closed"])
def test_hub(endpoint, tarpit, closed_port, existing_run, monkeypatch, capsys):
    port = tarpit if endpoint == "tarpit" else closed_port
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(existing_run.parent / "hf"))  # an empty cache: the hub is asked
    before = tree_digest(existing_run)
    argv = [*DISTILL[:-4], "--model", "someone/not-cached", "--stages", "generate", "--out", str(existing_run)]
    line, took = timed_one_line(argv, capsys)
    assert "--model someone/not-cached: cannot load it" in line
    assert ("did not answer" if endpoint == "tarpit" else "cannot reach") in line
    assert took < 3 * LIMIT_S + 5  # asked once: a failed probe is remembered for the rest of the command
    assert tree_digest(existing_run) == before


def test_the_default_limit_is_30_s_and_every_client_gets_it(monkeypatch):
    """Unset: 30 s for the probes (socket and HTTP), the S3 client (connect and request timeouts) and the GCS
    client (its retry limit); set: that value."""
    import pyarrow.fs as pafs

    monkeypatch.delenv(reach.TIMEOUT_ENV)
    assert reach.DEFAULT_TIMEOUT_S == 30.0 and reach.timeout_s() == 30.0
    seen: list[float] = []

    def fake_connection(address, timeout):
        seen.append(timeout)
        raise ConnectionRefusedError(111, "Connection refused")

    def fake_urlopen(request, timeout):
        seen.append(timeout)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", fake_connection)
    monkeypatch.setattr(reach.urllib.request, "urlopen", fake_urlopen)
    for probe in (lambda: reach.check_grpc("127.0.0.1", 1, "x"), lambda: reach.check_http("http://127.0.0.1:1", "x")):
        with pytest.raises(reach.Unreachable):
            probe()
    assert seen == [30.0, 30.0]

    monkeypatch.setattr(reach, "check_http", lambda url, what: None)
    for k, v in {**S3_ENV, "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}.items():
        monkeypatch.setenv(k, v)
    fs, _ = storage.resolve("s3://bucket/run")
    options = fs.__reduce__()[1][0]
    assert (options["connect_timeout"], options["request_timeout"]) == (30.0, 30.0)
    assert options["endpoint_override"] == "http://127.0.0.1:1"  # from_uri's resolution kept
    monkeypatch.setenv(reach.TIMEOUT_ENV, "90")
    fs, _ = storage.resolve("s3://bucket/run")
    assert fs.__reduce__()[1][0]["connect_timeout"] == 90.0
    assert isinstance(storage._gcs_filesystem("http://127.0.0.1:1", reach.timeout_s()), pafs.GcsFileSystem)
