"""`distvision classify`, top to bottom: the command that launches workers, and what each worker does.

Every worker loads the model, then claims chunks from the store's counter until none is left:
it decodes the next chunk in its thread pool while the model works on this one, and writes each
chunk's part atomically. When all workers are through, rank 0 merges the parts into the outputs.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from distvision.classify.inputs import ImageReader
from distvision.classify.report import (
    accuracy_report,
    merge_parts,
    throughput,
    write_errors,
    write_predictions,
)
from distvision.classify.settings import ClassifyConfig
from distvision.classify.work import (
    ChunkQueue,
    Plan,
    finished_chunks,
    load_plan,
    lock_job,
    settle_plan,
    write_part,
)
from distvision.errors import UserError
from distvision.fileio import write_json_atomic
from distvision.inference import InferenceModel, load_inference_model
from distvision.metrics import say
from distvision.parallel.group import leave_process_group
from distvision.parallel.launch import USER_ERROR_EXIT, start_workers

# Workers reach the final barrier up to one chunk apart; a peer that died is the agent's to notice.
BARRIER_TIMEOUT_SECONDS = 1800


def classify_command(config: ClassifyConfig, argv: list[str]) -> None:
    """What `distvision classify` runs: a worker under torchrun, else the local launcher."""
    config.validate()
    kept = f"finished chunks are kept in {config.outputs().parts}: run the same command again to continue"
    start_workers("classify", classify, config, lambda: plan_job(config, argv), workers=config.workers,
                  max_restarts=config.max_restarts, join_timeout=config.join_timeout, stopped_hint=kept,
                  failed_hint=kept)


def plan_job(config: ClassifyConfig, argv: list[str]) -> list[str]:
    """Before any worker starts: check the input and settle the plan; the workers' arguments."""
    from distvision.checkpoint import load_checkpoint
    from distvision.parallel.worker import pick_device

    launched_at = _process_started_at()  # start-up is measured from the user's command, imports included
    pick_device(config.device, config.workers)  # too few GPUs fails here, not in every worker
    # Bad input (checkpoint, input, leftover parts of another job) fails here, before any worker starts.
    _, info = load_checkpoint(Path(config.checkpoint))
    outputs = config.outputs()
    with lock_job(outputs):
        plan = settle_plan(config, info)
    done = len(finished_chunks(outputs))
    say(f"distvision: classifying {len(plan.data.paths)} files ({plan.data.kind} {plan.data.location}) in "
        f"{plan.chunk_count} chunks on {config.workers} worker(s)"
        + (f"; {done} chunk(s) already done, resuming" if done else ""))
    # The workers get the user's arguments; the plan is settled, so they resume it as it is.
    return [*argv, "--resume", "--planned", "--launched-at", repr(launched_at)]


def classify(config: ClassifyConfig) -> dict | None:
    """Classify as one worker (rank) of the job; return the summary on rank 0."""
    from distvision.parallel.worker import pick_device, set_worker_threads

    launched_at = config.launched_at or _process_started_at()
    device = pick_device(config.device)
    threads = set_worker_threads() if device.type == "cpu" else torch.get_num_threads()
    decode_threads = threads if config.decode_threads is None else config.decode_threads
    rank, world_size, store = join_workers()
    outputs = config.outputs()
    job_lock = lock_job(outputs) if rank == 0 else None  # noqa: F841 - held until this process exits
    plan = agree_on_plan(config, rank)
    model = load_inference_model(Path(config.checkpoint), device)
    if model.info["weights_sha256"] != plan.settings["checkpoint_sha256"]:
        raise UserError(f"checkpoint {config.checkpoint} changed while the job ran: rerun the command")

    # Rank 0 names the attempt and lists the chunks still to do; everyone works from that one list.
    shared = [repr(launched_at), time.time_ns(), sorted(set(range(plan.chunk_count)) - finished_chunks(outputs))]
    if dist.is_initialized():
        dist.broadcast_object_list(shared, src=0)
    launch, attempt, pending = shared
    queue = ChunkQueue(dist.PrefixStore(f"distvision-classify/{attempt}", store), pending)
    reader = ImageReader(plan.data, model.image_size, decode_threads)
    ready_at = time.time()
    chunk = queue.claim()
    decoding = reader.start(plan.chunk_items(chunk)) if chunk is not None else None
    try:
        while chunk is not None:
            # Claim and start decoding the next chunk first, so it decodes while the model runs.
            next_chunk = queue.claim()
            next_decoding = reader.start(plan.chunk_items(next_chunk)) if next_chunk is not None else None
            waited = time.perf_counter()
            images = reader.finish(decoding)
            decode_wait = time.perf_counter() - waited
            rows = predict_top_k(model, images.images, config.batch_size, plan.settings["top_k"])
            write_part(outputs, chunk, {
                "chunk": chunk, "rank": rank, "world_size": world_size, "launch": launch, "attempt": attempt,
                "worker_ready_at": ready_at, "finished_at": time.time(), "decode_wait_seconds": decode_wait,
                "images": len(images.items), "unreadable": len(images.errors),
                "rows": [[item, top, probabilities] for item, (top, probabilities) in zip(images.items, rows)],
                "errors": images.errors,
            })
            if config.debug_chunk_delay and config.debug_slow_rank in (None, rank):
                time.sleep(config.debug_chunk_delay)
            chunk, decoding = next_chunk, next_decoding
    finally:
        reader.close()

    if dist.is_initialized():
        dist.barrier()
    summary = None
    if rank == 0:
        summary = finish(plan, config, model, launch, launched_at, world_size, threads, decode_threads)
    leave_process_group(barrier=False)
    return summary


@torch.inference_mode()
def predict_top_k(model: InferenceModel, images, batch_size: int, top_k: int) -> list[tuple[list[int], list[float]]]:
    """(top-k class indices, their softmax probabilities) per image, in batches of batch_size."""
    results = []
    for start in range(0, len(images), batch_size):
        probabilities = torch.softmax(model.logits(images[start : start + batch_size]), dim=1)
        values, indices = probabilities.topk(top_k, dim=1)
        results += zip(indices.tolist(), values.tolist())
    return results


def join_workers() -> tuple[int, int, dist.Store]:
    """(rank, world size, the rendezvous store) of the group torchrun set up; a private store when alone."""
    if "RANK" not in os.environ:
        return 0, 1, dist.HashStore()
    timeout = datetime.timedelta(seconds=BARRIER_TIMEOUT_SECONDS)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    # gloo whatever the device: the workers exchange only a few control messages.
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    return rank, world_size, store


def agree_on_plan(config: ClassifyConfig, rank: int) -> Plan:
    """Every rank works from the plan in parts/: rank 0 settles it unless the launcher just did.

    Under torchrun rank 0 scans the input (a restarted or joining worker cannot tell itself from a
    new start, so --no-resume only counts on the first attempt); an error there reaches every rank.
    """
    outputs = config.outputs()
    problem = [None]
    if rank == 0 and not config.planned:
        from distvision.checkpoint import load_checkpoint

        try:
            _, info = load_checkpoint(Path(config.checkpoint))
            first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            settle_plan(config, info, fresh_start_allowed=first_attempt)
        except UserError as error:
            problem = [str(error)]
    if dist.is_initialized():
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        if rank == 0:
            raise UserError(problem[0])
        sys.exit(USER_ERROR_EXIT)
    try:
        return load_plan(outputs)
    except UserError:
        raise UserError(f"rank {rank} cannot read {outputs.parts}: --out must be on a file system every node "
                        "shares") from None


def finish(plan: Plan, config: ClassifyConfig, model: InferenceModel, launch: str, launched_at: float,
           world_size: int, threads: int, decode_threads: int) -> dict:
    """Rank 0: merge the parts into the outputs and write summary.json."""
    outputs = config.outputs()
    merged = merge_parts(plan, outputs)
    write_predictions(outputs.predictions, plan, merged)
    write_errors(outputs.errors, plan, merged)
    accuracy = accuracy_report(plan, merged, outputs)
    speed = throughput(merged.parts, launch)
    finished_at = time.time()
    end_to_end = finished_at - launched_at
    summary = {
        "checkpoint": str(Path(config.checkpoint).resolve()),
        "model": model.info["model"],
        "input": plan.data.location,
        "input_kind": plan.data.kind,
        "predictions": str(outputs.predictions.resolve()),
        "files": len(plan.data.paths),
        "images": len(merged.rows),
        "unreadable": len(merged.errors),
        "chunks": plan.chunk_count,
        "chunks_this_run": speed["chunks_this_run"],
        "images_this_run": speed["images_this_run"],
        "workers": world_size,
        "threads_per_worker": threads,
        "decode_threads_per_worker": decode_threads,
        "device": model.device.type,
        "precision": model.precision,
        "test_time_flip": model.test_time_flip,
        "test_time_shift": model.test_time_shift,
        "batch_size": config.batch_size,
        "chunk_size": plan.settings["chunk_size"],
        "top_k": plan.settings["top_k"],
        "steady_state_images_per_second": speed["steady_state_images_per_second"],
        "end_to_end_images_per_second": speed["images_this_run"] / end_to_end,
        # From the command's start until every worker was ready to classify (processes, imports,
        # rendezvous, model), then until the last part was written, and until the outputs were.
        "startup_seconds": speed["all_ready_at"] - launched_at if speed["all_ready_at"] else None,
        "classify_seconds": (speed["last_finished_at"] - speed["first_ready_at"]) if speed["first_ready_at"] else None,
        "end_to_end_seconds": end_to_end,
        "decode_wait_seconds": speed["decode_wait_seconds"],
    }
    if accuracy:
        summary.update(accuracy)
    write_json_atomic(outputs.summary, summary)
    line = (f"distvision: classified {len(merged.rows)} images ({len(merged.errors)} unreadable, listed in "
            f"{outputs.errors}) in {end_to_end:.1f}s")
    if summary["steady_state_images_per_second"]:
        line += f", {summary['steady_state_images_per_second']:.0f} img/s steady state"
    if accuracy:
        line += f"; accuracy {accuracy['accuracy']:.4f} on {accuracy['labelled_images']} labelled images"
    say(f"{line}; predictions in {outputs.predictions}")
    return summary


def _process_started_at() -> float:
    """When this process started, from /proc (the launcher's own imports count as start-up too)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()
