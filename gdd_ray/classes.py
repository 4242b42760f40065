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

import string
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources

from gdd_ray.errors import UserError

_FILES = {
    "cifar10": "cifar10_classes.tsv",
    "cifar100": "cifar100_classes.tsv",
    "tiny-imagenet": "tiny_imagenet_wnids.txt",  # wnids only: names and descriptions come from ImageNet-1K's
    "imagenet-1k": "imagenet1k_classes.tsv",
}
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


def template_fields(template: str) -> set[str]:
    """The fields a prompt template uses. The one check of a template: it must be a format string that
    names {name} or {desc} (a field it does not know fails when the prompts are filled in)."""
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise UserError(f"--prompt-template '{template}' is not a valid template ({e})") from e
    if not used & set(TEMPLATE_FIELDS):
        raise UserError(f"--prompt-template must contain {{name}} or {{desc}}, got '{template}'")
    return used


def check_prompts(classes: list[ClassInfo], template: str, source: str) -> None:
    """Refuse a class list in which two classes get the same prompt, naming the colliding lines.

    Linear in the number of classes: one dict from the prompt as the text encoder sees it to its lines."""
    seen: dict[str, list[ClassInfo]] = {}
    for c in classes:
        try:
            text = c.prompt(template)
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise UserError(f"--prompt-template '{template}' cannot be filled in ({type(e).__name__}: {e})") from e
        seen.setdefault(" ".join(text.casefold().split()), []).append(c)
    groups = [g for g in seen.values() if len(g) > 1]
    if not groups:
        return
    shown = "; ".join(
        " and ".join(f"line {c.line or c.label + 1} (label {c.label})" for c in g[:3])
        + f" give '{g[0].prompt(template)}'"
        for g in groups[:5]
    )
    more = f" (and {len(groups) - 5} more)" if len(groups) > 5 else ""
    raise UserError(
        f"{source}: {len(groups)} prompt(s) shared by several classes with --prompt-template '{template}': "
        f"{shown}{more}; give each class its own name, or a description (third column) and use {{desc}}, "
        "or pass --allow-duplicate-prompts"
    )


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


def parse_class_file(text: str, source: str) -> list[ClassInfo]:
    """One class a line: `name`, `id<TAB>name` or `id<TAB>name<TAB>description`; blank lines and lines
    starting with # are skipped. `source` names the list in messages (`--classes FILE`, `--dataset X`)."""
    out: list[ClassInfo] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) > 3:
            raise UserError(
                f"{source}: line {number} has {len(parts)} tab-separated columns; at most 3 (id, name, description)"
            )
        cid, name = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
        desc = parts[2] if len(parts) == 3 else ""
        if not name:
            raise UserError(f"{source}: line {number} ('{raw}') has an id but no name")
        out.append(ClassInfo(len(out), cid, _readable(name), desc, number))
    if not out:
        raise UserError(f"{source}: the file lists no classes (one name per line, or id<TAB>name)")
    dup = sorted(i for i, n in Counter(c.class_id for c in out).items() if n > 1)
    if dup:
        raise UserError(f"{source}: duplicate class(es) {', '.join(dup[:5])}")
    return out


def load_classes(dataset: str | None, classes_file: str | None) -> list[ClassInfo]:
    if classes_file is not None:
        from gdd_ray import storage

        try:
            text = storage.read_bytes(classes_file).decode("utf-8")
        except (OSError, FileNotFoundError) as e:
            raise UserError(f"--classes {classes_file}: cannot read it ({e})") from e
        except UnicodeDecodeError as e:
            raise UserError(f"--classes {classes_file}: not a UTF-8 text file") from e
        return parse_class_file(text, f"--classes {classes_file}")
    assert dataset is not None
    return dataset_classes(dataset)


def class_list_source(dataset: str | None, classes_file: str | None) -> str:
    """How messages name the run's class list."""
    return f"--classes {classes_file}" if classes_file is not None else f"--dataset {dataset}"
