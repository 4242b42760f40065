"""The per-unit work: one work unit in, one committed shard out. Knows nothing of queues, actors or retries.

The GPU part (`render`) and the CPU part (`encode_and_write`) are separate calls so that a worker can
run the PNG encoding and upload of one unit while the GPU renders the next (see driver.GeneratorActor).
"""

from __future__ import annotations

import math
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from gdd_ray import shards, storage
from gdd_ray.classes import ClassInfo
from gdd_ray.config import GenerateConfig
from gdd_ray.plan import WorkUnit, image_seed


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
    model_revision: str | None = None  # the commit the driver pinned a hub model to (None: local/built-in)


@dataclass
class UnitResult:
    unit: WorkUnit
    images: int
    bytes: int
    render_s: float  # time holding the GPU
    encode_s: float  # PNG encoding + commit, overlapped with the next unit's render
    worker: str = ""


@dataclass
class RenderedUnit:
    unit: WorkUnit
    pixels: np.ndarray  # N x H x W x 3 uint8, already at image_size
    seeds: list[int]
    render_s: float


@dataclass
class UnitGenerator:
    job: GenerationJob
    device: str | None = None
    pipeline: object = None  # loaded on first use; tests may inject one
    _embeds: dict = field(default_factory=dict)
    _pool: ThreadPoolExecutor | None = None

    def __post_init__(self) -> None:
        self.out = storage.Location(self.job.out_uri)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def load(self) -> None:
        if self.pipeline is None:
            import torch

            from gdd_ray.generate.model import load_pipeline

            if self.device is None:
                self.device = "cuda" if torch.cuda.is_available() else "cpu"
            g = self.job.config
            self.pipeline = load_pipeline(
                self.job.model, g.vae, self.device, compile=g.compile, revision=self.job.model_revision
            )
        if self.device is None:
            self.device = str(self.pipeline.device)

    # ---- GPU side --------------------------------------------------------------------------------

    def prompt_embeddings(self, label: int):
        """Text-encoder outputs for a class, computed once per worker and reused for all its images."""
        if label not in self._embeds:
            import torch

            prompt = self.job.classes[label].prompt(self.job.config.prompt_template)
            with torch.inference_mode():
                pe, npe, ppe, nppe = self.pipeline.encode_prompt(
                    prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=self.cfg_on
                )
            self._embeds[label] = (pe, npe, ppe, nppe)
        return self._embeds[label]

    @property
    def cfg_on(self) -> bool:
        return self.job.config.guidance > 1.0  # as in diffusers: guidance <= 1 means no unconditional pass

    def batches(self, unit: WorkUnit) -> list[range]:
        """Split a unit into near-equal batches of at most batch_size (20 -> 10+10, not 16+4)."""
        n = math.ceil(unit.size / self.job.config.batch_size)
        edges = [unit.start + round(i * unit.size / n) for i in range(n + 1)]
        return [range(a, b) for a, b in zip(edges, edges[1:])]

    def render(self, unit: WorkUnit) -> RenderedUnit:
        import torch
        import torch.nn.functional as F

        self.load()
        t0 = time.perf_counter()
        g, size = self.job.config, self.job.image_size
        pe, npe, ppe, nppe = self.prompt_embeddings(unit.label)
        seeds = [image_seed(self.job.seed, unit.label, i) for i in range(unit.start, unit.stop)]
        out = []
        for batch in self.batches(unit):
            n = len(batch)
            # One CPU generator per image: the initial noise of an image depends on its seed alone,
            # not on the batch it lands in or on the device (CPU-drawn noise is the same everywhere).
            gens = [torch.Generator("cpu").manual_seed(seeds[i - unit.start]) for i in batch]
            kwargs = dict(prompt_embeds=pe.expand(n, -1, -1), pooled_prompt_embeds=ppe.expand(n, -1))
            if self.cfg_on:
                kwargs.update(
                    negative_prompt_embeds=npe.expand(n, -1, -1), negative_pooled_prompt_embeds=nppe.expand(n, -1)
                )
            with torch.inference_mode():
                images = self.pipeline(
                    **kwargs,
                    num_inference_steps=g.steps,
                    guidance_scale=g.guidance,
                    height=g.gen_resolution,
                    width=g.gen_resolution,
                    generator=gens,
                    output_type="pt",
                ).images  # N x 3 x R x R in [0, 1], still on the device
                if size != g.gen_resolution:
                    images = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
                pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
                out.append(pixels.cpu().numpy())  # a sync point: small uint8 tensors only
        return RenderedUnit(unit, np.concatenate(out), seeds, time.perf_counter() - t0)

    # ---- CPU side --------------------------------------------------------------------------------

    def encode_and_write(self, rendered: RenderedUnit) -> UnitResult:
        t0 = time.perf_counter()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="png")
        pngs = list(self._pool.map(shards.encode_png, rendered.pixels))  # PIL releases the GIL in zlib
        unit = rendered.unit
        info = self.job.classes[unit.label]
        prompts = [info.prompt(self.job.config.prompt_template)] * unit.size
        table = shards.generated_table(unit, info.class_id, info.name, prompts, rendered.seeds, pngs)
        footer = shards.generated_footer(unit, self.job.fingerprint, self.job.image_size)
        nbytes = shards.write_shard(self.out, unit.shard_name, table, footer)
        return UnitResult(unit, unit.size, nbytes, rendered.render_s, time.perf_counter() - t0, self.worker)

    def run(self, unit: WorkUnit) -> UnitResult:
        return self.encode_and_write(self.render(unit))
