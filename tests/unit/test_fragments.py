"""Streaming DiLoCo's fragments (parallel/fragments.py) and the synchroniser's rounds over them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distvision.config import TrainConfig
from distvision.errors import UserError
from distvision.parallel.fragments import OuterFragments, fragment_bounds
from distvision.parallel.membership import Rollback, trainable
from distvision.parallel.quantize import ErrorFeedback
from distvision.parallel.sync import Synchronizer, SyncSettings, outer_fragments, outer_optimizer


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=40), st.data())
def test_fragments_are_consecutive_non_empty_and_cover_every_tensor_once(sizes, data):
    count = data.draw(st.integers(1, len(sizes)))
    bounds = fragment_bounds(sizes, count)
    assert len(bounds) == count
    assert [index for fragment in bounds for index in fragment] == list(range(len(sizes)))
    assert all(len(fragment) >= 1 for fragment in bounds)


def test_fragments_split_the_values_evenly_where_the_tensors_allow():
    assert fragment_bounds([5] * 8, 4) == [range(2), range(2, 4), range(4, 6), range(6, 8)]
    # a big tensor is a fragment of its own; the small ones around it are not all pushed into one
    assert fragment_bounds([1, 1, 100, 1, 1], 3) == [range(2), range(2, 3), range(3, 5)]
    with pytest.raises(ValueError):
        fragment_bounds([3, 4], 3)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))


def _drift(model: torch.nn.Module, amount: float) -> None:
    with torch.no_grad():
        for parameter in trainable(model):
            parameter.add_(amount)


def test_rounds_take_the_fragments_in_turn_and_an_epochs_end_takes_all():
    model = _model()
    fragments = OuterFragments(trainable(model), 3)  # 6 tensors of 30, 5, 5, 5, 15 and 3 values
    assert fragments.this_round(ends_epoch=False) == fragments.bounds[0]
    fragments.committed(fragments.bounds[0])
    assert fragments.this_round(ends_epoch=False) == fragments.bounds[1]
    assert fragments.this_round(ends_epoch=True) == range(6)
    assert OuterFragments(trainable(model), 1).this_round(ends_epoch=False) == range(6)
    assert fragments.bounds == [range(1), range(1, 3), range(3, 6)]  # 30 | 10 | 23 against 21 a share
    assert fragments.offset(fragments.bounds[2]) == 40


def test_a_fragment_measures_its_change_from_its_own_last_synchronisation():
    model = _model()
    fragments = OuterFragments(trainable(model), 2)
    first, second = fragments.bounds
    _drift(model, 0.5)
    assert all(torch.allclose(change, torch.full_like(change, -0.5)) for change in fragments.changes(first))
    fragments.committed(first)  # the first fragment's weights are agreed now, the second's still drift
    _drift(model, 0.25)
    assert all(torch.allclose(change, torch.full_like(change, -0.25)) for change in fragments.changes(first))
    assert all(torch.allclose(change, torch.full_like(change, -0.75)) for change in fragments.changes(second))
    fragments.rewind(second)
    assert all(torch.equal(p, a) for p, a in zip(trainable(model)[second.start:], fragments.anchors[second.start:],
                                                   strict=True))
    assert not torch.equal(trainable(model)[0], fragments.anchors[0])  # the other fragment keeps its drift


def test_the_agreed_weights_and_count_travel_and_a_checkpoint_without_them_takes_the_weights():
    model, other = _model(), _model()
    fragments = OuterFragments(trainable(model), 2)
    _drift(model, 1.0)
    fragments.committed(fragments.bounds[0])
    healed = OuterFragments(trainable(other), 2)
    healed.load(fragments.state_dict())
    assert healed.rounds == 1 and all(torch.equal(a, b) for a, b in zip(healed.anchors, fragments.anchors, strict=True))
    healed.load(None)
    assert healed.rounds == 0 and all(torch.equal(a, p) for a, p in zip(healed.anchors, trainable(other), strict=True))
    with pytest.raises(ValueError, match="do not match"):
        healed.load({"rounds": torch.tensor(0)})


def test_error_feedback_keeps_each_fragments_residual_in_its_own_part():
    feedback = ErrorFeedback(300, bits=4)
    feedback.encode(torch.linspace(-1, 1, 100), start=200)
    feedback.commit()
    assert torch.all(feedback.residual[:200] == 0) and feedback.residual[200:].abs().sum() > 0
    kept = feedback.residual.clone()
    feedback.encode(torch.linspace(-1, 1, 150), start=0)
    feedback.discard()  # a discarded round leaves every part as it was
    feedback.commit()
    assert torch.equal(feedback.residual, kept)


def _streaming_replica(fragments: int = 2, seed: int = 1):
    """A replica of a live Streaming DiLoCo job (H = 4) after 2 local steps of its own."""
    settings = SyncSettings(mode="diloco", every="4", fragments=fragments)
    model = _model()
    agreed = outer_fragments(model, settings)
    sync = Synchronizer(model, settings, torch.device("cpu"), live=True, outer=outer_optimizer(model, settings),
                        fragments=agreed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sync.begin_round(step=0, steps_left=100)
    before = Rollback.take(model, optimizer, 0, 0, keep_weights=True)
    torch.manual_seed(seed)
    for _ in range(2):
        model(torch.randn(8, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sync, model, optimizer, before


def test_a_streaming_round_sends_and_moves_only_its_fragment():
    sync, model, optimizer, before = _streaming_replica()
    assert sync.round_steps == 2  # H = 4 over 2 fragments
    sent = sync.fragments.bounds[0]
    payload = sync.round_payload(before, room=0)
    values = sum(trainable(model)[index].numel() for index in sent)
    assert sync.payload_values == values and payload.numel() == values + 10  # + the statistics (5 + 5)
    drifted = [p.detach().clone() for p in trainable(model)]
    anchors = [a.clone() for a in sync.fragments.anchors]
    sync.apply(payload, 1, before, optimizer)  # alone: the average change is this replica's own
    after = trainable(model)
    for index in range(len(after)):
        if index in sent:  # Nesterov's first outer step from the agreed weights, which follow it
            change = anchors[index] - drifted[index]
            expected = anchors[index] - 0.7 * (1 + 0.9) * change
            assert torch.allclose(after[index], expected, atol=1e-6) and change.abs().sum() > 0
            assert torch.equal(after[index], sync.fragments.anchors[index])
        else:  # the other fragment runs on, its agreed weights unchanged
            assert torch.equal(after[index], drifted[index]) and torch.equal(sync.fragments.anchors[index], anchors[index])
    assert sync.fragments.rounds == 1
    # replicas compare what they agree on, not the drifting weights (with one fragment too: an overlapped
    # round's mix differs between replicas); a run that ends takes the agreed ones
    assert all(a is b for a, b in zip(sync.agreed_tensors(), sync.fragments.anchors, strict=False))
    alone = _streaming_replica(fragments=1)[0]
    assert all(a is b for a, b in zip(alone.agreed_tensors(), alone.fragments.anchors, strict=False))
    sync.settle()
    assert all(torch.equal(p, a) for p, a in zip(trainable(model), sync.fragments.anchors, strict=True))


def test_an_outer_step_on_the_whole_model_matches_one_fragment_diloco():
    """At an epoch's end every fragment is sent: the same outer step as DiLoCo with one fragment."""
    results = []
    for fragments in (1, 2):
        sync, model, optimizer, before = _streaming_replica(fragments)
        payload = sync.round_payload(before, room=0, ends_epoch=True)
        assert sync.payload_values == sum(p.numel() for p in trainable(model))
        sync.apply(payload, 1, before, optimizer)
        results.append(torch.cat([p.detach().flatten() for p in trainable(model)]))
        assert torch.equal(results[-1], torch.cat([a.flatten() for a in sync.fragments.anchors]))
    assert torch.equal(results[0], results[1])


def test_fragments_are_checked_before_anything_starts():
    with pytest.raises(UserError, match="applies to --sync diloco"):
        TrainConfig(data=None, sync="local-sgd", fragments=2).validate()
    with pytest.raises(UserError, match="a multiple of it"):
        TrainConfig(data=None, sync="diloco", sync_every="6", fragments=4, recovery="live").validate()
    with pytest.raises(UserError, match="a multiple of it"):
        TrainConfig(data=None, sync="diloco", sync_every="epoch", fragments=2, recovery="live").validate()
    with pytest.raises(UserError, match="at least 1"):
        TrainConfig(data=None, sync="diloco", sync_every="8", fragments=0, recovery="live").validate()
    TrainConfig(data=None, sync="diloco", sync_every="8", fragments=4, recovery="live").validate()
    with pytest.raises(UserError, match="more than this model's 6 parameter tensors"):
        outer_fragments(_model(), SyncSettings(mode="diloco", every="8", fragments=7))


def test_an_overlapped_round_starts_its_exchange_t_steps_early_unless_the_epoch_would_cut_it():
    sync, _, _, _ = _streaming_replica()
    sync.settings.overlap = 1  # rounds of 2 steps: the exchange starts after the first
    assert sync.launches_now(steps_in_round=1, samples_left=17, batch_size=8)
    assert not sync.launches_now(steps_in_round=2, samples_left=17, batch_size=8)
    # the next step ends the epoch: that round sends every fragment, at its end
    assert not sync.launches_now(steps_in_round=1, samples_left=8, batch_size=8)
    sync.launched = True
    assert not sync.launches_now(steps_in_round=1, samples_left=17, batch_size=8)
    sync.begin_round(step=2, steps_left=100)
    assert not sync.launched
    sync.settings.overlap = 0
    assert not sync.launches_now(steps_in_round=1, samples_left=17, batch_size=8)


def test_an_overlapped_round_mixes_the_synchronised_fragment_with_the_steps_taken_meanwhile():
    """The outer step as without overlap, from the change sent; then alpha of where the steps in flight
    took the fragment; the agreed weights are the synchronised ones, without the mix."""
    sync, model, optimizer, before = _streaming_replica()
    sync.settings.overlap, sync.settings.overlap_mix = 1, 0.25
    sent = sync.fragments.bounds[0]
    payload = sync.round_payload(before, room=0)
    sync.launched = True  # what StepExchange.launch marks
    anchors = [a.clone() for a in sync.fragments.anchors]
    at_launch = [p.detach().clone() for p in trainable(model)]
    _drift(model, 0.5)  # the step taken while the exchange was in flight
    assert sync.round_payload(before, room=3).tolist() == [0.0, 0.0, 0.0]  # the round's end: the votes alone
    assert len(sync.wire(torch.zeros(3)).summed) == 1
    sync.apply(payload, 1, before, optimizer)
    for index in sent:
        synchronised = anchors[index] - 0.7 * (1 + 0.9) * (anchors[index] - at_launch[index])
        assert torch.allclose(sync.fragments.anchors[index], synchronised, atol=1e-6)
        reached = at_launch[index] + 0.5
        assert torch.allclose(trainable(model)[index], 0.75 * synchronised + 0.25 * reached, atol=1e-6)
    other = trainable(model)[sent.stop]
    assert torch.equal(other, at_launch[sent.stop] + 0.5)  # another fragment: untouched


def test_overlap_is_checked_before_anything_starts():
    with pytest.raises(UserError, match="applies to --sync diloco"):
        TrainConfig(data=None, sync="local-sgd", overlap=1).validate()
    with pytest.raises(UserError, match="H/F - 1 = 3"):
        TrainConfig(data=None, sync="diloco", sync_every="8", fragments=2, overlap=4, recovery="live").validate()
    with pytest.raises(UserError, match="--overlap-mix"):
        TrainConfig(data=None, sync="diloco", sync_every="8", overlap=2, overlap_mix=1.5, recovery="live").validate()
    TrainConfig(data=None, sync="diloco", sync_every="8", fragments=2, overlap=3, recovery="live").validate()
