"""A pinned hub model fetched once per node before the actors start, the actors loading it offline; without
network: a fake hub (GDD_RAY_FAKE_HUB, see gdd_ray/generate/fetch.py) holding the tiny model's files."""

from __future__ import annotations

import os
import shutil
import tempfile

import huggingface_hub
import pytest
import ray
from gen_helpers import read_images, tiny_config

from gdd_ray import pipeline
from gdd_ray.errors import UserError
from gdd_ray.generate import fetch
from gdd_ray.generate import model as gen_model
from gdd_ray.generate import stage as gen_stage

SHA = "c0ffee" + "0" * 34
OTHER = "d" * 40


@pytest.fixture
def fake_hub(tmp_path, tiny_model, monkeypatch):
    """`org/tiny` at SHA on a fake hub (plus a file no pattern selects), and a Hugging Face cache holding
    only what a driver reads before the run: refs/main and the config files, no weights, no marker."""
    hub = tmp_path / "fakehub"
    remote = hub / "org" / "tiny" / SHA
    shutil.copytree(tiny_model, remote)
    (remote / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"fp32 weights nobody loads")
    cache = tmp_path / "hf"
    driver_read = cache / "models--org--tiny" / "snapshots" / SHA
    for config in remote.rglob("*.json"):
        target = driver_read / config.relative_to(remote)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config, target)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text(SHA)
    monkeypatch.setenv("GDD_RAY_FAKE_HUB", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # for the Ray workers started below, and fetch.hub_cache()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import in this process
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gen_model.resolve_revision.cache_clear()
    yield hub
    gen_model.resolve_revision.cache_clear()


def fetches(hub) -> int:
    return len(list((hub / "fetches").glob("*"))) if (hub / "fetches").is_dir() else 0


def test_a_fetch_takes_the_fp16_files_and_configs_once_and_the_pipeline_loads_from_it(fake_hub):
    assert fetch.local_snapshot("org/tiny", SHA) is None  # the driver's config files are not a fetched snapshot
    path = fetch.ensure_snapshot("org/tiny", SHA)
    files = {p.relative_to(path).as_posix() for p in fetch.snapshot_folder("org/tiny", SHA).rglob("*")}
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in files and "text_encoder_2/model.fp16.safetensors" in files
    assert {"tokenizer/vocab.json", "tokenizer/merges.txt", "model_index.json"} <= files
    assert "unet/diffusion_pytorch_model.bin" not in files
    assert fetch.ensure_snapshot("org/tiny", SHA) == path and fetches(fake_hub) == 1  # complete: not fetched again
    pipe = gen_model.load_pipeline("org/tiny", device="cpu", revision=SHA)
    assert pipe.name_or_path == path


@pytest.mark.slow  # ~26 s alone on 2 cores: a generate run on Ray with two actors, then one in this process
def test_one_fetch_per_node_then_offline_actors_and_a_missing_revision_is_one_line(fake_hub, tmp_path, ray_pool):
    names = ("GDD_RAY_FAKE_HUB", "HF_HUB_CACHE", "HF_HUB_OFFLINE")  # the workers see this test's hub and cache
    ray_pool.use(runtime_env={"env_vars": {k: os.environ[k] for k in names}})
    with pytest.raises(UserError, match=r"--model org/tiny at revision d{40}: the download to node \w{12} "):
        fetch.fetch_on_nodes("org/tiny", OTHER, needs_gpu=False)
    cfg = tiny_config(tmp_path / "run", model="org/tiny", ipc=2, workers=2)
    ctx = pipeline.check(cfg)
    assert ctx.inputs["generate"]["model_revision"] == SHA
    summary = gen_stage.run(ctx)
    assert len(read_images(tmp_path / "run" / "generated")) == 20
    assert summary["driver"]["model_fetch"]["nodes"] == 1
    assert fetches(fake_hub) == 1  # one node, one fetch; two actors loaded without one
    # The hub goes away: the node's snapshot is found complete (not fetched again), and a new run still loads
    # it (the generators never ask the hub): in this process, where the same UnitGenerator loads it as an
    # actor does (an actor more to start would prove no more).
    shutil.rmtree(fake_hub / "org")
    (snapshot,) = fetch.fetch_on_nodes("org/tiny", SHA, needs_gpu=False).values()
    assert snapshot == str(fetch.snapshot_folder("org/tiny", SHA))
    gen_stage.run(pipeline.check(cfg.replace(out=str(tmp_path / "run2"))), serial=True)
    assert len(read_images(tmp_path / "run2" / "generated")) == 20 and fetches(fake_hub) == 1
    # The run pinned SHA: a resume at another commit is refused, naming the change (nothing is mixed).
    with pytest.raises(UserError, match="generate"):
        pipeline.check(cfg.replace(**{"generate.model_revision": OTHER}))


def test_local_and_built_in_models_fetch_nothing(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("GDD_RAY_FAKE_HUB", str(tmp_path / "nohub"))
    job = gen_stage.make_job(tiny_config(tmp_path / "run", model=str(tiny_model)), [], "fp", str(tmp_path))
    stats: dict = {}
    gen_stage.fetch_pinned_model(job, None, stats)  # no Ray needed: returns before touching it
    assert job.model_revision is None and stats == {} and not (tmp_path / "nohub").exists()


@pytest.mark.slow  # ~30 s: a three-node Ray cluster on one machine
def test_each_gpu_node_fetches_into_its_own_cache_once(fake_hub, tmp_path, monkeypatch, no_ray):
    """A CPU head and two GPU nodes, each with its own Hugging Face cache: one fetch on each GPU node (where
    the actors go), none on the head; a second call finds both complete."""
    from ray.cluster_utils import Cluster

    ray_tmp = tempfile.mkdtemp(prefix="gddft", dir="/tmp")  # short: Ray's socket paths live under it
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)  # a plain ray.init() elsewhere must not join this cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    try:
        caches = [tmp_path / f"node{i}" for i in range(2)]
        nodes = [cluster.add_node(num_cpus=1, num_gpus=1, env_vars={"HF_HUB_CACHE": str(c)}) for c in caches]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, configure_logging=False)
        fetched = fetch.fetch_on_nodes("org/tiny", SHA, needs_gpu=True)
        assert set(fetched) == {n.node_id for n in nodes} and fetches(fake_hub) == 2
        assert sorted(fetched.values()) == [str(c / "models--org--tiny" / "snapshots" / SHA) for c in caches]
        assert fetch.fetch_on_nodes("org/tiny", SHA, needs_gpu=True) == fetched and fetches(fake_hub) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
