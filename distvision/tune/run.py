"""`distvision tune`, top to bottom: check the inputs, join the study, run trial workers, write the outputs."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

from distvision.config import TrainConfig
from distvision.errors import UserError
from distvision.parallel.child import core_share, gpu_share, local_gpu_count
from distvision.tune.config import TuneConfig
from distvision.tune.report import (
    best_test_accuracy,
    best_trial,
    write_best_config,
    write_plots,
    write_summary,
    write_trials_csv,
)
from distvision.tune.space import default_space, load_space
from distvision.tune.study import (
    FINISHED,
    claim_lock,
    count_states,
    load_study,
    recover_dead_trials,
    redact,
    work_on_study,
    worker_process,
)
from distvision.tune.trial import trial_config


def run_tune(config: TuneConfig) -> dict:
    """Run the search until the study holds config.trials finished trials; return summary.json's content."""
    from distvision.data.prepare import default_cache_dir, ensure_prepared
    from distvision.models.registry import recipe_for

    started = time.time()
    config.validate()
    recipe = recipe_for(config.model, config.recipe)  # unknown model or recipe fails here
    epochs = config.epochs or recipe.epochs
    space = load_space(Path(config.space)) if config.space else default_space(recipe)
    # A trial's fixed settings that train would refuse (--quantize without local steps, DiLoCo without its
    # period) fail here, in one line, not in every trial.
    TrainConfig(**trial_config(config, epochs, {})).validate()
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    if config.data is None:
        from distvision.data.download import download_cifar10

        config.data = str(download_cifar10(cache_dir))
    ensure_prepared(Path(config.data), config.image_size, cache_dir)  # bad data fails before any trial
    # Absolute, so best.toml and trials.csv work from any folder.
    config.data, config.out = str(Path(config.data).resolve()), str(Path(config.out).resolve())
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    study = load_study(config, space, epochs, create=True)
    with claim_lock(out):
        recovered = recover_dead_trials(study)
    if recovered:
        print(f"tune: trial(s) {', '.join(map(str, recovered))} lost their worker; marked failed and queued again")
    counts = count_states(study)
    finished = sum(counts.get(s.name, 0) for s in FINISHED)
    storage_text = redact(config.storage) if config.storage else str(out / "study.journal")
    print(f"tune: study {config.study!r} in {storage_text}: {finished}/{config.trials} trials finished; "
          f"{config.parallel} local worker(s), {epochs} epochs at most per trial, {config.sampler} sampler, "
          f"{config.pruner} pruner, searching {', '.join(d.name for d in space)}", flush=True)

    cores = sorted(os.sched_getaffinity(0))
    if config.parallel == 1:
        work_on_study(config, space, epochs, cores, gpu_share(0, local_gpu_count(), config.workers_per_trial))
    else:
        run_parallel(config, space, epochs, cores)

    study = load_study(config, space, epochs, create=False)
    return write_outputs(study, config, epochs, time.time() - started)


def run_parallel(config: TuneConfig, space, epochs: int, cores: list[int]) -> None:
    """config.parallel worker processes on one study, each trial on its worker's share of the cores and,
    on a CUDA machine, on its worker's GPUs."""
    gpu_count = local_gpu_count()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=worker_process, name=f"tune-worker-{i}",
                               args=(config, space, epochs, core_share(cores, i, config.parallel),
                                     gpu_share(i, gpu_count, config.workers_per_trial)))
               for i in range(config.parallel)]
    for worker in workers:
        worker.start()
        time.sleep(1.0)  # staggered, so the sampler's first guesses see each other's running trials
    try:
        for worker in workers:
            worker.join()
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
    failed = [w.exitcode for w in workers if w.exitcode]
    if failed:
        raise UserError(f"{len(failed)} trial worker(s) failed (exit status {failed[0]}; see above); "
                        "finished trials are kept in the study: run the same command again to continue")


def write_outputs(study, config: TuneConfig, epochs: int, wall_seconds: float) -> dict:
    """trials.csv, best.toml, summary.json and the plots; prints the best configuration once."""
    out = Path(config.out)
    write_trials_csv(study, out / "trials.csv", epochs)
    best = best_trial(study)
    if best is not None:
        write_best_config(best, out / "best.toml")
    trials = study.get_trials(deepcopy=False)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    skipped_plots = write_plots(study, out)
    for skipped in skipped_plots:
        print(f"tune: skipped {skipped}")
    summary = write_summary(study, out / "summary.json", {
        "trials_wanted": config.trials,
        "max_epochs_per_trial": epochs,
        # The same finished trials, each trained for every epoch: what the pruner is measured against.
        "epochs_without_pruning": sum(t.state in FINISHED for t in trials) * epochs,
        "wall_seconds": round(wall_seconds, 1),
        "study_wall_seconds": round((max(ends) - min(starts)).total_seconds(), 1) if starts and ends else None,
        "skipped_plots": skipped_plots,
        "settings": {**config.to_dict(), "storage": redact(config.storage) if config.storage else None},
    })
    print(f"tune: {summary['trials']} in {wall_seconds:.0f}s; {summary['total_epochs_trained']} epochs trained "
          f"(without pruning: {summary['epochs_without_pruning']})")
    if best is not None:
        test = best_test_accuracy(best)
        print(f"tune: best trial {best.number}: val_accuracy {best.value:.4f}, test_accuracy "
              f"{'unknown' if test is None else f'{test:.4f}'} (reported once, never used to choose), "
              f"params {best.params}")
        print(f"tune: outputs in {out}; reproduce with: distvision train --config {out / 'best.toml'}")
    else:
        print(f"tune: no trial completed; outputs in {out}")
    return summary
