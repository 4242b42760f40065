"""The one typed run configuration: the schema (frozen dataclasses, each field with the help a user reads)
and the sanity checks that hold whatever the config came from.

`config_loader` builds a RunConfig from CLI flags and YAML (the flags and keys come from these fields);
run.json keeps `to_dict()` and `RunConfig.from_dict` reads it back. Choices are `Literal[...]` here and
nowhere else: the loader checks them, the ConvNet and DSA code read their options from these types.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from gdd_ray.classes import check_templates, template_fields
from gdd_ray.errors import UserError

Stage = Literal["generate", "select", "augment", "train"]
Dataset = Literal["cifar10", "cifar100", "tiny-imagenet", "imagenet-1k"]
Norm = Literal["instance", "batch", "group", "none"]
Activation = Literal["relu", "leakyrelu", "sigmoid"]
Pooling = Literal["avg", "max", "none"]
DsaOp = Literal["color", "crop", "cutout", "flip", "scale", "rotate"]
SelectBy = Literal["none", "clip"]
Protocol = Literal["paper", "challenge"]
Pick = Literal["originals", "first", "spread"]
Engine = Literal["auto", "fast", "diffusers"]
VaeDtype = Literal["auto", "fp32", "bf16", "fp16"]
Decoder = Literal["vae", "taesdxl"]
Track = Literal["none", "mlflow"]
Labels = Literal["hard", "soft", "both"]
CompileScope = Literal["model", "blocks"]

STAGES: tuple[str, ...] = typing.get_args(Stage)
# What runs when --stages is not given: every stage, the select stage only when there is something to
# select by (with --select-by none the pipeline is generate -> augment -> train, as before it existed).
DEFAULT_STAGES: tuple[str, ...] = tuple(s for s in STAGES if s != "select")
DATASETS: tuple[str, ...] = typing.get_args(Dataset)
# The size stored when --image-size is not given: the resolution of the real dataset it stands in for.
DEFAULT_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "tiny-imagenet": 64, "imagenet-1k": 224}


# --eval-nets: our key -> the name DD-Ranking reports it under (DC-bench writes ResNet18BN, VGG11BN, AlexNetBN).
# Every key but convnet is the DC/DSA/MTT `networks.py` definition; convnet is the --net-* ConvNet (ConvNet-3).
NETS = {
    "convnet": "ConvNet-3",
    "convnet-bn": "ConvNet-3-BN",
    "resnet18": "ResNet-18",
    "resnet18-bn": "ResNet-18-BN",
    "vgg11": "VGG-11",
    "vgg11-bn": "VGG-11-BN",
    "alexnet": "AlexNet",
    "alexnet-bn": "AlexNet-BN",
}


def net_key(name: str) -> str:
    """'ResNet-18-BN', 'resnet18bn', 'ResNet18BN', 'ConvNetD3' -> our key; UserError for anything else."""
    flat = name.strip().lower().replace("-", "").replace("_", "")
    aliases = {k.replace("-", ""): k for k in NETS}
    aliases.update(
        {"convnet3": "convnet", "convnetd3": "convnet", "convnet3bn": "convnet-bn", "convnetd3bn": "convnet-bn"}
    )
    if flat not in aliases:
        raise UserError(f"--eval-nets: unknown network '{name}'; choose from {', '.join(NETS)} (or DD-Ranking's names)")
    return aliases[flat]


MAX_TIME_BUDGET_S = 7 * 24 * 3600
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_duration(text: str | float, flag: str) -> float:
    """'600', '90s', '10m', '1.5h' -> seconds, between 1 s and MAX_TIME_BUDGET_S."""
    raw = str(text).strip().lower()
    number, unit = (raw[:-1], raw[-1]) if raw[-1:] in _DURATION_UNITS and raw[-1:] else (raw, "")
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        seconds = float("nan")
    if not 1 <= seconds <= MAX_TIME_BUDGET_S:  # also refuses nan and inf
        raise UserError(
            f"{flag} must be a duration between 1s and {MAX_TIME_BUDGET_S // 3600}h (e.g. 10m), got {text!r}"
        )
    return seconds


def opt(default: Any, help: str, *, low: float | None = None, high: float | None = None, **kw: Any) -> Any:
    """A config field: its default, the help a user reads (flag and YAML key are the field's name) and,
    for numbers, the range it must lie in (the upper bounds keep a typo from asking for the impossible)."""
    metadata = {"help": help, "low": low, "high": high}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass(frozen=True)
class GenerateConfig:
    """Stage 1: class names -> SDXL-Turbo images -> Parquet shards under OUT/generated/."""

    model: str = opt(
        "stabilityai/sdxl-turbo",
        "Hub id or local diffusers folder of an SDXL or SD 1.x/2.x text-to-image model (SDXL-Turbo, SD-Turbo, "
        "SD 1.5, SDXL base, ...; give its --steps and --guidance); 'tiny' = built-in random-weight SDXL-architecture "
        "pipeline for offline demos and tests (its images are noise), 'tiny-sdxl-base', 'tiny-sd-turbo', "
        "'tiny-sd15' = the same for those architectures.",
    )
    model_revision: str | None = opt(
        None,
        "Hub revision of --model (branch, tag or commit); resolved to a commit once on the driver, recorded in "
        "run.json and the fingerprint, and loaded by every worker, so a model update mid-run cannot mix two "
        "snapshots. Default: the commit 'main' points to (on the hub, else in the local cache).",
    )
    vae: str | None = opt(
        None,
        "Optional replacement VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix to decode in fp16 "
        "instead of the fp32 upcast SDXL's own VAE needs; changes pixels, so it is part of the fingerprint.",
    )
    steps: int = opt(1, "Denoising steps; SDXL-Turbo is distilled for 1 (up to 4 helps a little).", low=1, high=1000)
    guidance: float = opt(
        0.0, "Classifier-free guidance scale; SDXL-Turbo is trained without it (0.0).", low=0.0, high=100.0
    )
    gen_resolution: int = opt(512, "Resolution the model draws at (SDXL-Turbo's native size is 512).", low=8, high=4096)
    image_size: int | None = opt(
        None, "Size stored in the shards (anti-aliased resize); default 32 for CIFAR, 64 for Tiny-ImageNet.", low=1
    )
    prompt_template: str = opt(
        "{name}",
        "Prompt per class; {name} is the class name (the paper uses the bare name), {desc} its description "
        "(the class file's third column, e.g. 'a kite, a bird of prey with a forked tail'; the name if none).",
    )
    prompt_templates: tuple[str, ...] = opt(
        (),
        "Several prompt templates instead of --prompt-template: a file with one template a line (blank lines and "
        "# comments skipped), or a YAML list. Each image takes one, chosen from its own seed (run seed, class, "
        "index), so the choice never depends on batching or reruns; the row stores the prompt it was drawn from.",
    )
    time_budget: str | None = opt(
        None,
        "Generate for at most this long (e.g. 600, 90s, 10m, 1.5h; up to 7 days) instead of to --ipc: units go out "
        "index-major (every class's first unit, then every class's second...) and dispatch stops when another "
        "round would not fit, so every class ends at the same IPC (the IPC reached, a multiple of --unit-size; "
        "--ipc is the upper bound). Counts generation only (from the first unit; not model load or compile). "
        "Later stages use the IPC reached; a rerun grows the run by another budget.",
    )
    batch_size: int = opt(
        16,
        "Images per model call, always executed at this size (only the run's last batch can be short: it is padded "
        "and the padding discarded), so shapes are static. 16 fills an H100 at 512 px; lower it for small GPUs. "
        "Changes pixels only by float rounding.",
        low=1,
        high=4096,
    )
    unit_size: int = opt(
        64,
        "Images per work unit (= per shard), a multiple of --batch-size: units are consecutive images of the "
        "class x index grid, every class's image 0 first, so a unit spans classes and every batch is full. The "
        "cut is fixed per run, so raising --ipc later extends a run instead of redoing it (and --batch-size can "
        "change between runs, to any divisor of the unit size).",
        low=1,
        high=100_000,
    )
    workers: int | None = opt(
        None, "Generator actors; default one per GPU in the cluster (1 when it has none).", low=1, high=10_000
    )
    worker_gpus: float | None = opt(
        None,
        "GPUs each generator actor asks for; default 1 when the cluster has GPUs now, else 0 (CPU). Set 1 with "
        "--workers N on an autoscaling cluster whose GPU nodes are not up yet, so the actors make it add them.",
        low=0.0,
        high=64.0,
    )
    max_retries: int = opt(3, "Attempts per work unit before the run stops with that unit's error.", low=1, high=100)
    compile: bool = opt(
        False,
        "torch.compile the denoiser and decoder with static shapes, in each worker's start-up before it takes "
        "work (minutes on a GPU, cached per user or pod); faster steady state.",
    )
    compile_scope: CompileScope = opt(
        "model",
        "What --compile compiles: 'model' = the whole denoise step and decoder, one graph each (CUDA graphs on a "
        "GPU); 'blocks' = each repeated block (UNet transformer and ResNet blocks, decoder ResNet blocks) once per "
        "shape, a much shorter cold compile, the glue between blocks eager. Float rounding only: not in the "
        "fingerprint.",
    )
    engine: Engine = opt(
        "auto",
        "How images are drawn: 'fast' = the one-step SDXL path written out (SDXL architecture, --steps 1, "
        "--guidance <= 1, Euler-type scheduler with trailing spacing); 'diffusers' = the general pipeline call; "
        "'auto' = fast where it applies. Changes pixels by float rounding only, but is part of the fingerprint.",
    )
    vae_dtype: VaeDtype = opt(
        "auto",
        "Precision of the image decoder, set once at load: 'auto' = bf16 when the workers have GPUs, fp32 "
        "otherwise (resolved when the run is created and kept in run.json); fp16 only with an fp16-safe VAE "
        "(e.g. --vae madebyollin/sdxl-vae-fp16-fix). Changes pixels: part of the fingerprint.",
    )
    decoder: Decoder = opt(
        "vae",
        "Latents -> pixels: 'vae' = the model's own VAE; 'taesdxl' = the tiny AutoencoderTiny decoder "
        "(madebyollin/taesdxl) for stored sizes <= 64 px, where it makes generation UNet-bound. Changes pixels.",
    )

    def __post_init__(self) -> None:
        if isinstance(self.prompt_templates, list):  # run.json keeps the list as JSON
            object.__setattr__(self, "prompt_templates", tuple(self.prompt_templates))

    @property
    def templates(self) -> tuple[str, ...]:
        """The prompt templates images are drawn from: --prompt-templates, else the one --prompt-template."""
        return self.prompt_templates or (self.prompt_template,)

    @property
    def time_budget_s(self) -> float | None:
        return None if self.time_budget is None else parse_duration(self.time_budget, "--time-budget")


@dataclass(frozen=True)
class SelectConfig:
    """Stage 1b (on with --select-by clip): score every generated image with CLIP, keep the IPC best per class
    into OUT/selected/."""

    select_by: SelectBy = opt(
        "none",
        "clip = score each generated image against its class prompt and every other class's (zero-shot top-1) "
        "and keep the IPC best per class; none = keep every generated image (no select stage).",
    )
    clip_model: str = opt(
        "openai/clip-vit-base-patch32",
        "CLIP model for --select-by clip: hub id or local folder (transformers CLIPModel); 'tiny' = built-in "
        "random-weight CLIP for offline tests (its scores are noise).",
    )
    overgenerate: float = opt(
        1.0,
        "Generate ceil(F x IPC) images per class for the select stage to choose IPC from (needs --select-by clip).",
        low=1.0,
        high=100.0,
    )
    clip_batch_size: int = opt(
        64,
        "Images per CLIP forward pass; an image always takes the same row of a batch of this shape, so its score "
        "never depends on what else is scored with it (the shape itself moves scores by rounding, so it is part "
        "of the fingerprint). 64 keeps a CPU actor responsive, 256 fills a GPU with ViT-B/32.",
        low=1,
        high=65536,
    )
    select_workers: int | None = opt(
        None, "CLIP scoring actors; default one per GPU, or one per CPU on a CPU-only cluster.", low=1, high=10_000
    )


@dataclass(frozen=True)
class AugmentConfig:
    """Stage 2: post data augmentation (PDA) of OUT/generated/ into OUT/augmented/."""

    pda_variants: int = opt(
        4, "Augmented variants per generated image, besides the original (0 = pass-through).", low=0, high=1000
    )
    pda_ops: dict | None = opt(
        None,
        "Replace the paper's PDA recipe: op name -> parameters, applied in the given order (a YAML mapping, "
        'or JSON on the command line, e.g. \'{"hflip": {"p": 0.5}, "rotate": {"degrees": 30}}\'). '
        "Ops: hflip, vflip, brightness_contrast, rotate, gamma; parameters left out keep the paper's values.",
    )


@dataclass(frozen=True)
class TrainConfig:
    """Stage 3: fit ConvNetD3 on the distilled set with Ray Train and test it on the real test set."""

    eval_data: str | None = opt(None, "Path to the real test set (CIFAR python folder, Tiny-ImageNet folder, ...).")
    epochs: int = opt(
        1000, "Training epochs (the standard protocol uses 1000; fewer for quick looks).", low=1, high=1_000_000
    )
    eval_runs: int = opt(
        3, "Independent training runs (seeds); the accuracy is reported as mean +- std.", low=1, high=1000
    )
    eval_seed: int = opt(
        0,
        "Seed of the evaluation runs; run i's seeds (init, shuffling, DSA) derive from (it, i).",
        low=0,
        high=2**63 - 1,
    )
    lr: float = opt(0.01, "SGD learning rate (standard DD protocol: 0.01; dropped x0.1 at half the epochs).")
    momentum: float = opt(0.9, "SGD momentum (standard: 0.9).", low=0.0, high=1.0)
    weight_decay: float = opt(5e-4, "SGD weight decay (standard: 5e-4).", low=0.0, high=1.0)
    train_batch_size: int = opt(
        256, "Training batch size (standard: 256); also the test batch size.", low=1, high=1_000_000
    )
    net_depth: int = opt(
        3, "ConvNet blocks (conv-norm-act-pool); ConvNetD3 = 3 is what the field reports.", low=1, high=16
    )
    net_width: int = opt(128, "ConvNet channels per block (standard: 128).", low=1, high=4096)
    net_norm: Norm = opt("instance", "ConvNet normalisation: instance (standard), batch, group, none.")
    net_act: Activation = opt("relu", "ConvNet activation: relu (standard), leakyrelu, sigmoid.")
    net_pool: Pooling = opt("avg", "ConvNet pooling: avg (standard), max, none.")
    dsa_strategy: str = opt(
        "color_crop_cutout_flip_scale_rotate",
        "DSA ops, '_'-separated; one is drawn per batch (the standard strategy); 'none' trains without augmentation.",
    )
    eval_every: int = opt(
        100,
        "Test-set accuracy every N epochs for the curve (the reported one is the last epoch's).",
        low=1,
        high=1_000_000,
    )
    checkpoint_every: int = opt(
        50, "Checkpoint every N epochs under OUT/eval/checkpoints/; a rerun resumes there.", low=1, high=1_000_000
    )
    eval_workers: int | None = opt(
        None,
        "Ray Train workers (runs go in parallel); default one per GPU, or one per CPU on a CPU-only cluster. A "
        "sweep point trains in its own Tune trial, on one GPU or CPU (sweep --concurrent sets the parallelism).",
        low=1,
        high=10_000,
    )
    protocol: Protocol = opt(
        "paper",
        "paper: train on every image of the set, --epochs epochs, lr x0.1 from epoch epochs // 2 + 1 (epochs "
        "counted from 1; the paper's evaluation). challenge: the ECCV 2024 DD challenge evaluator exactly: 10 images "
        "per class (chosen by --pick), epochs + 1 epochs, lr x0.1 from epoch epochs // 2 + 3.",
    )
    pick: Pick = opt(
        "originals",
        "Which 10 images per class the challenge protocol (and `export --format challenge`) takes: originals = "
        "10 distinct generated images, un-augmented (spread over variants when IPC < 10); first = the first 10 in "
        "(index, variant) order; spread = 10 evenly spaced over the class's (index, variant) rows.",
    )
    train_ipc: int | None = opt(
        None,
        "Train on the first N generated images of each class only (index < N; default all): a smaller IPC served "
        "by a run generated at a larger one (image seeds depend on class and index only). Sweeps set it.",
        low=1,
        high=1_000_000,
    )
    train_variants: int | None = opt(
        None,
        "Train on each image's original and first K augmented variants only (variant <= K; default all): a "
        "smaller --pda-variants served by a larger one (variant seeds depend on image and variant only).",
        low=0,
        high=1000,
    )

    real_train_data: str | None = opt(
        None,
        "The real training set (CIFAR python folder, Tiny-ImageNet's folder, or an ImageNet-style folder of class "
        "folders): adds a random real subset with as many images per class as the distilled set, trained under "
        "exactly this protocol (network, seeds, epochs), and IOR = distilled - random (DD-Ranking).",
    )
    eval_full_data: bool = opt(
        False,
        "With --real-train-data: also train on the whole real training set (same protocol), and report "
        "HLR = full - distilled (DD-Ranking). Costs as much as training on the real dataset.",
    )
    full_data_max_gib: float = opt(
        8.0,
        "--eval-full-data holds the whole real training set (uint8) on the driver, in the object store and on each "
        "training device; a bigger set is refused before anything starts.",
        low=1e-6,
        high=4096.0,
    )
    eval_nets: tuple[str, ...] = opt(
        ("convnet",),
        "Networks to train on the set, comma separated (cross-architecture evaluation): convnet (the --net-* "
        "ConvNet, ConvNet-3 by default), resnet18, vgg11, alexnet, each also as -bn (batch norm; DC-bench's "
        "ResNet18BN, DD-Ranking's ResNet-18-BN). The first is the one the headline accuracy reports.",
    )
    labels: Labels = opt(
        "hard",
        "hard: cross-entropy on the class labels (the DD protocol). soft: a --teacher relabels every augmented "
        "batch, KL divergence at --temperature, AdamW + cosine for --soft-epochs (SRe2L/RDED-style). both: hard "
        "and soft, and DD-Ranking's label-robust score (LRS) when the baselines are there.",
    )
    teacher: str | None = opt(
        None,
        "The teacher for --labels soft/both: a torchvision ResNet state dict (.pt/.pth, loaded with "
        "weights_only; adapted to 32/64 px as SRe2L/RDED do: 3x3 stem, no max-pool) or a TorchScript file "
        "(torch.jit.save). Its output classes must be the run's, in label order. A random teacher gives noise.",
    )
    temperature: float = opt(4.0, "Soft labels: the KL divergence's temperature.", low=0.01, high=1000.0)
    soft_epochs: int = opt(300, "Soft labels: training epochs (its own schedule).", low=1, high=1_000_000)
    soft_lr: float = opt(0.001, "Soft labels: AdamW learning rate (cosine decay to 0 over --soft-epochs).")
    soft_weight_decay: float = opt(0.01, "Soft labels: AdamW weight decay.", low=0.0, high=10.0)
    runs_at_once: int | None = opt(
        None,
        "Evaluation runs of one network trained together on one device (stacked into grouped convolutions; each "
        "keeps its own seed, shuffling and DSA draws). Default: all of a GPU worker's runs, 1 on a CPU worker. "
        "ConvNet only; other networks train one run at a time. Changes numbers by float rounding only.",
        low=1,
        high=1024,
    )
    baselines_dir: str | None = opt(
        None,
        "Where random-real and full-data results are kept, each under a key of everything that decides it, so "
        "runs and sweep points with the same protocol share them (default OUT/eval/baselines; sweeps set it).",
    )

    def __post_init__(self) -> None:
        if isinstance(self.eval_nets, list):  # run.json keeps the tuple as a JSON list
            object.__setattr__(self, "eval_nets", tuple(self.eval_nets))

    @property
    def label_modes(self) -> tuple[str, ...]:
        return ("hard", "soft") if self.labels == "both" else (self.labels,)

    @property
    def epochs_run(self) -> int:
        """Epochs actually trained: the challenge evaluator loops `range(epochs + 1)`."""
        return self.epochs + 1 if self.protocol == "challenge" else self.epochs

    @property
    def lr_drop_epoch(self) -> int | None:
        """The first epoch trained at lr x 0.1, counted from 1 like the logs, metrics.jsonl and the plots; None
        when the schedule ends before any drop (--epochs 1). paper: epochs // 2 + 1; challenge: the evaluator
        drops after finishing epoch index epochs // 2 + 1, i.e. from epoch epochs // 2 + 3 (1000 epochs: 502
        at 0.01, then 499 at 0.001)."""
        first = self.epochs // 2 + 3 if self.protocol == "challenge" else self.epochs // 2 + 1
        return first if 1 < first <= self.epochs_run else None

    @property
    def dsa_ops(self) -> tuple[str, ...]:
        return () if self.dsa_strategy.lower() == "none" else tuple(self.dsa_strategy.split("_"))


SECTIONS = {"generate": GenerateConfig, "select": SelectConfig, "augment": AugmentConfig, "train": TrainConfig}
# Names an earlier release used: (flag or YAML key, or run.json section) -> today's. Accepted for one release,
# with one line saying so; the select stage's section was `clip` and the challenge's pick `--select` then.
RENAMED_OPTIONS = {"select": "pick"}
RENAMED_SECTIONS = {"clip": "select"}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, from the CLI down to the per-shard worker."""

    out: str = opt(None, "Output folder: a local path or a URI pyarrow understands (s3://bucket/run, gs://...).")
    dataset: Dataset | None = opt(None, f"Dataset whose classes to distil: {', '.join(DATASETS)}.")
    classes: str | None = opt(
        None, "Class file instead of --dataset: one name per line, id<TAB>name, or id<TAB>name<TAB>description."
    )
    allow_duplicate_prompts: bool = opt(
        False, "Run even when two classes get the same prompt (by default such a class list is refused)."
    )
    ipc: int = opt(None, "Images per class to generate.", low=1, high=1_000_000)
    seed: int = opt(0, "Run seed; every image's seed derives from (seed, class, index).", low=0, high=2**63 - 1)
    stages: tuple[Stage, ...] = opt(
        DEFAULT_STAGES, "Stages to run, comma separated (default: all; select only with --select-by clip)."
    )
    overwrite: bool = opt(False, "Delete an existing run at --out whose config differs, instead of stopping.")
    shared_local_out: bool = opt(
        False,
        "--out is a local path that is the same shared mount (NFS, ...) on every node; without it a local "
        "--out on a cluster of several nodes is refused, since each node would write to its own disk.",
    )
    track: Track = opt(
        "none",
        "mlflow = log the run to MLflow when it ends (params, per-epoch and final metrics, per-class accuracy, "
        "fingerprints, report.html...; needs `pip install 'gdd-ray[track]'`); none = log nothing. A tracking "
        "failure is one line, never a failed run.",
    )
    track_uri: str | None = opt(
        None,
        "MLflow tracking URI for --track mlflow: a server (http://host:5000) for a team, sqlite:///file.db, or a "
        "folder (FOLDER/mlflow.db). Default: $MLFLOW_TRACKING_URI, else OUT/mlflow.db (./mlflow.db for s3:// OUT).",
    )
    track_experiment: str = opt("gdd-ray", "MLflow experiment the run is logged under (--track mlflow).")
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    select: SelectConfig = field(default_factory=SelectConfig)  # the select stage
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def image_size(self) -> int:
        """The stored image size, resolved (--image-size, else the dataset's own)."""
        if self.generate.image_size is not None:
            return self.generate.image_size
        return DEFAULT_IMAGE_SIZE.get(self.dataset or "", 32)

    def value(self, path: str) -> Any:
        """A field or derived value by its dotted path: cfg.value('generate.steps'), cfg.value('image_size')."""
        obj: Any = self
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stages"] = list(self.stages)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "run.json") -> RunConfig:
        """The config saved in run.json, checked as strictly as flags are (each value coerced to its field's
        type, then `validate`): schema.Invalid naming `where` and the first wrong value. Keys this version does
        not know are ignored."""
        from gdd_ray.config_loader import config_from_record

        return config_from_record(d, where)

    def replace(self, **changes: Any) -> RunConfig:
        """Copy with top-level or `section.field` changes: cfg.replace(ipc=5, **{'generate.batch_size': 4})."""
        top = {k: v for k, v in changes.items() if "." not in k}
        sections: dict[str, dict[str, Any]] = {}
        for k, v in changes.items():
            if "." in k:
                sec, name = k.split(".", 1)
                sections.setdefault(sec, {})[name] = v
        for sec, vals in sections.items():
            top[sec] = dataclasses.replace(getattr(self, sec), **vals)
        return dataclasses.replace(self, **top)


def validate(cfg: RunConfig) -> None:
    """Sanity checks: everything a user can get wrong, said in one line each, before anything is touched.
    (Types and Literal choices were checked when the config was built.)"""
    g, t = cfg.generate, cfg.train
    if not cfg.out:
        raise UserError("--out is required: a local folder or a URI such as s3://bucket/run")
    if "://" not in cfg.out or cfg.out.startswith("file://"):
        local = os.path.abspath(os.path.expanduser(cfg.out.removeprefix("file://")))
        if os.path.dirname(local) == local:  # --overwrite there would sweep a whole disk's stage folders
            raise UserError(f"--out {cfg.out} is the filesystem's root; give a folder for the run")
    if cfg.shared_local_out and "://" in cfg.out and not cfg.out.startswith("file://"):
        raise UserError(f"--shared-local-out is for a local --out on a shared mount; {cfg.out} is already shared")
    if cfg.dataset is None and cfg.classes is None:
        raise UserError(f"give --dataset ({', '.join(DATASETS)}) or --classes FILE")
    if cfg.dataset is not None and cfg.classes is not None:
        raise UserError("give either --dataset or --classes, not both")
    if cfg.ipc is None:
        raise UserError("--ipc is required: images per class, e.g. --ipc 20")
    if not cfg.stages:
        raise UserError(f"--stages: no stage given; choose from {', '.join(STAGES)}")
    for section, klass in [(None, RunConfig), *SECTIONS.items()]:
        values = getattr(cfg, section) if section else cfg
        for f in dataclasses.fields(klass):
            low, high, value = f.metadata.get("low"), f.metadata.get("high"), getattr(values, f.name)
            name = f.name.replace("_", "-")
            if low is not None and value is not None and value < low:
                raise UserError(f"--{name} must be at least {low}, got {value}")
            if high is not None and value is not None and value > high:
                raise UserError(f"--{name} must be at most {high}, got {value}")
    if "generate" in cfg.stages and g.unit_size % g.batch_size:
        fit = [
            m for m in (g.unit_size // g.batch_size * g.batch_size, -(-g.unit_size // g.batch_size) * g.batch_size) if m
        ]
        raise UserError(
            f"--unit-size {g.unit_size} is not a multiple of --batch-size {g.batch_size}: every unit would end in a "
            f"padded batch; give --unit-size {' or '.join(map(str, dict.fromkeys(fit)))}"
        )
    if g.gen_resolution % 8:
        raise UserError(f"--gen-resolution must be a multiple of 8 (the VAE's downscale), got {g.gen_resolution}")
    if cfg.image_size < 1 or cfg.image_size > g.gen_resolution:
        raise UserError(
            f"--image-size must be between 1 and --gen-resolution ({g.gen_resolution}), got {cfg.image_size}"
        )
    template_fields(g.prompt_template)
    if g.prompt_templates:
        check_templates(g.prompt_templates)
        if g.prompt_template != "{name}":
            raise UserError("give either --prompt-template (one) or --prompt-templates (several), not both")
    if cfg.augment.pda_ops is not None:  # checked at start, not when the augment stage comes to it
        from gdd_ray.augment.recipe import resolve_ops

        resolve_ops(cfg.augment.pda_ops)
    if g.time_budget is not None:
        parse_duration(g.time_budget, "--time-budget")
        if cfg.select.select_by != "none":
            raise UserError(
                "--time-budget with --select-by clip is not supported yet: generate with the budget first, "
                "or give --ipc without a budget"
            )
    if cfg.track == "none" and (cfg.track_uri is not None or cfg.track_experiment != "gdd-ray"):
        raise UserError("--track-uri and --track-experiment say where to log: add --track mlflow")
    if "select" in cfg.stages and cfg.select.select_by == "none":
        raise UserError("--stages select needs something to select by: add --select-by clip")
    if cfg.select.overgenerate != 1.0 and cfg.select.select_by == "none":
        raise UserError(
            "--overgenerate makes more images than --ipc for the select stage to choose from: add --select-by clip"
        )
    if t.train_ipc is not None and t.train_ipc > cfg.ipc:
        raise UserError(f"--train-ipc {t.train_ipc} is more than the run's --ipc {cfg.ipc}")
    if t.train_variants is not None and t.train_variants > cfg.augment.pda_variants:
        raise UserError(
            f"--train-variants {t.train_variants} is more than the run's --pda-variants {cfg.augment.pda_variants}"
        )
    if g.engine == "fast" and (g.steps != 1 or g.guidance > 1.0):
        raise UserError(
            f"--engine fast is the one-step path without guidance: it needs --steps 1 and --guidance <= 1 "
            f"(got --steps {g.steps} --guidance {g.guidance}); use --engine auto or diffusers"
        )
    if t.eval_full_data and t.real_train_data is None:
        raise UserError("--eval-full-data trains on the real training set: give it with --real-train-data PATH")
    if t.labels != "hard" and t.teacher is None:
        raise UserError(f"--labels {t.labels} relabels every batch with a teacher: give --teacher PATH")
    if not t.eval_nets:
        raise UserError("--eval-nets: give at least one network, e.g. convnet")
    keys = [net_key(n) for n in t.eval_nets]
    if len(set(keys)) != len(keys):
        raise UserError(f"--eval-nets names a network twice: {', '.join(t.eval_nets)}")
    if not 0 < t.soft_lr <= 10:
        raise UserError(f"--soft-lr must be > 0 and at most 10, got {t.soft_lr}")
    if not 0 < t.lr <= 10:
        raise UserError(f"--lr must be > 0 and at most 10, got {t.lr}")
    choices = typing.get_args(DsaOp)
    bad_ops = [o for o in t.dsa_ops if o not in choices]
    if bad_ops or (t.dsa_strategy.lower() != "none" and not t.dsa_ops):
        raise UserError(
            f"--dsa-strategy: unknown op(s) {', '.join(bad_ops)}; use '_'-separated {', '.join(choices)} or none"
        )
