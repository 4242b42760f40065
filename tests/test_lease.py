"""One live driver per run: the lease in OUT, a second driver refused, a dead driver's lease taken over,
--overwrite never under a live driver and deleting only what the run made."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from gen_helpers import tiny_config, tree_digest

from gdd_ray import lease, pipeline, storage
from gdd_ray.cli import main
from gdd_ray.errors import UserError
from gdd_ray.generate import stage as gen_stage
from gdd_ray.status import run_status
from tests.conftest import REPO


def lease_files(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if lease.LEASE_PATTERN.match(n))


def without_lease(digest: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in digest.items() if not lease.LEASE_PATTERN.match(k)}


def foreign_record(heartbeat_age_s: float, expiry: float = 5.0) -> dict:
    """A lease written by a driver on another machine, its last heartbeat `heartbeat_age_s` ago."""
    t = time.time() - heartbeat_age_s
    return {
        "holder": {
            "host": "other-node",
            "pid": 4242,
            "pid_start": "1",
            "machine": "elsewhere:1",
            "ray_job": "raysubmit_x",
        },
        "token": "t",
        "generation": 1,
        "started": "2026-01-01T00:00:00+00:00",
        "heartbeat": "",
        "heartbeat_t": t,
        "expiry_s": expiry,
    }


def test_a_second_driver_is_refused_naming_the_holder(tmp_path):
    root = storage.Location(str(tmp_path / "run"))
    with lease.acquire(root, expiry=60) as held:
        with pytest.raises(UserError, match=rf"in use by another driver .*pid {os.getpid()}"):
            lease.acquire(root, expiry=60)
        assert held.heartbeat() and not held.lost
    assert lease_files(tmp_path / "run") == []  # released on exit
    with lease.acquire(root, expiry=60):  # and free again
        pass


def test_racing_drivers_exactly_one_wins(tmp_path):
    root = storage.Location(str(tmp_path / "run"))
    start = threading.Barrier(8)
    won, refused = [], []

    def contend():
        start.wait()
        try:
            won.append(lease.acquire(root, expiry=60))
        except UserError:
            refused.append(1)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    won[0].release()


def test_an_expired_lease_is_taken_over_and_its_holder_notices(tmp_path, capsys):
    root = storage.Location(str(tmp_path / "run"))
    root.makedirs()
    root.write_bytes(lease.lease_name(1), json.dumps(foreign_record(heartbeat_age_s=1)).encode())
    with pytest.raises(UserError, match="other-node pid 4242, Ray job raysubmit_x"):
        lease.acquire(root, expiry=5)
    assert "running: other-node" in _status_driver(root)
    root.write_bytes(lease.lease_name(1), json.dumps(foreign_record(heartbeat_age_s=10)).encode())
    with lease.acquire(root, expiry=5) as held:
        assert held.generation == 2
        assert "taking over" in capsys.readouterr().out
        assert lease_files(tmp_path / "run") == [lease.lease_name(2)]  # the expired one is gone
        # The old holder, had it only stalled, sees a newer generation at its next heartbeat and stops.
        stalled = lease.Lease(root, 1, foreign_record(0))
        assert not stalled.heartbeat() and stalled.lost


def _status_driver(root: storage.Location) -> str:
    from gdd_ray.run import RunDir
    from gdd_ray.status import _driver

    return _driver(RunDir(root.uri)) or ""


def test_a_killed_holder_on_this_machine_is_taken_over_at_once(tmp_path):
    out = tmp_path / "run"
    code = (
        "import sys, time; from gdd_ray import lease, storage; "
        f"lease.acquire(storage.Location({str(out)!r}), expiry=3600); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="in use by another driver"):
            lease.acquire(storage.Location(str(out)), expiry=3600)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Its heartbeat is fresh and its expiry an hour, but its process is gone from this machine.
    with lease.acquire(storage.Location(str(out)), expiry=3600) as held:
        assert held.generation == 2


def small_run(tmp_path, **overrides):
    """A finished generate stage of two classes, one image each (the smallest real run)."""
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    cfg = tiny_config(tmp_path / "run", dataset=None, classes=str(classes), ipc=1, **overrides)
    gen_stage.run(pipeline.check(cfg), serial=True)
    return tmp_path / "run", classes


def test_distill_under_a_live_driver_touches_nothing(tmp_path, tiny_model, capsys):
    out, classes = small_run(tmp_path)
    (out / "generated" / "my-notes.txt").write_text("mine")
    with lease.acquire(storage.Location(str(out)), expiry=60):
        before = without_lease(tree_digest(out))
        for extra in ([], ["--overwrite", "--seed", "7"]):
            args = ["distill", "--classes", str(classes), "--ipc", "1", "--out", str(out), "--model", "tiny",
                    "--gen-resolution", "64", "--image-size", "16", "--unit-size", "2", "--batch-size", "2",
                    "--stages", "generate", *extra]  # fmt: skip
            assert main(args) == 2
            err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
            assert len(err) == 1 and "in use by another driver" in err[0], err
            assert without_lease(tree_digest(out)) == before
        assert run_status(str(out))["driver"].startswith(f"running: {os.uname().nodename} pid {os.getpid()}")
    assert run_status(str(out))["driver"] is None


def test_overwrite_deletes_only_what_the_run_made(tmp_path, tiny_model):
    out, classes = small_run(tmp_path)
    (out / "generated" / "my-notes.txt").write_text("mine")
    (out / "augmented").mkdir()  # a folder this run never made (no augment stage ran): left alone
    (out / "augmented" / "keep.txt").write_text("mine too")
    old_shards = sorted(p.name for p in (out / "generated").glob("*.parquet"))
    pipeline.check(tiny_config(out, dataset=None, classes=str(classes), ipc=1, seed=3, overwrite=True))
    assert (out / "generated" / "my-notes.txt").read_text() == "mine"
    assert (out / "augmented" / "keep.txt").read_text() == "mine too"
    assert old_shards and not list((out / "generated").glob("*.parquet"))
    assert not (out / "generated" / "_manifest.json").exists()
