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
import importlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = Path(__file__).resolve().parent.parent


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


def build_config(a, out: str, **extra):
    from gdd_ray.config_loader import build_config as build

    values = dict(
        classes=str(class_file(a.classes)), ipc=a.ipc, out=out, model=a.model, gen_resolution=a.gen_resolution,
        image_size=a.image_size, batch_size=a.batch_size, unit_size=a.unit_size, stages="generate",
    )  # fmt: skip
    values.update(extra)
    return build(values)


_class_files: dict[int, Path] = {}


def class_file(n: int) -> Path:
    if n not in _class_files:
        from gdd_ray.classes import dataset_classes

        names = [c.class_id for c in dataset_classes("cifar100")]
        # More classes than CIFAR-100 has: names repeat, each with its own description (distinct prompts)
        rows = [(i, names[i % len(names)], f"{names[i % len(names)]} {i // len(names)}") for i in range(n)]
        f = Path(tempfile.mkdtemp()) / "classes.txt"
        f.write_text("".join(f"{i}\t{name}\t{desc}\n" for i, name, desc in rows))
        _class_files[n] = f
    return _class_files[n]


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


TFLOP_PER_IMAGE_512 = 4.1  # SDXL at 512 px, one step: UNet 1.59 + VAE decode 2.52 (text encoding cached per class)


def _csv(text: str, cast=str) -> list:
    return [cast(x) for x in text.split(",") if x.strip()]


LAYOUTS = ("contiguous", "channels_last")


def layout_variants(a) -> list[tuple[str, str]]:
    """(UNet, decoder) memory formats of the fast engine's eager rows: contiguous for both (what loading
    gives), and with --channels-last each component in channels_last alone and both together."""
    both = [("contiguous", "contiguous")]
    return (
        both
        + [("channels_last", "contiguous"), ("contiguous", "channels_last"), ("channels_last", "channels_last")]
        * a.channels_last
    )


def engine_matrix(a, work: Path, on_row=None) -> dict:
    """(e) The render loop alone (device work + readback, no PNG, no Ray) for every engine x VAE dtype x batch."""
    bench = EngineBench(a, work)
    batch_sizes = _csv(a.batch_sizes, int) or [a.batch_size]
    compile_batches = _csv(a.compile_batch_sizes, int) or batch_sizes

    def variants(engine: str, batch: int) -> list[dict]:
        """An engine's rows at one batch size: eager with the model's VAE always; the fast engine also compiled,
        in each channels_last combination (to be decided by measurement on the GPU) and with the tiny
        decoder, when asked."""
        if engine != "fast":
            return [{}]
        return (
            [dict(unet_format=u, vae_format=v) for u, v in layout_variants(a)]
            + [dict(compiled=True)] * (a.compile_fast and batch in compile_batches)
            + [dict(decoder="taesdxl")] * a.tiny_decoder
        )

    rows = []
    for engine in _csv(a.engines):
        for vae in ["fp32"] if engine == PIPELINE_CALL else bench.vae_dtypes:  # it decodes as the pipeline does
            for batch in batch_sizes:
                for variant in variants(engine, batch):
                    rows.append(bench.row(engine, vae, batch, **variant))
                    print(_row_line(rows[-1]), flush=True)
                    if on_row:
                        on_row(rows[-1])
    return bench.summary(rows)


class EngineBench:
    """(e)'s rows one at a time, on one pipeline loaded once: `row(...)` renders the same seeds as every other
    row (its pixel difference to the diffusers engine with an fp32 VAE is part of it) and leaves the shared
    pipeline as it found it (memory formats set back, compiled blocks undone)."""

    def __init__(self, a, work: Path, device: str | None = None):
        import torch

        from gdd_ray.classes import load_classes
        from gdd_ray.generate.model import load_pipeline, resolve_model
        from gdd_ray.plan import WorkUnit

        self.a, self.work = a, work
        self.caches = 0  # fresh compile caches made so far (one per cold compile)
        self.cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
        self.device = device or ("cuda" if self.cuda else "cpu")
        t0 = time.perf_counter()
        self.pipe = load_pipeline(resolve_model(a.model), device=self.device)  # shared by every row: loaded once
        self.load_s = round(time.perf_counter() - t0, 3)
        self.classes = load_classes(None, str(class_file(a.classes)))
        self.vae_dtypes = _csv(a.vae_dtypes) or (["bf16"] if self.cuda else ["fp32"])
        first = min(_csv(getattr(a, "batch_sizes", ""), int) or [a.batch_size])
        self.compare = WorkUnit(0, first, len(self.classes))  # the same seeds in every row
        reference = self.generator("diffusers", "fp32", first)
        self.reference = reference.render(self.compare).pixels.astype(np.int16)
        del reference

    def generator(self, engine: str, vae: str, batch: int, compiled: bool = False, decoder: str = "vae",
                  scope: str = "model"):  # fmt: skip
        from gdd_ray.generate.generator import UnitGenerator
        from gdd_ray.generate.stage import make_job

        a, work = self.a, self.work
        if engine == PIPELINE_CALL:
            cfg = build_config(a, str(work / "e"))  # the other rows' prompts and run seed
            prompts = [c.prompt(cfg.generate.templates[0]) for c in self.classes]
            return PipelineCallLoop(self.pipe, prompts, cfg.seed, a, batch, self.device)
        cfg = build_config(a, str(work / "e"), engine=engine, vae_dtype=vae, batch_size=batch, compile=compiled,
                           compile_scope=scope, decoder=decoder)  # fmt: skip
        job = make_job(cfg, self.classes, "bench", str(work / "e"))
        return UnitGenerator(job, device=self.device, pipeline=self.pipe)

    def units(self, repeat: int, n: int, batch: int) -> list:
        """n images as the stage cuts them (units of --unit-size, rounded up to whole batches), the `repeat`-th
        n of the grid: every repeat draws other images."""
        from gdd_ray.plan import WorkUnit

        per_unit = -(-max(self.a.unit_size, batch) // batch) * batch
        first = repeat * n
        return [WorkUnit(first + s, first + min(s + per_unit, n), len(self.classes)) for s in range(0, n, per_unit)]

    @staticmethod
    def render_units(gen, units: list) -> None:
        """Render units back to back, each unit's first noise prefetched while the one before renders, as the
        generator actor does (driver.GeneratorActor.run_unit)."""
        for k, unit in enumerate(units):
            if k + 1 < len(units) and hasattr(gen, "prefetch"):
                gen.prefetch(units[k + 1])
            gen.render(unit)

    def row(self, engine: str, vae: str, batch: int, *, compiled: bool = False, decoder: str = "vae",
            unet_format: str = "contiguous", vae_format: str = "contiguous", scope: str = "model",
            warm_compile: bool = False) -> dict:  # fmt: skip
        """One row. The UNet's and the decoder's memory formats are set before the row (before any compile)
        and set back after it; `warm_compile`: compile once into an empty cache (cold), then again from that
        cache in this process (warm: Dynamo traces again, Inductor's caches serve the rest), timing the second."""
        import statistics

        import torch

        from gdd_ray.generate import tuning
        from gdd_ray.generate.timing import PhaseClock
        from gdd_ray.plan import WorkUnit

        a, pipe, cuda = self.a, self.pipe, self.cuda
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = {
            "unet": tuning.set_memory_format(pipe.unet, unet_format),
            "vae": tuning.set_memory_format(pipe.vae, vae_format),
        }
        startup: dict = {}
        try:
            if compiled and warm_compile:
                cold = self.generator(engine, vae, batch, compiled, decoder, scope)
                self.caches += 1
                fresh_compile_cache(self.work / f"compile-cache-{self.caches}")
                cold.load()
                startup["compile_cold_s"] = cold.startup.get("compile_s")
                del cold
                reset_compiled(pipe)
            gen = self.generator(engine, vae, batch, compiled, decoder, scope)
            gen.load()  # prompt encoding, compile and (on a GPU) the first batches: reported apart
            if compiled and warm_compile:
                startup["compile_warm_s"] = gen.startup.get("compile_s")
            if getattr(gen, "decoder", None) is not None:  # the module this row decodes with (a cast copy, taesdxl)
                tuning.set_memory_format(gen.decoder.module, vae_format)
            decoder_module = gen.decoder.module if getattr(gen, "decoder", None) is not None else pipe.vae
            t = time.perf_counter()
            gen.render(WorkUnit(0, batch, len(self.classes)))  # warm-up batch, excluded (first-call allocations)
            warmup_s = time.perf_counter() - t
            n = a.batches * batch
            seconds = []
            for r in range(a.repeats):  # each returns with every pixel on the host
                t = time.perf_counter()
                self.render_units(gen, self.units(r, n, batch))
                seconds.append(time.perf_counter() - t)
            gen.clock = PhaseClock(cuda)  # a separate run: events add a little host work
            self.render_units(gen, self.units(0, n, batch))
            phases = gen.clock.totals()
            gen.clock = None
            pixels = gen.render(self.compare).pixels.astype(np.int16)
            rate = [n / s for s in seconds]
            diff = np.abs(pixels - self.reference)
            row = {
                "engine": engine,
                "vae_dtype": vae,
                "batch_size": batch,
                "compile": gen.compile_mode,
                "compile_scope": scope if gen.compile_mode else None,
                "unet_memory_format": tuning.memory_format(pipe.unet),
                "vae_memory_format": tuning.memory_format(decoder_module),
                "decoder": decoder,
                "executed_batch_sizes": sorted(gen.executed_batch_sizes),
                "images_per_timed_run": n,
                "images_per_s_median": round(statistics.median(rate), 3),
                "images_per_s_min": round(min(rate), 3),
                "images_per_s_max": round(max(rate), 3),
                "startup_s": dict(gen.startup, **startup, warmup_batch_s=round(warmup_s, 3)),
                "phase_s": {k: round(v, 4) for k, v in phases.items()},
                "device_idle_fraction": round(phases.get("idle", 0.0) / phases["span"], 4),
                "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                "tflop_per_s": round(statistics.median(rate) * TFLOP_PER_IMAGE_512 * (a.gen_resolution / 512) ** 2, 1)
                if a.model != "tiny" else None,
                "diff_to_diffusers_fp32": {"mean_0_255": round(float(diff.mean()), 3), "max_0_255": int(diff.max())},
                "not_blank": bool(pixels.std() > 0),
            }  # fmt: skip
            del gen
            return row
        finally:
            if compiled:
                reset_compiled(pipe)
            tuning.set_memory_format(pipe.unet, before["unet"])
            tuning.set_memory_format(pipe.vae, before["vae"])

    def summary(self, rows: list[dict]) -> dict:
        return {
            "load_s": self.load_s,
            "rows": rows,
            "fast_over_diffusers": _speedups(rows, "diffusers"),
            "fast_over_pipeline_call": _speedups(rows, PIPELINE_CALL),
        }


def fresh_compile_cache(folder: Path) -> None:
    """An empty compile cache for a cold compile: Inductor's (FX graphs, AOTAutograd) and Triton's kernels."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")


def reset_compiled(pipe) -> None:
    """Forget every compiled graph of this process (Dynamo's caches, Inductor's in-memory ones) and undo
    compiled blocks, so the next compile starts from the on-disk cache alone and later rows run eager."""
    import torch

    from gdd_ray.generate import tuning

    torch.compiler.reset()
    utils = importlib.import_module("torch._inductor.utils")
    for name in ("clear_caches", "clear_inductor_caches"):  # the name moved across torch versions
        if callable(getattr(utils, name, None)):
            getattr(utils, name)()
            break
    tuning.uncompile_blocks(pipe.unet)
    tuning.uncompile_blocks(pipe.vae)


PIPELINE_CALL = "pipeline-call"


class PipelineCallLoop:
    """(e)'s baseline row: the render loop as it was before the engine work (issue 9's "today"): for each
    batch the diffusers pipeline is called with the class's cached embeddings and a CPU generator per image,
    down to pixels (`output_type="pt"`: its own VAE decode, with SDXL's fp32 upcast and cast back on every
    call where the VAE asks for it, and its image post-processing), then the device resize and one copy back.
    Same seeds, so the same images as the other rows within rounding. Eager only."""

    compile_mode = None

    def __init__(self, pipe, prompts: list[str], seed: int, a, batch: int, device: str):
        from gdd_ray.generate.engine import PromptTable

        self.pipe, self.seed, self.a, self.batch = pipe, seed, a, batch
        self.prompts = PromptTable(pipe, prompts, device, with_negative=False)  # one row per class
        self.clock = None
        self.startup: dict = {}
        self.executed_batch_sizes: set = set()

    def load(self) -> None:
        t = time.perf_counter()
        self.prompts.encode_all()
        self.startup["text_encode_s"] = round(time.perf_counter() - t, 3)

    def render(self, unit):
        import torch
        import torch.nn.functional as F

        from gdd_ray.plan import image_seed

        a, size = self.a, self.a.image_size
        images_of = unit.images()
        out = []
        for start in range(0, unit.size, self.batch):
            idx = images_of[start : start + self.batch]  # (label, index) of each image of this call
            n = len(idx)
            self.executed_batch_sizes.add(n)
            pe, _, ppe, _ = self.prompts.get(tuple(label for label, _ in idx))  # one prompt per image
            gens = [torch.Generator("cpu").manual_seed(image_seed(self.seed, label, i)) for label, i in idx]
            if self.clock:
                self.clock.mark("start")
            with torch.inference_mode():
                images = self.pipe(
                    prompt_embeds=pe, pooled_prompt_embeds=ppe,
                    num_inference_steps=1, guidance_scale=0.0, height=a.gen_resolution, width=a.gen_resolution,
                    generator=gens, output_type="pt",
                ).images  # fmt: skip
                if self.clock:
                    self.clock.mark("pipeline")
                if size != a.gen_resolution:
                    images = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
                pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
                out.append(pixels.cpu().numpy())  # a sync point per batch
            if self.clock:
                self.clock.mark("resize_copy")
        return SimpleNamespace(pixels=np.concatenate(out))


def _speedups(rows: list[dict], baseline: str) -> list[dict]:
    """Each fast row's images/s (eager and compiled) over the eager `baseline` row of the same VAE dtype and
    batch size; the pipeline-call baseline has an fp32 VAE only (it decodes as the pipeline does)."""
    by = {(r["engine"], r["vae_dtype"], r["batch_size"]): r for r in rows if not r["compile"] and r["engine"] != "fast"}
    out = []
    for r in rows:
        other = by.get((baseline, "fp32" if baseline == PIPELINE_CALL else r["vae_dtype"], r["batch_size"]))
        if r["engine"] == "fast" and other:
            ratio = r["images_per_s_median"] / other["images_per_s_median"]
            out.append({"vae_dtype": r["vae_dtype"], "batch_size": r["batch_size"], "compile": r["compile"],
                        "compile_scope": r.get("compile_scope"), "unet_memory_format": r.get("unet_memory_format"),
                        "vae_memory_format": r.get("vae_memory_format"), "decoder": r.get("decoder", "vae"),
                        "ratio": round(ratio, 3)})  # fmt: skip
    return out


TABLE_HEAD = (
    "| engine | VAE | batch (executed) | compile | UNet / decoder layout | images/s (median) | min–max | "
    "compile + first batch s | device idle | peak GiB | diff to diffusers fp32 (mean / max of 255) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)
SHORT_LAYOUT = {"contiguous": "NCHW", "channels_last": "NHWC"}


def _row_line(r: dict) -> str:
    startup = r["startup_s"]
    first = (startup.get("compile_s") or 0.0) + (startup.get("first_batch_s") or 0.0)
    if "compile_cold_s" in startup:
        first = f"{first:.1f} (cold compile {startup['compile_cold_s']:.1f})"
    else:
        first = f"{first:.1f}"
    d = r["diff_to_diffusers_fp32"]
    compiled = f"{r['compile']}, {r['compile_scope']}" if r["compile"] else "eager"
    layout = "/".join(SHORT_LAYOUT[r[k]] for k in ("unet_memory_format", "vae_memory_format"))
    return (
        f"| {r['engine']} | {r['vae_dtype']} | {r['batch_size']} ({'/'.join(map(str, r['executed_batch_sizes']))}) | "
        f"{compiled}{', taesdxl' if r.get('decoder') == 'taesdxl' else ''} | {layout} | "
        f"{r['images_per_s_median']} | {r['images_per_s_min']}–{r['images_per_s_max']} | {first} | "
        f"{r['device_idle_fraction']:.0%} | {r['peak_memory_gib'] if r['peak_memory_gib'] is not None else '–'} | "
        f"{d['mean_0_255']} / {d['max_0_255']} |"
    )


def markdown_table(engines: dict) -> str:
    return "\n".join([TABLE_HEAD] + [_row_line(r) for r in engines["rows"]])


def versions() -> dict:
    import diffusers
    import torch

    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        out["driver"] = smi.stdout.strip() or None
    return out


def timing(images: int, seconds: float) -> dict:
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 3)}


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
    work = Path(tempfile.mkdtemp(prefix="bench-gen-"))
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
    import numpy as np
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
