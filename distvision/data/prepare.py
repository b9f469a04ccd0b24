"""Decode a source once, in parallel, into a memory-mapped cache that training reads.

Layout of a prepared folder:
  train_images.u8 / test_images.u8   raw uint8 arrays (N, H, W, 3), memory-mapped on open
  train_labels.npy / test_labels.npy int64 labels
  mean_image.npy                     float32 (H, W, 3) mean training image (Caffe preprocessing)
  manifest.json                      classes, counts, size, mean/std, checksums, skipped files
The manifest is written last, atomically, so a folder with a manifest is complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from distvision.data.sources import (
    FLAT_SPLIT_SEED,
    ArraySplit,
    FileSplit,
    Source,
    decode_image,
    is_data_file,
    open_source,
    resize_image,
)
from distvision.errors import UserError
from distvision.fileio import sha256_file, write_json_atomic

FORMAT_VERSION = 1
DECODE_CHUNK = 512


@dataclass
class Prepared:
    """A prepared data set, images memory-mapped."""

    path: Path
    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    mean_image: np.ndarray
    manifest: dict


def default_cache_dir() -> Path:
    """The user's cache directory for distvision (XDG_CACHE_HOME respected)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "distvision"


def is_prepared(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def _decode_chunk(args: tuple[list[str], int]) -> tuple[np.ndarray, np.ndarray]:
    paths, image_size = args
    images = np.zeros((len(paths), image_size, image_size, 3), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    for i, path in enumerate(paths):
        decoded = decode_image(path, image_size)
        if decoded is not None:
            images[i], ok[i] = decoded, True
    return images, ok


def _write_split(split: ArraySplit | FileSplit, out: Path, name: str, image_size: int, processes: int):
    """Write one split's images and labels; return (count, skipped paths)."""
    if isinstance(split, ArraySplit):
        images = split.images
        if images.shape[1:3] != (image_size, image_size):
            # Arrays of another size than requested are resized as decoded files are.
            images = np.stack([resize_image(Image.fromarray(a), image_size) for a in images])
        images.tofile(out / f"{name}_images.u8")
        np.save(out / f"{name}_labels.npy", split.labels.astype(np.int64))
        return len(images), []
    chunks = [split.paths[i : i + DECODE_CHUNK] for i in range(0, len(split.paths), DECODE_CHUNK)]
    labels, skipped, count = [], [], 0
    with open(out / f"{name}_images.u8", "wb") as images_file:
        context = multiprocessing.get_context("spawn" if processes > 1 else None)
        pool = context.Pool(processes) if processes > 1 and len(chunks) > 1 else None
        results = (pool.imap if pool else map)(_decode_chunk, [(c, image_size) for c in chunks])
        try:
            for chunk_index, (images, ok) in enumerate(results):
                start = chunk_index * DECODE_CHUNK
                images_file.write(images[ok].tobytes())
                count += int(ok.sum())
                for i, good in enumerate(ok):
                    if good:
                        labels.append(split.labels[start + i])
                    else:
                        skipped.append(split.paths[start + i])
        finally:
            if pool:
                pool.close()
                pool.join()
    np.save(out / f"{name}_labels.npy", np.asarray(labels, dtype=np.int64))
    return count, skipped


def prepare(data_path: Path, out: Path, image_size: int = 32, processes: int | None = None) -> dict:
    """Decode the source at data_path into out; return the manifest. Says so when the test split was held out."""
    manifest = prepare_source(open_source(Path(data_path)), out, str(Path(data_path).resolve()), image_size,
                              processes)
    if manifest["held_out"]:  # on stderr: `distvision evaluate` prints its result as JSON on stdout
        print(f"distvision: {data_path} has no test split: a seeded {manifest['held_out']['fraction']:.0%} "
              f"({manifest['test_count']} images) is held out as the test set", file=sys.stderr, flush=True)
    return manifest


def prepare_source(source: Source, out: Path, origin: str, image_size: int = 32,
                   processes: int | None = None) -> dict:
    """Decode an opened source into out (origin names it in the manifest and messages); return the manifest."""
    processes = processes or os.cpu_count() or 1
    if out.exists() and out.is_file():
        raise UserError(f"output path {out} is a file, not a folder")
    build = out.with_name(out.name + f".building-{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    started = time.time()
    train_count, skipped_train = _write_split(source.train, build, "train", image_size, processes)
    test_count, skipped_test = _write_split(source.test, build, "test", image_size, processes)
    skipped = source.skipped + skipped_train + skipped_test
    if train_count == 0:
        shutil.rmtree(build, ignore_errors=True)
        raise UserError(f"{origin} holds no readable image ({len(skipped)} files could not be decoded)")
    train = np.memmap(build / "train_images.u8", dtype=np.uint8, mode="r").reshape(
        train_count, image_size, image_size, 3
    )
    mean_image, pixel_sum, pixel_sq = np.zeros((image_size, image_size, 3)), np.zeros(3), np.zeros(3)
    for start in range(0, train_count, 4096):  # streamed, so data larger than RAM works
        block = train[start : start + 4096].astype(np.float64)
        mean_image += block.sum(axis=0)
        pixel_sum += block.sum(axis=(0, 1, 2))
        pixel_sq += (block**2).sum(axis=(0, 1, 2))
    pixels = train_count * image_size * image_size
    mean, std = pixel_sum / pixels, np.sqrt(pixel_sq / pixels - (pixel_sum / pixels) ** 2)
    np.save(build / "mean_image.npy", (mean_image / train_count).astype(np.float32))
    del train
    files = ["train_images.u8", "train_labels.npy", "test_images.u8", "test_labels.npy", "mean_image.npy"]
    train_labels = np.load(build / "train_labels.npy")
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": origin,
        "source_kind": source.kind,
        "classes": source.classes,
        "image_size": image_size,
        "train_count": train_count,
        "test_count": test_count,
        "class_counts": np.bincount(train_labels, minlength=len(source.classes)).tolist(),
        "mean": (mean / 255).tolist(),
        "std": (std / 255).tolist(),
        "checksums": {name: sha256_file(build / name) for name in files},
        "skipped_files": skipped,
        # The source had no test split: this seeded share of its training data is the test split.
        "held_out": {"fraction": source.held_out, "seed": FLAT_SPLIT_SEED} if source.held_out else None,
        "prepare_seconds": round(time.time() - started, 2),
    }
    write_json_atomic(build / "manifest.json", manifest)
    if out.exists():
        shutil.rmtree(out)
    os.replace(build, out)
    return manifest


def open_prepared(path: Path, verify: bool = False) -> Prepared:
    """Open a prepared folder; images stay on disk, memory-mapped."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not a prepared data folder (manifest.json: {error})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} was prepared by another distvision version: run `distvision prepare` again")
    if verify:
        for name, expected in manifest["checksums"].items():
            if sha256_file(path / name) != expected:
                raise UserError(f"{path / name} is corrupt (checksum mismatch): prepare the data again")
    size = manifest["image_size"]

    def images(name: str, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros((0, size, size, 3), dtype=np.uint8)
        return np.memmap(path / f"{name}_images.u8", dtype=np.uint8, mode="r", shape=(count, size, size, 3))

    return Prepared(
        path=path,
        classes=manifest["classes"],
        train_images=images("train", manifest["train_count"]),
        train_labels=np.load(path / "train_labels.npy"),
        test_images=images("test", manifest["test_count"]),
        test_labels=np.load(path / "test_labels.npy"),
        mean_image=np.load(path / "mean_image.npy"),
        manifest=manifest,
    )


@contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_key(data_path: Path, image_size: int) -> str:
    """Cache folder name: the source's real path and the image size; for a list or .npz file also its
    size and modification time, so an edited file is prepared again."""
    real = os.path.realpath(data_path)
    key = f"{real}|{image_size}|v{FORMAT_VERSION}"
    if is_data_file(Path(real)):
        stat = os.stat(real)
        key += f"|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{Path(real).name or 'data'}-{image_size}px-{digest}"


def ensure_prepared(data_path: Path, image_size: int, cache_dir: Path | None = None) -> Path:
    """Return a prepared folder for data_path, building it under a file lock if needed.

    Every rank may call this at once: the first takes the lock and builds, the others wait on
    the lock and then find the manifest.
    """
    data_path = Path(data_path)
    if is_prepared(data_path):
        return data_path
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache_dir / "prepared" / cache_key(data_path, image_size)
    if is_prepared(target):
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        if not is_prepared(target):
            prepare(data_path, target, image_size)
    return target
