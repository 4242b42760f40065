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
import json
import math
import os
import types
import typing
from typing import Any

from gdd_ray.config import SECTIONS, STAGES, RunConfig, validate
from gdd_ray.errors import UserError


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


def options() -> list[Option]:
    """Every user-facing option, in help order: top-level fields, then each section's."""
    out = []
    for section, klass in [(None, RunConfig), *SECTIONS.items()]:
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            if section is None and f.name in SECTIONS:  # the sections themselves, not their fields
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append(Option(section, f.name, hints[f.name], default, f.metadata["help"]))
    return out


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _choice(opt: Option, value: Any, choices: tuple[str, ...], noun: str) -> str:
    if value not in choices:
        raise UserError(f"unknown {noun} '{value}': choose one of {', '.join(choices)}")
    return value


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
        items = tuple(str(s).strip() for s in items if str(s).strip())
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
            return int(value)
        if tp is float:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
        if tp is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return value
        if not isinstance(value, (str, int, float)):
            raise ValueError(value)
        return str(value)
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


MAX_YAML_BYTES = 1 * 2**20  # a config is a few dozen keys; anything near this is not one


def load_yaml(path: str) -> dict[str, Any]:
    """A YAML config, read safely: bounded in size, and without aliases (`&a` / `*a`), which a config never
    needs and which let a few hundred bytes expand into unbounded memory (an alias bomb)."""
    import yaml

    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror})") from e
    if len(raw) > MAX_YAML_BYTES:
        raise UserError(f"--config {path}: larger than {MAX_YAML_BYTES // 2**20} MiB; not a config file")
    try:
        text = raw.decode("utf-8-sig")
        # Events are a linear scan of the text: an alias is refused before anything is expanded.
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise UserError(
                    f"--config {path}: YAML aliases (*name) are not allowed in a config; write the value out"
                )
        data = yaml.safe_load(text) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"--config {path}: not a UTF-8 text file (byte {e.start})") from e
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option: value")
    return data


def build_config(values: dict[str, Any], yaml_path: str | None = None) -> RunConfig:
    """Merge defaults < YAML < given values (None = not given) into a validated RunConfig."""
    merged: dict[str, Any] = {}
    if yaml_path:
        for k, v in load_yaml(yaml_path).items():
            merged[str(k).replace("-", "_")] = v
    merged.update({k.replace("-", "_"): v for k, v in values.items() if v is not None})

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
    if "stages" not in top and sections["clip"].get("select_by") == "clip":
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
