"""The engine matrix shared by the generation benchmarks (jobs/bench_generate.py on a node with pip and Ray,
jobs/gpu_bench.py on a bare GPU image): device images/s of the render loop alone (no PNG, no Ray) for every
engine x VAE dtype x batch size x layout (x compile), warm-up and compile reported apart, each row's pixel
difference to the diffusers engine with an fp32 VAE on the same seeds. Imports neither Ray nor this project's
stages at import time.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = Path(__file__).resolve().parent.parent
TFLOP_PER_IMAGE_512 = 4.1  # SDXL at 512 px, one step: UNet 1.59 + VAE decode 2.52 (text encoding cached per class)


def build_config(a, out: str, **extra):
    from gdd_ray.config_loader import build_config as build

    values = dict(
        classes=str(class_file(a.classes)), ipc=a.ipc, out=out, model=a.model, gen_resolution=a.gen_resolution,
        image_size=a.image_size, batch_size=a.batch_size, unit_size=a.unit_size, stages="generate",
    )  # fmt: skip
    values.update(extra)
    return build(values)


def class_file(n: int) -> Path:
    """A class list of n classes (CIFAR-100's names), kept in the gdd-ray cache: the same file for every run."""
    from gdd_ray import storage
    from gdd_ray.classes import dataset_classes
    from gdd_ray.generate.model import cache_dir

    f = cache_dir() / "bench-classes" / f"classes-{n}.txt"
    if not f.exists():
        names = [c.class_id for c in dataset_classes("cifar100")]
        # More classes than CIFAR-100 has: names repeat, each with its own description (distinct prompts)
        rows = [(i, names[i % len(names)], f"{names[i % len(names)]} {i // len(names)}") for i in range(n)]
        text = "".join(f"{i}\t{name}\t{desc}\n" for i, name, desc in rows)
        storage.Location(str(f.parent)).write_bytes(f.name, text.encode())  # atomic: a reader never sees half
    return f


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
