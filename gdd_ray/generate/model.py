"""Loading the text-to-image pipeline: SDXL-Turbo for real runs, a tiny random-weight twin for offline ones.

Both go through `load_pipeline`, i.e. `from_pretrained(..., variant="fp16")` with fp16 on CUDA and fp32 on
CPU, so the tests exercise the very code that loads SDXL-Turbo on a GPU node.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import uuid
from importlib import resources
from pathlib import Path

from gdd_ray.errors import UserError

TINY = "tiny"
# The real SDXL-Turbo architecture (packaged configs + real tokenizers) with random weights: for GPU
# throughput benchmarks where the weights cannot be downloaded. Its images are noise.
SDXL_RANDOM = "sdxl-random"
TINY_VERSION = "v1"  # bump when the tiny architecture changes, so old caches are not reused
DEFAULT_MODEL = "stabilityai/sdxl-turbo"


def cache_dir() -> Path:
    return Path(os.environ.get("GDD_RAY_CACHE", Path.home() / ".cache" / "gdd_ray"))


def tiny_model_path() -> Path:
    return cache_dir() / f"tiny-sdxl-{TINY_VERSION}"


def _tokenizer_dir(name: str) -> Path:
    return Path(str(resources.files("gdd_ray").joinpath("data", "sdxl_tokenizer", name)))


def build_tiny_pipeline(seed: int = 0):
    """A random-weight StableDiffusionXLPipeline with the SDXL architecture at small widths.

    Same component classes, the same dual text encoders feeding cross-attention and the pooled
    `text_time` conditioning, the real CLIP tokenizers; only the widths and depths are small.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    hidden = 32
    text_cfg = dict(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=hidden, intermediate_size=64,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
        hidden_act="gelu", projection_dim=hidden,
    )  # fmt: skip
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=hidden + 6 * 8,  # pooled text (32) + 6 size/crop ids x 8
        cross_attention_dim=2 * hidden,  # both encoders' hidden states, concatenated as in SDXL
        norm_num_groups=8,
    )
    # Four blocks like SDXL's VAE, so latents are 1/8 of the image side as in the real model.
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.13025,
        force_upcast=False,
    )
    return _assemble_sdxl(unet, vae, text_encoder, text_encoder_2)


def _config_dir(name: str) -> Path:
    return Path(str(resources.files("gdd_ray").joinpath("data", "sdxl_turbo_config", name)))


def build_random_sdxl(device: str = "cpu", dtype=None):
    """SDXL-Turbo's exact architecture from its public configs, random weights, built on `device`.

    `device="meta"` builds it without memory (to count parameters in tests); on a GPU it is built in
    place in fp16 (no 10 GB fp32 copy on the host).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(_config_dir("unet")))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(_config_dir("vae")))
            te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(_config_dir("text_encoder")))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(_config_dir("text_encoder_2")))
    finally:
        torch.set_default_dtype(previous)
    return _assemble_sdxl(unet, vae, te1, te2)


def _assemble_sdxl(unet, vae, text_encoder, text_encoder_2):
    """A StableDiffusionXLPipeline around given models: SDXL-Turbo's scheduler config and real CLIP tokenizers."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(_tokenizer_dir("tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(_tokenizer_dir("tokenizer_2")),
        unet=unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(
            EulerAncestralDiscreteScheduler.load_config(_config_dir("scheduler"))
        ),
        force_zeros_for_empty_prompt=True,
    )


def ensure_tiny_model() -> Path:
    """Build and save the tiny pipeline once (fp16 variant files, like SDXL-Turbo's); return its folder.

    Saved under a temporary name and renamed, so a crash or a concurrent builder never leaves a half
    model under the final name; the loser of a race simply discards its copy.
    """
    final = tiny_model_path()
    if (final / "model_index.json").exists():
        return final
    import torch

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{uuid.uuid4().hex[:8]}-{final.name}"
    pipe = build_tiny_pipeline()
    pipe.to(torch.float16)
    pipe.save_pretrained(tmp, variant="fp16", safe_serialization=True)
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "model_index.json").exists():
            raise
    return final


def resolve_model(model: str) -> str:
    """Check up front that the model can be loaded and return what to pass to from_pretrained.

    Runs in the driver before anything is written, so a typo or a missing download is one clear line
    instead of every actor failing. Hub ids are looked up in the local cache first, then on the hub.
    """
    if model == TINY:
        return str(ensure_tiny_model())
    if model == SDXL_RANDOM:
        return model
    path = Path(os.path.expanduser(model))
    if path.exists() or model.startswith((".", "/", "~")):
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"--model {model}: not a diffusers pipeline folder (no model_index.json); "
                "give the folder that `huggingface-cli download stabilityai/sdxl-turbo --local-dir DIR` made"
            )
        return str(path.resolve())
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(model, "model_index.json", local_files_only=True)
        return model
    except Exception:
        pass
    reason = _hub_unreachable_reason()
    if reason is None:
        try:
            hf_hub_download(model, "model_index.json", etag_timeout=10)
            return model
        except Exception as e:
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    raise UserError(
        f"--model {model}: cannot load it: not a local folder, not in the Hugging Face cache, and the hub "
        f"did not serve it ({reason}). Download it where there is network (`huggingface-cli download {model}`) "
        "and pass the folder as --model, or use --model tiny for an offline test run"
    )


def is_hub_id(model: str) -> bool:
    """A hub id (`org/name`), not the built-in models nor a local folder."""
    return model not in (TINY, SDXL_RANDOM) and not (
        model.startswith((".", "/", "~")) or Path(os.path.expanduser(model)).exists()
    )


@functools.lru_cache(maxsize=8)  # once per driver: the check and the job see the same commit
def resolve_revision(model: str, revision: str | None) -> str | None:
    """The commit a hub model is loaded at (None for a local folder or a built-in model): asked of the hub
    once, on the driver, or read from the local cache's refs when the hub is offline."""
    if not is_hub_id(model):
        if revision:
            raise UserError(f"--model-revision applies to a hub id; --model {model} is a local or built-in model")
        return None
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    wanted = revision or "main"
    if _hub_unreachable_reason() is None:
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(model, revision=wanted, timeout=10).sha
        except Exception as e:
            why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise UserError(f"--model {model} --model-revision {wanted}: the hub cannot resolve it ({why})") from e
    # The cache's place as huggingface_hub computes it, without importing it here (an import this early
    # would fix its progress-bar settings before the CLI quiets them).
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"))
    ref = Path(cache) / f"models--{model.replace('/', '--')}" / "refs" / wanted
    if ref.is_file() and re.fullmatch(r"[0-9a-f]{40}", ref.read_text().strip()):
        return ref.read_text().strip()
    if revision is None:
        return None  # nothing to pin offline: the model cannot load either, which resolve_model says in one line
    raise UserError(
        f"--model {model}: cannot pin revision '{wanted}' offline (not in the Hugging Face cache {cache}); "
        "pass a 40-character commit as --model-revision, or download the model first"
    )


def _hub_unreachable_reason() -> str | None:
    """A quick look before asking the hub, whose client retries a dead network for half a minute."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        return f"{host} unreachable: {e.strerror or e}"
    return None


def load_pipeline(
    model: str, vae: str | None = None, device: str | None = None, compile: bool = False, revision: str | None = None
):
    """The pipeline for one worker: fp16 on CUDA, fp32 on CPU; progress bars off (they flood actor logs);
    at `revision` (the commit the driver pinned) for a hub model; the watermarker off whatever is installed."""
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, AutoPipelineForText2Image

    diffusers.utils.logging.disable_progress_bar()  # one bar per component per actor floods job logs
    transformers.utils.logging.disable_progress_bar()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if model == SDXL_RANDOM:
        pipe = build_random_sdxl(device, dtype)
    else:
        source = str(ensure_tiny_model()) if model == TINY else model
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(source, dtype=dtype, variant="fp16", revision=revision)
        except (OSError, ValueError) as e:
            if "variant" not in str(e):
                raise
            # A folder saved without fp16 variant files: the same weights under plain names.
            pipe = AutoPipelineForText2Image.from_pretrained(source, dtype=dtype, revision=revision)
    if vae is not None:
        pipe.vae = AutoencoderKL.from_pretrained(vae, dtype=dtype)
        pipe.vae.config.force_upcast = False  # an fp16-safe VAE is the point of swapping it in
    disable_watermark(pipe)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if device.startswith("cuda"):
        # TF32 for whatever still runs in fp32 (SDXL's VAE upcasts itself): same images to the eye, ~8x faster.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        if compile:
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode="max-autotune", fullgraph=True)
    return pipe


def disable_watermark(pipe) -> None:
    """SDXL pipelines add an invisible watermark when the `invisible-watermark` package happens to be
    installed: a full-resolution CPU round trip that changes pixels. Pixels depend on the config only: off."""
    if getattr(pipe, "watermark", None) is not None:
        pipe.watermark = None
