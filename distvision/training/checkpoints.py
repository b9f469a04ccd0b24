"""Training checkpoints and what hangs on them: when to save, resuming, the heartbeat, restart events.

Rank 0 alone writes (atomically, distvision/checkpoint.py); every rank loads the checkpoint rank 0
picked. The heartbeat is rank 0's "still training" mark, so that after a restart the time lost to
the failure and the work redone can be measured.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from distvision.checkpoint import (
    load_latest_training_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    restore_optimizer,
    save_checkpoint,
    save_training_checkpoint,
)
from distvision.config import TrainConfig
from distvision.errors import UserError
from distvision.fileio import hold_exclusive_lock, write_json_atomic
from distvision.metrics import append_metrics, rewrite_log, say
from distvision.parallel.fragments import OuterFragments
from distvision.parallel.membership import Seat
from distvision.recipes import Recipe
from distvision.training.state import TrainState
from distvision.tricks import Lookahead

HEARTBEAT_INTERVAL = 0.5  # seconds between rank 0's "still training" marks, for recovery timing


def lock_run_dir(run_dir: Path):
    """Hold an exclusive lock on the run folder, so two jobs can never write one run."""
    handle = hold_exclusive_lock(run_dir / "run.lock")  # kept open for the life of the process
    if handle is None:
        raise UserError(f"another job is writing {run_dir}; give this one its own --out")
    return handle


def write_heartbeat(run_dir: Path, step: int, train_seconds: float) -> None:
    """Rank 0's mark that training was alive at this moment (recovery time is measured from it)."""
    write_json_atomic(run_dir / "heartbeat.json", {"time": time.time(), "step": step,
                                                    "train_seconds": train_seconds}, durable=False)


def read_heartbeat(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "heartbeat.json").read_text())
    except (OSError, ValueError):
        return None


def resume_settings(config: TrainConfig, recipe: Recipe) -> dict:
    """What a resumed run must share with the run that wrote its checkpoints: the model, the data it
    trains on, the resolved recipe (lr, schedule, tricks, batch, epochs), the synchronisation and the
    precision asked for. The worker count, balancing and checkpoint timing may change; the rest would
    silently make a different run."""
    settings = {"model": config.model, "global_batch_size": recipe.batch_size, "seed": config.seed,
                "epochs": recipe.epochs, "image_size": config.image_size,
                "train_fraction": config.train_fraction, "val_fraction": config.val_fraction,
                "sync": config.sync, "sync_every": config.period, "sync_warmup": config.sync_warmup,
                "compress": config.compress, "precision": config.precision,
                # epochs and batch_size are recorded above, under the names older checkpoints carry
                **{f"recipe.{name}": value for name, value in recipe.to_dict().items()
                   if name not in ("epochs", "batch_size")}}
    return json.loads(json.dumps(settings))  # as a checkpoint's JSON gives them back (lists, not tuples)


def check_same_settings(run_dir: Path, saved: dict, expected: dict) -> None:
    """UserError naming the first setting that differs from the checkpoint's. Settings a checkpoint
    written by an older version does not record are not compared."""
    for key, value in expected.items():
        if key in saved and saved[key] != value:
            flag = "--" + key.removeprefix("recipe.").replace("_", "-")
            raise UserError(f"{run_dir} holds a run with {key}={saved[key]!r}, not {value!r} ({flag}): "
                            "resume it with the same settings or choose another --out")


def agree_on_resume(run_dir: Path, rank: int) -> tuple[dict, dict, dict] | None:
    """Every rank loads the checkpoint rank 0 picked (the newest intact one), or none. Without a process
    group (a live replica), each loads the newest itself."""
    loaded = load_latest_training_checkpoint(run_dir, warn=say) if rank == 0 or not dist.is_initialized() else None
    choice = [loaded[2]["step"] if loaded else None]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    if rank != 0:
        loaded = load_latest_training_checkpoint(run_dir, warn=lambda message: None)
        if loaded is None or loaded[2]["step"] != choice[0]:
            raise UserError(f"rank {rank} cannot read checkpoint step {choice[0]} in {run_dir}: "
                            "--out must be on a file system every node shares")
    return loaded


# DiLoCo's outer optimizer: its tensors travel in the weights file under this prefix, the rest in the
# state file's "outer_optimizer" (split as the inner optimizer's are).
OUTER_PREFIX = "outer_optimizer."
FRAGMENTS_PREFIX = "outer_fragments."  # DiLoCo's agreed weights and count of rounds (parallel/fragments.py)


class CheckpointManager:
    """Decides when a training checkpoint is due, writes it, and resumes from the newest one.

    `settings` are the values a resumed run must share with the one that wrote the checkpoint.
    """

    def __init__(self, run_dir: Path, seat: Seat, settings: dict, every_seconds: float):
        self.run_dir, self.seat = run_dir, seat
        self.settings = settings
        self.every_seconds = every_seconds
        # torchrun's rendezvous id: the same id in a checkpoint means the agent restarted us.
        self.job_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
        self.resumed_event: dict | None = None  # logged once the first step after it has trained
        self.last_saved = self.last_heartbeat = time.time()
        self._lock = None

    # -- start --------------------------------------------------------------------------------------------
    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, lookahead: Lookahead | None,
               outer: torch.optim.Optimizer | None = None, fragments: OuterFragments | None = None) -> TrainState:
        """Load the newest checkpoint into model and optimizers (DiLoCo's `outer` and agreed weights too)
        and return its state, or a fresh state.

        The same job id (torchrun's rendezvous id) means the agent restarted us after a failure or a
        membership change ("restart"); another id means a user resumed a stopped run ("resume").
        """
        loaded = agree_on_resume(self.run_dir, self.seat.rank)
        if not loaded:
            if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
                # Restarted before the first checkpoint: everything so far is redone, and the log says so.
                self.resumed_event = {"event": "restart", "old_world_size": None,
                                      "new_world_size": self.seat.participants, "step": 0, "epoch": 1, "cursor": 0,
                                      "from_scratch": True}
                heartbeat = read_heartbeat(self.run_dir)
                if heartbeat:
                    self.resumed_event["seconds_lost"] = round(heartbeat["train_seconds"], 3)
                    self.resumed_event["last_alive"] = heartbeat["time"]
            return TrainState(self.seat.participants)
        weights, optimizer_tensors, saved = loaded
        averages = {name: weights.pop(name) for name in list(weights) if name.startswith("lookahead.")}
        outer_tensors = {name[len(OUTER_PREFIX):]: weights.pop(name) for name in list(weights)
                         if name.startswith(OUTER_PREFIX)}
        agreed = {name[len(FRAGMENTS_PREFIX):]: weights.pop(name) for name in list(weights)
                  if name.startswith(FRAGMENTS_PREFIX)}
        check_same_settings(self.run_dir, saved["settings"], self.settings)
        model.load_state_dict(weights)
        restore_optimizer(optimizer, optimizer_tensors, saved)
        if lookahead:
            lookahead.load(averages, model)
        if outer and "outer_optimizer" in saved:
            optimizer_from_tensors(outer, outer_tensors, saved["outer_optimizer"])
        if fragments:
            fragments.load(agreed or None)  # none saved: the weights just loaded are the agreed ones
        event = {"event": "restart" if self.job_id and saved.get("job_id") == self.job_id else "resume",
                 "old_world_size": saved["world_size"], "new_world_size": self.seat.participants,
                 "step": saved["step"], "epoch": saved["epoch"] + 1, "cursor": saved["cursor"]}
        heartbeat = read_heartbeat(self.run_dir)
        if heartbeat and heartbeat["step"] >= saved["step"]:
            event["seconds_lost"] = round(max(0.0, heartbeat["train_seconds"] - saved["train_seconds"]), 3)
            event["last_alive"] = heartbeat["time"]
        self.resumed_event = event
        return TrainState.from_state_dict(saved, self.seat.participants)

    def open_run_dir(self, state: TrainState) -> None:
        """Rank 0 takes the run folder's lock and rewrites the log as the checkpoint knew it, so that
        nothing trained after the checkpoint is counted twice."""
        if self.seat.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock = lock_run_dir(self.run_dir)  # held until this process exits
            rewrite_log(self.run_dir, state.log)

    # -- during training ------------------------------------------------------------------------------------
    def due(self) -> bool:
        """Rank 0's clock says a checkpoint is due (the vote travels in the step exchange)."""
        return self.seat.rank == 0 and time.time() - self.last_saved >= self.every_seconds

    def after_exchange(self, state: TrainState) -> None:
        """Log a restart or resume once the first step after it has trained; keep the heartbeat fresh."""
        now = time.time()
        if self.resumed_event:
            self._record_resume(state, self.resumed_event, now)
            self.resumed_event = None
        if self.seat.rank == 0 and now - self.last_heartbeat >= HEARTBEAT_INTERVAL:
            write_heartbeat(self.run_dir, state.step, state.elapsed())
            self.last_heartbeat = now

    def save(self, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer,
             lookahead: Lookahead | None, outer: torch.optim.Optimizer | None = None,
             fragments: OuterFragments | None = None) -> None:
        """Write a training checkpoint of this state (rank 0); every rank restarts its clock."""
        if self.seat.rank == 0:
            weights = dict(model.state_dict(), **(lookahead.state() if lookahead else {}))
            extra = {}
            if outer:
                outer_tensors, extra["outer_optimizer"] = optimizer_to_tensors(outer)
                weights.update({OUTER_PREFIX + name: tensor for name, tensor in outer_tensors.items()})
            if fragments:
                weights.update({FRAGMENTS_PREFIX + name: tensor for name, tensor in fragments.state_dict().items()})
            save_training_checkpoint(self.run_dir, weights, optimizer,
                                     dict(state.state_dict(), settings=self.settings, saved_at=time.time(),
                                          job_id=self.job_id, **extra))
        self.last_saved = time.time()

    def save_model(self, weights: dict[str, torch.Tensor], info: dict) -> None:
        """The finished run's model for users (RUN_DIR/checkpoint): weights and what is needed to use them."""
        if self.seat.rank == 0:
            save_checkpoint(self.run_dir / "checkpoint", weights, info)

    def _record_resume(self, state: TrainState, event: dict, now: float) -> None:
        last_alive = event.pop("last_alive", None)
        restarted = event["event"] == "restart" and last_alive is not None
        event["recovery_seconds"] = round(now - last_alive, 3) if restarted else None
        event["time"] = now
        state.log.append(event)
        if self.seat.rank == 0:
            append_metrics(self.run_dir, event)
            if restarted:
                say(f"distvision: recovered in {event['recovery_seconds']:.1f} s after a membership change "
                    f"(world size {event['old_world_size'] or '?'} -> {event['new_world_size']}), resumed at "
                    f"step {event['step']}, {event.get('seconds_lost', 0):.1f} s of work redone")
