"""End to end through a real Ray head: `ray job submit` of jobs/distill.py, and resume after a killed driver."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gen_helpers import actor_threads, assert_same_images, generator_actor_pids, read_images, tiny_config
from PIL import Image
from ray_head import RayHead

from gdd_ray import pipeline, storage
from gdd_ray.generate import stage as gen_stage
from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head(gdd_cache, tiny_model):
    h = RayHead(num_cpus=2)
    yield h
    h.stop()


def wait_for_no_generator_actors(timeout: float = 60) -> None:
    """Until no GeneratorActor process is left among this test's descendants (the head child's workers)."""
    deadline = time.time() + timeout
    while generator_actor_pids() and time.time() < deadline:
        time.sleep(0.2)
    assert not generator_actor_pids(), "generator actors still alive after the driver died"


def job_args(out: Path, **extra) -> list[str]:
    args = dict(dataset="cifar10", ipc="3", model="tiny", gen_resolution="64", image_size="16", unit_size="2",
                batch_size="2", stages="generate", out=str(out))  # fmt: skip
    args.update({k: str(v) for k, v in extra.items()})
    return [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]


def submit(head: RayHead, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "job", "submit", "--address", head.dashboard_url, "--working-dir", str(REPO), "--",
           "python", "jobs/distill.py", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env or head.env, cwd=REPO, timeout=600)


def test_ray_job_submit_generates_every_image_once(head, tmp_path):
    out = tmp_path / "run"
    r = submit(head, job_args(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[generate] done:" in r.stdout  # the progress/summary lines reach the job log
    images = read_images(out / "generated")
    assert sorted(images) == sorted((c, i) for c in range(10) for i in range(3))
    assert {Image.open(io.BytesIO(b)).size for b in images.values()} == {(16, 16)}
    summary = json.loads((out / "generated" / "_summary.json").read_text())
    assert summary["totals"]["images"] == 30 and summary["totals"]["images_made"] == 30
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["ipc"] == 3 and record["fingerprints"]["generate"] == summary["fingerprint"]
    assert "ray" in record["versions"]


def test_killed_driver_then_rerun_redoes_only_missing_units(head, tmp_path):
    out = tmp_path / "run"
    # 160 px renders slowly enough on a CPU to kill the driver half way. The batch size is the in-process
    # reference's below: another batch size is another float rounding (an image then moves by a level).
    run = dict(ipc=4, unit_size=1, gen_resolution=160, batch_size=1)
    args = job_args(out, **run)
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "distill.py"), *args],
        env={**head.env, "RAY_ADDRESS": head.gcs_address},
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    gen = out / "generated"
    shards_done = storage.Location(str(gen)).list  # through the storage layer: temporaries never count
    deadline = time.time() + 300  # a safety net: the loop ends on an event (5 shards, or the driver's end)
    while time.time() < deadline and len(shards_done(".parquet")) < 5 and driver.poll() is None:
        time.sleep(0.1)
    assert driver.poll() is None, "the driver ended before it could be killed half way"
    # Freeze the actors (no more commits), then kill the driver: the run stops half way, never by a race.
    for pid in generator_actor_pids():
        os.kill(pid, signal.SIGSTOP)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    wait_for_no_generator_actors()  # Ray kills a dead driver's actors, stopped ones included
    done_before = set(shards_done(".parquet"))
    assert 5 <= len(done_before) < 40
    assert not (gen / "_manifest.json").exists()
    mtimes = {n: (gen / n).stat().st_mtime_ns for n in done_before}
    leftovers = [p.name for p in gen.iterdir() if ".tmp-" in p.name]  # what a frozen actor was writing, if any

    r = submit(head, job_args(out, **run))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((gen / "_summary.json").read_text())
    assert summary["totals"]["units_run"] == 40 - len(done_before)  # only the missing units
    assert {n: (gen / n).stat().st_mtime_ns for n in done_before} == mtimes  # finished shards kept as they were
    assert not [p.name for p in gen.iterdir() if ".tmp-" in p.name], leftovers  # swept at start and end
    assert sorted(json.loads((gen / "_manifest.json").read_text())["shards"], key=lambda s: s["name"]) == sorted(
        ({"name": p.name, "rows": 1, "bytes": p.stat().st_size} for p in gen.glob("*.parquet")),
        key=lambda s: s["name"],
    )
    resumed = read_images(gen)

    # The same run without interruption, in process: image for image the same images.
    ref_cfg = tiny_config(tmp_path / "ref", **run)
    with actor_threads():
        gen_stage.run(pipeline.check(ref_cfg), serial=True)
    assert_same_images(resumed, read_images(tmp_path / "ref" / "generated"))

    # A third run has nothing to do: it ends without starting or joining Ray at all.
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "distill.py"), *args], env=head.env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr[-2000:]
    log = r.stdout + r.stderr
    assert "Started a local Ray instance" not in log and "Connected to Ray cluster" not in log, log[-2000:]


def test_a_submit_without_the_token_is_refused(head, tmp_path):
    """The head runs with token authentication: a client without the token cannot submit (or run) anything."""
    env = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    for mode in ("token", "disabled"):
        r = submit(head, job_args(tmp_path / "run"), env={**env, "RAY_AUTH_MODE": mode})
        assert r.returncode != 0, r.stdout[-2000:]
        assert "auth" in (r.stdout + r.stderr).lower(), (r.stdout + r.stderr)[-2000:]
    assert not (tmp_path / "run").exists()
