"""Loading CLIP for the select stage: a transformers CLIPModel from the hub or a folder, or a tiny random twin.

Both go through `load_clip`, i.e. `CLIPModel.from_pretrained` + the tokenizer and image-processor config
saved beside it, so the tests exercise the very code that loads openai/clip-vit-base-patch32 on a GPU node.
The tiny model has CLIP's architecture at small widths and the real CLIP tokenizer shipped in the package
(gdd_ray/data/sdxl_tokenizer/tokenizer); its scores are noise, so only the machinery can be tested with it.

Images are preprocessed on the device (resize + centre crop + normalise, batched), not by the per-image
PIL processor: the processor's config (size, mean, std) is read, its code is not run.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gdd_ray.errors import UserError

TINY = "tiny"
TINY_VERSION = "v1"  # bump when the tiny architecture changes, so old caches are not reused
TINY_IMAGE_SIZE = 32
TEXT_LENGTH = 77  # CLIP's context; every prompt is padded to it, so text embeddings have one shape


def tiny_clip_path() -> Path:
    from gdd_ray.generate.model import cache_dir

    return cache_dir() / f"tiny-clip-{TINY_VERSION}"


def build_tiny_clip(seed: int = 0):
    """(CLIPModel, CLIPProcessor): CLIP's architecture at small widths, random weights, the real tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(seed)
    width = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408, max_position_embeddings=TEXT_LENGTH, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407, **width,
        ),
        vision_config=dict(image_size=TINY_IMAGE_SIZE, patch_size=8, **width),
        projection_dim=32,
    )  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(
        str(resources.files("gdd_ray").joinpath("data", "sdxl_tokenizer", "tokenizer"))
    )
    images = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )
    return CLIPModel(config), CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def ensure_tiny_clip() -> Path:
    """Build and save the tiny CLIP once; return its folder (saved under a temporary name, then renamed)."""
    final = tiny_clip_path()
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{uuid.uuid4().hex[:8]}-{final.name}"
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model, processor = build_tiny_clip()
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    # The tokenizer as the real CLIP repos hold it (vocab.json, merges.txt), not save_pretrained's one 3.6 MB
    # tokenizer.json: the same tokens, loaded in ~0.1 s instead of ~0.5 s by every scoring actor.
    (tmp / "tokenizer.json").unlink()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(processor.tokenizer.name_or_path, name), tmp / name)
    try:
        os.rename(tmp, final)
    except OSError:  # another process won the race: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "config.json").exists():
            raise
    return final


def resolve_clip_model(model: str) -> str:
    """What from_pretrained gets: the tiny model's folder, a local folder, or a hub id found in the local
    cache or on the hub. Runs in the driver before anything is written, so a typo is one clear line."""
    if model == TINY:
        return str(ensure_tiny_clip())
    path = Path(os.path.expanduser(model))
    if path.exists() or model.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise UserError(f"--clip-model {model}: not a transformers model folder (no config.json)")
        return str(path.resolve())
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return model
    why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") else None
    if why is None:
        try:
            hf_hub_download(model, "config.json", etag_timeout=10)
            return model
        except Exception as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    raise UserError(
        f"--clip-model {model}: cannot load it: not a local folder, not in the Hugging Face cache, and the hub "
        f"did not serve it ({why}). Download it where there is network (`huggingface-cli download {model}`) and "
        "pass the folder, or use --clip-model tiny for an offline test run"
    )


@dataclass
class Clip:
    """A loaded CLIP: the model (fp32, eval mode, on `device`), its tokenizer and image preprocessing."""

    model: object
    tokenizer: object
    image_size: int
    mean: list[float]
    std: list[float]
    device: str

    def embed_texts(self, texts: list[str], chunk: int = 256):
        """L2-normalised text embeddings, C x D, each prompt padded to CLIP's 77 tokens."""
        import torch

        out = []
        for i in range(0, len(texts), chunk):
            tok = self.tokenizer(
                texts[i : i + chunk], padding="max_length", truncation=True, max_length=TEXT_LENGTH, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                hidden = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
                out.append(self.model.text_projection(hidden.pooler_output))
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)

    def embed_images(self, pixels):
        """L2-normalised image embeddings of a uint8 N x H x W x 3 tensor (already on the device)."""
        import torch
        import torch.nn.functional as F

        x = pixels.permute(0, 3, 1, 2).float() / 255.0
        h, w = x.shape[-2:]
        if (h, w) != (self.image_size, self.image_size):
            # CLIP's processor: shorter side to the model's size (bicubic), then a centre crop.
            scale = self.image_size / min(h, w)
            nh, nw = max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            top, left = (nh - self.image_size) // 2, (nw - self.image_size) // 2
            x = x[..., top : top + self.image_size, left : left + self.image_size]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        with torch.inference_mode():
            pooled = self.model.vision_model(pixel_values=(x - mean) / std).pooler_output
            return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)


def load_clip(source: str, device: str | None = None) -> Clip:
    """CLIP from a resolved hub id or folder, in fp32 (scores decide which images are kept: half precision
    could flip a close call between two machines)."""
    import torch
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    transformers.utils.logging.disable_progress_bar()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = CLIPModel.from_pretrained(source).float().eval().to(device)
    images = AutoImageProcessor.from_pretrained(source)
    crop = images.crop_size
    size = crop["height"] if isinstance(crop, dict) else crop.height  # a dict, or a SizeDict in transformers 5
    return Clip(
        model, AutoTokenizer.from_pretrained(source), size, list(images.image_mean), list(images.image_std), device
    )
