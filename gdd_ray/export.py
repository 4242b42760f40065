"""Exports of a run's images in the forms evaluators and training code take.

    challenge    the ECCV 2024 DD challenge submission: DEST is a folder and exactly DEST/cifar100.pt or
                 DEST/tinyimagenet.pt is written in it (nothing else): a bare float tensor 10*C x 3 x H x W,
                 normalised, class-major (the evaluator labels by position), its shape checked before
                 writing. The 10 per class are the rows the train stage takes under --protocol challenge
                 (gdd_ray.trainset, the run's --pick unless given), so the trained set is the submitted set.
    pt           a tensor like the challenge's: one float tensor N x 3 x H x W normalised with the dataset's
                 mean/std, class by class with the same count per class (label = position // count),
                 plus DEST_labels.pt (int64, N) and DEST_classes.txt (label, class id, name)
    imagefolder  DEST/<class id>/<label>_<index>_v<variant>.png, the PNG bytes as stored (lossless);
                 folders are class ids, whose sorted order is the dataset's label order for CIFAR,
                 Tiny-ImageNet and ImageNet-1K, so torchvision's ImageFolder gives the same labels

No export replaces anything in silence: an existing destination (the challenge file, DEST and its two
companions for `pt`, a non-empty ImageFolder root, any file a submission folder holds besides the other
dataset's submission file) is refused in one line unless --overwrite, and --overwrite replaces only what an
export writes (a user's other files are never deleted). Every export prints the digest of what it wrote
(gdd_ray.digest: the rule of results.json's `train_set.digest`) and whether it is the set the run's train
stage trained on.

Images are taken in the order (label, index, variant). With --per-class n, `pt` picks the n of each class
by the train stage's rule (gdd_ray.trainset, the run's --pick unless given: originals by default, i.e.
n distinct generated images before any variant), `imagefolder` the first n. Shards are read one at a time
(the listing reads no pixels); the .pt tensor itself is built in memory (4*3*H*W bytes an image).

    python -m gdd_ray export --run OUT --format challenge --dest submission/
    python -m gdd_ray export --run OUT --format pt --dest distilled.pt --per-class 10 [--pick spread]
    python -m gdd_ray export --run OUT --format imagefolder --dest OUT/imagefolder
    ... --overwrite                       replace an earlier export at DEST
"""

from __future__ import annotations

import argparse
import io
import math
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from gdd_ray import challenge, shards, storage, trainset
from gdd_ray import results as results_doc
from gdd_ray.classes import MEAN_STD, folder_names
from gdd_ray.config import RunConfig
from gdd_ray.digest import SetDigest
from gdd_ray.errors import UserError
from gdd_ray.run import RUN_FILE, RunDir

FORMATS = ("challenge", "pt", "imagefolder")
SOURCES = {"augmented": "augment", "selected": "select", "generated": "generate"}  # folder -> its stage
META_COLUMNS = ["label", "class_id", "class_name", "index", "variant"]


def run_record(run: str) -> dict[str, Any]:
    """The run's run.json, checked by its schema (RunDir.read_record) and its config as strictly as flags are
    (whichever format reads it): {} when there is none."""
    record = RunDir(run).read_record() or {}
    if record.get("config"):
        _config(run, record)
    return record


def _config(run: str, record: dict[str, Any]) -> RunConfig:
    return RunConfig.from_dict(record["config"], storage.join(run, RUN_FILE))


def _source(run: str, source: str) -> tuple[storage.Location, shards.Manifest]:
    """The source stage's folder and its manifest: only a complete, current stage exports."""
    if source not in SOURCES:
        raise UserError(f"--source must be one of {', '.join(SOURCES)}, got '{source}'")
    stage = SOURCES[source]
    loc = RunDir.open(run).stage_dir(stage)  # a sweep point's stage folders may be shared, outside OUT
    fp = run_record(run).get("fingerprints", {}).get(stage)
    manifest = shards.read_manifest(loc, fp) if fp else None
    if manifest is None:
        raise UserError(
            f"{loc.uri} holds no complete {stage} stage (no current {shards.MANIFEST_FILE}): "
            f"run the {stage} stage to finish it, or pick another --source"
        )
    shards.require_shards(loc, manifest, stage)  # every listed shard present, its rows and fingerprint
    return loc, manifest


def _refuse_duplicates(table: pa.Table) -> None:
    """(label, index, variant) is an image's identity: one that appears twice means mixed shards."""
    keys = np.stack([table.column(c).to_numpy().astype(np.int64) for c in ("label", "index", "variant")], axis=1)
    repeats = np.flatnonzero((np.diff(keys, axis=0) == 0).all(axis=1))  # keys are sorted: a repeat is adjacent
    if len(repeats):
        label, index, variant = keys[int(repeats[0])].tolist()
        raise UserError(
            f"the run holds image (label {label}, index {index}, variant {variant}) twice: its shards are "
            "inconsistent; run the stage again with the same config, or with --overwrite"
        )


def list_images(run: str, source: str = "augmented") -> pa.Table:
    """One row per image (no pixels): label, ids, index, variant, and where it is (shard, row), sorted
    by (label, index, variant)."""
    loc, manifest = _source(run, source)
    tables = []
    for i, n in enumerate(manifest.names):
        t = shards.read_shard(loc, n, META_COLUMNS)
        t = t.append_column("shard", pa.array(np.full(t.num_rows, i, np.int32)))
        tables.append(t.append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int64))))
    table = pa.concat_tables(tables).select([*META_COLUMNS, "shard", "row"])
    if manifest.ipc is not None:  # a time budget's last shard may hold later images too: the stage covers ipc
        table = table.filter(pa.compute.less(table.column("index"), manifest.ipc))
    table = table.sort_by([("label", "ascending"), ("index", "ascending"), ("variant", "ascending")])
    _refuse_duplicates(table)
    return table


def iter_shards(run: str, source: str, selected: pa.Table):
    """Per shard holding selected images: [(position in `selected`, PNG bytes)]; one shard in memory at a time."""
    loc, manifest = _source(run, source)
    names = manifest.names
    shard_col = selected.column("shard").to_numpy()
    row_col = selected.column("row").to_numpy()
    for i in np.unique(shard_col):
        positions = np.flatnonzero(shard_col == i)
        data = shards.read_shard(loc, names[i], ["image"]).column("image").combine_chunks().field("bytes")
        yield [(int(pos), data[int(row_col[pos])].as_py()) for pos in positions]


def iter_images(run: str, source: str, selected: pa.Table):
    for items in iter_shards(run, source, selected):
        yield from items


def load_images(run: str, source: str = "augmented") -> pa.Table:
    """Every image with its PNG bytes, sorted by (label, index, variant): small runs and tests."""
    table = list_images(run, source)
    data: list[bytes | None] = [None] * table.num_rows
    for pos, png in iter_images(run, source, table):
        data[pos] = png
    return table.append_column("image", shards.image_column(data, [""] * len(data)))


def select_per_class(
    table: pa.Table, per_class: int | None, num_classes: int | None, how: str = "first"
) -> tuple[pa.Table, int]:
    """Same count for every class: `per_class` of each, chosen by `how` (a gdd_ray.selection rule, the one the
    train stage applies), in (index, variant) order; labels must be 0..C-1 with none missing."""
    labels = table.column("label").to_numpy()
    present, counts = np.unique(labels, return_counts=True)
    c = num_classes if num_classes is not None else int(present.max()) + 1
    missing = sorted(set(range(c)) - set(present.tolist()))
    if missing:
        raise UserError(f"class(es) {', '.join(map(str, missing[:5]))} have no images; every class needs some")
    if per_class is None:
        if counts.min() != counts.max():
            raise UserError(
                f"classes have between {counts.min()} and {counts.max()} images; "
                f"pass --per-class N (at most {counts.min()}) to take the same number of each"
            )
        return table, int(counts[0])
    if per_class < 1:
        raise UserError(f"--per-class must be at least 1, got {per_class}")
    short = present[counts < per_class]
    if len(short):
        raise UserError(
            f"--per-class {per_class}: class {short[0]} has only {counts[present == short[0]][0]} images "
            f"(the smallest class has {counts.min()})"
        )
    cols = [table.column(c).to_numpy() for c in ("label", "index", "variant")]
    take = trainset.choose(*cols, trainset.RowChoice(per_class=per_class, how=how))  # type: ignore[arg-type]
    return table.take(pa.array(take)), per_class


def _mean_std(
    dataset: str | None, mean: list[float] | None, std: list[float] | None
) -> tuple[list[float], list[float]]:
    if (mean is None) != (std is None):
        raise UserError("give both --mean and --std, or neither")
    if mean is not None and std is not None:
        finite = all(math.isfinite(v) for v in (*mean, *std))
        if len(mean) != 3 or len(std) != 3 or not finite or min(std) <= 0:
            raise UserError(f"--mean and --std take three finite numbers each (std > 0), got {mean} and {std}")
        return list(mean), list(std)
    if dataset not in MEAN_STD:
        raise UserError(
            f"no mean/std known for dataset {dataset!r}; pass --dataset ({', '.join(MEAN_STD)}) or --mean/--std"
        )
    m, s = MEAN_STD[dataset]
    return list(m), list(s)


def normalised_tensor(
    run: str, source: str, table: pa.Table, mean: list[float], std: list[float], digest: SetDigest | None = None
):
    """The images of `table`'s rows, in its order, as one float tensor N x 3 x H x W: (pixel / 255 - mean) / std,
    the arithmetic of the train stage's own upload (train.loop.to_device_images). `digest` is fed the pixels."""
    import torch

    x = None
    mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    for pos, png in iter_images(run, source, table):
        pixels = np.array(shards.decode_png(png))
        if digest is not None:
            digest.add(pos, pixels)
        px = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)
        if x is None:
            x = torch.empty((table.num_rows, *px.shape), dtype=torch.float32)
        elif px.shape != x.shape[1:]:
            raise UserError(
                f"images of different sizes ({tuple(px.shape)} and {tuple(x.shape[1:])}) cannot form one tensor"
            )
        x[pos] = (px - mean_t) / std_t
    return x


def _labels_of(table: pa.Table) -> np.ndarray:
    return table.column("label").to_numpy().astype(np.int64)


def trained_digest(run: str, record: dict[str, Any]) -> str | None:
    """The digest of the set the run's train stage trained on (its current results.json), None if untrained."""
    fp = (record.get("fingerprints") or {}).get("train")
    res = results_doc.read(RunDir.open(run).eval, fp) if fp else None
    return ((res or {}).get("train_set") or {}).get("digest")


def _verdict(run: str, record: dict[str, Any], digest: str) -> dict[str, Any]:
    trained = trained_digest(run, record)
    return {"digest": digest, "trained_digest": trained, "trained_on": None if trained is None else trained == digest}


def digest_line(out: dict[str, Any]) -> str:
    """'digest D: the set the train stage trained on' (or why it is not)."""
    d, trained = out["digest"], out.get("trained_digest")
    if trained is None:
        return f"digest {d}; the run has no current results.json to compare with (not trained)"
    if out["trained_on"]:
        return f"digest {d}: the set the train stage trained on (results.json train_set.digest)"
    return f"digest {d}: NOT the set the train stage trained on ({trained}): this set was never evaluated"


def _entries(loc: storage.Location) -> dict[str, bool]:
    """Everything directly in a folder, hidden names included: name -> is a folder ({} when it does not exist;
    Location.list sees files only, and an ImageFolder root holds folders)."""
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.NotFound:
        return {}
    if info.type != pafs.FileType.Directory:
        raise UserError(f"{loc.uri} is a file, not a folder")
    found = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    return {e.path.rstrip("/").rsplit("/", 1)[-1]: e.type == pafs.FileType.Directory for e in found}


def _refuse(dest: str, what: str) -> None:
    raise UserError(f"--dest {dest}: {what}; add --overwrite to replace it (an export never overwrites in silence)")


def train_source(record: dict[str, Any]) -> str:
    """The folder the run's train stage reads, as run.json records it (the pipeline writes each stage's source
    there); a record of an earlier version: the augmented set when the run has an augment stage, else the
    images the select stage kept when it has one, else the originals."""
    folder = {stage: folder for folder, stage in SOURCES.items()}
    recorded = (record.get("sources") or {}).get("train")
    if recorded in folder:
        return folder[recorded]
    fps = record.get("fingerprints", {})
    return "augmented" if "augment" in fps else "selected" if "select" in fps else "generated"


def _check_submission_folder(dest: str, name: str, overwrite: bool) -> list[str]:
    """A submission folder may already hold the other dataset's file (the two make one submission); anything
    else (this dataset's file, a user's notes) is refused unless --overwrite, which replaces only `name`.
    Returns the other files DEST holds."""
    try:
        present = sorted(_entries(storage.Location(dest)))
    except UserError as e:
        raise UserError(f"--dest {dest} is a file; --format challenge writes into a submission folder") from e
    others = [n for n in present if n != name]
    companions = {f for f, _, _ in challenge.FILES.values()} - {name}
    foreign = [n for n in others if n not in companions]
    if not overwrite:
        if name in present:
            _refuse(dest, f"{name} exists already")
        if foreign:
            _refuse(dest, f"the folder holds {', '.join(foreign[:5])}, which is no submission file")
    return others


def export_challenge(
    run: str, dest: str, pick: str | None = None, source: str | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Write exactly DEST/cifar100.pt or DEST/tinyimagenet.pt: the 10 images per class the train stage takes
    under --protocol challenge, as the evaluator loads them. Everything is checked before the one write."""
    if dest.rstrip("/").endswith(".pt"):
        raise UserError(
            f"--dest for --format challenge is the submission folder (the file name is the evaluator's), got '{dest}'"
        )
    if pick is not None and pick not in trainset.CHOICES:
        raise UserError(f"--pick must be one of {', '.join(trainset.CHOICES)}, got '{pick}'")
    record = run_record(run)
    if not record.get("config"):
        raise UserError(f"{storage.join(run, RUN_FILE)} does not exist or holds no config: no run at {run}")
    cfg = _config(run, record)
    name = challenge.submission_file(cfg.dataset)
    others = _check_submission_folder(dest, name, overwrite)
    choice = trainset.for_training(cfg.replace(**{"train.protocol": "challenge"}), pick)  # type: ignore[arg-type]
    source = source or train_source(record)
    listed = list_images(run, source)
    cols = [listed.column(c).to_numpy() for c in ("label", "index", "variant")]
    table = listed.take(pa.array(trainset.choose(*cols, choice, len(record.get("classes") or []) or None)))
    want = challenge.expected_shape(cfg.dataset)
    labels = table.column("label").to_numpy()
    if table.num_rows != want[0] or not np.array_equal(labels, challenge.position_labels(want[0] // 10).numpy()):
        raise UserError(f"the run offers {table.num_rows} images in class-major order; the evaluator needs {want[0]}")
    m, s = _mean_std(cfg.dataset, None, None)
    digest = SetDigest(labels)
    x = normalised_tensor(run, source, table, m, s, digest)
    if tuple(x.shape) != want:
        raise UserError(
            f"the selected images form a {tuple(x.shape)} tensor; the evaluator asserts {want} "
            f"(rerun with --image-size {want[-1]})"
        )
    storage.Location(dest).write_bytes(name, _torch_bytes(x))
    return {
        "file": storage.join(dest, name),
        "shape": list(x.shape),
        "per_class": trainset.CHALLENGE_IPC,
        "source": source,
        "selection": choice.describe(),
        "also_in_dest": others,
        **_verdict(run, record, digest.hexdigest()),
    }


def export_pt(
    run: str,
    dest: str,
    per_class: int | None = None,
    dataset: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    source: str = "augmented",
    pick: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write DEST (images), DEST_labels.pt and DEST_classes.txt; returns what was written. With `per_class`,
    the rows are chosen by `pick` (default: the run's --pick), as the train stage chooses them."""
    import torch

    if not dest.endswith(".pt"):
        raise UserError(f"--dest for --format pt must be a .pt file name, got '{dest}'")
    parent, name = _split(dest)
    stem = name[: -len(".pt")]
    loc = storage.Location(parent)
    written = [name, f"{stem}_labels.pt", f"{stem}_classes.txt"]
    existing = [n for n in written if loc.exists(n)] if loc.exists() else []
    if existing and not overwrite:
        _refuse(dest, f"{', '.join(storage.join(parent, n) for n in existing)} exist(s) already")
    if pick is not None and pick not in trainset.CHOICES:
        raise UserError(f"--pick must be one of {', '.join(trainset.CHOICES)}, got '{pick}'")
    record = run_record(run)
    num_classes = len(record["classes"]) if record.get("classes") else None
    how = pick or (_config(run, record).train.pick if record.get("config") else "originals")
    table, n = select_per_class(list_images(run, source), per_class, num_classes, how)
    m, s = _mean_std(dataset or record.get("config", {}).get("dataset"), mean, std)
    digest = SetDigest(_labels_of(table))
    x = normalised_tensor(run, source, table, m, s, digest)
    labels = torch.from_numpy(_labels_of(table))

    loc.write_bytes(name, _torch_bytes(x))
    loc.write_bytes(f"{stem}_labels.pt", _torch_bytes(labels))
    classes = _class_lines(table)
    loc.write_bytes(f"{stem}_classes.txt", "".join(classes).encode())
    return {
        "images": storage.join(parent, name),
        "labels": storage.join(parent, f"{stem}_labels.pt"),
        "shape": list(x.shape),
        "per_class": n,
        "selection": how if per_class is not None else None,
        "classes": len(classes),
        "mean": m,
        "std": s,
        **_verdict(run, record, digest.hexdigest()),
    }


def _earlier_export(final: storage.Location, dest: str) -> list[str]:
    """The PNG files of an earlier ImageFolder export at DEST (class folders of .png files, nothing else);
    anything else there is a user's and is refused even with --overwrite."""
    found = []
    for entry, is_dir in sorted(_entries(final).items()):
        if not is_dir:
            raise UserError(f"--dest {dest} holds {entry}, which no export writes; give another folder")
        for name, sub_dir in sorted(_entries(final.child(entry)).items()):
            if sub_dir or not name.endswith(".png"):
                raise UserError(f"--dest {dest} holds {entry}/{name}, which no export writes; give another folder")
            found.append(f"{entry}/{name}")
    return found


def export_imagefolder(
    run: str, dest: str, per_class: int | None = None, source: str = "augmented", overwrite: bool = False
) -> dict[str, Any]:
    """Write DEST/<class id>/<label>_<index>_v<variant>.png (the stored PNG bytes)."""
    record = run_record(run)
    num_classes = len(record["classes"]) if record.get("classes") else None
    table, n = select_per_class(list_images(run, source), per_class, num_classes)
    ids = table.column("class_id").to_pylist()
    folders = folder_names(list(dict.fromkeys(ids)))  # refuses '..', '.', separators, case clashes
    final = storage.Location(dest)
    earlier: list[str] = []
    if _entries(final):
        if not overwrite:
            _refuse(dest, "the folder exists and is not empty")
        earlier = _earlier_export(final, dest)
    # Local disks: write into a hidden sibling folder, renamed to DEST once whole (no partial tree is left
    # under DEST's name). Object stores have no folders to rename: each PNG is one atomic PUT there.
    root = storage.Location(_staging(dest)) if final.local else final
    if earlier and not final.local:  # no folder to swap: the earlier export's objects go first
        for path in earlier:
            folder, name = path.split("/", 1)
            final.child(folder).delete(name)
    digest = SetDigest(_labels_of(table))
    labels = table.column("label").to_pylist()
    index = table.column("index").to_pylist()
    variant = table.column("variant").to_pylist()
    locs = {f: root.child(f) for f in folders.values()}

    def write(item: tuple[int, bytes]) -> None:
        i, png = item
        locs[folders[ids[i]]].write_bytes(f"{labels[i]:05d}_{index[i]:06d}_v{variant[i]}.png", png)
        digest.add(i, shards.decode_png(png))

    # Each file is committed with an fsync (disk) or a PUT (object store): both wait, so write in parallel,
    # one shard's images at a time.
    written = 0
    try:
        with ThreadPoolExecutor(max_workers=8 if root.local else 32) as pool:
            for items in iter_shards(run, source, table):
                written += sum(1 for _ in pool.map(write, items))
        if root is not final:
            if earlier:  # --overwrite: the earlier export steps aside, the new tree takes its name, then it goes
                old = storage.Location(_staging(dest))
                os.replace(final.path, old.path)
                os.replace(root.path, final.path)
                old.delete_tree()
            else:
                os.replace(root.path, final.path)  # an empty DEST folder is replaced; a non-empty one was refused
    finally:
        if root is not final:
            root.delete_tree()  # what is left of the staging folder after a failure (nothing after success)
    order = [folders[cid] for cid in dict.fromkeys(ids)]  # label order (table sorted by label)
    return {
        "root": dest,
        "images": written,
        "per_class": n,
        "classes": len(order),
        "sorted_folders_match_labels": order == sorted(order),
        "replaced": len(earlier),
        **_verdict(run, record, digest.hexdigest()),
    }


def _staging(dest: str) -> str:
    parent, name = os.path.split(os.path.abspath(os.path.expanduser(dest.removeprefix("file://"))))
    return os.path.join(parent, f".{name}{storage.TMP_MARK}{uuid.uuid4().hex[:8]}")


def _class_lines(table: pa.Table) -> list[str]:
    first = pc.unique(table.column("label")).to_pylist()
    out = []
    for lab in first:
        i = pc.index(table.column("label"), lab).as_py()
        out.append(f"{lab}\t{table.column('class_id')[i].as_py()}\t{table.column('class_name')[i].as_py()}\n")
    return out


def _split(path: str) -> tuple[str, str]:
    if "/" not in path.rstrip("/"):
        return ".", path
    parent, name = path.rstrip("/").rsplit("/", 1)
    return parent or "/", name


def _torch_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---- command line (python -m gdd_ray export, jobs/export.py) ------------------------------------


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got '{text}'") from e
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected three finite comma-separated numbers, got '{text}'")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="The run folder (--out of distill.py): local path or s3://... URI.")
    p.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="challenge: DEST/cifar100.pt or DEST/tinyimagenet.pt only; pt: tensor + labels + classes; "
        "imagefolder: PNG tree.",
    )
    p.add_argument(
        "--dest", required=True, help="challenge: the submission folder; pt: the .pt file; imagefolder: the root."
    )
    p.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="Keep N images of each class, chosen by --pick (pt; imagefolder: the first N); default all.",
    )
    p.add_argument(
        "--source",
        dest="source_given",
        choices=list(SOURCES),
        default=None,
        help="Export the augmented set, the images the select stage kept, or every generated image (default: augmented; challenge: what the "
        "run's train stage reads).",
    )
    p.add_argument(
        "--pick",
        choices=trainset.CHOICES,
        default=None,
        help="challenge, and pt with --per-class: which images per class (originals, first, spread); default the "
        "run's --pick, so the exported set is the one its train stage takes under --protocol challenge.",
    )
    p.add_argument("--select", dest="select_old", choices=trainset.CHOICES, default=None, help="Old name of --pick.")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an earlier export at --dest (the challenge file, the .pt and its companions, or an ImageFolder "
        "tree); without it an existing destination is refused. A user's other files are never deleted.",
    )
    p.add_argument("--dataset", default=None, help="pt: whose mean/std to normalise with; default the run's dataset.")
    p.add_argument("--mean", type=_floats, default=None, help="pt: per-channel mean r,g,b instead of the dataset's.")
    p.add_argument("--std", type=_floats, default=None, help="pt: per-channel std r,g,b instead of the dataset's.")


def run_from_args(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except OSError as e:  # a read-only or full disk, DEST a file: the user's to fix, in one line
        raise UserError(f"export to {args.dest} failed ({storage.reason(e)})") from e


def _run(args: argparse.Namespace) -> int:
    if args.select_old is not None:
        if args.pick is not None:
            raise UserError("--select is the old name of --pick; give only --pick")
        print("[export] --select is now --pick; the old name goes in the next release", flush=True)
        args.pick = args.select_old
    if args.format == "challenge":
        if args.per_class is not None or args.mean is not None or args.std is not None or args.dataset is not None:
            raise UserError(
                "--format challenge takes 10 per class and the dataset's mean/std: drop --per-class/"
                "--dataset/--mean/--std"
            )
        out = export_challenge(args.run, args.dest, args.pick, args.source_given, args.overwrite)
        print(f"[export] {tuple(out['shape'])} challenge tensor ({out['selection']['how']}) -> {out['file']}")
        if out["also_in_dest"]:
            print(f"[export] {args.dest} also holds {', '.join(out['also_in_dest'])} (left as it was)")
        print(f"[export] {digest_line(out)}")
        return 0
    if args.pick is not None and (args.format != "pt" or args.per_class is None):
        raise UserError("--pick applies to --format challenge, and to --format pt with --per-class")
    args.source = args.source_given or "augmented"
    if args.format == "pt":
        out = export_pt(
            args.run, args.dest, args.per_class, args.dataset, args.mean, args.std, args.source, args.pick,
            args.overwrite,
        )  # fmt: skip
        print(
            f"[export] {out['shape'][0]} images {tuple(out['shape'])} ({out['per_class']} per class) -> {out['images']}"
        )
    else:
        if args.mean is not None or args.std is not None or args.dataset is not None:
            raise UserError("--dataset/--mean/--std apply to --format pt only (ImageFolder keeps the PNGs as stored)")
        out = export_imagefolder(args.run, args.dest, args.per_class, args.source, args.overwrite)
        replaced = f" (replacing an earlier export of {out['replaced']} PNGs)" if out["replaced"] else ""
        print(f"[export] {out['images']} PNGs in {out['classes']} class folders -> {out['root']}{replaced}")
        if not out["sorted_folders_match_labels"]:
            print("[export] note: the sorted folder names do not follow the label order; ImageFolder will relabel")
    print(f"[export] {digest_line(out)}")
    return 0
