"""Fault tolerance without processes: a corrupt checkpoint falls back to the one before (dead workers,
resumes at other world sizes, stopped peers and SIGTERM, with real processes: tests/e2e/test_elastic.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distvision.checkpoint import (
    list_training_checkpoints,
    load_latest_training_checkpoint,
    save_training_checkpoint,
)
from distvision.errors import UserError


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path: Path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    for step in (10, 20, 30):
        save_training_checkpoint(tmp_path, model.state_dict(), optimizer, {"step": step})
    assert [p.name for p in list_training_checkpoints(tmp_path)] == ["step-000000020", "step-000000030"]
    newest = list_training_checkpoints(tmp_path)[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-7])
    warnings = []
    _, _, state = load_latest_training_checkpoint(tmp_path, warn=warnings.append)
    assert state["step"] == 20 and "corrupt" in warnings[0]
    (list_training_checkpoints(tmp_path)[0] / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="every checkpoint"):
        load_latest_training_checkpoint(tmp_path, warn=warnings.append)
