"""What --input holds, and reading its images.

Three kinds of input:
  * a folder tree: every file under it (symlinks followed, as for training data) is tried as an
    image, so any format PIL reads works and a file that is not an image ends up in errors.csv;
    rows name files by their path relative to the folder. When every top-level folder is named
    after one of the checkpoint's classes, the tree is labelled and accuracy is reported;
  * a text file listing image paths, one per line (blank lines and lines starting with # ignored;
    relative paths are relative to the list file's folder); rows name files as the list does;
  * a prepared folder (`distvision prepare`): both of its splits, rows named train/<index> and
    test/<index>, labelled by the prepared classes.
Images are decoded exactly as training decodes them (`read_image`), so the pixels match.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distvision.data.prepare import is_prepared, open_prepared
from distvision.data.sources import IMAGE_EXTENSIONS, list_files, read_image
from distvision.errors import UserError

UNLABELLED = -1
DECODE_GROUP = 32  # files per decode task: large enough that the pool's per-task cost is small


@dataclass
class ClassifyInput:
    """The input's items in row order (sorted by path, each path once)."""

    kind: str  # "folder" | "list" | "prepared"
    location: str  # the input's real path
    paths: list[str]  # what each row is called
    sources: list[str]  # the file to read for each item ("" for a prepared folder: read by index)
    labels: list[int] | None  # the checkpoint's class index per item (UNLABELLED where unknown), or None

    def to_dict(self) -> dict:
        return dict(vars(self))


def find_input(path: Path, classes: list[str], image_size: int, skip: tuple[str, ...] = ()) -> ClassifyInput:
    """Detect the kind of input at path and list its items; a folder's files at or under skip are left out."""
    if not path.exists():
        raise UserError(f"input {path} does not exist")
    if path.is_dir() and is_prepared(path):
        found = _prepared_input(path, classes, image_size)
    elif path.is_dir():
        found = _folder_input(path, classes, skip)
    else:
        found = _list_input(path)
    if not found.paths:
        raise UserError(f"input {path} holds no files to classify")
    return found


def _folder_input(root: Path, classes: list[str], skip: tuple[str, ...]) -> ClassifyInput:
    images, others = list_files(root)
    # The command's own outputs, when they are written inside the input folder, are not inputs.
    paths = sorted((os.path.relpath(full, root), full) for full in images + others if not _is_within(full, skip))
    top_folders = {p.split(os.sep)[0] for p, _ in paths if os.sep in p}
    labelled = bool(top_folders) and top_folders <= set(classes)
    labels = None
    if labelled:
        index = {name: i for i, name in enumerate(classes)}
        labels = [index[p.split(os.sep)[0]] if os.sep in p else UNLABELLED for p, _ in paths]
    return ClassifyInput("folder", os.path.realpath(root), [p for p, _ in paths], [f for _, f in paths], labels)


def _is_within(path: str, places: tuple[str, ...]) -> bool:
    real = os.path.realpath(path)
    return any(real == place or real.startswith(place + os.sep) for place in places)


def _list_input(list_file: Path) -> ClassifyInput:
    if list_file.suffix.lower() in IMAGE_EXTENSIONS:  # a single image is a list of one
        return ClassifyInput("list", os.path.realpath(list_file), [str(list_file)], [os.path.abspath(list_file)], None)
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"input {list_file} is neither a folder nor a text file listing image paths "
                        f"({error})") from None
    base = list_file.resolve().parent
    items = {}
    for line in lines:
        name = line.strip()
        if name and not name.startswith("#"):
            items.setdefault(name, os.path.join(base, os.path.expanduser(name)))
    ordered = sorted(items.items())
    return ClassifyInput("list", os.path.realpath(list_file), [p for p, _ in ordered], [f for _, f in ordered], None)


def _prepared_input(folder: Path, classes: list[str], image_size: int) -> ClassifyInput:
    prepared = open_prepared(folder)
    if prepared.manifest["image_size"] != image_size:
        raise UserError(f"{folder} was prepared at {prepared.manifest['image_size']} px, the checkpoint expects "
                        f"{image_size} px: prepare it again with --image-size {image_size}")
    splits = [("train", len(prepared.train_labels)), ("test", len(prepared.test_labels))]
    width = len(str(max(count for _, count in splits)))
    paths = [f"{split}/{i:0{width}d}" for split, count in splits for i in range(count)]
    labels = None
    if set(prepared.classes) <= set(classes):
        to_checkpoint = np.array([classes.index(name) for name in prepared.classes], dtype=np.int64)
        labels = to_checkpoint[np.concatenate([prepared.train_labels, prepared.test_labels])].tolist()
    return ClassifyInput("prepared", os.path.realpath(folder), paths, [""] * len(paths), labels)


@dataclass
class ChunkImages:
    """One chunk's decoded images and what could not be read."""

    items: list[int]  # the items the images are of, in order
    images: np.ndarray  # (len(items), size, size, 3) uint8
    errors: list[tuple[int, str]]  # (item, reason)


class ImageReader:
    """Decodes the items of a chunk in a thread pool (PIL releases the GIL), so the next chunk can be
    decoded while the model works on this one."""

    def __init__(self, data: ClassifyInput, image_size: int, threads: int):
        self.data = data
        self.image_size = image_size
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 0 else None
        self.prepared = None
        if data.kind == "prepared":
            prepared = open_prepared(Path(data.location))
            self.prepared = (prepared.train_images, prepared.test_images)

    def start(self, items: range) -> list[Future] | ChunkImages:
        """Begin decoding items; hand the result to finish()."""
        if self.prepared is not None:
            return self._from_prepared(items)
        groups = [items[i : i + DECODE_GROUP] for i in range(0, len(items), DECODE_GROUP)]
        if self.pool is None:
            return [_done(self._decode(group)) for group in groups]
        return [self.pool.submit(self._decode, group) for group in groups]

    def finish(self, started: list[Future] | ChunkImages) -> ChunkImages:
        """Wait for the decoding begun by start()."""
        if isinstance(started, ChunkImages):
            return started
        parts = [future.result() for future in started]
        items = [item for part in parts for item in part.items]
        images = np.concatenate([part.images for part in parts]) if parts else self._empty(0)
        return ChunkImages(items, images, [error for part in parts for error in part.errors])

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(cancel_futures=True)

    def _decode(self, items: range) -> ChunkImages:
        good, images, errors = [], self._empty(len(items)), []
        for item in items:
            try:
                images[len(good)] = read_image(self.data.sources[item], self.image_size)
                good.append(item)
            except Exception as error:  # noqa: BLE001 - any decoder failure is recorded in errors.csv
                errors.append((item, _reason(error)))
        return ChunkImages(good, images[: len(good)], errors)

    def _from_prepared(self, items: range) -> ChunkImages:
        train, test = self.prepared
        indices = np.arange(items.start, items.stop)
        images = np.concatenate([train[indices[indices < len(train)]],
                                 test[indices[indices >= len(train)] - len(train)]])
        return ChunkImages(list(items), images, [])

    def _empty(self, count: int) -> np.ndarray:
        return np.empty((count, self.image_size, self.image_size, 3), dtype=np.uint8)


def _done(result: ChunkImages) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


def _reason(error: Exception) -> str:
    """One line saying why a file could not be read."""
    text = " ".join(str(error).split()) or "no details"
    return f"{type(error).__name__}: {text}"
