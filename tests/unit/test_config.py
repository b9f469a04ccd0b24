"""TrainConfig is the one source of train's settings: its flags, and the command line a child gets."""

from __future__ import annotations

import pytest

from distvision.config import CONFIG_FILE_FIELDS, TrainConfig
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
    for flag, settings in (("--compress", {"compress": "powersgd"}), ("--sync-bn", {"sync_bn": True, "device": "cuda"})):
        with pytest.raises(UserError, match=f"{flag} .* works with --recovery restart only"):
            TrainConfig(data=None, recovery="live", **settings).validate()
    assert "[--recovery restart only]" in CONFIG_FILE_FIELDS["sync_bn"].metadata["help"]
    # A setting whose values differ: only PowerSGD is restart-only, half precision works on both paths.
    assert "[powersgd: --recovery restart only]" in CONFIG_FILE_FIELDS["compress"].metadata["help"]
    for settings in ({"compress": "fp16"}, {"compress": "bf16"}, {"balance": "throughput"}):
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
    ({"compress": "powersgd"}, False, "restart"),  # a restart-only setting
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
