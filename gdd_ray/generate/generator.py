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

from gdd_ray import storage
from gdd_ray.classes import ClassInfo
from gdd_ray.generate import shards
from gdd_ray.generate.plan import WorkUnit, image_seed


@dataclass(frozen=True)
class GenerationSpec:
    """What every worker needs to render any unit: small, picklable, identical on every node."""

    model: str  # what from_pretrained gets: hub id or folder ('tiny' is built on first use)
    vae: str | None
    steps: int
    guidance: float
    gen_resolution: int
    image_size: int
    prompt_template: str
    seed: int
    batch_size: int
    fingerprint: str
    out_uri: str  # the folder shards are committed to
    classes: tuple[ClassInfo, ...]
    compile: bool = False


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
    spec: GenerationSpec
    device: str | None = None
    pipeline: object = None  # loaded on first use; tests may inject one
    _embeds: dict = field(default_factory=dict)
    _pool: ThreadPoolExecutor | None = None

    def __post_init__(self) -> None:
        self.out = storage.Location(self.spec.out_uri)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def load(self) -> None:
        if self.pipeline is None:
            import torch

            from gdd_ray.generate.model import load_pipeline

            if self.device is None:
                self.device = "cuda" if torch.cuda.is_available() else "cpu"
            self.pipeline = load_pipeline(self.spec.model, self.spec.vae, self.device, compile=self.spec.compile)
        if self.device is None:
            self.device = str(self.pipeline.device)

    # ---- GPU side --------------------------------------------------------------------------------

    def prompt_embeddings(self, label: int):
        """Text-encoder outputs for a class, computed once per worker and reused for all its images."""
        if label not in self._embeds:
            import torch

            prompt = self.spec.classes[label].prompt(self.spec.prompt_template)
            with torch.inference_mode():
                pe, npe, ppe, nppe = self.pipeline.encode_prompt(
                    prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=self.cfg_on
                )
            self._embeds[label] = (pe, npe, ppe, nppe)
        return self._embeds[label]

    @property
    def cfg_on(self) -> bool:
        return self.spec.guidance > 1.0  # as in diffusers: guidance <= 1 means no unconditional pass

    def batches(self, unit: WorkUnit) -> list[range]:
        """Split a unit into near-equal batches of at most batch_size (20 -> 10+10, not 16+4)."""
        n = math.ceil(unit.size / self.spec.batch_size)
        edges = [unit.start + round(i * unit.size / n) for i in range(n + 1)]
        return [range(a, b) for a, b in zip(edges, edges[1:])]

    def render(self, unit: WorkUnit) -> RenderedUnit:
        import torch
        import torch.nn.functional as F

        self.load()
        t0 = time.perf_counter()
        s = self.spec
        pe, npe, ppe, nppe = self.prompt_embeddings(unit.label)
        seeds = [image_seed(s.seed, unit.label, i) for i in range(unit.start, unit.stop)]
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
                    num_inference_steps=s.steps,
                    guidance_scale=s.guidance,
                    height=s.gen_resolution,
                    width=s.gen_resolution,
                    generator=gens,
                    output_type="pt",
                ).images  # N x 3 x R x R in [0, 1], still on the device
                if s.image_size != s.gen_resolution:
                    images = F.interpolate(
                        images.float(), size=(s.image_size, s.image_size), mode="bicubic", antialias=True
                    )
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
        info = self.spec.classes[unit.label]
        rows = shards.ShardRows(unit, info.class_id, info.name, info.prompt(self.spec.prompt_template), rendered.seeds)
        table = shards.build_table(rows, pngs)
        nbytes = shards.write_shard(self.out, unit, table, self.spec.fingerprint, self.spec.image_size)
        return UnitResult(unit, unit.size, nbytes, rendered.render_s, time.perf_counter() - t0, self.worker)

    def run(self, unit: WorkUnit) -> UnitResult:
        return self.encode_and_write(self.render(unit))
