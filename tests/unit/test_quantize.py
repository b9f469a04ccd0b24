"""The quantized exchange's encoding (parallel/quantize.py): round trips and error feedback."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distvision.parallel.quantize import (
    BLOCK,
    ErrorFeedback,
    code_bytes,
    dequantize,
    largest_code,
    quantize,
    scale_count,
)

values = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=700)


@settings(max_examples=60, deadline=None)
@given(values, st.sampled_from([8, 4]), st.sampled_from([1, 7, BLOCK]))
def test_each_value_comes_back_within_half_its_blocks_step(numbers, bits, block):
    original = torch.tensor(numbers, dtype=torch.float32)
    quantized = quantize(original, bits, block)
    restored = dequantize(quantized, block)
    assert restored.shape == original.shape
    steps = quantized.scales.repeat_interleave(block)[: len(numbers)]
    assert torch.all((restored - original).abs() <= steps / 2 * (1 + 1e-5) + 1e-6)
    # The largest value of each block is exact up to float rounding: it sets the scale.
    assert quantized.codes.numel() == code_bytes(len(numbers), bits)
    assert quantized.scales.numel() == scale_count(len(numbers), block)
    assert quantized.nbytes == code_bytes(len(numbers), bits) + 4 * scale_count(len(numbers), block)


def test_int4_packs_two_codes_a_byte_and_zero_blocks_stay_zero():
    original = torch.tensor([7.0, -7.0, 3.0, 0.0, 1.0] + [0.0] * (BLOCK - 5) + [0.0] * 3)
    quantized = quantize(original, 4)
    assert quantized.codes.numel() == (len(original) + 1) // 2
    restored = dequantize(quantized)
    assert restored[:5].tolist() == [7.0, -7.0, 3.0, 0.0, 1.0]
    assert quantized.scales[1] == 0 and torch.all(restored[BLOCK:] == 0)
    assert largest_code(4) == 7 and largest_code(8) == 127


@settings(max_examples=40, deadline=None)
@given(st.lists(values.filter(lambda v: len(v) == 50), min_size=1, max_size=12), st.sampled_from([8, 4]))
def test_error_feedback_loses_nothing_only_delays_it(rounds, bits):
    """Over any rounds, what was sent adds up to the changes made, less the residual still owed."""
    feedback = ErrorFeedback(50, bits, block=16)
    sent, made = torch.zeros(50), torch.zeros(50)
    for numbers in rounds:
        change = torch.tensor(numbers, dtype=torch.float32)
        made += change
        sent += dequantize(feedback.encode(change), 16)
        feedback.commit()
    assert torch.allclose(sent + feedback.residual, made, rtol=1e-4, atol=1e-2)


def test_a_discarded_round_leaves_the_residual_as_it_was_and_a_heal_clears_it():
    feedback = ErrorFeedback(4, 4, block=4)
    feedback.encode(torch.tensor([1.0, 0.3, 0.0, 0.0]))
    feedback.commit()
    before = feedback.residual.clone()
    assert before.abs().sum() > 0  # 0.3 does not fit 7 steps of 1/7
    feedback.encode(torch.tensor([5.0, 1.0, 2.0, 3.0]))
    feedback.discard()
    assert torch.equal(feedback.residual, before)
    feedback.reset()
    assert torch.all(feedback.residual == 0) and feedback.pending is None


@pytest.mark.parametrize("bits", [8, 4])
def test_error_feedback_tracks_a_steady_change_closer_than_plain_rounding(bits):
    """A small steady change that plain rounding loses in every round reaches the receiver with feedback,
    short by at most one step of its block (the residual still owed), however many rounds pass."""
    change = torch.cat([torch.tensor([1.0]), torch.full((BLOCK - 1,), 0.001)])
    feedback = ErrorFeedback(BLOCK, bits)
    with_feedback, plain = torch.zeros(BLOCK), torch.zeros(BLOCK)
    for _ in range(200):
        with_feedback += dequantize(feedback.encode(change))
        feedback.commit()
        plain += dequantize(quantize(change, bits))
    truth = change * 200
    assert torch.all(plain[1:] == 0)  # 0.001 rounds to 0 every time: 0.2 lost
    assert (with_feedback - truth).abs().max() <= 1.0 / largest_code(bits) + 1e-4


def _replica(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same start on every replica
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(seed)  # each replica's own local steps
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 6)).square().mean().backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("mode", ["local-sgd", "diloco"])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_a_quantized_round_lands_every_replica_on_the_same_decoded_average(mode, quantize):
    """Two replicas' rounds through the live synchroniser's wire, with the gather done by hand: both apply
    the same sum of decoded changes, the float32 tail (statistics and votes) summed exactly, and the
    bytes handed in are the codes, the scales and the tail."""
    from distvision.parallel.membership import Rollback, trainable
    from distvision.parallel.sync import Synchronizer, SyncSettings, outer_fragments, outer_optimizer

    settings = SyncSettings(mode=mode, every="3", quantize=quantize)
    replicas, wires, packs, befores = [], [], [], []
    for seed in (1, 2):
        torch.manual_seed(0)
        start = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
        model, optimizer = _replica(seed)
        before = Rollback.take(start, optimizer, 0, 0, keep_weights=True)
        fragments = outer_fragments(model, settings)
        if fragments:  # DiLoCo's agreed weights: where the round began
            fragments.load({"rounds": torch.tensor(0), **{f"anchor.{i}": w for i, w in enumerate(before.weights)}})
        sync = Synchronizer(model, settings, torch.device("cpu"), live=True, outer=outer_optimizer(model, settings),
                            fragments=fragments)
        sync.begin_round(step=10, steps_left=100)
        packed = sync.round_payload(before, room=2)
        packed[-2:] = torch.tensor([1.0, 2.0])
        wire = sync.wire(packed)
        count = sync.parameter_count
        assert wire.nbytes == code_bytes(count, 8 if quantize == "int8" else 4) + 4 * scale_count(count) + 4 * (10 + 2)
        replicas.append((sync, model, optimizer))
        wires.append(wire)
        packs.append(packed)
        befores.append(before)
    tails = wires[0].summed[0] + wires[1].summed[0]  # what the all-reduce does to the float32 tail
    gathered = [[w.gathered[0] for w in wires], [w.gathered[1] for w in wires]]
    decoded = sum(dequantize(w.quantized) for w in wires)
    results = []
    for (sync, model, optimizer), wire, packed, before in zip(replicas, wires, packs, befores, strict=True):
        wire.summed[0].copy_(tails)
        sync.unwire(wire, packed, gathered)
        assert torch.equal(packed[-2:], torch.tensor([2.0, 4.0]))
        assert torch.allclose(packed[: sync.parameter_count], decoded)
        sync.apply(packed[:-2], 2, before, optimizer)
        assert sync.feedback.pending is None and sync.feedback.residual.abs().sum() > 0
        results.append(torch.cat([p.detach().reshape(-1) for p in trainable(model)]))
    assert torch.equal(results[0], results[1])
    if mode == "local-sgd":  # the average of where each replica got to, to within the codes' rounding
        ends = [torch.cat([p.detach().reshape(-1) for p in trainable(_replica(seed)[0])]) for seed in (1, 2)]
        start = torch.cat([w.reshape(-1) for w in befores[0].weights])
        largest_change = max((end - start).abs().max() for end in ends)
        step = largest_change / largest_code(8 if quantize == "int8" else 4)
        assert (results[0] - (ends[0] + ends[1]) / 2).abs().max() <= step
        assert (results[0] - start).abs().max() > 2 * step  # the replicas did move
