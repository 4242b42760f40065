"""One schema at every door: what gdd-ray reads from disk or from the environment is checked here, for type,
bounds, depth and size, before any other code uses it.

    files      run.json, _manifest.json, _summary.json, leases, evaluation records (runs/runNN.json,
               results.json), Parquet footer values, YAML configs and sweep files
    environment  GDD_RAY_CACHE, GDD_RAY_LEASE_EXPIRY_S, GDD_RAY_TIMEOUT_S, RAY_ADDRESS, STORAGE_EMULATOR_HOST

A value that fails is `Invalid`: a UserError (one line naming the file or variable and the first wrong value,
exit 2) that is also a ValueError, so a reader for which a damaged file only means "not done" (a summary, a
manifest, a lease, a finished run's record: the next run rewrites it) catches it as it catches bad JSON, and
a reader that cannot go on without it (run.json, a config) lets it through. Nothing here writes anything.

The specs are plain callables (`spec(value, path) -> value`), composed: `Fields`, `Map`, `List`, `Int`, `Num`,
`Str`, `Opt`, `OneOf`, `Timestamp`, `Anything`. JSON is parsed with a size bound, without NaN or Infinity,
and refused past MAX_DEPTH levels of nesting (Python's parser recurses: a few kilobytes of `[[[[` would
otherwise end in RecursionError wherever the file is read).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from gdd_ray.errors import UserError

MAX_DEPTH = 32  # ours nest at most ~6 levels (a sweep point's config in Tune's records is the deepest)
MAX_JSON_BYTES = 64 * 2**20
MAX_STR = 1 << 16
MAX_SHARDS = 1_000_000  # plan.MAX_SHARDS: no manifest of a plan the pipeline accepts lists more
MAX_ROWS = 10_000_000
MAX_CLASSES = 100_000  # classes.MAX_CLASSES
STAGE_NAMES = ("generate", "select", "augment", "train")  # config.STAGES (imported from there would be a cycle)


class Invalid(UserError, ValueError):
    """A file or variable that is not what it must be: one line naming it and the first wrong value."""


def shown(value: Any, limit: int = 60) -> str:
    """A value as a message quotes it: repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- specs ---------------------------------------------------------------------------------------------

Spec = Callable[[Any, str], Any]


class Int:
    def __init__(self, low: int = 0, high: int = 2**63 - 1):
        self.low, self.high = low, high

    def __call__(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"{path} must be an integer, got {shown(value)}")
        if not self.low <= value <= self.high:
            raise Invalid(f"{path} must be between {self.low} and {self.high}, got {value}")
        return value


class Num:
    """A finite number (int or float) within bounds."""

    def __init__(self, low: float = -math.inf, high: float = math.inf):
        self.low, self.high = low, high

    def __call__(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Invalid(f"{path} must be a finite number, got {shown(value)}")
        if not self.low <= value <= self.high:
            raise Invalid(f"{path} must be between {self.low} and {self.high}, got {value}")
        return value


class Str:
    def __init__(self, max_len: int = MAX_STR, pattern: str | None = None):
        self.max_len = max_len
        self.pattern = re.compile(pattern) if pattern else None

    def __call__(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise Invalid(f"{path} must be a string, got {shown(value)}")
        if len(value) > self.max_len:
            raise Invalid(f"{path} is {len(value)} characters long; at most {self.max_len}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise Invalid(f"{path} is not a valid value: {shown(value)}")
        return value


class Bool:
    def __call__(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise Invalid(f"{path} must be true or false, got {shown(value)}")
        return value


class OneOf:
    def __init__(self, *choices: Any):
        self.choices = choices

    def __call__(self, value: Any, path: str) -> Any:
        if value not in self.choices:
            raise Invalid(f"{path} must be one of {', '.join(map(str, self.choices))}, got {shown(value)}")
        return value


class Timestamp:
    """An ISO 8601 time, as `datetime.isoformat` writes it (status computes rates from them)."""

    def __call__(self, value: Any, path: str) -> str:
        Str(64)(value, path)
        try:
            datetime.fromisoformat(value)
        except ValueError as e:
            raise Invalid(f"{path} is not an ISO time: {shown(value)}") from e
        return value


class Opt:
    def __init__(self, spec: Spec):
        self.spec = spec

    def __call__(self, value: Any, path: str) -> Any:
        return None if value is None else self.spec(value, path)


class Anything:
    """Any JSON value (its depth was bounded when it was parsed)."""

    def __call__(self, value: Any, path: str) -> Any:
        return value


class List:
    def __init__(self, item: Spec, max_len: int = 1_000_000):
        self.item, self.max_len = item, max_len

    def __call__(self, value: Any, path: str) -> list:
        if not isinstance(value, list):
            raise Invalid(f"{path} must be a list, got {shown(value)}")
        if len(value) > self.max_len:
            raise Invalid(f"{path} holds {len(value)} items; at most {self.max_len}")
        item = self.item
        for i, v in enumerate(value):
            item(v, f"{path}[{i}]")
        return value


class Map:
    """A mapping of string keys (each checked by `key`) to values of one spec."""

    def __init__(self, value: Spec, key: Spec | None = None, max_len: int = 100_000):
        self.value, self.key, self.max_len = value, key or Str(200), max_len

    def __call__(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            raise Invalid(f"{path} must be a mapping, got {shown(value)}")
        if len(value) > self.max_len:
            raise Invalid(f"{path} holds {len(value)} entries; at most {self.max_len}")
        for k, v in value.items():
            self.key(k, f"{path} key")
            self.value(v, f"{path}.{k}")
        return value


class Fields:
    """A mapping with named fields: `required` must be there, `optional` may be; others are allowed (a newer
    version's record) unless `closed`."""

    def __init__(self, required: dict[str, Spec] | None = None, optional: dict[str, Spec] | None = None, closed=False):
        self.required, self.optional, self.closed = required or {}, optional or {}, closed

    def __call__(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            raise Invalid(f"{path} must be a mapping, got {shown(value)}")
        for name, spec in self.required.items():
            if name not in value:
                raise Invalid(f"{path} lacks '{name}'")
            spec(value[name], f"{path}.{name}")
        for name, spec in self.optional.items():
            if name in value:
                spec(value[name], f"{path}.{name}")
        if self.closed:
            extra = sorted(set(value) - set(self.required) - set(self.optional), key=str)
            if extra:
                raise Invalid(f"{path} has unknown field(s) {', '.join(map(str, extra[:5]))}")
        return value


# ---- JSON ----------------------------------------------------------------------------------------------


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def depth(obj: Any) -> int:
    """How deeply lists and mappings nest in `obj` (0 for a scalar); iterative, so any depth is measured."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in node if isinstance(child, (dict, list)))
    return deepest


def parse_json(data: bytes | str, where: str, limit: int = MAX_JSON_BYTES) -> Any:
    """JSON text -> a value, bounded in size and depth, NaN and Infinity refused. `where` names it in messages."""
    if len(data) > limit:
        raise Invalid(f"{where} is {len(data)} bytes; more than {limit} (not a file gdd-ray writes)")
    try:
        value = json.loads(data, parse_constant=_no_constant)
    except RecursionError as e:
        raise Invalid(f"{where} nests deeper than {MAX_DEPTH} levels") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise Invalid(f"{where} is not valid JSON ({str(e).splitlines()[0][:120]})") from e
    if depth(value) > MAX_DEPTH:
        raise Invalid(f"{where} nests deeper than {MAX_DEPTH} levels")
    return value


def load(data: bytes | str, spec: Spec, where: str, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse and check: the value, or Invalid naming `where` and the first wrong field."""
    value = parse_json(data, where, limit)
    spec(value, where)
    return value


def read(loc, name: str, spec: Spec, limit: int = MAX_JSON_BYTES) -> Any | None:
    """A JSON file of a storage.Location, checked (None when it does not exist). OSError propagates."""
    from gdd_ray import storage

    if not loc.exists(name):
        return None
    return load(loc.read_bytes(name), spec, storage.join(loc.uri, name), limit)


def read_or_none(loc, name: str, spec: Spec, limit: int = MAX_JSON_BYTES) -> Any | None:
    """For a file whose damage only means "not done": the checked value, or None when it is missing, unreadable
    or not what it must be (the stage that owns it rewrites it)."""
    try:
        return read(loc, name, spec, limit)
    except (OSError, ValueError):
        return None


# ---- the files ------------------------------------------------------------------------------------------

STAGE = OneOf(*STAGE_NAMES)
FINGERPRINT = Str(64, r"[0-9A-Za-z_.:-]*")
SHARD_NAME = Str(64, r"u\d{10}-\d{10}\.parquet|c\d{5,}-i\d{6,}-\d{6,}\.parquet")  # today's, or an earlier release's

RUN_RECORD = Fields(
    optional={
        "config": Map(Anything()),  # checked as a RunConfig by those who read it (config.RunConfig.from_dict)
        "classes": List(
            Fields(
                required={"label": Int(0, MAX_CLASSES), "class_id": Str(1000), "name": Str(1000)},
                optional={"description": Str(10_000), "line": Int(0, 2**31)},
            ),
            MAX_CLASSES,
        ),
        "fingerprints": Map(FINGERPRINT, key=STAGE),
        "inputs": Map(Map(Anything()), key=STAGE),
        "stages": Map(
            Fields(
                optional={
                    "started": Opt(Timestamp()),
                    "finished": Opt(Timestamp()),
                    "read": Fields(required={"stage": STAGE, "manifest": Str(64)}),  # what the stage consumed
                }
            ),
            key=STAGE,
        ),
        "stage_dirs": Map(Str(4096), key=STAGE),
        "sources": Map(Opt(STAGE), key=STAGE),  # stage -> the stage whose output it reads
        "environment": Map(Anything()),
        "versions": Map(Anything()),
        "created": Opt(Timestamp()),
        "updated": Opt(Timestamp()),
    }
)


def run_record(data: bytes, where: str) -> dict[str, Any]:
    """run.json, checked: every field any reader uses has its type, and the classes are labelled 0..C-1."""
    record = load(data, RUN_RECORD, where)
    for i, c in enumerate(record.get("classes", [])):
        if c["label"] != i:
            raise Invalid(f"{where}: classes[{i}] has label {c['label']}; the classes must be labelled 0..C-1 in order")
    return record


MANIFEST = Fields(
    required={
        "stage": STAGE,
        "fingerprint": FINGERPRINT,
        "shards": List(
            Fields(required={"name": SHARD_NAME, "rows": Int(0, MAX_ROWS)}, optional={"bytes": Opt(Int(0, 2**50))}),
            MAX_SHARDS,
        ),
    },
    optional={"written": Str(64), "ipc": Opt(Int(0, MAX_ROWS))},
)

TOTALS = Map(Opt(Num(0)))
SUMMARY = Fields(
    required={
        "stage": STAGE,
        "fingerprint": FINGERPRINT,
        "started": Timestamp(),
        "finished": Timestamp(),
        "totals": Fields(required={k: Opt(Num(0)) for k in ("units", "images", "images_made", "wall_s")}),
    },
    optional={
        "ipc": Opt(Int(0, 10**7)),
        "time_budget_s": Opt(Num(0)),
        "per_worker": Map(Fields(optional={"render_s": Num(0)})),
        "accuracy_mean": Opt(Num(0, 1)),
        "accuracy_std": Opt(Num(0, 1)),
        "wall_s": Opt(Num(0)),
    },
)

LEASE = Fields(
    required={
        "holder": Fields(
            optional={
                "host": Str(300),
                "pid": Int(0, 2**31),
                "pid_start": Opt(Str(40)),
                "machine": Opt(Str(300)),
                "ray_job": Opt(Str(300)),
            }
        ),
        "token": Str(64),
        "heartbeat_t": Num(0, 1e11),
        "expiry_s": Num(1, 86400),
    },
    optional={"generation": Int(), "started": Str(64), "heartbeat": Str(64)},
)

EVAL_RUN = Fields(
    required={"fingerprint": FINGERPRINT},
    optional={"test_acc": Opt(Num(0, 1)), "run": Int(0, 10**6), "source_manifest": Opt(Str(64))},
)
RESULTS = Fields(
    required={"fingerprint": FINGERPRINT, "runs": List(Map(Anything()))},
    optional={
        "accuracy_mean": Opt(Num(0, 1)),
        "accuracy_std": Opt(Num(0, 1)),
        "accuracies": List(Opt(Num(0, 1))),
        "protocol": Map(Anything()),
        "per_class": List(Map(Anything())),
    },
)
METRICS_ROW = Map(Anything(), max_len=1000)


# ---- Parquet footers -----------------------------------------------------------------------------------


def footer_int(kv: dict[str, str], key: str, low: int = 0, high: int = 2**31) -> int | None:
    """An integer footer value (image size, variants, rows), None when absent, empty or not one in bounds."""
    text = kv.get(key, "")
    if not re.fullmatch(r"\d{1,12}", text):
        return None
    value = int(text)
    return value if low <= value <= high else None


# ---- YAML ----------------------------------------------------------------------------------------------

MAX_YAML_BYTES = 1 * 2**20  # a config is a few dozen keys; anything near this is not one


def read_yaml(path: str, what: str = "--config") -> dict[str, Any]:
    """A YAML mapping (a config, a sweep file), read safely: bounded in size and depth, without aliases (`&a`,
    `*a`: a few hundred bytes could expand into unbounded memory) and without a key given twice (YAML would
    keep the last one silently)."""
    import yaml

    where = f"{what} {path}"
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise UserError(f"{where}: cannot read it ({e.strerror})") from e
    if len(raw) > MAX_YAML_BYTES:
        raise UserError(f"{where}: larger than {MAX_YAML_BYTES // 2**20} MiB; not a config file")
    try:
        text = raw.decode("utf-8-sig")
        level = 0
        # Events are a linear scan of the text: an alias, or nesting past MAX_DEPTH, is refused before anything
        # is built (the composer recurses once per level).
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise UserError(f"{where}: YAML aliases (*name) are not allowed in a config; write the value out")
            if isinstance(event, yaml.CollectionStartEvent):
                level += 1
                if level > MAX_DEPTH:
                    raise UserError(f"{where}: nests deeper than {MAX_DEPTH} levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                level -= 1
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not a UTF-8 text file (byte {e.start})") from e
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from e
    except _DuplicateKey as e:
        raise UserError(f"{where}: the key '{e.key}' is given twice (line {e.line}); keep one") from e
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of option: value")
    return data


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        self.key, self.line = key, line


def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key (a list): construct_mapping says so in YAML's words
                    break
                if duplicate:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return Loader


_UniqueKeyLoader = _unique_key_loader()


# ---- environment -----------------------------------------------------------------------------------------


def env_number(name: str, default: float, low: float, high: float) -> float:
    """A number of seconds (or any bounded number) from the environment; its default when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # also nan and inf
        raise Invalid(f"{name} must be a number between {low:g} and {high:g}, got {shown(raw)}")
    return value


def env_folder(name: str, default: Path) -> Path:
    """A folder named by the environment (its default when unset): it may not exist yet, but if it does it is a
    folder, and its path is one (no NUL, not absurdly long)."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    if "\x00" in raw or len(raw) > 4096:
        raise Invalid(f"{name} is not a usable path: {shown(raw)}")
    path = Path(os.path.expanduser(raw))
    if path.exists() and not path.is_dir():
        raise Invalid(f"{name}={raw} is not a folder (a file is there); point it at a folder, or unset it")
    for parent in path.parents:  # a file where a parent folder should be: mkdir would fail deep inside a stage
        if parent.exists():
            if not parent.is_dir():
                raise Invalid(f"{name}={raw}: {parent} is a file, not a folder")
            break
    return path


_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]{1,253})"
_HOST_PORT = re.compile(rf"({_HOST}):(\d{{1,5}})")


def host_port(text: str, what: str) -> tuple[str, int]:
    """`host:port` (a name, an IPv4 address or a bracketed IPv6 one) with a port 1..65535."""
    m = _HOST_PORT.fullmatch(text)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise Invalid(f"{what}: expected host:port (e.g. 10.0.0.5:6379), got {shown(text)}")
    return m.group(1).strip("[]"), int(m.group(2))


def endpoint_url(text: str, what: str, default_scheme: str = "http") -> str:
    """An HTTP(S) endpoint given as `host:port` or `http(s)://host[:port][/path]`, normalised to a URL."""
    from urllib.parse import urlparse

    url = text.strip() if "://" in text else f"{default_scheme}://{text.strip()}"
    try:
        parsed = urlparse(url)
        port = parsed.port
    except ValueError as e:
        raise Invalid(f"{what}: not an endpoint URL ({e}): {shown(text)}") from e
    if parsed.scheme not in ("http", "https") or not parsed.hostname or not re.fullmatch(_HOST, parsed.hostname):
        raise Invalid(f"{what}: expected http(s)://host:port or host:port, got {shown(text)}")
    if port is not None and not 1 <= port <= 65535:
        raise Invalid(f"{what}: port out of range in {shown(text)}")
    return url.rstrip("/")


def ray_address(text: str) -> str:
    """RAY_ADDRESS as ray.init takes it: `auto`, `local`, `host:port` (the GCS) or `ray://host:port` (Ray Client)."""
    value = text.strip()
    if value in ("auto", "local"):
        return value
    if value.startswith(("http://", "https://")):
        raise Invalid(
            f"RAY_ADDRESS={value} is a dashboard address (what `ray job submit` takes); a driver joins a cluster "
            "at its GCS address (host:6379) or ray://host:10001; unset it to start a local Ray"
        )
    try:
        host_port(value.removeprefix("ray://"), "RAY_ADDRESS")
    except Invalid as e:
        raise Invalid(f"{e}, ray://host:port or auto; unset it to start a local Ray") from e
    return value


def check_environment() -> None:
    """Every variable a run reads, checked at its start (a bad one is one line before anything is done, not a
    failure when a stage first needs it): the same checks the readers make at use."""
    from gdd_ray import lease, reach

    reach.timeout_s()
    lease.expiry_s()
    env_folder("GDD_RAY_CACHE", Path.home())
    for name in ("STORAGE_EMULATOR_HOST", "HF_ENDPOINT"):
        if os.environ.get(name, "").strip():
            endpoint_url(os.environ[name], name, "https" if name == "HF_ENDPOINT" else "http")
    if os.environ.get("RAY_ADDRESS", "").strip():
        ray_address(os.environ["RAY_ADDRESS"])
