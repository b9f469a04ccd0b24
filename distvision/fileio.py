"""Small file helpers shared by the data cache, checkpoints and run outputs."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, streamed (prepared arrays may be larger than RAM)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_json_atomic(path: Path, data: dict, durable: bool = True) -> None:
    """Temp file, fsync (unless not durable), rename: readers never see half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file, fsync, rename, as write_json_atomic, for text (e.g. a run's config.toml)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def hold_exclusive_lock(path: Path):
    """An open handle holding an exclusive lock on path (kept while the handle lives), or None if taken."""
    handle = open(path, "a")  # noqa: SIM115 - the caller keeps it open as long as it needs the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle
