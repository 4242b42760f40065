"""Hub models fetched once per node before the generator actors start; the actors then load them offline.

The driver pins a hub model to a commit (model.resolve_revision). `fetch_on_nodes` runs one task on every
alive node that can host a generator actor, downloading that commit's files into the node's Hugging Face
cache; each actor then loads the snapshot folder with `local_files_only=True`: no hub calls from N actors
(rate limits on large clusters), no actors racing on one download (NFS file locks). A node that joins
later (an autoscaled one) is fetched by its first actor (`ensure_snapshot`): the marker written after a
complete download tells a fetched snapshot from a partial one or from the few config files the driver read.

Test hook: with GDD_RAY_FAKE_HUB=/folder set (on the driver and the nodes), "downloading" org/name at
REV copies /folder/org/name/REV/ into the cache layout and logs the fetch as a file under /folder/fetches/,
so tests need no network.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import socket
import uuid
from pathlib import Path

from gdd_ray.errors import UserError, last_line

# What DiffusionPipeline.from_pretrained(..., variant="fp16") reads (load_pipeline): model_index.json and every
# component's config (*.json), the tokenizers (vocab.json, merges.txt; *.model for sentencepiece ones) and the
# fp16 weights; not the fp32 copies, .bin files or sample images a repository also holds.
PATTERNS = ("*.json", "*.txt", "*.model", "*.fp16.safetensors")
PLAIN_WEIGHTS = "*.safetensors"  # for a repository without fp16 variant files (load_pipeline falls back to them)
MARKER = ".gdd-ray-complete"  # written last into a snapshot folder: every file above is there


def hub_cache() -> Path:
    """The Hugging Face cache as huggingface_hub computes it, without importing it (an import this early
    would fix its progress-bar settings before the CLI quiets them)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")))


def repo_folder(model: str) -> Path:
    """Where the Hugging Face cache keeps `model` (org/name): its refs/ and snapshots/."""
    return hub_cache() / f"models--{model.replace('/', '--')}"


def snapshot_folder(model: str, revision: str) -> Path:
    return repo_folder(model) / "snapshots" / revision


def local_snapshot(model: str, revision: str) -> str | None:
    """The snapshot folder of `model` at commit `revision` on this node, if a fetch completed it."""
    folder = snapshot_folder(model, revision)
    return str(folder) if (folder / MARKER).is_file() else None


def ensure_snapshot(model: str, revision: str) -> str:
    """The complete snapshot on this node: as fetched before (no hub call at all), else fetched now."""
    return local_snapshot(model, revision) or fetch_snapshot(model, revision)


def fetch_snapshot(model: str, revision: str) -> str:
    """Download `model` at commit `revision` into this node's Hugging Face cache; its snapshot folder."""
    fake = os.environ.get("GDD_RAY_FAKE_HUB")
    if fake:
        path = _copy_from_fake_hub(Path(fake), model, revision)
    else:
        from huggingface_hub import snapshot_download

        path = snapshot_download(model, revision=revision, allow_patterns=list(PATTERNS))
        if not any(Path(path).rglob("*.safetensors")):
            path = snapshot_download(model, revision=revision, allow_patterns=[*PATTERNS, PLAIN_WEIGHTS])
    (Path(path) / MARKER).touch()
    return str(path)


def _copy_from_fake_hub(hub: Path, model: str, revision: str) -> str:
    """The test hook's download: the files of hub/MODEL/REVISION that PATTERNS select, into the cache layout."""
    source = hub / model / revision
    if not source.is_dir():
        raise FileNotFoundError(f"revision {revision} of {model} not found on the fake hub {hub}")
    target = snapshot_folder(model, revision)
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = file.relative_to(source).as_posix()
        if any(fnmatch.fnmatch(rel, pattern) for pattern in PATTERNS):
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target / rel)
    (hub / "fetches").mkdir(exist_ok=True)
    (hub / "fetches" / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}").write_text(str(target))
    return str(target)


def _fetch_here(model: str, revision: str) -> dict:
    import ray

    return {"node": ray.get_runtime_context().get_node_id(), "path": ensure_snapshot(model, revision)}


def fetch_on_nodes(model: str, revision: str, needs_gpu: bool) -> dict[str, str]:
    """One task per alive node that can host a generator actor (one with GPUs when the actors take GPUs),
    pinned there, fetching the snapshot; node id -> snapshot folder. A failure is one line naming the node."""
    import ray
    from ray.exceptions import RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    key = "GPU" if needs_gpu else "CPU"
    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"] and n["Resources"].get(key, 0) > 0}
    task = ray.remote(num_cpus=0, max_retries=1)(_fetch_here)
    refs = {
        node: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(model, revision)
        for node in nodes
    }
    fetched = {}
    for node, ref in refs.items():
        try:
            fetched[node] = ray.get(ref)["path"]
        except RayError as e:
            address = nodes[node].get("NodeManagerAddress", "?")
            raise UserError(
                f"--model {model} at revision {revision}: the download to node {node[:12]} ({address}) failed: "
                f"{last_line(e)}"
            ) from e
    return fetched
