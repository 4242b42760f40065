"""The generation engines on the tiny SDXL-architecture model: the fast one-step path against the diffusers
pipeline call, batch independence, the decoder's precision, and how --engine / --vae-dtype are resolved."""

import sys

import numpy as np
import pytest
from gen_helpers import tiny_config

from gdd_ray.classes import dataset_classes
from gdd_ray.errors import UserError
from gdd_ray.generate import runtime
from gdd_ray.generate import stage as gen_stage
from gdd_ray.generate.generator import UnitGenerator
from gdd_ray.generate.model import load_pipeline
from gdd_ray.plan import WorkUnit, image_seed

CLASSES = dataset_classes("cifar10")


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline("tiny", device="cpu")


def generator(tmp_path, pipe, **overrides) -> UnitGenerator:
    cfg = tiny_config(tmp_path / "run", **{"unit_size": 4, **overrides})  # a multiple of every batch size here
    job = gen_stage.make_job(cfg, CLASSES, "fp-test", str(tmp_path / "run" / "generated"))
    return UnitGenerator(job, pipeline=pipe)


def reference_pixels(pipe, unit: WorkUnit, seed: int, resolution: int, size: int) -> np.ndarray:
    """The plain diffusers pipeline call (prompt as text, its own noise draw, its own VAE decode), resized
    and quantised as the generator does: what the fast path has to reproduce."""
    import torch
    import torch.nn.functional as F

    gens = [torch.Generator("cpu").manual_seed(image_seed(seed, label, i)) for label, i in unit.images()]
    prompts = [CLASSES[label].prompt("{name}") for label, _ in unit.images()]  # a unit spans classes
    with torch.inference_mode():
        images = pipe(
            prompt=prompts, num_inference_steps=1, guidance_scale=0.0, height=resolution,
            width=resolution, generator=gens, output_type="pt",
        ).images  # fmt: skip
    images = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_fast_engine_reproduces_the_diffusers_pipeline(tmp_path, pipe):
    unit = WorkUnit(29, 32, 10)  # classes 9, 0, 1 at batch 2: one full batch of two classes, one padded
    fast = generator(tmp_path / "f", pipe, engine="fast")
    slow = generator(tmp_path / "d", pipe, engine="diffusers")
    assert (fast.job.engine, slow.job.engine, fast.job.vae_dtype) == ("fast", "diffusers", "fp32")
    ours = fast.render(unit).pixels
    ref = reference_pixels(pipe, unit, fast.job.seed, 64, 16)
    # Tolerance: 1 level of 255. Both run the same float32 operations on the same noise and embeddings;
    # only the order of a few float ops differs (batched text encoding, the update written out), which
    # can move a value across a rounding boundary of the uint8 quantisation, never more.
    assert max_diff(ours, ref) <= 1
    assert max_diff(slow.render(unit).pixels, ref) <= 1
    assert fast.executed_batch_sizes == {2} and not np.array_equal(ours[0], ours[1])


@pytest.mark.slow  # builds SDXL-Turbo's full architecture on the meta device and runs it there: ~4 s
def test_fast_path_fits_sdxl_turbos_architecture_at_512_px():
    """SDXL-Turbo's real configs and tokenizers (`sdxl-random` on the meta device: shapes, no memory, no
    arithmetic) at the product's 512 px: the fast path's conditioning fits the real UNet (6 time ids x 256 + the
    pooled 1280 = the added embedding's 2816; both encoders' hidden states, 768 + 1280 = cross-attention's 2048),
    the latents come back in the UNet's shape and the decoder gives uint8 images at the stored size.

    The numbers (the fast path draws the pipeline's images) are the tiny twin's proof above: the twin has the
    same component classes, scheduler config and conditioning, and its configs differ from SDXL-Turbo's only in
    widths, depths and head counts (and CLIP-L's activation), which change shapes, never which operations run
    (test_generators checks the twin's layout). The GPU bench measures the real architecture's numbers on a GPU
    (`diff_to_diffusers_fp32` of its fast-path rows: against the diffusers engine on the same weights). Running
    them here, at 32 px, cost ~70 s of CPU and 13 GB."""
    import torch

    from gdd_ray.generate.decode import Decoder
    from gdd_ray.generate.engine import FastEngine, PromptTable, latent_shape
    from gdd_ray.generate.model import build_random_sdxl

    big = build_random_sdxl(device="meta")
    prompts = PromptTable(big, [c.prompt("{name}") for c in CLASSES[:2]], "meta", with_negative=False)
    prompts.encode_all()
    pe, _, pooled, _ = prompts.get(1)
    assert (tuple(pe.shape), tuple(pooled.shape)) == ((1, 77, 2048), (1, 1280))
    engine = FastEngine(big, prompts, batch_size=2, resolution=512, device="meta")  # checks the added embedding
    noise = torch.empty(2, *latent_shape(big, 512), device="meta")
    latents = engine.latents(noise, None, 1)
    assert tuple(latents.shape) == (2, 4, 64, 64) and latents.dtype == torch.float32
    decoder = Decoder(big.vae, 512, 32)
    images = decoder.finish(decoder.decode(latents))
    assert tuple(images.shape) == (2, 32, 32, 3) and images.dtype == torch.uint8


def test_image_does_not_depend_on_its_batch_or_padding(tmp_path, pipe):
    unit = WorkUnit(15, 18, 10)  # image 1 of classes 5, 6, 7
    runs = {}
    for b in (1, 2, 4):
        gen = generator(tmp_path / str(b), pipe, engine="fast", batch_size=b)
        rendered = gen.render(unit)
        assert gen.executed_batch_sizes == {b}  # the model only ever sees --batch-size
        assert rendered.executed == -(-3 // b) * b
        runs[b] = rendered.pixels
    assert max_diff(runs[1], runs[2]) <= 1 and max_diff(runs[1], runs[4]) <= 1  # float rounding only
    assert np.array_equal(generator(tmp_path / "again", pipe, engine="fast", batch_size=2).render(unit).pixels, runs[2])


def test_bf16_decoder_is_close_to_fp32(tmp_path, pipe):
    unit = WorkUnit(0, 2, 10)
    full = generator(tmp_path / "a", pipe, vae_dtype="fp32").render(unit).pixels.astype(np.float64)
    gen = generator(tmp_path / "b", pipe, vae_dtype="bf16")
    half = gen.render(unit).pixels.astype(np.float64)
    assert str(gen.decoder.dtype) == "torch.bfloat16" and str(pipe.vae.dtype) == "torch.float32"  # a copy, once
    psnr = 10 * np.log10(255**2 / max(np.mean((full - half) ** 2), 1e-12))
    assert 30 < psnr < 200  # bf16 keeps 8 mantissa bits: close, but not the same pixels (so it is fingerprinted)


def test_tiny_decoder_renders_other_pixels(tmp_path, pipe):
    unit = WorkUnit(2, 4, 10)
    vae = generator(tmp_path / "v", pipe).render(unit).pixels
    gen = generator(tmp_path / "t", pipe, decoder="taesdxl")
    tiny = gen.render(unit).pixels
    assert type(gen.decoder.module).__name__ == "AutoencoderTiny"
    assert tiny.shape == vae.shape == (2, 16, 16, 3) and tiny.std() > 0
    assert not np.array_equal(tiny, vae)  # it changes pixels: it is in OUTPUT_FIELDS
    assert "generate.decoder" in gen_stage.OUTPUT_FIELDS


def test_auto_engine_and_vae_dtype(tmp_path, tiny_model):
    def resolved(**kw):
        return runtime.resolve(tiny_config(tmp_path / "r", **kw))

    assert resolved() == runtime.Runtime("fast", "fp32", "sdxl")  # CPU workers: fp32
    assert resolved(steps=2).engine == "diffusers"
    assert resolved(guidance=2.0).engine == "diffusers"
    assert resolved(engine="diffusers").engine == "diffusers"
    assert resolved(worker_gpus=1).vae_dtype == "bf16"  # GPU workers: bf16 unless asked otherwise
    assert resolved(worker_gpus=1, vae_dtype="fp32").vae_dtype == "fp32"
    inputs = gen_stage.resolved_inputs(tiny_config(tmp_path / "r"))
    # in the fingerprint, as resolved; SDXL (what every earlier run drew) is not named, so their fingerprints hold
    assert inputs == {"generate.engine": "fast", "generate.vae_dtype": "fp32"}


def test_vae_dtype_auto_is_resolved_without_ray(tmp_path, tiny_model, monkeypatch):
    # A GPU image without Ray (jobs/gpu_bench.sh) resolves in process: Ray only where there is a cluster to ask.
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises, as where it is not installed
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runtime.resolve(tiny_config(tmp_path / "r")).vae_dtype == "fp32"  # this machine: no GPU


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(engine="fast", steps=2), "--engine fast is the one-step path without guidance"),
        (dict(engine="fast", guidance=3.0), "--engine fast is the one-step path without guidance"),
        (dict(model="sdxl-random", vae_dtype="fp16"), "--vae-dtype fp16: this vae overflows in fp16"),
    ],
)
def test_invalid_combinations_are_one_clear_line(tmp_path, tiny_model, overrides, message):
    from gdd_ray import pipeline

    with pytest.raises(UserError, match=message) as e:
        pipeline.check(tiny_config(tmp_path / "run", **overrides))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # nothing touched


def test_engine_is_decided_offline_for_sdxl_turbo_and_unreadable_models(tmp_path):
    # The default model's configs are packaged (no hub lookup to fingerprint a run); a model whose configs
    # cannot be read is refused by preflight anyway, and its fingerprint still gets a stable choice.
    assert runtime.resolve(tiny_config(tmp_path / "a", model="stabilityai/sdxl-turbo")).engine == "fast"
    assert runtime.resolve(tiny_config(tmp_path / "b", model="nobody/nothing")).engine == "diffusers"
