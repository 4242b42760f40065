"""End to end through a real Ray head started by the README's cluster lines, as written: `ray job submit` of
jobs/distill.py (the README's own submit line among them), and resume after a killed driver.

The README's lines: `export RAY_AUTH_MODE=token`, `ray get-auth-token --generate`, `ray start --head` with Ray's
defaults, then its `ray job submit` command with the quick-run options the README gives. Read from README.md,
so the test breaks when the README drifts from what works. What differs from a user's shell, and why: HOME is
a fresh folder (the token `ray get-auth-token` makes is this module's, never the machine's ~/.ray/auth_token);
the head gets ports and a temp dir of its own plus --block, so it is stopped by its pid and never meets another
Ray here; RAY_ADDRESS names that head's dashboard (a user's head listens on the default 8265); `--out` of the
quick-run options is a folder of this test. Every test of the module submits to that one head (starting one
costs seconds).
"""

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gen_helpers import assert_same_images, generate_serial, generator_actor_pids, read_images
from PIL import Image
from ray_head import RayHead

from gdd_ray import storage
from gdd_ray.config_loader import build_config
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def readme_cluster_lines() -> list[list[str]]:
    """The words of each line of the README code block holding `ray job submit` (comments dropped)."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```\n(.*?)^```", text, flags=re.S | re.M)
    block = next(b for b in blocks if "ray job submit" in b and "ray start --head" in b)
    return [shlex.split(line, comments=True) for line in block.splitlines() if shlex.split(line, comments=True)]


def readme_quick_options() -> list[str]:
    m = re.search(r"append the quick-run options\s+`([^`]+)`\s+to the submit line", (REPO / "README.md").read_text())
    assert m, "README.md no longer gives the quick-run options for the submit line"
    return shlex.split(m.group(1))


def with_out(options: list[str], out: Path) -> list[str]:
    i = options.index("--out")
    return [*options[:i], "--out", str(out), *options[i + 2 :]]


@pytest.fixture(scope="module")
def readme_lines() -> list[list[str]]:
    lines = readme_cluster_lines()
    assert [w[:3] for w in lines] == [
        ["export", "RAY_AUTH_MODE=token"],
        ["ray", "get-auth-token", "--generate"],
        ["ray", "start", "--head"],
        ["ray", "job", "submit"],
    ], lines
    return lines


@pytest.fixture(scope="module")
def head(gdd_cache, tiny_model, readme_lines, tmp_path_factory):
    """The README's first three lines, as written: the head every test of the module submits to."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no token or address of the tests'
    env.update(HOME=str(home), PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
    export, get_token, start = readme_lines[:3]
    name, value = export[1].split("=", 1)
    env[name] = value
    r = subprocess.run(get_token, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (home / ".ray" / "auth_token").read_text().strip()
    h = RayHead(num_cpus=2, env=dict(env), start=tuple(start))
    yield h
    h.stop()


def test_readme_cluster_lines_as_written(head, readme_lines, tmp_path):
    """The README's submit line with its quick-run options: the job succeeds, its progress and summary lines
    reach the job log, and it made every image once, recorded with the versions (Ray's among them)."""
    # the head authenticates: the dashboard refuses a request that carries no token
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(head.dashboard_url + "/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    out = tmp_path / "check"
    argv = [*readme_lines[3], *with_out(readme_quick_options(), out)]
    r = subprocess.run(argv, env={**head.env, "RAY_ADDRESS": head.dashboard_url}, cwd=REPO,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout and "[generate] done:" in r.stdout, r.stdout[-3000:]
    images = read_images(out / "generated")
    assert sorted(images) == [(c, 0) for c in range(10)]
    assert {Image.open(io.BytesIO(b)).size for b in images.values()} == {(16, 16)}
    summary = json.loads((out / "generated" / "_summary.json").read_text())
    assert summary["totals"]["images"] == 10 and summary["totals"]["images_made"] == 10
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["ipc"] == 1 and record["fingerprints"]["generate"] == summary["fingerprint"]
    assert "ray" in record["versions"]


def wait_for_no_generator_actors(timeout: float = 60) -> None:
    """Until no GeneratorActor process is left among this test's descendants (the head child's workers)."""
    deadline = time.time() + timeout
    while generator_actor_pids() and time.time() < deadline:
        time.sleep(0.2)
    assert not generator_actor_pids(), "generator actors still alive after the driver died"


def job_values(out: Path, **extra) -> dict:
    """A small generate run's settings: what job_args passes on the command line, and the in-process
    reference run's config (one dict, so the two are always the same run)."""
    values = dict(dataset="cifar10", ipc=3, model="tiny", gen_resolution=64, image_size=16, unit_size=2,
                  batch_size=2, stages="generate", out=str(out))  # fmt: skip
    return {**values, **extra}


def job_args(out: Path, **extra) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in job_values(out, **extra).items()]


def submit(head: RayHead, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "job", "submit", "--address", head.dashboard_url, "--working-dir", str(REPO), "--",
           "python", "jobs/distill.py", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env or head.env, cwd=REPO, timeout=600)


# 20 one-image units at 96 px: slow enough that the driver killed after 3 shards below still has 17 units (over
# a second of its actor's work) to do when the poll freezes the actor.
RUN = dict(ipc=2, unit_size=1, gen_resolution=96, batch_size=1)


def uninterrupted_run(out: Path) -> dict[tuple[int, int], bytes]:
    """The run RUN, whole, in this process (serially, one torch thread as an actor has): the reference the
    resumed one must equal image for image (test_stores_on_ray proves the serial runner draws the actors' bytes)."""
    generate_serial(build_config(job_values(out, **RUN)))
    return read_images(out / "generated")


def test_killed_driver_then_rerun_redoes_only_missing_units(head, tmp_path, tiny_model):
    out = tmp_path / "run"
    args = job_args(out, **RUN)
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "distill.py"), *args],
        env={**head.env, "RAY_ADDRESS": head.gcs_address},
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    gen = out / "generated"
    shards_done = storage.Location(str(gen)).list  # through the storage layer: temporaries never count
    deadline = time.time() + 300  # a safety net: the loop ends on an event (3 shards, or the driver's end)
    while time.time() < deadline and len(shards_done(".parquet")) < 3 and driver.poll() is None:
        time.sleep(0.02)
    assert driver.poll() is None, "the driver ended before it could be killed half way"
    # Freeze the actors (no more commits), then kill the driver: the run stops half way, never by a race.
    for pid in generator_actor_pids():
        os.kill(pid, signal.SIGSTOP)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    wait_for_no_generator_actors()  # Ray kills a dead driver's actors, stopped ones included
    done_before = set(shards_done(".parquet"))
    assert 3 <= len(done_before) < 20
    assert not (gen / "_manifest.json").exists()
    mtimes = {n: (gen / n).stat().st_mtime_ns for n in done_before}
    leftovers = [p.name for p in gen.iterdir() if ".tmp-" in p.name]  # what a frozen actor was writing, if any

    r = submit(head, args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((gen / "_summary.json").read_text())
    assert summary["totals"]["units_run"] == 20 - len(done_before)  # only the missing units
    assert {n: (gen / n).stat().st_mtime_ns for n in done_before} == mtimes  # finished shards kept as they were
    assert not [p.name for p in gen.iterdir() if ".tmp-" in p.name], leftovers  # swept at start and end
    assert sorted(json.loads((gen / "_manifest.json").read_text())["shards"], key=lambda s: s["name"]) == sorted(
        ({"name": p.name, "rows": 1, "bytes": p.stat().st_size} for p in gen.glob("*.parquet")),
        key=lambda s: s["name"],
    )
    resumed = read_images(gen)

    # The same run without interruption: image for image the same images.
    assert_same_images(resumed, uninterrupted_run(tmp_path / "whole"))

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
    with ThreadPoolExecutor(2) as pool:  # two clients at once: each spends seconds importing Ray
        runs = list(pool.map(lambda mode: submit(head, job_args(tmp_path / "run"), {**env, "RAY_AUTH_MODE": mode}),
                             ("token", "disabled")))  # fmt: skip
    for r in runs:
        assert r.returncode != 0, r.stdout[-2000:]
        assert "auth" in (r.stdout + r.stderr).lower(), (r.stdout + r.stderr)[-2000:]
    assert not (tmp_path / "run").exists()
