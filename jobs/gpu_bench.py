"""The GPU benchmark, in one process, without Ray: run it through jobs/gpu_bench.sh (which puts the wheels of
.whl/ on the path on an image without diffusers); docs/gpu.md gives the whole sequence for a lent GPU.

    bash jobs/gpu_bench.sh --part eager      # ~2.5 min on one H100 (estimate printed first)
    bash jobs/gpu_bench.sh --part compiled   # ~4-5 min: compile times cannot be estimated from FLOPs
    bash jobs/gpu_bench.sh --part train      # ~3 min: 3 runs x 1000 epochs of the paper protocol
    bash jobs/gpu_bench.sh --smoke           # eager and train, tiny models on the CPU, under a minute
    bash jobs/gpu_bench.sh --smoke --part compiled   # the compiled rows on the CPU: minutes of cold C++ compiles

Parts (on a GPU: SDXL-Turbo's architecture with random weights, `sdxl-random`, 512 px drawn, 32 px stored,
batch 16, units of 64, bf16 decoder; the same seeds in every row):
    eager     the fast engine at the production layout (nothing forced: contiguous), then the UNet, the decoder
              and both in channels_last (each component's layout set before its row and set back after it, and
              read back into the row), the tiny decoder (taesdxl), batch 32, the `pipeline-call` baseline (the
              loop before the engine work), and the select stage's CLIP scorer (ViT-B/32's size, random
              weights) against a per-image CLIP loop, on the device
    compiled  the production row eager again (the reference on this machine), then the fast engine compiled
              whole (`fullgraph=True`; CUDA graphs on a GPU) and per repeated block, each compiled cold (an
              empty cache) and again warm (from that cache, after Dynamo's reset), the warm one timed
    train     ConvNetD3 trained on a CIFAR-100 IPC 10-size set (stand-in images), every run of one protocol
              (`--train-protocol`), in process, with the stage's own training loop, one row per run
    --smoke   the same parts and code with the tiny models on the CPU (eager and train unless --part says
              otherwise: Inductor's cold compile of even the tiny model is C++ builds, 2-7 minutes on 2 cores)

Every row is appended to $OUT/gpu_bench_rows.jsonl (OUT: --out, else the environment's OUT, else
bench_results/) the moment it is measured, so a run stopped by a time limit keeps what it measured; the first
line of each run says the device, the versions and the time estimate. The whole result goes to
$OUT/gpu_bench_<parts>.json (gpu_bench_smoke.json with --smoke) at the end. A row that fails is written as an
error line and the next row runs; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PARTS = ("eager", "compiled", "train")
ROWS_FILE = "gpu_bench_rows.jsonl"

# The time estimate (printed first, so a lent GPU's minutes are planned before they are spent):
TFLOP_PER_IMAGE_512 = 4.1  # SDXL, one step at 512 px: UNet 1.59 + VAE decode 2.52 (text encoding cached per class)
UNET_TFLOP_512 = 1.59
ASSUMED_TFLOP_S = 250.0  # eager fp16/bf16 on one H100: about a quarter of its dense peak, a cautious guess
ASSUMED_FP32_TFLOP_S = 100.0  # the pipeline-call baseline's VAE decodes in fp32 (TF32 matmuls)
ASSUMED_TRAIN_STEP_S = 0.004  # one ConvNetD3 step at batch 256 with DSA, eager (launch-bound), a guess
# One cold + one warm compile of SDXL's UNet and VAE per scope: planning figures, not counts (reports elsewhere:
# one to two minutes for SDXL's whole UNet; blocks compile each distinct block shape once).
ASSUMED_COMPILE_S = {"model": 150.0, "blocks": 75.0}
STARTUP_S = 45.0  # imports, the random-weight model built on the device, the fp32 reference decoder
BUDGET_S = 300.0  # each part is sized to end within 5 minutes on one H100


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default=None, help="eager, compiled, train or all, comma-separated (default: eager; "
                   "with --smoke: eager,train, since a cold Inductor compile takes minutes on a CPU)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU, seconds per row: the same code path")
    p.add_argument("--out", default=None, help="folder of the rows and the JSON (default: $OUT, else bench_results)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one; cpu with --smoke)")
    p.add_argument("--model", default=None, help="sdxl-random (default), tiny (--smoke) or a model folder")
    p.add_argument("--gen-resolution", type=int, default=None, help="drawn side (512; 32 with --smoke)")
    p.add_argument("--image-size", type=int, default=None, help="stored side (32; 8 with --smoke)")
    p.add_argument("--batch-size", type=int, default=None, help="the production batch (16; 2 with --smoke)")
    p.add_argument("--unit-size", type=int, default=None, help="images per work unit (64; 4 with --smoke)")
    p.add_argument("--extra-batch-sizes", default=None, help="eager rows at other batch sizes (32; 4 with --smoke)")
    p.add_argument("--batches", type=int, default=None, help="batches per timed run (8; 2 with --smoke)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row, median reported (3; 1 with --smoke)")
    p.add_argument("--classes", type=int, default=None, help="classes of the prompt table (20; 2 with --smoke)")
    p.add_argument("--vae-dtype", default=None, help="decoder precision of the fast rows (bf16; fp32 on a CPU)")
    p.add_argument("--compile-scopes", default="model,blocks", help="compiled rows: model, blocks (comma-separated)")
    p.add_argument("--compiled-layout", default="contiguous/contiguous",
                   help="UNet/decoder memory formats of the compiled part's rows")  # fmt: skip
    p.add_argument(
        "--clip", default=None, help="CLIP of the select rows: b32-random (default), tiny (--smoke), a folder"
    )
    p.add_argument("--clip-batch-size", type=int, default=None, help="the select scorer's batch (256; 8 with --smoke)")
    p.add_argument("--select-ipc", type=int, default=None, help="kept per class (10; 2 with --smoke); 2x are scored")
    p.add_argument("--train-protocol", default="paper", choices=("paper", "challenge"), help="the runs' protocol")
    p.add_argument("--train-runs", type=int, default=None, help="evaluation runs (3; 2 with --smoke)")
    p.add_argument("--train-epochs", type=int, default=None, help="epochs per run (1000; 2 with --smoke)")
    p.add_argument("--train-classes", type=int, default=None, help="classes (100; 10 with --smoke)")
    p.add_argument("--train-ipc", type=int, default=None, help="generated images per class (10; 2 with --smoke)")
    p.add_argument("--pda-variants", type=int, default=4, help="augmented variants per image (paper protocol)")
    p.add_argument("--train-width", type=int, default=None, help="ConvNet width (128; 16 with --smoke)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (0 = leave as is; 1 with --smoke: "
                   "a shared CPU's spinning OpenMP threads cost more than they give at these sizes)")  # fmt: skip
    a = p.parse_args(argv)
    smoke = a.smoke
    defaults = dict(
        model=("tiny", "sdxl-random"), gen_resolution=(32, 512), image_size=(8, 32), batch_size=(2, 16),
        unit_size=(4, 64), extra_batch_sizes=("4", "32"), batches=(2, 8), repeats=(1, 3), classes=(2, 20),
        clip=("tiny", "b32-random"), clip_batch_size=(8, 256), select_ipc=(2, 10), train_runs=(2, 3),
        train_epochs=(2, 1000), train_classes=(10, 100), train_ipc=(2, 10), train_width=(16, 128), threads=(1, 0),
    )  # fmt: skip
    for name, (small, full) in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, small if smoke else full)
    a.part = a.part or ("eager,train" if smoke else "eager")
    a.parts = PARTS if a.part == "all" else tuple(x.strip() for x in a.part.split(",") if x.strip())
    unknown = [x for x in a.parts if x not in PARTS]
    if unknown:
        p.error(f"--part {','.join(unknown)}: one of {', '.join(PARTS)} or all")
    a.out = a.out or os.environ.get("OUT") or "bench_results"
    return a


# ---- what the run writes ----------------------------------------------------------------------------


class RowLog:
    """One JSON line per event, appended and flushed to disk at once: what a time limit leaves is kept."""

    def __init__(self, folder: Path, run: str, smoke: bool):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / ROWS_FILE
        self.run, self.smoke = run, smoke
        self.rows: list[dict] = []
        self.errors: list[dict] = []

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def start(self, info: dict) -> None:
        self._append({"event": "start", "run": self.run, "smoke": self.smoke, **info})

    def row(self, part: str, name: str, row: dict) -> dict:
        record = {"event": "row", "run": self.run, "smoke": self.smoke, "part": part, "name": name, **row}
        self._append(record)
        self.rows.append(record)
        print(f"[row] {part} {name}: {summary_line(row)}", flush=True)
        return record

    def error(self, part: str, name: str, error: BaseException) -> None:
        tb = traceback.format_exception(error)
        record = {"event": "error", "run": self.run, "smoke": self.smoke, "part": part, "name": name,
                  "error": f"{type(error).__name__}: {error}"[:2000], "traceback_tail": "".join(tb[-6:])[-4000:]}  # fmt: skip
        self._append(record)
        self.errors.append(record)
        print(f"[error] {part} {name}: {record['error']}\n{record['traceback_tail']}", flush=True)


def summary_line(row: dict) -> str:
    """The row on one line, less its per-phase breakdown (the JSON line holds everything)."""
    return json.dumps({k: v for k, v in row.items() if k not in ("phase_s", "executed_batch_sizes")}, default=str)


def write_json(path: Path, result: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ---- the machine ------------------------------------------------------------------------------------


def machine(device: str) -> dict:
    import torch

    from gdd_ray import ray_utils

    info: dict = {
        "device": device,
        "host_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "ray_importable": ray_utils.ray_installed(),
    }
    for name in ("diffusers", "transformers", "huggingface_hub", "numpy", "requests", "accelerate", "safetensors"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
            info[f"{name}_from"] = os.path.dirname(module.__file__)
        except Exception as e:  # noqa: BLE001 - a missing optional package is a fact to record, not an error
            info[name] = f"not importable ({type(e).__name__})"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)  # fmt: skip
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)  # fmt: skip
            info["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info


# ---- the time estimate ------------------------------------------------------------------------------


def estimate(a, parts: tuple[str, ...], cuda: bool) -> dict:
    """Seconds each part should take on one H100, from FLOPs at an assumed sustained rate (the constants
    above say which); compile time is a planning figure, not a count. None on a CPU (the smoke)."""
    if not cuda:
        return {p: None for p in parts}
    scale = (a.gen_resolution / 512) ** 2
    per_row = a.batch_size * (2 + (a.repeats + 1) * a.batches)  # warm-up + comparison batches, timed + clocked runs
    fast_s = per_row * TFLOP_PER_IMAGE_512 * scale / ASSUMED_TFLOP_S
    out: dict = {}
    if "eager" in parts:
        extra = sum(b / a.batch_size for b in csv_ints(a.extra_batch_sizes))
        fp32_vae = per_row * (
            UNET_TFLOP_512 / ASSUMED_TFLOP_S + (TFLOP_PER_IMAGE_512 - UNET_TFLOP_512) / ASSUMED_FP32_TFLOP_S
        )
        tiny_decoder = per_row * UNET_TFLOP_512 * scale / ASSUMED_TFLOP_S
        select = 2 * 2 * a.select_ipc * 100 * 0.01  # two contenders, 2x IPC candidates of 100 classes, ~10 ms each
        out["eager"] = round(STARTUP_S + fast_s * (4 + extra) + fp32_vae * scale + tiny_decoder + select)
    if "compiled" in parts:
        scopes = csv(a.compile_scopes)
        out["compiled"] = round(
            STARTUP_S + fast_s * (1 + len(scopes)) + sum(ASSUMED_COMPILE_S.get(s, 150.0) for s in scopes)
        )
    if "train" in parts:
        images = a.train_classes * (a.train_ipc * (1 + a.pda_variants) if a.train_protocol == "paper" else 10)
        epochs = a.train_epochs + (a.train_protocol == "challenge")
        steps = a.train_runs * epochs * -(-images // 256)
        out["train"] = round(15 + steps * ASSUMED_TRAIN_STEP_S)
    return out


def csv(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in csv(text)]


# ---- the parts --------------------------------------------------------------------------------------


def engine_args(a) -> SimpleNamespace:
    """What bench_generate's EngineBench reads, from this run's options."""
    return SimpleNamespace(
        model=a.model, classes=a.classes, ipc=a.batch_size, gen_resolution=a.gen_resolution, image_size=a.image_size,
        batch_size=a.batch_size, unit_size=a.unit_size, batch_sizes=str(a.batch_size), vae_dtypes="fp32",
        batches=a.batches, repeats=a.repeats,
    )  # fmt: skip


def measured(log: RowLog, part: str, name: str, fn, *args, **kwargs) -> dict | None:
    """Run one row, fn(*args, **kwargs); a failure is written as an error line and the part goes on."""
    try:
        row = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - every row is independent: one failure must not lose the others
        log.error(part, name, e)
        return None
    return log.row(part, name, row) if row is not None else None


def part_eager(a, log: RowLog, work: Path, device: str) -> None:
    from jobs import bench_engine as bg

    bench = bg.EngineBench(engine_args(a), work, device=device)
    log.row("eager", "model-load", {"load_s": bench.load_s, "model": a.model})
    vae, b = a.vae_dtype, a.batch_size
    layouts = [("contiguous", "contiguous"), ("channels_last", "contiguous"), ("contiguous", "channels_last"),
               ("channels_last", "channels_last")]  # fmt: skip
    for unet, dec in layouts:
        measured(log, "eager", f"fast-{unet}-{dec}", bench.row, "fast", vae, b, unet_format=unet, vae_format=dec)
    measured(log, "eager", "pipeline-call", bench.row, bg.PIPELINE_CALL, "fp32", b)
    measured(log, "eager", "fast-taesdxl", bench.row, "fast", vae, b, decoder="taesdxl")
    for extra in csv_ints(a.extra_batch_sizes):
        measured(log, "eager", f"fast-batch-{extra}", bench.row, "fast", vae, extra)
    bench = None  # the pipeline's memory back before CLIP loads
    select_rows(a, log, work, device)


def part_compiled(a, log: RowLog, work: Path, device: str) -> None:
    from jobs import bench_engine as bg

    unet, dec = a.compiled_layout.split("/")
    bench = bg.EngineBench(engine_args(a), work, device=device)
    vae, b = a.vae_dtype, a.batch_size
    measured(log, "compiled", "fast-eager", bench.row, "fast", vae, b, unet_format=unet, vae_format=dec)
    for scope in csv(a.compile_scopes):
        measured(log, "compiled", f"fast-compiled-{scope}", bench.row, "fast", vae, b, compiled=True, scope=scope,
                 unet_format=unet, vae_format=dec, warm_compile=True)  # fmt: skip


def select_rows(a, log: RowLog, work: Path, device: str) -> None:
    """The select stage's scorer (fixed-shape batches, preprocessing on the device) against one image at a time
    through transformers' own processor and model, on the same stand-in candidates and CLIP."""
    from gdd_ray import storage, synthetic
    from gdd_ray.classes import load_classes
    from gdd_ray.config_loader import build_config
    from gdd_ray.plan import plan_run
    from gdd_ray.select import clip
    from gdd_ray.select.scorer import ScoreJob, ShardScorer, read_scores, score_calls
    from jobs import bench_select

    if a.clip == bench_select.B32_RANDOM:
        source = bench_select.b32_random_clip(str(work / "clip"))
    else:
        source = clip.resolve_clip_model(a.clip)
    dataset = "cifar10" if a.smoke else "cifar100"
    values = {"out": str(work / "select"), "dataset": dataset, "ipc": a.select_ipc, "unit_size": 10,
              "select_by": "clip", "clip_model": source, "overgenerate": 2.0, "clip_batch_size": a.clip_batch_size,
              "stages": "select"}  # fmt: skip
    cfg = build_config(values)
    classes = load_classes(cfg.dataset, None)
    names = synthetic.write_generated(cfg, classes, fingerprint="bench")
    src = storage.Location(os.path.join(cfg.out, "generated"))
    dst = storage.Location(str(work / "select-scores"))
    texts = tuple(c.prompt(cfg.generate.prompt_template) for c in classes)
    units = plan_run(cfg, len(classes)).units
    calls = score_calls(units, a.clip_batch_size, names)  # as the stage groups shards into calls
    common = {"clip": a.clip, "candidates": cfg.generate.unit_size * len(names), "image_size": cfg.image_size,
              "clip_batch_size": a.clip_batch_size}  # fmt: skip

    def sync():
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def scorer() -> dict:
        t0 = time.perf_counter()
        s = ShardScorer(ScoreJob(source, texts, src.uri, dst.uri, "bench", a.clip_batch_size, units), device=device)
        s.load()
        sync()
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        for call in calls:
            s.score(call)
        sync()
        seconds = time.perf_counter() - t1
        n = common["candidates"]
        return {**common, "load_s": round(load_s, 3), "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1),
                "images_per_s_with_load": round(n / (seconds + load_s), 1)}  # fmt: skip

    loop_scores: dict = {}

    def loop() -> dict:
        t0 = time.perf_counter()
        loop_scores.update(bench_select.per_image_loop(source, list(texts), src, names, device))
        sync()
        seconds = time.perf_counter() - t0
        n = common["candidates"]
        row = {**common, "seconds_with_load": round(seconds, 3), "images_per_s_with_load": round(n / seconds, 1)}
        staged = {}
        for name in names:
            t = read_scores(dst, name)
            for label, index, score in zip(t["label"].to_pylist(), t["index"].to_pylist(), t["clip_score"].to_pylist()):
                staged[(label, index)] = score
        if staged:
            row["max_abs_diff"] = max(abs(loop_scores[k][0] - staged[k]) for k in staged)
        return row

    scored = measured(log, "eager", "select-scorer", scorer)
    looped = measured(log, "eager", "select-per-image-loop", loop)
    if scored and looped:
        ratio = scored["images_per_s_with_load"] / looped["images_per_s_with_load"]
        log.row("eager", "select-ratio", {"scorer_over_per_image_loop_with_load": round(ratio, 2)})


def part_train(a, log: RowLog, work: Path, device: str) -> None:
    """Every run of one protocol, one after another in this process, with the train stage's own loop."""
    import numpy as np
    import torch

    from gdd_ray import synthetic
    from gdd_ray.config import TrainConfig
    from gdd_ray.plan import eval_run_seed
    from gdd_ray.train.data import mean_std
    from gdd_ray.train.loop import to_device_images, train_run

    per_class = a.train_ipc * (1 + a.pda_variants) if a.train_protocol == "paper" else 10
    config = TrainConfig(epochs=a.train_epochs, protocol=a.train_protocol, eval_runs=a.train_runs,
                         net_width=a.train_width, eval_every=max(1, a.train_epochs // 10))  # fmt: skip
    pats = synthetic.patterns(a.train_classes, 32)
    images, labels = synthetic.sample(pats, per_class, seed=0)
    test_images, test_labels = synthetic.sample(pats, 100 if not a.smoke else 10, seed=1)  # CIFAR's 100 per class
    mean, std = mean_std("cifar100")
    dev = torch.device(device)
    train_x = to_device_images(images, mean, std, dev)
    train_y = torch.as_tensor(labels, device=dev)
    test_x = torch.as_tensor(test_images).to(dev)
    test_y = torch.as_tensor(test_labels, device=dev)
    common = {"protocol": a.train_protocol, "images": int(len(labels)), "classes": a.train_classes,
              "epochs_run": config.epochs_run, "net_width": a.train_width, "batch_size": config.train_batch_size}  # fmt: skip
    seconds = []
    for run in range(a.train_runs):

        def one(run=run) -> dict:
            t0 = time.perf_counter()
            result = train_run(train_x=train_x, train_y=train_y, test_x_u8=test_x, test_y=test_y, config=config,
                               num_classes=a.train_classes, seed=eval_run_seed(0, run), mean=mean, std=std)  # fmt: skip
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            s = time.perf_counter() - t0
            seconds.append(s)
            epochs = [h["epoch_s"] for h in result["history"]]
            return {**common, "run": run, "seconds": round(s, 3), "seconds_per_epoch": round(float(np.median(epochs)), 5),
                    "steps_per_s": round(config.epochs_run * -(-len(labels) // config.train_batch_size) / s, 1),
                    "test_acc": result["test_acc"], "train_acc": result["train_acc"]}  # fmt: skip

        measured(log, "train", f"run-{run}", one)
    if seconds:
        log.row("train", "sequential-runs", {**common, "runs": len(seconds), "seconds": round(sum(seconds), 3),
                                             "seconds_per_run": round(sum(seconds) / len(seconds), 3)})  # fmt: skip
    batched_runs_row(a, log)


def batched_runs_row(a, log: RowLog) -> None:
    """The place for the batched path (several evaluation runs trained at once as one wider model, being
    added to gdd_ray/train/ beside the loop above): its row goes here, same data, same runs, so the two rows
    compare directly. Until it exists, nothing is measured and the part says so."""
    print("[train] the batched several-runs-at-once path is not in gdd_ray/train/ yet: no row", flush=True)


# ---- main -------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    a = parse_args(argv)
    from gdd_ray.logs import quiet_libraries

    quiet_libraries()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device or ("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    cuda = device.startswith("cuda")
    if a.vae_dtype is None:
        a.vae_dtype = "bf16" if cuda else "fp32"
    run = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = Path(a.out)
    log = RowLog(out, run, a.smoke)
    info = machine(device)
    guess = estimate(a, a.parts, cuda)
    config = {k: v for k, v in vars(a).items() if k != "parts"}
    log.start({"parts": list(a.parts), "machine": info, "estimate_s": guess, "config": config})
    print(f"[gpu-bench] {run} parts {', '.join(a.parts)} on {info.get('gpu', device)}; " + json.dumps(info), flush=True)
    for part, seconds in guess.items():
        if seconds is not None:
            note = "" if seconds <= BUDGET_S else f" (over the {BUDGET_S:.0f} s budget: cut --batches/--repeats)"
            print(
                f"[gpu-bench] estimate {part}: {seconds} s on one H100 at {ASSUMED_TFLOP_S:.0f} TFLOP/s{note}",
                flush=True,
            )
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    os.environ.setdefault("GDD_RAY_CACHE", str(work / "cache"))  # tiny models, CLIP, compile caches: this run's own
    parts = {"eager": part_eager, "compiled": part_compiled, "train": part_train}
    seconds = {}
    for part in a.parts:
        t0 = time.perf_counter()
        try:
            parts[part](a, log, work, device)
        except Exception as e:  # noqa: BLE001 - the next part may still run (say a model that cannot be built)
            log.error(part, "part", e)
        seconds[part] = round(time.perf_counter() - t0, 1)
        print(f"[gpu-bench] part {part} took {seconds[part]} s (estimate {guess.get(part)})", flush=True)
    name = "gpu_bench_smoke.json" if a.smoke else f"gpu_bench_{'_'.join(a.parts)}.json"
    result = {"run": run, "parts": list(a.parts), "machine": info, "estimate_s": guess, "seconds": seconds,
              "ray_imported": "ray" in sys.modules, "config": config, "rows": log.rows, "errors": log.errors}  # fmt: skip
    write_json(out / name, result)
    print(f"[gpu-bench] {len(log.rows)} rows, {len(log.errors)} errors -> {out / ROWS_FILE}, {out / name}", flush=True)
    return 1 if log.errors else 0


if __name__ == "__main__":
    sys.exit(main())
