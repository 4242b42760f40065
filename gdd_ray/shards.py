"""The shard contract every stage, the exports and `status` share.

Three Parquet shard kinds, one folder each:
    generated   `image` {bytes: PNG, path}, label, class_id, class_name, prompt, seed, index
    selected    the generated columns of the images the select stage kept + `clip_score`, `clip_top1` and
                `source_index` (the generated index); `index` is the position among the class's kept images,
                so the kept set is images 0..IPC-1 as in a run without selection; named by the kept units
    augmented   the generated columns + `variant` (0 = the original, bytes untouched) and `variant_seed`;
                rows image-major (image 0 variants 0..K, image 1 ...), named after their input shard
Hugging Face `datasets` reads either folder, with `image` typed as an Image feature.

A shard's footer (Parquet key-value metadata) says what it was made for, so "complete and current?" is
judged from the footer alone: `ShardSpec` is what a stage expects of one output shard, `shard_problem`
says why a shard falls short of it. A stage whose every shard passes writes `_manifest.json` last;
downstream stages, exports and `status` read that manifest instead of re-planning the run.

Shards are committed whole (storage.Location.write_bytes): after any crash a shard is complete or absent.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
from PIL import Image

from gdd_ray import schema, storage
from gdd_ray.plan import SHARD_SUFFIX, WorkUnit, is_shard_name, parse_shard_name, parse_unit_key

MANIFEST_FILE = "_manifest.json"
SET_ASIDE_SUFFIX = ".corrupt"  # a shard `status --verify` found a corrupt image in: NAME.corrupt, outside `*.parquet`

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
GENERATED_SCHEMA = pa.schema(
    [
        ("image", IMAGE_TYPE),
        ("label", pa.int32()),
        ("class_id", pa.string()),
        ("class_name", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("index", pa.int32()),
    ]
)
SELECTED_SCHEMA = (
    GENERATED_SCHEMA.append(pa.field("clip_score", pa.float32()))
    .append(pa.field("clip_top1", pa.bool_()))
    .append(pa.field("source_index", pa.int32()))
)
AUGMENTED_SCHEMA = GENERATED_SCHEMA.append(pa.field("variant", pa.int32())).append(pa.field("variant_seed", pa.int64()))

# Footer keys.
FINGERPRINT = "gdd_ray.fingerprint"  # the fingerprint of the stage that wrote the shard
UNIT = "gdd_ray.unit"  # the unit a shard holds: "start:stop:classes" (plan.WorkUnit.key)
IMAGE_SIZE = "gdd_ray.image_size"
SOURCE = "gdd_ray.source"  # augmented: the input shard's name
SOURCE_ROWS = "gdd_ray.source_rows"
SOURCE_FINGERPRINT = "gdd_ray.source_fingerprint"
VARIANTS = "gdd_ray.variants"
# What a mismatch of each checked footer key means, in the words a user reads.
_MISMATCH = {UNIT: "written for another unit", SOURCE: "made from another input", FINGERPRINT: "another fingerprint"}


def _hf_features(schema: pa.Schema) -> str:
    """The `huggingface` footer entry: `datasets` reads it to type `image` as an Image feature."""
    names = {
        pa.int32(): "int32",
        pa.int64(): "int64",
        pa.string(): "string",
        pa.float32(): "float32",
        pa.bool_(): "bool",
    }
    feats: dict[str, Any] = {}
    for f in schema:
        feats[f.name] = {"_type": "Image"} if f.type == IMAGE_TYPE else {"dtype": names[f.type], "_type": "Value"}
    return json.dumps({"info": {"features": feats}})


HF_FEATURES = {
    "generated": _hf_features(GENERATED_SCHEMA),
    "selected": _hf_features(SELECTED_SCHEMA),
    "augmented": _hf_features(AUGMENTED_SCHEMA),
}


# ---- pixels -----------------------------------------------------------------------------------------


def encode_png(pixels: np.ndarray) -> bytes:
    """HxWx3 uint8 -> PNG bytes. compress_level 1: PNG of small images is CPU-bound, ratio barely changes."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def image_column(pngs: list[bytes], paths: list[str]) -> pa.Array:
    return pa.array([{"bytes": b, "path": p} for b, p in zip(pngs, paths)], type=IMAGE_TYPE)


def png_bytes(table: pa.Table) -> list[bytes]:
    return table.column("image").combine_chunks().field("bytes").to_pylist()


# ---- writing ----------------------------------------------------------------------------------------


def generated_table(
    unit: WorkUnit,
    class_ids: list[str],
    class_names: list[str],
    prompts: list[str],
    seeds: list[int],
    pngs: list[bytes],
) -> pa.Table:
    """The rows of one generated shard, in position order; the lists hold one entry per image (a unit spans
    classes, and templates may differ)."""
    images = unit.images()
    assert len(pngs) == len(images) == len(seeds) == len(prompts) == len(class_ids) == len(class_names)
    return pa.Table.from_arrays(
        [
            image_column(pngs, [f"{label:05d}_{index:06d}.png" for label, index in images]),
            pa.array([label for label, _ in images], pa.int32()),
            pa.array(class_ids, pa.string()),
            pa.array(class_names, pa.string()),
            pa.array(prompts, pa.string()),
            pa.array(seeds, pa.int64()),
            pa.array([index for _, index in images], pa.int32()),
        ],
        schema=GENERATED_SCHEMA,
    )


def generated_footer(unit: WorkUnit, fingerprint: str, image_size: int) -> dict[str, str]:
    return {FINGERPRINT: fingerprint, UNIT: unit.key, IMAGE_SIZE: str(image_size)}


def write_shard(loc: storage.Location, name: str, table: pa.Table, footer: dict[str, str]) -> int:
    """Commit one shard (footer + the Hugging Face features of its kind); returns its size in bytes."""
    cols = table.column_names
    kind = "augmented" if "variant" in cols else "selected" if "clip_score" in cols else "generated"
    data = storage.parquet_bytes(table, {**footer, "huggingface": HF_FEATURES[kind]})
    loc.write_bytes(name, data)
    return len(data)


# ---- "complete and current?" --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSpec:
    """What one output shard of a stage must be: its name, its rows, and footer values that must match."""

    name: str
    rows: int
    footer: tuple[tuple[str, str], ...]


def generated_spec(unit: WorkUnit, fingerprint: str) -> ShardSpec:
    return ShardSpec(unit.shard_name, unit.size, ((UNIT, unit.key), (FINGERPRINT, fingerprint)))


def selected_spec(unit: WorkUnit, fingerprint: str) -> ShardSpec:
    """A kept unit of the select stage: positions unit.start..stop-1 among its class's kept images."""
    return generated_spec(unit, fingerprint)


SCORES_DIR = "scores"  # the select stage's score files, OUT/selected/scores/: one per generated shard


def score_spec(unit: WorkUnit, fingerprint: str) -> ShardSpec:
    """A select stage's score file: named after its generated shard, one row per image, this fingerprint."""
    return ShardSpec(unit.shard_name, unit.size, ((SOURCE, unit.shard_name), (FINGERPRINT, fingerprint)))


def augmented_spec(source: str, source_rows: int, variants: int, fingerprint: str) -> ShardSpec:
    return ShardSpec(source, source_rows * (variants + 1), ((SOURCE, source), (FINGERPRINT, fingerprint)))


def shard_problem(meta: pq.FileMetaData | Exception, spec: ShardSpec) -> str | None:
    """Why a shard must be redone (None = it is complete and current), judged from its footer."""
    if isinstance(meta, Exception):
        return f"unreadable ({type(meta).__name__})"
    if meta.num_rows != spec.rows:
        return f"{'short' if meta.num_rows < spec.rows else 'long'} ({meta.num_rows} of {spec.rows} rows)"
    kv = storage.footer_metadata(meta)
    for key, want in spec.footer:
        if kv.get(key) != want:
            return _MISMATCH.get(key, f"another {key}")
    return None


@dataclass
class Check:
    """A folder judged against the specs of a stage's output."""

    done: list[ShardSpec]
    todo: list[ShardSpec]  # missing or to redo, in spec order
    problems: dict[str, str]  # name -> why it must be redone (present but not complete and current)
    foreign: list[str]  # our shard names that no spec asks for (a larger --ipc earlier, ...)
    corrupt: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # decode=True: name -> its bad images
    sizes: dict[str, int] = field(default_factory=dict)  # every shard file in the folder: name -> bytes


def check_folder(
    loc: storage.Location,
    specs: list[ShardSpec],
    decode: bool = False,
    manifest: Manifest | None = None,
) -> Check:
    """List the folder once, read the footers of the expected shards in parallel, judge each. With `decode`,
    a shard whose footer passes is also read whole and every image and row checked (`status --verify`,
    `corrupt_images`): a footer cannot vouch for the
    bytes under it, so this is the one check that finds a damaged image. With the stage's `manifest`, a shard
    whose size differs from the one recorded when it was written has been changed since, whatever its footer
    says: it is redone too."""
    sizes = loc.sizes(SHARD_SUFFIX)
    present = set(sizes)
    wanted = {s.name: s for s in specs}
    metas = storage.footers(loc, sorted(present & set(wanted)))
    problems = {n: why for n, m in metas.items() if (why := shard_problem(m, wanted[n])) is not None}

    corrupt: dict[str, list[dict[str, Any]]] = {}
    if decode:
        passed = [n for n in metas if n not in problems]
        with ThreadPoolExecutor(max_workers=min(8, len(passed) or 1)) as pool:  # PIL decodes without the GIL
            for name, bad in zip(passed, pool.map(lambda n: corrupt_images(loc, n), passed)):
                if bad:
                    corrupt[name] = bad
                    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
                    problems[name] = f"corrupt image {_where(bad[0])}{more}"
    recorded = {e["name"]: e.get("bytes") for e in manifest.shards} if manifest is not None else {}
    for n in metas:
        if n not in problems and recorded.get(n, sizes[n]) != sizes[n]:
            problems[n] = f"changed since its manifest was written ({recorded[n]} bytes, now {sizes[n]})"
    done = [s for s in specs if s.name in metas and s.name not in problems]
    todo = [s for s in specs if s.name not in metas or s.name in problems]
    foreign = sorted(n for n in present - set(wanted) if is_shard_name(n))
    return Check(done, todo, problems, foreign, corrupt, sizes)


def corrupt_images(loc: storage.Location, name: str) -> list[dict[str, Any]]:
    """The rows of one shard that are not what its name and footer say, each as {row, label, index, variant,
    why} (row None: the shard's data pages themselves are unreadable, whatever its footer says):

    - the image: PNG bytes, RGB, of the footer's image size (format, mode and size are read from the header,
      so a 50-MP picture is refused before a pixel of it is decoded), then every pixel decoded;
    - the row: the unit's images in position order (label and index; a kept image's index is its position
      among the kept), each with its variants 0..K in order in an augmented shard."""
    try:
        kv = storage.footer_metadata(storage.read_parquet_footer(loc, name))
        table = read_shard(loc, name, ["image", "label", "index", "variant"])
        cols = {c: table.column(c).to_pylist() for c in ("label", "index", "variant")}
        pngs = png_bytes(table)
    except Exception as e:  # a torn or overwritten data page under a valid footer
        return [{"row": None, "label": None, "index": None, "variant": None, "why": f"unreadable ({type(e).__name__})"}]
    unit = parse_unit_key(kv.get(UNIT))
    expected = unit.images() if unit is not None and unit.shard_name == name else None
    size = schema.footer_int(kv, IMAGE_SIZE, 1, 1 << 16)
    k1 = (schema.footer_int(kv, VARIANTS, 0, 1 << 16) or 0) + 1
    bad = []
    for row, data in enumerate(pngs):
        label, index, variant = (cols[c][row] for c in ("label", "index", "variant"))
        why = _row_problem(expected, row, k1, label, index, variant) or _image_problem(data, size)
        if why is not None:
            bad.append({"row": row, "label": label, "index": index, "variant": variant, "why": why})
    return bad


def _row_problem(expected: list[tuple[int, int]] | None, row: int, k1: int, label, index, variant) -> str | None:
    """Why row `row` is not the unit's image row // k1, variant row % k1 (None when it is, or the unit is unknown)."""
    if expected is None:
        return None
    if row // k1 >= len(expected):
        return f"row {row} past the unit's {len(expected)} images"
    want = (*expected[row // k1], row % k1)
    if (label, index, variant) != want:
        return f"(label {label}, index {index}, variant {variant}) where the unit has {want}"
    return None


def _image_problem(data: bytes | None, size: int | None) -> str | None:
    """Why stored bytes are not one of our images (None = they are): a PNG, RGB, size x size, every pixel decoding."""
    if not data:
        return "no bytes"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                return f"{im.format or 'unknown'} bytes, not a PNG"
            if size is not None and im.size != (size, size):
                return f"{im.size[0]}x{im.size[1]} px, not the footer's {size}x{size}"
            if im.mode != "RGB":
                return f"mode {im.mode}, not RGB"
            im.load()  # decodes every pixel: a header that opens can still hide a broken stream
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error... for damaged data
        return f"{type(e).__name__}: {e}"[:200]
    return None


def _where(img: dict[str, Any]) -> str:
    if img["row"] is None:
        return f"data: {img['why']}"
    variant = f", variant {img['variant']}" if img["variant"] else ""
    return f"at row {img['row']} (label {img['label']}, index {img['index']}{variant}): {img['why']}"


# ---- the manifest -------------------------------------------------------------------------------------


@dataclass
class Manifest:
    """A finished stage's output: written last, so its presence (with the stage's fingerprint) means done.
    It is a claim, checked against the plan and the files (`manifest_problem`) before anyone relies on it."""

    stage: str
    fingerprint: str
    shards: list[dict[str, Any]]  # {name, rows, bytes} in plan order
    ipc: int | None = None  # every class holds images 0..ipc-1 in the listed shards (a time budget may stop short)
    written: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def names(self) -> list[str]:
        return [s["name"] for s in self.shards]

    @property
    def rows(self) -> dict[str, int]:
        return {s["name"]: int(s["rows"]) for s in self.shards}

    @property
    def images(self) -> int:
        return sum(int(s["rows"]) for s in self.shards)

    @property
    def digest(self) -> str:
        """What a consumer read, in 16 hex digits: the same listing gives the same digest whenever it was written,
        so a later stage can tell that its input changed (a time budget grew it, a stage was redone)."""
        what = {"stage": self.stage, "fingerprint": self.fingerprint, "shards": self.shards, "ipc": self.ipc}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def write_manifest(
    loc: storage.Location, stage: str, fingerprint: str, specs: list[ShardSpec], ipc: int, sizes: dict[str, int]
) -> Manifest:
    """Record `specs` (all verified complete and current by the caller) with their sizes on storage (`sizes`, from
    the caller's last listing), covering images 0..ipc-1 of every class."""
    shards = [{"name": s.name, "rows": s.rows, "bytes": sizes.get(s.name)} for s in specs]
    manifest = Manifest(stage, fingerprint, shards, ipc)
    loc.write_bytes(MANIFEST_FILE, json.dumps(asdict(manifest), indent=1).encode())
    return manifest


def read_manifest(loc: storage.Location, fingerprint: str | None = None) -> Manifest | None:
    """The folder's manifest; None when it is missing, unreadable, partial or (if given) of another fingerprint."""
    try:
        if not loc.exists(MANIFEST_FILE):
            return None
        d = schema.load(loc.read_bytes(MANIFEST_FILE), schema.MANIFEST, storage.join(loc.uri, MANIFEST_FILE))
        manifest = Manifest(d["stage"], d["fingerprint"], list(d["shards"]), d.get("ipc"), d.get("written", ""))
    except (OSError, ValueError):  # schema.Invalid is a ValueError: a damaged manifest means "not complete"
        return None
    if fingerprint is not None and manifest.fingerprint != fingerprint:
        return None
    return manifest


def manifest_problem(
    manifest: Manifest | None, specs: list[ShardSpec], sizes: dict[str, int], ipc: int | None = None
) -> str | None:
    """Why `manifest` is not the record of exactly `specs` (the plan's shards, in plan order) as they lie on
    storage (`sizes`: name -> bytes of the folder's shard files), covering `ipc` images per class; None when it
    is. A manifest is a claim: one missing an entry, listing an extra one, or disagreeing with a file's rows
    or bytes is not believed."""
    if manifest is None:
        return f"no current {MANIFEST_FILE}"
    if ipc is not None and manifest.ipc is None:
        return "its manifest does not say which images it covers (an earlier version)"
    if ipc is not None and manifest.ipc != ipc:
        return f"its manifest says it covers {manifest.ipc} images per class, the plan {ipc}"
    listed = manifest.rows
    wanted = {s.name: s.rows for s in specs}
    missing = [n for n in wanted if n not in listed]
    if missing:
        return f"its manifest lacks {len(missing)} of the {len(wanted)} shards of the plan (first: {missing[0]})"
    extra = [n for n in listed if n not in wanted]
    if extra or len(manifest.shards) != len(wanted):
        first = extra[0] if extra else "a repeated entry"
        return f"its manifest lists {len(manifest.shards) - len(wanted)} entries the plan does not have ({first})"
    for s in manifest.shards:
        name = s["name"]
        if listed[name] != wanted[name]:
            return f"its manifest says {listed[name]} rows for {name}, the plan {wanted[name]}"
        if name not in sizes:
            return f"{name} is listed in its manifest but missing"
        if s.get("bytes") != sizes[name]:
            return f"its manifest says {s.get('bytes')} bytes for {name}, the file has {sizes[name]}"
    return None


def manifest_specs(manifest: Manifest) -> list[ShardSpec]:
    """What a finished stage's manifest promises of each shard it lists: its rows and the stage's fingerprint."""
    return [ShardSpec(s["name"], int(s["rows"]), ((FINGERPRINT, manifest.fingerprint),)) for s in manifest.shards]


def require_shards(
    loc: storage.Location, manifest: Manifest, stage: str, specs: list[ShardSpec] | None = None, ipc: int | None = None
) -> None:
    """Refuse, in one line, a folder whose shards are not `specs` (default: the ones its manifest lists), or
    whose manifest is not the record of exactly them: shards missing (deleted by hand, a partial copy) or changed
    since (rows, bytes, fingerprint, unreadable: rewritten by another config or an interrupted change), entries
    missing or extra. Judged by check_folder and manifest_problem, the checks a rerun and `status` make; a
    rerun of the stage repairs each (it redoes what is missing or damaged and writes the manifest again)."""
    from gdd_ray.errors import UserError

    whose = "its manifest lists" if specs is None else "of the plan"
    specs = manifest_specs(manifest) if specs is None else specs
    check = check_folder(loc, specs, manifest=manifest)
    missing = [s.name for s in check.todo if s.name not in check.problems]
    again = f"run the {stage} stage again"
    if missing:
        raise UserError(
            f"{loc.uri} lacks {len(missing)} of the {len(specs)} shards {whose} (first: {missing[0]}); {again} to redo them"
        )
    if check.todo:
        name = check.todo[0].name
        raise UserError(f"{loc.uri}/{name}: {check.problems[name]}; {again} (`status` lists what it redoes)")
    why = manifest_problem(manifest, specs, check.sizes, ipc)
    if why:
        raise UserError(f"{loc.uri}: {why}; {again} (it checks every shard and writes the manifest again)")


def drop_manifest(loc: storage.Location) -> None:
    """A stage about to change its folder first says it is no longer complete."""
    loc.delete(MANIFEST_FILE)


# ---- reading --------------------------------------------------------------------------------------------


def read_shard(loc: storage.Location, name: str, columns: list[str] | None = None) -> pa.Table:
    """Some columns of one shard (ranged reads: listing a run never downloads its pixels). A generated
    shard asked for `variant` gets variant 0 on every row, so both kinds read alike."""
    with loc.fs.open_input_file(loc.file(name)) as fh:
        schema = pq.read_schema(fh)
        cols = None if columns is None else [c for c in columns if c in schema.names]
        table = pq.read_table(fh, columns=cols).replace_schema_metadata(None)
    if columns is not None and "variant" in columns and "variant" not in table.column_names:
        table = table.append_column("variant", pa.array(np.zeros(table.num_rows, np.int32)))
    return table


def first_rows(
    loc: storage.Location,
    names: list[str],
    classes: int,
    labels: list[int],
    enough: int,
    columns: list[str],
    ipc: int | None = None,
) -> pa.Table:
    """The rows of classes `labels` in the shards `names`, read in position order (every class's first images
    first) until each of them has `enough` rows or the shards end; shards whose first image is at index >= ipc
    are skipped. For pictures of a run (the sample grid, the report page) without reading all of it."""
    units = sorted(u for n in names if (u := parse_shard_name(n, classes)) is not None)
    wanted = set(labels)
    counts: dict[int, int] = {}
    tables = []
    for unit in units:
        if ipc is not None and unit.round >= ipc:
            break
        if wanted and all(counts.get(label, 0) >= enough for label in wanted):
            break
        t = read_shard(loc, unit.shard_name, [*columns, "label"] if "label" not in columns else columns)
        t = t.filter(pa.compute.is_in(t.column("label"), pa.array(sorted(wanted), pa.int32())))
        for label in t.column("label").to_pylist():
            counts[label] = counts.get(label, 0) + 1
        tables.append(t)
    return pa.concat_tables(tables) if tables else read_shards(loc, [], columns)


def read_shards(loc: storage.Location, names: list[str], columns: list[str] | None = None) -> pa.Table:
    """Several shards as one table (small runs, training sets, tests); big runs stream with Ray Data."""
    tables = [read_shard(loc, n, columns) for n in names]
    if not tables:
        empty = GENERATED_SCHEMA.empty_table()
        return empty if columns is None else empty.select([c for c in columns if c in empty.column_names])
    return pa.concat_tables(tables)
