"""What live membership costs when nothing fails: the default (live) against `--recovery restart`.

    python benchmarks/live_overhead.py --data ../shared/datasets/cifar10-jpg --model caffe-quick \
        --epochs 3 --pairs 2 [--train-fraction 0.5] [-- extra train flags]

Runs `distvision train --workers 2` in alternating pairs (live, restart, live, restart, ...) so a
machine whose speed drifts affects both alike, and prints per run: the wall time measured from the
outside (start-up and evaluation included), the training seconds, the steady img/s and the time spent
evaluating, as recorded in the run's summary and metrics, and the ratios of the medians. Nothing else
should run on the machine meanwhile. --json writes every number to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distvision.metrics import read_metrics

RECOVERIES = ("live", "restart")


def train(args: argparse.Namespace, recovery: str, out: Path) -> dict:
    command = [sys.executable, "-m", "distvision", "train", "--data", args.data, "--model", args.model,
               "--epochs", str(args.epochs), "--workers", "2", "--seed", str(args.seed),
               "--train-fraction", str(args.train_fraction), "--out", str(out), "--recovery", recovery,
               *args.extra]
    print(" ".join(command), flush=True)
    started = time.time()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - started
    summary = json.loads((out / "summary.json").read_text())
    records = read_metrics(out)
    return {"recovery": recovery, "wall_seconds": round(wall, 2),
            "train_seconds": round(summary["train_seconds"], 2),
            "images_per_second": round(summary["images_per_second"], 1),
            "eval_seconds": round(sum(r["eval_seconds"] for r in records), 2),
            "start_seconds": round(wall - summary["train_seconds"] - sum(r["eval_seconds"] for r in records), 2),
            "test_accuracy": summary["test_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="caffe-quick")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-fraction", type=float, default=1.0)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("extra", nargs="*", help="more train flags, after --")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="distvision-overhead-") as root:
        for pair in range(args.pairs):
            for recovery in RECOVERIES:
                run = train(args, recovery, Path(root) / f"{recovery}{pair}")
                runs.append(run)
                print(json.dumps(run), flush=True)
    medians = {recovery: {key: statistics.median(r[key] for r in runs if r["recovery"] == recovery)
                          for key in ("wall_seconds", "train_seconds", "images_per_second", "eval_seconds",
                                      "start_seconds")}
               for recovery in RECOVERIES}
    ratios = {"wall live/restart": medians["live"]["wall_seconds"] / medians["restart"]["wall_seconds"],
              "img/s live/restart": medians["live"]["images_per_second"] / medians["restart"]["images_per_second"]}
    print(json.dumps({"medians": medians, "ratios": {k: round(v, 3) for k, v in ratios.items()}}, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "medians": medians, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
