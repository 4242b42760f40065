"""The per-unit work: one work unit in, one committed shard out. Knows nothing of queues, actors or retries.

The device part (`render`) and the CPU part (`encode_and_write`) are separate calls so that a worker can
PNG-encode and upload some units while the device renders the next (see driver.GeneratorActor, which makes
every device call from one thread).

Rendering a unit: batches of exactly `--batch-size` (a unit is a multiple of it, so only the run's last
batch is padded, the padding discarded), so every call has the same shapes and a compiled model never
recompiles; a batch holds images of several classes, each with its own prompt embedding row; the next batch's noise is drawn on a
background thread while the device works; on a GPU the uint8 result is copied into pinned memory without
blocking and read one batch later. A unit's first noise is drawn as soon as the unit is queued (`prefetch`,
called by the driver), so the device does not wait for it at a unit boundary.
"""

from __future__ import annotations

import copy
import math
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from gdd_ray import shards, storage
from gdd_ray.classes import ClassInfo
from gdd_ray.config import GenerateConfig
from gdd_ray.plan import WorkUnit, image_seed, template_choice

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PNG_MS_AT_224 = 7.5  # one 224 px PNG (compress level 1) on one core; scales with the pixel count
TARGET_IMAGES_PER_S = 200  # an H100's compute bound at 512 px: PNG threads are sized to keep up with it
PREFETCH_LIMIT = 4  # units whose first noise is held ahead (the driver queues at most PIPELINE_DEPTH)


@dataclass(frozen=True)
class GenerationJob:
    """What every worker needs to render any unit: small, picklable, identical on every node."""

    config: GenerateConfig  # the run's generate section itself
    model: str  # what from_pretrained gets: the resolved hub id or folder
    image_size: int  # resolved (--image-size, else the dataset's)
    seed: int  # the run seed
    classes: tuple[ClassInfo, ...]
    fingerprint: str
    out_uri: str  # the folder shards are committed to
    engine: str = "diffusers"  # resolved: fast | diffusers (runtime.resolve)
    vae_dtype: str = "fp32"  # resolved: fp32 | bf16 | fp16
    compile_mode: str | None = None  # torch.compile mode when --compile; None = the device's default
    model_revision: str | None = None  # the commit the driver pinned a hub model to (None: local/built-in)


@dataclass
class UnitResult:
    unit: WorkUnit
    images: int
    bytes: int
    render_s: float  # time holding the device
    encode_s: float  # PNG encoding + commit, overlapped with the next unit's render
    worker: str = ""
    executed: int = 0  # images the device computed, padding included (batches x --batch-size)


@dataclass
class RenderedUnit:
    unit: WorkUnit
    pixels: np.ndarray  # N x H x W x 3 uint8, already at image_size
    seeds: list[int]
    render_s: float
    executed: int = 0


def png_threads(image_size: int, cpus: int | None = None) -> int:
    """Threads to PNG-encode at the device's pace: ~7.5 ms per 224 px image, scaled by the pixel count."""
    per_image_s = PNG_MS_AT_224 / 1000 * (image_size / 224) ** 2
    wanted = math.ceil(TARGET_IMAGES_PER_S * per_image_s * 1.25)
    return max(1, min(wanted, cpus or os.cpu_count() or 1, 16))


@dataclass
class UnitGenerator:
    job: GenerationJob
    device: str | None = None
    pipeline: object = None  # loaded on first use; tests may inject one (it is not modified)
    clock: object = None  # a timing.PhaseClock, when a benchmark wants per-phase device times
    engine: object = None
    decoder: object = None
    prompts: object = None
    startup: dict = field(default_factory=dict)  # load / compile / first-batch seconds, apart
    executed_batch_sizes: set = field(default_factory=set)  # every batch size the model was called with
    _pool: ThreadPoolExecutor | None = None
    _noise_pool: ThreadPoolExecutor | None = None
    _prefetched: dict = field(default_factory=dict)  # unit -> future of its first batch's noise
    _prefetch_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.out = storage.Location(self.job.out_uri)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    @property
    def cuda(self) -> bool:
        return str(self.device).startswith("cuda")

    @property
    def compile_mode(self) -> str | None:
        if not self.job.config.compile:
            return None
        # CUDA graphs on a GPU for the whole model (the launches of an eager UNet cost as much CPU time as its GPU
        # time); none for compiled blocks (tuning: one graph would be recorded per block instance)
        whole = self.job.config.compile_scope == "model"
        return self.job.compile_mode or ("reduce-overhead" if self.cuda and whole else "default")

    def load(self) -> None:
        """Load the model, encode every class's prompt and, when compiling or on a GPU, warm up on full
        batches: all before the first unit, so start-up, compile and first-batch times are reported apart."""
        if self.engine is not None:
            return
        import torch

        from gdd_ray.generate import model as models
        from gdd_ray.generate.decode import Decoder
        from gdd_ray.generate.engine import FastEngine, PipelineEngine, PromptTable, pipeline_fast_path_problem

        t0 = time.perf_counter()
        g, job = self.job.config, self.job
        if self.device is None:
            self.device = str(self.pipeline.device) if self.pipeline is not None else None
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        vae_dtype = getattr(torch, TORCH_DTYPES[job.vae_dtype])
        if self.compile_mode:
            self.startup["compile_cache"], self.startup["compile_cache_warm"] = models.use_compile_cache()
        if self.pipeline is None:
            self.pipeline = models.load_pipeline(
                job.model, g.vae, self.device, vae_dtype=vae_dtype, revision=job.model_revision
            )
        pipe = self.pipeline
        if g.decoder == "taesdxl":
            module = models.load_tiny_decoder(job.model, g.vae, self.device, vae_dtype)
        else:
            module = (
                pipe.vae if pipe.vae.dtype == vae_dtype else models.cast_quietly(copy.deepcopy(pipe.vae), vae_dtype)
            )
        if job.engine == "fast":
            problem = pipeline_fast_path_problem(pipe, g.steps, g.guidance)
            if problem:
                raise RuntimeError(f"the run asked for the fast engine, which does not apply: {problem}")
        prompts = [c.prompt(t) for c in job.classes for t in g.templates]  # row: label x templates + template
        self.prompts = PromptTable(pipe, prompts, self.device, with_negative=g.guidance > 1.0)
        mode, scope = self.compile_mode, g.compile_scope
        if job.engine == "fast":
            self.engine = FastEngine(pipe, self.prompts, g.batch_size, g.gen_resolution, self.device, mode, scope)
        else:
            self.engine = PipelineEngine(pipe, self.prompts, g, g.gen_resolution, mode, scope)
        watermark = getattr(pipe, "watermark", None)
        self.decoder = Decoder(module, g.gen_resolution, job.image_size, watermark, mode, scope)
        self.startup["load_s"] = round(time.perf_counter() - t0, 3)
        t1 = time.perf_counter()
        self.prompts.encode_all()
        self._sync()
        self.startup["text_encode_s"] = round(time.perf_counter() - t1, 3)
        if mode or self.cuda:
            for key in ("compile_s", "first_batch_s"):  # the first call compiles (and autotunes); the second runs
                t = time.perf_counter()
                self._run_batch(self._noise([], self.job.config.batch_size), (0,) * self.job.config.batch_size)
                self._sync()
                self.startup[key] = round(time.perf_counter() - t, 3)

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    # ---- device side -----------------------------------------------------------------------------

    def batches(self, unit: WorkUnit) -> list[range]:
        """Consecutive batches of --batch-size (20 at 16 -> 16 + 4, the 4 padded to 16 when rendered)."""
        b = self.job.config.batch_size
        return [range(s, min(s + b, unit.stop)) for s in range(unit.start, unit.stop, b)]

    def _noise(self, seeds: list[int], batch: int):
        from gdd_ray.generate.engine import draw_noise, latent_shape

        return draw_noise(
            seeds, batch, latent_shape(self.pipeline, self.job.config.gen_resolution), self.pipeline.unet.dtype,
            pin=self.cuda,
        )  # fmt: skip

    def template_choices(self, unit: WorkUnit) -> list[int]:
        """The prompt template of each image of the unit (plan.template_choice: from the image alone)."""
        n = len(self.job.config.templates)
        return [template_choice(self.job.seed, label, i, n) for label, i in unit.images()]

    def seeds(self, unit: WorkUnit, positions: range) -> list[int]:
        """The seed of the image at each of `positions` (plan.image_seed: from the image alone)."""
        c = unit.classes
        return [image_seed(self.job.seed, p % c, p // c) for p in positions]

    def prompt_rows(self, unit: WorkUnit, positions: range, choices: list[int]) -> tuple[int, ...]:
        """PromptTable rows of one batch, one per image (a unit spans classes; each image has its template),
        padded to --batch-size with the first image's row (only a run's last batch is short), so the batch's
        shapes never change."""
        n, b, c = len(self.job.config.templates), self.job.config.batch_size, unit.classes
        rows = [(p % c) * n + t for p, t in zip(positions, choices)]
        return tuple(rows + [rows[0]] * (b - len(rows)))

    def _run_batch(self, noise_and_gens, label: int | tuple[int, ...]):
        """Queue one full batch on the device (`label`: its PromptTable rows, see prompt_rows); returns
        (uint8 host tensor, event to wait on or None)."""
        import torch

        noise, gens = noise_and_gens
        clock = self.clock
        if self.compile_mode and self.cuda:
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: the previous batch's outputs are not read again
        if clock:
            clock.mark("start")
        x = noise.to(self.device, non_blocking=True)
        self.executed_batch_sizes.add(x.shape[0])
        if clock:
            clock.mark("upload")
        latents = self.engine.latents(x, gens, label)
        if clock:
            clock.mark("denoise")
        images = self.decoder.decode(latents)
        if clock:
            clock.mark("decode")
        pixels = self.decoder.finish(images)
        if not self.cuda:
            if clock:
                clock.mark("resize_copy")
            return pixels, None
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        if clock:
            clock.mark("resize_copy")
        return host, done

    def _noise_thread(self) -> ThreadPoolExecutor:
        with self._prefetch_lock:  # prefetch (a driver thread) and render (the device thread) may both ask
            if self._noise_pool is None:
                self._noise_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="noise")
            return self._noise_pool

    def _submit_noise(self, unit: WorkUnit, batch: range):
        return self._noise_thread().submit(self._noise, self.seeds(unit, batch), self.job.config.batch_size)

    def prefetch(self, unit: WorkUnit) -> None:
        """Start drawing `unit`'s first batch of noise now, on the noise thread, while the device works on the
        units before it: the driver calls it as a unit is queued, so a unit boundary does not leave the
        device waiting for noise. The noise depends on the seeds alone: pixels are the same either way."""
        if self.engine is None:  # not loaded yet: the start-up is longer than any draw
            return
        future = self._submit_noise(unit, self.batches(unit)[0])
        with self._prefetch_lock:
            while len(self._prefetched) >= PREFETCH_LIMIT:  # units prefetched and never rendered (a budget's end)
                self._prefetched.pop(next(iter(self._prefetched)))
            self._prefetched[unit] = future

    def render(self, unit: WorkUnit) -> RenderedUnit:
        self.load()
        t0 = time.perf_counter()
        seeds = self.seeds(unit, range(unit.start, unit.stop))
        size = self.job.image_size
        out = np.empty((unit.size, size, size, 3), dtype=np.uint8)
        batches = self.batches(unit)
        choices = self.template_choices(unit)

        def noise_for(k: int):
            return self._submit_noise(unit, batches[k])

        with self._prefetch_lock:
            upcoming = self._prefetched.pop(unit, None)
        if upcoming is None:
            upcoming = noise_for(0)
        pending = None  # the previous batch: read its pixels once the next one is queued
        for k, rng in enumerate(batches):
            noise = upcoming.result()
            if k + 1 < len(batches):
                upcoming = noise_for(k + 1)  # drawn on the CPU while the device works on this batch
            rows = self.prompt_rows(unit, rng, choices[rng.start - unit.start : rng.stop - unit.start])
            queued = (*self._run_batch(noise, rows), rng)
            if pending:
                self._collect(pending, out, unit)
            pending = queued
        self._collect(pending, out, unit)
        return RenderedUnit(
            unit, out, seeds, time.perf_counter() - t0, executed=len(batches) * self.job.config.batch_size
        )

    @staticmethod
    def _collect(pending, out: np.ndarray, unit: WorkUnit) -> None:
        host, done, rng = pending
        if done is not None:
            done.synchronize()  # waits for this batch only; the next one is already queued behind it
        out[rng.start - unit.start : rng.stop - unit.start] = host[: len(rng)].numpy()

    # ---- CPU side --------------------------------------------------------------------------------

    def encode_and_write(self, rendered: RenderedUnit) -> UnitResult:
        t0 = time.perf_counter()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=png_threads(self.job.image_size), thread_name_prefix="png")
        pngs = list(self._pool.map(shards.encode_png, rendered.pixels))  # PIL releases the GIL in zlib
        unit = rendered.unit
        infos = [self.job.classes[label] for label, _ in unit.images()]
        templates = self.job.config.templates
        # what each image was drawn from
        prompts = [info.prompt(templates[t]) for info, t in zip(infos, self.template_choices(unit))]
        table = shards.generated_table(
            unit, [i.class_id for i in infos], [i.name for i in infos], prompts, rendered.seeds, pngs
        )
        footer = shards.generated_footer(unit, self.job.fingerprint, self.job.image_size)
        nbytes = shards.write_shard(self.out, unit.shard_name, table, footer)
        return UnitResult(
            unit, unit.size, nbytes, rendered.render_s, time.perf_counter() - t0, self.worker, rendered.executed
        )

    def run(self, unit: WorkUnit) -> UnitResult:
        return self.encode_and_write(self.render(unit))
