"""Read the supported data sources: CIFAR-10 python batches and image folder trees.

Sources produce either decoded arrays (CIFAR batches) or lists of files to decode (image
folders); `prepare.py` turns both into the one cached format training reads.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from distvision.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
CIFAR_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
# A flat ROOT/<class>/* tree has no test split of its own: hold out this seeded share.
FLAT_TEST_FRACTION = 0.2
FLAT_SPLIT_SEED = 0


@dataclass
class ArraySplit:
    """Decoded images (N, H, W, 3) uint8 and their int64 labels."""

    images: np.ndarray
    labels: np.ndarray


@dataclass
class FileSplit:
    """Image files still to decode, with their labels."""

    paths: list[str]
    labels: list[int]


@dataclass
class Source:
    """What a data path holds: class names and a train and a test split."""

    kind: str  # "cifar-python" | "image-folder"
    classes: list[str]
    train: ArraySplit | FileSplit
    test: ArraySplit | FileSplit
    skipped: list[str] = field(default_factory=list)  # files seen but not images


# ---------------------------------------------------------------- CIFAR-10 python batches


class _CifarUnpickler(pickle.Unpickler):
    """Admit only what the CIFAR-10 batch pickles hold: numpy arrays, dicts, lists, bytes."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    })

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch file")


def _unpickle_batch(raw: bytes, name: str) -> dict:
    try:
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as error:  # noqa: BLE001 - unpickling can raise almost anything
        raise UserError(f"CIFAR-10 batch {name} is unreadable or not a CIFAR batch: {error}") from None
    if not isinstance(batch, dict):
        raise UserError(f"CIFAR-10 batch {name} does not hold a dict")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}


def _batch_arrays(batch: dict, name: str) -> ArraySplit:
    try:
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (KeyError, ValueError) as error:
        raise UserError(f"CIFAR-10 batch {name} lacks data or labels: {error}") from None
    return ArraySplit(np.ascontiguousarray(data), labels)


def _read_cifar_members(path: Path) -> dict[str, bytes]:
    """Return {member name: bytes} for the batch files inside a directory or a .tar.gz."""
    wanted = set(CIFAR_TRAIN_BATCHES) | {"test_batch", "batches.meta"}
    if path.is_dir():
        folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        return {name: (folder / name).read_bytes() for name in wanted if (folder / name).is_file()}
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = {}
            for member in archive.getmembers():
                base = os.path.basename(member.name)
                if member.isfile() and base in wanted:
                    members[base] = archive.extractfile(member).read()
            return members
    except (tarfile.TarError, OSError, EOFError) as error:
        raise UserError(f"{path} is not a readable CIFAR-10 .tar.gz archive: {error}") from None


def is_cifar_python(path: Path) -> bool:
    """True for a cifar-10-batches-py folder (or its parent) or a .tar.gz of one."""
    if path.is_file():
        return path.name.endswith((".tar.gz", ".tgz"))
    return (path / "data_batch_1").is_file() or (path / "cifar-10-batches-py" / "data_batch_1").is_file()


def load_cifar_python(path: Path) -> Source:
    """Load the official CIFAR-10 python batches from a folder or the downloaded .tar.gz."""
    members = _read_cifar_members(path)
    missing = [name for name in CIFAR_TRAIN_BATCHES + ["test_batch"] if name not in members]
    if missing:
        raise UserError(f"{path} lacks CIFAR-10 batch files: {', '.join(missing)}")
    train = [_batch_arrays(_unpickle_batch(members[n], n), n) for n in CIFAR_TRAIN_BATCHES]
    test = _batch_arrays(_unpickle_batch(members["test_batch"], "test_batch"), "test_batch")
    classes = [f"class_{i}" for i in range(10)]
    if "batches.meta" in members:
        meta = _unpickle_batch(members["batches.meta"], "batches.meta")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", classes)]
    return Source(
        kind="cifar-python",
        classes=classes,
        train=ArraySplit(np.concatenate([b.images for b in train]), np.concatenate([b.labels for b in train])),
        test=test,
    )


# ---------------------------------------------------------------- image folder trees


def list_files(folder: Path) -> tuple[list[str], list[str]]:
    """All image files under folder, following symlinks (each real folder once), and non-images."""
    images, others, seen = [], [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        # A link to an ancestor would loop, or pull in other classes' images: skip it.
        dirnames[:] = sorted(
            d for d in dirnames if not (real + os.sep).startswith(os.path.realpath(os.path.join(dirpath, d)) + os.sep)
        )
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            (images if Path(name).suffix.lower() in IMAGE_EXTENSIONS else others).append(full)
    return images, others


def _class_folders(root: Path) -> list[str]:
    return sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))


def _scan_split(root: Path, classes: list[str]) -> tuple[FileSplit, list[str]]:
    paths, labels, skipped = [], [], []
    for label, name in enumerate(classes):
        if not (root / name).is_dir():
            continue
        images, others = list_files(root / name)
        paths += images
        labels += [label] * len(images)
        skipped += others
    return FileSplit(paths, labels), skipped


def hold_out(split: FileSplit, fraction: float, seed: int) -> tuple[FileSplit, FileSplit]:
    order = np.random.default_rng(seed).permutation(len(split.paths))
    test_count = round(len(order) * fraction)
    test_idx, train_idx = np.sort(order[:test_count]), np.sort(order[test_count:])
    pick = lambda idx: FileSplit([split.paths[i] for i in idx], [split.labels[i] for i in idx])
    return pick(train_idx), pick(test_idx)


def scan_image_folder(root: Path) -> Source:
    """ROOT/train/<class>/* + ROOT/test/<class>/*, or flat ROOT/<class>/* with a seeded test split."""
    if (root / "train").is_dir():
        classes = _class_folders(root / "train")
        train, skipped = _scan_split(root / "train", classes)
        if (root / "test").is_dir():
            test, skipped_test = _scan_split(root / "test", classes)
            skipped += skipped_test
        else:
            train, test = hold_out(train, FLAT_TEST_FRACTION, FLAT_SPLIT_SEED)
    else:
        classes = _class_folders(root)
        everything, skipped = _scan_split(root, classes)
        train, test = hold_out(everything, FLAT_TEST_FRACTION, FLAT_SPLIT_SEED)
    if not classes:
        raise UserError(f"{root} holds no class folders: expected ROOT/<class>/* or ROOT/train/<class>/*")
    if not train.paths:
        raise UserError(f"{root} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return Source(kind="image-folder", classes=classes, train=train, test=test, skipped=skipped)


def read_image(path: str, image_size: int) -> np.ndarray:
    """Decode any image PIL reads to (size, size, 3) uint8 RGB; raises when the file is not a readable image."""
    with Image.open(path) as image:
        image.load()
        if image.mode != "RGB":
            # Palette and LA images with transparency go through RGBA so the alpha is dropped cleanly.
            image = image.convert("RGBA").convert("RGB") if "A" in image.mode or image.mode == "P" else (
                image.convert("RGB")
            )
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def decode_image(path: str, image_size: int) -> np.ndarray | None:
    """read_image, or None when the file is not a readable image."""
    try:
        return read_image(path, image_size)
    except Exception:  # noqa: BLE001 - any decoder failure means "not a usable image": the caller records it
        return None


def open_source(path: Path) -> Source:
    """Detect the kind of source at path and open it."""
    if not path.exists():
        raise UserError(f"data path {path} does not exist")
    if is_cifar_python(path):
        return load_cifar_python(path)
    if path.is_dir():
        if not any(path.iterdir()):
            raise UserError(f"data path {path} is empty")
        return scan_image_folder(path)
    raise UserError(f"{path} is neither a folder of images, a CIFAR-10 batch folder nor a .tar.gz")
