"""TrainConfig is the one source of train's settings: its flags, and the command line a child gets."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest

from distvision.cli import build_parser
from distvision.config import (
    CONFIG_FILE_FIELDS,
    TrainConfig,
    add_train_arguments,
    config_file_values,
    help_with_default,
    read_config_file,
    write_config_file,
)
from distvision.errors import UserError


def test_a_config_survives_the_trip_through_the_command_line():
    config = TrainConfig(
        data="cifar", model="fastnet", recipe="default", workers=3, epochs=4, batch_size=64, lr=0.05,
        momentum=0.85, weight_decay=1e-4, label_smoothing=0.1, recipe_settings=["cutout=8", "schedule=[[0,1],[1,0]]"],
        disable=["ema", "tta"], precision="fp32", device="cpu", sync="local-sgd", sync_every="epoch", sync_warmup=5,
        powersgd_rank=4, lr_scaling="sqrt", base_batch_size=256, warmup_epochs=0.5, balance="throughput",
        target_accuracy=0.9, patience=2, min_delta=0.01, monitor="val", max_time=30.5, seed=7, val_fraction=0.1,
        train_fraction=0.25, threads_per_worker=1, image_size=16, out="runs/x", cache_dir="cache",
        collective_timeout=5.0, checkpoint_every=0.5, max_restarts=0, join_timeout=9.0, resume=True,
        audit_samples=True, debug_stop_at_step=12, debug_step_delay=0.05, debug_slowdown="1:2", debug_nan_at="0:3",
    )
    assert TrainConfig.from_argv(config.to_argv()) == config
    assert "--set" in config.to_argv() and "--no-ema" in config.to_argv() and "--resume" in config.to_argv()


def test_settings_left_at_their_default_are_not_passed_on():
    assert TrainConfig(data=None).to_argv() == []
    assert TrainConfig(data=None, seed=0, sync_every=None, workers=2).to_argv() == []
    assert TrainConfig.from_argv([]) == TrainConfig(data=None)


def test_flags_over_a_base_config_win_and_lists_grow():
    base = TrainConfig(data="d", model="mlp", epochs=3, recipe_settings=["flip=true"])
    config = TrainConfig.from_argv(["--epochs", "5", "--set", "translate=2", "--no-ema"], base)
    assert (config.model, config.epochs, config.data) == ("mlp", 5, "d")
    assert config.recipe_settings == ["flip=true", "translate=2"] and config.disable == ["ema"]


def test_bad_flags_are_a_user_error():
    with pytest.raises(UserError, match="--sync: invalid choice"):
        TrainConfig.from_argv(["--sync", "gossip"])
    with pytest.raises(UserError, match="unrecognized arguments"):
        TrainConfig.from_argv(["--learning-rate", "0.1"])


def test_each_section_checks_its_own_settings():
    with pytest.raises(UserError, match="--train-fraction"):
        TrainConfig(data=None, train_fraction=0.0).validate()
    with pytest.raises(UserError, match="--compress fp16 applies to --sync allreduce only"):
        TrainConfig(data=None, sync="local-sgd", compress="fp16").validate()
    with pytest.raises(UserError, match="--monitor val needs a validation split"):
        TrainConfig(data=None, monitor="val").validate()
    with pytest.raises(UserError, match="--debug-nan-at takes RANK:NUMBER"):
        TrainConfig(data=None, debug_nan_at="soon").validate()
    for bad in ("kill", "kill:1", "explode:1:5", "kill:1:5:lunch", "kill:x:5", "kill:1:5:eval:now"):
        with pytest.raises(UserError, match="--debug-fault takes KIND:RANK:STEP"):
            TrainConfig(data=None, debug_faults=[bad]).validate()
    faults = TrainConfig.from_argv(["--debug-fault", "kill:1:5", "--debug-fault", "stop:0:9:exchange"])
    faults.validate()
    assert faults.debug_faults == ["kill:1:5", "stop:0:9:exchange"]
    assert faults.resolved_recovery(under_torchrun=False) == "live"
    TrainConfig(data=None).validate()
    assert TrainConfig(data=None).mode_only_settings() == {}  # a list setting at its (factory) default


def test_live_recovery_settings_are_checked_before_anything_starts():
    """--sync diloco needs its period and the live path; what runs on one recovery mode only says so."""
    with pytest.raises(UserError, match="--sync diloco needs --sync-every H"):
        TrainConfig(data=None, sync="diloco", recovery="live").validate()
    with pytest.raises(UserError, match="use --recovery live"):
        TrainConfig(data=None, sync="diloco", sync_every="32", recovery="restart").validate()
    with pytest.raises(UserError, match="--sync-bn .* works with --recovery restart only"):
        TrainConfig(data=None, recovery="live", sync_bn=True, device="cuda").validate()
    assert "[--recovery restart only]" in CONFIG_FILE_FIELDS["sync_bn"].metadata["help"]
    assert "only]" not in CONFIG_FILE_FIELDS["compress"].metadata["help"]  # every compression on both paths
    for settings in ({"compress": "fp16"}, {"compress": "bf16"}, {"compress": "powersgd", "powersgd_rank": 4},
                     {"balance": "throughput"}):
        for recovery in ("live", "restart"):
            TrainConfig(data=None, recovery=recovery, **settings).validate()
    with pytest.raises(UserError, match="--lighthouse host:29510 works with --recovery live only"):
        TrainConfig(data=None, lighthouse="host:29510", recovery="restart").validate()
    with pytest.raises(UserError, match="--recovery: invalid choice"):
        TrainConfig.from_argv(["--recovery", "pray"])
    # local SGD keeps its default period; DiLoCo's outer optimizer defaults are the paper's.
    assert TrainConfig(data=None, sync="local-sgd").period == "8"
    live = TrainConfig.from_argv(["--recovery", "live", "--sync", "diloco", "--sync-every", "32"])
    live.validate()
    assert (live.period, live.outer_lr, live.outer_momentum) == ("32", 0.7, 0.9)


@pytest.mark.parametrize(("settings", "under_torchrun", "expected"), [
    ({}, False, "live"),  # several local workers: live membership by default
    ({"workers": 1}, False, "restart"),  # one worker: no membership to keep
    ({}, True, "restart"),  # torchrun without a Lighthouse: torchrun's own restarts
    ({"lighthouse": "host:29510"}, True, "live"),
    ({"sync_bn": True, "device": "cuda"}, False, "restart"),  # a restart-only setting
    ({"compress": "powersgd"}, False, "live"),  # every compression works on both paths
    ({"compress": "fp16", "balance": "throughput"}, False, "live"),  # both paths: auto stays live
    ({"sync": "diloco", "sync_every": "8", "workers": 1}, False, "live"),  # DiLoCo runs on torchft only
    ({"recovery": "restart"}, False, "restart"),  # an explicit choice stands
    ({"recovery": "live", "workers": 1}, True, "live"),
])
def test_auto_recovery_resolves_to_live_for_several_local_workers(settings, under_torchrun, expected):
    config = TrainConfig(data=None, **settings)
    config.validate()
    assert config.resolved_recovery(under_torchrun) == expected


def test_auto_recovery_keeps_gpus_on_the_restart_path():
    """Live membership is tested on the CPU only: on a GPU, auto runs the restart path."""
    assert TrainConfig(data=None).resolved_recovery(under_torchrun=False, on_gpu=True) == "restart"


# --- Config files: RUN_DIR/config.toml, --config, a tune's best.toml ---

def many_settings() -> TrainConfig:
    """A config with most settings away from their default, lists and a --no-TRICK among them."""
    return TrainConfig(
        data="images", model="mlp", workers=3, epochs=4, batch_size=64, lr=0.05, momentum=0.85,
        recipe_settings=["cutout=8", "schedule=[[0,1],[1,0]]"], disable=["ema", "tta"], precision="fp32",
        device="cpu", sync="local-sgd", sync_every="epoch", lr_scaling="sqrt", warmup_epochs=0.5, balance="throughput",
        target_accuracy=0.9, patience=2, monitor="val", seed=7, val_fraction=0.1, image_size=16, cache_dir="cache",
        collective_timeout=5.0, recovery="restart", debug_faults=["kill:1:5"], weight_decay=1e-5)


def test_a_config_file_reproduces_the_config_it_was_written_from(tmp_path):
    """TrainConfig -> config.toml -> `distvision train --config FILE` -> the same TrainConfig (in a new folder)."""
    config = many_settings()
    write_config_file(tmp_path / "config.toml", config_file_values(config), "a comment\nof two lines")
    assert TrainConfig(**read_config_file(tmp_path / "config.toml")) == config
    args = build_parser(read_config_file(tmp_path / "config.toml")).parse_args(
        ["train", "--config", str(tmp_path / "config.toml")])
    assert TrainConfig.from_namespace(args) == config
    # The run folder is not part of it: the file trains again in a new folder, not on top of the old run.
    written = replace(config, out="runs/old", resume=True)
    write_config_file(tmp_path / "again.toml", config_file_values(written))
    assert TrainConfig(**read_config_file(tmp_path / "again.toml")) == config


def test_config_file_keys_are_the_flag_names(tmp_path):
    write_config_file(tmp_path / "config.toml", config_file_values(many_settings()))
    keys = [line.split(" = ")[0] for line in (tmp_path / "config.toml").read_text().splitlines()
            if not line.startswith("#")]
    assert {"batch-size", "set", "debug-fault", "lr-scaling", "disable"} <= set(keys)
    assert not [key for key in keys if "_" in key]
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    flags = set(parser._option_string_actions)
    assert {f"--{key}" for key in keys if key != "disable"} <= flags  # every key is a train flag
    assert "--no-ema" in flags  # the switches of the one key that is not a flag


def test_older_config_files_with_field_names_still_read(tmp_path):
    """Keys as the field names (batch_size, recipe_settings), as tune's best.toml were written, and as dashed
    field names, are read; a setting given twice is refused."""
    (tmp_path / "old.toml").write_text('batch_size = 64\nrecipe_settings = ["flip=true"]\ndebug_faults = []\n'
                                       'weight-decay = 0.001\nlr_scaling = "sqrt"\n')
    assert read_config_file(tmp_path / "old.toml") == {
        "batch_size": 64, "recipe_settings": ["flip=true"], "debug_faults": [], "weight_decay": 0.001,
        "lr_scaling": "sqrt"}
    (tmp_path / "twice.toml").write_text("batch_size = 64\nbatch-size = 32\n")
    with pytest.raises(UserError, match="batch-size sets batch-size a second time"):
        read_config_file(tmp_path / "twice.toml")
    (tmp_path / "typed.toml").write_text('epochs = "ten"\n')
    with pytest.raises(UserError, match="epochs = 'ten' has the wrong type"):
        read_config_file(tmp_path / "typed.toml")


@pytest.mark.parametrize(("settings", "gpus", "cores", "expected"), [
    ({}, 0, 8, 8),  # the CPU: one worker per core, one thread each
    ({"threads_per_worker": 3}, 0, 8, 2),  # cores over threads per worker
    ({"threads_per_worker": 16}, 0, 8, 1),  # never none
    ({}, 4, 64, 4),  # a CUDA machine: one worker per GPU
    ({"device": "cpu"}, 4, 64, 64),  # on its CPU when asked to
    ({"workers": 3}, 4, 64, 3),  # a count stands
])
def test_auto_workers_resolve_to_the_gpus_or_the_cores(settings, gpus, cores, expected):
    config = TrainConfig(data=None, **{"workers": "auto", **settings})
    assert config.resolved_workers(gpu_count=gpus, cores=cores) == expected


def test_workers_take_a_count_or_auto_from_the_flag_and_the_file(tmp_path):
    assert TrainConfig.from_argv(["--workers", "auto"]).workers == "auto"
    assert TrainConfig.from_argv(["--workers", "3"]).workers == 3
    with pytest.raises(UserError, match="--workers: expected a count or 'auto'"):
        TrainConfig.from_argv(["--workers", "many"])
    (tmp_path / "auto.toml").write_text('workers = "auto"\n')
    assert read_config_file(tmp_path / "auto.toml") == {"workers": "auto"}
    (tmp_path / "bad.toml").write_text('workers = "many"\n')
    with pytest.raises(UserError, match="workers: expected a count or 'auto'"):
        read_config_file(tmp_path / "bad.toml")
    TrainConfig(data=None, workers="auto").validate()  # resolved later, by the train command


def test_help_says_a_default_unless_it_does_already():
    assert help_with_default("seed", 0) == "seed (default %(default)s)"
    assert help_with_default(None, 32) == "default %(default)s"
    assert help_with_default("folder (default: the recipe's)", "x") == "folder (default: the recipe's)"
    assert help_with_default("auto (default): live", "auto") == "auto (default): live"
    for nothing in (None, False, []):
        assert help_with_default("a switch", nothing) == "a switch"
