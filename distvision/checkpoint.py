"""Checkpoints: safetensors weights plus a JSON of everything needed to use them.

Written atomically (a temp folder renamed into place) and checksummed, so a torn or edited
checkpoint is detected on load instead of silently used. Never pickles.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distvision.errors import UserError
from distvision.fileio import sha256_file, write_json_atomic

WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "checkpoint.json"


def save_checkpoint(folder: Path, state: dict[str, torch.Tensor], info: dict) -> None:
    """Write weights and info into folder, replacing any earlier checkpoint there atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    save_file(tensors, tmp / WEIGHTS_FILE)
    info = dict(info, weights_sha256=sha256_file(tmp / WEIGHTS_FILE))
    write_json_atomic(tmp / INFO_FILE, info)
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
    if info.get("weights_sha256") != sha256_file(folder / WEIGHTS_FILE):
        raise UserError(f"checkpoint {folder / WEIGHTS_FILE} is corrupt (checksum mismatch)")
    try:
        weights = load_file(folder / WEIGHTS_FILE)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(f"checkpoint {folder / WEIGHTS_FILE} is unreadable: {error}") from None
    return weights, info


# ------------------------------------------------------------------ resumable training checkpoints
# RUN_DIR/checkpoints/step-<step>/ holds weights, optimizer state and a state.json with the
# position in the data (epoch and global sample cursor), so a run continues exactly, at any world
# size. The newest KEEP_TRAINING_CHECKPOINTS are kept; a corrupt newest one falls back to the older.

KEEP_TRAINING_CHECKPOINTS = 2
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into safetensors-able tensors and JSON-able rest."""
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Load what optimizer_to_tensors split (the tensors and the JSON-able rest) into optimizer."""
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for group in optimizer.param_groups:  # keep the buffers in the parameters' memory format
        for parameter in group["params"]:
            buffer = optimizer.state.get(parameter, {}).get("momentum_buffer")
            if buffer is not None:
                optimizer.state[parameter]["momentum_buffer"] = torch.empty_like(parameter).copy_(buffer)


def save_training_checkpoint(run_dir: Path, model_state: dict[str, torch.Tensor],
                             optimizer: torch.optim.Optimizer, state: dict) -> Path:
    """Write checkpoints/step-N atomically, then drop all but the newest two."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['step']:09d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}, tmp / WEIGHTS_FILE)
    optimizer_tensors, optimizer_meta = optimizer_to_tensors(optimizer)
    save_file(optimizer_tensors, tmp / OPTIMIZER_FILE)
    for name in (WEIGHTS_FILE, OPTIMIZER_FILE):
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())
    record = dict(state, optimizer=optimizer_meta,
                  sha256={name: sha256_file(tmp / name) for name in (WEIGHTS_FILE, OPTIMIZER_FILE)})
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_training_checkpoints(run_dir)[:-KEEP_TRAINING_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_training_checkpoints(run_dir: Path) -> list[Path]:
    """Complete training checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def _read_training_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        for name, expected in state["sha256"].items():
            if sha256_file(folder / name) != expected:
                raise ValueError(f"{name} checksum mismatch")
        return load_file(folder / WEIGHTS_FILE), load_file(folder / OPTIMIZER_FILE), state
    except Exception as error:  # noqa: BLE001 - any damage (missing file, bad JSON, bad tensor) means unusable
        raise ValueError(f"{folder.name}: {error}") from None


def newest_checkpoint_settings(run_dir: Path) -> dict | None:
    """The settings recorded with the newest training checkpoint, if it is readable (a damaged one is
    found and skipped by the workers, which verify checksums)."""
    for folder in reversed(list_training_checkpoints(run_dir)):
        try:
            return json.loads((folder / STATE_FILE).read_text())["settings"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def load_latest_training_checkpoint(run_dir: Path, warn=print) -> tuple[dict, dict, dict] | None:
    """(weights, optimizer tensors, state) of the newest intact checkpoint; None when there is none."""
    candidates = list_training_checkpoints(run_dir)
    problems = []
    for folder in reversed(candidates):
        try:
            loaded = _read_training_checkpoint(folder)
        except ValueError as error:
            problems.append(str(error))
            warn(f"distvision: warning: checkpoint {folder} is corrupt ({error}); trying the one before")
            continue
        return loaded
    if problems:
        raise UserError(f"every checkpoint in {Path(run_dir) / 'checkpoints'} is corrupt: {'; '.join(problems)}")
    return None


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, state: dict) -> None:
    optimizer_from_tensors(optimizer, tensors, state["optimizer"])
