"""Real test (and training) sets in their own published formats, with their own class lists for the
label-alignment check.

    CIFAR-10/100      cifar-10-batches-py/{test_batch,batches.meta}, cifar-100-python/{test,meta} (python pickles)
    Tiny-ImageNet     tiny-imagenet-200/{wnids.txt,words.txt,val/val_annotations.txt,val/images/*.JPEG}
    ImageNet-style    a folder of class folders (val/<wnid>/*.JPEG); labels = sorted folder names (ImageFolder)
    challenge .pt     torch.save({'images_val': N x 3 x H x W, 'labels_val': N}) of the ECCV 2024 DD challenge

`describe()` is cheap (class list, size, count: for preflight); `load()` returns every image as uint8 NHWC.
Labels follow each dataset's own order: CIFAR's `meta`, sorted wnids for Tiny-ImageNet (torchvision's
ImageFolder over train/), sorted folder names for a folder tree.

Training sets (--real-train-data, for the random-real and full-data baselines): CIFAR's train batches
(`cifar-100-python/train`, `cifar-10-batches-py/data_batch_1..5`), Tiny-ImageNet's `train/<wnid>/images/`,
or a folder of class folders (`train/<class>/` below the path, else the path itself), in the same label order.
"""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from gdd_ray.errors import UserError

IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
HOW_TO_GET = (
    "get CIFAR-100 from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (or CIFAR-10: cifar-10-python.tar.gz) "
    "and give the unpacked folder; Tiny-ImageNet from http://cs231n.stanford.edu/tiny-imagenet-200.zip; "
    "or an ImageNet-style val folder of class folders, or the challenge's test .pt"
)


@dataclass
class TestSetInfo:
    kind: str  # cifar10 | cifar100 | tiny-imagenet | folder | pt
    root: str
    class_ids: list[str] | None  # the test set's own class identifiers in label order (None: the .pt has none)
    class_names: list[str] | None
    num_images: int
    image_size: int | None  # None: images of any size, resized and centre-cropped to the shards' size

    @property
    def num_classes(self) -> int | None:
        return len(self.class_ids) if self.class_ids is not None else None


@dataclass
class TestSet:
    info: TestSetInfo
    images: np.ndarray  # uint8, N x H x W x 3
    labels: np.ndarray  # int64, N


def _err(path: str, what: str) -> UserError:
    return UserError(f"--eval-data {path}: {what}")


# What a CIFAR python pickle holds besides dicts, lists, numbers and bytes: numpy arrays (as numpy pickles them,
# under numpy 1 and 2 module names) and protocol 2's way of writing bytes. Nothing else is built.
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode"),
}  # fmt: skip


class _CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only what a CIFAR file holds: a test set is a file from elsewhere, and an
    unrestricted unpickler runs whatever code the file names."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR file never holds")
        return super().find_class(module, name)


def _unpickle(path: str, shown: str) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _CifarUnpickler(fh, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise _err(shown, f"{os.path.basename(path)} is not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise _err(shown, f"{os.path.basename(path)} is not a CIFAR pickle (holds a {type(obj).__name__})")
    return obj


def _decode_names(raw: list) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in raw]


def _tiny_words(root: str) -> dict[str, str]:
    """WordNet id -> the first of its names, from Tiny-ImageNet's words.txt (empty when there is none)."""
    words = {}
    words_file = os.path.join(root, "words.txt")
    if os.path.isfile(words_file):
        with open(words_file) as fh:
            for line in fh:
                wnid, _, name = line.rstrip("\n").partition("\t")
                words[wnid] = name.split(",")[0].strip()
    return words


# ---- detection ----------------------------------------------------------------------------------


# The files that mark a CIFAR folder (python version) holding each split, by dataset, in the order looked for.
_CIFAR_FILES = {
    "test": {"cifar100": ("test", "meta"), "cifar10": ("test_batch", "batches.meta")},
    "train": {"cifar100": ("train", "meta"), "cifar10": ("data_batch_1", "batches.meta")},
}


def _find_cifar(path: str, split: str) -> tuple[str, str] | None:
    """(kind, root) of a CIFAR folder holding `split` at `path` or its usual folder below it."""
    for root in (path, os.path.join(path, "cifar-100-python"), os.path.join(path, "cifar-10-batches-py")):
        for kind, files in _CIFAR_FILES[split].items():
            if all(os.path.isfile(os.path.join(root, f)) for f in files):
                return kind, root
    return None


def _find_layout(path: str, split: str, is_tiny_imagenet, folder_roots: tuple[str, ...]) -> tuple[str, str] | None:
    """(kind, root) of `split` of a CIFAR, Tiny-ImageNet (`is_tiny_imagenet(root)`) or class-folder set (in the
    first of `folder_roots` that has class folders) at or just below `path`."""
    if not os.path.isdir(path):
        return None
    cifar = _find_cifar(path, split)
    if cifar is not None:
        return cifar
    for root in (path, os.path.join(path, "tiny-imagenet-200")):
        if is_tiny_imagenet(root):
            return "tiny-imagenet", root
    for root in folder_roots:
        if os.path.isdir(root) and _class_folders(root):
            return "folder", root
    return None


def _find(path: str) -> tuple[str, str] | None:
    """(kind, root) of the test set at or just below `path`."""
    if os.path.isfile(path) and path.endswith(".pt"):
        return "pt", path

    def has_val(root: str) -> bool:
        return os.path.isfile(os.path.join(root, "val", "val_annotations.txt"))

    return _find_layout(path, "test", has_val, (path, os.path.join(path, "val")))


def _class_folders(root: str) -> list[str]:
    try:
        entries = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)) and not e.startswith("."))
    except OSError:
        return []
    return [e for e in entries if _images_in(os.path.join(root, e))]


def _images_in(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."))


def _locate(path: str) -> tuple[str, str]:
    if not os.path.exists(path):
        raise _err(path, f"does not exist; {HOW_TO_GET}")
    found = _find(path)
    if found is None:
        raise _err(path, f"not a test set this stage reads; {HOW_TO_GET}")
    return found


# ---- CIFAR --------------------------------------------------------------------------------------


def _cifar(kind: str, root: str, shown: str, load_pixels: bool) -> tuple[TestSetInfo, np.ndarray, np.ndarray]:
    test_file, meta_file, names_key, labels_key = (
        ("test", "meta", b"fine_label_names", b"fine_labels")
        if kind == "cifar100"
        else ("test_batch", "batches.meta", b"label_names", b"labels")
    )
    meta = _unpickle(os.path.join(root, meta_file), shown)
    if names_key not in meta:
        raise _err(shown, f"{meta_file} has no {names_key.decode()} (corrupt or not CIFAR)")
    names = _decode_names(meta[names_key])
    test = _unpickle(os.path.join(root, test_file), shown)
    if b"data" not in test or labels_key not in test:
        raise _err(shown, f"{test_file} lacks b'data' or {labels_key!r} (corrupt or not CIFAR)")
    data = np.asarray(test[b"data"])
    labels = np.asarray(test[labels_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] % 3 or len(data) != len(labels):
        raise _err(shown, f"{test_file}: b'data' is {data.dtype} {data.shape}, expected uint8 N x 3*H*W (corrupt)")
    side = int(round((data.shape[1] // 3) ** 0.5))
    if 3 * side * side != data.shape[1]:
        raise _err(shown, f"{test_file}: rows of {data.shape[1]} values are not square RGB images (corrupt)")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise _err(shown, f"{test_file}: labels outside 0..{len(names) - 1} (corrupt)")
    info = TestSetInfo(kind, root, names, names, len(labels), side)
    images = data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1) if load_pixels else np.empty(0)
    return info, np.ascontiguousarray(images), labels


# ---- Tiny-ImageNet ------------------------------------------------------------------------------


def _tiny(root: str, shown: str, load_pixels: bool) -> tuple[TestSetInfo, list[str], np.ndarray]:
    ann_path = os.path.join(root, "val", "val_annotations.txt")
    files, wnids_of = [], []
    with open(ann_path) as fh:
        for n, line in enumerate(fh, 1):
            parts = line.strip().split("\t")
            if not parts or not parts[0]:
                continue
            if len(parts) < 2:
                raise _err(shown, f"val/val_annotations.txt line {n} is not 'file<TAB>wnid...' (corrupt)")
            files.append(os.path.join(root, "val", "images", parts[0]))
            wnids_of.append(parts[1])
    wnids_file = os.path.join(root, "wnids.txt")
    if os.path.isfile(wnids_file):
        with open(wnids_file) as fh:
            wnids = sorted(ln.strip() for ln in fh if ln.strip())
    else:
        wnids = sorted(set(wnids_of))
    index = {w: i for i, w in enumerate(wnids)}
    unknown = sorted(set(wnids_of) - set(index))
    if unknown:
        raise _err(shown, f"val_annotations.txt names classes not in wnids.txt: {', '.join(unknown[:5])} (corrupt)")
    words = _tiny_words(root)
    if not files:
        raise _err(shown, "val/val_annotations.txt lists no images (corrupt)")
    missing = [f for f in files[:1] + files[-1:] if not os.path.isfile(f)]
    if missing:
        raise _err(shown, f"{missing[0]} is listed in val_annotations.txt but missing (incomplete unpacking?)")
    size = _image_size(files[0], shown)
    info = TestSetInfo("tiny-imagenet", root, wnids, [words.get(w, w) for w in wnids], len(files), size)
    return info, files, np.array([index[w] for w in wnids_of], dtype=np.int64)


def _image_size(path: str, shown: str) -> int:
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, UnidentifiedImageError) as e:
        raise _err(shown, f"{path} is not a readable image ({e})") from e
    if w != h:
        raise _err(shown, f"{path} is {w}x{h}; expected square images")
    return w


# ---- folder tree --------------------------------------------------------------------------------


def _folder(root: str) -> tuple[TestSetInfo, list[str], np.ndarray]:
    from gdd_ray.classes import imagenet_synset_names

    classes = _class_folders(root)
    synsets = imagenet_synset_names()
    files, labels = [], []
    for i, c in enumerate(classes):
        for f in _images_in(os.path.join(root, c)):
            files.append(os.path.join(root, c, f))
            labels.append(i)
    info = TestSetInfo("folder", root, classes, [synsets.get(c, c) for c in classes], len(files), None)
    return info, files, np.array(labels, dtype=np.int64)


def _read_image(path: str, size: int, shown: str, resize: bool) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if resize and im.size != (size, size):
                # Shorter side to `size` then a centre crop: torchvision's Resize(size) + CenterCrop(size).
                w, h = im.size
                s = size / min(w, h)
                im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError) as e:
        raise _err(shown, f"{path} is not a readable image ({e})") from e
    if arr.shape != (size, size, 3):
        raise _err(shown, f"{path} is {arr.shape[1]}x{arr.shape[0]}, expected {size}x{size} like the rest")
    return arr


def _read_images(files: list[str], size: int, shown: str, resize: bool) -> np.ndarray:
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = _read_image(files[i], size, shown, resize)

    # JPEG decoding releases the GIL: threads make a 10k-image folder a matter of seconds.
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        list(pool.map(one, range(len(files))))
    return out


# ---- challenge .pt ------------------------------------------------------------------------------


def _pt(path: str, shown: str, mean_std: tuple[list[float], list[float]]) -> tuple[TestSetInfo, np.ndarray, np.ndarray]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean the same to the user
        raise _err(shown, f"not a readable torch file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if not isinstance(obj, dict) or "images_val" not in obj or "labels_val" not in obj:
        keys = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise _err(shown, f"expected a dict with 'images_val' and 'labels_val', found {keys}")
    x, y = torch.as_tensor(obj["images_val"]), torch.as_tensor(obj["labels_val"]).long().flatten()
    if x.ndim != 4 or len(x) != len(y):
        raise _err(shown, f"images_val is {tuple(x.shape)} for {len(y)} labels; expected N x 3 x H x W")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3 or x.shape[2] != x.shape[3]:
        raise _err(shown, f"images_val is {tuple(x.shape)}; expected square RGB N x 3 x H x W")
    if x.dtype != torch.uint8:
        x = x.float()
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            # Stored normalised with the dataset's mean/std (as the challenge's loaders hand them out): undo it.
            mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std)
            x = x * std + mean
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if len(y) and y.min() < 0:
        raise _err(shown, "labels_val has negative labels (corrupt)")
    info = TestSetInfo("pt", path, None, None, len(y), int(x.shape[2]))
    return info, x.permute(0, 2, 3, 1).contiguous().numpy(), y.numpy()


# ---- public -------------------------------------------------------------------------------------


def describe(path: str) -> TestSetInfo:
    """What is at `path` (class list, image size, count), checked enough to trust a long run on it."""
    kind, root = _locate(path)
    if kind in ("cifar10", "cifar100"):
        return _cifar(kind, root, path, load_pixels=False)[0]
    if kind == "tiny-imagenet":
        return _tiny(root, path, load_pixels=False)[0]
    if kind == "folder":
        info, files, _ = _folder(root)
        _read_image(files[0], 8, path, resize=True)  # one decode: a folder of non-images fails here, not at the end
        return info
    return _pt(root, path, ([0.0] * 3, [1.0] * 3))[0]


def load(path: str, image_size: int, mean_std: tuple[list[float], list[float]]) -> TestSet:
    """Every test image as uint8 at `image_size` (only a folder tree is resized; elsewhere sizes must match)."""
    kind, root = _locate(path)
    if kind in ("cifar10", "cifar100"):
        info, images, labels = _cifar(kind, root, path, load_pixels=True)
    elif kind == "tiny-imagenet":
        info, files, labels = _tiny(root, path, load_pixels=True)
        check_size(info, image_size, path)
        images = _read_images(files, image_size, path, resize=False)
    elif kind == "folder":
        info, files, labels = _folder(root)
        images = _read_images(files, image_size, path, resize=True)
    else:
        info, images, labels = _pt(root, path, mean_std)
    check_size(info, image_size, path)
    return TestSet(info, images, labels)


def check_size(info: TestSetInfo, image_size: int, shown: str) -> None:
    if info.image_size is not None and info.image_size != image_size:
        raise _err(
            shown,
            f"{info.kind} test images are {info.image_size}px but the shards are {image_size}px; "
            f"generate at --image-size {info.image_size} (or evaluate on a matching test set)",
        )


# ---- real training sets (--real-train-data) ---------------------------------------------------------

TRAIN_FLAG = "--real-train-data"


def _as_train_error(e: UserError) -> UserError:
    """The readers above word their errors for --eval-data; the same reader failing on a training set names
    the flag the user gave."""
    return UserError(str(e).replace("--eval-data ", f"{TRAIN_FLAG} ", 1))


def _find_train(path: str) -> tuple[str, str] | None:
    """(kind, root) of the training set at or just below `path` (the same layouts as the test sets')."""

    def has_train(root: str) -> bool:
        return os.path.isfile(os.path.join(root, "wnids.txt")) and os.path.isdir(os.path.join(root, "train"))

    return _find_layout(path, "train", has_train, (os.path.join(path, "train"), path))


def _cifar_train(kind: str, root: str, shown: str) -> tuple[TestSetInfo, np.ndarray, np.ndarray]:
    meta_file, names_key, labels_key = (
        ("meta", b"fine_label_names", b"fine_labels")
        if kind == "cifar100"
        else ("batches.meta", b"label_names", b"labels")
    )
    meta = _unpickle(os.path.join(root, meta_file), shown)
    if names_key not in meta:
        raise _err(shown, f"{meta_file} has no {names_key.decode()} (corrupt or not CIFAR)")
    names = _decode_names(meta[names_key])
    files = ["train"] if kind == "cifar100" else sorted(f for f in os.listdir(root) if f.startswith("data_batch_"))
    datas, labels = [], []
    for f in files:
        batch = _unpickle(os.path.join(root, f), shown)
        if b"data" not in batch or labels_key not in batch:
            raise _err(shown, f"{f} lacks b'data' or {labels_key!r} (corrupt or not CIFAR)")
        datas.append(np.asarray(batch[b"data"]))
        labels.append(np.asarray(batch[labels_key], dtype=np.int64))
    data, lab = np.concatenate(datas), np.concatenate(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] % 3 or len(data) != len(lab):
        raise _err(shown, f"b'data' is {data.dtype} {data.shape}, expected uint8 N x 3*H*W (corrupt)")
    side = int(round((data.shape[1] // 3) ** 0.5))
    if 3 * side * side != data.shape[1] or (len(lab) and (lab.min() < 0 or lab.max() >= len(names))):
        raise _err(shown, "rows are not square RGB images or labels lie outside the class list (corrupt)")
    info = TestSetInfo(kind, root, names, names, len(lab), side)
    return info, data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1), lab


def _tiny_train(root: str, shown: str) -> tuple[TestSetInfo, list[str], np.ndarray]:
    with open(os.path.join(root, "wnids.txt")) as fh:
        wnids = sorted(ln.strip() for ln in fh if ln.strip())
    files, labels = [], []
    for i, w in enumerate(wnids):
        folder = os.path.join(root, "train", w, "images")
        if not os.path.isdir(folder):
            raise _err(shown, f"train/{w}/images is missing (incomplete unpacking?)")
        for f in _images_in(folder):
            files.append(os.path.join(folder, f))
            labels.append(i)
    if not files:
        raise _err(shown, "train/ holds no images")
    words = _tiny_words(root)
    size = _image_size(files[0], shown)
    info = TestSetInfo("tiny-imagenet", root, wnids, [words.get(w, w) for w in wnids], len(files), size)
    return info, files, np.array(labels, dtype=np.int64)


def _train_index(path: str) -> tuple[TestSetInfo, list[str] | np.ndarray, np.ndarray]:
    """(info, the files or the pixels (CIFAR), labels) of the training set at `path`."""
    if not os.path.exists(path):
        raise _err(path, f"does not exist; {HOW_TO_GET}")
    found = _find_train(path)
    if found is None:
        raise _err(path, f"not a training set this stage reads (CIFAR's train batches, Tiny-ImageNet's train/, "
                         f"or a folder of class folders); {HOW_TO_GET}")  # fmt: skip
    kind, root = found
    if kind in ("cifar10", "cifar100"):
        return _cifar_train(kind, root, path)
    if kind == "tiny-imagenet":
        return _tiny_train(root, path)
    return _folder(root)


def describe_train(path: str) -> tuple[TestSetInfo, np.ndarray]:
    """The training set's class list, size and count, and every image's label (to draw subsets from)."""
    try:
        info, _, labels = _train_index(path)
    except UserError as e:
        raise _as_train_error(e) from None
    return info, labels


def load_train(path: str, image_size: int, rows: np.ndarray | None = None) -> TestSet:
    """The training images `rows` (default all, in the set's order) as uint8 at `image_size`; only those are
    decoded (a random subset of an ImageNet-style tree reads its own files only)."""
    try:
        info, source, labels = _train_index(path)
        check_size(info, image_size, path)
        rows = np.arange(len(labels)) if rows is None else np.asarray(rows, dtype=np.int64)
        if isinstance(source, np.ndarray):
            images = np.ascontiguousarray(source[rows])
        else:
            images = _read_images([source[i] for i in rows], image_size, path, resize=info.image_size is None)
    except UserError as e:
        raise _as_train_error(e) from None
    return TestSet(info, images, labels[rows])
