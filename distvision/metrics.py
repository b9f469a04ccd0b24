"""Run outputs: metrics.jsonl (one line per epoch), summary.json, and the console display."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def rewrite_log(run_dir: Path, records: list[dict]) -> None:
    """Replace metrics.jsonl with these records (on resume: the log as the checkpoint knew it)."""
    tmp = run_dir / f"metrics.jsonl.{os.getpid()}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, run_dir / "metrics.jsonl")


def read_log(run_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl: epoch records and events."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run_dir: Path) -> list[dict]:
    """The per-epoch records of metrics.jsonl (events left out)."""
    return [r for r in read_log(run_dir) if "event" not in r]


def read_events(run_dir: Path) -> list[dict]:
    """The event lines of metrics.jsonl (restarts, resumes)."""
    return [r for r in read_log(run_dir) if "event" in r]


def say(message: str) -> None:
    """A line for the user, from rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


class Progress:
    """A progress bar on rank 0 when attached to a terminal; silent otherwise (epoch lines suffice)."""

    def __init__(self, total_steps: int, description: str):
        self.bar = None
        if int(os.environ.get("RANK", "0")) == 0 and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc=description, leave=False, dynamic_ncols=True)

    def update(self, loss: float | None = None, steps: int = 1) -> None:
        if self.bar:
            self.bar.update(steps)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def epoch_line(record: dict) -> str:
    parts = [f"epoch {record['epoch']:>3}", f"train_loss {record['train_loss']:.4f}"]
    if "val_accuracy" in record:
        parts.append(f"val_acc {record['val_accuracy']:.4f}")
    parts += [
        f"test_acc {record['test_accuracy']:.4f}",
        f"{record['images_per_second']:.0f} img/s",
        f"{record['epoch_seconds']:.1f}s",
    ]
    return "  ".join(parts)
