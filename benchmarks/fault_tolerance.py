"""What a dead worker costs, on the restart path and the live path (torchft), in one sitting.

    python benchmarks/fault_tolerance.py --data ../shared/datasets/cifar10-jpg --model caffe-quick \
        --epochs 10 --kill-every 60 --recovery undisturbed,live,restart [--sync diloco --sync-every 32]

For each entry of --recovery it runs `distvision train --workers 2` (undisturbed: live with no kill)
and SIGKILLs one worker every --kill-every seconds of the run (--kills caps the count; the first kill
waits for the first epoch's record). Printed per run: effective throughput (epochs x training images /
wall seconds, start-up, evaluation and recoveries included), test accuracy, and per kill:
- live: the survivor's stall, from the kill to its next committed step (the first membership event
  after the kill), and the respawned worker's time from its start to its first committed step;
- restart: the recovery time distvision measured (last sign of life to the first step after it)
  and the work redone.
--json writes every number to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distvision.metrics import read_events, read_metrics
from distvision.procfs import local_worker_pids


def worker_pids(run: subprocess.Popen, out: Path, recovery: str) -> list[int]:
    if recovery == "restart":
        return list(local_worker_pids(run.pid).values())
    try:
        return list(json.loads((out / "workers.json").read_text()).values())
    except (OSError, ValueError):
        return []


def train(args: argparse.Namespace, recovery: str, root: Path, rng: random.Random) -> dict:
    out = root / recovery
    command = [sys.executable, "-m", "distvision", "train", "--data", args.data, "--model", args.model,
               "--epochs", str(args.epochs), "--workers", "2", "--seed", str(args.seed), "--out", str(out),
               "--train-fraction", str(args.train_fraction), "--max-restarts", str(args.kills + 2),
               "--recovery", "restart" if recovery == "restart" else "live", *args.extra]
    print(" ".join(command), flush=True)
    started = time.time()
    run = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL)
    kills = []
    while run.poll() is None and not ((out / "metrics.jsonl").exists() and read_metrics(out)):
        time.sleep(0.2)
    next_kill = time.time() + args.kill_every * rng.uniform(0.5, 1.0)
    while recovery != "undisturbed" and run.poll() is None and len(kills) < args.kills:
        time.sleep(0.05)
        pids = worker_pids(run, out, recovery)
        if time.time() < next_kill or len(pids) < 2:
            continue
        victim = rng.choice(pids)
        kills.append(time.time())
        os.kill(victim, signal.SIGKILL)
        next_kill = kills[-1] + args.kill_every
    run.wait()
    wall = time.time() - started
    summary = json.loads((out / "summary.json").read_text())
    result = {"recovery": recovery, "exit_status": run.returncode, "wall_seconds": round(wall, 1),
              "images_per_second": round(summary["epochs"] * summary["train_count"] / wall, 1),
              "test_accuracy": summary["test_accuracy"], "kills": len(kills),
              "bytes_exchanged": summary["bytes_exchanged"]}
    events = read_events(out)
    if recovery == "restart":
        result["recovery_seconds"] = [e["recovery_seconds"] for e in events if e["event"] == "restart"]
        result["seconds_redone"] = [e.get("seconds_lost") for e in events if e["event"] == "restart"]
    else:
        changes = [e for e in events if e["event"] == "membership"]
        # The survivor's stall: from each kill to the first step committed after it.
        result["stall_seconds"] = [round(min(e["time"] for e in changes if e["time"] > kill) - kill, 3)
                                   for kill in kills if any(e["time"] > kill for e in changes)]
        joins = (out / "joins.jsonl").read_text().splitlines() if (out / "joins.jsonl").exists() else []
        result["join_seconds"] = [json.loads(line)["seconds"] for line in joins]
    return result


def describe(result: dict, reference: dict | None) -> str:
    lines = [(f"{result['recovery']}: exit {result['exit_status']}, {result['kills']} kill(s), wall "
              f"{result['wall_seconds']} s, {result['images_per_second']} img/s effective, test accuracy "
              f"{result['test_accuracy']:.4f}, {result['bytes_exchanged'] / 1e6:.1f} MB exchanged")]
    if reference and result is not reference:
        ratio = result["images_per_second"] / reference["images_per_second"]
        lines.append(f"  against undisturbed: throughput {ratio:.3f}x, "
                     f"accuracy {100 * (result['test_accuracy'] - reference['test_accuracy']):+.2f} points")
    for key in ("stall_seconds", "join_seconds", "recovery_seconds", "seconds_redone"):
        values = [v for v in result.get(key, []) if v is not None]
        if values:
            lines.append(f"  {key}: median {statistics.median(values):.2f}, max {max(values):.2f} over "
                         f"{len(values)}: {values}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="caffe-quick")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-fraction", type=float, default=1.0)
    parser.add_argument("--recovery", default="undisturbed,live,restart",
                        help="runs, in order: undisturbed (live, no kill), live, restart")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills")
    parser.add_argument("--kills", type=int, default=100, help="at most this many kills per run")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the kills use --kill-seed)")
    parser.add_argument("--kill-seed", type=int, default=1)
    parser.add_argument("--out", help="folder for the runs (default: a temporary one)")
    parser.add_argument("--json", help="write the results here")
    args, args.extra = parser.parse_known_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="distvision-faults-"))
    results = [train(args, recovery, root, random.Random(args.kill_seed)) for recovery in args.recovery.split(",")]
    reference = next((r for r in results if r["recovery"] == "undisturbed"), None)
    print("\n" + "\n".join(describe(result, reference) for result in results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
