"""The Ray driver on a local cluster with fake GPUs: scheduling, a killed actor, a unit that keeps failing."""

import os
import re
import signal
import threading

import pytest
from gen_helpers import busy_at_once, generator_actor_pids, read_images, tiny_config

from gdd_ray.classes import dataset_classes
from gdd_ray.errors import UserError
from gdd_ray.generate.driver import UnitFailed, actor_options, run_on_ray
from gdd_ray.generate.stage import make_job
from gdd_ray.plan import plan_units

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fake_gpu_cluster(gdd_cache, tiny_model, ray_pool):
    # Two fake GPUs: actors ask for num_gpus=1 each, exactly as on a real GPU node, and run on the CPU.
    ray_pool.use(num_cpus=4, num_gpus=2)


def test_actor_asks_for_one_gpu():
    assert actor_options(8)["num_gpus"] == 1 and "num_cpus" not in actor_options(8)
    assert actor_options(0)["num_cpus"] == 1
    assert actor_options(0, worker_gpus=1)["num_gpus"] == 1  # autoscaling: ask before GPU nodes exist
    assert actor_options(4, worker_gpus=0.5)["num_gpus"] == 0.5


def test_killed_actor_is_replaced_and_each_image_made_once(tmp_path, fake_gpu_cluster, capsys):
    cfg = tiny_config(tmp_path / "run", ipc=2, unit_size=1, batch_size=1)  # 20 one-image units
    out = tmp_path / "run" / "generated"
    job = make_job(cfg, dataset_classes("cifar10"), "fp", str(out))
    units = plan_units(10, 2, 1)
    results, errors = [], []

    def drive():
        try:
            # One actor: its kill leaves the pool empty until the replacement is up (units done by a survivor
            # meanwhile are test_multinode's lost node); a second actor would only add its ~11 s start.
            results.extend(run_on_ray(units, job, workers=1, max_retries=3, cluster_gpus=2))
        except Exception as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=drive)
    t.start()
    # The actor rendering, held still: the kill lands mid-unit, with units left for the run after it.
    (victim,) = busy_at_once(1, t)
    os.kill(victim, signal.SIGKILL)  # mid-unit
    t.join(timeout=300)
    assert not t.is_alive() and not errors, errors
    assert sorted(r.unit for r in results) == sorted(units)  # every unit reported done exactly once
    images = read_images(out)  # asserts no (label, index) twice
    assert sorted(images) == sorted((c, i) for c in range(10) for i in range(2))
    assert victim not in generator_actor_pids()
    assert "starting a replacement" in capsys.readouterr().out


def test_unit_that_keeps_failing_stops_the_run_naming_it(tmp_path, fake_gpu_cluster):
    # Prompts are encoded at start-up, so the failure is put where a unit's own work meets it: its shard
    # cannot be written (the output folder's parent is a file), on every unit.
    (tmp_path / "blocker").write_text("a file, not a folder")
    cfg = tiny_config(tmp_path / "run")
    job = make_job(cfg, dataset_classes("cifar10"), "fp", str(tmp_path / "blocker" / "generated"))
    with pytest.raises(UnitFailed) as e:
        run_on_ray(plan_units(10, 2, 2), job, workers=1, max_retries=2, cluster_gpus=2)  # one actor to start
    msg = str(e.value)
    assert re.search(r"work unit \d+\.\.\d+ \(class \d+ image \d+ to class \d+ image \d+\) failed 2 times", msg)
    assert "blocker" in msg
    assert not isinstance(e.value, UserError)  # not the user's input: exit 1 with the traceback, not one line
    assert "blocker" in e.value.details and "Error" in e.value.details  # the worker's own traceback
