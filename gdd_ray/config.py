"""The one typed run configuration: built from a YAML file and CLI flags, validated, saved with the run.

Every option is a dataclass field with a `help` string; the CLI flags and the YAML keys are generated
from those fields, so a flag, its YAML key and the field in code are always the same thing:
`--prompt-template` == `prompt-template:` (or `prompt_template:`) in YAML == `cfg.generate.prompt_template`.
Flags given on the command line win over the YAML file, which wins over the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from gdd_ray.errors import UserError

STAGES = ("generate", "augment", "train")
DATASETS = ("cifar10", "cifar100", "tiny-imagenet", "imagenet-1k")
# The size stored when --image-size is not given: the resolution of the real dataset it stands in for.
DEFAULT_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "tiny-imagenet": 64, "imagenet-1k": 224}


def opt(default: Any, help: str, *, flag: str | None = None, cli: bool = True, **kw: Any) -> Any:
    """A config field: its default, the help a user reads, and (optionally) its flag name."""
    metadata = {"help": help, "flag": flag, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass(frozen=True)
class GenerateConfig:
    """Stage 1: class names -> SDXL-Turbo images -> Parquet shards under OUT/generated/."""

    model: str = opt(
        "stabilityai/sdxl-turbo",
        "Hub id or local diffusers folder of a one-step text-to-image model; 'tiny' = built-in random-weight "
        "SDXL-architecture pipeline for offline demos and tests (its images are noise).",
    )
    vae: str | None = opt(
        None,
        "Optional replacement VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix to decode in fp16 "
        "instead of the fp32 upcast SDXL's own VAE needs; changes pixels, so it is part of the fingerprint.",
    )
    steps: int = opt(1, "Denoising steps; SDXL-Turbo is distilled for 1 (up to 4 helps a little).")
    guidance: float = opt(0.0, "Classifier-free guidance scale; SDXL-Turbo is trained without it (0.0).")
    gen_resolution: int = opt(512, "Resolution the model draws at (SDXL-Turbo's native size is 512).")
    image_size: int | None = opt(
        None, "Size stored in the shards (anti-aliased resize); default 32 for CIFAR, 64 for Tiny-ImageNet."
    )
    prompt_template: str = opt("{name}", "Prompt per class; {name} is the class name (the paper uses the bare name).")
    batch_size: int = opt(
        16,
        "Images per pipeline call. 16 fills an H100 at 512 px in fp16 without running out of memory; "
        "lower it for small GPUs. Does not change the pixels beyond float rounding.",
    )
    unit_size: int = opt(
        10,
        "Images per work unit (= per shard). Small units spread load evenly and lose little on a crash; "
        "the unit grid is fixed per run, so raising --ipc later extends a run instead of redoing it.",
    )
    workers: int | None = opt(None, "Generator actors; default one per GPU in the cluster (1 when it has none).")
    worker_gpus: float | None = opt(
        None,
        "GPUs each generator actor asks for; default 1 when the cluster has GPUs now, else 0 (CPU). Set 1 with "
        "--workers N on an autoscaling cluster whose GPU nodes are not up yet, so the actors make it add them.",
    )
    max_retries: int = opt(3, "Attempts per work unit before the run stops with that unit's error.")
    compile: bool = opt(False, "torch.compile the UNet and VAE decoder (slower start, faster steady state on GPU).")


@dataclass(frozen=True)
class AugmentConfig:
    """Stage 2: post data augmentation (PDA) of OUT/generated/ into OUT/augmented/."""

    pda_variants: int = opt(4, "Augmented variants per generated image, besides the original (0 = pass-through).")
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
    epochs: int = opt(1000, "Training epochs (the standard protocol uses 1000; fewer for quick looks).")
    eval_runs: int = opt(3, "Independent training runs (seeds); the accuracy is reported as mean +- std.")
    eval_seed: int = opt(0, "Seed of the first evaluation run; run i uses eval-seed + i (init, shuffling, DSA).")
    lr: float = opt(0.01, "SGD learning rate (standard DD protocol: 0.01; dropped x0.1 at half the epochs).")
    momentum: float = opt(0.9, "SGD momentum (standard: 0.9).")
    weight_decay: float = opt(5e-4, "SGD weight decay (standard: 5e-4).")
    train_batch_size: int = opt(256, "Training batch size (standard: 256); also the test batch size.")
    net_depth: int = opt(3, "ConvNet blocks (conv-norm-act-pool); ConvNetD3 = 3 is what the field reports.")
    net_width: int = opt(128, "ConvNet channels per block (standard: 128).")
    net_norm: str = opt("instance", "ConvNet normalisation: instance (standard), batch, group, none.")
    net_act: str = opt("relu", "ConvNet activation: relu (standard), leakyrelu, sigmoid.")
    net_pool: str = opt("avg", "ConvNet pooling: avg (standard), max, none.")
    dsa_strategy: str = opt(
        "color_crop_cutout_flip_scale_rotate",
        "DSA ops, '_'-separated; one is drawn per batch (the standard strategy); 'none' trains without augmentation.",
    )
    eval_every: int = opt(100, "Test-set accuracy every N epochs for the curve (the reported one is the last epoch's).")
    checkpoint_every: int = opt(50, "Checkpoint every N epochs under OUT/eval/checkpoints/; a rerun resumes there.")
    eval_workers: int | None = opt(
        None, "Ray Train workers (runs go in parallel); default one per GPU, or one per CPU on a CPU-only cluster."
    )


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, from the CLI down to the per-shard worker."""

    out: str = opt(None, "Output folder: a local path or a URI pyarrow understands (s3://bucket/run, gs://...).")
    dataset: str | None = opt(None, f"Dataset whose classes to distil: {', '.join(DATASETS)}.")
    classes: str | None = opt(None, "Class file instead of --dataset: one name per line, or id<TAB>name.")
    ipc: int = opt(None, "Images per class to generate.")
    seed: int = opt(0, "Run seed; every image's seed derives from (seed, class, index).")
    stages: tuple[str, ...] = opt(STAGES, "Stages to run, comma separated (default: all).")
    overwrite: bool = opt(False, "Delete an existing run at --out whose config differs, instead of stopping.")
    shared_local_out: bool = opt(
        False,
        "--out is a local path that is the same shared mount (NFS, ...) on every node; without it a local "
        "--out on a cluster of several nodes is refused, since each node would write to its own disk.",
    )
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- derived -------------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        if self.generate.image_size is not None:
            return self.generate.image_size
        return DEFAULT_IMAGE_SIZE.get(self.dataset or "", 32)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stages"] = list(self.stages)
        return d

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


SECTIONS = ("generate", "augment", "train")


def _fields() -> list[tuple[str | None, dataclasses.Field]]:
    """(section or None, field) for every user-facing option, in help order."""
    out: list[tuple[str | None, dataclasses.Field]] = []
    for f in dataclasses.fields(RunConfig):
        if f.name not in SECTIONS:
            out.append((None, f))
    for sec in SECTIONS:
        cls = {"generate": GenerateConfig, "augment": AugmentConfig, "train": TrainConfig}[sec]
        out.extend((sec, f) for f in dataclasses.fields(cls))
    return out


def _key(f: dataclasses.Field) -> str:
    flag = f.metadata.get("flag")
    return (flag or f.name).lstrip("-").replace("-", "_")


def _base_type(tp: Any) -> Any:
    """int | None -> int; 'tuple[str, ...]' stays tuple."""
    if isinstance(tp, str):
        tp = eval(tp, {**vars(typing), **globals()})  # annotations are strings under `from __future__`
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return origin or tp


def _coerce(name: str, value: Any, tp: Any) -> Any:
    base = _base_type(tp)
    if value is None:
        return None
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if base is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(s).strip() for s in items if str(s).strip())
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        if base is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return value
        return str(value)
    except (TypeError, ValueError) as e:
        raise UserError(f"config: '{name.replace('_', '-')}' must be a {base.__name__}, got {value!r}") from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option; defaults are None so that 'not given' can be told from 'given the default'."""
    parser.add_argument("--config", help="YAML file with the same keys as the flags; flags given here win.")
    for _section, f in _fields():
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + _key(f).replace("_", "-")
        base = _base_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else None
        helptext = f.metadata["help"] + (f" [default: {default}]" if default not in (None, ()) else "")
        if base is bool:
            parser.add_argument(flag, dest=_key(f), action="store_true", default=None, help=helptext)
        else:
            parser.add_argument(flag, dest=_key(f), default=None, metavar=_key(f).upper(), help=helptext)


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option: value")
    return data


def build_config(values: dict[str, Any], yaml_path: str | None = None) -> RunConfig:
    """Merge defaults < YAML < given values (None = not given) into a validated RunConfig."""
    merged: dict[str, Any] = {}
    if yaml_path:
        for k, v in _load_yaml(yaml_path).items():
            merged[str(k).replace("-", "_")] = v
    merged.update({k.replace("-", "_"): v for k, v in values.items() if v is not None})

    known = {_key(f): (sec, f) for sec, f in _fields()}
    unknown = sorted(set(merged) - set(known))
    if unknown:
        raise UserError(f"config: unknown option(s) {', '.join(u.replace('_', '-') for u in unknown)}")

    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for k, v in merged.items():
        sec, f = known[k]
        v = _coerce(k, v, f.type)
        (sections[sec] if sec else top)[f.name] = v
    # Local paths become absolute here, once: Ray workers (Train workers above all) run in other folders.
    for section, name in ((top, "out"), (top, "classes"), (sections["train"], "eval_data")):
        if section.get(name) and "://" not in section[name]:
            section[name] = os.path.abspath(os.path.expanduser(section[name]))
    cfg = RunConfig(
        **top,
        generate=GenerateConfig(**sections["generate"]),
        augment=AugmentConfig(**sections["augment"]),
        train=TrainConfig(**sections["train"]),
    )
    validate(cfg)
    return cfg


def config_from_args(argv: list[str] | None = None, prog: str = "distill.py", doc: str | None = None) -> RunConfig:
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = vars(parser.parse_args(argv))
    yaml_path = args.pop("config")
    return build_config(args, yaml_path)


def validate(cfg: RunConfig) -> None:
    """Sanity checks: everything a user can get wrong, said in one line each, before anything is touched."""
    g = cfg.generate
    if not cfg.out:
        raise UserError("--out is required: a local folder or a URI such as s3://bucket/run")
    if cfg.shared_local_out and "://" in cfg.out and not cfg.out.startswith("file://"):
        raise UserError(f"--shared-local-out is for a local --out on a shared mount; {cfg.out} is already shared")
    if cfg.dataset is None and cfg.classes is None:
        raise UserError(f"give --dataset ({', '.join(DATASETS)}) or --classes FILE")
    if cfg.dataset is not None and cfg.classes is not None:
        raise UserError("give either --dataset or --classes, not both")
    if cfg.dataset is not None and cfg.dataset not in DATASETS:
        raise UserError(f"unknown dataset '{cfg.dataset}': choose one of {', '.join(DATASETS)}, or give --classes FILE")
    if cfg.ipc is None:
        raise UserError("--ipc is required: images per class, e.g. --ipc 20")
    if cfg.ipc < 1:
        raise UserError(f"--ipc must be at least 1, got {cfg.ipc}")
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad or not cfg.stages:
        raise UserError(
            f"--stages: unknown stage(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(STAGES)}"
        )
    for name, value, low in [
        ("steps", g.steps, 1),
        ("gen-resolution", g.gen_resolution, 8),
        ("batch-size", g.batch_size, 1),
        ("unit-size", g.unit_size, 1),
        ("max-retries", g.max_retries, 1),
    ]:
        if value < low:
            raise UserError(f"--{name} must be at least {low}, got {value}")
    if g.gen_resolution % 8:
        raise UserError(f"--gen-resolution must be a multiple of 8 (the VAE's downscale), got {g.gen_resolution}")
    if cfg.image_size < 1 or cfg.image_size > g.gen_resolution:
        raise UserError(
            f"--image-size must be between 1 and --gen-resolution ({g.gen_resolution}), got {cfg.image_size}"
        )
    if g.worker_gpus is not None and g.worker_gpus < 0:
        raise UserError(f"--worker-gpus must be >= 0, got {g.worker_gpus}")
    if g.workers is not None and g.workers < 1:
        raise UserError(f"--workers must be at least 1, got {g.workers}")
    if g.guidance < 0:
        raise UserError(f"--guidance must be >= 0, got {g.guidance}")
    if "{name}" not in g.prompt_template:
        raise UserError(f"--prompt-template must contain {{name}}, got '{g.prompt_template}'")
    if cfg.augment.pda_variants < 0:
        raise UserError(f"--pda-variants must be >= 0, got {cfg.augment.pda_variants}")
    if cfg.train.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {cfg.train.epochs}")
    if cfg.train.eval_runs < 1:
        raise UserError(f"--eval-runs must be at least 1, got {cfg.train.eval_runs}")
    t = cfg.train
    for name, value, low in [
        ("train-batch-size", t.train_batch_size, 1),
        ("net-depth", t.net_depth, 1),
        ("net-width", t.net_width, 1),
        ("eval-every", t.eval_every, 1),
        ("checkpoint-every", t.checkpoint_every, 1),
        ("eval-workers", t.eval_workers if t.eval_workers is not None else 1, 1),
    ]:
        if value < low:
            raise UserError(f"--{name} must be at least {low}, got {value}")
    if t.lr <= 0 or t.momentum < 0 or t.weight_decay < 0:
        raise UserError(
            f"--lr must be > 0 and --momentum, --weight-decay >= 0; got {t.lr}, {t.momentum}, {t.weight_decay}"
        )
    for name, value, choices in [
        ("net-norm", t.net_norm, ("instance", "batch", "group", "none")),
        ("net-act", t.net_act, ("relu", "leakyrelu", "sigmoid")),
        ("net-pool", t.net_pool, ("avg", "max", "none")),
    ]:
        if value not in choices:
            raise UserError(f"--{name} must be one of {', '.join(choices)}, got '{value}'")
    dsa_ops = ("color", "crop", "cutout", "flip", "scale", "rotate")
    bad_ops = [o for o in t.dsa_strategy.split("_") if o not in dsa_ops]
    if t.dsa_strategy.lower() != "none" and bad_ops:
        raise UserError(
            f"--dsa-strategy: unknown op(s) {', '.join(bad_ops)}; use '_'-separated {', '.join(dsa_ops)} or none"
        )


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def generation_fingerprint(cfg: RunConfig, class_names: list[str]) -> str:
    """Everything that decides the pixels of a generated image (not IPC, batch size or worker count)."""
    g = cfg.generate
    return fingerprint(
        {
            "model": g.model,
            "vae": g.vae,
            "steps": g.steps,
            "guidance": g.guidance,
            "gen_resolution": g.gen_resolution,
            "image_size": cfg.image_size,
            "prompt_template": g.prompt_template,
            "seed": cfg.seed,
            "classes": class_names,
        }
    )
