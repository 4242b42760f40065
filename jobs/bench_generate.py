"""Generation throughput: the seed paper's loop vs ours, and the orchestration cost of the Ray stage.

Same images (classes x IPC, same seeds), same model, same machine:
  (a) paper loop   pipeline called once per image, prompt re-encoded every call, PIL resize + PNG save
  (b) our loop     in-process UnitGenerator: batched calls, prompt embeddings cached, device resize
  (c) stage, 1 worker   `--stages generate` through the Ray driver and actors (Ray started beforehand)
  (d) stage, 2 workers
plus the wall time of a no-op rerun (`python jobs/distill.py ...` over a finished run of >= 1000 shards),
and first (e) the engine matrix: device images/s of the render loop alone (no PNG, no Ray) for every
engine x VAE dtype x batch size (x compile), warm-up and compile excluded and reported apart, median and
spread of --repeats timed runs of --batches batches each, per-phase device time, peak memory, and each
row's pixel difference to the diffusers engine with an fp32 VAE on the same seeds. It is printed as a
markdown table and kept in the JSON under "engines".

CPU (what CI machines have; each worker = 1 CPU thread standing in for one GPU):
    python jobs/bench_generate.py --out bench_results/generate.json
On a GPU node (real architecture, random weights; or --model stabilityai/sdxl-turbo): `make bench-gpu`, i.e.
    python jobs/bench_generate.py --model sdxl-random --gen-resolution 512 --image-size 32 --ipc 64 \
        --classes 20 --batch-size 16 --unit-size 64 --threads 0 --skip-paper-loop --noop-shards 0 \
        --engines fast,pipeline-call --batch-sizes 8,16,32 --vae-dtypes bf16 --batches 10 \
        --compile-fast --compile-batch-sizes 16 --tiny-decoder --channels-last --out bench_results/generate_gpu.json
Only the engine matrix (no stage runs): add --engines-only (no Ray is imported then). On a bare GPU image
without pip, diffusers or Ray: jobs/gpu_bench.sh (docs/gpu.md), which runs the same rows (EngineBench).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = Path(__file__).resolve().parent.parent

from jobs.bench_engine import (  # noqa: E402  (after the sys.path line: jobs/ run as scripts)
    build_config,
    class_file,
    engine_matrix,
    markdown_table,
    timing,
    versions,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (CPU), sdxl-random or a real model (GPU)")
    p.add_argument("--classes", type=int, default=20, help="first N CIFAR-100 classes")
    p.add_argument("--ipc", type=int, default=16)
    p.add_argument("--gen-resolution", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--unit-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker (0 = leave as is)")
    p.add_argument("--noop-shards", type=int, default=1000, help="shards in the no-op rerun test (0 = skip)")
    p.add_argument("--skip-paper-loop", action="store_true", help="skip (a): slow at 512 px on a GPU")
    p.add_argument("--out", default="bench_results/generate.json")
    p.add_argument(
        "--engines",
        default="fast,diffusers,pipeline-call",
        help="(e) engines to time, comma-separated: fast, diffusers (our loop with the pipeline's call to latents) "
        "and pipeline-call (the loop before the engine work: the pipeline's own decode, its per-call VAE casts)",
    )
    p.add_argument("--batch-sizes", default="", help="(e) batch sizes, comma-separated (default: --batch-size)")
    p.add_argument(
        "--vae-dtypes", default="", help="(e) VAE dtypes, comma-separated (default: fp32 on CPU, bf16 on GPU)"
    )
    p.add_argument("--batches", type=int, default=20, help="(e) batches per timed run (after warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="(e) timed runs per row; median and spread reported")
    p.add_argument("--compile-fast", action="store_true", help="(e) add rows for the fast engine compiled")
    p.add_argument(
        "--compile-batch-sizes", default="", help="(e) batch sizes of the compiled rows (default: every batch size)"
    )
    p.add_argument(
        "--tiny-decoder", action="store_true", help="(e) add rows for the fast engine (eager) with --decoder taesdxl"
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="(e) add rows for the fast engine (eager) with the UNet and decoder in channels_last memory format",
    )
    p.add_argument("--engines-only", action="store_true", help="run (e) only: no paper loop, stage or no-op rerun")
    return p.parse_args(argv)


def paper_loop(a, workdir: Path) -> dict:
    """(a) One call per image with the prompt as text (re-encoded each time), PIL resize, one PNG per image."""
    import torch
    from PIL import Image

    from gdd_ray.classes import load_classes
    from gdd_ray.generate.model import load_pipeline, resolve_model
    from gdd_ray.plan import image_seed

    t0 = time.perf_counter()
    pipe = load_pipeline(resolve_model(a.model))
    classes = load_classes(None, str(class_file(a.classes)))
    n = 0
    for c in classes:
        for i in range(a.ipc):
            g = torch.Generator("cpu").manual_seed(image_seed(0, c.label, i))
            img = pipe(prompt=c.name, num_inference_steps=1, guidance_scale=0.0, height=a.gen_resolution,
                       width=a.gen_resolution, generator=g).images[0]  # fmt: skip
            img = img.resize((a.image_size, a.image_size), Image.LANCZOS)
            img.save(workdir / f"{c.label}_{i}.png")
            n += 1
    return timing(n, time.perf_counter() - t0)


def our_loop(a, out: str) -> dict:
    """(b) The per-unit generator called in a plain loop (no Ray): batching + prompt cache + device resize."""
    from gdd_ray import pipeline
    from gdd_ray.generate import stage

    cfg = build_config(a, out)
    t0 = time.perf_counter()
    summary = stage.run(pipeline.check(cfg), serial=True)
    return timing(summary["totals"]["images_made"], time.perf_counter() - t0)


def ray_stage(a, out: str, workers: int) -> dict:
    """(c)/(d) The real stage through the Ray driver; Ray is already up, so cluster start is excluded."""
    from gdd_ray import pipeline
    from gdd_ray.generate import stage

    cfg = build_config(a, out, workers=workers)
    t0 = time.perf_counter()
    summary = stage.run(pipeline.check(cfg))
    seconds = time.perf_counter() - t0
    result = timing(summary["totals"]["images_made"], seconds)
    # Starting an actor = a new process importing torch/diffusers and loading the pipeline: paid once
    # per worker per run, like cluster start; reported, and excluded from the orchestration ratio.
    start = summary["driver"]["worker_start_s"] or 0.0
    result["worker_start_s"] = start
    result["seconds_excluding_worker_start"] = round(seconds - start, 3)
    result["images_per_s_excluding_worker_start"] = round(result["images"] / (seconds - start), 3)
    result["per_worker"] = summary["per_worker"]
    return result


def noop_rerun(a, workdir: Path) -> dict:
    """Make a finished run of >= N shards (1 image each, tiny model), then time the same command again."""
    from gdd_ray import pipeline
    from gdd_ray.generate import stage
    from gdd_ray.run import RunDir

    classes = a.noop_shards // 2
    out = str(workdir / "noop")
    values = dict(classes=str(class_file(classes)), ipc=2, out=out, model="tiny", gen_resolution=16, image_size=8,
                  batch_size=1, unit_size=1, stages="generate", prompt_template="{desc}")  # fmt: skip
    from gdd_ray.config_loader import build_config as build

    cfg = build(values)
    stage.run(pipeline.check(cfg), serial=True)
    shards = len(RunDir(out).generated.list(".parquet"))
    cmd = [sys.executable, str(REPO / "jobs" / "distill.py")] + [
        f"--{k.replace('_', '-')}={v}" for k, v in values.items()
    ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0 or "nothing to do" not in r.stdout:
        raise RuntimeError(f"no-op rerun did not end cleanly: {r.stdout[-500:]} {r.stderr[-500:]}")
    return {"shards": shards, "seconds": round(seconds, 3), "command": "python jobs/distill.py (same flags)"}


def main(argv=None) -> int:
    a = parse_args(argv)
    from gdd_ray.logs import quiet_libraries

    quiet_libraries()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # Ray gives each 1-CPU actor one thread as well
    with tempfile.TemporaryDirectory(prefix="bench-gen-") as work:  # the contenders' run folders, removed after
        return _bench(a, Path(work))


def _bench(a, work: Path) -> int:
    import torch

    results: dict = {"config": vars(a), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
    else:
        results["cpu_cores"] = os.cpu_count()
    results["versions"] = versions()
    results["engines"] = engine_matrix(a, work)
    print(markdown_table(results["engines"]), flush=True)
    if a.engines_only:
        return _write(a, results)
    if not a.skip_paper_loop:
        (work / "a").mkdir()
        results["a_paper_loop"] = paper_loop(a, work / "a")
        print("a", results["a_paper_loop"], flush=True)
    results["b_our_loop"] = our_loop(a, str(work / "b"))
    print("b", results["b_our_loop"], flush=True)
    import ray  # (c) and (d) only: the engine matrix runs without Ray (jobs/gpu_bench.sh, a bare GPU image)

    gpus = torch.cuda.device_count()
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, configure_logging=False,
             **({"num_gpus": gpus} if gpus else {}))  # fmt: skip
    try:
        results["c_stage_1_worker"] = ray_stage(a, str(work / "c"), 1)
        print("c", results["c_stage_1_worker"], flush=True)
        if gpus != 1:
            results["d_stage_2_workers"] = ray_stage(a, str(work / "d"), 2)
            print("d", results["d_stage_2_workers"], flush=True)
    finally:
        ray.shutdown()
    b = results["b_our_loop"]["images_per_s"]
    c = results["c_stage_1_worker"]
    ratios = {
        "c_over_b_time_excluding_worker_start": round(
            c["seconds_excluding_worker_start"] / results["b_our_loop"]["seconds"], 3
        ),
        "c_over_b_time_including_worker_start": round(c["seconds"] / results["b_our_loop"]["seconds"], 3),
    }
    if "a_paper_loop" in results:
        ratios["b_over_a_speed"] = round(b / results["a_paper_loop"]["images_per_s"], 3)
    if "d_stage_2_workers" in results:
        d = results["d_stage_2_workers"]
        ratios["d_over_c_speed_excluding_worker_start"] = round(
            d["images_per_s_excluding_worker_start"] / c["images_per_s_excluding_worker_start"], 3
        )
    results["ratios"] = ratios
    if a.noop_shards:
        results["noop_rerun"] = noop_rerun(a, work)
        print("noop", results["noop_rerun"], flush=True)
    # (a) and (b) make the same images; show that they are the same images, not just the same count
    results["same_images_a_b"] = _compare_a_b(work) if not a.skip_paper_loop else None
    print(json.dumps(results["ratios"]))
    return _write(a, results)


def _write(a, results: dict) -> int:
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    e = results["engines"]
    print("fast/diffusers", json.dumps(e["fast_over_diffusers"]), "fast/pipeline-call",
          json.dumps(e["fast_over_pipeline_call"]), "->", a.out)  # fmt: skip
    return 0


def _compare_a_b(work: Path) -> dict:
    """Mean absolute pixel difference between (a)'s PNGs and (b)'s shards (resize filters differ a little)."""
    from PIL import Image

    from gdd_ray import shards
    from gdd_ray.run import RunDir

    loc = RunDir(str(work / "b")).generated
    diffs = []
    for name in loc.list(".parquet"):
        t = shards.read_shard(loc, name)
        for img, label, index in zip(t["image"].to_pylist(), t["label"].to_pylist(), t["index"].to_pylist()):
            ours = np.asarray(Image.open(io.BytesIO(img["bytes"])).convert("RGB"), dtype=np.float32)
            theirs = np.asarray(Image.open(work / "a" / f"{label}_{index}.png").convert("RGB"), dtype=np.float32)
            diffs.append(float(np.abs(ours - theirs).mean()))
    return {"images": len(diffs), "mean_abs_diff_0_255": round(float(np.mean(diffs)), 3) if diffs else None}


if __name__ == "__main__":
    sys.exit(main())
