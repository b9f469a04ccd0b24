"""What a search leaves in TUNE_DIR: trials.csv, best.toml, summary.json and PNG plots."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

from distvision.extras import missing, require_extra

with require_extra("tune", "distvision tune"):
    import optuna
    from optuna.trial import FrozenTrial, TrialState

from distvision.config import read_config_file, write_config_file
from distvision.fileio import write_json_atomic


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The completed trial with the highest validation accuracy, or None."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: t.value, default=None)


def progress_line(study: optuna.Study, trial: FrozenTrial, wanted: int) -> str:
    """One line per finished trial: number, state, accuracy, best so far."""
    finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    epochs = max(trial.intermediate_values, default=0)
    if trial.state == TrialState.FAIL:
        result = f"failed: {trial.user_attrs.get('error', 'see its train.log')}"
    else:
        result = f"val_acc {trial.value:.4f} after {epochs} epoch(s)" if trial.value is not None else "no result"
    best = best_trial(study)
    best_text = f"best {best.value:.4f} (trial {best.number})" if best else "best: none complete yet"
    return f"tune: trial {trial.number:>3} {trial.state.name.lower():<8} {result}; {best_text}; {finished}/{wanted} done"


def epochs_trained(trial: FrozenTrial) -> int:
    return max(trial.intermediate_values, default=0)


def write_trials_csv(study: optuna.Study, path: Path, epochs: int) -> None:
    """Every trial: params, state, validation accuracy per epoch, seconds."""
    trials = study.get_trials(deepcopy=False)
    names = sorted({name for t in trials for name in t.params})
    header = ["number", "state", "val_accuracy", "epochs_trained", "seconds", *names,
              *[f"val_accuracy_epoch_{e}" for e in range(1, epochs + 1)], "retry_of", "run_dir", "error"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for t in trials:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and \
                t.datetime_start else None
            writer.writerow([t.number, t.state.name, t.value, epochs_trained(t),
                             round(seconds, 1) if seconds is not None else None,
                             *[t.params.get(name) for name in names],
                             *[t.intermediate_values.get(e) for e in range(1, epochs + 1)],
                             t.system_attrs.get("failed_trial"), t.user_attrs.get("run_dir"),
                             t.user_attrs.get("error")])


def write_best_config(trial: FrozenTrial, path: Path) -> None:
    """The best trial's own train config, with the precision it actually ran at (for an exact rerun)."""
    values = read_config_file(Path(trial.user_attrs["run_dir"]) / "config.toml")
    values["precision"] = trial.user_attrs.get("precision", values.get("precision"))
    write_config_file(path, values, f"best trial {trial.number} of distvision tune: val_accuracy {trial.value:.4f}\n"
                      f"rerun: distvision train --config {path.name} (flags override this file)")


def best_test_accuracy(trial: FrozenTrial) -> float | None:
    """The best trial's test accuracy, from its own final evaluation: the one look at the test set."""
    try:
        return json.loads((Path(trial.user_attrs["run_dir"]) / "summary.json").read_text())["test_accuracy"]
    except (OSError, KeyError, ValueError):
        return None


def write_summary(study: optuna.Study, path: Path, extra: dict) -> dict:
    """summary.json: best value and params, trial counts by state, total epochs trained, wall seconds."""
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study)
    counts = {state.name: sum(1 for t in trials if t.state == state) for state in TrialState}
    summary = {
        "study": study.study_name,
        "best": None if best is None else {
            "number": best.number, "val_accuracy": best.value, "params": best.params,
            "test_accuracy": best_test_accuracy(best), "run_dir": best.user_attrs.get("run_dir"),
        },
        "trials": {state: n for state, n in counts.items() if n},
        "total_epochs_trained": sum(epochs_trained(t) for t in trials),
        **extra,
    }
    write_json_atomic(path, summary)
    return summary


def write_plots(study: optuna.Study, out: Path) -> list[str]:
    """optimization_history.png, param_importances.png, accuracy_vs_epoch.png; returns what was skipped, and why
    (all of them without matplotlib)."""
    if reason := missing("matplotlib", "plots"):
        return [f"plots: {reason}"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.value is not None]
    skipped = []

    figure, axes = plt.subplots(figsize=(7, 4))
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    pruned = [t for t in finished if t.state == TrialState.PRUNED]
    axes.scatter([t.number for t in complete], [t.value for t in complete], label="complete", color="tab:blue")
    axes.scatter([t.number for t in pruned], [t.value for t in pruned], label="pruned (last epoch reached)",
                 color="tab:gray", marker="x")
    best_so_far, running = [], None
    for t in sorted(complete, key=lambda t: t.number):
        running = t.value if running is None else max(running, t.value)
        best_so_far.append((t.number, running))
    if best_so_far:
        axes.step(*zip(*best_so_far), where="post", color="tab:red", label="best so far")
    axes.set(xlabel="trial", ylabel="validation accuracy", title="Optimization history")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "optimization_history.png", dpi=100)
    plt.close(figure)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "importances will be equal" on tiny studies
            importances = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as error:
        importances = None
        skipped.append(f"param_importances.png: {error}")
    if importances:
        figure, axes = plt.subplots(figsize=(7, 4))
        names = list(importances)[::-1]
        axes.barh(names, [importances[n] for n in names], color="tab:green")
        axes.set(xlabel="importance (fANOVA, completed trials)", title="Parameter importances")
        figure.tight_layout()
        figure.savefig(out / "param_importances.png", dpi=100)
        plt.close(figure)

    figure, axes = plt.subplots(figsize=(7, 4))
    best = best_trial(study)
    for t in trials:
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        is_best = best is not None and t.number == best.number
        axes.plot(steps, [t.intermediate_values[s] for s in steps], marker="o", markersize=3,
                  color="tab:red" if is_best else ("tab:gray" if t.state == TrialState.PRUNED else "tab:blue"),
                  linewidth=2.5 if is_best else 1, alpha=1 if is_best else 0.6,
                  label=f"best (trial {t.number})" if is_best else None)
    axes.set(xlabel="epoch", ylabel="validation accuracy", title="Accuracy vs epoch (gray: pruned)")
    if best is not None:
        axes.legend()
    figure.tight_layout()
    figure.savefig(out / "accuracy_vs_epoch.png", dpi=100)
    plt.close(figure)
    return skipped
