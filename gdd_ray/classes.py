"""Class lists in each dataset's own label order, and the prompts made from them.

The label of a class is its line number in these files: the order the real dataset uses (CIFAR's
`meta` file, torchvision's ImageFolder over Tiny-ImageNet's sorted wnids, the standard ImageNet-1K
index). A shifted list silently trains every class under another's label, so the order is pinned by tests.
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass
from importlib import resources

from gdd_ray.errors import UserError

# The fields a prompt template may name, each a plain `{field}` (ClassInfo.prompt fills them).
PROMPT_FIELDS = ("name",)
MAX_TEMPLATE_CHARS = 1000
# Limits of a class file: what a cluster can hold in one run, and names that fit every filesystem.
MAX_CLASSES = 100_000
MAX_CLASS_FILE_BYTES = 16 * 2**20
MAX_ID_CHARS = 200
MAX_NAME_CHARS = 300

_FILES = {
    "cifar10": "cifar10_classes.txt",
    "cifar100": "cifar100_classes.txt",
    "tiny-imagenet": "tiny_imagenet_wnids.txt",
    "imagenet-1k": "imagenet1k_synsets.txt",
}


# Per-channel (mean, std) of each real training set: what the DC/DSA/MTT evaluators normalise with,
# used by the train stage and by the challenge export alike.
MEAN_STD = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
    "cifar100": ([0.5071, 0.4866, 0.4409], [0.2673, 0.2564, 0.2762]),
    "tiny-imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    "imagenet-1k": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}


@dataclass(frozen=True)
class ClassInfo:
    label: int  # index in the dataset's own label order
    class_id: str  # the dataset's own identifier: CIFAR name, WordNet id, or the id column of a class file
    name: str  # human-readable name, used in prompts

    def prompt(self, template: str) -> str:
        return template.format(name=self.name)


def check_prompt_template(template: str) -> None:
    """A template is literal text and plain `{field}`s from PROMPT_FIELDS (literal braces as `{{` `}}`):
    no attribute or index access, no format specs or conversions, no positional fields. Checked by
    string.Formatter's own parser, the one `str.format` uses, so what passes here formats."""
    flag = "--prompt-template"
    if len(template) > MAX_TEMPLATE_CHARS:
        raise UserError(f"{flag} is {len(template)} characters long; at most {MAX_TEMPLATE_CHARS}")
    if any(ord(ch) < 32 and ch not in "\t" for ch in template):
        raise UserError(f"{flag} must not contain control characters (newlines, NUL, ...)")
    allowed = ", ".join("{" + f + "}" for f in PROMPT_FIELDS)
    fields = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UserError(f"{flag} {template!r}: {e}; write {{{{ and }}}} for literal braces") from e
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in PROMPT_FIELDS or spec or conversion:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise UserError(
                f"{flag} {template!r}: {shown} is not allowed; use only {allowed} "
                "(no attribute or index access, no format specs), and {{{{ }}}} for literal braces"
            )
        fields.append(field)
    if "name" not in fields:
        raise UserError(f"{flag} must contain {{name}}, got {template!r}")


def _read_package_text(filename: str) -> str:
    return resources.files("gdd_ray").joinpath("data", filename).read_text()


def imagenet_synset_names() -> dict[str, str]:
    """WordNet id -> first (usual short) name, from the ImageNet-1K synset list."""
    names = {}
    for line in _read_package_text(_FILES["imagenet-1k"]).splitlines():
        wnid, _, rest = line.partition(" ")
        names[wnid] = rest.split(",")[0].strip()
    return names


def _readable(name: str) -> str:
    return name.replace("_", " ")


def dataset_classes(dataset: str) -> list[ClassInfo]:
    if dataset not in _FILES:
        raise UserError(f"unknown dataset '{dataset}': choose one of {', '.join(_FILES)}, or give --classes FILE")
    lines = [ln.strip() for ln in _read_package_text(_FILES[dataset]).splitlines() if ln.strip()]
    if dataset in ("cifar10", "cifar100"):
        return [ClassInfo(i, n, _readable(n)) for i, n in enumerate(lines)]
    if dataset == "imagenet-1k":
        out = []
        for i, line in enumerate(lines):
            wnid, _, rest = line.partition(" ")
            out.append(ClassInfo(i, wnid, rest.split(",")[0].strip()))
        return out
    names = imagenet_synset_names()  # every Tiny-ImageNet wnid is an ImageNet-1K synset
    return [ClassInfo(i, wnid, names[wnid]) for i, wnid in enumerate(lines)]


def id_problem(class_id: str) -> str | None:
    """Why a class id cannot be a folder name on every filesystem (exports name folders after ids), or None."""
    if class_id in (".", ".."):
        return "is a relative folder name"
    if any(ch in class_id for ch in "/\\"):
        return "contains a path separator"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in class_id):
        return "contains a control character"
    if len(class_id) > MAX_ID_CHARS:
        return f"is longer than {MAX_ID_CHARS} characters"
    return None


def parse_class_file(text: str, source: str) -> list[ClassInfo]:
    """One class a line, `name` or `id<TAB>name`; blank lines and lines starting with # are skipped.
    Linear in the file's size; every mistake names its line."""
    out: list[ClassInfo] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.strip().startswith("#"):
            continue
        line = raw.strip(" \r\n")  # a leading tab is an empty id column, not indentation
        where = f"--classes {source}: line {lineno}"
        if "\t" in line:
            cid, name = (p.strip() for p in line.split("\t", 1))
            if not cid:
                raise UserError(f"{where} has a name but no id (id<TAB>name)")
            if "\t" in name:
                raise UserError(f"{where} has more than two tab-separated columns (id<TAB>name)")
        else:
            cid = name = line
        if not name:
            raise UserError(f"{where} has an id but no name (id<TAB>name)")
        why = id_problem(cid)
        if why:
            raise UserError(f"{where}: the class id {cid[:60]!r} {why}")
        if len(name) > MAX_NAME_CHARS or any(ord(ch) < 32 for ch in name):
            raise UserError(f"{where}: the class name must be at most {MAX_NAME_CHARS} printable characters")
        if cid in first_line:
            raise UserError(f"{where}: duplicate class {cid!r} (first on line {first_line[cid]})")
        first_line[cid] = lineno
        if len(out) == MAX_CLASSES:
            raise UserError(f"--classes {source}: more than {MAX_CLASSES} classes")
        out.append(ClassInfo(len(out), cid, _readable(name)))
    if not out:
        raise UserError(f"--classes {source}: the file lists no classes (one name per line, or id<TAB>name)")
    return out


def folder_names(class_ids: list[str]) -> dict[str, str]:
    """class id -> a folder name safe on every filesystem; refuses ids that would collide there (case-blind
    filesystems included) or that cannot be folder names at all."""
    out: dict[str, str] = {}
    seen: Counter[str] = Counter()
    for cid in class_ids:
        why = id_problem(cid)
        if why or not cid.strip() or cid.rstrip(" .") != cid:
            raise UserError(
                f"class id {cid[:60]!r} cannot be a folder name ({why or 'blank or ends in a dot or space'})"
            )
        out[cid] = cid
        seen[cid.casefold()] += 1
    clashes = sorted(k for k, n in seen.items() if n > 1)
    if clashes:
        raise UserError(
            f"class ids that differ only in case ({clashes[0]!r}, ...) would share a folder on case-blind "
            "filesystems; export with --format pt instead"
        )
    return out


def load_classes(dataset: str | None, classes_file: str | None) -> list[ClassInfo]:
    if classes_file is not None:
        from gdd_ray import storage

        try:
            data = storage.read_bytes(classes_file, limit=MAX_CLASS_FILE_BYTES)
        except storage.TooLarge as e:
            raise UserError(f"--classes {classes_file}: larger than {MAX_CLASS_FILE_BYTES // 2**20} MiB") from e
        except OSError as e:
            raise UserError(f"--classes {classes_file}: cannot read it ({storage.reason(e)})") from e
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise UserError(
                f"--classes {classes_file}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8"
            )
        try:
            text = data.decode("utf-8-sig")  # a UTF-8 byte-order mark (Windows editors write one) is not a class id
        except UnicodeDecodeError as e:
            raise UserError(f"--classes {classes_file}: not a UTF-8 text file (byte {e.start})") from e
        if "\x00" in text:
            raise UserError(f"--classes {classes_file}: contains NUL bytes; not a text file")
        return parse_class_file(text, classes_file)
    assert dataset is not None
    return dataset_classes(dataset)
