"""PowerSGD under live membership (parallel/low_rank.py): torch's hook on a flat bucket, over a real
two-rank gloo group whose ranks are threads of this process; its rollback and its healed state."""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from distvision.parallel.low_rank import START_ITERATIONS, LowRankGradients, wire_bytes

# One matrix PowerSGD compresses at rank 2 ((64 + 32) x 2 x 2 < 64 x 32), one it leaves whole (too small
# to pay), and a bias vector.
SHAPES = [torch.Size([64, 32]), torch.Size([4, 3]), torch.Size([64])]
COUNT = sum(shape.numel() for shape in SHAPES)


def _on_two_ranks(work: Callable[[int, object], object]) -> list:
    """work(rank, group) on the two ranks of a gloo group, each in its own thread; their results."""
    store, results, errors = dist.HashStore(), [None, None], []

    def run(rank: int) -> None:
        try:
            group = dist.ProcessGroupGloo(dist.PrefixStore("low-rank", store), rank, 2, datetime.timedelta(seconds=20))
            results[rank] = work(rank, group)
        except Exception as error:  # noqa: BLE001 - reported by the test thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return results


def _gradients(rank: int, round_: int) -> torch.Tensor:
    return torch.randn(COUNT, generator=torch.Generator().manual_seed(1000 * rank + round_))


def _round(low_rank: LowRankGradients, flat: torch.Tensor, group) -> tuple[int, torch.Tensor]:
    low_rank.begin()
    sent = low_rank.bytes_this_round()
    low_rank.reduce(flat, group).wait()
    return sent, flat


def test_both_replicas_apply_the_same_average_and_send_what_the_shapes_say():
    def work(rank, group):
        low_rank = LowRankGradients(SHAPES, rank=2)
        rounds = []
        for number in range(5):
            sent, result = _round(low_rank, _gradients(rank, number), group)
            low_rank.commit()
            rounds.append((sent, result.clone()))
        return rounds

    first, second = _on_two_ranks(work)
    full = 4 * COUNT
    compressed = 4 * ((64 + 32) * 2 + 4 * 3 + 64)
    for number, ((sent, result), (sent_too, result_too)) in enumerate(zip(first, second, strict=True)):
        assert torch.equal(result, result_too)  # every replica applies the same gradients
        assert sent == sent_too == (full if number < START_ITERATIONS else compressed)
        exact = (_gradients(0, number) + _gradients(1, number)) / 2
        if number < START_ITERATIONS:  # exchanged whole: the exact average
            torch.testing.assert_close(result, exact)
        else:  # the small matrix and the bias travel whole; the big one as a rank-2 approximation
            torch.testing.assert_close(result[64 * 32:], exact[64 * 32:])
            assert not torch.allclose(result[: 64 * 32], exact[: 64 * 32])
            assert torch.linalg.matrix_rank(result[: 64 * 32].view(64, 32)) <= 2
    assert compressed < full / 5


def test_a_discarded_round_is_redone_from_the_state_it_found():
    def work(rank, group):
        low_rank = LowRankGradients(SHAPES, rank=2)
        for number in range(START_ITERATIONS + 1):  # compressing, with error feedback and a warm Q
            _round(low_rank, _gradients(rank, number), group)
            low_rank.commit()
        before = low_rank.state_dict()
        _, discarded = _round(low_rank, _gradients(rank, 10), group)  # not committed
        _, redone = _round(low_rank, _gradients(rank, 10), group)
        return discarded.clone(), redone.clone(), before, low_rank.state.iter

    for discarded, redone, before, iterations in _on_two_ranks(work):
        assert torch.equal(discarded, redone)  # the same round, from the same Q and error feedback
        assert iterations == before["iter"] + 1  # counted once


def test_a_healed_replica_takes_its_peers_q_and_drops_its_own_error_feedback():
    def work(rank, group):
        low_rank = LowRankGradients(SHAPES, rank=2)
        for number in range(START_ITERATIONS + 2):
            _round(low_rank, _gradients(rank, number), group)
            low_rank.commit()
        return low_rank

    healthy, _ = _on_two_ranks(work)
    newcomer = LowRankGradients(SHAPES, rank=2)
    newcomer.load(healthy.state_dict())
    assert newcomer.state.iter == healthy.state.iter and not newcomer.state.error_dict
    assert torch.equal(newcomer.state.q_memory_dict[0], healthy.state.q_memory_dict[0])
    # The next round on both: the same result, as the peers' Q agree (the newcomer has no error to add,
    # so the healthy one's is cleared too to compare like with like).
    healthy.healed()
    replicas = [healthy, newcomer]
    results = _on_two_ranks(lambda rank, group: _round(replicas[rank], _gradients(rank, 20), group)[1].clone())
    assert torch.equal(results[0], results[1])


def test_wire_bytes_follow_torchs_rule_for_what_is_compressed():
    assert wire_bytes(SHAPES, rank=2, iteration=0) == 4 * COUNT
    assert wire_bytes(SHAPES, rank=32, iteration=START_ITERATIONS) == 4 * COUNT  # a rank that saves nothing
    assert wire_bytes(SHAPES, rank=1, iteration=START_ITERATIONS) == 4 * ((64 + 32) + 12 + 64)
