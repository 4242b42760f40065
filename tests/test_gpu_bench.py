"""jobs/gpu_bench.sh --smoke on an interpreter that sees only what the bare GPU image has.

The GPU machine a session may be lent has torch, transformers and a few more, and no Ray, diffusers or
registry. The shared venv has everything, so the smoke runs on `python -S` (no site-packages) with
PYTHONPATH on a folder of links to the venv's copies of the image's packages and of everything they
require, nothing else: `ray`, `moto` and `datasets` are not importable, nor `pip`. With a .whl/ folder in
the checkout (docs/gpu.md says which wheels), diffusers and requests are left out too and must come from
its wheels, unpacked by the script (that test is skipped in clones without .whl/, as CI's)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
# What the GPU image holds, as the issue lists it (its versions differ; the names are what matter here).
IMAGE = ("torch", "torchvision", "transformers", "accelerate", "huggingface_hub", "safetensors", "tokenizers", "numpy",
         "pyarrow", "pillow", "pyyaml", "matplotlib", "psutil", "tqdm", "rich")  # fmt: skip
NOT_THERE = ("ray", "moto", "datasets", "pip")
FROM_WHEELS = ("diffusers", "requests")
WHEELS = sorted((REPO / ".whl").glob("*.whl"))


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names) -> dict[str, metadata.Distribution]:
    """The installed distributions `names` need, theirs included (extras left out): what pip put on the image."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        key = _key(todo.pop())
        if key in seen:
            continue
        try:
            dist = metadata.distribution(key)
        except metadata.PackageNotFoundError:
            continue  # not in this venv (say accelerate): then nothing the bench runs may need it
        seen[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def bare_python(tmp_path: Path, extra: tuple[str, ...]) -> tuple[Path, Path, set[str]]:
    """(interpreter, folder for PYTHONPATH, distributions in it): the image's packages plus `extra`."""
    dists = closure(IMAGE + extra)
    view = tmp_path / "site"
    view.mkdir()
    for dist in dists.values():
        root = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            if top != ".." and (root / top).exists() and not (view / top).exists():
                (view / top).symlink_to(root / top)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')  # -S: the venv's site-packages unseen
    python.chmod(0o755)
    return python, view, set(dists)


def run_smoke(tmp_path: Path, parts: str, extra: tuple[str, ...]) -> tuple[subprocess.CompletedProcess, Path, set]:
    python, view, dists = bare_python(tmp_path, extra)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHON=str(python), PYTHONPATH=str(view), OUT=str(out), PATH=os.environ.get("PATH", "/usr/bin:/bin"))
    proc = subprocess.run(["bash", str(REPO / "jobs" / "gpu_bench.sh"), "--smoke", "--part", parts], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    return proc, out, dists


def check_rows(proc, out: Path, names: set[str]) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "gpu_bench_rows.jsonl").read_text().splitlines()]
    start, rows = lines[0], lines[1:]
    assert start["event"] == "start" and start["machine"]["ray_importable"] is False, start
    assert [r["event"] for r in rows] == ["row"] * len(rows)  # no error lines
    assert names <= {r["name"] for r in rows}, sorted(r["name"] for r in rows)
    final = json.loads((out / "gpu_bench_smoke.json").read_text())
    assert final["rows"] == rows and final["errors"] == [] and final["ray_imported"] is False
    assert "[row] eager fast-contiguous-contiguous" in proc.stdout  # each row printed as it is measured
    return lines


EAGER = {"model-load", "fast-contiguous-contiguous", "fast-channels_last-contiguous", "fast-contiguous-channels_last",
         "fast-channels_last-channels_last", "pipeline-call", "fast-taesdxl", "fast-batch-4", "select-scorer",
         "select-per-image-loop", "select-ratio"}  # fmt: skip
TRAIN = {"run-0", "run-1", "sequential-runs"}


@pytest.mark.slow  # end to end in a subprocess: ~30 s on 2 quiet cores
def test_smoke_runs_without_ray_moto_or_datasets(tmp_path, tiny_model):
    """What CI can prove: the image's packages plus diffusers' own closure, and no Ray, moto or datasets."""
    proc, out, dists = run_smoke(tmp_path, "eager,train", ("diffusers",))
    assert not set(NOT_THERE) & dists
    lines = check_rows(proc, out, EAGER | TRAIN)
    by_name = {r["name"]: r for r in lines[1:]}
    for name in EAGER - {"model-load", "select-scorer", "select-per-image-loop", "select-ratio"}:
        r = by_name[name]
        assert r["images_per_s_median"] > 0 and r["not_blank"], r
        unet, vae = name.split("-")[1:3] if name.startswith("fast-c") else ("contiguous", "contiguous")
        assert (r["unet_memory_format"], r["vae_memory_format"]) == (unet, vae), r  # read back from the modules
    assert by_name["fast-contiguous-contiguous"]["diff_to_diffusers_fp32"]["max_0_255"] <= 1
    assert by_name["select-per-image-loop"]["max_abs_diff"] < 1e-4  # same CLIP, same pixels
    assert by_name["sequential-runs"]["runs"] == 2


@pytest.mark.slow  # as above, diffusers and requests unpacked from .whl/ (the compiled part: see docs/gpu.md)
@pytest.mark.skipif(not WHEELS, reason="no .whl/ in this checkout (docs/gpu.md: the wheels for a GPU image)")
def test_smoke_takes_diffusers_and_requests_from_the_wheels(tmp_path, tiny_model):
    proc, out, dists = run_smoke(tmp_path, "eager,train", ())
    assert not (set(NOT_THERE) | set(FROM_WHEELS)) & dists
    lines = check_rows(proc, out, EAGER | TRAIN)
    machine = lines[0]["machine"]
    for name in FROM_WHEELS:  # imported from the unpacked wheels, never from the venv
        assert "gdd-wheels." in machine[f"{name}_from"], machine
    assert "[wheels] diffusers-0.42.1-py3-none-any.whl: unpacked" in proc.stdout


def test_wheels_are_unpacked_unless_already_importable(tmp_path):
    import zipfile

    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import unpack_wheels
    finally:
        sys.path.remove(str(REPO / "jobs"))
    wheels = tmp_path / "whl"
    wheels.mkdir()
    for name, files in {
        "gdd_fake_pkg-1.0-py3-none-any.whl": {"gdd_fake_pkg/__init__.py": "X = 1\n",
                                              "gdd_fake_pkg-1.0.dist-info/top_level.txt": "gdd_fake_pkg\n",
                                              "gdd_fake_pkg-1.0.data/purelib/gdd_fake_extra.py": "Y = 2\n"},
        "json-9.9-py3-none-any.whl": {"json/__init__.py": "raise ImportError('shadowed')\n"},  # the stdlib's wins
    }.items():  # fmt: skip
        with zipfile.ZipFile(wheels / name, "w") as z:
            for path, text in files.items():
                z.writestr(path, text)
    site = tmp_path / "site"
    assert unpack_wheels.unpack(wheels, site) == ["gdd_fake_pkg-1.0-py3-none-any.whl"]
    assert (site / "gdd_fake_pkg" / "__init__.py").read_text() == "X = 1\n"
    assert (site / "gdd_fake_extra.py").exists() and not (site / "json").exists()
