"""`distvision train-each`: one independent model per data subset, many trained at once.

Every subset is an ordinary `distvision train` run in EACH_DIR/<subset>/, started as a child
process pinned to its share of the cores. No communication between the runs: the only shared state
is the output folder, where a claim file with a renewed lease says who trains a subset now, so
that several `train-each` processes (machines on a shared file system, or array jobs) split the
subsets between them and take over the subsets of a process that died.

Flow: find and prepare the subsets -> (optionally) the union for a global model -> a pool of
`--parallel` slots runs the jobs, largest first -> subsets.csv, summary.json and a comparison plot
(train_each_report.py).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from distvision.checkpoint import list_training_checkpoints
from distvision.config import TrainConfig
from distvision.data.prepare import file_lock
from distvision.data.subsets import GLOBAL_NAME, Subset, find_subsets, write_union
from distvision.errors import UserError
from distvision.fileio import write_json_atomic
from distvision.leases import Claim, try_claim
from distvision.metrics import say
from distvision.parallel.child import core_share, gpu_share, local_gpu_count, start_training
from distvision.train_each_report import add_global_accuracy, collect_rows, plot_comparison, write_outputs

WAIT_POLL_SECONDS = 2.0  # how often a process with nothing to claim looks again


@dataclass
class PoolSettings:
    parallel: int
    workers_per_job: int
    lease_seconds: float
    train_config: TrainConfig  # every subset's `distvision train` settings, but its data, run folder and workers
    cores: list[int] = field(default_factory=lambda: sorted(os.sched_getaffinity(0)))
    gpu_count: int = field(default_factory=local_gpu_count)  # each slot's jobs get GPUs of their own


@dataclass
class Job:
    subset: Subset
    run_dir: Path

    @property
    def name(self) -> str:
        return self.subset.name


def train_each(data: Path, out: Path, settings: PoolSettings, image_size: int, cache_dir: Path | None,
               compare_global: bool = False, only: str | None = None, only_index: int | None = None) -> int:
    """Train every (selected) subset; return the exit status: 0 when all of them are trained."""
    started = time.time()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / ".data.lock"):  # several train-each processes may start at once
        subsets = find_subsets(data, out / ".data", image_size, cache_dir)
        trainable = [s for s in subsets if s.problem is None]
        union = write_union(trainable, out / ".data" / GLOBAL_NAME) if compare_global and trainable else None
    for subset in subsets:
        for note in subset.notes:
            say(f"train-each: {subset.name}: {note}")
        if subset.problem:
            say(f"train-each: {subset.name}: not trained: {subset.problem}")
    # Stable job order for --only-index (the same on every machine): subsets by name, the global model last.
    everything = [Job(s, out / s.name) for s in subsets] + ([Job(union, out / GLOBAL_NAME)] if union else [])
    selected = _select(everything, only, only_index)
    jobs = sorted((j for j in selected if j.subset.problem is None), key=lambda j: -j.subset.samples)
    say(f"train-each: {len(jobs)} job(s), {settings.parallel} at once on {len(settings.cores)} core(s), "
        f"{settings.workers_per_job} worker(s) each; outputs in {out}")
    pool_started = time.time()
    failed = run_pool(jobs, settings, out)
    pool_seconds = time.time() - pool_started
    rows = collect_rows([j.subset for j in everything if j.subset.problem is None], out)
    if union and (out / GLOBAL_NAME / "summary.json").is_file():
        add_global_accuracy(rows, trainable, out / GLOBAL_NAME, union.data)
        plot_comparison(rows, out / "comparison.png")
    write_outputs(out, rows, subsets, failed, time.time() - started, pool_seconds)
    problems = [j for j in selected if j.subset.problem]
    return 1 if failed or problems else 0


def _select(jobs: list[Job], only: str | None, only_index: int | None) -> list[Job]:
    if only is not None:
        chosen = [j for j in jobs if j.name == only]
        if not chosen:
            raise UserError(f"--only {only}: no such subset (have: {', '.join(j.name for j in jobs)})")
        return chosen
    if only_index is not None:
        if not 0 <= only_index < len(jobs):
            raise UserError(f"--only-index {only_index}: there are {len(jobs)} jobs (0..{len(jobs) - 1})")
        return [jobs[only_index]]
    return jobs


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def run_pool(jobs: list[Job], settings: PoolSettings, out: Path) -> list[str]:
    """Run the jobs in `parallel` slots, claiming each first; return the names of jobs that failed here."""
    pending = list(jobs)
    failed: list[str] = []
    busy = [False] * settings.parallel
    lock = threading.Lock()

    def next_job(slot: int) -> tuple[Job, Claim] | None:
        while True:
            with lock:
                for job in list(pending):
                    if is_finished(job.run_dir):
                        pending.remove(job)
                        continue
                    claim = try_claim(out / ".claims" / f"{job.name}.claim", settings.lease_seconds)
                    if claim is None:
                        continue  # another process trains it now; look again later
                    if is_finished(job.run_dir):  # finished between the check and the claim
                        claim.release()
                        pending.remove(job)
                        continue
                    pending.remove(job)
                    busy[slot] = True
                    return job, claim
                if not pending:
                    return None
            time.sleep(WAIT_POLL_SECONDS)  # the rest are claimed elsewhere: wait for them or their lease

    def slot_cores(slot: int) -> list[int]:
        with lock:
            others_idle = not pending and not any(b for i, b in enumerate(busy) if i != slot)
        if others_idle:  # nothing left for the other slots: this job may take every core
            return settings.cores
        return core_share(settings.cores, slot, settings.parallel)

    def slot_loop(slot: int) -> None:
        while (taken := next_job(slot)) is not None:
            job, claim = taken
            try:
                gpus = gpu_share(slot, settings.gpu_count, settings.workers_per_job)
                if not run_job(job, claim, slot_cores(slot), settings, out, gpus):
                    failed.append(job.name)
            finally:
                claim.release()
                with lock:
                    busy[slot] = False

    threads = [threading.Thread(target=slot_loop, args=(slot,), daemon=True) for slot in range(settings.parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failed


def run_job(job: Job, claim: Claim, cores: list[int], settings: PoolSettings, out: Path,
            gpus: Sequence[int] = ()) -> bool:
    """Train one subset in a child `distvision train` (on `cores`, and `gpus` on a CUDA machine), renewing
    the claim; True when it finished."""
    config = replace(settings.train_config, data=str(job.subset.data), out=str(job.run_dir),
                     workers=settings.workers_per_job,
                     # A run someone began (perhaps a process that died): continue it.
                     resume=bool(list_training_checkpoints(job.run_dir)))
    started = time.time()
    child = start_training(config, out / ".logs" / f"{job.name}.log", cores, gpus=gpus)
    last_renewal = time.time()
    while child.poll() is None:
        time.sleep(0.5)
        if time.time() - last_renewal >= settings.lease_seconds / 4:
            last_renewal = time.time()
            if not claim.renew():
                say(f"train-each: {job.name}: lost its claim to another process; stopping here")
                child.stop()
                return False
    seconds = time.time() - started
    if child.returncode != 0 or not is_finished(job.run_dir):
        say(f"train-each: {job.name}: training failed (exit {child.returncode}): "
            f"{child.last_log_line('no output')} (log: {child.log_path})")
        return False
    record = {"host": socket.gethostname(), "cores": len(cores), "seconds": round(seconds, 2),
              "core_seconds": round(seconds * len(cores), 2), "finished_at": time.time()}
    write_json_atomic(job.run_dir / "train-each.json", record)
    summary = json.loads((job.run_dir / "summary.json").read_text())
    say(f"train-each: {job.name} done: test_acc {summary['test_accuracy']:.4f}, {summary['epochs']} epochs, "
        f"{seconds:.0f}s on {len(cores)} core(s), {record['host']}")
    return True
