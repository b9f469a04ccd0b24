"""The command line as a user meets it: every default in --help, --version, --print-config, the
run's config.toml that `--config` reads back, --workers auto, `distvision models`, outputs under runs/."""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from distvision import __version__
from distvision.cli import build_parser, main
from distvision.commands.train import check_before_launch, restarted_into_a_finished_run, runs_in_this_process
from distvision.config import TrainConfig, read_config_file
from distvision.data.prepare import prepare
from distvision.train import resolve_recipe

COMMANDS = ("train", "train-each", "prepare", "evaluate", "classify", "tune", "scale", "bench", "models")
# train-each replaces these train settings with its own (--workers-per-job; resuming every subset): no default.
NOT_USED = {("train-each", "--workers"), ("train-each", "--resume")}


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices


def help_blocks(text: str) -> dict[str, str]:
    """Each option's entry in --help output (its lines joined), by each of its option strings."""
    blocks, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            options = re.findall(r"(?:^|, )(-[-\w]+)", line.strip().split("  ")[0])
            current = " ".join(line.split())
            for option in options:
                blocks[option] = current
            names = options
        elif line.startswith("    ") and current is not None:
            current = f"{current} {' '.join(line.split())}"
            for option in names:
                blocks[option] = current
        else:
            current = None
    return blocks


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        main(argv)
    except SystemExit as exit_status:
        return exit_status.code or 0, capsys.readouterr().out
    return 0, capsys.readouterr().out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_with_a_default_shows_it_in_help(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # long lines: a default is never split across two
    status, text = run_main([command, "--help"], capsys)
    assert status == 0
    blocks = help_blocks(text)
    checked = 0
    for action in command_parsers()[command]._actions:
        if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
            continue
        option = action.option_strings[0]
        if (command, option) in NOT_USED:
            continue
        block = blocks[option]
        default = action.default
        spellings = {",".join(map(str, default)) if isinstance(default, list) else str(default)}
        if isinstance(default, float):
            spellings.add(f"{default:g}")  # 1 for 1.0
        assert "default" in block and any(spelling in block for spelling in spellings), \
            f"{command} {option}: no default {default} in {block!r}"
        checked += 1
    assert checked or command in ("models", "evaluate")  # these have no option with a default


def test_train_each_help_says_data_and_out_are_required(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    blocks = help_blocks(run_main(["train-each", "--help"], capsys)[1])
    assert "required" in blocks["--data"] and "download" not in blocks["--data"].replace("nothing is downloaded", "")
    assert "required" in blocks["--out"] and "runs/" not in blocks["--out"]
    assert "--workers-per-job" in blocks["--workers"]


def test_version(capsys):
    assert run_main(["--version"], capsys) == (0, f"distvision {__version__}\n")


FLAGS = ["--model", "mlp", "--epochs", "3", "--set", "cutout=4", "--no-ema", "--lr", "0.02", "--workers", "1",
         "--data", "somewhere", "--seed", "5"]


def test_print_config_prints_a_config_file_and_trains_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    status, printed = run_main(["train", *FLAGS, "--print-config"], capsys)
    assert status == 0
    assert sorted(os.listdir(tmp_path)) == []  # no run folder, no download, no prepared data
    # The output is a config file that trains the same run: `train --config FILE` gives the settings back.
    (tmp_path / "printed.toml").write_text(printed)
    from_file = TrainConfig(**read_config_file(tmp_path / "printed.toml"))
    expected = TrainConfig.from_argv(FLAGS)
    expected.recovery = "restart"  # resolved: one worker
    assert from_file == expected
    # Then what the settings come to here, as comments.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for line in ("# world size: 1 (local workers)", "# recovery: restart", f"# device: {device}",
                 "# precision: auto (measured once when training starts)", "#   epochs = 3", "#   cutout = 4",
                 "#   lr = 0.02", "#   ema_every = 0"):
        assert line in printed.splitlines(), line


def test_print_config_resolves_auto_workers(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = run_main(["train", "--workers", "auto", "--device", "cpu", "--print-config"], capsys)[1]
    assert f"workers = {len(os.sched_getaffinity(0))}" in printed.splitlines()


def test_train_each_print_config_shows_every_subsets_settings(capsys):
    status, printed = run_main(["train-each", "--model", "mlp", "--workers-per-job", "2", "--parallel", "3",
                                "--print-config"], capsys)
    assert status == 0
    lines = printed.splitlines()
    assert 'model = "mlp"' in lines and "workers = 2" in lines and "# subsets at once: 3, 2 worker(s) each" in lines


def test_a_run_folder_records_the_settings_that_train_it_again(tmp_path, tiny_images, monkeypatch):
    """What the train command does before it starts its workers: config.toml in the run folder, which
    `distvision train --config` reads back to the same settings; the workers get the same settings too."""
    monkeypatch.chdir(tmp_path)
    prepared = tmp_path / "prepared"
    prepare(tiny_images, prepared, 16, processes=1)
    user_argv = ["--model", "mlp", "--workers", "auto", "--device", "cpu", "--image-size", "16", "--epochs", "1",
                 "--set", "flip=false", "--data", str(prepared), "--out", str(tmp_path / "run")]
    config = TrainConfig.from_argv(user_argv)
    config.workers = config.resolved_workers(gpu_count=0, cores=2)
    config.recovery = config.resolved_recovery(under_torchrun=False)
    worker_argv = check_before_launch(config, resolve_recipe(config), tmp_path / "cache", user_argv)
    assert TrainConfig.from_argv(worker_argv) == config  # every worker runs the launcher's settings

    recorded = tmp_path / "run" / "config.toml"
    again = TrainConfig.from_namespace(build_parser(read_config_file(recorded)).parse_args(
        ["train", "--config", str(recorded)]))
    assert again.out is None and again.workers == 2 and again.recovery == "live"
    again.out = config.out
    assert again == config


def test_models_prints_a_table_or_json_lines(capsys):
    table = run_main(["models"], capsys)[1].splitlines()
    assert table[0].split() == ["model", "parameters", "MFLOPs/image", "epochs", "batch", "lr", "recipes",
                                "description"]
    row = next(line for line in table if line.startswith("caffe-quick "))
    assert row.split()[:7] == ["caffe-quick", "145,578", "24.7", "10", "100", "0.003", "default,caffe"]
    rows = [json.loads(line) for line in run_main(["models", "--json"], capsys)[1].splitlines()]
    quick = next(row for row in rows if row["name"] == "caffe-quick")
    assert quick["parameters"] == 145578 and set(quick["recipes"]) == {"default", "caffe"}
    assert quick["recipes"]["default"]["epochs"] == 10


def test_outputs_go_under_runs_by_default():
    from distvision.bench.run import BenchConfig
    from distvision.classify.settings import ClassifyConfig
    from distvision.scale.settings import ScaleConfig
    from distvision.tune.config import TuneConfig

    outs = [TuneConfig().out, ScaleConfig(data=None).out, BenchConfig().out,
            ClassifyConfig(checkpoint="c", input="i").out, str(TrainConfig(data=None, model="mlp").run_dir())]
    assert all(Path(out).parts[0] == "runs" for out in outs), outs


def test_a_node_restarted_after_its_run_finished_has_nothing_left_to_do(tmp_path):
    """Under torchrun a live node whose replica hung is restarted; where its peers finished the run
    meanwhile, the finished folder is the end of its work, not a new run's refused folder."""
    run = tmp_path / "run"
    run.mkdir()
    restarted = {"TORCHELASTIC_RESTART_COUNT": "1"}
    assert not restarted_into_a_finished_run(str(run), restarted)  # not finished: it heals and trains on
    (run / "summary.json").write_text("{}")
    assert restarted_into_a_finished_run(str(run), restarted)
    assert not restarted_into_a_finished_run(str(run), {"TORCHELASTIC_RESTART_COUNT": "0"})  # a first start
    assert not restarted_into_a_finished_run(str(run), {})  # not under torchrun
    assert not restarted_into_a_finished_run(None, restarted)


def test_only_a_lone_worker_with_no_restarts_to_give_trains_in_the_commands_process(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    lone = TrainConfig(data=None, workers=1, max_restarts=0, recovery="restart")
    assert runs_in_this_process(lone)
    assert not runs_in_this_process(replace(lone, max_restarts=1))  # the agent restarts a dead worker
    assert not runs_in_this_process(replace(lone, workers=2))
    assert not runs_in_this_process(replace(lone, recovery="live"))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not runs_in_this_process(lone)  # under torchrun this process is the worker already
