"""Training with live membership (`--recovery live`): a worker's death costs the others a round, not a restart.

Each worker is a torchft replica (parallel/live.py). Training runs in rounds: one step for
`allreduce`, H local steps for `local-sgd` and `diloco`. A round starts with a quorum, which fixes
who takes part and heals a newcomer from a live peer (model, optimizer, TrainState and all), and ends
with one fault-tolerant all-reduce and a commit. A committed round moves the world-size-free cursor
on; a discarded one (a peer died or froze) is rolled back and redone by whoever is there at the next
quorum, so every sample is still trained exactly once per epoch and the global batch and lr schedule
stay as they are. Epoch ends, stopping rules, checkpoints and the summary are train.py's own: every
replica evaluates the same weights and so takes the same decisions, and the round's rank 0 writes.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from distvision.config import TrainConfig
from distvision.errors import UserError
from distvision.metrics import append_metrics, rewrite_log, say
from distvision.parallel.launch import USER_ERROR_EXIT
from distvision.parallel.live import (
    ATTEMPT_VARIABLE,
    FIRST_WORKERS_VARIABLE,
    JOINING_VARIABLE,
    LIGHTHOUSE_ADDRESS_VARIABLE,
    REPLICA_VARIABLE,
    SPAWNED_AT_VARIABLE,
    STARTED_AT_VARIABLE,
    LighthouseLost,
    LiveReplica,
    Quorum,
    watch_lighthouse,
)
from distvision.parallel.stopping import stop_after_epoch, time_is_up
from distvision.precision import autocast
from distvision.train import end_epoch, finish
from distvision.training.setup import Run, build_run
from distvision.training.state import TrainState

STATS = ("loss_sum", "samples", "stop", "time_up", "checkpoint_due")  # summed with every round's exchange


@dataclass
class Membership:
    """Who trains now, and what each change cost: the events of metrics.jsonl (summary.json counts them).

    A change is a new quorum: a worker left, joined, or was replaced by its respawn. Every replica logs
    the same event (the counts travel with the state a newcomer heals from); the round's rank 0 writes it.
    """

    quorum_id: int = -1
    participants: int = 0
    discarded_rounds: int = 0  # since the last change
    last_commit: float = field(default_factory=time.time)  # wall clock, comparable between replicas
    pending: dict | None = None  # a change, logged at its first committed step
    commits: int = 0  # rounds this replica committed
    # When the job started (the launcher's clock; else this replica's): summary.json's wall seconds.
    started: float = field(default_factory=lambda: float(os.environ.get(STARTED_AT_VARIABLE) or time.time()))

    def state_dict(self) -> dict:
        return {"quorum_id": self.quorum_id, "participants": self.participants,
                "discarded_rounds": self.discarded_rounds, "last_commit": self.last_commit, "started": self.started}

    def load(self, saved: dict) -> None:
        self.quorum_id, self.participants, self.discarded_rounds, self.last_commit, self.started = (
            saved["quorum_id"], saved["participants"], saved["discarded_rounds"], saved["last_commit"],
            saved["started"])

    def observe(self, run: Run, quorum: Quorum) -> None:
        """Note a change of quorum (not the first one)."""
        first, changed = self.quorum_id < 0, quorum.quorum_id != self.quorum_id
        old_participants = self.participants
        self.quorum_id, self.participants = quorum.quorum_id, quorum.participants
        if first or not changed:
            return
        self.pending = {"event": "membership", "old_participants": old_participants,
                        "new_participants": quorum.participants, "step": run.state.step,
                        "epoch": run.state.epoch + 1, "cursor": run.state.cursor,
                        "discarded_steps": self.discarded_rounds, "quorum_seconds": round(quorum.seconds, 3)}
        self.discarded_rounds = 0

    def committed(self, run: Run, rank: int) -> None:
        """A round committed: log the change it was the first under, with the stall it ended (the time
        from the last step committed before the change to this one)."""
        now, event, self.pending = time.time(), self.pending, None
        if event is not None:
            event.update(stall_seconds=round(now - self.last_commit, 3), time=now)
            run.state.log.append(event)
            if rank == 0:
                append_metrics(run.checkpoints.run_dir, event)
                say(f"distvision: workers {event['old_participants']} -> {event['new_participants']} at step "
                    f"{event['step']}, training again {event['stall_seconds']:.1f} s after the last committed "
                    f"step, {event['discarded_steps']} step(s) redone")
        self.last_commit = now
        self.commits += 1


def train_live(config: TrainConfig) -> dict | None:
    """Train as one replica of a live job; return the summary where this replica writes it."""
    replica_number = int(os.environ.get(REPLICA_VARIABLE, "0"))
    joining = os.environ.get(JOINING_VARIABLE) == "1"
    run = build_run(config, started=time.time(), replica=replica_number, joining=joining)
    lighthouse = config.lighthouse or os.environ.get(LIGHTHOUSE_ADDRESS_VARIABLE)
    if not lighthouse:
        raise UserError("--recovery live needs a torchft Lighthouse: give --lighthouse HOST:PORT")
    replica = LiveReplica(lighthouse, f"distvision{replica_number}", timeout=config.collective_timeout,
                          quorum_timeout=max(config.collective_timeout, config.join_timeout))
    wait_for_first_peers(run, replica_number, config.join_timeout)
    membership, rounds = Membership(), LiveRounds(run, replica, config)
    watch_lighthouse(lighthouse, rounds.abandon)
    rounds.share_state(membership)
    replica.set_step(run.state.step)
    stop_reason, last_test, first_round = None, None, True
    try:
        while run.state.epoch < run.recipe.epochs and stop_reason is None:
            if rounds.quorum_due:
                quorum = replica.begin_round()
                if first_round:
                    rounds.settle_first_round(joining)
                    first_round = False
                if rounds.finished_without_us(quorum, membership, replica_number):
                    replica.shutdown()
                    return None
                rounds.take_seat(quorum)
                membership.observe(run, quorum)
                run.state.train_seconds += quorum.seconds  # waiting for the quorum is training time too
                run.state.epoch_seconds += quorum.seconds
            with rounds.busy:  # (the Lighthouse's loss is handled between rounds: rounds.abandon)
                stop_reason, epoch_done = rounds.train_round(quorum, membership)
                if joining and membership.commits == 1:
                    log_join(run, replica_number, membership.last_commit, rounds.healed)
                    joining = False
                if epoch_done and stop_reason is None:
                    last_test = (run.state.step, end_epoch(run))
                    membership.last_commit = time.time()  # evaluation is not a stall
                    stop_reason = stop_after_epoch(run.stop_rules, run.state.history())
                    if stop_reason == "max_epochs":
                        stop_reason = None
    except LighthouseLost:
        if run.checkpoints.rank == 0 and run.state.step:
            run.save_checkpoint()  # the last committed state, so that --resume continues from it
        raise
    run.reporter.started = membership.started
    summary = finish(run, stop_reason, last_test)
    replica.shutdown()
    return summary


def wait_for_first_peers(run: Run, replica_number: int, timeout: float) -> None:
    """The launcher's first workers start their first round together (each is heartbeating by now), so
    that a run's first steps do not depend on which worker was ready first."""
    workers, attempt = int(os.environ.get(FIRST_WORKERS_VARIABLE, "0")), os.environ.get(ATTEMPT_VARIABLE, "")
    if workers < 2:
        return
    folder = run.checkpoints.run_dir / "live"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"ready-{attempt}-{replica_number}").touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(f"ready-{attempt}-*"))) < workers and time.monotonic() < deadline:
        time.sleep(0.02)


def log_join(run: Run, replica_number: int, first_commit: float, healed: bool) -> None:
    """A respawned replica's own record (RUN_DIR/joins.jsonl): from its start to its first committed step."""
    spawned_at = float(os.environ.get(SPAWNED_AT_VARIABLE, "nan"))
    record = {"replica": replica_number, "spawned": spawned_at, "first_commit": first_commit,
              "seconds": round(first_commit - spawned_at, 3), "healed": healed}
    with open(run.checkpoints.run_dir / "joins.jsonl", "a") as joins:
        joins.write(json.dumps(record) + "\n")


class LiveRounds:
    """One round: the participants' shares of its global batches, the local steps, the exchange, the commit."""

    def __init__(self, run: Run, replica: LiveReplica, config: TrainConfig):
        self.run, self.replica, self.config = run, replica, config
        self.mode = config.sync
        self.period = config.period
        self.outer = (torch.optim.SGD(trainable(run.model), lr=config.outer_lr, momentum=config.outer_momentum,
                                      nesterov=config.outer_momentum > 0) if self.mode == "diloco" else None)
        self.attempt_base = int(os.environ.get(ATTEMPT_VARIABLE, "0")) * 1_000_000
        self.healed = False
        # Averaging gradients, a quorum (a round trip through the Lighthouse) every --quorum-every
        # committed steps, and at once after a discarded one or an epoch's end; local steps, every round.
        self.quorum_due, self.since_quorum = True, 0
        self.busy = threading.Lock()  # held while a round or an epoch's end changes the state

    def abandon(self, message: str) -> None:
        """The Lighthouse is gone: no quorum can form again. Once the round in hand is done, the round's
        rank 0 saves the last committed state for --resume, and this replica exits (status 2)."""
        with self.busy:
            if self.run.checkpoints.rank == 0 and self.run.state.step:
                self.run.save_checkpoint()
            print(f"distvision: error: {message}; continue with --resume --out {self.config.out}",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(USER_ERROR_EXIT)

    def settle_first_round(self, joining: bool) -> None:
        """After the first quorum: unless a live peer was ahead (and healed us), the run goes on from
        this replica's state, and the log is rewritten to it (lines written after its checkpoint go)."""
        run = self.run
        if self.healed:
            return
        if joining:  # respawned, but every peer is gone: the newest checkpoint instead
            run.state = run.checkpoints.resume(run.model, run.optimizer, run.lookahead)
            self.replica.set_step(run.state.step)
        rewrite_log(run.checkpoints.run_dir, run.state.log)

    def finished_without_us(self, quorum: Quorum, membership: Membership, replica_number: int) -> bool:
        """A replica frozen past the others' last round must not train the finished run on alone."""
        if quorum.quorum_id == membership.quorum_id or not (self.run.checkpoints.run_dir / "summary.json").exists():
            return False
        say(f"distvision: replica {replica_number} was left behind; the run has already finished")
        return True

    def share_state(self, membership: Membership) -> None:
        """Everything a healing peer needs, copied when asked (the sender trains on meanwhile)."""
        run, share = self.run, self.replica.share_state
        share("model", lambda: clone(run.model.state_dict()), self._load_model)
        share("optimizer", lambda: clone(run.optimizer.state_dict()), run.optimizer.load_state_dict)
        share("train_state", lambda: run.state.state_dict(), self._load_state)
        share("membership", membership.state_dict, membership.load)
        if run.lookahead:
            share("lookahead", lambda: clone(run.lookahead.state()),
                  lambda saved: run.lookahead.load(dict(saved), run.model))
        if self.outer:
            share("outer_optimizer", lambda: clone(self.outer.state_dict()), self.outer.load_state_dict)

    def _load_model(self, saved: dict) -> None:
        self.run.model.load_state_dict(saved)

    def _load_state(self, saved: dict) -> None:
        self.run.state = TrainState.from_state_dict(saved, self.run.world_size)
        self.healed = True

    def take_seat(self, quorum: Quorum) -> None:
        """This round's rank among the participants decides its shares and whether it writes."""
        run = self.run
        self.quorum_due, self.since_quorum = False, 0  # every participant starts its window here
        run.batches.rank, run.batches.world_size = quorum.rank, quorum.participants
        run.checkpoints.rank = run.reporter.rank = run.faults.rank = quorum.rank
        # run.rank and run.world_size stay 0 and 1: the replica's own process group, over which an epoch
        # record's per-worker seconds and bytes are gathered (live, they are the writing replica's own).
        run.reporter.world_size = run.checkpoints.world_size = run.state.world_size = quorum.participants
        if run.audit:
            run.audit.world_size = quorum.participants

    def averages_gradients(self) -> bool:
        """This round averages gradients (one step): all-reduce, or local SGD's warm-up steps."""
        return self.mode == "allreduce" or self.run.state.step < self.config.sync_warmup

    def round_steps(self) -> int:
        """Steps in this round: 1 when averaging gradients, else up to the period (never past the epoch)."""
        if self.averages_gradients():
            return 1
        return 10**9 if self.period == "epoch" else int(self.period)

    def train_round(self, quorum: Quorum, membership: Membership) -> tuple[str | None, bool]:
        """Train one round; return (why every replica stops, or None; whether the epoch is done)."""
        run, state = self.run, self.run.state
        batches = run.batches.remaining(state.epoch, state.cursor)[:self.round_steps()]
        averaging_gradients = self.averages_gradients()
        before = Rollback.take(run, keep_weights=not averaging_gradients)
        stats = torch.zeros(len(STATS))
        state.start_segment()
        run.model.train()
        shares = []
        for batch in batches:
            local = run.batches.share(batch)
            shares.append((state.step, local))
            stats[0] += self.local_step(batch, local, apply=not averaging_gradients)
            stats[1] += len(local)
            state.advance(len(batch))
        stats[2] = float(run.faults.wants_stop(state.step))  # a stop of the whole job (--debug-stop-at-step)
        stats[3] = float(quorum.rank == 0 and time_is_up(run.stop_rules, state.elapsed()))
        stats[4] = float(run.checkpoints.due())
        payload = (gradients(run.model) if averaging_gradients
                   else parameters_or_change(run.model, before.weights if self.mode == "diloco" else None))
        # The batch-norm statistics are averaged too, so every replica evaluates (and decides) alike.
        buffers = statistics_buffers(run.model)
        exchanged = torch.cat([t.detach().reshape(-1).float() for t in (*payload, *buffers, stats)])
        payload_count = sum(t.numel() for t in payload)
        with run.sync.stats.timed(exchanged.numel() * 4):
            ok = self.replica.allreduce_sum(exchanged)
        committed = self.replica.commit() and ok
        state.close_segment()
        self.since_quorum += 1
        self.quorum_due = not (committed and averaging_gradients) or self.since_quorum >= self.config.quorum_every
        if not committed:
            before.restore(run)
            membership.discarded_rounds += 1
            return None, False
        buffer_count = sum(b.numel() for b in buffers)
        unflatten_into(exchanged[payload_count:payload_count + buffer_count] / quorum.participants, buffers,
                       as_grad=False)
        self.apply(exchanged[:payload_count], quorum.participants, before, averaging_gradients)
        membership.committed(run, quorum.rank)
        if not averaging_gradients:
            self.replica.set_step(state.step)
        totals = dict(zip(STATS, exchanged[-len(STATS):].tolist(), strict=True))
        state.add_loss(totals["loss_sum"], int(totals["samples"]))
        if run.audit:
            for step, local in shares:
                run.audit.record(state.epoch, step, local, attempt=self.attempt_base + quorum.quorum_id)
        run.checkpoints.after_exchange(state)
        # SIGTERM stops this replica only: it leaves after a committed round, and the others go on
        # without it. The launcher stops a whole job by signalling every replica.
        if totals["stop"] or run.stop_signal.requested:
            return "stopped", False
        if totals["time_up"]:
            return "max_time", False
        if not np.isfinite(totals["loss_sum"]):
            return "diverged", False
        epoch_done = state.cursor >= len(run.train_indices)
        self.quorum_due = self.quorum_due or epoch_done
        if totals["checkpoint_due"] and not epoch_done:
            run.save_checkpoint()
        return None, epoch_done

    def local_step(self, batch: np.ndarray, local: np.ndarray, apply: bool) -> float:
        """Forward and backward on this replica's share; with `apply` (local steps) the optimizer steps too.

        Averaging gradients, the loss is summed over the share and divided by the global batch, so the
        participants' sum is the global batch's mean whatever the split. Local steps use the share's mean.
        """
        run = self.run
        run.set_lr(run.progress_fraction())
        inputs = run.batches.prefetcher.take(local, run.state.epoch)
        labels = torch.from_numpy(run.batches.labels[local]).to(run.device)
        started = time.perf_counter()
        with autocast(run.precision, run.device):
            logits = run.model(inputs)
        loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum",
                                           label_smoothing=run.recipe.label_smoothing)
        loss = run.faults.corrupt_loss(loss, run.state.step)
        (loss / (len(local) if apply else len(batch))).backward()
        if apply:
            self.replica.forbid_state_reads()
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            self.replica.allow_state_reads()
        run.faults.after_step(time.perf_counter() - started)
        return loss.item()

    def apply(self, summed: torch.Tensor, participants: int, before: Rollback, averaging_gradients: bool) -> None:
        """The committed round's update: an optimizer step on the summed gradients, the participants'
        average (local SGD), or an outer Nesterov step on the average change (DiLoCo)."""
        run = self.run
        self.replica.forbid_state_reads()
        parameters = trainable(run.model)
        if averaging_gradients:
            unflatten_into(summed, parameters, as_grad=True)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        elif self.mode == "diloco":
            with torch.no_grad():
                for parameter, original in zip(parameters, before.weights, strict=True):
                    parameter.copy_(original)
            unflatten_into(summed / participants, parameters, as_grad=True)
            self.outer.step()
            self.outer.zero_grad(set_to_none=True)
        else:
            unflatten_into(summed / participants, parameters, as_grad=False)
        if run.lookahead:
            # Every step when averaging gradients, as train.py does; after local steps, once at the
            # averaging if the round crossed a pull, so that every replica keeps the same average.
            last_pull = run.state.step - run.state.step % run.lookahead.every
            if last_pull > before.step:
                run.lookahead.maybe_update(run.model, last_pull, run.progress_fraction())
        self.replica.allow_state_reads()


@dataclass
class Rollback:
    """What a discarded round must undo: the cursor and step, the buffers its forward passes moved
    (batch-norm statistics), and after local steps the weights and optimizer state too."""

    cursor: int
    step: int
    buffers: list[torch.Tensor]
    weights: list[torch.Tensor] | None
    optimizer: dict | None

    @classmethod
    def take(cls, run: Run, keep_weights: bool) -> Rollback:
        buffers = [b.detach().clone() for b in run.model.buffers()]
        weights = [p.detach().clone() for p in trainable(run.model)] if keep_weights else None
        optimizer = clone(run.optimizer.state_dict()) if keep_weights else None
        return cls(run.state.cursor, run.state.step, buffers, weights, optimizer)

    def restore(self, run: Run) -> None:
        run.state.cursor, run.state.step = self.cursor, self.step
        run.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(run.model.buffers(), self.buffers, strict=True):
                buffer.copy_(saved)
            for parameter, saved in zip(trainable(run.model), self.weights or [], strict=False):
                parameter.copy_(saved)
        if self.optimizer is not None:
            run.optimizer.load_state_dict(self.optimizer)


def statistics_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The floating-point buffers (batch-norm running means and variances)."""
    return [b for b in model.buffers() if b.is_floating_point()]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def gradients(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable(model)]


def parameters_or_change(model: nn.Module, originals: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """The parameters, or with `originals` the pseudo-gradient (original minus now) DiLoCo averages."""
    parameters = trainable(model)
    if originals is None:
        return parameters
    return [o - p.detach() for p, o in zip(parameters, originals, strict=True)]


def unflatten_into(flat: torch.Tensor, parameters: list[torch.Tensor], as_grad: bool) -> None:
    """Write consecutive slices of `flat` into the parameters' gradients (as_grad) or their values."""
    offset = 0
    with torch.no_grad():
        for parameter in parameters:
            piece = flat[offset:offset + parameter.numel()].view(parameter.shape).to(parameter.dtype)
            offset += parameter.numel()
            if as_grad:  # a view of the round's own buffer, freed with the gradients
                parameter.grad = piece
            else:
                parameter.copy_(piece)


def clone(tree):
    """A deep copy of a state dict's tensors (a healing peer reads it while this replica trains on)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {key: clone(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(clone(value) for value in tree)
    return tree

