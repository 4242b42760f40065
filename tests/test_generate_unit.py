"""The per-unit generator on the tiny SDXL-architecture pipeline, loaded through the real from_pretrained path."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from gen_helpers import tiny_config
from PIL import Image

from gdd_ray import shards
from gdd_ray.classes import dataset_classes
from gdd_ray.generate.generator import PREFETCH_LIMIT, UnitGenerator
from gdd_ray.generate.model import load_pipeline
from gdd_ray.generate.stage import make_job
from gdd_ray.plan import WorkUnit, image_seed


def make_generator(tmp_path, pipeline=None, **overrides):
    cfg = tiny_config(tmp_path / "run", **overrides)
    classes = dataset_classes("cifar10")
    job = make_job(cfg, classes, "fp-test", str(tmp_path / "run" / "generated"))
    return UnitGenerator(job, pipeline=pipeline), job


def test_tiny_model_saved_with_fp16_variant_and_loaded_by_the_real_path(tiny_model):
    files = {p.relative_to(tiny_model).as_posix() for p in tiny_model.rglob("*") if p.is_file()}
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in files
    assert "text_encoder_2/model.fp16.safetensors" in files
    pipe = load_pipeline("tiny", device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.unet.dtype.is_floating_point and str(pipe.unet.dtype) == "torch.float32"  # fp32 on CPU
    ids = pipe.tokenizer("aquarium fish").input_ids  # the real CLIP vocabulary, offline
    assert len(pipe.tokenizer) == 49408 and ids[0] == 49406 and ids[-1] == 49407
    assert pipe.tokenizer.decode(ids[1:-1]) == "aquarium fish"


def test_unit_shard_content(tmp_path, tiny_model):
    gen, spec = make_generator(tmp_path)
    unit = WorkUnit(start=19, stop=22, classes=10)  # image 1 of class 9, image 2 of classes 0 and 1
    result = gen.run(unit)
    assert result.images == 3
    path = tmp_path / "run" / "generated" / unit.shard_name
    t = pq.read_table(path)
    assert t.schema.names == ["image", "label", "class_id", "class_name", "prompt", "seed", "index"]
    assert t["label"].to_pylist() == [9, 0, 1] and t["index"].to_pylist() == [1, 2, 2]
    assert t["class_name"].to_pylist() == ["truck", "airplane", "automobile"]
    assert t["prompt"].to_pylist() == ["truck", "airplane", "automobile"]  # each image its own class's prompt
    assert t["seed"].to_pylist() == [image_seed(spec.seed, c, i) for c, i in ((9, 1), (0, 2), (1, 2))]
    img = Image.open(io.BytesIO(t["image"].to_pylist()[0]["bytes"]))
    assert img.format == "PNG" and img.size == (16, 16) and img.mode == "RGB"
    meta = pq.read_metadata(path).metadata
    assert meta[b"gdd_ray.fingerprint"] == b"fp-test"
    assert shards.shard_problem(pq.read_metadata(path), shards.generated_spec(unit, "fp-test")) is None
    assert "short" in shards.shard_problem(
        pq.read_metadata(path), shards.generated_spec(WorkUnit(19, 23, 10), "fp-test")
    )
    assert shards.shard_problem(pq.read_metadata(path), shards.generated_spec(unit, "other")) == "another fingerprint"
    assert [p.name for p in (tmp_path / "run" / "generated").iterdir()] == [unit.shard_name]  # no temporary


def test_same_unit_same_pixels_regardless_of_batching(tmp_path, tiny_model):
    pipe = load_pipeline("tiny", device="cpu")
    a, _ = make_generator(tmp_path / "a", pipeline=pipe, batch_size=4, unit_size=4)
    b, _ = make_generator(tmp_path / "b", pipeline=pipe, batch_size=1)
    unit = WorkUnit(8, 12, 10)  # classes 8, 9, 0, 1: a batch of 4 holds four classes
    pa_, pb = a.render(unit).pixels, b.render(unit).pixels
    assert pa_.shape == (4, 16, 16, 3) and pa_.dtype == np.uint8
    assert np.abs(pa_.astype(int) - pb.astype(int)).max() <= 1  # batch only changes float rounding
    assert not np.array_equal(pa_[0], pa_[1])  # different seeds, different images
    again = a.render(unit).pixels
    assert np.array_equal(pa_, again)  # same unit, same worker setup: identical
    # The driver prefetches a queued unit's first noise; the render then draws nothing and the pixels are the same.
    draws = []
    noise = a._noise
    a._noise = lambda *args: draws.append(args[0]) or noise(*args)
    a.prefetch(unit)
    assert np.array_equal(a.render(unit).pixels, pa_) and len(draws) == 1 and not a._prefetched
    for k in range(PREFETCH_LIMIT + 3):  # prefetched and never rendered (a budget's end): held within a bound
        a.prefetch(WorkUnit(40 + 4 * k, 44 + 4 * k, 10))
    assert len(a._prefetched) == PREFETCH_LIMIT


def test_prompt_embeddings_encoded_batched_once_at_load(tmp_path, tiny_model):
    gen, _ = make_generator(tmp_path)
    pipe = load_pipeline("tiny", device="cpu")
    calls = []
    original = pipe.encode_prompt
    pipe.encode_prompt = lambda *a, **k: calls.append(a[0]) or original(*a, **k)
    gen.pipeline = pipe
    gen.load()
    assert calls == [[c.name for c in dataset_classes("cifar10")]]  # one batched call for all 10 classes
    gen.render(WorkUnit(0, 2, 10))
    gen.render(WorkUnit(4, 5, 10))
    assert len(calls) == 1  # renders never encode a prompt
    assert gen.startup["text_encode_s"] >= 0 and gen.prompts.encoder_calls == 1


def test_batches_are_full_batch_size_and_padded(tmp_path):
    gen, _ = make_generator(tmp_path, batch_size=16, unit_size=32)
    assert [len(r) for r in gen.batches(WorkUnit(0, 20, 10))] == [16, 4]  # the 4 run padded to 16
    assert [len(r) for r in gen.batches(WorkUnit(20, 36, 10))] == [16]
    assert [list(r) for r in gen.batches(WorkUnit(0, 3, 10))] == [[0, 1, 2]]
    assert gen.prompt_rows(WorkUnit(0, 20, 10), range(16, 20), [0] * 4) == (6, 7, 8, 9) + (6,) * 12  # padded


@pytest.mark.slow
def test_random_sdxl_has_the_real_architecture():
    from gdd_ray.generate.model import build_random_sdxl

    pipe = build_random_sdxl("meta")  # no memory: parameters only
    counts = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("unet", "vae", "text_encoder_2")}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder_2": 694_659_840}


@pytest.mark.slow
def test_random_sdxl_weights_are_the_same_on_every_build():
    import torch

    from gdd_ray.generate.model import random_sdxl_component

    torch.manual_seed(123)  # whatever the global RNG did before: each component seeds itself
    a = random_sdxl_component("vae")
    torch.rand(1000)
    b = random_sdxl_component("vae")
    c = random_sdxl_component("vae", seed=1)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)  # every worker of a run builds the same model
    assert not torch.equal(pa["decoder.conv_in.weight"], pc["decoder.conv_in.weight"])


def test_random_sdxl_weights_are_fingerprinted(tmp_path, tiny_model):
    """How sdxl-random's weights are drawn is in its runs' fingerprint: shards of another draw are never mixed in."""
    from gdd_ray.generate.model import SDXL_RANDOM_WEIGHTS
    from gdd_ray.generate.stage import resolved_inputs

    random = resolved_inputs(tiny_config(tmp_path / "r", model="sdxl-random"))
    assert random["random_weights"] == SDXL_RANDOM_WEIGHTS
    assert "random_weights" not in resolved_inputs(tiny_config(tmp_path / "t"))  # other models: as before
