"""One job per run folder (train) and per output folder (classify): a second one fails clearly, and the
folder is free again once the first lets go."""

from __future__ import annotations

from pathlib import Path

import pytest

from distvision.classify.settings import Outputs
from distvision.classify.work import lock_job
from distvision.errors import UserError
from distvision.training.checkpoints import lock_run_dir


def test_a_second_training_job_on_a_run_folder_is_refused(tmp_path: Path):
    first = lock_run_dir(tmp_path)
    with pytest.raises(UserError, match="another job is writing"):
        lock_run_dir(tmp_path)  # another open file: flock refuses it as it would another process
    first.close()
    lock_run_dir(tmp_path).close()


def test_a_second_classify_job_on_an_output_folder_is_refused(tmp_path: Path):
    outputs = Outputs(tmp_path / "out" / "predictions.csv")
    first = lock_job(outputs)
    with pytest.raises(UserError, match="another classify job is writing"):
        lock_job(outputs)
    assert lock_job(Outputs(tmp_path / "elsewhere" / "predictions.csv"))  # another folder is another job
    first.close()
    lock_job(outputs).close()
