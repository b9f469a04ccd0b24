"""CSV/TSV lists of image files and NumPy .npz arrays as data sources, through the prepared cache."""

from __future__ import annotations

import os
import pathlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distvision.data.prepare import ensure_prepared, open_prepared, prepare
from distvision.data.sources import (
    FLAT_SPLIT_SEED,
    FLAT_TEST_FRACTION,
    ArraySplit,
    FileSplit,
    hold_out,
    open_source,
)
from distvision.errors import UserError
from tests.helpers import assert_fails_cleanly, make_class_image


def _write_list(path: Path, header: str, rows: list[str]) -> Path:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    path.write_text("\n".join([header.replace(",", delimiter)] + [r.replace(",", delimiter) for r in rows]) + "\n")
    return path


def _labelled_images(folder: Path, labels: list[str], per_label: int, size: int = 40) -> list[str]:
    """per_label PNGs of each label under folder/images; returns `images/<file>,<label>` rows."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for label_index, label in enumerate(labels):
        for i in range(per_label):
            name = f"images/{label}-{i}.png"
            make_class_image(label_index, i, size).save(folder / name)
            rows.append(f"{name},{label}")
    return rows


# ---------------------------------------------------------------- CSV/TSV lists


def test_csv_with_a_split_column_prepares_images_of_any_size_and_mode(tmp_path: Path):
    (tmp_path / "images").mkdir()
    image = make_class_image(0, 0, size=50)
    image.convert("L").save(tmp_path / "images" / "gray.png")
    image.convert("RGBA").save(tmp_path / "images" / "alpha.png")
    image.convert("P").save(tmp_path / "images" / "palette.png")
    image.resize((17, 40)).save(tmp_path / "images" / "tall.jpg")
    image.save(tmp_path / "elsewhere.png")  # named by its absolute path
    listing = _write_list(tmp_path / "list.csv", "path,label,split", [
        "images/gray.png,zebra,train", "images/alpha.png,cat,train", f"{tmp_path / 'elsewhere.png'},cat,TRAIN",
        "images/palette.png,zebra,test", "images/tall.jpg,cat,test",
    ])
    manifest = prepare(listing, tmp_path / "prep", image_size=24, processes=1)
    data = open_prepared(tmp_path / "prep", verify=True)
    assert manifest["source_kind"] == "image-list" and manifest["skipped_files"] == []
    assert data.classes == ["cat", "zebra"]  # sorted labels of the training rows
    assert data.train_images.shape == (3, 24, 24, 3) and data.test_images.shape == (2, 24, 24, 3)
    assert data.train_labels.tolist() == [1, 0, 0] and data.test_labels.tolist() == [1, 0]
    assert manifest["held_out"] is None  # the list's own test rows


def test_tsv_without_a_split_column_holds_out_a_seeded_share(tmp_path: Path):
    rows = _labelled_images(tmp_path, ["a", "b", "c"], per_label=10)
    listing = _write_list(tmp_path / "list.tsv", "path,label", rows)
    first, second = open_source(listing), open_source(listing)
    assert first.train.paths == second.train.paths and first.test.paths == second.test.paths
    assert len(first.test.paths) == 6 and len(first.train.paths) == 24
    assert not set(first.train.paths) & set(first.test.paths)
    manifest = prepare(listing, tmp_path / "prep", processes=1)
    assert manifest["held_out"] == {"fraction": FLAT_TEST_FRACTION, "seed": FLAT_SPLIT_SEED}
    assert (manifest["train_count"], manifest["test_count"]) == (24, 6)
    assert open_prepared(tmp_path / "prep").classes == ["a", "b", "c"]


def test_the_held_out_split_is_said_on_stderr(tmp_path: Path, capsys):
    listing = _write_list(tmp_path / "list.csv", "path,label", _labelled_images(tmp_path, ["a", "b"], 5))
    prepare(listing, tmp_path / "prep", processes=1)
    said = capsys.readouterr()
    assert "no test split" in said.err and "20% (2 images)" in said.err and said.out == ""


def test_bad_rows_are_skipped_and_reported_like_corrupt_images(tmp_path: Path):
    rows = _labelled_images(tmp_path, ["a", "b"], per_label=4)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    listing = _write_list(tmp_path / "list.csv", "path,label,split", [
        *(f"{row},train" for row in rows),
        "images/missing.png,a,train",  # no such file
        "images/a-0.png,,train",  # no label
        ",b,train",  # no path
        "images/broken.png,b,test",  # not an image
        "images/missing-test.png,zebra,test",  # skipped as missing before its label is looked at
        "images/a-1.png,a,test",
        ",,",  # blank
    ])
    manifest = prepare(listing, tmp_path / "prep", processes=1)
    assert (manifest["train_count"], manifest["test_count"]) == (8, 1)
    assert manifest["classes"] == ["a", "b"]
    skipped = manifest["skipped_files"]
    assert {Path(p).name for p in skipped if p.endswith(".png")} == {
        "missing.png", "a-0.png", "broken.png", "missing-test.png"}
    assert f"{listing} line 12" in skipped  # the row without a path is named by its line
    assert len(skipped) == 5


@pytest.mark.parametrize(("header", "missing"), [("file,label", "path"), ("path,class,split", "label")])
def test_a_list_without_a_path_or_label_column_is_a_user_error(tmp_path: Path, header: str, missing: str):
    listing = _write_list(tmp_path / "list.csv", header, ["x.png,a,train"])
    with pytest.raises(UserError, match=f"{listing}.*no '{missing}' column") as raised:
        open_source(listing)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(("rows", "expected"), [
    (["images/a-0.png,a,train", "images/b-0.png,b,test"], r"line 3: label 'b' of a test row is on no training row"),
    (["images/a-0.png,a,validation"], r"line 2: split 'validation' is neither train nor test"),
    (["images/a-0.png,a,test"], "no training row with a label"),
])
def test_bad_list_contents_are_user_errors_naming_the_row(tmp_path: Path, rows: list[str], expected: str):
    _labelled_images(tmp_path, ["a", "b"], per_label=1)
    listing = _write_list(tmp_path / "list.csv", "path,label,split", rows)
    with pytest.raises(UserError, match=expected):
        open_source(listing)


def test_an_empty_or_undecodable_list_is_a_user_error(tmp_path: Path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="no 'path' column"):
        open_source(tmp_path / "empty.csv")
    (tmp_path / "latin.csv").write_bytes("path,label\nb\xe9b\xe9.png,x\n".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        open_source(tmp_path / "latin.csv")


def test_an_edited_list_is_prepared_again(tmp_path: Path):
    rows = _labelled_images(tmp_path, ["a", "b"], per_label=5)
    listing = _write_list(tmp_path / "list.csv", "path,label", rows)
    first = ensure_prepared(listing, 32, tmp_path / "cache")
    assert ensure_prepared(listing, 32, tmp_path / "cache") == first
    _write_list(listing, "path,label", rows[:-2])
    os.utime(listing, ns=(1, 1))  # another modification time even on a coarse-grained file system
    second = ensure_prepared(listing, 32, tmp_path / "cache")
    assert second != first
    assert open_prepared(second).manifest["train_count"] + open_prepared(second).manifest["test_count"] == 8


# ---------------------------------------------------------------- .npz arrays


def _images(count: int, size: int = 20, gray: bool = False) -> np.ndarray:
    rng = np.random.default_rng(count)
    shape = (count, size, size) if gray else (count, size, size, 3)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def test_npz_with_test_arrays_and_class_names(tmp_path: Path):
    np.savez(tmp_path / "data.npz", images=_images(12), labels=np.arange(12) % 3,
             test_images=_images(4, size=36), test_labels=np.array([0, 1, 2, 2]),
             classes=np.array(["cat", "dog", "emu"]))
    manifest = prepare(tmp_path / "data.npz", tmp_path / "prep", image_size=24, processes=1)
    data = open_prepared(tmp_path / "prep", verify=True)
    assert manifest["source_kind"] == "npz" and manifest["held_out"] is None
    assert data.classes == ["cat", "dog", "emu"]
    assert data.train_images.shape == (12, 24, 24, 3) and data.test_images.shape == (4, 24, 24, 3)
    assert data.train_labels.tolist() == (np.arange(12) % 3).tolist()
    assert data.test_labels.tolist() == [0, 1, 2, 2]


def test_npz_of_grayscale_images_without_test_arrays_or_classes(tmp_path: Path, capsys):
    images = _images(10, size=32, gray=True)
    np.savez_compressed(tmp_path / "gray.npz", images=images, labels=np.array([0, 4] * 5, dtype=np.uint8))
    manifest = prepare(tmp_path / "gray.npz", tmp_path / "prep", processes=1)
    data = open_prepared(tmp_path / "prep")
    assert data.classes == ["0", "1", "2", "3", "4"]  # the labels' range
    assert (manifest["train_count"], manifest["test_count"]) == (8, 2)
    assert manifest["held_out"] == {"fraction": FLAT_TEST_FRACTION, "seed": FLAT_SPLIT_SEED}
    assert "no test split" in capsys.readouterr().err
    # Grey replicated to 3 channels, pixels untouched at the native size; the same held-out images every time.
    train, _ = hold_out(ArraySplit(images, np.zeros(10, np.int64)), FLAT_TEST_FRACTION, FLAT_SPLIT_SEED)
    np.testing.assert_array_equal(data.train_images, np.repeat(train.images[..., None], 3, axis=-1))


class _TouchOnLoad:
    """Unpickling this creates the file: proof that an .npz object array was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize(("arrays", "expected"), [
    ({"images": _images(5), "labels": np.arange(4)}, "labels has 4 entries but there are 5 images"),
    ({"images": _images(3).astype(np.float32), "labels": np.arange(3)}, "images is float32, expected uint8"),
    ({"images": _images(3)[..., :2], "labels": np.arange(3)}, r"shape \(3, 20, 20, 2\)"),
    ({"images": _images(3), "labels": np.array([0.0, 1.0, 2.0])}, "labels must be one integer per image"),
    ({"images": _images(3), "labels": np.array([0, 1, 2]), "classes": np.array(["a", "b"])},
     r"labels holds 2, outside 0..1 \(2 classes\)"),
    ({"images": _images(3), "labels": np.array([0, -1, 1])}, "labels holds -1"),
    ({"images": _images(3), "labels": np.arange(3), "test_images": _images(2)},
     "only one of test_images and test_labels"),
    ({"images": _images(3), "labels": np.arange(3), "test_images": _images(2), "test_labels": np.array([0, 7])},
     "test_labels holds 7"),
    ({"images": _images(3)}, "no 'labels' array"),
    ({"images": _images(3), "labels": np.arange(3), "classes": np.array([1, 2, 3])},
     "classes must be a non-empty array of strings"),
    ({"images": _images(2), "labels": np.arange(2), "classes": np.array(["a", "a"])}, "names 'a' more than once"),
])
def test_bad_npz_contents_are_one_line_user_errors(tmp_path: Path, arrays: dict, expected: str):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=expected) as raised:
        open_source(tmp_path / "bad.npz")
    assert "\n" not in str(raised.value) and "bad.npz" in str(raised.value)


def test_npz_object_arrays_are_refused_never_unpickled(tmp_path: Path):
    marker = tmp_path / "unpickled"
    evil = np.empty(3, dtype=object)
    evil[:] = [_TouchOnLoad(marker)] * 3
    np.savez(tmp_path / "evil.npz", images=_images(3), labels=evil)
    with pytest.raises(UserError, match="labels is unreadable"):
        open_source(tmp_path / "evil.npz")
    assert not marker.exists()


def test_a_file_that_is_not_an_npz_archive_is_a_user_error(tmp_path: Path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable .npz archive"):
        open_source(tmp_path / "junk.npz")
    np.save(tmp_path / "single.npy", _images(2))
    os.replace(tmp_path / "single.npy", tmp_path / "single.npz")
    with pytest.raises(UserError, match="single array"):
        open_source(tmp_path / "single.npz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"\.csv/\.tsv list"):
        open_source(tmp_path / "notes.txt")


def test_train_refuses_a_bad_list_or_npz_in_one_line(tmp_path: Path):
    listing = _write_list(tmp_path / "list.csv", "file,label", ["x.png,a"])
    assert_fails_cleanly(["train", "--data", str(listing), "--out", str(tmp_path / "run")], tmp_path,
                         "no 'path' column")
    np.savez(tmp_path / "short.npz", images=_images(5), labels=np.arange(4))
    assert_fails_cleanly(["train", "--data", str(tmp_path / "short.npz"), "--out", str(tmp_path / "run")], tmp_path,
                         "labels has 4 entries but there are 5 images")


# ---------------------------------------------------------------- the held-out split


@settings(max_examples=60, deadline=None)
@given(count=st.integers(0, 300))
def test_hold_out_is_deterministic_disjoint_and_the_same_for_files_and_arrays(count: int):
    files = FileSplit([f"{i}.png" for i in range(count)], list(range(count)))
    arrays = ArraySplit(np.arange(count, dtype=np.uint8).reshape(count, 1, 1, 1), np.arange(count))
    train, test = hold_out(files, FLAT_TEST_FRACTION, FLAT_SPLIT_SEED)
    again_train, again_test = hold_out(files, FLAT_TEST_FRACTION, FLAT_SPLIT_SEED)
    array_train, array_test = hold_out(arrays, FLAT_TEST_FRACTION, FLAT_SPLIT_SEED)
    assert (train, test) == (again_train, again_test)
    assert len(test.labels) == round(count * FLAT_TEST_FRACTION)
    assert sorted(train.labels + test.labels) == list(range(count))  # every item once
    assert train.labels == sorted(train.labels) and test.labels == sorted(test.labels)  # order kept
    assert array_train.labels.tolist() == train.labels and array_test.labels.tolist() == test.labels
