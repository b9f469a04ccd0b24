"""Checkpoints: safetensors weights plus a JSON of everything needed to use them.

Written atomically (a temp folder renamed into place) and checksummed, so a torn or edited
checkpoint is detected on load instead of silently used. Never pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distvision.errors import UserError

WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "checkpoint.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(folder: Path, state: dict[str, torch.Tensor], info: dict) -> None:
    """Write weights and info into folder, replacing any earlier checkpoint there atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    save_file(tensors, tmp / WEIGHTS_FILE)
    info = dict(info, weights_sha256=_sha256(tmp / WEIGHTS_FILE))
    with open(tmp / INFO_FILE, "w") as f:
        json.dump(info, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load (weights, info) from a checkpoint folder or a run folder holding one; verify the checksum."""
    folder = Path(path)
    if (folder / "checkpoint" / INFO_FILE).is_file():
        folder = folder / "checkpoint"
    if not (folder / INFO_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{path} holds no checkpoint ({INFO_FILE} and {WEIGHTS_FILE} expected)")
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except ValueError as error:
        raise UserError(f"checkpoint info {folder / INFO_FILE} is corrupt: {error}") from None
    if info.get("weights_sha256") != _sha256(folder / WEIGHTS_FILE):
        raise UserError(f"checkpoint {folder / WEIGHTS_FILE} is corrupt (checksum mismatch)")
    try:
        weights = load_file(folder / WEIGHTS_FILE)
    except Exception as error:  # safetensors raises its own error types
        raise UserError(f"checkpoint {folder / WEIGHTS_FILE} is unreadable: {error}") from None
    return weights, info
