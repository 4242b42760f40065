"""Tiny random-weight twins of the supported generators, for offline tests and demos (their images are noise).

    tiny            SDXL-Turbo: StableDiffusionXLPipeline, two CLIP encoders + pooled text_time conditioning,
                    EulerAncestral with trailing spacing (one step, no CFG)
    tiny-sdxl-base  SDXL base 1.0: the same architecture, EulerDiscrete with leading spacing (multi-step, CFG)
    tiny-sd-turbo   SD-Turbo (SD 2.1): StableDiffusionPipeline, one OpenCLIP-H-like encoder (gelu, '!' padding),
                    linear projections, per-block head counts, Euler with trailing spacing (one step, no CFG)
    tiny-sd15       SD 1.5: StableDiffusionPipeline, one CLIP-L-like encoder (quick_gelu), conv projections,
                    one head count, PNDM (multi-step, CFG)

Each keeps its real model's component classes, block layout, latent scaling and scheduler config; only widths
and depths are small. Schedulers are the real models' configs as published; tokenizers are the packaged real
CLIP ones (CLIP-L's for SD 1.5, OpenCLIP's for SD 2.1, both for SDXL).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

TINY = "tiny"
TINY_SDXL_BASE = "tiny-sdxl-base"
TINY_SD_TURBO = "tiny-sd-turbo"
TINY_SD15 = "tiny-sd15"
# --model name -> the cache folder's stem (the SDXL-Turbo twin kept its original folder name)
FOLDERS = {TINY: "tiny-sdxl", TINY_SDXL_BASE: "tiny-sdxl-base", TINY_SD_TURBO: "tiny-sd-turbo", TINY_SD15: "tiny-sd15"}
SDXL_TWINS = (TINY, TINY_SDXL_BASE)
# Every twin's UNet: two blocks (one with cross-attention), latents of 4 channels, small widths.
_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
             norm_num_groups=8)  # fmt: skip

_SD_BETAS = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, trained_betas=None,
    clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
)  # fmt: skip
# The schedulers of stabilityai/stable-diffusion-xl-base-1.0, stabilityai/sd-turbo and
# stable-diffusion-v1-5/stable-diffusion-v1-5 (scheduler/scheduler_config.json); SDXL-Turbo's is packaged.
SCHEDULERS = {
    TINY_SDXL_BASE: dict(
        _class_name="EulerDiscreteScheduler", prediction_type="epsilon", timestep_spacing="leading",
        interpolation_type="linear", use_karras_sigmas=False, sample_max_value=1.0, **_SD_BETAS,
    ),
    TINY_SD_TURBO: dict(
        _class_name="EulerDiscreteScheduler", prediction_type="epsilon", timestep_spacing="trailing",
        interpolation_type="linear", use_karras_sigmas=False, **_SD_BETAS,
    ),
    TINY_SD15: dict(_class_name="PNDMScheduler", **_SD_BETAS),
}  # fmt: skip


def tokenizer_dir(name: str) -> Path:
    """The packaged CLIP tokenizers: 'tokenizer' = CLIP ViT-L's, 'tokenizer_2' = OpenCLIP's ('!' padding)."""
    return Path(str(resources.files("gdd_ray").joinpath("data", "sdxl_tokenizer", name)))


def sdxl_config_dir(name: str) -> Path:
    """SDXL-Turbo's own component configs, packaged."""
    return Path(str(resources.files("gdd_ray").joinpath("data", "sdxl_turbo_config", name)))


def scheduler(name: str):
    """The scheduler of a tiny model's real counterpart (SDXL-Turbo's packaged config for `tiny`)."""
    import diffusers

    config = SCHEDULERS.get(name) or diffusers.EulerAncestralDiscreteScheduler.load_config(sdxl_config_dir("scheduler"))
    return getattr(diffusers, config["_class_name"]).from_config(config)


def assemble_sdxl(unet, vae, text_encoder, text_encoder_2, scheduler):
    """A StableDiffusionXLPipeline around given models with the real CLIP tokenizers."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir("tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_dir("tokenizer_2")),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def _text_encoder(hidden: int, act: str, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
        hidden_act=act, projection_dim=hidden,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _vae(scaling_factor: float):
    """Four blocks like the real VAEs, so latents are 1/8 of the image side as in the real models."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=scaling_factor,
        force_upcast=False,
    )


def build_tiny_sdxl(name: str = TINY):
    """SDXL at small widths: the same dual text encoders feeding cross-attention and the pooled `text_time`
    conditioning, linear projections, more transformer layers in the deeper block."""
    from diffusers import UNet2DConditionModel

    hidden = 32
    text_encoder, text_encoder_2 = _text_encoder(hidden, "gelu"), _text_encoder(hidden, "gelu", with_projection=True)
    unet = UNet2DConditionModel(
        **_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=hidden + 6 * 8,  # pooled text (32) + 6 size/crop ids x 8
        cross_attention_dim=2 * hidden,  # both encoders' hidden states, concatenated as in SDXL
    )
    return assemble_sdxl(unet, _vae(0.13025), text_encoder, text_encoder_2, scheduler(name))


def build_tiny_sd(name: str):
    """SD 1.5 or SD 2.1 (SD-Turbo) at small widths: one text encoder, cross-attention in the upper blocks."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    sd2 = name == TINY_SD_TURBO
    # SD 2.1: OpenCLIP-H (gelu, 1024 wide, '!' padding), linear projections, head counts per block (5,10,20,20);
    # SD 1.5: CLIP ViT-L (quick_gelu, 768 wide), 1x1 conv projections, one value (8) for every block.
    hidden = 48 if sd2 else 32
    unet = UNet2DConditionModel(
        **_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        cross_attention_dim=hidden,
    )
    return StableDiffusionPipeline(
        vae=_vae(0.18215),
        text_encoder=_text_encoder(hidden, "gelu" if sd2 else "quick_gelu"),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir("tokenizer_2" if sd2 else "tokenizer")),
        unet=unet,
        scheduler=scheduler(name),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build(name: str, seed: int = 0):
    """The tiny pipeline `name` (one of FOLDERS) with seeded random weights, in fp32 on the CPU."""
    import torch

    torch.manual_seed(seed)
    return build_tiny_sdxl(name) if name in SDXL_TWINS else build_tiny_sd(name)
