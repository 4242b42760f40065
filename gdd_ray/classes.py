"""Class lists in each dataset's own label order, and the prompts made from them.

The label of a class is its line number in these files: the order the real dataset uses (CIFAR's
`meta` file, torchvision's ImageFolder over Tiny-ImageNet's sorted wnids, the standard ImageNet-1K
index). A shifted list silently trains every class under another's label, so the order is pinned by tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from gdd_ray.errors import UserError

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


def parse_class_file(text: str, source: str) -> list[ClassInfo]:
    """One class a line, `name` or `id<TAB>name`; blank lines and lines starting with # are skipped."""
    out: list[ClassInfo] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "\t" in line:
            cid, name = (p.strip() for p in line.split("\t", 1))
        else:
            cid = name = line
        if not name:
            raise UserError(f"--classes {source}: line '{raw}' has an id but no name")
        out.append(ClassInfo(len(out), cid, _readable(name)))
    if not out:
        raise UserError(f"--classes {source}: the file lists no classes (one name per line, or id<TAB>name)")
    ids = [c.class_id for c in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UserError(f"--classes {source}: duplicate class(es) {', '.join(dup[:5])}")
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
        return parse_class_file(text, classes_file)
    assert dataset is not None
    return dataset_classes(dataset)
