"""Independent data subsets (a region, a site, a camera) for `distvision train-each`.

A subset is ROOT/<subset>/ (an image folder tree in any layout `train` reads, symlinks followed) or
the rows of a CSV manifest `path,label,subset` with that subset name. Each is prepared into a
memory-mapped folder that `distvision train --data` reads; a subset that cannot be trained (empty,
one class, an unsafe name, ...) carries the reason instead, and the others go on.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distvision.data.prepare import ensure_prepared, is_prepared, open_prepared, prepare_source
from distvision.data.sources import (
    FLAT_SPLIT_SEED,
    FLAT_TEST_FRACTION,
    ArraySplit,
    FileSplit,
    Source,
    hold_out,
)
from distvision.errors import UserError

# A subset name becomes a folder name in the output: no separators, no leading dot or dash.
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
MANIFEST_COLUMNS = ("path", "label", "subset")
GLOBAL_NAME = "_global"  # the model on all subsets together (--compare-global)


@dataclass
class Subset:
    name: str
    data: Path | None = None  # a prepared folder, what `distvision train --data` reads
    problem: str | None = None  # why this subset cannot be trained
    classes: list[str] = field(default_factory=list)
    samples: int = 0  # training images
    notes: list[str] = field(default_factory=list)  # files skipped, manifest rows dropped


def find_subsets(root: Path, work_dir: Path, image_size: int, cache_dir: Path | None) -> list[Subset]:
    """Every subset under root (a folder of subset folders, or a CSV manifest), prepared and checked."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"data path {root} does not exist")
    if root.is_file() and root.suffix.lower() == ".csv":
        subsets = _manifest_subsets(root, work_dir, image_size)
    elif root.is_dir():
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise UserError(f"{root} holds no subset folders: expected ROOT/<subset>/<class>/... "
                            "or ROOT/<subset>/train/<class>/...")
        subsets = [_folder_subset(p, image_size, cache_dir) for p in folders]
    else:
        raise UserError(f"{root} is neither a folder of subsets nor a CSV manifest (path,label,subset)")
    for subset in subsets:
        if subset.problem is None:
            _check_trainable(subset)
    return subsets


def _folder_subset(folder: Path, image_size: int, cache_dir: Path | None) -> Subset:
    subset = Subset(folder.name)
    if not SAFE_NAME.match(folder.name):
        subset.problem = f"subset name {folder.name!r} is not a safe folder name (letters, digits, _ . -)"
        return subset
    try:
        subset.data = ensure_prepared(folder, image_size, cache_dir)
    except UserError as error:
        subset.problem = str(error)
    return subset


def _manifest_subsets(manifest: Path, work_dir: Path, image_size: int) -> list[Subset]:
    """One prepared folder per subset of a `path,label,subset` CSV, under work_dir/<subset>."""
    rows: dict[str, list[tuple[str, str]]] = {}
    dropped: dict[str, list[str]] = {}
    with open(manifest, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not set(MANIFEST_COLUMNS) <= set(reader.fieldnames):
            raise UserError(f"{manifest} must have the columns {','.join(MANIFEST_COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            path = Path(row["path"])
            path = path if path.is_absolute() else manifest.parent / path
            if not path.is_file():
                dropped.setdefault(row["subset"], []).append(f"{manifest.name} line {line}: no file {path}")
                continue
            rows.setdefault(row["subset"], []).append((str(path), row["label"]))
    subsets = []
    for name in sorted(set(rows) | set(dropped)):
        subset = Subset(name, notes=dropped.get(name, []))
        subsets.append(subset)
        if not SAFE_NAME.match(name):
            subset.problem = f"subset name {name!r} is not a safe folder name (letters, digits, _ . -)"
            continue
        if not rows.get(name):
            subset.problem = f"subset {name!r} has no existing image file in {manifest.name}"
            continue
        out = work_dir / name
        if not is_prepared(out):
            classes = sorted({label for _, label in rows[name]})
            index = {label: i for i, label in enumerate(classes)}
            everything = FileSplit([p for p, _ in rows[name]], [index[label] for _, label in rows[name]])
            train, test = hold_out(everything, FLAT_TEST_FRACTION, FLAT_SPLIT_SEED)
            try:
                prepare_source(Source("image-folder", classes, train, test), out, f"{manifest}#{name}", image_size)
            except UserError as error:
                subset.problem = str(error)
                continue
        subset.data = out
    return subsets


def _check_trainable(subset: Subset) -> None:
    prepared = open_prepared(subset.data)
    subset.classes = prepared.classes
    subset.samples = len(prepared.train_labels)
    subset.notes += [f"skipped unreadable file {f}" for f in prepared.manifest["skipped_files"]]
    present = np.unique(prepared.train_labels)
    if subset.samples == 0:
        subset.problem = f"subset {subset.name!r} has no training images"
    elif len(present) < 2:
        subset.problem = f"subset {subset.name!r} has only one class ({prepared.classes[present[0]]}): nothing to learn"
    elif len(prepared.test_labels) == 0:
        subset.problem = f"subset {subset.name!r} has no test images"


def write_union(subsets: list[Subset], out: Path) -> Subset:
    """One prepared folder holding every subset's own train and test splits, classes merged by name.

    Built from the subsets' prepared arrays, so the global model trains on exactly the union of the
    subsets' training images and is tested on each subset's own test images (no leakage).
    """
    union = Subset(GLOBAL_NAME, data=out)
    parts = [open_prepared(s.data) for s in subsets]
    classes = sorted({name for p in parts for name in p.classes})
    index = {name: i for i, name in enumerate(classes)}
    union.classes, union.samples = classes, sum(len(p.train_labels) for p in parts)
    if is_prepared(out):
        return union

    def remapped(prepared, labels: np.ndarray) -> np.ndarray:
        return np.asarray([index[name] for name in prepared.classes], dtype=np.int64)[labels]

    train = ArraySplit(np.concatenate([np.asarray(p.train_images) for p in parts]),
                       np.concatenate([remapped(p, p.train_labels) for p in parts]))
    test = ArraySplit(np.concatenate([np.asarray(p.test_images) for p in parts]),
                      np.concatenate([remapped(p, p.test_labels) for p in parts]))
    prepare_source(Source("subsets", classes, train, test), out, "union of " + ",".join(s.name for s in subsets),
                   parts[0].manifest["image_size"])
    return union


def union_test_slices(subsets: list[Subset]) -> dict[str, slice]:
    """Where each subset's test images sit in the union's test split (write_union's order)."""
    slices, start = {}, 0
    for subset in subsets:
        count = len(open_prepared(subset.data).test_labels)
        slices[subset.name] = slice(start, start + count)
        start += count
    return slices
