"""Other generators on their tiny twins: SD-Turbo (SD 2.1), SD 1.5 and SDXL base next to SDXL-Turbo. Each loads
through the same from_pretrained path, draws through the same stage, reproduces the plain diffusers pipeline
(multi-step, classifier-free guidance with the negatives encoded once per worker), is batch independent, and
is told apart by the engine choice, the fingerprint and a sweep's generation groups."""

import json

import numpy as np
import pytest
from gen_helpers import read_images, tiny_config

from gdd_ray import pipeline, shards, storage, sweep
from gdd_ray.classes import dataset_classes
from gdd_ray.errors import UserError
from gdd_ray.generate import runtime
from gdd_ray.generate import stage as gen_stage
from gdd_ray.generate.engine import latent_shape
from gdd_ray.generate.generator import UnitGenerator
from gdd_ray.generate.model import TINY_MODELS, ensure_tiny_model, load_pipeline
from gdd_ray.plan import WorkUnit, image_seed, plan_units

CLASSES = dataset_classes("cifar10")
# model -> (architecture, the settings its real model is drawn with, scaled down: steps, guidance)
TWINS = {
    "tiny-sd-turbo": ("sd2", dict(steps=1, guidance=0.0)),
    "tiny-sd15": ("sd1", dict(steps=2, guidance=7.5)),
    "tiny-sdxl-base": ("sdxl", dict(steps=2, guidance=5.0)),
}


@pytest.fixture(scope="module")
def pipes(gdd_cache):
    return {name: load_pipeline(name, device="cpu") for name in TWINS}


def config(tmp_path, model, **overrides):
    return tiny_config(tmp_path, model=model, gen_resolution=32, **{"unit_size": 4, **TWINS[model][1], **overrides})


def generator(tmp_path, pipe, model, **overrides) -> UnitGenerator:
    cfg = config(tmp_path / "run", model, **overrides)
    return UnitGenerator(gen_stage.make_job(cfg, CLASSES, "fp-test", str(tmp_path / "gen")), pipeline=pipe)


def reference_pixels(pipe, unit: WorkUnit, steps: int, guidance: float, resolution=32, size=16) -> np.ndarray:
    """The plain pipeline call (prompt strings, its own negatives and noise, its own VAE decode), resized and
    quantised as the generator does."""
    import torch
    import torch.nn.functional as F

    gens = [torch.Generator("cpu").manual_seed(image_seed(0, label, i)) for label, i in unit.images()]
    with torch.inference_mode():
        images = pipe(
            prompt=[CLASSES[label].name for label, _ in unit.images()], num_inference_steps=steps, guidance_scale=guidance,
            height=resolution, width=resolution, generator=gens, output_type="pt",
        ).images  # fmt: skip
    images = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.slow  # the four twins' pipelines (the module's `pipes`): seconds to build and load
def test_twins_have_their_real_models_architecture(pipes):
    sd15, turbo, base = pipes["tiny-sd15"], pipes["tiny-sd-turbo"], pipes["tiny-sdxl-base"]
    for name, pipe in pipes.items():
        files = {p.relative_to(ensure_tiny_model(name)).as_posix() for p in ensure_tiny_model(name).rglob("*")}
        assert "unet/diffusion_pytorch_model.fp16.safetensors" in files  # saved like the real models
        assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size * (
            2 if name == "tiny-sdxl-base" else 1
        )
        assert pipe.vae_scale_factor == 8 and latent_shape(pipe, 64) == (4, 8, 8)
    assert (type(sd15).__name__, type(sd15.scheduler).__name__) == ("StableDiffusionPipeline", "PNDMScheduler")
    assert sd15.text_encoder.config.hidden_act == "quick_gelu" and not sd15.unet.config.use_linear_projection
    assert sd15.tokenizer.pad_token == "<|endoftext|>" and sd15.vae.config.scaling_factor == 0.18215
    assert type(turbo.scheduler).__name__ == "EulerDiscreteScheduler"
    assert turbo.scheduler.config.timestep_spacing == "trailing" and turbo.unet.config.use_linear_projection
    assert turbo.text_encoder.config.hidden_act == "gelu" and turbo.tokenizer.pad_token == "!"
    assert isinstance(turbo.unet.config.attention_head_dim, (list, tuple))
    assert type(base).__name__ == "StableDiffusionXLPipeline" and base.unet.config.addition_embed_type == "text_time"
    assert (type(base.scheduler).__name__, base.scheduler.config.timestep_spacing) == (
        "EulerDiscreteScheduler",
        "leading",
    )


@pytest.mark.slow  # a pipeline call per twin (the engine's own proof on `tiny` is in test-fast)
@pytest.mark.parametrize("model", list(TWINS))
def test_generator_reproduces_the_plain_pipeline(tmp_path, pipes, model):
    gen = generator(tmp_path, pipes[model], model)
    unit = WorkUnit(19, 22, 10)  # classes 9, 0, 1 at batch 2: one full batch of two classes, one padded
    assert gen.job.engine == "diffusers"
    steps, guidance = TWINS[model][1]["steps"], TWINS[model][1]["guidance"]
    ours = gen.render(unit).pixels
    # 1 level of 255: the same float32 operations on the same noise; only the embeddings are encoded in
    # another batch (all classes at once, the negatives alone), which moves a value across a rounding
    # boundary of the uint8 quantisation at most.
    assert max_diff(ours, reference_pixels(pipes[model], unit, steps, guidance)) <= 1
    assert gen.executed_batch_sizes == {2} and not np.array_equal(ours[0], ours[1])


@pytest.mark.slow  # two guided twins' pipelines
@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl-base"])
def test_cfg_negatives_are_encoded_once_per_worker(tmp_path, pipes, model):
    pipe = pipes[model]
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        gen = generator(tmp_path, pipe, model)
        gen.load()
        for unit in (WorkUnit(0, 3, 10), WorkUnit(4, 6, 10)):  # 3 batches, 1 with padding
            gen.render(unit)
    finally:
        hook.remove()
    assert gen.prompts.negative_calls == 1 and gen.prompts.encoder_calls == 1
    assert sorted(calls) == [1, 10]  # one batched call for the 10 classes, one for the empty prompt


@pytest.mark.slow  # five pipeline calls with guidance: ~15 s of CPU
def test_sd15_images_do_not_depend_on_their_batch(tmp_path, pipes):
    unit = WorkUnit(15, 17, 10)  # 2 images: two batches at 1, one at 2, one padded at 4
    runs = {}
    for b in (1, 2, 4):
        gen = generator(tmp_path / str(b), pipes["tiny-sd15"], "tiny-sd15", batch_size=b)
        rendered = gen.render(unit)
        assert gen.executed_batch_sizes == {b} and rendered.executed == -(-2 // b) * b
        runs[b] = rendered.pixels
    assert max_diff(runs[1], runs[2]) <= 1 and max_diff(runs[1], runs[4]) <= 1  # float rounding only
    assert not np.array_equal(runs[1][0], runs[1][1])
    again = generator(tmp_path / "again", pipes["tiny-sd15"], "tiny-sd15", batch_size=4).render(unit).pixels
    assert np.array_equal(again, runs[4])


def test_auto_engine_architecture_and_refusals_per_model(tmp_path, gdd_cache):
    def resolved(model, **kw):
        return runtime.resolve(tiny_config(tmp_path / "r", model=model, **kw))

    assert resolved("tiny") == runtime.Runtime("fast", "fp32", "sdxl")
    # SDXL base at one step is still not the fast path: its scheduler's spacing is leading, not trailing
    assert resolved("tiny-sdxl-base") == runtime.Runtime("diffusers", "fp32", "sdxl")
    assert resolved("tiny-sd-turbo") == runtime.Runtime("diffusers", "fp32", "sd2")
    assert resolved("tiny-sd15", steps=2, guidance=7.5) == runtime.Runtime("diffusers", "fp32", "sd1")
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    refusals = [
        (dict(model=str(flux)), "a FluxPipeline; the generate stage draws with StableDiffusionXLPipeline or"),
        (dict(model="tiny-sd-turbo", engine="fast"), "not the SDXL architecture"),
        (dict(model="tiny-sdxl-base", engine="fast"), "spacing is leading, not trailing"),
        (dict(model="tiny-sd15", decoder="taesdxl"), "--decoder taesdxl decodes SDXL latents"),
    ]
    for overrides, message in refusals:
        with pytest.raises(UserError, match=message) as e:
            pipeline.check(tiny_config(tmp_path / "run", **overrides))
        assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_fingerprint_and_run_record_name_the_model_and_architecture(tmp_path, gdd_cache):
    fps = {m: pipeline.generation_fingerprint(tiny_config(tmp_path / m, model=m), CLASSES) for m in TINY_MODELS}
    assert len(set(fps.values())) == len(TINY_MODELS)
    cfg = config(tmp_path / "run", "tiny-sd15")
    pipeline.check(cfg)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    inputs = record["inputs"]["generate"]
    assert inputs["generate.architecture"] == "sd1" and inputs["generate.engine"] == "diffusers"
    assert (inputs["generate.model"], inputs["generate.steps"], inputs["generate.guidance"]) == ("tiny-sd15", 2, 7.5)


def test_sweep_over_models_makes_one_generation_per_model(tmp_path):
    base = {"dataset": "cifar10", "ipc": 2}
    planned = sweep.plan_sweep(base, {"model": ["tiny", "tiny-sd-turbo"], "eval_seed": [0, 1]}, str(tmp_path))
    groups = {p["group"]: p["generation"]["model"] for p in planned}
    assert len(planned) == 4 and sorted(groups.values()) == ["tiny", "tiny-sd-turbo"]


@pytest.mark.slow
def test_each_architecture_generates_through_the_stage_sd15_on_ray(tmp_path, local_ray):
    """Every twin through the whole stage (plan, shards, manifest); SD 1.5 (multi-step, CFG, one encoder: the
    farthest from SDXL-Turbo, which the other Ray tests draw) on the cluster's actors, the other two in this
    process (serial=True): an actor runs the same UnitGenerator, and starting one costs ~14 s of CPU (imports)."""
    for model in TWINS:
        cfg = config(tmp_path / model, model, ipc=2, unit_size=2)
        summary = gen_stage.run(pipeline.check(cfg), serial=model != "tiny-sd15")
        gen = tmp_path / model / "generated"
        images = read_images(gen)
        assert len(images) == 20 and summary["totals"]["images_made"] == 20
        manifest = json.loads((gen / "_manifest.json").read_text())
        assert manifest["fingerprint"] == summary["fingerprint"] and len(manifest["shards"]) == 10
        specs = [shards.generated_spec(u, summary["fingerprint"]) for u in plan_units(10, 2, 2)]
        check = shards.check_folder(storage.Location(str(gen)), specs)
        assert (len(check.done), check.todo, check.problems) == (10, [], {})  # complete and current
