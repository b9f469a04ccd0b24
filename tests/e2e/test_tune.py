"""distvision tune: real Optuna studies of real `distvision train` trials on small generated data.

Parallel workers sharing the journal file, two commands sharing a real PostgreSQL server, a worker
killed mid-trial, and best.toml reproducing the best trial (bad search spaces: tests/unit/test_tune.py).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from distvision.metrics import read_metrics
from tests.e2e.postgres import postgres_server
from tests.helpers import REPO, run_cli, tune_args, wait_for


def read_trials_csv(out: Path) -> list[dict]:
    with open(out / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def test_parallel_workers_share_the_journal_and_best_toml_reproduces_the_best_trial(tiny_images, tmp_path):
    out = tmp_path / "search"
    result = run_cli(tune_args(tiny_images, out, "--trials", "4", "--parallel", "2", "--epochs", "2"),
                     tmp_path / "cache")
    assert result.returncode == 0, result.stderr + result.stdout
    summary = json.loads((out / "summary.json").read_text())
    rows = read_trials_csv(out)
    # All four trials accounted for, each once, each with its own run folder.
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    assert all(r["state"] in ("COMPLETE", "PRUNED") for r in rows)
    # Pruned trials stopped early; the last epoch is never pruned (a finished trial is complete).
    assert all(int(r["epochs_trained"]) == (2 if r["state"] == "COMPLETE" else 1) for r in rows)
    assert sum(summary["trials"].values()) == 4 and summary["total_epochs_trained"] <= 8
    assert len([line for line in result.stdout.splitlines() if line.startswith("tune: trial")]) == 4
    for row in rows:  # what each trial reported is its run's own validation accuracy, epoch by epoch
        reported = int(row["epochs_trained"])
        epochs = read_metrics(Path(row["run_dir"]))[:reported]  # a pruned run may finish one more meanwhile
        assert [e["val_accuracy"] for e in epochs] == [float(row[f"val_accuracy_epoch_{i + 1}"])
                                                       for i in range(reported)]
    # Both worker processes ran trials on the one journal file.
    study = optuna.load_study(study_name="distvision", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))))
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    for plot in ("optimization_history.png", "accuracy_vs_epoch.png"):
        assert (out / plot).stat().st_size > 1000

    # best.toml trains the best trial again: same seed, same threads (one core, as each trial had),
    # same validation accuracy.
    best = summary["best"]
    assert best["val_accuracy"] == max(float(r["val_accuracy"]) for r in rows if r["state"] == "COMPLETE")
    one_core = [min(os.sched_getaffinity(0))]
    rerun = subprocess.run([sys.executable, "-m", "distvision", "train", "--config", str(out / "best.toml"),
                            "--out", str(tmp_path / "again")], cwd=REPO, capture_output=True, text=True,
                           env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")), timeout=240, check=False,
                           preexec_fn=lambda: os.sched_setaffinity(0, one_core))
    assert rerun.returncode == 0, rerun.stderr
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["val_accuracy"] == best["val_accuracy"]
    assert again["test_accuracy"] == best["test_accuracy"]


def test_two_commands_split_one_study_on_postgresql(tiny_images, tmp_path):
    with postgres_server() as url:
        commands = [
            subprocess.Popen([sys.executable, "-m", "distvision", *tune_args(
                tiny_images, tmp_path / f"machine{i}", "--trials", "2", "--epochs", "1", "--storage", url,
                "--study", "shared")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")))
            for i in range(2)
        ]
        outputs = [command.communicate(timeout=240)[0] for command in commands]
        assert [c.returncode for c in commands] == [0, 0], outputs
        study = optuna.load_study(study_name="shared", storage=url)
        finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
        assert len(finished) == 2  # the study's total, not 2 per command
        workers = {t.user_attrs["worker"].rsplit(":", 1)[0] for t in finished}
        assert len(workers) == 2, outputs  # both commands ran trials
        surplus = [t for t in study.trials if t.state.name == "FAIL"]
        assert all(t.user_attrs["error"].startswith("surplus") for t in surplus)


def _on_machine(hostname: str, args: list[str], env: dict) -> subprocess.Popen:
    """`distvision ARGS` in a UTS namespace of its own, whose host name makes it another machine to tune."""
    command = ["unshare", "--uts", "sh", "-c", f'hostname {hostname} && exec "$@"', "sh",
               sys.executable, "-m", "distvision", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_a_dead_machines_trial_fails_by_its_heartbeat_and_runs_again_elsewhere(tiny_images, tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    with postgres_server() as url:
        def args(machine: str) -> list[str]:
            return tune_args(tiny_images, tmp_path / machine, "--trials", "2", "--epochs", "1", "--pruner", "none",
                             "--storage", url, "--study", "heartbeat", "--heartbeat-seconds", "1",
                             "--heartbeat-grace", "3")

        first = _on_machine("node-a", args("a"), env)
        study = wait_for(lambda: _running_study(url), 120, "node-a's first trial to run")
        running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))[0]
        assert running.user_attrs["worker"].startswith("node-a:")
        os.killpg(first.pid, signal.SIGKILL)  # the whole machine goes: tune, its worker, the training
        first.communicate()
        # node-b may start within the 3 s grace (a quiet machine starts it fast): the trial is only
        # known dead once its heartbeat is older than that.
        time.sleep(3.5)
        second = _on_machine("node-b", args("b"), env)
        output = second.communicate(timeout=240)[0]
        assert second.returncode == 0, output[-3000:]
        trials = optuna.load_study(study_name="heartbeat", storage=url).trials
    # node-b cannot see node-a's processes: only the missing heartbeat told it the trial was dead.
    dead = trials[running.number]
    assert dead.state.name == "FAIL"
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == running.number]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE" and retried[0].params == running.params
    assert retried[0].user_attrs["worker"].startswith("node-b:")
    assert sum(t.state.name == "COMPLETE" for t in trials) == 2


def _running_study(url: str) -> optuna.Study | None:
    try:
        study = optuna.load_study(study_name="heartbeat", storage=url)
    except KeyError:  # not created yet
        return None
    running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    # run_dir is set once every parameter is suggested, just before the training starts
    return study if running and "run_dir" in running[0].user_attrs else None


def test_killed_worker_is_retried_and_completed_trials_are_kept(tiny_images, tmp_path):
    out = tmp_path / "search"
    args = [sys.executable, "-m", "distvision", *tune_args(tiny_images, out, "--trials", "2", "--epochs", "2",
                                                           "--pruner", "none")]
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second_trial = out / "trials" / "1" / "train.log"
    deadline = time.time() + 180
    while not second_trial.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert second_trial.exists(), "the second trial never started"
    first.send_signal(signal.SIGKILL)  # the tune worker dies mid-trial, as on a crashed machine
    first.wait()
    # Its training child does not outlive it (it gets SIGTERM when its parent dies).
    deadline = time.time() + 60
    while time.time() < deadline and _processes_mentioning(str(out / "trials" / "1")):
        time.sleep(0.5)
    assert not _processes_mentioning(str(out / "trials" / "1"))
    kept = (out / "trials" / "0" / "summary.json").read_text()

    rerun = run_cli(tune_args(tiny_images, out, "--trials", "2", "--epochs", "2", "--pruner", "none"),
                    tmp_path / "cache")
    assert rerun.returncode == 0, rerun.stderr + rerun.stdout
    assert "trial(s) 1 lost their worker; marked failed and queued again" in rerun.stdout
    rows = {int(r["number"]): r for r in read_trials_csv(out)}
    assert [rows[n]["state"] for n in sorted(rows)] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert rows[2]["retry_of"] == "1" and rows[2]["lr"] == rows[1]["lr"]  # the same configuration, again
    assert (out / "trials" / "0" / "summary.json").read_text() == kept  # trial 0 was not run again
    assert json.loads((out / "summary.json").read_text())["trials"] == {"COMPLETE": 2, "FAIL": 1}


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found
