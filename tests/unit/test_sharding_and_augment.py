"""Who trains on what: every sample once per epoch for any world size; augmentation independent of rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distvision.data.augment import AugmentSettings, augment_batch, sample_uniforms
from distvision.data.batches import BatchPrefetcher, Preprocessing, load_batch, resident
from distvision.data.sharding import epoch_permutation, evaluation_share, global_batches, rank_slice
from distvision.parallel.balance import split_sizes
from distvision.recipes import lr_multiplier, one_cycle, step_down


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("sample_count", [1000, 1001, 1023, 97, 5])
def test_every_sample_exactly_once_per_epoch(world_size: int, sample_count: int):
    batch_size = 64 if sample_count > 10 else 4
    batch_size = max(batch_size, world_size)
    for epoch in range(2):
        batches = global_batches(epoch_permutation(3, epoch, sample_count), batch_size, world_size)
        per_rank = [[rank_slice(b, r, world_size) for b in batches] for r in range(world_size)]
        seen = np.concatenate([s for shares in per_rank for s in shares])
        assert np.array_equal(np.sort(seen), np.arange(sample_count))
        # Every rank takes the same number of steps and never an empty one (no deadlock, no crash).
        assert all(len(shares) == len(batches) for shares in per_rank)
        assert min(len(s) for shares in per_rank for s in shares) >= 1
        sizes = [[len(s) for s in shares] for shares in per_rank]
        assert all(max(col) - min(col) <= 1 for col in zip(*sizes))


def test_epochs_get_different_orders_and_ranks_agree():
    assert not np.array_equal(epoch_permutation(0, 0, 100), epoch_permutation(0, 1, 100))
    assert np.array_equal(epoch_permutation(5, 2, 100), epoch_permutation(5, 2, 100))


def test_evaluation_shares_cover_the_set_once():
    for world_size in range(1, 5):
        shares = [evaluation_share(10, r, world_size) for r in range(world_size)]
        assert np.array_equal(np.concatenate(shares), np.arange(10))


def test_augmentation_depends_on_the_sample_not_the_rank_split():
    images = torch.randint(0, 256, (8, 12, 12, 3), dtype=torch.uint8)
    indices = np.arange(100, 108)
    settings = AugmentSettings(translate=2, flip=True, cutout=4)
    whole = augment_batch(images, indices, settings, seed=1, epoch=3)
    halves = torch.cat([augment_batch(images[:3], indices[:3], settings, 1, 3),
                        augment_batch(images[3:], indices[3:], settings, 1, 3)])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, augment_batch(images, indices, settings, seed=1, epoch=4))


def test_flip_and_translate_move_pixels_as_promised():
    image = torch.arange(5 * 5 * 3, dtype=torch.int32).reshape(1, 5, 5, 3).to(torch.uint8)
    flips = {torch.equal(augment_batch(image, np.array([i]), AugmentSettings(flip=True), 0, 0), image.flip(2))
             for i in range(20)}
    assert flips == {True, False}  # some samples mirrored, some not
    shifted = augment_batch(image, np.array([7]), AugmentSettings(translate=1), 0, 0)
    # A translate keeps a 4x4 block of the original, shifted by at most one pixel.
    matches = [torch.equal(shifted[0, max(dy, 0):5 + min(dy, 0), max(dx, 0):5 + min(dx, 0)],
                           image[0, max(-dy, 0):5 + min(-dy, 0), max(-dx, 0):5 + min(-dx, 0)])
               for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    assert any(matches)


def test_schedules():
    caffe = step_down(0.8, 0.1)
    assert lr_multiplier(caffe, 0.0) == 1.0 and lr_multiplier(caffe, 0.79) == 1.0
    assert lr_multiplier(caffe, 0.8) == pytest.approx(0.1) and lr_multiplier(caffe, 0.99) == pytest.approx(0.1)
    cycle = one_cycle(0.25)
    assert lr_multiplier(cycle, 0.125) == pytest.approx(0.5)
    assert lr_multiplier(cycle, 0.25) == pytest.approx(1.0)
    assert lr_multiplier(cycle, 1.0) == pytest.approx(0.0)


def test_batches_loaded_ahead_equal_batches_loaded_when_taken():
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    preprocess = Preprocessing.build("standardize", [0.5] * 3, [0.25] * 3, np.zeros((8, 8, 3), np.float32))
    augment = AugmentSettings(translate=2, flip=True)
    prefetcher = BatchPrefetcher(images, preprocess, torch.device("cpu"), augment, seed=3)

    def expected(indices, epoch):
        return load_batch(images, indices, preprocess, torch.device("cpu"), augment, 3, epoch)

    first, second = np.array([5, 1, 9, 30]), np.array([2, 7, 11, 39])
    prefetcher.prefetch(first, epoch=1)
    prefetcher.load_ahead()
    prefetcher.load_ahead()  # a second bucket's hook: nothing more to load
    assert prefetcher.seconds > 0
    assert torch.equal(prefetcher.take(first, epoch=1), expected(first, 1))
    # A batch loaded ahead that is not the one needed (another split, another epoch) is not used,
    # nor is one asked for but never loaded ahead (no exchange ran).
    for wanted, epoch, exchanged in ((second, 1, True), (first, 2, True), (first, 1, False)):
        prefetcher.prefetch(first, epoch=1)
        if exchanged:
            prefetcher.load_ahead()
        assert torch.equal(prefetcher.take(wanted, epoch=epoch), expected(wanted, epoch))


@settings(max_examples=40, deadline=None)
@given(pad=st.integers(1, 4), index=st.integers(0, 10**6), seed=st.integers(0, 2**31), epoch=st.integers(0, 50),
       size=st.integers(6, 10))
def test_translate_is_a_reflect_padded_crop_at_the_drawn_offset(pad, index, seed, epoch, size):
    image = torch.randint(0, 256, (1, size, size, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(index))
    shifted = augment_batch(image, np.array([index]), AugmentSettings(translate=pad), seed, epoch)
    uniforms = sample_uniforms(seed, epoch, np.array([index]), 5)[0]
    dy, dx = int(uniforms[1] * (2 * pad + 1)), int(uniforms[2] * (2 * pad + 1))
    padded = np.pad(image[0].numpy(), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    assert np.array_equal(shifted[0].numpy(), padded[dy : dy + size, dx : dx + size])


def test_translate_offsets_cover_every_shift():
    offsets = sample_uniforms(0, 0, np.arange(2000), 5)[:, 1:3] * 5  # translate 2: offsets 0..4
    assert set(offsets.astype(int).ravel().tolist()) == {0, 1, 2, 3, 4}


@settings(max_examples=100, deadline=None)
@given(total=st.integers(1, 5000), shares=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=8))
def test_split_sizes_sum_to_the_batch_in_proportion(total, shares):
    sizes = split_sizes(total, np.array(shares))
    assert sizes.sum() == total
    if total >= len(shares):
        assert sizes.min() >= 1
        wanted = np.array(shares) / sum(shares) * total
        # no worker is more than one sample off its share, beyond what raising others to one sample took
        assert np.all(sizes[wanted < 1] == 1)  # a worker raised to the minimum gets no more
        raised = np.maximum(0, 1 - wanted).sum()
        assert np.all(np.abs(sizes - wanted) < 1 + raised + 1e-9)


@settings(max_examples=100, deadline=None)
@given(xs=st.lists(st.floats(0, 1), min_size=1, max_size=6),
       ys=st.lists(st.floats(0, 2), min_size=6, max_size=6), progress=st.floats(0, 1))
def test_a_schedule_passes_through_its_points_and_is_linear_between_them(xs, ys, progress):
    schedule = tuple(zip(sorted(set(xs)), ys, strict=False))
    for x, y in schedule:
        assert lr_multiplier(schedule, x) == pytest.approx(y)  # at a point, its value
    value = lr_multiplier(schedule, progress)
    before = [point for point in schedule if point[0] <= progress]
    after = [point for point in schedule if point[0] > progress]
    if not before:
        assert value == schedule[0][1]  # before the first point: its value
    elif not after:
        assert value == before[-1][1]  # after the last: its value
    else:
        (x0, y0), (x1, y1) = before[-1], after[0]
        assert value == pytest.approx(y0 + (y1 - y0) * (progress - x0) / (x1 - x0))
        assert min(y0, y1) - 1e-12 <= value <= max(y0, y1) + 1e-12


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 5), st.integers(1, 5), st.booleans())
def test_images_kept_on_the_device_give_the_same_batches(seed, epoch, cursor_batches, alternating):
    """--data-on-device gathers from one resident tensor: for the same seed, epoch and cursor it gives
    the memory-mapped path's batches exactly, augmentation included."""
    images = np.random.default_rng(seed).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    preprocess = Preprocessing.build("caffe", [0.5] * 3, [0.25] * 3, images.mean(0))
    augment = AugmentSettings(translate=2, flip=True, cutout=3, alternating_flip=alternating)
    on_device = resident(images, torch.device("cpu"))
    assert isinstance(on_device, torch.Tensor) and not np.shares_memory(on_device.numpy(), images)
    order = np.arange(50)[epoch_permutation(seed, epoch, 50)]
    for batch in global_batches(order[cursor_batches * 8:], 8, 2):
        for share in (rank_slice(batch, 0, 2), rank_slice(batch, 1, 2)):
            expected = load_batch(images, share, preprocess, torch.device("cpu"), augment, seed, epoch)
            assert torch.equal(load_batch(on_device, share, preprocess, torch.device("cpu"), augment, seed, epoch),
                               expected)
