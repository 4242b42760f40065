"""The bridge from CLI flags and YAML files to a RunConfig.

Every config field is one flag and one YAML key, generated from the dataclasses in `config`:
`--prompt-template` == `prompt-template:` (or `prompt_template:`) in YAML == `cfg.generate.prompt_template`.
Flags given on the command line win over the YAML file, which wins over the defaults. Types come from the
fields' annotations (`typing.get_type_hints`), so `Literal[...]` choices, ints, floats, bools, lists and
mappings are checked here, each mistake in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import types
import typing
from typing import Any

from gdd_ray import schema
from gdd_ray.config import RENAMED_OPTIONS, RENAMED_SECTIONS, SECTIONS, STAGES, RunConfig, validate
from gdd_ray.errors import UserError
from gdd_ray.logs import say


@dataclasses.dataclass(frozen=True)
class Option:
    section: str | None  # None = a top-level RunConfig field
    name: str
    type: Any  # the resolved annotation
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@functools.cache  # every config built or read back asks (thousands of times in the tests): resolved once
def options() -> tuple[Option, ...]:
    """Every user-facing option, in help order: top-level fields, then each section's."""
    out = []
    for section, klass in [(None, RunConfig), *SECTIONS.items()]:
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            if section is None and f.name in SECTIONS:  # the sections themselves, not their fields
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append(Option(section, f.name, hints[f.name], default, f.metadata["help"]))
    return tuple(out)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _choice(opt: Option, value: Any, choices: tuple[str, ...], noun: str) -> str:
    if value not in choices:
        raise UserError(f"unknown {noun} '{value}': choose one of {', '.join(choices)}")
    return value


MAX_LIST_ITEMS = 256
MAX_STRING = 4096  # paths, URIs, model ids: a value longer than this is a mistake
MAX_MAPPING_BYTES = 64 * 1024  # --pda-ops given as JSON
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)


def coerce(opt: Option, value: Any) -> Any:
    """A flag's string or a YAML value -> the field's type; UserError naming the option otherwise."""
    if value is None:
        return None
    tp = _strip_optional(opt.type)
    origin = typing.get_origin(tp)
    key = opt.name.replace("_", "-")
    if origin is typing.Literal:
        return _choice(opt, value, typing.get_args(tp), key)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise UserError(f"config: '{key}' must be a comma-separated list, got {value!r}")
        if len(items) > MAX_LIST_ITEMS or not all(isinstance(s, str) for s in items):
            raise UserError(
                f"config: '{key}' must be a list of at most {MAX_LIST_ITEMS} strings, got {schema.shown(value)}"
            )
        items = tuple(s.strip() for s in items if s.strip())
        if typing.get_origin(item) is typing.Literal:
            bad = [s for s in items if s not in typing.get_args(item)]
            if bad:
                raise UserError(
                    f"--{key}: unknown {key.rstrip('s')}(s) {', '.join(bad)}; choose from {', '.join(typing.get_args(item))}"
                )
        return items
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(value, bool):  # YAML `ipc: true` is not the number 1
            raise ValueError(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str) and not _INTEGER.fullmatch(value.strip()):  # no '1_000', no non-ASCII digits
                raise ValueError(value)
            return int(value)
        if tp is float:
            if isinstance(value, str) and not _NUMBER.fullmatch(value.strip()):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number + 0.0  # -0.0 is 0.0: one value, one fingerprint
        if tp is dict:
            if isinstance(value, str):
                value = schema.parse_json(value, f"--{key}", limit=MAX_MAPPING_BYTES)
            if not isinstance(value, dict):
                raise ValueError(value)
            return value
        if not isinstance(value, (str, int, float)):
            raise ValueError(value)
        text = str(value)
        if len(text) > MAX_STRING or "\x00" in text:
            raise UserError(f"config: '{key}' must be text of at most {MAX_STRING} characters without NUL bytes")
        return text
    except schema.Invalid:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        what = {bool: "true or false", int: "an integer", float: "a finite number", dict: "a mapping"}.get(
            tp, "a string"
        )
        raise UserError(f"config: '{key}' must be {what}, got {value!r}") from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option; defaults are None so that 'not given' can be told from 'given the default'."""
    parser.add_argument("--config", help="YAML file with the same keys as the flags; flags given here win.")
    for opt in options():
        default = opt.default
        helptext = opt.help + (f" [default: {default}]" if default not in (None, ()) else "")
        if _strip_optional(opt.type) is bool:
            parser.add_argument(opt.flag, dest=opt.name, action="store_true", default=None, help=helptext)
        else:
            parser.add_argument(opt.flag, dest=opt.name, default=None, metavar=opt.name.upper(), help=helptext)
    for old, new in RENAMED_OPTIONS.items():
        parser.add_argument(
            "--" + old.replace("_", "-"), dest=f"renamed:{old}", default=None, help=f"Old name of --{new}."
        )


def renamed(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Options given by the name an earlier release used, under today's name, with one line saying so (they
    stay accepted for one release); the same option under both names is refused."""
    out = dict(values)
    for key in list(out):
        old = key.removeprefix("renamed:").replace("-", "_")
        if old not in RENAMED_OPTIONS or out[key] is None:
            continue
        new = RENAMED_OPTIONS[old]
        value = out.pop(key)
        if out.get(new) is not None:
            raise UserError(f"{where}: --{old} is the old name of --{new}; give only --{new}")
        say("config", f"--{old} is now --{new} ({where}); the old name goes in the next release")
        out[new] = value
    return out


def load_yaml(path: str) -> dict[str, Any]:
    """A YAML config, read by the one YAML reader (schema.read_yaml: bounded, no aliases, no key twice)."""
    return schema.read_yaml(path, "--config")


def config_from_record(d: Any, where: str) -> RunConfig:
    """A RunConfig from run.json's `config` (RunConfig.to_dict's shape: top-level fields, one mapping per
    section), through the same coercion and checks as flags; schema.Invalid naming `where` otherwise."""
    if not isinstance(d, dict):
        raise schema.Invalid(f"{where}: the config must be a mapping, got {schema.shown(d)}")
    values: dict[str, Any] = {}
    d = {RENAMED_SECTIONS.get(k, k): v for k, v in d.items()}  # a run of an earlier release: its section names
    if isinstance(d.get("train"), dict) and "select" in d["train"]:
        d["train"] = {("pick" if k == "select" else k): v for k, v in d["train"].items()}
    for opt in options():
        section = d.get(opt.section, {}) if opt.section else d
        if not isinstance(section, dict):
            raise schema.Invalid(f"{where}: config.{opt.section} must be a mapping, got {schema.shown(section)}")
        if section.get(opt.name) is not None:
            values[opt.name] = section[opt.name]
    if isinstance(values.get("prompt_templates"), str):  # a record holds the templates, never a file to read
        raise schema.Invalid(f"{where}: config.generate.prompt_templates must be a list of templates")
    try:
        return build_config(values)
    except UserError as e:
        raise schema.Invalid(f"{where} holds an invalid config: {e}") from e


def build_config(values: dict[str, Any], yaml_path: str | None = None) -> RunConfig:
    """Merge defaults < YAML < given values (None = not given) into a validated RunConfig."""
    merged: dict[str, Any] = {}
    if yaml_path:
        spelled: dict[str, str] = {}
        for k, v in load_yaml(yaml_path).items():
            name = str(k).replace("-", "_")
            if name in spelled:  # `prompt-template:` and `prompt_template:` are one option given twice
                raise UserError(f"--config {yaml_path}: '{spelled[name]}' and '{k}' are the same option; keep one")
            spelled[name] = str(k)
            merged[name] = v
        merged = renamed(merged, f"--config {yaml_path}")
    merged.update(renamed({k.replace("-", "_"): v for k, v in values.items() if v is not None}, "flags"))

    known = {opt.name: opt for opt in options()}
    unknown = sorted(set(merged) - set(known))
    if unknown:
        raise UserError(f"config: unknown option(s) {', '.join(u.replace('_', '-') for u in unknown)}")

    if isinstance(merged.get("prompt_templates"), str):  # a file of templates (a YAML list is the templates)
        from gdd_ray.classes import load_templates

        merged["prompt_templates"] = load_templates(os.path.expanduser(merged["prompt_templates"]))
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for k, v in merged.items():
        opt = known[k]
        (sections[opt.section] if opt.section else top)[k] = coerce(opt, v)
    if "stages" not in top and sections["select"].get("select_by") == "clip":
        top["stages"] = STAGES  # --select-by clip is what turns the select stage on
    # Local paths become absolute here, once: Ray workers (Train workers above all) run in other folders.
    for section, name in ((top, "out"), (top, "classes"), (sections["train"], "eval_data")):
        if section.get(name) and "://" not in section[name]:
            section[name] = os.path.abspath(os.path.expanduser(section[name]))
    cfg = RunConfig(**top, **{s: klass(**sections[s]) for s, klass in SECTIONS.items()})
    validate(cfg)
    return cfg


def config_from_args(argv: list[str] | None = None, prog: str = "distill.py", doc: str | None = None) -> RunConfig:
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = vars(parser.parse_args(argv))
    yaml_path = args.pop("config")
    return build_config(args, yaml_path)
