"""Shared fixtures: a per-session cache holding the tiny SDXL-architecture pipeline (built once, ~5 s)."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Every Ray the tests start runs with token authentication, as a user's cluster does (Ray's default for local
# clusters), with a token of this session (never the user's ~/.ray/auth_token). Set at import, before any test
# module imports ray: Ray reads RAY_AUTH_MODE once, when it is imported.
if "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ:
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
os.environ.setdefault("RAY_AUTH_MODE", "token")

# Each pytest-xdist worker (and a plain run) keeps its Rays in a temp folder of its own: a `Cluster` or
# `ray start` records its address in RAY_TMPDIR/ray/ray_current_cluster, and a plain ray.init() in another
# worker (or a CLI subprocess it starts) would otherwise join that cluster instead of starting its own. Short,
# as Ray's socket paths are limited; set before any test imports ray, inherited by every subprocess.
# (A worker inherits the controller's environment, so a worker always makes its own.)
SESSION_RAY_TMPDIR = None
if "RAY_TMPDIR" not in os.environ or "PYTEST_XDIST_WORKER" in os.environ:
    SESSION_RAY_TMPDIR = tempfile.mkdtemp(prefix=f"rx{os.environ.get('PYTEST_XDIST_WORKER', '')}-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = SESSION_RAY_TMPDIR

# One GDD_RAY_CACHE for the whole session, every pytest-xdist worker included: the tiny models (and the other
# random-weight models tests build) are built once, not once per worker (the tiny SDXL alone ~5-9 s). Made by
# the controller (or a plain run) at import, inherited by the workers; builds are atomic renames, so two
# workers building one model at once waste a copy, never break it. GDD_RAY_TEST_CACHE given: that folder, kept.
SESSION_GDD_CACHE = None
if "GDD_RAY_TEST_CACHE" not in os.environ:
    SESSION_GDD_CACHE = tempfile.mkdtemp(prefix="gdd-test-cache-", dir="/tmp")
    os.environ["GDD_RAY_TEST_CACHE"] = SESSION_GDD_CACHE

# `make test` runs the files on two workers (pytest-xdist, --dist loadfile: a file's tests and its module
# fixtures stay in one worker). Files are handed out in collection order, so the costliest go first and the
# cheap ones fill the gaps at the end (longest-first scheduling). Measured durations on 2 cores; the order
# changes only the wall time, never what runs.
COSTLIEST_FIRST = (
    "test_sweep.py",
    "test_job_submit.py",
    "test_stores_on_ray.py",
    "test_multinode.py",
    "test_generate_compile.py",
    "test_select_stage.py",
    "test_model_fetch.py",
    "test_train_stage.py",
    "test_generate_ray.py",
    "test_generators.py",
    "test_select_bench.py",
    "test_augment_bench.py",
    "test_augment_stage.py",
    "test_train_challenge.py",
    "test_s3.py",
    "test_gcs.py",
    "test_train_nets.py",
    "test_train_protocols.py",
    "test_time_budget.py",
    "test_plan_is_the_truth.py",
    "test_hostile_waits.py",
    "test_generate_stage.py",
    "test_gpu_bench.py",
    "test_generate_engine.py",
    "test_hostile_files.py",
    "test_hostile_signals.py",
    "test_generate_unit.py",
    "test_cli_errors.py",
    "test_prompt_templates.py",
    "test_generate_bench.py",
    "test_compare.py",
)


def pytest_unconfigure(config):
    if SESSION_RAY_TMPDIR and os.path.isdir(SESSION_RAY_TMPDIR) and not os.listdir(SESSION_RAY_TMPDIR):
        os.rmdir(SESSION_RAY_TMPDIR)  # the xdist controller's: it runs no test, so no Ray ever used it
    if SESSION_GDD_CACHE:  # the controller's (or a plain run's): every worker has ended by now
        shutil.rmtree(SESSION_GDD_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(COSTLIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


@pytest.fixture(scope="session", autouse=True)
def gdd_cache() -> Path:
    """Point GDD_RAY_CACHE (inherited by subprocesses and Ray workers) at the session's folder."""
    path = Path(os.environ["GDD_RAY_TEST_CACHE"])
    os.environ["GDD_RAY_CACHE"] = str(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach for the network
    return path


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """A bench's main() sets torch's thread count for its contenders (one, as each Ray worker has): every later
    test in this process would run on one core."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(before or os.cpu_count() or 1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests: the machine's cores are shared, and two threads fighting other
    processes run 5x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def s3_server():
    """(boto3 client, env) of a moto S3 server with one bucket, for the module's tests (tests/stores.py)."""
    import stores

    with stores.s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def gcs_server():
    """The URL of a GCS emulator with one bucket, for the module's tests (tests/stores.py)."""
    import stores

    with stores.gcs_server() as url:
        yield url


@pytest.fixture(scope="session")
def tiny_model(gdd_cache) -> Path:
    from gdd_ray.generate.model import ensure_tiny_model

    return ensure_tiny_model()


class RayPool:
    """One local Ray for the whole session, shared by every test that needs a plain local Ray (Ray's own suite
    shares `ray_start_regular_shared` the same way): starting one costs seconds, and the suite used to start
    about twenty. A test that needs another shape (fake GPUs, an object store's endpoint in the workers'
    environment) gets it by asking for it: the pool restarts Ray only when the shape changes, and a test that
    starts its own cluster asks for none (`no_ray`). Only what the pool started is ever stopped."""

    def __init__(self) -> None:
        self.shape: dict | None = None

    def use(self, **shape) -> None:
        import ray

        shape = {"num_cpus": 2, "num_gpus": 0, **shape}
        if ray.is_initialized() and self.shape == shape:
            return
        self.stop()
        ray.init(include_dashboard=False, configure_logging=False, **shape)
        self.shape = shape

    def stop(self) -> None:
        import ray

        if self.shape is not None and ray.is_initialized():
            ray.shutdown()
        self.shape = None


@pytest.fixture(scope="session")
def ray_pool():
    pool = RayPool()
    yield pool
    pool.stop()
    if SESSION_RAY_TMPDIR:
        shutil.rmtree(SESSION_RAY_TMPDIR, ignore_errors=True)  # the session's Ray logs; every Ray of it is stopped


@pytest.fixture(scope="module", autouse=True)
def cpu_ray_between_modules(ray_pool):
    """A module that asked for fake GPUs leaves no GPUs behind: later modules resolve `--vae-dtype auto` and
    the worker count from the Ray they find, and expect a CPU machine."""
    yield
    if ray_pool.shape and ray_pool.shape.get("num_gpus"):
        ray_pool.stop()


@pytest.fixture
def local_ray(ray_pool) -> None:
    """A plain local Ray (2 CPUs, no GPU), shared with the other tests of the session."""
    ray_pool.use()


@pytest.fixture
def trains_here(local_ray, one_torch_thread):
    """The train stage's worker code (run_tasks) run in this process on the CPU, as a sweep's Tune trial runs it
    (worker.training_here), instead of in a Ray Train worker group: for tests whose point is what is trained and
    recorded, not the transport. A one-worker Ray Train job costs 13-16 s of process starts on 2 cores; the
    transport is proven by test_train_stage (a group of two workers) and test_stores_on_ray (a resume from the
    bucket). One intra-op thread, as a Ray Train worker on a CPU node has."""
    import torch

    from gdd_ray.train.worker import training_here

    with training_here(torch.device("cpu")):
        yield


@pytest.fixture
def no_ray(ray_pool) -> None:
    """No Ray in this process: for a test that starts (and stops) a cluster of its own."""
    ray_pool.stop()
