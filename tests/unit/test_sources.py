"""Loading every source format and layout into the prepared cache."""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distvision.data.prepare import ensure_prepared, open_prepared, prepare
from distvision.data.sources import open_source
from distvision.errors import UserError
from tests.helpers import make_class_image, write_cifar_batches, write_image_tree


def test_cifar_python_folder_and_tarball_give_the_same_arrays(tmp_path: Path):
    folder = write_cifar_batches(tmp_path / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    from_folder, from_tar = open_source(tmp_path), open_source(archive)
    assert from_folder.train.images.shape == (100, 32, 32, 3)
    assert from_folder.test.images.shape == (20, 32, 32, 3)
    assert from_folder.classes[0] == "airplane" and len(from_folder.classes) == 10
    np.testing.assert_array_equal(from_folder.train.images, from_tar.train.images)
    np.testing.assert_array_equal(from_folder.train.labels, from_tar.train.labels)
    # The rows are CHW planes: pixel (0, 0) of image 0 is bytes 0, 1024, 2048 of its row.
    raw = pickle.loads((folder / "data_batch_1").read_bytes())[b"data"][0]
    assert from_folder.train.images[0, 0, 0].tolist() == [raw[0], raw[1024], raw[2048]]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_unpickler_refuses_foreign_objects(tmp_path: Path):
    folder = write_cifar_batches(tmp_path / "cifar")
    (folder / "data_batch_3").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UserError, match="data_batch_3"):
        open_source(folder)


def test_image_folder_with_train_and_test(tmp_path: Path):
    root = write_image_tree(tmp_path / "tree", classes=3, train_per_class=5, test_per_class=2)
    manifest = prepare(root, tmp_path / "prep")
    data = open_prepared(tmp_path / "prep", verify=True)
    assert manifest["classes"] == ["class0", "class1", "class2"]
    assert (manifest["train_count"], manifest["test_count"]) == (15, 6)
    assert data.train_images.shape == (15, 32, 32, 3) and data.train_images.dtype == np.uint8
    assert sorted(np.bincount(data.train_labels).tolist()) == [5, 5, 5]
    np.testing.assert_array_equal(data.train_images[0], np.asarray(Image.open(root / "train/class0/0000.png")))


def test_flat_layout_gets_a_seeded_disjoint_test_split(tmp_path: Path):
    root = write_image_tree(tmp_path / "flat", classes=2, train_per_class=20, split=False)
    first, second = open_source(root), open_source(root)
    assert first.train.paths == second.train.paths  # seeded: the same split every time
    assert len(first.test.paths) == 8 and len(first.train.paths) == 32
    assert not set(first.train.paths) & set(first.test.paths)


def test_symlinked_folders_and_files_are_followed(tmp_path: Path):
    elsewhere = write_image_tree(tmp_path / "elsewhere", classes=1, train_per_class=3, split=False)
    root = tmp_path / "root"
    (root / "cats").mkdir(parents=True)
    make_class_image(0, 0).save(tmp_path / "lonely.png")
    os.symlink(tmp_path / "lonely.png", root / "cats" / "linked.png")
    os.symlink(elsewhere / "class0", root / "dogs")
    os.symlink(root, root / "cats" / "loop")  # a loop must not hang the scan
    source = open_source(root)
    assert source.classes == ["cats", "dogs"]
    assert len(source.train.paths) + len(source.test.paths) == 4


def test_odd_sizes_modes_and_formats_become_rgb_of_the_requested_size(tmp_path: Path):
    folder = tmp_path / "odd" / "train" / "things"
    folder.mkdir(parents=True)
    rgb = make_class_image(1, 1, size=50)
    rgb.convert("L").save(folder / "gray.jpg")
    rgb.convert("RGBA").save(folder / "alpha.png")
    rgb.convert("P").save(folder / "palette.bmp")
    rgb.resize((17, 40)).save(folder / "tall.webp")
    rgb.convert("CMYK").save(folder / "cmyk.jpeg")
    Image.fromarray((np.arange(2500).reshape(50, 50) * 20).astype(np.uint16)).save(folder / "deep.png")
    manifest = prepare(tmp_path / "odd", tmp_path / "prep", image_size=24)
    data = open_prepared(tmp_path / "prep")
    assert manifest["skipped_files"] == []
    assert data.train_images.shape[1:] == (24, 24, 3) and data.test_images.shape[1:] == (24, 24, 3)
    assert len(data.train_images) + len(data.test_images) == 6


def test_corrupt_and_non_image_files_are_skipped_and_listed(tmp_path: Path):
    root = write_image_tree(tmp_path / "tree", classes=2, train_per_class=4, test_per_class=2)
    (root / "train/class0/broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "train/class1/truncated.png").write_bytes((root / "train/class1/0000.png").read_bytes()[:60])
    (root / "train/class1/notes.txt").write_text("not an image")
    manifest = prepare(root, tmp_path / "prep")
    skipped = {Path(p).name for p in manifest["skipped_files"]}
    assert skipped == {"broken.jpg", "truncated.png", "notes.txt"}
    assert manifest["train_count"] == 8


def test_folder_without_readable_images_is_a_user_error(tmp_path: Path):
    (tmp_path / "bad" / "class0").mkdir(parents=True)
    (tmp_path / "bad" / "class0" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no readable image"):
        prepare(tmp_path / "bad", tmp_path / "prep")
    assert not (tmp_path / "prep").exists()


def test_prepared_cache_detects_corruption(tmp_path: Path):
    root = write_image_tree(tmp_path / "tree", classes=2, train_per_class=3, test_per_class=1)
    prepare(root, tmp_path / "prep")
    with open(tmp_path / "prep" / "train_images.u8", "r+b") as f:
        f.write(b"\x00\x01\x02")
    with pytest.raises(UserError, match="corrupt"):
        open_prepared(tmp_path / "prep", verify=True)


def test_ensure_prepared_builds_once_outside_the_data_folder(tmp_path: Path):
    root = write_image_tree(tmp_path / "tree", classes=2, train_per_class=3, test_per_class=1)
    # The data folder may be read-only: nothing is written in it. (A chmod would not show that: the
    # tests run as root in CI, and root writes through 0o555.)
    before = {path: path.stat().st_mtime_ns for path in root.rglob("*")}
    first = ensure_prepared(root, 32, tmp_path / "cache")
    built = (first / "manifest.json").stat().st_mtime_ns
    second = ensure_prepared(root, 32, tmp_path / "cache")
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*")} == before
    assert not first.is_relative_to(root)
    assert first == second and first.parent.parent == tmp_path / "cache"
    assert (second / "manifest.json").stat().st_mtime_ns == built
    assert ensure_prepared(first, 32, tmp_path / "cache") == first  # a prepared folder is used as is
