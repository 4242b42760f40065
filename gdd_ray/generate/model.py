"""Loading the text-to-image pipeline: SDXL-Turbo (or SD-Turbo, SD 1.5, SDXL base, ...) for real runs, tiny
random-weight twins of each architecture for offline ones (`tiny`, `tiny-sdxl-base`, `tiny-sd-turbo`,
`tiny-sd15`, see tiny_models).

All go through `load_pipeline`, i.e. `DiffusionPipeline.from_pretrained(..., variant="fp16")` with
fp16 on CUDA and fp32 on CPU, so the tests exercise the very code that loads the real models on a GPU node.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import uuid
from importlib import resources
from pathlib import Path

from gdd_ray.errors import UserError
from gdd_ray.generate import fetch, tiny_models
from gdd_ray.plan import derive_seed

TINY = tiny_models.TINY
TINY_MODELS = tuple(tiny_models.FOLDERS)  # the built-in tiny twins, by --model name
# The real SDXL-Turbo architecture (packaged configs + real tokenizers) with random weights: for GPU
# throughput benchmarks where the weights cannot be downloaded. Its images are noise.
SDXL_RANDOM = "sdxl-random"
# How sdxl-random's weights are drawn (in the generate fingerprint of its runs, so shards of another draw are
# never mixed in): v2 fills each tensor from one seeded pool (fill_seeded); v1 was torch's default init.
SDXL_RANDOM_WEIGHTS = "v2"
FILL_POOL = 1 << 22  # uniform(-1, 1) values drawn per component
FILL_CHUNK = 1024  # each run of this many values of a tensor is copied from a seeded offset into the pool
TINY_VERSION = "v1"  # bump when the tiny architecture changes, so old caches are not reused
DEFAULT_MODEL = "stabilityai/sdxl-turbo"
TAESDXL = "madebyollin/taesdxl"  # the tiny decoder for SDXL latents (AutoencoderTiny)


def cache_dir() -> Path:
    """gdd-ray's cache (tiny models, the compile cache): GDD_RAY_CACHE, checked to be a folder, else ~/.cache/gdd_ray."""
    from gdd_ray import schema

    return schema.env_folder("GDD_RAY_CACHE", Path.home() / ".cache" / "gdd_ray")


def use_compile_cache() -> tuple[str, bool]:
    """Point torch.compile's on-disk caches (Inductor's FX-graph and AOTAutograd caches, its Triton kernels
    under `triton/`) at one folder, kept across runs, before anything compiles; returns (folder, whether it
    already held entries).

    TORCHINDUCTOR_CACHE_DIR when set (the KubeRay manifests point it at the pod's own emptyDir volume), else
    `$GDD_RAY_CACHE/torch-compile` (Inductor's own default is under /tmp, which a container loses when it
    restarts). Later workers of that user or pod (a replacement actor, a resumed run, the next sweep point)
    then load what an earlier one compiled instead of compiling again. Inductor keys every entry by torch
    version, device and graph and writes through temporary files, so concurrent workers share it safely. What
    is cached is loaded as code: the folder must be writable by that user or pod only (never a hostPath shared
    across jobs; docs/security.md)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Inductor writes its /tmp default into the variable the first time it asks (loading a pipeline does):
    # that is not the user's choice.
    if not folder or os.path.abspath(folder) == os.path.abspath(default_cache_dir()):
        folder = str(cache_dir() / "torch-compile")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    warm = os.path.isdir(folder) and any(os.scandir(folder))
    return folder, warm


def tiny_model_path(name: str = TINY) -> Path:
    return cache_dir() / f"{tiny_models.FOLDERS[name]}-{TINY_VERSION}"


def build_random_sdxl(device: str = "cpu", dtype=None, seed: int = 0):
    """SDXL-Turbo's exact architecture from its public configs, random weights, built on `device`.

    Seeded per component (fill_seeded), so every worker of a run builds the same weights.
    `device="meta"` builds it without memory (to count parameters in tests); on a GPU it is built in
    place in fp16 (no 10 GB fp32 copy on the host).
    """
    import torch

    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    components = (random_sdxl_component(name, device, dtype, seed) for name in names)
    return tiny_models.assemble_sdxl(*components, tiny_models.scheduler(TINY))


def random_sdxl_component(name: str, device: str = "cpu", dtype=None, seed: int = 0):
    """One SDXL-Turbo component from its packaged config with seeded random weights (fill_seeded): the same
    weights on every worker, whatever was built before. Built without initialising anything (torch's default
    init of 3.5 billion parameters took ~45 s of CPU), then filled once."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config_dir = tiny_models.sdxl_config_dir
    build = {
        "unet": lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir("unet"))),
        "vae": lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir("vae"))),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir("text_encoder"))),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(config_dir("text_encoder_2"))
        ),
    }[name]
    dtype = dtype or torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # Parameters on the meta device (no memory, no init), buffers (CLIP's position ids) real on `device`.
        # .to(dtype): transformers builds some CLIP layers (text_encoder_2's projection) in the config's own
        # dtype (fp16 in SDXL-Turbo's), whatever the default; a no-op for what is already in dtype.
        with torch.device(device), init_empty_weights(include_buffers=str(device) == "meta"):
            module = build().to(dtype)
    finally:
        torch.set_default_dtype(previous)
    if str(device) != "meta":
        fill_seeded(module, derive_seed("sdxl-random", seed, name), device)
    return module


def fill_seeded(module, seed: int, device) -> None:
    """Give `module`'s parameters (on the meta device) memory on `device` and values from one seeded CPU
    generator, in parameter order: a pool of FILL_POOL uniform(-1, 1) values, then each tensor as runs of
    FILL_CHUNK values copied from seeded offsets into the pool (~1 ns a value: a copy, not a draw), scaled by
    1/sqrt(fan_in) as torch's default init of a Linear or Conv is; norms' scales 1 and biases 0 (1-D
    tensors). The same values on every device (fp32; a lower dtype rounds them); random enough for
    throughput benchmarks and tests, whose images are noise anyway."""
    import torch

    buffers = {k: b.clone() for k, b in module.named_buffers()}
    module.to_empty(device=device)  # also empties the buffers: put back below
    gen = torch.Generator("cpu").manual_seed(seed)
    pool = torch.rand(FILL_POOL, generator=gen) * 2 - 1
    windows: dict = {}  # dtype -> the pool's overlapping runs of FILL_CHUNK on the device, in that dtype
    with torch.no_grad():
        for k, b in buffers.items():
            module.get_buffer(k).copy_(b)
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            if p.dtype not in windows:
                windows[p.dtype] = pool.to(device=p.device, dtype=p.dtype).unfold(0, FILL_CHUNK, 1)
            runs, flat = windows[p.dtype], p.view(-1)
            whole, tail = divmod(flat.numel(), FILL_CHUNK)
            offsets = torch.randint(0, runs.shape[0], (whole + 1,), generator=gen).to(p.device)
            torch.index_select(runs, 0, offsets[:whole], out=flat[: whole * FILL_CHUNK].view(whole, FILL_CHUNK))
            flat[whole * FILL_CHUNK :].copy_(runs[offsets[whole], :tail])
            p.mul_(p[0].numel() ** -0.5)


def ensure_tiny_model(name: str = TINY) -> Path:
    """Build and save a tiny pipeline once (fp16 variant files, like the real models'); return its folder."""

    def save(tmp: Path) -> None:
        import diffusers
        import torch
        import transformers

        # Built inside commands that may still refuse with one line (the engine is decided from its configs):
        # no progress bars or warnings on stderr.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        pipe = tiny_models.build(name)
        cast_quietly(pipe, torch.float16)
        pipe.save_pretrained(tmp, variant="fp16", safe_serialization=True)
        # Each tokenizer as the real models' hub folders hold it (vocab.json, merges.txt: the packaged copies it
        # was loaded from), not as save_pretrained writes it (one 3.6 MB tokenizer.json): the same tokens, and
        # loading it takes ~0.1 s instead of ~0.5 s, in every process that loads the model (each actor).
        for component in ("tokenizer", "tokenizer_2"):
            tokenizer = getattr(pipe, component, None)
            if tokenizer is not None:
                shutil.rmtree(tmp / component)
                shutil.copytree(tokenizer.name_or_path, tmp / component)

    return _save_once(tiny_model_path(name), "model_index.json", save)


def cast_quietly(module, dtype):
    """`module.to(dtype)` without diffusers' warning about modules to keep in float32: it names an empty list
    for these models, and a stray stderr line breaks the one-line errors of commands that build the tiny model."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return module.to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def build_tiny_taesd(seed: int = 0):
    """A random-weight AutoencoderTiny (taesdxl's class and interface) at small widths, for the tiny model."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(derive_seed("tiny-taesd", seed))
    # Four blocks: latents are 1/8 of the image side, as with the tiny VAE and the real taesdxl.
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )


def ensure_tiny_taesd() -> Path:
    """The tiny AutoencoderTiny saved once, so `--decoder taesdxl` loads through `from_pretrained` in tests too."""
    return _save_once(
        cache_dir() / f"tiny-taesdxl-{TINY_VERSION}",
        "config.json",
        lambda tmp: build_tiny_taesd().save_pretrained(tmp, safe_serialization=True),
    )


def _save_once(final: Path, marker: str, save) -> Path:
    """`save(tmp)` once into a temporary folder renamed to `final`, so a crash or a concurrent builder never
    leaves a half model under the final name; the loser of a race simply discards its copy."""
    if (final / marker).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{uuid.uuid4().hex[:8]}-{final.name}"
    save(tmp)
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / marker).exists():
            raise
    return final


def resolve_model(model: str) -> str:
    """Check up front that the model can be loaded and return what to pass to from_pretrained.

    Runs in the driver before anything is written, so a typo or a missing download is one clear line
    instead of every actor failing. Hub ids are looked up in the local cache first, then on the hub.
    """
    if model in TINY_MODELS:
        return str(ensure_tiny_model(model))
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
    _hub_file(model, "model_index.json", "--model")
    return model


def read_model_json(model: str, filename: str, flag: str = "--model") -> dict:
    """A config file of a model (`unet/config.json`, ...) without loading it: from the packaged configs
    (sdxl-random), a folder, the Hugging Face cache or the hub. `model` as resolve_model returns it."""
    if model in (SDXL_RANDOM, DEFAULT_MODEL):
        # The packaged configs are SDXL-Turbo's own: deciding the engine needs no download or network.
        base = Path(str(resources.files("gdd_ray").joinpath("data", "sdxl_turbo_config")))
        return json.loads((base / filename).read_text())
    path = Path(model)
    if path.is_dir():
        try:
            return json.loads((path / filename).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{flag} {model}: cannot read {filename} ({e})") from e
    return json.loads(Path(_hub_file(model, filename, flag)).read_text())


def _hub_file(repo: str, filename: str, flag: str) -> str:
    """A file of a hub repository: from the local cache, else from the hub; one clear line when neither has it."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, local_files_only=True)
    except Exception:
        pass
    reason = _hub_unreachable_reason()
    if reason is None:
        try:
            from gdd_ray.reach import timeout_s

            return hf_hub_download(repo, filename, etag_timeout=timeout_s())
        except Exception as e:
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    raise UserError(
        f"{flag} {repo}: cannot load it: not a local folder, not in the Hugging Face cache, and the hub "
        f"did not serve {filename} ({reason}). Download it where there is network (`huggingface-cli download {repo}`) "
        "and pass the folder, or use --model tiny for an offline test run"
    )


def is_hub_id(model: str) -> bool:
    """A hub id (`org/name`), not the built-in models nor a local folder."""
    return model not in (*TINY_MODELS, SDXL_RANDOM) and not (
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

            from gdd_ray.reach import timeout_s

            return HfApi().model_info(model, revision=wanted, timeout=timeout_s()).sha
        except Exception as e:
            why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise UserError(f"--model {model} --model-revision {wanted}: the hub cannot resolve it ({why})") from e
    ref = fetch.repo_folder(model) / "refs" / wanted
    if ref.is_file() and re.fullmatch(r"[0-9a-f]{40}", ref.read_text().strip()):
        return ref.read_text().strip()
    if revision is None:
        return None  # nothing to pin offline: the model cannot load either, which resolve_model says in one line
    raise UserError(
        f"--model {model}: cannot pin revision '{wanted}' offline (not in the Hugging Face cache {fetch.hub_cache()}); "
        "pass a 40-character commit as --model-revision, or download the model first"
    )


def _hub_unreachable_reason() -> str | None:
    """A quick look before asking the hub, whose client retries a dead network for half a minute: the endpoint
    (HF_ENDPOINT, else huggingface.co) must answer within GDD_RAY_TIMEOUT_S (reach.check_http)."""
    from gdd_ray import reach, schema

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"
    try:
        reach.check_http(schema.endpoint_url(endpoint, "HF_ENDPOINT", "https"), "the hub")
    except UserError as e:
        return str(e)
    return None


def decoder_source(model: str, decoder: str, vae: str | None) -> str:
    """What to load as the image decoder: the model itself ('vae', or --vae), or the tiny decoder that
    matches it (a tiny random one for the tiny model, taesdxl's architecture with random weights for
    sdxl-random, madebyollin/taesdxl otherwise). `model` as resolve_model returns it."""
    if decoder == "vae":
        return vae or model
    if model == SDXL_RANDOM:
        return SDXL_RANDOM
    if any(Path(model) == tiny_model_path(name) for name in tiny_models.SDXL_TWINS):
        return str(ensure_tiny_taesd())
    return TAESDXL


def decoder_config(model: str, decoder: str, vae: str | None) -> dict:
    """The decoder's config (for force_upcast: whether it is safe in fp16), read without loading it."""
    source = decoder_source(model, decoder, vae)
    if decoder == "taesdxl":
        return {"force_upcast": False} if source == SDXL_RANDOM else read_model_json(source, "config.json", "--decoder")
    if vae is not None:
        return read_model_json(vae, "config.json", "--vae")
    return read_model_json(model, "vae/config.json")


def load_pipeline(
    model: str, vae: str | None = None, device: str | None = None, vae_dtype=None, revision: str | None = None
):
    """The pipeline for one worker: fp16 on CUDA, fp32 on CPU, the VAE in `vae_dtype` (a torch dtype; None =
    as loaded) once and for all; progress bars off (they flood actor logs); at `revision` (the commit the
    driver pinned) for a hub model, from this node's snapshot with the hub offline; the watermarker off
    whatever is installed."""
    # DiffusionPipeline builds the class model_index.json names, which preflight allows only when it is
    # StableDiffusionXLPipeline or StableDiffusionPipeline: the text-to-image pipelines themselves, as
    # AutoPipelineForText2Image would map them, without importing its table of every pipeline (1.4 s of
    # every actor's start, measured).
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, DiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()  # one bar per component per actor floods job logs
    transformers.utils.logging.disable_progress_bar()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if model == SDXL_RANDOM:
        pipe = build_random_sdxl(device, dtype)
    else:
        source = str(ensure_tiny_model(model)) if model in TINY_MODELS else model
        offline = {}
        if revision is not None:
            # The pinned snapshot as the driver's task fetched it onto this node (fetch.py), loaded offline.
            source, offline = fetch.ensure_snapshot(model, revision), {"local_files_only": True}
        try:
            pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, variant="fp16", **offline)
        except (OSError, ValueError) as e:
            if "variant" not in str(e):
                raise
            # A folder saved without fp16 variant files: the same weights under plain names.
            pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, **offline)
    if getattr(pipe, "safety_checker", None) is not None:
        # SD 1.x's NSFW classifier: it only ever sees decoded images, which the workers decode themselves.
        pipe.safety_checker = None
    if vae is not None:
        pipe.vae = AutoencoderKL.from_pretrained(vae, dtype=dtype)
    if vae_dtype is not None:
        cast_quietly(pipe.vae, vae_dtype)  # once here, never per call (the pipeline's own upcast casts on every call)
    disable_watermark(pipe)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if device.startswith("cuda"):
        # TF32 for whatever still runs in fp32 (an fp32 VAE): same images to the eye, ~8x faster.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # static shapes: each conv's fastest algorithm is found once
    # No memory layout is forced: whether channels_last pays is a per-device, per-component measurement
    # (CUDA's GroupNorm, all through the VAE, has no channels_last kernel); see tuning and jobs/gpu_bench.sh.
    return pipe


def load_tiny_decoder(model: str, vae: str | None, device: str, dtype):
    """The AutoencoderTiny for `--decoder taesdxl` (see decoder_source), on `device` in `dtype`."""
    import torch
    from diffusers import AutoencoderTiny

    source = decoder_source(model, "taesdxl", vae)
    if source == SDXL_RANDOM:
        torch.manual_seed(derive_seed("sdxl-random", 0, "taesdxl"))
        decoder = AutoencoderTiny()  # diffusers' defaults are taesd's architecture
    else:
        decoder = AutoencoderTiny.from_pretrained(source, dtype=dtype)
    decoder.to(device=device, dtype=dtype)
    return decoder


def disable_watermark(pipe) -> None:
    """SDXL pipelines add an invisible watermark when the `invisible-watermark` package happens to be
    installed: a full-resolution CPU round trip that changes pixels. Pixels depend on the config only: off."""
    if getattr(pipe, "watermark", None) is not None:
        pipe.watermark = None
