"""Read the supported data sources: CIFAR-10 python batches, image folder trees, CSV/TSV lists of
image files and NumPy .npz arrays.

Sources produce either decoded arrays (CIFAR batches, .npz) or lists of files to decode (image
folders, lists); `prepare.py` turns both into the one cached format training reads.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import tarfile
import zipfile
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
LIST_DELIMITERS = {".csv": ",", ".tsv": "\t"}
LIST_COLUMNS = ("path", "label")  # and optionally "split": train | test


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

    kind: str  # "cifar-python" | "image-folder" | "image-list" | "npz"
    classes: list[str]
    train: ArraySplit | FileSplit
    test: ArraySplit | FileSplit
    skipped: list[str] = field(default_factory=list)  # files seen but not images, list rows not usable
    held_out: float | None = None  # the share of the training data held out as the test split, if it was


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


def _take(split: ArraySplit | FileSplit, indices: np.ndarray) -> ArraySplit | FileSplit:
    if isinstance(split, ArraySplit):
        return ArraySplit(split.images[indices], split.labels[indices])
    return FileSplit([split.paths[i] for i in indices], [split.labels[i] for i in indices])


def hold_out(split: ArraySplit | FileSplit, fraction: float, seed: int) -> tuple[ArraySplit | FileSplit, ...]:
    """(train, test): a seeded share of split's items as the test split, both in their original order."""
    order = np.random.default_rng(seed).permutation(len(split.labels))
    test_count = round(len(order) * fraction)
    test_idx, train_idx = np.sort(order[:test_count]), np.sort(order[test_count:])
    return _take(split, train_idx), _take(split, test_idx)


def with_test_split(train: ArraySplit | FileSplit, test: ArraySplit | FileSplit | None) -> tuple:
    """(train, test, held-out share): the splits as they are, or, where the source has no test split
    (test None), a seeded FLAT_TEST_FRACTION of the training items held out as one."""
    if test is not None:
        return train, test, None
    return (*hold_out(train, FLAT_TEST_FRACTION, FLAT_SPLIT_SEED), FLAT_TEST_FRACTION)


def scan_image_folder(root: Path) -> Source:
    """ROOT/train/<class>/* + ROOT/test/<class>/*, or flat ROOT/<class>/* with a seeded test split."""
    test = None
    if (root / "train").is_dir():
        classes = _class_folders(root / "train")
        train, skipped = _scan_split(root / "train", classes)
        if (root / "test").is_dir():
            test, skipped_test = _scan_split(root / "test", classes)
            skipped += skipped_test
    else:
        classes = _class_folders(root)
        train, skipped = _scan_split(root, classes)
    train, test, held_out = with_test_split(train, test)
    if not classes:
        raise UserError(f"{root} holds no class folders: expected ROOT/<class>/* or ROOT/train/<class>/*")
    if not train.paths:
        raise UserError(f"{root} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return Source(kind="image-folder", classes=classes, train=train, test=test, skipped=skipped, held_out=held_out)


def read_image(path: str, image_size: int) -> np.ndarray:
    """Decode any image PIL reads to (size, size, 3) uint8 RGB; raises when the file is not a readable image."""
    with Image.open(path) as image:
        image.load()
        if image.mode != "RGB":
            # Palette and LA images with transparency go through RGBA so the alpha is dropped cleanly.
            image = image.convert("RGBA").convert("RGB") if "A" in image.mode or image.mode == "P" else (
                image.convert("RGB")
            )
        return resize_image(image, image_size)


def resize_image(image: Image.Image, image_size: int) -> np.ndarray:
    """An RGB image as (size, size, 3) uint8, resized bilinearly when it is not that size already."""
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def decode_image(path: str, image_size: int) -> np.ndarray | None:
    """read_image, or None when the file is not a readable image."""
    try:
        return read_image(path, image_size)
    except Exception:  # noqa: BLE001 - any decoder failure means "not a usable image": the caller records it
        return None


# ---------------------------------------------------------------- CSV/TSV lists of image files


def is_data_file(path: Path) -> bool:
    """True for a single file that holds (or lists) a whole data set: a .csv/.tsv list or an .npz."""
    return path.is_file() and path.suffix.lower() in {*LIST_DELIMITERS, ".npz"}


def _cell(row: dict, column: str) -> str:
    return (row.get(column) or "").strip()  # a short row leaves its missing cells None


def _read_list_rows(path: Path) -> tuple[list[tuple[int, str, str, str]], bool]:
    """(line, path cell, label, split) of every non-blank row, and whether the list has a split column."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: the BOM spreadsheets write
            reader = csv.DictReader(handle, delimiter=LIST_DELIMITERS[path.suffix.lower()])
            try:
                header = [name.strip().lower() for name in reader.fieldnames or []]
                reader.fieldnames = header
                for column in LIST_COLUMNS:
                    if column not in header:
                        raise UserError(f"{path} has no {column!r} column (header row: {', '.join(header) or 'none'}):"
                                        " the first row must name the columns path, label and optionally split")
                for row in reader:
                    cells = (_cell(row, "path"), _cell(row, "label"), _cell(row, "split").lower())
                    if any(cells):
                        rows.append((reader.line_num, *cells))
            except csv.Error as error:
                raise UserError(f"{path} line {reader.line_num}: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path} cannot be read as UTF-8 text: {error}") from None
    return rows, "split" in header


def load_image_list(path: Path) -> Source:
    """A CSV/TSV list of `path,label[,split]` rows, paths relative to the list's folder.

    Rows without an existing file or without a label are skipped and reported with the unreadable images.
    """
    rows, has_split = _read_list_rows(path)
    folder = os.path.dirname(os.path.abspath(path))
    for line, _, _, split in rows:
        if has_split and split not in ("train", "test"):
            raise UserError(f"{path} line {line}: split {split!r} is neither train nor test")
    # The classes are the training rows' labels, whether or not their files turn out readable.
    classes = sorted({label for _, _, label, split in rows if label and split != "test"})
    if not classes:
        raise UserError(f"{path} has no training row with a label")
    index = {name: i for i, name in enumerate(classes)}
    splits = {"train": FileSplit([], []), "test": FileSplit([], [])}
    skipped = []
    for line, cell, label, split in rows:
        file = os.path.join(folder, cell)  # an absolute cell stays as it is
        if not cell or not label or not os.path.isfile(file):
            skipped.append(file if cell else f"{path} line {line}")
            continue
        if label not in index:
            raise UserError(f"{path} line {line}: label {label!r} of a test row is on no training row "
                            f"(the training labels: {', '.join(classes)})")
        splits[split or "train"].paths.append(file)
        splits[split or "train"].labels.append(index[label])
    # no split column, or no usable test row: a held-out test split
    train, test, held_out = with_test_split(splits["train"], splits["test"] if splits["test"].paths else None)
    return Source(kind="image-list", classes=classes, train=train, test=test, skipped=skipped, held_out=held_out)


# ---------------------------------------------------------------- NumPy .npz arrays

NPZ_ARRAYS = ("images", "labels", "test_images", "test_labels", "classes")


def _npz_images(images: np.ndarray, name: str, path: Path) -> np.ndarray:
    """N x H x W x 3 uint8 as is; N x H x W (or x 1) grayscale replicated to 3 channels."""
    if images.dtype != np.uint8:
        raise UserError(f"{path}: {name} is {images.dtype}, expected uint8 pixels (0-255)")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape[1:]:
        raise UserError(f"{path}: {name} has the shape {images.shape}, expected N x H x W x 3 "
                        "(or N x H x W grayscale)")
    return np.ascontiguousarray(images)


def _npz_labels(labels: np.ndarray, name: str, count: int, path: Path) -> np.ndarray:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: {name} must be one integer per image, not {labels.dtype} of shape {labels.shape}")
    if len(labels) != count:
        raise UserError(f"{path}: {name} has {len(labels)} entries but there are {count} images")
    return labels.astype(np.int64)


def load_npz(path: Path) -> Source:
    """An .npz of `images` and `labels`, optionally `test_images`/`test_labels` and `classes` (strings).

    Read with allow_pickle=False: an object array is refused, never unpickled.
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise UserError(f"{path} is not a readable .npz archive (as np.savez writes)") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(f"{path} holds a single array, not an .npz archive of images and labels (np.savez)")
    with archive:
        present = [name for name in NPZ_ARRAYS if name in archive.files]
        for name in ("images", "labels"):
            if name not in present:
                raise UserError(f"{path} has no {name!r} array (it holds: {', '.join(archive.files) or 'nothing'})")
        if ("test_images" in present) != ("test_labels" in present):
            missing = "test_labels" if "test_images" in present else "test_images"
            raise UserError(f"{path} has only one of test_images and test_labels (no {missing}): give both or neither")
        arrays = {}
        for name in present:
            try:
                arrays[name] = archive[name]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
                raise UserError(f"{path}: the array {name} is unreadable: {error}") from None
    images = _npz_images(arrays["images"], "images", path)
    if len(images) == 0:
        raise UserError(f"{path}: images holds no image")
    train = ArraySplit(images, _npz_labels(arrays["labels"], "labels", len(images), path))
    test = ArraySplit(np.zeros((0, *images.shape[1:]), np.uint8), np.zeros(0, np.int64))
    if "test_images" in arrays:
        test_images = _npz_images(arrays["test_images"], "test_images", path)
        test = ArraySplit(test_images, _npz_labels(arrays["test_labels"], "test_labels", len(test_images), path))
    classes = _npz_classes(arrays.get("classes"), train, test, path)
    train, test, held_out = with_test_split(train, test if len(test.labels) else None)
    return Source(kind="npz", classes=classes, train=train, test=test, held_out=held_out)


def _npz_classes(classes: np.ndarray | None, train: ArraySplit, test: ArraySplit, path: Path) -> list[str]:
    """The `classes` strings, or "0".."K-1" from the training labels' range; every label must name one."""
    if classes is None:
        names = [str(i) for i in range(max(int(train.labels.max()), 0) + 1)]
    elif classes.ndim != 1 or classes.dtype.kind not in "US" or len(classes) == 0:
        raise UserError(f"{path}: classes must be a non-empty array of strings, not {classes.dtype} of shape "
                        f"{classes.shape}")
    else:
        names = [c.decode() if isinstance(c, bytes) else str(c) for c in classes.tolist()]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise UserError(f"{path}: classes names {twice[0]!r} more than once")
    for name, split in (("labels", train), ("test_labels", test)):
        outside = split.labels[(split.labels < 0) | (split.labels >= len(names))]
        if len(outside):
            raise UserError(f"{path}: {name} holds {int(outside[0])}, outside 0..{len(names) - 1} "
                            f"({len(names)} classes)")
    return names


def open_source(path: Path) -> Source:
    """Detect the kind of source at path and open it."""
    if not path.exists():
        raise UserError(f"data path {path} does not exist")
    if is_data_file(path):
        return load_npz(path) if path.suffix.lower() == ".npz" else load_image_list(path)
    if is_cifar_python(path):
        return load_cifar_python(path)
    if path.is_dir():
        if not any(path.iterdir()):
            raise UserError(f"data path {path} is empty")
        return scan_image_folder(path)
    raise UserError(f"{path} is neither a folder of images, a CIFAR-10 batch folder or .tar.gz, "
                    "a .csv/.tsv list of images nor an .npz of arrays")
