"""Same machine, same seed, two source trees: do they train the same?

    # run the scenarios with the code of a tree (e.g. a worktree of the commit before a refactor)
    python benchmarks/behaviour_check.py run --tree /tmp/before --out /tmp/check-before
    python benchmarks/behaviour_check.py run --tree . --out /tmp/check-after
    # per-epoch test accuracies and the final weights, tensor by tensor
    python benchmarks/behaviour_check.py compare /tmp/check-before /tmp/check-after
    # training speed, the two trees alternating (steady-state img/s from summary.json; run nothing beside it)
    python benchmarks/behaviour_check.py speed --before /tmp/before --after . --repeats 3

A refactor that changes nothing a user can see passes with identical accuracies and bit-identical
final weights in every scenario. Precision is fixed to fp32 so that `--precision auto`'s measurement
cannot pick differently between the two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

# The restart path (DDP) explicitly: several local workers run live membership by default.
CAFFE = ["--model", "caffe-quick", "--workers", "2", "--epochs", "2", "--seed", "0", "--precision", "fp32",
         "--recovery", "restart"]
FASTNET = ["--model", "fastnet", "--workers", "2", "--epochs", "1", "--train-fraction", "0.2", "--seed", "0",
           "--precision", "fp32", "--recovery", "restart"]
LOCAL_SGD = ["--sync", "local-sgd"]
# name -> list of commands run one after the other into the same run folder
SCENARIOS = {
    "caffe-allreduce": [CAFFE],
    "caffe-local-sgd": [CAFFE + LOCAL_SGD],
    "fastnet-allreduce": [FASTNET],
    "fastnet-local-sgd": [FASTNET + LOCAL_SGD],
    # A stop in the first epoch (at the first exchange of votes from step 300 on), then --resume.
    "caffe-stop-resume": [CAFFE + ["--debug-stop-at-step", "300"], CAFFE + ["--resume"]],
}


def run(tree: Path, out: Path, data: str, only: list[str] | None) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
    for name, commands in SCENARIOS.items():
        if only and name not in only:
            continue
        run_dir = out / name
        for arguments in commands:
            command = [sys.executable, "-m", "distvision", "train", "--data", data, "--out", str(run_dir),
                       *arguments]
            print(" ".join(command), flush=True)
            subprocess.run(command, env=env, check=True, cwd=tree)


def accuracies(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [record["test_accuracy"] for record in records if "event" not in record]


def compare(before: Path, after: Path) -> bool:
    same = True
    for name in SCENARIOS:
        if not (before / name).exists() or not (after / name).exists():
            print(f"{name}: missing in one of the two folders")
            same = False
            continue
        accuracy_before, accuracy_after = accuracies(before / name), accuracies(after / name)
        weights_before = load_file(before / name / "checkpoint" / "model.safetensors")
        weights_after = load_file(after / name / "checkpoint" / "model.safetensors")
        differing = [key for key in weights_before
                     if key not in weights_after or not weights_before[key].equal(weights_after[key])]
        differing += [key for key in weights_after if key not in weights_before]
        ok = accuracy_before == accuracy_after and not differing
        same &= ok
        print(f"{name}: {'SAME' if ok else 'DIFFERENT'}  accuracies before {accuracy_before} after "
              f"{accuracy_after}; {len(weights_before)} tensors, {len(differing)} differ"
              + (f" ({', '.join(differing[:5])})" if differing else ""))
    return same


SPEED_RUN = ["--model", "caffe-quick", "--workers", "2", "--epochs", "3", "--train-fraction", "0.3", "--seed", "0"]


def speed(before: Path, after: Path, data: str, repeats: int) -> None:
    """Steady-state training img/s of both trees, alternating, on the same settings; medians and ratio."""
    rates: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="distvision-speed-") as scratch:
        for repeat in range(repeats):
            for name, tree in (("before", before), ("after", after)):
                out = Path(scratch) / f"{name}-{repeat}"
                command = [sys.executable, "-m", "distvision", "train", "--data", data, "--out", str(out),
                           *SPEED_RUN]
                subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(tree.resolve())), check=True,
                               cwd=tree, stdout=subprocess.DEVNULL)
                rates[name].append(json.loads((out / "summary.json").read_text())["images_per_second"])
                print(f"repeat {repeat + 1} {name}: {rates[name][-1]:.0f} img/s", flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{' '.join(SPEED_RUN)}: median before {medians['before']:.0f}, after {medians['after']:.0f} img/s, "
          f"after/before {medians['after'] / medians['before']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("--tree", type=Path, required=True, help="source tree whose distvision to run")
    run_parser.add_argument("--out", type=Path, required=True)
    run_parser.add_argument("--data", default=str(Path("../shared/datasets/cifar10-jpg").resolve()))
    run_parser.add_argument("--only", nargs="*", choices=list(SCENARIOS))
    compare_parser = commands.add_parser("compare")
    compare_parser.add_argument("before", type=Path)
    compare_parser.add_argument("after", type=Path)
    speed_parser = commands.add_parser("speed")
    speed_parser.add_argument("--before", type=Path, required=True)
    speed_parser.add_argument("--after", type=Path, required=True)
    speed_parser.add_argument("--repeats", type=int, default=3)
    speed_parser.add_argument("--data", default=str(Path("../shared/datasets/cifar10-jpg").resolve()))
    args = parser.parse_args()
    if args.command == "run":
        run(args.tree, args.out, args.data, args.only)
    elif args.command == "speed":
        speed(args.before, args.after, args.data, args.repeats)
    else:
        sys.exit(0 if compare(args.before, args.after) else 1)


if __name__ == "__main__":
    main()
