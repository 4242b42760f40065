"""Class lists in each dataset's own label order, and the prompts made from them.

The label of a class is its line number in these files: the order the real dataset uses (CIFAR's
`meta` file, torchvision's ImageFolder over Tiny-ImageNet's sorted wnids, the standard ImageNet-1K
index). A shifted list silently trains every class under another's label, so the order is pinned by tests.

Every list, packaged or given with --classes, has one format: one class a line, `name`, `id<TAB>name` or
`id<TAB>name<TAB>description`. The description is the name with the context that makes it unambiguous
("a kite, a bird of prey with a forked tail"); a template uses it as `{desc}` (the name when a class has
none) and the name as `{name}`. The packaged ImageNet-1K list (whose descriptions Tiny-ImageNet shares)
renames the classes whose first WordNet lemma collides with another's (crane, cardigan, maillot).

Two classes whose prompts are the same text (after lower-casing and collapsing spaces, as CLIP's
tokenizer does) would be two labels for one set of images: `check_prompts` refuses such a list.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources

from gdd_ray.errors import UserError

MAX_TEMPLATE_CHARS = 1000
# Limits of a prompt-template list (--prompt-templates): every (class, template) prompt is encoded at start-up.
MAX_TEMPLATES = 256
MAX_TEMPLATE_FILE_BYTES = 1 * 2**20
# Limits of a class file: what a cluster can hold in one run, and names that fit every filesystem.
MAX_CLASSES = 100_000
MAX_CLASS_FILE_BYTES = 16 * 2**20
MAX_ID_CHARS = 200
MAX_NAME_CHARS = 300

_FILES = {
    "cifar10": "cifar10_classes.tsv",
    "cifar100": "cifar100_classes.tsv",
    "tiny-imagenet": "tiny_imagenet_wnids.txt",  # wnids only: names and descriptions come from ImageNet-1K's
    "imagenet-1k": "imagenet1k_classes.tsv",
}
# The fields a prompt template may name, each a plain `{field}` (ClassInfo.prompt fills them).
TEMPLATE_FIELDS = ("name", "desc")


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
    name: str  # human-readable name, `{name}` in prompts
    description: str = ""  # the name in context, `{desc}` in prompts ("" = none given)
    line: int = field(default=0, compare=False)  # the line of its file, for messages (0 = unknown)

    @property
    def desc(self) -> str:
        return self.description or self.name

    def prompt(self, template: str) -> str:
        return template.format(name=self.name, desc=self.desc)


def template_fields(template: str, flag: str = "--prompt-template") -> set[str]:
    """The fields a prompt template uses, and the one check of a template: literal text and plain `{field}`s
    from TEMPLATE_FIELDS (literal braces as `{{` `}}`), {name} or {desc} among them; no attribute or index
    access, no format specs or conversions, no positional fields. Checked by string.Formatter's own parser,
    the one `str.format` uses, so what passes here formats. `flag` names the template in messages."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise UserError(f"{flag} is {len(template)} characters long; at most {MAX_TEMPLATE_CHARS}")
    bad = unprintable(template, allow="\t")
    if bad:
        raise UserError(f"{flag} must not contain control or format characters (newlines, NUL, bidi, ...): {bad}")
    allowed = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UserError(
            f"{flag} {template!r} is not a valid template ({e}); write {{{{ and }}}} for literal braces"
        ) from e
    used: set[str] = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise UserError(
                f"{flag} {template!r}: {shown} is not allowed; use only {allowed} "
                "(no attribute or index access, no format specs), and {{ }} for literal braces"
            )
        used.add(name)
    if not used:
        raise UserError(f"{flag} must contain {{name}} or {{desc}}, got {template!r}")
    return used


def check_prompts(classes: list[ClassInfo], templates: str | tuple[str, ...], source: str) -> None:
    """Refuse a class list in which two classes get the same prompt, naming the colliding lines.

    With several templates every (class, template) prompt counts: two classes collide when any of their
    prompts are the same text, under one template or two (one class giving the same text under two
    templates is no collision). Linear in classes x templates: one dict from the prompt as the text encoder
    sees it to the classes that give it."""
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    seen: dict[str, dict[int, tuple[ClassInfo, str]]] = {}
    for template in templates:
        for c in classes:
            try:
                text = c.prompt(template)
            except (KeyError, IndexError, ValueError, AttributeError) as e:
                raise UserError(f"prompt template '{template}' cannot be filled in ({type(e).__name__}: {e})") from e
            seen.setdefault(same_text(text), {}).setdefault(c.label, (c, text, template))
    groups = [sorted(g.values(), key=lambda x: x[0].label) for g in seen.values() if len(g) > 1]
    if not groups:
        return

    def who(c: ClassInfo, template: str) -> str:
        return f"line {c.line or c.label + 1} (label {c.label})" + (f" with '{template}'" if len(templates) > 1 else "")

    shown = "; ".join(" and ".join(who(c, t) for c, _, t in g[:3]) + f" give '{g[0][1]}'" for g in groups[:5])
    more = f" (and {len(groups) - 5} more)" if len(groups) > 5 else ""
    which = f"--prompt-template '{templates[0]}'" if len(templates) == 1 else f"{len(templates)} prompt templates"
    if all("desc" in template_fields(t) for t in templates):  # {desc} is in use: the descriptions are what collide
        fix = "give each class its own description (third column; the name stands in for a missing one)"
    else:
        fix = "give each class its own name, or a description (third column) and use {desc}"
    raise UserError(
        f"{source}: {len(groups)} prompt(s) shared by several classes with {which}: "
        f"{shown}{more}; {fix}, or pass --allow-duplicate-prompts"
    )


def parse_templates(text: str, source: str) -> tuple[str, ...]:
    """A prompt-template file: one template a line; blank lines and lines starting with # are skipped. Each
    template passes the one template check (`template_fields`), its mistakes naming the line."""
    out: list[str] = []
    for lineno, raw in enumerate(text_lines(text), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        template_fields(line, f"{source}: line {lineno}:")
        repeated = [t for t in out if same_text(t) == same_text(line)]
        if repeated:
            raise UserError(
                f"{source}: line {lineno} repeats the template {repeated[0]!r} (as CLIP reads it: {line!r})"
            )
        if len(out) == MAX_TEMPLATES:
            raise UserError(f"{source}: more than {MAX_TEMPLATES} templates")
        out.append(line)
    if not out:
        raise UserError(f"{source}: the file lists no templates (one template a line, e.g. 'a photo of a {{name}}')")
    return tuple(out)


def check_templates(templates: tuple[str, ...], flag: str = "--prompt-templates") -> None:
    """The checks of a template list given inline (a YAML list, run.json): each template, bounds, no repeats."""
    if len(templates) > MAX_TEMPLATES:
        raise UserError(f"{flag}: {len(templates)} templates; at most {MAX_TEMPLATES}")
    seen: dict[str, str] = {}
    for i, template in enumerate(templates):
        template_fields(template, f"{flag} item {i + 1}:")
        key = same_text(template)
        if key in seen:
            raise UserError(f"{flag}: item {i + 1} repeats the template {seen[key]!r} (as CLIP reads it: {template!r})")
        seen[key] = template


def load_templates(path: str) -> tuple[str, ...]:
    """The templates of a --prompt-templates file (local or a storage URI), read bounded."""
    source = f"--prompt-templates {path}"
    return parse_templates(read_text_file(path, source, MAX_TEMPLATE_FILE_BYTES), source)


def _read_package_text(filename: str) -> str:
    return resources.files("gdd_ray").joinpath("data", filename).read_text()


def imagenet_synset_names() -> dict[str, str]:
    """WordNet id -> the class name the packaged ImageNet-1K list gives it."""
    return {c.class_id: c.name for c in dataset_classes("imagenet-1k")}


def _readable(name: str) -> str:
    return name.replace("_", " ")


def dataset_classes(dataset: str) -> list[ClassInfo]:
    if dataset not in _FILES:
        raise UserError(f"unknown dataset '{dataset}': choose one of {', '.join(_FILES)}, or give --classes FILE")
    if dataset != "tiny-imagenet":
        return parse_class_file(_read_package_text(_FILES[dataset]), f"--dataset {dataset}")
    by_wnid = {c.class_id: c for c in dataset_classes("imagenet-1k")}  # every Tiny-ImageNet wnid is one
    wnids = [ln.strip() for ln in _read_package_text(_FILES[dataset]).splitlines() if ln.strip()]
    return [ClassInfo(i, w, by_wnid[w].name, by_wnid[w].description, i + 1) for i, w in enumerate(wnids)]


# Unicode categories no class id, name, description or template may hold: controls (C0, DEL, C1), format
# characters (bidi overrides, zero-width joiners and spaces, soft hyphen...), line and paragraph separators,
# surrogates, private use and unassigned code points. Each can shift what a line is, hide text, or spoof a name.
_UNPRINTABLE = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}
# Names Windows reserves for devices, with or without an extension (`CON`, `nul.txt`, `COM1`): a folder of that
# name cannot be made there. Exports name folders after ids, and ids must be folder names on every filesystem.
_RESERVED = re.compile(r"(CON|PRN|AUX|NUL|CONIN\$|CONOUT\$|(COM|LPT)[0-9\u00b9\u00b2\u00b3])(\..*)?", re.IGNORECASE)
_PATH_CHARACTERS = '<>:"/\\|?*'


def unprintable(text: str, allow: str = "") -> str | None:
    """The first character of `text` that is not printable text (see _UNPRINTABLE), named, or None."""
    for ch in text:
        if ch not in allow and unicodedata.category(ch) in _UNPRINTABLE:
            name = unicodedata.name(ch, "")
            return f"U+{ord(ch):04X}" + (f" {name}" if name else "")
    return None


def same_text(text: str) -> str:
    """A text as CLIP's tokenizers see it (NFC, case folded, whitespace collapsed): two texts equal here are one
    prompt (or one class id, one template) whatever their bytes."""
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def id_problem(class_id: str) -> str | None:
    """Why a class id cannot be a folder name on every filesystem (exports name folders after ids), or None."""
    if class_id in (".", ".."):
        return "is a relative folder name"
    if any(ch in class_id for ch in "/\\"):
        return "contains a path separator"
    bad = unprintable(class_id)
    if bad:
        return f"contains a control or format character ({bad})"
    if len(class_id) > MAX_ID_CHARS:
        return f"is longer than {MAX_ID_CHARS} characters"
    if class_id.rstrip(" .") != class_id:
        return "ends in a dot or space (Windows drops them: two ids would share a folder)"
    if _RESERVED.fullmatch(class_id):
        return "is a device name Windows reserves (CON, PRN, AUX, NUL, COM1-9, LPT1-9)"
    if any(ch in _PATH_CHARACTERS for ch in class_id):
        return f"contains a character folder names cannot hold on every filesystem (one of {_PATH_CHARACTERS})"
    return None


def text_lines(text: str) -> list[str]:
    """Lines split at \\n (a \\r\\n's \\r dropped) and nowhere else: str.splitlines also breaks at U+2028, U+0085,
    \\x0b, \\x0c, \\x1c..., so a name holding one would shift every later label by a line."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def parse_class_file(text: str, source: str) -> list[ClassInfo]:
    """One class a line: `name`, `id<TAB>name` or `id<TAB>name<TAB>description`; blank lines and lines
    starting with # are skipped. `source` names the list in messages (`--classes FILE`, `--dataset X`).
    Linear in the file's size; every mistake names its line."""
    out: list[ClassInfo] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text_lines(text), 1):
        if not raw.strip(" \t") or raw.strip(" \t").startswith("#"):
            continue
        line = raw.strip(" ")  # a leading tab is an empty id column, not indentation
        where = f"{source}: line {lineno}"
        # Spaces only: str.strip would also drop U+2028, \x0b... silently; they are refused below instead.
        parts = [p.strip(" ") for p in line.split("\t")]
        if len(parts) > 3:
            raise UserError(f"{where} has {len(parts)} tab-separated columns; at most 3 (id, name, description)")
        cid, name = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
        desc = parts[2] if len(parts) == 3 else ""
        if not cid:
            raise UserError(f"{where} has a name but no id (id<TAB>name)")
        if not name:
            raise UserError(f"{where} ('{raw[:60]}') has an id but no name")
        if not _readable(name).strip():  # `_` reads as a space: the prompt would hold no name at all
            raise UserError(f"{where}: the class name {name!r} is blank once underscores are read as spaces")
        why = id_problem(cid)
        if why:
            raise UserError(f"{where}: the class id {cid[:60]!r} {why}")
        for what, text_ in (("name", name), ("description", desc)):
            bad = unprintable(text_)
            if len(text_) > MAX_NAME_CHARS or bad:
                raise UserError(
                    f"{where}: the class {what} must be at most {MAX_NAME_CHARS} printable characters"
                    + (f" ({bad} is not one)" if bad else "")
                )
        key = unicodedata.normalize("NFC", cid)  # `café` typed two ways is one id (and one folder on macOS)
        if key in first_line:
            raise UserError(f"{where}: duplicate class {cid!r} (first on line {first_line[key]})")
        first_line[key] = lineno
        if len(out) == MAX_CLASSES:
            raise UserError(f"{source}: more than {MAX_CLASSES} classes")
        out.append(ClassInfo(len(out), cid, _readable(name), desc, lineno))
    if not out:
        raise UserError(f"{source}: the file lists no classes (one name per line, or id<TAB>name)")
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


def read_text_file(path: str, source: str, limit: int) -> str:
    """A user's text file (local or a storage URI), read bounded: UTF-8 (a byte-order mark, which Windows
    editors write, dropped); anything else is one line naming `source`."""
    from gdd_ray import storage

    try:
        data = storage.read_bytes(path, limit=limit)
    except storage.TooLarge as e:
        raise UserError(f"{source}: larger than {limit // 2**20} MiB") from e
    except OSError as e:
        raise UserError(f"{source}: cannot read it ({storage.reason(e)})") from e
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{source}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{source}: not a UTF-8 text file (byte {e.start})") from e
    if "\x00" in text:
        raise UserError(f"{source}: contains NUL bytes; not a text file")
    return text


def load_classes(dataset: str | None, classes_file: str | None) -> list[ClassInfo]:
    if classes_file is not None:
        source = f"--classes {classes_file}"
        return parse_class_file(read_text_file(classes_file, source, MAX_CLASS_FILE_BYTES), source)
    assert dataset is not None
    return dataset_classes(dataset)


def class_list_source(dataset: str | None, classes_file: str | None) -> str:
    """How messages name the run's class list."""
    return f"--classes {classes_file}" if classes_file is not None else f"--dataset {dataset}"
