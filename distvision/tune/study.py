"""The Optuna study: its storage, sampler and pruner, dead workers' trials, and a trial worker's loop.

Everything here is Optuna's: the search (TPE, random, grid), the early stopping (ASHA, Hyperband)
and the shared state (a journal file or a database). distvision only decides how many trials to
run and recovers trials whose worker died.
"""

from __future__ import annotations

import fcntl
import random
import socket
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

from distvision.extras import install_hint, require_extra

with require_extra("tune", "distvision tune"):
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

from distvision.errors import UserError
from distvision.tune.config import TuneConfig
from distvision.tune.space import Dimension

MAX_RETRIES = 3  # a trial whose worker died is run again at most this often
UNOWNED_GRACE = timedelta(seconds=60)  # a RUNNING trial not yet claimed by its worker, after this: dead
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
STORAGE_ATTEMPTS = 5  # opening a new database from several machines at once

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def journal_path(out: Path) -> Path:
    return Path(out) / "study.journal"


def open_storage(config: TuneConfig) -> optuna.storages.BaseStorage:
    """The journal file in the output folder, or the database the URL names (with heartbeats)."""
    if config.storage is None:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(journal_path(Path(config.out)))))
    from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError

    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(
                config.storage, heartbeat_interval=config.heartbeat_seconds, grace_period=config.heartbeat_grace,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
                engine_kwargs={"pool_pre_ping": True},
            )
        except (IntegrityError, ProgrammingError) as error:
            # Machines starting together on a new database race to create Optuna's tables (a unique
            # violation, or PostgreSQL's "relation ... already exists"); the loser finds them made
            # on its next try.
            lost_race = isinstance(error, IntegrityError) or "already exists" in str(error)
            if not lost_race or attempt == STORAGE_ATTEMPTS - 1:
                raise UserError(f"--storage {redact(config.storage)}: cannot open it "
                                f"({_first_line(error)})") from None
            time.sleep(0.5 + random.random())
        except ImportError as error:
            if config.storage.startswith("postgresql"):
                raise UserError(f"distvision tune --storage {redact(config.storage)} needs psycopg2: "
                                f"{install_hint('postgres')}") from None
            raise UserError(f"--storage {redact(config.storage)}: missing database driver ({error})") from None
        except SQLAlchemyError as error:  # a bad URL, an unreachable server, a bad login
            raise UserError(f"--storage {redact(config.storage)}: cannot open it ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def redact(url: str) -> str:
    """The URL without its password, for messages and summaries."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def make_sampler(config: TuneConfig, space: list[Dimension]) -> optuna.samplers.BaseSampler:
    if config.sampler == "random":
        return optuna.samplers.RandomSampler()
    if config.sampler == "grid":
        return optuna.samplers.GridSampler({d.name: d.grid_values() for d in space})
    # constant_liar: parallel workers see running trials as bad guesses, so they do not all try one spot.
    return optuna.samplers.TPESampler(multivariate=True, constant_liar=True)


def make_pruner(config: TuneConfig, epochs: int) -> optuna.pruners.BasePruner:
    if config.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=4)
    if config.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


SYNC_DEFAULTS = {name: getattr(TuneConfig(), name) for name in ("sync", "sync_every", "quantize",
                                                                   "fragments", "overlap")}


def load_study(config: TuneConfig, space: list[Dimension], epochs: int, create: bool) -> optuna.Study:
    """Create or join the study; one started with other search settings is refused, not mixed."""
    storage = open_storage(config)
    study = optuna.create_study(
        study_name=config.study, storage=storage, direction="maximize", load_if_exists=True,
        sampler=make_sampler(config, space), pruner=make_pruner(config, epochs),
    )
    settings = {"model": config.model, "recipe": config.recipe, "epochs": epochs, "seed": config.seed,
                "val_fraction": config.val_fraction, "image_size": config.image_size,
                "space": {d.name: d.to_dict() for d in space},
                # only where not the default, so that a study begun before these settings existed still joins
                **{name: getattr(config, name) for name, default in SYNC_DEFAULTS.items()
                   if getattr(config, name) != default}}
    saved = study.user_attrs.get("settings")
    if saved is None and create:
        study.set_user_attr("settings", settings)
    elif saved is not None and saved != settings:
        changed = sorted(key for key in settings.keys() | saved.keys() if saved.get(key) != settings.get(key))
        raise UserError(f"study {config.study!r} was started with other {', '.join(changed)} "
                        f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); use the same settings "
                        "to continue it, or another --study/--out")
    return study


def recover_dead_trials(study: optuna.Study) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker process on this host is gone; return their numbers.

    Database storage also does this through heartbeats, from any machine; the journal file has no
    heartbeat, so the next run of the command does it here.
    """
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker")
        if owner is None:
            started = trial.datetime_start or datetime.now()
            if datetime.now() - started < UNOWNED_GRACE:
                continue
        elif not _owner_is_dead(owner):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except ValueError:
            continue  # finished meanwhile, or another command recovered it first
        retry(study, trial)
        recovered.append(trial.number)
    return recovered


def _owner_is_dead(owner: str) -> bool:
    from distvision.tune.trial import process_identity

    host, pid, _ = owner.split(":", 2)
    if host != socket.gethostname():
        return False  # another machine's worker: its own heartbeat (database storage) decides
    return process_identity(int(pid)) != owner


@contextmanager
def claim_lock(out: Path):
    """Held from counting the trials until a new one is RUNNING, so local workers never overshoot."""
    with open(Path(out) / "claim.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield lambda: fcntl.flock(handle, fcntl.LOCK_UN)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def count_states(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def work_on_study(config: TuneConfig, space: list[Dimension], epochs: int, cores: list[int],
                  gpus: Sequence[int] = ()) -> None:
    """One trial worker: run trials until the study holds config.trials finished or running ones, each on
    `cores` and `gpus` (on a CUDA machine).

    A worker gives up after config.trials failed trials of its own (a setting that always fails).
    """
    from distvision.tune.report import progress_line
    from distvision.tune.trial import TrialFailed, make_objective

    study = load_study(config, space, epochs, create=False)
    failures, full = [], []

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.user_attrs.get("error", "").startswith("surplus"):
            full.append(trial.number)
        elif trial.state == TrialState.FAIL:
            failures.append(trial.number)
        print(progress_line(study, trial, config.trials), flush=True)

    while len(failures) < config.trials:
        with claim_lock(Path(config.out)) as release:
            counts = count_states(study)
            if sum(counts.get(s.name, 0) for s in (*FINISHED, TrialState.RUNNING)) >= config.trials:
                return
            if isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study):
                return
            objective = make_objective(config, space, epochs, cores, on_start=release, gpus=gpus)
            study.optimize(objective, n_trials=1, catch=(TrialFailed,), callbacks=[after_trial])
        if full:
            return


def worker_process(config: TuneConfig, space: list[Dimension], epochs: int, cores: list[int],
                   gpus: Sequence[int] = ()) -> None:
    """Entry point of each `--parallel` worker process; it ends when the command does."""
    from distvision.parallel.launch import stop_when_parent_dies

    stop_when_parent_dies()
    try:
        work_on_study(config, space, epochs, cores, gpus)
    except UserError as error:
        print(f"distvision: error: {error}", flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # Ctrl-C: the command itself says so, once
