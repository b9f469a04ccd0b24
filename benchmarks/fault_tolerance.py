"""Kill workers of a running `distvision train` at random moments; report recovery and accuracy.

    python benchmarks/fault_tolerance.py --data ../shared/datasets/cifar10-jpg --model caffe-quick \
        --epochs 10 --kills 3 [--reference runs/undisturbed/summary.json]

Each kill is a SIGKILL of one worker process; the local elastic agent restarts the group, which
resumes from its latest checkpoint. Printed per kill: the recovery time distvision measured (last
sign of life before the kill to the first trained step after it) and the work redone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distvision.metrics import read_events, read_metrics
from distvision.procfs import local_worker_pids


def heartbeat_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "heartbeat.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="caffe-quick")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="training seed (the kills use --kill-seed)")
    parser.add_argument("--kill-seed", type=int, default=1)
    parser.add_argument("--reference", help="summary.json of an undisturbed run with the same settings")
    parser.add_argument("--out", help="run folder (default: a temporary one)")
    args = parser.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="distvision-faults-")) / "run"
    command = [sys.executable, "-m", "distvision", "train", "--data", args.data, "--model", args.model,
               "--epochs", str(args.epochs), "--workers", str(args.workers), "--seed", str(args.seed),
               "--out", str(out), "--max-restarts", str(args.kills + 2)]
    print(" ".join(command), flush=True)
    started = time.time()
    run = subprocess.Popen(command, start_new_session=True)
    rng = random.Random(args.kill_seed)
    # Spread the kills over the run: wait for the first epoch to pass, then kill at random steps.
    # metrics.jsonl exists from the start; the first epoch record says the first epoch is over.
    while run.poll() is None and not ((out / "metrics.jsonl").exists() and read_metrics(out)):
        time.sleep(1)
    steps_per_epoch = heartbeat_step(out)
    total_steps = steps_per_epoch * args.epochs
    kill_steps = sorted(rng.sample(range(steps_per_epoch + 1, int(total_steps * 0.9)), args.kills))
    for kill_step in kill_steps:
        while run.poll() is None and heartbeat_step(out) < kill_step:
            time.sleep(0.2)
        workers = local_worker_pids(run.pid)
        if run.poll() is not None or not workers:
            break
        victim = rng.choice(sorted(workers))
        os.kill(workers[victim], signal.SIGKILL)
        print(f"killed local rank {victim} (pid {workers[victim]}) near step {heartbeat_step(out)}", flush=True)
        # Let it recover before the next kill is scheduled.
        before = len(read_events(out)) if (out / "metrics.jsonl").exists() else 0
        while run.poll() is None and len(read_events(out)) <= before:
            time.sleep(0.5)
    run.wait()
    wall = time.time() - started
    summary = json.loads((out / "summary.json").read_text())
    print(f"\nexit status {run.returncode}, wall {wall:.0f} s, restarts {summary['restarts']}")
    for event in read_events(out):
        print(f"  {event['event']}: world {event['old_world_size']} -> {event['new_world_size']} at step "
              f"{event['step']}, recovery {event['recovery_seconds']} s, work redone {event.get('seconds_lost')} s")
    print(f"test accuracy {summary['test_accuracy']:.4f}")
    if args.reference:
        reference = json.loads(Path(args.reference).read_text())
        print(f"undisturbed reference {reference['test_accuracy']:.4f}: difference "
              f"{100 * (summary['test_accuracy'] - reference['test_accuracy']):+.2f} points")


if __name__ == "__main__":
    main()
