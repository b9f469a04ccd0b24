"""train-each on CIFAR-10 split into four subsets with different class mixes, and the pool's efficiency.

The split is made of symlinked class folders (no image is copied):
  vehicles       airplane automobile ship truck   (20,000 training images)
  pets           cat dog                          (10,000)
  wild-animals   deer horse                       (10,000)
  birds-frogs    bird frog                        (10,000)
Then `distvision train-each --parallel 2 --compare-global` trains the four subset models and the
global model (the fifth job), and this script prints the comparison table and the pool's wall time
against the ideal: the jobs' total core-seconds divided by the cores.

    python benchmarks/train_each_cifar.py --data ../shared/datasets/cifar10-jpg --out /tmp/each --epochs 10
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

SUBSETS = {
    "vehicles": ["airplane", "automobile", "ship", "truck"],
    "pets": ["cat", "dog"],
    "wild-animals": ["deer", "horse"],
    "birds-frogs": ["bird", "frog"],
}


def make_split(cifar: Path, root: Path) -> Path:
    for subset, classes in SUBSETS.items():
        for split in ("train", "test"):
            folder = root / subset / split
            folder.mkdir(parents=True, exist_ok=True)
            for name in classes:
                link = folder / name
                if not link.exists():
                    link.symlink_to((cifar / split / name).resolve(), target_is_directory=True)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/cifar10-jpg"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="caffe-quick")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    root = make_split(args.data, args.out.with_name(args.out.name + "-subsets"))
    command = [sys.executable, "-m", "distvision", "train-each", "--data", str(root), "--out", str(args.out),
               "--parallel", str(args.parallel), "--compare-global", "--model", args.model,
               "--epochs", str(args.epochs)]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    summary = json.loads((args.out / "summary.json").read_text())
    with open(args.out / "subsets.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    print("\n| subset | classes | training images | subset model | global model | seconds |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        global_accuracy = f"{float(row['global_test_accuracy']):.4f}" if row["global_test_accuracy"] else "-"
        print(f"| {row['subset']} | {row['classes']} | {row['samples']} | {float(row['test_accuracy']):.4f} | "
              f"{global_accuracy} | {float(row['seconds']):.0f} |")
    ideal = summary["ideal_pool_seconds"]
    print(f"\npool {summary['pool_seconds']:.0f} s, ideal {ideal:.0f} s "
          f"({summary['job_core_seconds']:.0f} core-seconds / {summary['cores']} cores): "
          f"{summary['pool_seconds'] / ideal:.3f}x the ideal; whole command {summary['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
