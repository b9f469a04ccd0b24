"""Synchronisation modes, throughput balancing and stopping on CIFAR-10, measured with `distvision train`.

Three experiments, each a set of real 2-worker runs, printed as tables:
  sync      synchronisation modes at the same epochs and global batch (--modes; allreduce and
            local-sgd:8 by default): test accuracy, images/s, communication seconds and bytes
            exchanged per worker
  balance   one of two workers slowed to half speed (--debug-slowdown 1:2): --balance even vs
            throughput: images/s and accuracy
  target    --target-accuracy 0.70: the epoch it stops at, against the per-epoch accuracies

    python benchmarks/sync_modes.py --data ../shared/datasets/cifar10-jpg --out /tmp/sync --only sync
    python benchmarks/sync_modes.py --out /tmp/sync-fastnet --only sync --model fastnet \
        --modes allreduce,local-sgd:4,local-sgd:8,local-sgd:epoch,powersgd
    python benchmarks/sync_modes.py --out /tmp/slow-links --only sync --modes allreduce,diloco:32:int4 --seed 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from distvision.checkpoint import list_training_checkpoints


def train(out: Path, data: Path, *flags: str) -> dict:
    if not (out / "summary.json").is_file():
        command = [sys.executable, "-m", "distvision", "train", "--data", str(data), "--out", str(out),
                   "--workers", "2", *flags]
        # A run cut short (a session's end, a killed job) goes on from its last checkpoint.
        resume = ["--resume"] if list_training_checkpoints(out) else []
        print(" ".join(command + resume), flush=True)
        subprocess.run(command + resume, check=True)
    summary = json.loads((out / "summary.json").read_text())
    summary["records"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                          if "epoch" in line and '"event"' not in line]
    return summary


MODE_FLAGS = {  # --modes names -> distvision train flags
    "allreduce": [],
    "powersgd": ["--compress", "powersgd"],
    "fp16": ["--compress", "fp16"],
}


def mode_flags(mode: str) -> list[str]:
    """Flags for one --modes entry: a MODE_FLAGS name, or local-sgd:K or diloco:K (K steps or `epoch`),
    either with :int8 or :int4 for --quantize, diloco also with :fN for --fragments N and :oT for --overlap
    T (diloco:32:int4:f4:o2)."""
    name, *rest = mode.split(":")
    if name in ("local-sgd", "diloco") and rest:
        every, *options = rest
        flags = ["--sync", name, "--sync-every", every]
        for option in options:
            flag = {"f": "--fragments", "o": "--overlap"}.get(option[0])
            flags += [flag, option[1:]] if flag else ["--quantize", option]
        return flags
    if mode not in MODE_FLAGS:
        raise SystemExit(f"sync_modes.py: unknown mode {mode!r}; use {', '.join(MODE_FLAGS)}, local-sgd:K[:int8|int4] "
                         "or diloco:K[:int8|int4][:fN][:oT]")
    return MODE_FLAGS[mode]


def sync_experiment(args) -> None:
    modes = args.modes.split(",")
    runs = {mode: train(args.out / mode.replace(":", "-"), args.data, "--model", args.model,
                        "--epochs", str(args.epochs), "--seed", str(args.seed), *mode_flags(mode))
            for mode in modes}
    print(f"\n| {args.model}, {args.epochs} epochs, seed {args.seed} | test accuracy | images/s "
          f"| communication s (per worker) | bytes exchanged (per worker) |")
    print("|---|---|---|---|---|")
    for name, s in runs.items():
        per_worker = [round(c) for c in s["communication_seconds"]]
        print(f"| {name} | {s['test_accuracy']:.4f} | {s['images_per_second']:.0f} | {per_worker} | "
              f"{s['bytes_exchanged'] / 2 / 1e6:.1f} MB |")
    if "allreduce" not in runs:
        return
    dense = runs.pop("allreduce")  # the table is printed: compare every other mode with it
    for name, s in runs.items():
        print(f"{name} against allreduce: communication time "
              f"{sum(dense['communication_seconds']) / max(sum(s['communication_seconds']), 1e-9):.1f}x less, "
              f"bytes {dense['bytes_exchanged'] / max(s['bytes_exchanged'], 1):.1f}x fewer, accuracy "
              f"{100 * (s['test_accuracy'] - dense['test_accuracy']):+.2f} points")


def balance_experiment(args) -> None:
    epochs = str(args.balance_epochs)
    batch = ["--batch-size", str(args.balance_batch_size)] if args.balance_batch_size else []
    runs = {mode: train(args.out / f"balance-{mode}", args.data, "--model", args.model, "--epochs", epochs,
                        "--debug-slowdown", "1:2", "--balance", mode, *batch) for mode in ("even", "throughput")}
    print(f"\n| worker 1 at half speed, {epochs} epochs | images/s | train seconds | test accuracy | batch shares |")
    print("|---|---|---|---|---|")
    for mode, s in runs.items():
        print(f"| --balance {mode} | {s['images_per_second']:.0f} | {s['train_seconds']:.0f} | "
              f"{s['test_accuracy']:.4f} | {s['batch_shares']} |")
    print(f"speed-up of throughput over even: "
          f"{runs['throughput']['images_per_second'] / runs['even']['images_per_second']:.2f}x")


def target_experiment(args) -> None:
    s = train(args.out / "target", args.data, "--model", args.model, "--epochs", str(args.epochs),
              "--target-accuracy", "0.70")
    accuracies = [round(r["test_accuracy"], 4) for r in s["records"]]
    print(f"\n--target-accuracy 0.70: stop_reason {s['stop_reason']} at epoch {s['stop_epoch']} "
          f"(step {s['stop_step']}); per-epoch test accuracy {accuracies}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/cifar10-jpg"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="caffe-quick")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--modes", default="allreduce,local-sgd:8",
                        help="sync experiment: comma-separated allreduce, powersgd, fp16, local-sgd:K or diloco:K "
                        "(K or epoch), those two with :int8 or :int4 for --quantize")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--balance-epochs", type=int, default=3)
    parser.add_argument("--balance-batch-size", type=int, help="global batch of the balance runs (default: the recipe's)")
    parser.add_argument("--only", choices=["sync", "balance", "target"], action="append")
    args = parser.parse_args()
    chosen = args.only or ["sync", "balance", "target"]
    for name in chosen:
        {"sync": sync_experiment, "balance": balance_experiment, "target": target_experiment}[name](args)


if __name__ == "__main__":
    main()
