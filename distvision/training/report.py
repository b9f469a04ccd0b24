"""What a run tells its user: per-epoch records (metrics.jsonl and a console line), summary.json at the
end, and TensorBoard event files (RUN_DIR/tensorboard) when the optional `tensorboard` package is
installed. Rank 0 writes; records hold only globally reduced numbers, identical on every rank."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from distvision.config import TrainConfig
from distvision.evaluate import EvalResult
from distvision.fileio import write_json_atomic
from distvision.metrics import append_metrics, epoch_line, say
from distvision.parallel.membership import Seat
from distvision.parallel.sync import Synchronizer
from distvision.recipes import Recipe
from distvision.training.state import TrainState

TENSORBOARD_SCALARS = ("train_loss", "test_loss", "test_accuracy", "val_loss", "val_accuracy",
                       "images_per_second", "epoch_seconds", "eval_seconds", "lr")


def communication_by_worker(sync: Synchronizer, epoch_seconds: float, seat: Seat,
                            allreduce: Callable[[torch.Tensor], bool], data_seconds: float = 0.0) -> dict:
    """Each worker's compute, communication and data seconds and bytes this epoch (then reset): lists by rank.

    Compute is everything but communication, so it includes the data seconds (batch gathering and
    augmentation), which are also given on their own. A collective through the membership: every
    participant calls it (a failed one leaves the others' figures 0).
    """
    rank, world_size = seat.rank, seat.participants
    mine = torch.zeros(4 * world_size, dtype=torch.float64)
    communication = sync.stats.communication_seconds
    mine[rank] = max(epoch_seconds - communication, 0.0)
    mine[world_size + rank] = communication
    mine[2 * world_size + rank] = sync.stats.bytes_exchanged
    mine[3 * world_size + rank] = data_seconds
    own = mine.clone()
    if not allreduce(mine):
        mine = own
    sync.stats.communication_seconds, sync.stats.bytes_exchanged = 0.0, 0
    values = mine.view(4, world_size).tolist()
    return {"compute_seconds": [round(v, 3) for v in values[0]],
            "communication_seconds": [round(v, 3) for v in values[1]],
            "bytes_exchanged": [int(v) for v in values[2]],
            "data_seconds": [round(v, 3) for v in values[3]]}


def _per_worker_sum(history: list[dict], key: str, world_size: int) -> list[float] | None:
    """Per worker, summed over epochs; None when the world size changed during the run."""
    if not all(len(record.get(key, [])) == world_size for record in history):
        return None
    return [sum(record[key][i] for record in history) for i in range(world_size)]


class Reporter:
    def __init__(self, config: TrainConfig, run_dir: Path, seat: Seat, started: float):
        self.config, self.run_dir, self.seat = config, run_dir, seat
        self.started = started  # the process's time.time() at the start of train(): wall_seconds counts from it
        self._tensorboard = None
        if seat.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional: metrics.jsonl holds the same numbers
                pass
            else:
                self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def epoch_record(self, state: TrainState, test: EvalResult, val: EvalResult | None, lr: float,
                     eval_seconds: float, workers: dict) -> dict:
        """The epoch's line of metrics.jsonl (state still holds the epoch's counts)."""
        record = {
            "epoch": state.epoch + 1,
            "train_loss": state.epoch_loss / max(state.epoch_samples, 1),
            "test_loss": test.loss,
            "test_accuracy": test.accuracy,
            "images_per_second": state.epoch_samples / state.epoch_seconds,
            "epoch_seconds": state.epoch_seconds,
            "world_size": self.seat.participants,
            "lr": lr,
        }
        if val is not None:
            record.update(val_loss=val.loss, val_accuracy=val.accuracy)
        record["eval_seconds"] = eval_seconds
        record.update(workers)
        return record

    def epoch_done(self, record: dict) -> None:
        if self.seat.rank != 0:
            return
        append_metrics(self.run_dir, record)
        say(epoch_line(record))
        if self._tensorboard:
            for key in TENSORBOARD_SCALARS:
                if key in record:
                    self._tensorboard.add_scalar(key, record[key], record["epoch"])
            self._tensorboard.flush()

    def summary(self, state: TrainState, recipe: Recipe, final: EvalResult, plain: EvalResult,
                stop_reason: str | None, facts: dict) -> dict | None:
        """Write summary.json (rank 0) and return it. `facts` are the run's set-up: precision, data, shares."""
        if self.seat.rank != 0:
            return None
        history = state.history()
        steady = history[1:] or history  # the first epoch carries one-off costs
        config = self.config
        summary = {
            "model": config.model,
            "recipe_name": config.recipe,
            "recipe": recipe.to_dict(),
            "precision": facts["precision"],
            "precision_choice": facts["precision_choice"],
            "epochs": len(history),
            "world_size": self.seat.participants,
            "threads_per_worker": facts["threads_per_worker"],
            "device": facts["device"],
            "global_batch_size": recipe.batch_size,
            "train_count": facts["train_count"],
            "val_count": facts["val_count"],
            "test_accuracy": final.accuracy,
            "test_loss": final.loss,
            "test_accuracy_without_tta": plain.accuracy,  # the same weights, one plain view per image
            "best_test_accuracy": max([r["test_accuracy"] for r in history] + [final.accuracy]),
            "val_accuracy": history[-1].get("val_accuracy") if history else None,
            "images_per_second": sum(r["images_per_second"] * r["epoch_seconds"] for r in steady)
            / max(sum(r["epoch_seconds"] for r in steady), 1e-9),
            "train_seconds": state.train_seconds,
            "wall_seconds": time.time() - self.started,
            "stop_reason": stop_reason or "max_epochs",
            "stop_epoch": len(history),
            "stop_step": state.step,
            "sync": {"mode": config.sync, "every": config.period, "warmup": config.sync_warmup,
                     "compress": config.compress, "balance": config.balance, "quantize": config.quantize,
                     "fragments": config.fragments, "overlap": config.overlap,
                     # this replica's rounds whose exchange overlapped their last steps (--overlap)
                     "overlapped_rounds": facts["overlapped_rounds"]},
            # Per worker and summed over epochs; seconds blocked in collectives include waiting for peers.
            "compute_seconds": _per_worker_sum(history, "compute_seconds", self.seat.participants),
            "communication_seconds": _per_worker_sum(history, "communication_seconds", self.seat.participants),
            "bytes_exchanged": sum(sum(r.get("bytes_exchanged", [])) for r in history),
            "batch_shares": facts["batch_shares"],
            "restarts": sum(1 for r in state.log if r.get("event") == "restart"),
            # Live membership (parallel/live_membership.py): quorum changes and the steps they discarded (redone).
            "recovery": config.recovery,
            "membership_changes": sum(1 for r in state.log if r.get("event") == "membership"),
            "discarded_steps": sum(r.get("discarded_steps", 0) for r in state.log if r.get("event") == "membership"),
            "skipped_files": facts["skipped_files"],
            "data": facts["data"],
            "prepared_data": facts["prepared_data"],
            "data_on_device": facts["data_on_device"],
            "config": config.to_dict(),
        }
        write_json_atomic(self.run_dir / "summary.json", summary)
        say(f"distvision: test accuracy {final.accuracy:.4f} after {len(history)} epochs, "
            f"{summary['images_per_second']:.0f} img/s, {summary['wall_seconds']:.0f}s wall; "
            f"outputs in {self.run_dir}")
        self.close()
        return summary

    def close(self) -> None:
        if self._tensorboard:
            self._tensorboard.close()
            self._tensorboard = None
