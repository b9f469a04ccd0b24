"""PowerSGD under live membership (parallel/low_rank.py): the flat bucket torch's hook reads, and the bytes
it sends (the hook over a real two-process gloo group, its rollback and its healed state:
tests/e2e/test_sync.py)."""

from __future__ import annotations

import torch

from distvision.parallel.low_rank import START_ITERATIONS, FlatBucket, wire_bytes

# One matrix PowerSGD compresses at rank 2 ((64 + 32) x 2 x 2 < 64 x 32), one it leaves whole (too small
# to pay), and a bias vector.
SHAPES = [torch.Size([64, 32]), torch.Size([4, 3]), torch.Size([64])]
COUNT = sum(shape.numel() for shape in SHAPES)


def test_the_flat_bucket_hands_the_hook_each_gradient_as_a_view_of_the_flat_vector():
    flat = torch.arange(COUNT, dtype=torch.float32)
    views = FlatBucket(flat, SHAPES).gradients()
    assert [view.shape for view in views] == SHAPES
    views[1].fill_(-1.0)  # the hook writes its result through them
    assert torch.equal(flat[64 * 32 : 64 * 32 + 12], torch.full((12,), -1.0))
    assert torch.equal(torch.cat([view.reshape(-1) for view in views]), flat)


def test_wire_bytes_follow_torchs_rule_for_what_is_compressed():
    assert wire_bytes(SHAPES, rank=2, iteration=0) == 4 * COUNT
    assert wire_bytes(SHAPES, rank=32, iteration=START_ITERATIONS) == 4 * COUNT  # a rank that saves nothing
    assert wire_bytes(SHAPES, rank=1, iteration=START_ITERATIONS) == 4 * ((64 + 32) + 12 + 64)
