"""Synchronisation modes, throughput balancing and stopping on CIFAR-10, measured with `distvision train`.

Three experiments, each a set of real 2-worker runs, printed as tables:
  sync      allreduce vs local-sgd (K=8 by default) at the same epochs and global batch:
            test accuracy, images/s, communication seconds and bytes exchanged per worker
  balance   one of two workers slowed to half speed (--debug-slowdown 1:2): --balance even vs
            throughput: images/s and accuracy
  target    --target-accuracy 0.70: the epoch it stops at, against the per-epoch accuracies

    python benchmarks/sync_modes.py --data ../shared/datasets/cifar10-jpg --out /tmp/sync --only sync
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def train(out: Path, data: Path, *flags: str) -> dict:
    if not (out / "summary.json").is_file():
        command = [sys.executable, "-m", "distvision", "train", "--data", str(data), "--out", str(out),
                   "--workers", "2", *flags]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
    summary = json.loads((out / "summary.json").read_text())
    summary["records"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                          if "epoch" in line and '"event"' not in line]
    return summary


def sync_experiment(args) -> None:
    runs = {
        "allreduce": train(args.out / "allreduce", args.data, "--model", args.model, "--epochs", str(args.epochs)),
        f"local-sgd K={args.every}": train(args.out / f"local-{args.every}", args.data, "--model", args.model,
                                           "--epochs", str(args.epochs), "--sync", "local-sgd",
                                           "--sync-every", args.every),
    }
    print(f"\n| {args.model}, {args.epochs} epochs | test accuracy | images/s | communication s (per worker) "
          f"| bytes exchanged (per worker) |")
    print("|---|---|---|---|---|")
    for name, s in runs.items():
        per_worker = [round(c) for c in s["communication_seconds"]]
        print(f"| {name} | {s['test_accuracy']:.4f} | {s['images_per_second']:.0f} | {per_worker} | "
              f"{s['bytes_exchanged'] / 2 / 1e6:.1f} MB |")
    dense, local = runs["allreduce"], runs[f"local-sgd K={args.every}"]
    print(f"communication time ratio {sum(dense['communication_seconds']) / sum(local['communication_seconds']):.1f}x, "
          f"bytes ratio {dense['bytes_exchanged'] / local['bytes_exchanged']:.1f}x, accuracy difference "
          f"{100 * (local['test_accuracy'] - dense['test_accuracy']):+.2f} points")


def balance_experiment(args) -> None:
    epochs = str(args.balance_epochs)
    runs = {mode: train(args.out / f"balance-{mode}", args.data, "--model", args.model, "--epochs", epochs,
                        "--debug-slowdown", "1:2", "--balance", mode) for mode in ("even", "throughput")}
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
    parser.add_argument("--every", default="8")
    parser.add_argument("--balance-epochs", type=int, default=3)
    parser.add_argument("--only", choices=["sync", "balance", "target"], action="append")
    args = parser.parse_args()
    chosen = args.only or ["sync", "balance", "target"]
    for name in chosen:
        {"sync": sync_experiment, "balance": balance_experiment, "target": target_experiment}[name](args)


if __name__ == "__main__":
    main()
