"""Synchronisation modes, batch balancing and stopping criteria, with real gloo processes (the parts that
need none: tests/unit/test_sync.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from distvision.errors import UserError
from distvision.models import create
from distvision.parallel.balance import split_sizes, weighted_slice
from distvision.parallel.fragments import fragment_bounds
from distvision.parallel.group import leave_process_group
from distvision.parallel.low_rank import START_ITERATIONS, LowRankGradients, wire_bytes
from distvision.parallel.sync import Synchronizer, SyncSettings, unwrap
from distvision.precision import choose_precision, precision_cache_file
from distvision.training.exchange import SUMMED
from tests.helpers import MLP_SETTINGS, MLP_TRICKS, assert_each_epoch_covered_once, run_cli, spawn_workers

COMMON = MLP_SETTINGS  # the settings of the shared all-reduce run (this tier's conftest: mlp_run_two_workers)


@pytest.fixture(scope="module")
def data(mlp_data: Path) -> Path:
    return mlp_data


def _train(data: Path, out: Path, *extra: str) -> dict:
    result = run_cli(["train", "--data", str(data), "--out", str(out), *extra], out.parent / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    # no fault here: a round discarded because the replicas' weights differed would be a defect
    assert "weights differed" not in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def allreduce_run(mlp_run_two_workers: Path) -> tuple[Path, dict]:
    return mlp_run_two_workers, json.loads((mlp_run_two_workers / "summary.json").read_text())


def test_local_sgd_every_step_equals_allreduce(data: Path, allreduce_run, tmp_path: Path):
    # The restart path's local SGD against the shared all-reduce run (live membership, the default), with
    # the shared run's tricks too: averaging every step must still be all-reduce, whichever the path.
    local = _train(data, tmp_path / "local", "--workers", "2", "--sync", "local-sgd", "--sync-every", "1", *COMMON,
                   *MLP_TRICKS, "--recovery", "restart")
    a = load_file(allreduce_run[0] / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "local" / "checkpoint" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    assert local["sync"]["mode"] == "local-sgd" and local["bytes_exchanged"] > 0


@pytest.fixture(scope="module")
def local_sgd_run(data: Path, tmp_path_factory) -> Path:
    """Local SGD on the restart path (DDP and torch's model averaging), averaging every 4 steps."""
    out = tmp_path_factory.mktemp("local-sgd") / "run"
    _train(data, out, "--workers", "2", "--sync", "local-sgd", "--sync-every", "4", *COMMON, "--recovery", "restart")
    return out


def test_local_sgd_exchanges_less_and_compression_is_counted(data: Path, allreduce_run, local_sgd_run: Path):
    dense = allreduce_run[1]
    local = json.loads((local_sgd_run / "summary.json").read_text())
    # 72 images in batches of 16: 5 steps an epoch; averaging after 4 steps and at the epoch's end.
    assert local["bytes_exchanged"] < dense["bytes_exchanged"] / 2
    for summary in (dense, local):
        assert len(summary["communication_seconds"]) == 2 and len(summary["compute_seconds"]) == 2
    record = [json.loads(line) for line in (local_sgd_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert len(record["bytes_exchanged"]) == 2 and record["compute_seconds"][0] > 0


def test_local_sgd_and_diloco_on_the_live_path(data: Path, local_sgd_run: Path, tmp_path: Path):
    """Live (torchft) local SGD averages what the restart path averages, bit for bit; DiLoCo with an outer
    SGD of lr 1 and no momentum is local SGD (its outer step lands on the average)."""
    live = ["--workers", "2", "--sync-every", "4", *COMMON, "--recovery", "live", "--audit-samples"]
    _train(data, tmp_path / "live", "--sync", "local-sgd", *live)
    _train(data, tmp_path / "diloco", "--sync", "diloco", "--outer-lr", "1", "--outer-momentum", "0", *live)
    restart, local, diloco = (load_file(run / "checkpoint" / "model.safetensors")
                              for run in (local_sgd_run, tmp_path / "live", tmp_path / "diloco"))
    for name, value in restart.items():
        assert torch.equal(local[name], value), name
        torch.testing.assert_close(diloco[name], value, rtol=0, atol=1e-6)
    assert_each_epoch_covered_once(tmp_path / "diloco", 2, sample_count=72)


def test_streaming_quantized_diloco_sends_a_fragment_a_round_as_codes_and_learns(data: Path, tmp_path: Path):
    """--fragments 2 --quantize int8 --overlap 1: each round of H/F = 2 local steps sends one fragment's
    change, the fragments in turn, and the round that ends an epoch every fragment; as one byte a value
    plus a float32 scale per 128 values (gathered), sent a step before the round ends, beside the float32
    votes (summed) at its end; counted where they meet the collectives."""
    summary = _train(data, tmp_path / "run", "--workers", "2", "--sync", "diloco", "--sync-every", "4",
                     "--fragments", "2", "--quantize", "int8", "--overlap", "1", *COMMON, "--recovery", "live")
    # and with one fragment, whose replicas' weights also differ after an overlapped round's mix: a quorum
    # every round compares them right after it
    _train(data, tmp_path / "one", "--workers", "2", "--sync", "diloco", "--sync-every", "4", "--overlap", "2",
           "--quorum-every", "1", *COMMON, "--recovery", "live")
    sizes = [p.numel() for p in create("mlp", num_classes=3).parameters()]
    first, second = (sum(sizes[i] for i in fragment) for fragment in fragment_bounds(sizes, 2))
    room = len(SUMMED) + 3 * 2

    def per_round(values: int) -> int:
        return values + 4 * -(-values // 128) + 4 * room

    # 5 steps an epoch: rounds of 2, 2 and the epoch's last step, which sends all; 2 epochs, in which the
    # fragments take turns: 1, 2, all, then 2, 1, all
    rounds = [first, second, first + second] * 2
    assert summary["bytes_exchanged"] == 2 * sum(per_round(values) for values in rounds)
    # each epoch's two fragment rounds sent a step early; the epoch's last round (its last, short step)
    # not: the epoch's end cut it short, and it sends every fragment at its end
    assert summary["sync"]["overlapped_rounds"] == 4
    assert summary["test_accuracy"] >= 0.9, summary["test_accuracy"]


# Local SGD schedules run in the spawned pair: (every, warmup steps, the step that ends the epoch).
LOCAL_SGD_CASES = {"every 3": ("3", 0, None), "every epoch": ("epoch", 0, 4), "every 3 after 2 warmup": ("3", 2, None)}


def _replicas_after_averaging(rank: int, world_size: int, init_file: str, results: str) -> None:
    """Six steps per schedule on different data per rank: after each step, did the synchroniser say it
    averaged, and are the replicas (parameters and batch-norm buffers) identical?"""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    flags = {}
    for case, (every, warmup, epoch_end) in LOCAL_SGD_CASES.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
        sync = Synchronizer(model, SyncSettings("local-sgd", every=every, warmup=warmup), torch.device("cpu"))
        optimizer = torch.optim.SGD(sync.model.parameters(), lr=0.1, momentum=0.9)
        generator = torch.Generator().manual_seed(100 + rank)  # every rank sees different data
        flags[case] = []
        for step in range(6):
            # as the loop does at a round's start (here every step: a period, once fixed, runs on), in an
            # epoch of 99 steps, which K = 3 cuts into rounds of 3
            sync.begin_round(step, steps_left=99 - step)
            x, y = torch.randn(5, 6, generator=generator), torch.randint(0, 3, (5,), generator=generator)
            with sync.step_context(step):
                loss = torch.nn.functional.cross_entropy(sync.model(x), y, reduction="sum")
                sync.backward(loss, 5, 5 * world_size, world_size, step)
            optimizer.step()
            optimizer.zero_grad()
            averaged = sync.after_step(step, last_of_epoch=step == epoch_end)
            replica = unwrap(sync.model)
            identical = []
            for tensors in (list(replica.parameters()), list(replica.state_dict().values())):
                state = torch.cat([t.detach().flatten() for t in tensors if t.is_floating_point()])
                gathered = [torch.zeros_like(state) for _ in range(world_size)]
                dist.all_gather(gathered, state)
                identical.append(all(torch.equal(gathered[0], g) for g in gathered))
            flags[case].append([averaged, *identical])  # said averaged; parameters, and all state, identical
    if rank == 0:
        Path(results).write_text(json.dumps(flags))
    leave_process_group(barrier=False)


def _precision_vote(rank: int, world_size: int, init_file: str, folder: str) -> None:
    """--precision auto on two ranks whose caches (as on two machines) disagree or are missing."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = create("mlp", num_classes=3, image_size=8)
    answers = {}
    for case, cached in {"disagree": ("bf16", "fp32"), "agree": ("bf16", "bf16"), "one-missing": ("bf16", None)}.items():
        cache_dir = Path(folder) / case / f"rank{rank}"
        cache_file, key = precision_cache_file(cache_dir, "mlp", 8, 8)
        if cached[rank]:
            cache_file.parent.mkdir(parents=True)
            cache_file.write_text(json.dumps({"precision": cached[rank], "key": key, "how": "test"}))
        answers[case] = choose_precision("auto", model, "mlp", 8, 8, torch.device("cpu"), cache_dir)
    Path(folder, f"precision-rank{rank}.json").write_text(json.dumps(answers))
    leave_process_group(barrier=False)


def _compression_bytes(rank: int, world_size: int, init_file: str, results: str) -> None:
    """One training step per --compress mode: the bytes the synchroniser counted, and the parameters."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    counted = {}
    for compress in ("none", "fp16", "bf16"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        try:
            sync = Synchronizer(model, SyncSettings("allreduce", compress=compress), torch.device("cpu"))
        except UserError:  # bf16 collectives are broken on some gloo builds: said at start-up, not counted
            continue
        sync.model(torch.randn(4, 6)).sum().backward()
        counted[compress] = sync.stats.bytes_exchanged
    counted["parameters"] = sum(p.numel() for p in model.parameters())
    if rank == 0:
        Path(results).write_text(json.dumps(counted))
    leave_process_group(barrier=False)


# PowerSGD's hook on live membership's flat bucket: one matrix it compresses at rank 2 ((64 + 32) x 2 x 2
# < 64 x 32), one it leaves whole (too small to pay), and a bias vector.
LOW_RANK_SHAPES = [torch.Size([64, 32]), torch.Size([4, 3]), torch.Size([64])]


def _low_rank_gradients(rank: int, number: int) -> torch.Tensor:
    count = sum(shape.numel() for shape in LOW_RANK_SHAPES)
    return torch.randn(count, generator=torch.Generator().manual_seed(1000 * rank + number))


def _low_rank_round(low_rank: LowRankGradients, flat: torch.Tensor) -> tuple[int, torch.Tensor]:
    low_rank.begin()
    sent = low_rank.bytes_this_round()
    low_rank.reduce(flat, dist.group.WORLD).wait()
    return sent, flat


def _low_rank(rank: int, world_size: int, init_file: str, folder: str) -> None:
    """Live PowerSGD's rounds over a real gloo group: committed ones, a discarded one redone, and a heal."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    low_rank = LowRankGradients(LOW_RANK_SHAPES, rank=2)
    committed = []
    for number in range(5):
        sent, result = _low_rank_round(low_rank, _low_rank_gradients(rank, number))
        low_rank.commit()
        committed.append((sent, result.clone()))
    iterations = low_rank.state.iter
    _, discarded = _low_rank_round(low_rank, _low_rank_gradients(rank, 10))  # not committed
    _, redone = _low_rank_round(low_rank, _low_rank_gradients(rank, 10))
    low_rank.commit()
    iterations_after_redo = low_rank.state.iter
    # Rank 1 heals: a fresh replica that takes rank 0's state (sent here by broadcast, as healing does by
    # HTTP); rank 0 drops its error feedback too, to compare like with like.
    state = low_rank.state_dict()
    for name in ("q_memory_dict", "p_memory_dict"):
        dist.broadcast(state[name], src=0)
    newcomer = low_rank
    if rank == 1:
        newcomer = LowRankGradients(LOW_RANK_SHAPES, rank=2)
        newcomer.load(state)
    else:
        low_rank.healed()
    healed = {"q_after_heal": newcomer.state.q_memory_dict[0].clone(), "iterations_after_heal": newcomer.state.iter}
    _, after_heal = _low_rank_round(newcomer, _low_rank_gradients(rank, 20))
    save_file({**{f"committed{number}": result for number, (_, result) in enumerate(committed)},
               "discarded": discarded, "redone": redone, "after_heal": after_heal,
               "q_after_heal": healed["q_after_heal"]}, f"{folder}/low-rank-{rank}.safetensors")
    Path(folder, f"low-rank-{rank}.json").write_text(json.dumps(
        {"sent": [sent for sent, _ in committed], "iterations": iterations,
         "iterations_after_redo": iterations_after_redo, "iterations_after_heal": healed["iterations_after_heal"]}))
    leave_process_group(barrier=False)


def _gloo_checks(rank: int, world_size: int, folder: str) -> None:
    """The spawned checks, one after the other, in one pair of processes (each start costs seconds)."""
    _replicas_after_averaging(rank, world_size, f"{folder}/init-averaging", f"{folder}/flags.json")
    _uneven_gradients(rank, world_size, f"{folder}/init-uneven", f"{folder}/grads.json")
    _precision_vote(rank, world_size, f"{folder}/init-precision", folder)
    _compression_bytes(rank, world_size, f"{folder}/init-compression", f"{folder}/compression.json")
    _low_rank(rank, world_size, f"{folder}/init-low-rank", folder)


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gloo")
    spawn_workers(_gloo_checks, (2, str(folder)))
    return folder


def test_local_sgd_replicas_are_identical_right_after_each_averaging(gloo_results: Path):
    flags = json.loads((gloo_results / "flags.json").read_text())
    expected = {"every 3": [False, False, True, False, False, True],
                "every epoch": [False, False, False, False, True, False],  # --sync-every epoch: at its end
                # --sync-warmup 2: two all-reduced steps, then local steps counted from the third
                "every 3 after 2 warmup": [True, True, False, False, True, False]}
    for case, averaged in expected.items():
        assert [flag[0] for flag in flags[case]] == averaged, case
        # the parameters are identical exactly when the synchroniser says so
        assert [flag[1] for flag in flags[case]] == averaged, case
        # and so is all the state (batch-norm buffers too) after each averaging; warmup steps all-reduce
        # gradients only, so each replica's batch-norm statistics follow its own data until the first
        assert [flag[2] for flag in flags[case]] == [a and i >= LOCAL_SGD_CASES[case][1]
                                                     for i, a in enumerate(averaged)], case


def _uneven_gradients(rank: int, world_size: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    reference = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    reference.load_state_dict(model.state_dict())
    sync = Synchronizer(model, SyncSettings("allreduce"), torch.device("cpu"))
    generator = torch.Generator().manual_seed(7)
    x, y = torch.randn(12, 6, generator=generator), torch.randint(0, 3, (12,), generator=generator)
    batch = np.arange(12)
    local = weighted_slice(batch, rank, np.array([0.75, 0.25]))
    with sync.step_context(0):
        loss = torch.nn.functional.cross_entropy(sync.model(x[local]), y[local], reduction="sum")
        sync.backward(loss, len(local), len(batch), world_size, 0)
    torch.nn.functional.cross_entropy(reference(x), y).backward()  # one process, the whole batch
    ok = all(torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6)
             for p, q in zip(unwrap(sync.model).parameters(), reference.parameters()))
    if rank == 0:
        Path(results).write_text(json.dumps({"ok": ok, "sizes": [9, 3] if len(local) == 9 else None}))
    leave_process_group(barrier=False)


def test_ranks_agree_on_precision_and_take_bf16_only_where_every_rank_found_it_faster(gloo_results: Path):
    answers = [json.loads((gloo_results / f"precision-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert answers[0] == answers[1]  # every rank trains in the same precision
    assert answers[0]["disagree"] == ["fp32", "cached, test"]
    assert answers[0]["agree"] == ["bf16", "cached, test"]
    assert answers[0]["one-missing"][1].startswith("measured")  # one rank without an answer: all measure


def test_compressed_gradients_are_counted_as_handed_to_the_collective(gloo_results: Path):
    counted = json.loads((gloo_results / "compression.json").read_text())
    parameters = counted["parameters"]
    assert counted["none"] == 4 * parameters  # fp32
    assert counted["fp16"] == 2 * parameters
    if "bf16" in counted:
        assert counted["bf16"] == 2 * parameters


def test_uneven_worker_batches_give_the_whole_batch_gradient(gloo_results: Path):
    assert json.loads((gloo_results / "grads.json").read_text()) == {"ok": True, "sizes": [9, 3]}


@pytest.mark.parametrize("recovery", ["live", "restart"])
def test_balance_throughput_with_a_slowed_worker(data: Path, tmp_path: Path, recovery: str):
    out = tmp_path / "balanced"
    # 5 steps an epoch, losses and timings exchanged at each epoch's end once paced: the shares are
    # re-split after epoch 2 and the third epoch trains with them.
    # Slowed 8x: an mlp step takes about a millisecond, and on a loaded machine a slighter slowdown can
    # drown in the scheduler's noise (at 6x the unslowed share came to 0.589 once, with another test
    # file running beside it; 0.72-0.76 alone).
    summary = _train(data, out, "--workers", "2", "--balance", "throughput", "--debug-slowdown", "1:8",
                     "--audit-samples", *COMMON, "--epochs", "3", "--recovery", recovery)
    assert summary["recovery"] == recovery
    shares = summary["batch_shares"]
    assert shares[0] > 0.6, shares  # the unslowed worker takes the larger share
    sizes = {}  # (epoch, step) -> [rank 0's samples, rank 1's]
    for log in (out / "audit").glob("attempt*-rank*.jsonl"):
        rank = int(log.stem.rsplit("rank", 1)[1])
        for line in log.read_text().splitlines():
            record = json.loads(line)
            sizes.setdefault((record["epoch"], record["step"]), [0, 0])[rank] = len(record["indices"])
    last_epoch = [sizes[key] for key in sorted(sizes) if key[0] == 2]
    assert len(last_epoch) == 5
    # every step of the last epoch was split by the measured shares, the slowed worker taking less
    for rank0, rank1 in last_epoch:
        assert [rank0, rank1] == split_sizes(rank0 + rank1, np.array(shares)).tolist()
        assert rank0 > rank1


# The compression hooks ride along on two of these runs and local SGD on a third: they must train
# and stop like the others.
@pytest.mark.parametrize("flags, reason", [
    (["--target-accuracy", "0.5", "--compress", "fp16"], "target_accuracy"),
    (["--patience", "1", "--min-delta", "1.0", "--compress", "powersgd"], "patience"),
    # 4 epochs of 5 steps of at least 0.1 s: 1 s of training runs out in the middle of the run
    (["--max-time", "1.0", "--debug-step-delay", "0.1", "--sync", "local-sgd", "--sync-every", "4"], "max_time"),
    (["--debug-nan-at", "1:3"], "diverged"),
])
def test_every_criterion_stops_all_workers_at_the_same_step(data: Path, tmp_path: Path, flags, reason):
    out = tmp_path / "run"
    summary = _train(data, out, "--workers", "2", "--audit-samples", *COMMON[:-6], "--epochs", "4",
                     "--batch-size", "16", "--lr", "0.05", *flags)
    assert summary["stop_reason"] == reason
    last_steps = []
    for log in sorted((out / "audit").glob("attempt*-rank*.jsonl")):
        last_steps.append(max(json.loads(line)["step"] for line in log.read_text().splitlines()))
    assert len(last_steps) == 2 and last_steps[0] == last_steps[1] == summary["stop_step"] - 1
    assert summary["stop_epoch"] < 4  # before the epoch budget ran out
    if reason == "max_time":
        assert summary["train_seconds"] >= 1.0  # not before the time was up
    steps, parameters = summary["stop_step"], sum(p.numel() for p in create("mlp", num_classes=3).parameters())
    if "fp16" in flags:  # live (the default): fp16 gradients, then the exchange's float32 votes and figures
        room = len(SUMMED) + 3 * 2
        assert summary["recovery"] == "live"
        assert summary["bytes_exchanged"] == 2 * steps * (parameters * 2 + room * 4)
    if "powersgd" in flags:  # live too: torch's hook on the round's gradients, then the float32 votes
        room = len(SUMMED) + 3 * 2
        shapes = [p.shape for p in create("mlp", num_classes=3).parameters()]
        assert summary["recovery"] == "live"
        assert summary["bytes_exchanged"] == 2 * sum(wire_bytes(shapes, 2, step) + room * 4 for step in range(steps))
        assert summary["bytes_exchanged"] < 2 * steps * parameters * 4 * 0.55


def test_live_powersgd_applies_one_average_redoes_a_discarded_round_and_heals_with_its_peers_q(gloo_results):
    first, second = (load_file(gloo_results / f"low-rank-{rank}.safetensors") for rank in (0, 1))
    counts = [json.loads((gloo_results / f"low-rank-{rank}.json").read_text()) for rank in (0, 1)]
    count = sum(shape.numel() for shape in LOW_RANK_SHAPES)
    compressed = 4 * ((64 + 32) * 2 + 4 * 3 + 64)
    for number, (sent, sent_too) in enumerate(zip(counts[0]["sent"], counts[1]["sent"], strict=True)):
        result = first[f"committed{number}"]
        assert torch.equal(result, second[f"committed{number}"])  # every replica applies the same gradients
        assert sent == sent_too == (4 * count if number < START_ITERATIONS else compressed)
        exact = (_low_rank_gradients(0, number) + _low_rank_gradients(1, number)) / 2
        if number < START_ITERATIONS:  # exchanged whole: the exact average
            torch.testing.assert_close(result, exact)
        else:  # the small matrix and the bias travel whole, the big one as a rank-2 approximation
            torch.testing.assert_close(result[64 * 32 :], exact[64 * 32 :])
            assert not torch.allclose(result[: 64 * 32], exact[: 64 * 32])
            assert torch.linalg.matrix_rank(result[: 64 * 32].view(64, 32)) <= 2
    for replica, counted in zip((first, second), counts, strict=True):  # a discarded round, redone from the
        assert torch.equal(replica["discarded"], replica["redone"])  # state it found, and counted once
        assert counted["iterations_after_redo"] == counted["iterations"] + 1
    # the newcomer took its peer's count (else it would send its gradients whole while the peer sent P and
    # Q) and its warm Q; their next round agrees
    assert counts[1]["iterations_after_heal"] == counts[0]["iterations_after_heal"] > START_ITERATIONS
    assert torch.equal(second["q_after_heal"], first["q_after_heal"])
    assert torch.equal(first["after_heal"], second["after_heal"])
