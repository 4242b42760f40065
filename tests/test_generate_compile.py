"""torch.compile on the CPU backend with a one-block SDXL twin: the compiled fast path compiles once at load (in
the node's compile cache), never recompiles (a short last unit is padded to the full batch), and draws the
same images as the eager path within float rounding."""

import numpy as np
import pytest
import torch
import torch._inductor.config as inductor_config
from gen_helpers import tiny_config
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from gdd_ray.classes import dataset_classes
from gdd_ray.generate import stage as gen_stage
from gdd_ray.generate import tuning
from gdd_ray.generate.generator import UnitGenerator
from gdd_ray.generate.model import load_pipeline, use_compile_cache
from gdd_ray.plan import WorkUnit

CLASSES = dataset_classes("cifar10")


def test_compile_cache_is_the_users_or_one_kept_per_node(tmp_path, monkeypatch):
    monkeypatch.setenv("GDD_RAY_CACHE", str(tmp_path / "gdd"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert use_compile_cache() == (str(tmp_path / "gdd" / "torch-compile"), False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # Inductor's /tmp default, not a choice
    assert use_compile_cache()[0] == str(tmp_path / "gdd" / "torch-compile")
    mine = tmp_path / "volume"
    (mine / "fxgraph").mkdir(parents=True)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(mine))  # e.g. the manifests' node-local volume
    assert use_compile_cache() == (str(mine), True)


# Scalar C++ kernels: Inductor compiles each kernel with g++ (~33 for the one-block twin's three graphs), and
# vectorised ones (at::vec templates) cost ~30 % more to compile. What these tests prove is torch.compile's use
# by the fast path (one graph each, no graph break, no recompile, the node's cache, the eager images within
# rounding), which is the same whatever Inductor's own code generation chooses.
INDUCTOR = {"cpp.simdlen": 1}


def one_block_sdxl():
    """The tiny SDXL twin (its text encoders, tokenizers and scheduler) with a UNet and a VAE of one block each.

    On the CPU backend every distinct fused op of a graph is a C++ kernel that g++ compiles (~0.8 s of CPU
    each): the twin's two-level UNet, mid block and four-level VAE made 66 of them and ~130 s of CPU for the
    `model` scope alone. One level keeps what the compile scopes touch (the fast path's one-step denoise with
    SDXL's text_time conditioning through cross-attention, the VAE decode, ResnetBlock2D and
    BasicTransformerBlock for `blocks`) at about half the kernels. The images are noise either way."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from gdd_ray.generate import tiny_models

    tiny = load_pipeline("tiny", device="cpu")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32,), layers_per_block=1, in_channels=4, out_channels=4, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None,
        attention_head_dim=2, use_linear_projection=True, transformer_layers_per_block=1,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=tiny.unet.config.projection_class_embeddings_input_dim,
        cross_attention_dim=tiny.unet.config.cross_attention_dim,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        scaling_factor=tiny.vae.config.scaling_factor, force_upcast=False,
    )  # fmt: skip
    return tiny_models.assemble_sdxl(unet, vae, tiny.text_encoder, tiny.text_encoder_2, tiny.scheduler)


class CompileCase:
    """The one-block twin and the eager images of two units: 2 full batches of 4 classes, then a run's short last
    unit of 3 (padded); made once for the module's tests. Each test compiles into a cold compile cache of its
    own, with fullgraph=True, so a graph break anywhere fails the compile (and the test), never a silent eager
    fall back."""

    units = [WorkUnit(0, 8, 10), WorkUnit(8, 11, 10)]

    def __init__(self, tmp_path):
        self.tmp_path, self.pipe = tmp_path, one_block_sdxl()
        self.want = [self.generator(False).render(u).pixels for u in self.units]

    def cold(self, tmp_path, monkeypatch) -> None:
        """This test's own cold compile cache, and fresh Dynamo counters."""
        self.tmp_path = tmp_path
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # as Inductor sets it when first asked
        monkeypatch.setenv("GDD_RAY_CACHE", str(tmp_path / "cache"))  # a cold compile cache under it
        torch._dynamo.utils.counters.clear()

    def generator(self, compile: bool, scope: str = "model") -> UnitGenerator:
        cfg = tiny_config(self.tmp_path / f"{compile}-{scope}", engine="fast", batch_size=4, unit_size=8,
                          gen_resolution=32, image_size=16, compile=compile, compile_scope=scope)  # fmt: skip
        job = gen_stage.make_job(cfg, CLASSES, "fp-test", str(self.tmp_path / "run" / "generated"))
        return UnitGenerator(job, pipeline=self.pipe)

    def check(self, gen: UnitGenerator) -> None:
        """No recompile over both units, the model only ever sees the batch size, the eager images."""
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = [gen.render(u).pixels for u in self.units]
        assert gen.executed_batch_sizes == {4}
        for pixels, ref in zip(got, self.want):
            diff = np.abs(pixels.astype(int) - ref.astype(int))
            # Inductor fuses and reorders float32 ops: a value may cross a quantisation boundary, by 1-2 levels.
            assert diff.max() <= 2 and diff.mean() < 0.05, (gen.job.config.compile_scope, diff.max(), diff.mean())
        assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


@pytest.fixture(scope="module")
def shared_case(tiny_model, tmp_path_factory):
    with inductor_config.patch(INDUCTOR):
        yield CompileCase(tmp_path_factory.mktemp("eager"))


@pytest.fixture
def case(shared_case, tmp_path, monkeypatch):
    shared_case.cold(tmp_path, monkeypatch)
    return shared_case


@pytest.mark.slow
def test_compiled_fast_path_compiles_once_into_the_node_cache(case, tmp_path):
    """Scope `model`: the whole denoise step and the decoder, compiled at load into the node's cache."""
    compiled = case.generator(True)
    compiled.load()
    assert compiled.compile_mode == "default" and compiled.startup["compile_s"] > 0
    cache = tmp_path / "cache" / "torch-compile"
    assert compiled.startup["compile_cache"] == str(cache) and compiled.startup["compile_cache_warm"] is False
    assert any(cache.rglob("*")), "nothing was written to the compile cache"
    case.check(compiled)


@pytest.mark.slow
def test_compiled_blocks_draw_the_eager_images(case):
    """Scope `blocks`: each repeated block of the UNet and decoder compiled in place (undone after)."""
    blocks = case.generator(True, "blocks")
    try:
        blocks.load()  # compiles the shared pipeline's blocks in place: undone below
        compiled_blocks = [m for m in case.pipe.unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        assert blocks.compile_mode == "default"
        assert {type(m).__name__ for m in compiled_blocks} == {"ResnetBlock2D", "BasicTransformerBlock"}
        case.check(blocks)
    finally:
        tuning.uncompile_blocks(case.pipe.unet)
        tuning.uncompile_blocks(case.pipe.vae)
