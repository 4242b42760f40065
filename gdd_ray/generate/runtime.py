"""What the generate workers will run, made concrete by the driver before the fingerprint is computed.

    engine     auto -> 'fast' where the one-step SDXL path applies (decided from the model's config files,
               by the same check the worker repeats on the loaded pipeline), else 'diffusers'
    vae_dtype  auto -> 'bf16' when the workers have GPUs, else 'fp32' (see `workers_have_gpus`)
    architecture  the model's family as its config files say (sdxl, sd2, sd1, or the pipeline class): it
               follows from the model, and is recorded so that run.json says what drew the images (not
               for sdxl, so runs made before other families existed keep their fingerprints)

The first two change pixels, so the resolved values are part of the generate fingerprint and of run.json. A run
keeps the choices it was created with: when OUT/run.json was made with the same request (`auto`) and the
same model, VAE, steps, guidance and decoder, its resolved values are reused instead of looking at the
hardware again. So a run started on GPUs and resumed elsewhere, or whose later stages run on a laptop,
keeps one fingerprint and never mixes shards of two precisions; `--overwrite` resolves afresh.
"""

from __future__ import annotations

from dataclasses import dataclass

from gdd_ray.config import RunConfig
from gdd_ray.errors import UserError
from gdd_ray.generate import model as models
from gdd_ray.generate.engine import SDXL_PIPELINE, fast_path_problem
from gdd_ray.run import RunDir

# Generate fields that, when unchanged since run.json was written, let a run reuse its resolved values.
DECIDING = ("model", "vae", "steps", "guidance", "decoder", "engine", "vae_dtype")
SD_PIPELINE = "StableDiffusionPipeline"
# The pipelines whose text embeddings and latents the engines know how to pass (SD 1.x/2.x, SDXL).
SUPPORTED_PIPELINES = (SDXL_PIPELINE, SD_PIPELINE)


@dataclass(frozen=True)
class Runtime:
    engine: str  # fast | diffusers
    vae_dtype: str  # fp32 | bf16 | fp16
    architecture: str = "unknown"  # sdxl | sd2 | sd1 | another pipeline class | unknown (configs unreadable)

    def inputs(self) -> dict[str, str]:
        """What goes into the fingerprint and run.json (named like the flags, so a refusal names the flag)."""
        chosen = {"generate.engine": self.engine, "generate.vae_dtype": self.vae_dtype}
        # SDXL is what every run drew before other families existed: left out, so those runs keep their
        # fingerprints (the model names it anyway); any other family is named.
        if self.architecture != "sdxl":
            chosen["generate.architecture"] = self.architecture
        return chosen

    @classmethod
    def from_inputs(cls, inputs: dict) -> Runtime:
        """The choices as the fingerprint holds them (the stage's resolved inputs)."""
        return cls(inputs["generate.engine"], inputs["generate.vae_dtype"], inputs.get("generate.architecture", "sdxl"))


def resolve(cfg: RunConfig) -> Runtime:
    g = cfg.generate
    stored = {} if cfg.overwrite else _stored_choices(cfg)
    engine = g.engine if g.engine != "auto" else stored.get("generate.engine") or auto_engine(cfg)
    vae_dtype = g.vae_dtype if g.vae_dtype != "auto" else stored.get("generate.vae_dtype") or auto_vae_dtype(cfg)
    return Runtime(engine, vae_dtype, stored.get("generate.architecture") or model_architecture(cfg))


def _stored_choices(cfg: RunConfig) -> dict[str, str]:
    try:
        record = RunDir(cfg.out).read_record()
    except UserError:  # an unreadable run.json is reported by the run's own checks
        return {}
    if not record or not record.get("config"):
        return {}
    try:
        old = RunConfig.from_dict(record["config"]).generate
    except UserError:  # a damaged config decides nothing: this run resolves its own choices
        return {}
    if any(getattr(old, f) != getattr(cfg.generate, f) for f in DECIDING):
        return {}
    return (record.get("inputs") or {}).get("generate") or {}


def _model_source(cfg: RunConfig) -> str:
    model = cfg.generate.model
    # SDXL-Turbo's configs are packaged: no hub lookup (which could not be made offline) just to read them.
    return model if model in (models.SDXL_RANDOM, models.DEFAULT_MODEL) else models.resolve_model(model)


def pipeline_class(cfg: RunConfig) -> str:
    """The model's pipeline class (model_index.json), read without loading it."""
    return models.read_model_json(_model_source(cfg), "model_index.json").get("_class_name", "?")


def model_facts(cfg: RunConfig) -> tuple[str, dict, dict]:
    """(pipeline class, scheduler config, UNet config) of the run's model, read from its config files."""
    source = _model_source(cfg)
    scheduler = models.read_model_json(source, "scheduler/scheduler_config.json")
    unet = models.read_model_json(source, "unet/config.json")
    return pipeline_class(cfg), scheduler, unet


def architecture(pipeline_class: str, unet_config: dict) -> str:
    """The model family from its configs: 'sdxl' (SDXL-Turbo, SDXL base, any SDXL checkpoint), 'sd2' (SD 2.x,
    SD-Turbo: linear projections in the transformer blocks), 'sd1' (SD 1.x: 1x1 convolutions), else the
    pipeline class itself."""
    if pipeline_class == SDXL_PIPELINE:
        return "sdxl"
    if pipeline_class == SD_PIPELINE:
        return "sd2" if unet_config.get("use_linear_projection") else "sd1"
    return pipeline_class


def model_architecture(cfg: RunConfig) -> str:
    try:
        name = pipeline_class(cfg)
        unet = models.read_model_json(_model_source(cfg), "unet/config.json") if name == SD_PIPELINE else {}
    except UserError:  # unreadable configs: preflight refuses the model with its own line
        return "unknown"
    return architecture(name, unet)


def fast_problem(cfg: RunConfig) -> str | None:
    g = cfg.generate
    return fast_path_problem(*model_facts(cfg), g.steps, g.guidance)


def auto_engine(cfg: RunConfig) -> str:
    g = cfg.generate
    if g.steps != 1 or g.guidance > 1.0:  # no need to read the model
        return "diffusers"
    try:
        return "fast" if fast_problem(cfg) is None else "diffusers"
    except UserError:
        # The model's configs cannot be read: the run cannot start either (preflight refuses the model with
        # this same line), so the choice only has to be stable for the fingerprint.
        return "diffusers"


def auto_vae_dtype(cfg: RunConfig) -> str:
    """bf16 on GPU workers (same weights and fp32's exponent range, no upcast), fp32 on CPU workers."""
    if not workers_have_gpus(cfg):
        return "fp32"
    import torch

    # Where this machine has the GPU, ask it; a cluster's GPUs are assumed to be bf16-capable (A100 and later).
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "fp32"
    return "bf16"


def workers_have_gpus(cfg: RunConfig) -> bool:
    """Whether the generator actors will get GPUs, decided as the driver will decide it: --worker-gpus when
    given; else whether the Ray cluster a run would join (RAY_ADDRESS, `ray start`) has GPUs (joined now,
    as the stage would); else whether this machine has a CUDA GPU (the local Ray gets this machine's GPUs)."""
    g = cfg.generate
    if g.worker_gpus is not None:
        return g.worker_gpus > 0
    from gdd_ray import ray_utils

    # Ray is imported only where there is a cluster to ask: an in-process run (the GPU benchmark on an image
    # without Ray) decides from this machine alone.
    if ray_utils.ray_initialized() or ray_utils.cluster_address() is not None:
        ray_utils.init_ray()
        return ray_utils.cluster_gpus() > 0
    import torch

    return torch.cuda.is_available()


def check(cfg: RunConfig, runtime: Runtime) -> None:
    """Preflight: the resolved choices can be honoured with this model (one clear line otherwise)."""
    g = cfg.generate
    kind = pipeline_class(cfg)
    if kind not in SUPPORTED_PIPELINES:
        raise UserError(
            f"--model {g.model}: a {kind}; the generate stage draws with {' or '.join(SUPPORTED_PIPELINES)} "
            "models (SDXL-Turbo, SDXL base, SD-Turbo, SD 1.x/2.x and their fine-tunes)"
        )
    if g.decoder == "taesdxl" and kind != SDXL_PIPELINE:
        raise UserError(f"--decoder taesdxl decodes SDXL latents; --model {g.model} is a {kind}: use --decoder vae")
    # Only an explicit --engine fast needs the check: `auto` chose fast by this same check, for this same
    # model, steps and guidance (also when the choice was read back from run.json), and repeating it
    # would import diffusers and build a scheduler on every rerun.
    if runtime.engine == "fast" and g.engine == "fast":
        problem = fast_problem(cfg)
        if problem:
            raise UserError(f"--engine fast does not apply to --model {g.model}: {problem}; use --engine auto")
    model = models.resolve_model(g.model)
    decoder = models.decoder_config(model, g.decoder, g.vae)  # also: the tiny decoder can be loaded
    if runtime.vae_dtype == "fp16" and decoder.get("force_upcast", False):
        raise UserError(
            f"--vae-dtype fp16: this {g.decoder} overflows in fp16 (its config says force_upcast); use bf16, "
            "or an fp16-safe VAE such as --vae madebyollin/sdxl-vae-fp16-fix"
        )
