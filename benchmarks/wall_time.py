"""A whole `distvision train` run's wall time against the time its epochs take at a bare loop's speed.

The core issue's check: with the data already prepared, a 10-epoch run (start, evaluations and the
end included) should take at most 15% longer than 10 epochs of the bare single-process loop of
throughput.py (same model, global batch, augmentation; the faster of fp32 and bf16). This project's
VMs change speed by 2x within minutes, so a bare figure taken once and a run taken later compare
two machines. Here every run sits between two bare loops of the same length, taken just before and
just after it, and is set against their mean:

    bare 0, run 1, bare 1, run 2, bare 2, ...   ratio_i = wall(run i) / mean(bare i-1, bare i)

    python benchmarks/wall_time.py --data ../shared/datasets/cifar10-jpg --model caffe-quick --epochs 10

A round of caffe-quick takes about 10 minutes on 2 cores (fastnet: about an hour).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import IMAGE_SIZE, WORKERS, bare_loop  # the benchmark beside this one

from distvision.data.prepare import ensure_prepared, open_prepared
from distvision.models.registry import recipe_for
from distvision.precision import cpu_model_name

ALLOWED = 1.15  # the bound: at most 15% over the bare loop's time
PROBE_STEPS = 20  # bare-loop steps per precision that pick the faster one


def faster_precision(prepared, model: str, batch_size: int) -> tuple[str, dict[str, float]]:
    """The faster of fp32 and bf16 for the bare loop, from a short run of each."""
    speeds = {precision: bare_loop(prepared, model, batch_size, PROBE_STEPS * batch_size, precision)
              for precision in ("fp32", "bf16")}
    return max(speeds, key=speeds.get), speeds


def bare_seconds(prepared, model: str, batch_size: int, epochs: int, precision: str) -> float:
    """Seconds the bare loop takes for `epochs` passes over the training set (its start excluded)."""
    images = epochs * len(prepared.train_images)
    return images / bare_loop(prepared, model, batch_size, images, precision)


def distvision_seconds(data: str, model: str, epochs: int, out: Path) -> tuple[float, dict]:
    """Wall seconds of `distvision train` with its defaults, from process start to exit, and its summary."""
    command = [sys.executable, "-m", "distvision", "train", "--data", data, "--model", model,
               "--workers", str(WORKERS), "--epochs", str(epochs), "--out", str(out)]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-20:])
        sys.exit(f"benchmark: distvision train failed (exit status {completed.returncode}):\n{tail}")
    return seconds, json.loads((out / "summary.json").read_text())


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    prepared = open_prepared(ensure_prepared(Path(args.data), IMAGE_SIZE))  # before any timing starts
    batch_size = recipe_for(args.model).batch_size
    precision, probe = faster_precision(prepared, args.model, batch_size)
    print(f"{cpu_model_name()}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}; "
          f"{args.model}, global batch {batch_size}, {len(prepared.train_images)} training images, "
          f"{args.epochs} epochs; bare loop in {precision} "
          f"({', '.join(f'{p} {v:.0f}' for p, v in probe.items())} img/s)", flush=True)
    bare = [bare_seconds(prepared, args.model, batch_size, args.epochs, precision)]
    print(f"bare 0: {bare[0]:.1f} s", flush=True)
    rounds = []
    for index in range(1, args.repeats + 1):
        wall, summary = distvision_seconds(args.data, args.model, args.epochs, scratch / f"run-{index}")
        bare.append(bare_seconds(prepared, args.model, batch_size, args.epochs, precision))
        around = (bare[-2] + bare[-1]) / 2
        metrics = (scratch / f"run-{index}" / "metrics.jsonl").read_text().splitlines()
        epochs = [json.loads(line) for line in metrics]  # kept in the JSON, to see where the time went
        training, evaluation = summary["train_seconds"], sum(record.get("eval_seconds", 0.0) for record in epochs)
        rounds.append({"wall_seconds": wall, "bare_before": bare[-2], "bare_after": bare[-1],
                       "ratio": wall / around, "test_accuracy": summary["test_accuracy"],
                       "train_seconds": training, "eval_seconds": evaluation,
                       "precision": summary["precision"], "epochs": epochs})
        print(f"run {index}: {wall:.1f} s wall ({training:.1f} s training, {evaluation:.1f} s evaluating, "
              f"{wall - training - evaluation:.1f} s starting and ending; {summary['precision']}, "
              f"test accuracy {summary['test_accuracy']:.4f}); bare {index}: {bare[-1]:.1f} s; "
              f"ratio to the bare time around it {rounds[-1]['ratio']:.3f}", flush=True)
    return {"cpu": cpu_model_name(), "torch": torch.__version__, "model": args.model, "epochs": args.epochs,
            "global_batch_size": batch_size, "bare_precision": precision, "bare_seconds": bare,
            "rounds": rounds, "median_ratio": statistics.median(r["ratio"] for r in rounds)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="data source or prepared folder (as for distvision train)")
    parser.add_argument("--model", default="caffe-quick", help="registered model name (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each run (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="distvision runs, each between two bare loops")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="distvision-walltime-") as scratch:
        results = measure(args, Path(scratch))
    ratio = results["median_ratio"]
    print(f"median ratio {ratio:.3f} over {args.repeats} run(s): "
          f"{'within' if ratio <= ALLOWED else 'OVER'} the {ALLOWED - 1:.0%} allowed")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
