"""Live membership (the default for several local workers): a worker's death costs the others a round,
not a restart.

Each worker is a torchft replica (parallel/live.py). A round starts with a quorum when one is due (who
takes part; a newcomer heals from a live peer before its first forward pass), ends with one
fault-tolerant all-reduce, and commits, or is rolled back and redone by whoever is there at the next
quorum, so every sample is still trained exactly once per epoch and the global batch and lr schedule
stay as they are. This component is everything live membership adds to the one training loop: the
quorum cadence, the seat, healing's state, membership events, the join log and the Lighthouse watch.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distvision.metrics import rewrite_log, say
from distvision.parallel.launch import USER_ERROR_EXIT
from distvision.parallel.live import (
    ATTEMPT_VARIABLE,
    DIVERGED_EXIT,
    FIRST_WORKERS_VARIABLE,
    HEAL_FAILED_EXIT,
    JOINING_VARIABLE,
    LIGHTHOUSE_SETTLE_SECONDS,
    QUORUM_ATTEMPTS,
    REPLICA_VARIABLE,
    SPAWNED_AT_VARIABLE,
    STARTED_AT_VARIABLE,
    HealFailed,
    LighthouseLost,
    LighthouseWatch,
    LiveReplica,
    claim_run_dir,
)
from distvision.parallel.membership import Seat, majority_fingerprint, weights_fingerprint
from distvision.parallel.watchdog import ComputeClock

# The most a healing peer's state may hold: the model and at most as many copies of its size again as
# the optimizer (2 for Adam), the lookahead and DiLoCo's outer state keep, twice over; plus the JSON
# part (the train state's log, counts), small beside the tensors.
STATE_MODEL_COPIES = 10
# Rounds discarded one after another with no commit between: peers dying cost one each, so this many is
# a round that fails the same way every time, which would otherwise be redone forever.
DISCARDS_IN_A_ROW = 20
STATE_SLACK_BYTES = 64 << 20


class LeftBehind(Exception):
    """This replica was frozen past the others' last round: the run has finished without it."""


def replica_number() -> int:
    """This worker's replica number (the live launcher's; 0 for one node's replica under torchrun)."""
    return int(os.environ.get(REPLICA_VARIABLE, "0"))


def is_joining() -> bool:
    """Respawned into a running job: heal from a live peer instead of reading a checkpoint."""
    return os.environ.get(JOINING_VARIABLE) == "1"


@dataclass
class MembershipLog:
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

    def observe(self, quorum_id: int, participants: int, seconds: float, where: dict) -> None:
        """Note a change of quorum (not the first one); `where` is the run's step, epoch and cursor."""
        first, changed = self.quorum_id < 0, quorum_id != self.quorum_id
        old_participants = self.participants
        self.quorum_id, self.participants = quorum_id, participants
        if first or not changed:
            return
        self.pending = {"event": "membership", "old_participants": old_participants,
                        "new_participants": participants, **where,
                        "discarded_steps": self.discarded_rounds, "quorum_seconds": round(seconds, 3)}
        self.discarded_rounds = 0

    def committed(self, now: float) -> dict | None:
        """A round committed: the change it was the first under (if any), with the stall it ended (the
        time from the last step committed before the change to this one)."""
        event, self.pending = self.pending, None
        if event is not None:
            event.update(stall_seconds=round(now - self.last_commit, 3), time=now)
        self.last_commit = now
        self.commits += 1
        return event


class LiveMembership:
    """torchft's quorum, all-reduce and commit as the training loop's membership."""

    live = True

    def __init__(self, replica: LiveReplica, seat: Seat, run_dir: Path, quorum_every: int, lighthouse_grace: float):
        self.replica, self.seat, self.run_dir = replica, seat, run_dir
        self.lighthouse, self.lighthouse_grace = replica.lighthouse, lighthouse_grace
        self.watch: LighthouseWatch | None = None  # from start()
        self.ids_restarted_at: float | None = None  # a quorum's id fell below the last: a new Lighthouse
        self.quorum_every = quorum_every
        self.run = None  # the training loop's Run, from start()
        self.number, self.joining = replica_number(), is_joining()
        self.log = MembershipLog()
        self.attempt_base = int(os.environ.get(ATTEMPT_VARIABLE, "0")) * 1_000_000
        self.healed = False
        self.first_round = True
        # A quorum (a round trip through the Lighthouse) once --quorum-every optimizer steps have committed
        # since the last one (so every round of local steps at least that long), and at once after a
        # discarded round or an epoch's end.
        self.quorum_due, self.quorum_step = True, 0
        self.busy = threading.Lock()  # held while a round or an epoch's end changes the state
        # What the launcher's watchdog sees (computing a step, or waiting); under torchrun, its own thread.
        self.clock = ComputeClock(watch_itself=True)
        self.fingerprint = 0  # of the weights this round started from, at a quorum (0: not taken)
        self.quorum_round = False  # this round began with a quorum
        self.differs = False  # this replica's weights differed from its peers': it heals at the next quorum
        self.discarded_in_a_row = 0

    # -- the protocol --------------------------------------------------------------------------------------
    def begin_round(self) -> float:
        """Join a quorum when one is due (healing if behind) and re-seat; return the seconds it took."""
        self.fingerprint, self.quorum_round = 0, self.quorum_due
        if not self.quorum_due:
            self.clock.computing()
            return 0.0
        try:
            quorum = self._quorum()
        except HealFailed as error:  # respawned, this replica heals again (a peer may serve it then)
            say(f"distvision: replica {self.number} could not heal ({error}); exiting to be respawned")
            sys.stdout.flush()
            os._exit(HEAL_FAILED_EXIT)
        self.quorum_due = False
        if self.first_round:
            self._settle_first_round()  # may ask for another quorum at once
        elif quorum.quorum_id != self.log.quorum_id and self.finished_without_us():
            raise LeftBehind()
        state = self.run.state
        self.quorum_step = state.step
        self.seat.rank, self.seat.participants = quorum.rank, quorum.participants
        self.log.observe(quorum.quorum_id, quorum.participants, quorum.seconds,
                         {"step": state.step, "epoch": state.epoch + 1, "cursor": state.cursor})
        # At every quorum the replicas compare their weights in the round's exchange (agrees()).
        self.fingerprint = weights_fingerprint(self.run.sync.agreed_tensors())
        self.clock.computing()
        return quorum.seconds

    def _quorum(self):
        """torchft's quorum. torchft asks a Lighthouse that went away mid-quorum again until it answers
        (LiveReplica's quorum_retries); where the quorum fails all the same, wait for the Lighthouse (up
        to --lighthouse-grace, then the watch stops the job resumably) and ask again, a few times."""
        attempt = 1
        while True:
            try:
                quorum = self.replica.begin_round()
            except LighthouseLost:
                away = not self.watch.answers()
                if not away and attempt == QUORUM_ATTEMPTS:
                    self._save_for_resume()
                    raise
                if away:
                    say(f"distvision: replica {self.number}: the Lighthouse does not answer; waiting for it "
                        f"(at most {self.lighthouse_grace:g} s)")
                    self.watch.wait_until_back()
                self.replica.forget_quorum()
                attempt += 1
                continue
            if self.first_round or not self._split_brain(quorum):
                self.ids_restarted_at = None
                return quorum
            time.sleep(0.1)

    def _split_brain(self, quorum) -> bool:
        """A quorum of at most half the last one from a Lighthouse just restarted, which cannot yet tell
        who else is alive (LIGHTHOUSE_SETTLE_SECONDS): the others may be forming a quorum of their own."""
        if quorum.quorum_id < self.log.quorum_id and self.ids_restarted_at is None:  # ids count from 1 again
            self.ids_restarted_at = time.monotonic()
        restarted = (self.watch.restarted_within(LIGHTHOUSE_SETTLE_SECONDS) or self.ids_restarted_at is not None
                     and time.monotonic() - self.ids_restarted_at < LIGHTHOUSE_SETTLE_SECONDS)
        return restarted and 2 * quorum.participants <= self.log.participants

    def agrees(self, fingerprints) -> bool:
        """Whether every participant started this round from the same weights (compared at quorums). If
        not, the round is discarded by all alike (they read the same fingerprints), and a replica that
        is not with the majority (on a tie: with rank 0's) heals from a peer at the next quorum."""
        right = majority_fingerprint(fingerprints)
        if right is None:
            return True
        self.differs = self.fingerprint != right
        if self.seat.rank == 0 or self.differs:
            say(f"distvision: {'this replica' if self.differs else 'a replica'}'s weights differed from the "
                f"others' at step {self.run.state.step}; it heals from them and the round is redone")
        return False

    def stepped(self) -> None:
        """A step is done (the watchdog's sign of progress)."""
        self.clock.stepped()

    def allreduce(self, values: torch.Tensor | list[torch.Tensor],
                  while_waiting: Callable[[], None] | None = None) -> bool:
        """Sum over the round's participants in place (a tensor, or several at once); False when a peer
        failed (the round won't commit). while_waiting (loading the next batch) runs while the exchange
        is in flight."""
        return self.exchange([values] if isinstance(values, torch.Tensor) else values, [], while_waiting)[0]

    def exchange(self, summed: list[torch.Tensor], gathered: list[torch.Tensor],
                 while_waiting: Callable[[], None] | None = None,
                 on_group: Sequence[Callable] = ()) -> tuple[bool, list[list[torch.Tensor]]]:
        """The round's exchange: `summed` summed over the participants in place, `gathered` collected
        from each, `on_group`'s collectives run on the round's group (PowerSGD's); False when a peer
        failed (the round won't commit)."""
        self.clock.waiting()  # waiting for the peers: whoever is late is the one watched
        return self.replica.allreduce_sum(summed, while_waiting, gathered, on_group)

    def launch(self, summed: list[torch.Tensor], gathered: list[torch.Tensor]) -> Callable[[], tuple]:
        """Start exchange()'s collectives and return the wait for them (the round's steps go on meanwhile)."""
        return self.replica.launch_sum(summed, gathered)

    def commit(self) -> bool:
        """torchft's commit (a barrier over this replica's group, a single process, which also ends the
        serving of the state a peer healed from) after a round that began with a quorum; between
        quorums the all-reduce's own success decides (the exchange requires both), without that RPC:
        it cost about 2% of a caffe-quick step."""
        return self.replica.commit() if self.quorum_round else True

    def committed(self, step: int) -> None:
        """Log the change this round was the first under; keep torchft's step equal to ours (it counts
        commits, ours optimizer steps) so that a replica that read an older checkpoint sees it is behind."""
        now = time.time()
        self.discarded_in_a_row = 0
        self.quorum_due = self.quorum_due or step - self.quorum_step >= self.quorum_every
        event = self.log.committed(now)
        if event is not None:
            self.run.state.log.append(event)
            if self.seat.rank == 0:
                # The whole log, not the one line: a rank 0 that died at an epoch's end took that epoch's
                # line with it, and every replica's log holds it.
                rewrite_log(self.run_dir, self.run.state.log)
                say(f"distvision: workers {event['old_participants']} -> {event['new_participants']} at step "
                    f"{event['step']}, training again {event['stall_seconds']:.1f} s after the last committed "
                    f"step, {event['discarded_steps']} step(s) redone")
        self.replica.set_step(step)
        if self.joining and self.log.commits == 1:
            self._log_join(now)
            self.joining = False

    def discarded(self) -> None:
        self.log.discarded_rounds += 1
        self.quorum_due = True
        self.discarded_in_a_row += 1
        if self.discarded_in_a_row >= DISCARDS_IN_A_ROW:  # not a peer that died: something fails every time
            error = self.replica.manager.errored()
            raise RuntimeError(f"{DISCARDS_IN_A_ROW} rounds in a row failed, the last with: "
                               f"{error.original_exception if error else 'a weights check that did not agree'}")
        # torchft counted a round the weights check discarded; a replica whose weights differed claims to
        # be a step behind, so that the next quorum heals it from a peer.
        step = self.run.state.step
        if self.differs and step == 0:
            os._exit(DIVERGED_EXIT)  # nothing to be behind of at step 0: respawned, it heals
        self.replica.set_step(step - 1 if self.differs else step)
        self.differs = False

    def epoch_ended(self) -> None:
        """A new epoch starts with a quorum (workers join there); evaluation is not a stall."""
        self.quorum_due = True
        self.log.last_commit = time.time()

    def attempt(self) -> int:
        """The audit's attempt id of this round: the quorum's, shared by the round's participants."""
        return self.attempt_base + self.log.quorum_id

    # -- start, healing and the end ------------------------------------------------------------------------
    def start(self, run, join_timeout: float) -> None:
        """Before the first round: share what a healing peer needs (the run's model, optimizer, state,
        lookahead, DiLoCo's outer optimizer and the membership counts), watch the Lighthouse, wait for the
        launcher's first workers, and tell torchft our step. `run` is the training loop's Run.

        Nothing is copied here: the transport (healing.py) encodes the state when a peer asks for it,
        in the quorum, while this replica's training thread waits for that quorum."""
        self.run = run
        share = self.replica.share_state
        share("model", self._serve_model, run.model.load_state_dict)
        share("optimizer", run.optimizer.state_dict, run.optimizer.load_state_dict)
        share("train_state", run.state.state_dict, self._load_state)
        share("membership", self.log.state_dict, self.log.load)
        share("balancer", run.balancer.state_dict, run.balancer.load)
        if run.lookahead:
            share("lookahead", run.lookahead.state, lambda saved: run.lookahead.load(dict(saved), run.model))
        if run.sync.outer:
            share("outer_optimizer", run.sync.outer.state_dict, run.sync.outer.load_state_dict)
        if run.sync.fragments:  # DiLoCo's agreed weights, and its count of rounds (which fragment is next)
            share("outer_fragments", run.sync.fragments.state_dict, run.sync.fragments.load)
        if run.sync.low_rank:  # PowerSGD's count of rounds (which decides its collectives) and warm Q
            share("powersgd", run.sync.low_rank.state_dict, run.sync.low_rank.load)
        # A peer's state is about ours in size; anything much larger is refused before it is read.
        model_bytes = sum(t.numel() * t.element_size() for t in run.model.state_dict().values())
        self.replica.transport.max_state_bytes = STATE_MODEL_COPIES * model_bytes + STATE_SLACK_BYTES
        claim_run_dir(self.run_dir, self.lighthouse)
        self.watch = LighthouseWatch(self.lighthouse, self._abandon, self.lighthouse_grace)
        wait_for_first_peers(self.run_dir, self.number, join_timeout)
        self.replica.set_step(run.state.step)

    def _serve_model(self) -> dict:
        """The model's state for a healing peer (--debug-fault's heal phase strikes here)."""
        self.run.faults.strike("heal", self.run.state.step)
        return self.run.model.state_dict()

    def _load_state(self, saved: dict) -> None:
        self.run.state.load(saved)
        self.run.sync.healed()
        self.healed = True

    def _settle_first_round(self) -> None:
        """After the first quorum: unless a live peer was ahead (and healed us), the run goes on from
        this replica's state, and the log is rewritten to it (lines written after its checkpoint go)."""
        self.first_round = False
        # summary.json's wall seconds count from the job's start, whichever replica writes it
        self.run.reporter.started = self.log.started
        run = self.run
        # Respawned, but every peer is gone too: each respawn reads the newest checkpoint (one that
        # "healed" at step 0 took a fellow respawn's fresh state). Their first round then starts with a
        # quorum of its own, whose weights check holds them together.
        if self.joining and (not self.healed or run.state.step == 0):
            run.state.load(run.resume_from_checkpoint().state_dict())
            self.replica.set_step(run.state.step)
            self.quorum_due = True
        elif self.healed:
            return
        rewrite_log(self.run_dir, run.state.log)

    def _save_for_resume(self) -> None:
        """The last committed state, so that --resume continues from it (the round's rank 0 writes)."""
        if self.seat.rank == 0 and self.run.state.step:
            self.run.save_checkpoint()

    def _abandon(self, message: str) -> None:
        """The Lighthouse has been gone for --lighthouse-grace: no quorum can form. Once the round in hand
        is done, the round's rank 0 saves the last committed state for --resume, and this replica exits
        (status 2)."""
        with self.busy:
            self._save_for_resume()
            print(f"distvision: error: {message}; continue with --resume --out {self.run_dir}",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(USER_ERROR_EXIT)

    def finished_without_us(self) -> bool:
        """A replica frozen past the others' last round must not train the finished run on alone."""
        if not (self.run_dir / "summary.json").exists():
            return False
        say(f"distvision: replica {self.number} was left behind; the run has already finished")
        return True

    def shutdown(self, run_ended: bool) -> None:
        """Leave the job; `run_ended`: it finished (or finished without this replica), rather than this
        replica leaving it alone (the launcher respawns a replica that left)."""
        if run_ended:
            self.clock.run_ended()
        self.replica.shutdown()

    def _log_join(self, first_commit: float) -> None:
        """A respawned replica's own record (RUN_DIR/joins.jsonl): from its start to its first committed step."""
        spawned_at = float(os.environ.get(SPAWNED_AT_VARIABLE, "nan"))
        record = {"replica": self.number, "spawned": spawned_at, "first_commit": first_commit,
                  "seconds": round(first_commit - spawned_at, 3), "healed": self.healed}
        with open(self.run_dir / "joins.jsonl", "a") as joins:
            joins.write(json.dumps(record) + "\n")


def wait_for_first_peers(run_dir: Path, number: int, timeout: float) -> None:
    """The launcher's first workers start their first round together (each is heartbeating by now), so
    that a run's first steps do not depend on which worker was ready first."""
    workers, attempt = int(os.environ.get(FIRST_WORKERS_VARIABLE, "0")), os.environ.get(ATTEMPT_VARIABLE, "")
    if workers < 2:
        return
    folder = run_dir / "live"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"ready-{attempt}-{number}").touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(f"ready-{attempt}-*"))) < workers and time.monotonic() < deadline:
        time.sleep(0.02)
