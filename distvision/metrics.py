"""Run outputs: metrics.jsonl (one line per epoch), summary.json, and the console display."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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

    def update(self, loss: float | None = None) -> None:
        if self.bar:
            self.bar.update(1)
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
