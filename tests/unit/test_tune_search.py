"""--sampler and --pruner reach Optuna: a real in-memory study over the command's search space, the
objective a plain function (no training), so each choice shows its own behaviour."""

from __future__ import annotations

from dataclasses import replace

import optuna
import pytest

from distvision.config import TrainConfig
from distvision.errors import UserError
from distvision.parallel.child import training_command
from distvision.tune.config import TuneConfig
from distvision.tune.space import Dimension
from distvision.tune.study import load_study, make_pruner, make_sampler
from distvision.tune.trial import trial_config

SPACE = [Dimension("lr", "log", 0.001, 0.1, grid=(0.001, 0.01, 0.1)), Dimension("translate", "int", 0, 2),
         Dimension("flip", "categorical", choices=(True, False))]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_with(sampler: str, pruner: str = "none", epochs: int = 9) -> optuna.Study:
    config = TuneConfig(sampler=sampler, pruner=pruner)
    return optuna.create_study(direction="maximize", sampler=make_sampler(config, SPACE),
                               pruner=make_pruner(config, epochs))


def suggest_all(trial: optuna.Trial) -> dict:
    return {dimension.name: dimension.suggest(trial) for dimension in SPACE}


def test_grid_visits_every_point_of_the_space_once():
    study = study_with("grid")
    study.optimize(lambda trial: suggest_all(trial)["lr"], n_trials=30)  # stops itself when exhausted
    points = sorted((t.params["lr"], t.params["translate"], t.params["flip"]) for t in study.trials)
    assert points == sorted((lr, t, f) for lr in (0.001, 0.01, 0.1) for t in (0, 1, 2) for f in (True, False))


def test_random_and_tpe_sample_inside_the_space():
    for sampler, expected in (("random", optuna.samplers.RandomSampler), ("tpe", optuna.samplers.TPESampler)):
        study = study_with(sampler)
        assert isinstance(study.sampler, expected)
        study.optimize(lambda trial: suggest_all(trial)["lr"], n_trials=12)
        values = [t.params["lr"] for t in study.trials]
        assert all(0.001 <= v <= 0.1 for v in values) and len(set(values)) == 12  # continuous, not the grid


def _curves(study: optuna.Study, finals: list[float], epochs: int) -> list[str]:
    """Trials whose reported accuracy climbs linearly to `final` over the epochs; their end states."""
    for final in finals:
        trial = study.ask()
        state = optuna.trial.TrialState.COMPLETE
        for epoch in range(1, epochs + 1):
            trial.report(final * epoch / epochs, epoch)
            if epoch < epochs and trial.should_prune():
                state = optuna.trial.TrialState.PRUNED
                break
        study.tell(trial, final if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    return [t.state.name for t in study.trials]


def test_pruners_stop_bad_trials_early_and_none_never_does():
    finals = [0.9, 0.8, 0.85, 0.1, 0.95, 0.05, 0.1, 0.05, 0.1, 0.05, 0.1, 0.05]
    for pruner in ("asha", "hyperband"):
        states = _curves(study_with("random", pruner), finals, epochs=9)
        assert "PRUNED" in states[3:], (pruner, states)
        assert all(states[i] == "COMPLETE" for i in range(len(finals)) if finals[i] >= 0.95), (pruner, states)
    assert set(_curves(study_with("random", "none"), finals, epochs=9)) == {"COMPLETE"}
    assert study_with("random", "hyperband", epochs=9).pruner._max_resource == 9  # the trial's epoch budget


def test_a_trial_trains_with_its_parameters_on_workers_per_trial_workers(tmp_path):
    config = TuneConfig(data="images", model="mlp", workers_per_trial=3, val_fraction=0.2, seed=3)
    values = trial_config(config, epochs=4, params={"lr": 0.02, "translate": 1, "flip": False})
    argv = training_command(TrainConfig(**values, out=str(tmp_path)))
    assert argv[argv.index("--workers") + 1] == "3" and argv[argv.index("--lr") + 1] == "0.02"
    assert {"translate=1", "flip=false"} <= {argv[i + 1] for i, flag in enumerate(argv) if flag == "--set"}
    assert argv[argv.index("--epochs") + 1] == "4" and argv[argv.index("--val-fraction") + 1] == "0.2"
    assert argv[argv.index("--max-restarts") + 1] == "0"  # tune retries a failed trial itself


def test_every_trial_synchronises_as_the_search_says_and_a_study_is_not_mixed_across_modes(tmp_path):
    config = TuneConfig(data="images", model="mlp", workers_per_trial=2, sync="diloco", sync_every="8",
                        quantize="int4", fragments=2, overlap=1, out=str(tmp_path))
    values = trial_config(config, epochs=4, params={"lr": 0.02})
    TrainConfig(**values).validate()
    argv = training_command(TrainConfig(**values, out=str(tmp_path)))
    for flag, value in (("--sync", "diloco"), ("--sync-every", "8"), ("--quantize", "int4"), ("--fragments", "2"),
                        ("--overlap", "1")):
        assert argv[argv.index(flag) + 1] == value
    load_study(config, SPACE, epochs=4, create=True)
    with pytest.raises(UserError, match="started with other quantize \\(quantize='int4'\\)"):
        load_study(replace(config, quantize="none"), SPACE, epochs=4, create=False)
    with pytest.raises(UserError, match="started with other fragments"):
        load_study(replace(config, fragments=4), SPACE, epochs=4, create=False)
    plain = replace(config, sync="allreduce", sync_every=None, quantize="none", fragments=1, overlap=0,
                    study="plain")
    load_study(plain, SPACE, epochs=4, create=True)
    assert "sync" not in load_study(plain, SPACE, epochs=4, create=False).user_attrs["settings"]


def test_a_study_started_with_other_settings_is_refused_not_mixed(tmp_path):
    config = TuneConfig(data="images", model="mlp", out=str(tmp_path))
    study = load_study(config, SPACE, epochs=4, create=True)
    assert study.user_attrs["settings"]["epochs"] == 4
    assert load_study(config, SPACE, epochs=4, create=False).study_name == study.study_name  # joined
    with pytest.raises(UserError, match="started with other epochs, seed"):
        load_study(replace(config, seed=1), SPACE, epochs=5, create=False)
    with pytest.raises(UserError, match="other space"):
        load_study(config, SPACE[:2], epochs=4, create=False)
