"""distvision tune and train's config files: bad search spaces and settings are refused in one line, before
anything is written (real studies of real trials: tests/e2e/test_tune.py)."""

from __future__ import annotations

import pytest

from distvision.cli import main
from tests.helpers import tune_args

BAD_SPACES = [
    ("[lr]\ntype = 'log'\nlow = 0.1\nhigh = 0.01\n", "bad range, low (0.1) must be below high (0.01)"),
    ("[learning_rate]\ntype = 'log'\nlow = 0.001\nhigh = 0.1\n", "[learning_rate] is not a recipe setting"),
    ("[lr]\ntype = 'normal'\n", "type must be one of int, float, log, categorical"),
    ("[lr]\ntype = 'log'\nlow = 0.0\nhigh = 0.1\n", "a log setting needs low > 0"),
    ("[batch_size]\ntype = 'float'\nlow = 10\nhigh = 20\n", "batch_size is an integer setting"),
    ("[momentum]\ntype = 'float'\nlow = 0.5\nhigh = 1.5\n", "1.5 is out of range for momentum"),
    ("[flip]\ntype = 'categorical'\nchoices = [1, 2]\n", "1 is not a valid flip"),
    ("[lr]\ntype = 'log'\nlow = 0.001\nhigh = 0.1\nstep = 0.01\n", "log settings take none"),
    ("[lr\n", "not valid TOML"),
]


@pytest.mark.parametrize("space, message", BAD_SPACES)
def test_bad_search_space_is_one_line_error(space, message, tiny_images, tmp_path, capsys):
    (tmp_path / "space.toml").write_text(space)
    with pytest.raises(SystemExit) as exit_status:  # the CLI's own entry point, in this process
        main(tune_args(tiny_images, tmp_path / "search", "--space", str(tmp_path / "space.toml")))
    stderr = capsys.readouterr().err
    assert exit_status.value.code == 2
    assert stderr.startswith("distvision: error: --space") and stderr.count("\n") == 1
    assert message in stderr
    assert not (tmp_path / "search").exists()  # refused before anything was written


def test_train_config_file_rejects_unknown_settings(tiny_images, tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("learning_rate = 0.1\n")
    with pytest.raises(SystemExit) as exit_status:
        main(["train", "--config", str(tmp_path / "bad.toml"), "--data", str(tiny_images)])
    stderr = capsys.readouterr().err
    assert exit_status.value.code == 2 and stderr.count("\n") == 1
    assert "unknown setting 'learning_rate'" in stderr


def test_train_config_file_values_are_defaults_that_flags_override(tmp_path):
    from distvision.cli import build_parser
    from distvision.config import read_config_file

    (tmp_path / "best.toml").write_text('lr = 0.5\nepochs = 3\nrecipe_settings = ["flip=true"]\n')
    argv = ["train", "--config", str(tmp_path / "best.toml"), "--lr", "0.1", "--set", "translate=2"]
    args = build_parser(read_config_file(tmp_path / "best.toml")).parse_args(argv)
    assert (args.lr, args.epochs, args.recipe_settings) == (0.1, 3, ["flip=true", "translate=2"])


def test_a_synchronisation_train_would_refuse_is_refused_before_any_trial(tiny_images, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(tune_args(tiny_images, tmp_path / "search", "--workers-per-trial", "2", "--quantize", "int4"))
    stderr = capsys.readouterr().err
    assert exit_status.value.code == 2 and stderr.count("\n") == 1 and "--quantize" in stderr, stderr
    assert not (tmp_path / "search").exists()
