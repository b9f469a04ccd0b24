"""The job's plan, its chunks, how workers claim them, and the part file each chunk leaves.

parts/plan.json fixes the job: the items in row order, the chunk size and everything else that
decides a part's content, with a fingerprint of it all. A rerun scans the input again and resumes
only when the fingerprint matches, so parts written for another input, checkpoint or setting are
never mixed in. parts/chunk-NNNNNNNNN.json holds one chunk's results, written atomically: a part
that exists is complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from distvision.classify.inputs import ClassifyInput, find_input
from distvision.classify.settings import ClassifyConfig, Outputs
from distvision.errors import UserError
from distvision.fileio import hold_exclusive_lock, write_json_atomic

PLAN_FILE = "plan.json"
LOCK_FILE = "classify.lock"
PART_PREFIX = "chunk-"


@dataclass
class Plan:
    settings: dict  # what decides the parts besides the items: checkpoint, image size, chunk size, top-k
    data: ClassifyInput
    fingerprint: str

    @property
    def chunk_count(self) -> int:
        size = self.settings["chunk_size"]
        return -(-len(self.data.paths) // size)

    def chunk_items(self, chunk: int) -> range:
        size = self.settings["chunk_size"]
        return range(chunk * size, min((chunk + 1) * size, len(self.data.paths)))

    def to_dict(self) -> dict:
        return {"settings": self.settings, "data": self.data.to_dict(), "fingerprint": self.fingerprint}


def make_plan(config: ClassifyConfig, checkpoint_info: dict) -> Plan:
    """Scan the input and fix the job's settings and chunks."""
    data = find_input(Path(config.input), checkpoint_info["classes"], checkpoint_info["image_size"],
                      skip=config.outputs().own_files())
    settings = {
        "checkpoint_sha256": checkpoint_info["weights_sha256"],
        "classes": checkpoint_info["classes"],
        "image_size": checkpoint_info["image_size"],
        "top_k": min(config.top_k, len(checkpoint_info["classes"])),
        "chunk_size": config.chunk_size,
        "input": data.location,
    }
    return Plan(settings, data, _fingerprint(settings, data))


def _fingerprint(settings: dict, data: ClassifyInput) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(json.dumps([data.paths, data.sources, data.labels]).encode())
    return digest.hexdigest()


def load_plan(outputs: Outputs) -> Plan:
    try:
        raw = json.loads((outputs.parts / PLAN_FILE).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{outputs.parts / PLAN_FILE} is unreadable ({error}): rerun with --no-resume") from None
    return Plan(raw["settings"], ClassifyInput(**raw["data"]), raw["fingerprint"])


def lock_job(outputs: Outputs):
    """Hold an exclusive lock on the output folder's parts (until closed or the process ends), so two
    jobs never write one set of results."""
    outputs.parts.mkdir(parents=True, exist_ok=True)
    handle = hold_exclusive_lock(outputs.parts / LOCK_FILE)
    if handle is None:
        raise UserError(f"another classify job is writing {outputs.parts}; give this one its own --out folder")
    return handle


def settle_plan(config: ClassifyConfig, checkpoint_info: dict, fresh_start_allowed: bool = True) -> Plan:
    """The plan for this run: a new one, or the one the existing parts were written under (resume).

    Call it holding lock_job. With --no-resume (and fresh_start_allowed) earlier parts are deleted
    first; resuming parts written for another input, checkpoint or setting is refused.
    """
    outputs = config.outputs()
    plan = make_plan(config, checkpoint_info)
    has_plan = (outputs.parts / PLAN_FILE).is_file()
    if has_plan and config.resume is False and fresh_start_allowed:
        has_plan = False
    if has_plan:
        old_plan = load_plan(outputs)
        if old_plan.fingerprint != plan.fingerprint:
            changed = [key for key in plan.settings if old_plan.settings.get(key) != plan.settings[key]]
            what = ", ".join(changed) if changed else "the input's files"
            raise UserError(f"the parts in {outputs.parts} were written for another job ({what} changed): "
                            "rerun with --no-resume to start over, or choose another --out")
    else:
        for old in outputs.parts.glob(f"{PART_PREFIX}*.json"):  # parts of another plan: unusable
            old.unlink()
        write_json_atomic(outputs.parts / PLAN_FILE, plan.to_dict())
    return plan


def part_path(outputs: Outputs, chunk: int) -> Path:
    return outputs.parts / f"{PART_PREFIX}{chunk:09d}.json"


def finished_chunks(outputs: Outputs) -> set[int]:
    done = set()
    for path in outputs.parts.glob(f"{PART_PREFIX}*.json"):
        try:
            done.add(int(path.stem[len(PART_PREFIX):]))
        except ValueError:
            continue
    return done


def write_part(outputs: Outputs, chunk: int, record: dict) -> None:
    """A chunk's results, atomically (temp file, fsync, rename): a part that exists is complete."""
    write_json_atomic(part_path(outputs, chunk), record)


def read_part(outputs: Outputs, chunk: int) -> dict:
    path = part_path(outputs, chunk)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"part {path} is unreadable ({error}): delete it and rerun to redo that chunk") from None


class ChunkQueue:
    """Hands out the pending chunks, each once, to whichever worker asks first.

    The queue is a counter in the rendezvous store (torch's c10d TCPStore, the one the process
    group is built on): an atomic add hands each caller its own ticket. A fast worker comes back for
    tickets more often, so a slow one simply does fewer chunks.
    """

    def __init__(self, store: dist.Store, pending: list[int]):
        self.store = store
        self.pending = pending

    def claim(self) -> int | None:
        """The next chunk to do, or None when every chunk is taken."""
        ticket = self.store.add("next-chunk", 1) - 1
        return self.pending[ticket] if ticket < len(self.pending) else None
