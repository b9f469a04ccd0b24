"""Many faults in one live run, each at an exact phase, against the same run undisturbed.

    python benchmarks/chaos.py --data ../shared/datasets/cifar10-jpg --model caffe-quick \
        --epochs 5 --train-fraction 0.2 --workers 3 --faults 24 [--json chaos.json]

First the undisturbed run (`distvision train --workers 3`, live membership, every sample audited); its
step count places the faults evenly between 5% and 90% of the run. Then the same run with one
`--debug-fault` per fault, cycling through the kinds and phases below and over the ranks: a SIGKILL
after a step, in the round's all-reduce, in the epoch's evaluation and while serving a healing peer;
a freeze of 3 s (SIGSTOP); a hang with the heartbeat alive (the launcher's watchdog kills it); a
SIGTERM to one replica (it leaves, and is respawned); a restart of the Lighthouse. A fault at a phase
fires at the first such phase from its step on (a heal fault: when that rank next serves a heal, which
may not happen). Printed: wall time, accuracy, the faults that fired, respawns, the survivors' stalls,
the rounds redone, and whether every sample was trained exactly once per epoch (the audit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from distvision.metrics import read_events

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import assert_each_epoch_covered_once  # the tests' own audit check

# (kind, phase), cycled; a fault's rank cycles too
SCHEDULE = [("kill", "step"), ("kill", "exchange"), ("stop", "step"), ("kill", "eval"), ("hang", "step"),
            ("term", "step"), ("kill", "heal"), ("lighthouse", "step")]


def fault_flags(total_steps: int, count: int, workers: int) -> list[str]:
    """`count` faults evenly over 5%..90% of the run's steps, kinds and ranks cycled."""
    first, last = int(total_steps * 0.05), int(total_steps * 0.9)
    flags = []
    for number in range(count):
        step = first + (last - first) * number // max(count - 1, 1)
        kind, phase = SCHEDULE[number % len(SCHEDULE)]
        rank = 0 if kind == "lighthouse" else number % workers
        flags += ["--debug-fault", f"{kind}:{rank}:{step}:{phase}"]
    return flags


def train(args: argparse.Namespace, out: Path, faults: list[str]) -> dict:
    command = [sys.executable, "-m", "distvision", "train", "--data", args.data, "--model", args.model,
               "--epochs", str(args.epochs), "--workers", str(args.workers), "--seed", str(args.seed),
               "--train-fraction", str(args.train_fraction), "--out", str(out), "--audit-samples",
               "--max-restarts", str(args.faults + 5), "--recovery", "live", *faults, *args.extra]
    print(" ".join(command), flush=True)
    started = time.time()
    run = subprocess.run(command, check=False, capture_output=True, text=True)
    wall = time.time() - started
    if run.returncode != 0:
        raise SystemExit(f"the run failed ({run.returncode}):\n{run.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    changes = [e for e in read_events(out) if e["event"] == "membership"]
    stalls = [e["stall_seconds"] for e in changes]
    try:
        assert_each_epoch_covered_once(out, summary["epochs"], summary["train_count"], whole_dataset=False)
        audit = "every sample once per epoch"
    except AssertionError as error:
        audit = f"FAILED: {error}"
    output = run.stdout + run.stderr
    joins = (out / "joins.jsonl").read_text().splitlines() if (out / "joins.jsonl").exists() else []
    return {"wall_seconds": round(wall, 1), "test_accuracy": summary["test_accuracy"],
            "steps": summary["stop_step"], "restarts": summary["restarts"],
            "faults_given": len(faults) // 2, "faults_fired": output.count("distvision: debug fault:"),
            "respawns": len(joins), "heal_failures": output.count("could not heal"),
            "watchdog_kills": output.count("has been on one step for"),
            "membership_changes": len(changes), "discarded_steps": sum(e["discarded_steps"] for e in changes),
            "stall_median": round(statistics.median(stalls), 2) if stalls else None,
            "stall_max": max(stalls) if stalls else None, "audit": audit,
            "summaries_written": output.count("distvision: test accuracy")}


@contextmanager
def _kept(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    yield str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="caffe-quick")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-fraction", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--faults", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--keep", help="run in a folder under this one, kept (default: a temporary one)")
    args, args.extra = parser.parse_known_args()
    with (tempfile.TemporaryDirectory(prefix="distvision-chaos-") if not args.keep
          else _kept(Path(args.keep))) as root:
        undisturbed = train(args, Path(root) / "undisturbed", [])
        print(json.dumps({"undisturbed": undisturbed}), flush=True)
        chaos = train(args, Path(root) / "chaos", fault_flags(undisturbed["steps"], args.faults, args.workers))
        print(json.dumps({"chaos": chaos}), flush=True)
    points = 100 * (chaos["test_accuracy"] - undisturbed["test_accuracy"])
    print(f"chaos: {chaos['faults_fired']} of {chaos['faults_given']} faults fired, {chaos['respawns']} respawns, "
          f"{chaos['discarded_steps']} steps redone, stall median {chaos['stall_median']} s max {chaos['stall_max']} s; "
          f"accuracy {chaos['test_accuracy']:.4f} vs {undisturbed['test_accuracy']:.4f} ({points:+.2f} points); "
          f"wall {chaos['wall_seconds']} s vs {undisturbed['wall_seconds']} s; audit: {chaos['audit']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"undisturbed": undisturbed, "chaos": chaos}, indent=1))


if __name__ == "__main__":
    main()
