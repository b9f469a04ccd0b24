"""fastnet's record recipe on CIFAR-10: seeds, worker counts and an ablation, with `distvision train`.

    python benchmarks/fastnet_recipe.py --out /tmp/fastnet --seeds 0,1,2 --workers 2,1
    python benchmarks/fastnet_recipe.py --out /tmp/fastnet-ablation --ablation --seeds 0,1 --workers 1 \
        -- --precision bf16     # flags after -- go to every `distvision train` (one --out per set)

Every run is a real `distvision train --model fastnet` with the default recipe; runs already in
--out are read, not repeated. Prints a table per worker count (test accuracy with and without
test-time augmentation, wall seconds, images/s) with the mean and spread over seeds, and with
--ablation one row per trick switched off (`--no-NAME`) with its accuracy per seed, the mean and
the difference from the full recipe, at the given epochs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from distvision.checkpoint import list_training_checkpoints
from distvision.recipes import TRICK_SWITCHES


def train(out: Path, data: Path, *flags: str) -> dict:
    if not (out / "summary.json").is_file():
        command = [sys.executable, "-m", "distvision", "train", "--data", str(data), "--out", str(out),
                   "--model", "fastnet", *flags]
        print(" ".join(command), flush=True)
        subprocess.run(command + (["--resume"] if list_training_checkpoints(out) else []), check=True)
    return json.loads((out / "summary.json").read_text())


def row(name: str, s: dict) -> str:
    return (f"| {name} | {100 * s['test_accuracy']:.2f} | {100 * s['test_accuracy_without_tta']:.2f} | "
            f"{s['wall_seconds']:.0f} | {s['images_per_second']:.0f} |")


def ablation_row(name: str, runs: list[dict], full_mean: float | None) -> str:
    accuracies = [100 * s["test_accuracy"] for s in runs]
    mean = statistics.mean(accuracies)
    change = "" if full_mean is None else f"{mean - full_mean:+.2f}"
    plain = statistics.mean(100 * s["test_accuracy_without_tta"] for s in runs)
    return f"| {name} | {' | '.join(f'{a:.2f}' for a in accuracies)} | {mean:.2f} | {change} | {plain:.2f} |"


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/cifar10-jpg"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--workers", default="2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--ablation", action="store_true", help="also one run per trick switched off")
    parser.add_argument("train_flags", nargs="*", help="after --: more flags for every `distvision train`")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    header = "| run | test accuracy % | without TTA % | wall s | images/s |\n|---|---|---|---|---|"
    for workers in args.workers.split(","):
        runs = {seed: train(args.out / f"w{workers}-s{seed}", args.data, "--workers", workers, "--seed", str(seed),
                            "--epochs", str(args.epochs), *args.train_flags) for seed in seeds}
        print(f"\nfastnet, default recipe, {args.epochs} epochs, {workers} worker(s)\n{header}")
        for seed, s in runs.items():
            print(row(f"seed {seed}", s))
        print(f"mean over seeds {seeds}: test accuracy "
              f"{spread([100 * s['test_accuracy'] for s in runs.values()])}%, wall "
              f"{spread([s['wall_seconds'] for s in runs.values()])} s")
        if args.ablation:
            seed_columns = " | ".join(f"seed {seed}" for seed in seeds)
            print(f"\nablation, {args.epochs} epochs, {workers} worker(s)\n"
                  f"| run | {seed_columns} | mean | vs full recipe | mean without TTA |\n"
                  f"|{'---|' * (len(seeds) + 4)}")
            full = list(runs.values())
            print(ablation_row("full recipe", full, None))
            full_mean = statistics.mean(100 * s["test_accuracy"] for s in full)
            for trick in [name for name in TRICK_SWITCHES if name != "tta"]:  # TTA: the "without" column
                off = [train(args.out / f"w{workers}-s{seed}-no-{trick}", args.data, "--workers", workers,
                             "--seed", str(seed), "--epochs", str(args.epochs), f"--no-{trick}", *args.train_flags)
                       for seed in seeds]
                print(ablation_row(f"--no-{trick}", off, full_mean))


if __name__ == "__main__":
    main()
