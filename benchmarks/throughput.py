"""Training throughput on one machine: distvision against a bare PyTorch loop and PyTorch Lightning.

Three measurements of training images/s, on the same model, data and global batch:
  (1) bare     one process, all cores, a plain PyTorch loop (channels_last), best of fp32 and bf16
  (2) distvision  `distvision train --workers 2 --precision auto`, steady state (first epoch excluded)
  (3) Lightning   Trainer(strategy="ddp", devices=2) on CPU as its docs show, best of 32-true and bf16-mixed

(1), (2) and (3) alternate --repeats times and their medians are reported, because shared machines
are noisy (this project's VMs change speed by a third from one minute to the next). A probe of two
bare-loop steps per precision first drops any precision 1.5x slower than the fastest; the first
round runs the rest, later rounds repeat only those within 15% of the fastest. Lightning is
optional (`pip install -e .[compare]`).

    python benchmarks/throughput.py --data ../shared/datasets/cifar10-jpg --model fastnet --batch-size 512
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distvision.data.augment import AugmentSettings
from distvision.data.batches import Preprocessing, load_batch
from distvision.data.prepare import FORMAT_VERSION, Prepared, ensure_prepared, open_prepared
from distvision.fileio import sha256_file
from distvision.models.registry import create, recipe_for
from distvision.precision import cpu_model_name
from distvision.recipes import Recipe, lr_multiplier

WORKERS = 2  # processes for distvision and Lightning
IMAGE_SIZE = 32
WARMUP_STEPS = 3  # bare-loop steps before timing starts (allocator, oneDNN kernel selection)
LIGHTNING_PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
STILL_IN_RACE = 1.15  # a precision is measured again when its first run was within 15% of the fastest
PROBE_STEPS = 2  # bare-loop steps (after one warm-up step) that decide which precisions are worth timing
PROBE_MARGIN = 1.5  # a precision this much slower than the fastest in the probe is not timed at all
BUSY_LOAD = 0.5  # 1-minute load average above which the machine is not idle enough to measure
TARGETS = {"distvision/bare": 0.95, "distvision/lightning": 1.3}  # for fastnet at global batch 512


class BenchmarkError(Exception):
    """A measured run failed; the message carries the tail of its output."""


# ---------------------------------------------------------------------------------------------------------
# Data: one small prepared folder that all three measurements read.


def write_subset(source: Prepared, out: Path, train_count: int, test_count: int) -> Path:
    """Write a prepared folder (same layout and manifest keys as distvision's prepare()) of a sample.

    The sample is seeded and random, not the first N images: prepared image folders are sorted by
    class, so the first 10,240 CIFAR images would hold only two classes.
    """
    rng = np.random.default_rng(0)
    train_pick = np.sort(rng.choice(len(source.train_images), min(train_count, len(source.train_images)),
                                    replace=False))
    test_pick = np.sort(rng.choice(len(source.test_images), min(test_count, len(source.test_images)),
                                   replace=False))
    train_images = np.ascontiguousarray(source.train_images[train_pick])
    train_labels = source.train_labels[train_pick]
    out.mkdir(parents=True)
    train_images.tofile(out / "train_images.u8")
    np.save(out / "train_labels.npy", train_labels)
    np.ascontiguousarray(source.test_images[test_pick]).tofile(out / "test_images.u8")
    np.save(out / "test_labels.npy", source.test_labels[test_pick])
    np.save(out / "mean_image.npy", train_images.mean(axis=0, dtype=np.float64).astype(np.float32))
    # Channel statistics of the sample itself, as prepare() computes them for its data.
    pixels = train_images.reshape(-1, 3).astype(np.float64)
    files = ["train_images.u8", "train_labels.npy", "test_images.u8", "test_labels.npy", "mean_image.npy"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": source.manifest["source"],
        "source_kind": source.manifest["source_kind"],
        "classes": source.classes,
        "image_size": source.manifest["image_size"],
        "train_count": len(train_pick),
        "test_count": len(test_pick),
        "class_counts": np.bincount(train_labels, minlength=len(source.classes)).tolist(),
        "mean": (pixels.mean(axis=0) / 255).tolist(),
        "std": (pixels.std(axis=0) / 255).tolist(),
        "checksums": {name: sha256_file(out / name) for name in files},
        "skipped_files": [],
        "prepare_seconds": 0.0,
    }
    # The manifest goes last: a folder with a manifest is complete.
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def build_preprocessing(prepared: Prepared, recipe: Recipe) -> Preprocessing:
    """The model's input normalisation, built exactly as distvision's training loop builds it."""
    manifest = prepared.manifest
    return Preprocessing.build(recipe.preprocessing, manifest["mean"], manifest["std"], prepared.mean_image)


# ---------------------------------------------------------------------------------------------------------
# (1) The bare single-process loop.


def batch_indices(sample_count: int, batch_size: int, steps: int) -> list[np.ndarray]:
    """`steps` batches of shuffled sample indices, reshuffling whenever the data runs out."""
    rng = np.random.default_rng(0)
    passes = math.ceil(steps * batch_size / sample_count)
    order = np.concatenate([rng.permutation(sample_count) for _ in range(passes)])
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def bare_loop(prepared: Prepared, model_name: str, batch_size: int, images: int, precision: str,
              warmup_steps: int = WARMUP_STEPS) -> float:
    """Training images/s of a plain PyTorch loop in this process, after warmup_steps untimed steps.

    It does the work distvision's loop does per step: gather and augment the uint8 batch
    (load_batch), normalise to channels_last float, forward under autocast, label-smoothed
    cross-entropy, backward, SGD step with the recipe's schedule, loss.item().
    """
    torch.set_num_threads(os.cpu_count() or 1)
    recipe = recipe_for(model_name)
    torch.manual_seed(0)
    model = create(model_name, num_classes=len(prepared.classes), image_size=IMAGE_SIZE)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, nesterov=recipe.nesterov and recipe.momentum > 0)
    preprocess = build_preprocessing(prepared, recipe)
    augment = AugmentSettings(recipe.translate, recipe.flip, recipe.cutout)
    timed_steps = math.ceil(images / batch_size)
    batches = batch_indices(len(prepared.train_images), batch_size, warmup_steps + timed_steps)
    cpu = torch.device("cpu")
    started, timed_images = 0.0, 0
    for step, indices in enumerate(batches):
        if step == warmup_steps:
            started = time.perf_counter()
        x = load_batch(prepared.train_images, indices, preprocess, cpu, augment, seed=0, epoch=step)
        y = torch.from_numpy(prepared.train_labels[indices])
        # The recipe's schedule keeps the loss finite (a constant peak lr can diverge to NaN/denormals).
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * lr_multiplier(recipe.schedule, step / len(batches))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if step >= warmup_steps:
            timed_images += len(indices)
    return timed_images / (time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------------
# (2) distvision train, as a user runs it.


def _run_quietly(command: list[str], what: str) -> None:
    """Run a command, keeping its output unless it fails (then show the tail)."""
    completed = subprocess.run(command, check=False, capture_output=True, text=True)
    if completed.returncode != 0:
        tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-30:])
        raise BenchmarkError(f"{what} failed (exit status {completed.returncode}):\n{tail}")


def distvision_run(data: Path, model_name: str, batch_size: int, epochs: int, out: Path) -> dict:
    """Run `distvision train` in a subprocess; return its steady-state images/s and chosen precision."""
    _run_quietly([
        sys.executable, "-m", "distvision", "train", "--data", str(data), "--model", model_name,
        "--workers", str(WORKERS), "--epochs", str(epochs), "--batch-size", str(batch_size),
        "--out", str(out), "--precision", "auto",
    ], "distvision train")
    summary = json.loads((out / "summary.json").read_text())
    return {"images_per_second": summary["images_per_second"], "precision": summary["precision"]}


# ---------------------------------------------------------------------------------------------------------
# (3) PyTorch Lightning: DDP on CPU processes, written the way its documentation shows.


def lightning_available() -> bool:
    return importlib.util.find_spec("lightning") is not None


def lightning_run(data: Path, model_name: str, batch_size: int, epochs: int, precision: str, scratch: Path) -> dict:
    """Run this script's Lightning worker in a subprocess (its DDP launcher re-executes the command)."""
    result = scratch / f"lightning-{precision}.json"
    _run_quietly([
        sys.executable, str(Path(__file__).resolve()), "--data", str(data), "--model", model_name,
        "--batch-size", str(batch_size), "--epochs", str(epochs),
        "--lightning-worker", precision, "--lightning-result", str(result),
    ], f"Lightning ({precision})")
    return json.loads(result.read_text())


def lightning_worker(args: argparse.Namespace) -> None:
    """One Lightning DDP rank (rank 0 is started by the benchmark, the others by Lightning)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    recipe = recipe_for(args.model)
    prepared = open_prepared(Path(args.data))
    preprocess = build_preprocessing(prepared, recipe)
    # Preprocessed once, up front, in Lightning's default contiguous NCHW memory format.
    x = torch.cat([
        load_batch(prepared.train_images, np.arange(start, min(start + 4096, len(prepared.train_images))),
                   preprocess, torch.device("cpu")).contiguous()
        for start in range(0, len(prepared.train_images), 4096)
    ])
    dataset = TensorDataset(x, torch.from_numpy(prepared.train_labels))

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = create(args.model, num_classes=len(prepared.classes), image_size=IMAGE_SIZE)

        def training_step(self, batch, batch_idx):
            images, labels = batch
            loss = nn.functional.cross_entropy(self.model(images).float(), labels,
                                               label_smoothing=recipe.label_smoothing)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                   weight_decay=recipe.weight_decay,
                                   nesterov=recipe.nesterov and recipe.momentum > 0)

    class EpochTimer(L.Callback):
        """Images and seconds of every training epoch (the whole world's images, from rank 0's clock)."""

        def __init__(self):
            self.epochs: list[tuple[int, float]] = []

        def on_train_epoch_start(self, trainer, module):
            self.images, self.started = 0, time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.images += len(batch[0])

        def on_train_epoch_end(self, trainer, module):
            # DistributedSampler gives every rank the same number of samples.
            self.epochs.append((self.images * trainer.world_size, time.perf_counter() - self.started))

    timer = EpochTimer()
    scratch = Path(args.lightning_result).parent
    trainer = L.Trainer(
        accelerator="cpu", devices=WORKERS, strategy="ddp", max_epochs=args.epochs,
        precision=LIGHTNING_PRECISIONS[args.lightning_worker], callbacks=[timer],
        default_root_dir=scratch / f"lightning-{args.lightning_worker}",
        enable_progress_bar=False, enable_model_summary=False,  # console output only, not training work
    )
    # Lightning adds the DistributedSampler (shuffled, since shuffle=True) and splits the global batch.
    loader = DataLoader(dataset, batch_size=args.batch_size // WORKERS, shuffle=True)
    trainer.fit(Classifier(), loader)
    if trainer.is_global_zero:
        steady = timer.epochs[1:] or timer.epochs
        Path(args.lightning_result).write_text(json.dumps({
            "images_per_second": sum(n for n, _ in steady) / sum(s for _, s in steady),
            "precision": LIGHTNING_PRECISIONS[args.lightning_worker],
        }))


# ---------------------------------------------------------------------------------------------------------
# Orchestration and report.


def best_of(per_precision: dict[str, float]) -> tuple[str, float]:
    """(precision, images/s) of the fastest precision."""
    return max(per_precision.items(), key=lambda item: item[1])


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    """Run every measurement; return the results as a JSON-ready dict."""
    load = os.getloadavg()[0]
    if load > BUSY_LOAD:
        # A multi-threaded single process suffers far more from competing work than one-thread
        # workers do (every parallel region waits for its slowest thread), so (1) would read low.
        print(f"warning: load average {load:.1f} before starting: other work is running, the figures "
              "(the bare loop's most of all) will not be reliable", flush=True)
    full = open_prepared(ensure_prepared(Path(args.data), IMAGE_SIZE))
    data = full.path
    if args.subset:
        data = write_subset(full, scratch / "data", args.subset, args.subset_test)
    prepared = open_prepared(data)
    print(f"data: {len(prepared.train_images)} training, {len(prepared.test_images)} test images ({data})",
          flush=True)

    use_lightning = not args.skip_lightning and lightning_available()
    if args.skip_lightning:
        print("(3) Lightning: skipped (--skip-lightning)")
    elif not use_lightning:
        print("(3) Lightning: skipped, not installed; install it with `pip install -e .[compare]`")
    worth_timing = probe_precisions(prepared, args.model, args.batch_size)
    bare: dict[str, list[float]] = {precision: [] for precision in worth_timing}
    lightning: dict[str, list[float]] = {LIGHTNING_PRECISIONS[precision]: [] for precision in worth_timing}
    dist_runs: list[dict] = []
    for repeat in range(args.repeats):
        # The first round tries every precision; later rounds only those that can still win, so that
        # the three measurements alternate on this noisy machine without a slow precision's cost.
        this_round = []
        for precision in contenders(bare):
            bare[precision].append(bare_loop(prepared, args.model, args.batch_size, args.images, precision))
            this_round.append(f"bare {precision} {bare[precision][-1]:.0f}")
        dist_runs.append(distvision_run(data, args.model, args.batch_size, args.epochs, scratch / f"run-{repeat}"))
        this_round.append(f"distvision ({dist_runs[-1]['precision']}) {dist_runs[-1]['images_per_second']:.0f}")
        racing = contenders(lightning) if use_lightning else []
        for precision, name in LIGHTNING_PRECISIONS.items():
            if name in racing:
                lightning[name].append(lightning_run(data, args.model, args.batch_size, args.epochs, precision,
                                                     scratch)["images_per_second"])
                this_round.append(f"Lightning {name} {lightning[name][-1]:.0f}")
        print(f"repeat {repeat + 1}/{args.repeats}: {', '.join(this_round)} img/s", flush=True)
    bare_precision, bare_median = best_of({p: statistics.median(v) for p, v in bare.items() if v})
    results = {
        "cpu": cpu_model_name(), "cores": os.cpu_count(), "torch": torch.__version__, "load_average_at_start": load,
        "model": args.model, "global_batch_size": args.batch_size, "train_images": len(prepared.train_images),
        "bare_timed_images": args.images, "epochs": args.epochs, "repeats": args.repeats,
        "bare": {"runs": bare, "precision": bare_precision, "median": bare_median},
        "distvision": {
            "runs": dist_runs,
            "precisions": sorted({run["precision"] for run in dist_runs}),
            "median": statistics.median(run["images_per_second"] for run in dist_runs),
        },
        "lightning": None,
    }
    if use_lightning:
        precision, value = best_of({p: statistics.median(v) for p, v in lightning.items() if v})
        results["lightning"] = {"runs": lightning, "precision": precision, "median": value}
    return results


def probe_precisions(prepared: Prepared, model_name: str, batch_size: int) -> list[str]:
    """The precisions worth a full run: a few bare-loop steps of each, keeping those within
    PROBE_MARGIN of the fastest. On a CPU without native bf16 (AMD Zen 3) bf16 autocast ran 19x
    slower than fp32, and a full bare and Lightning run in it would take most of an hour."""
    probe = {precision: bare_loop(prepared, model_name, batch_size, PROBE_STEPS * batch_size, precision,
                                  warmup_steps=1)
             for precision in LIGHTNING_PRECISIONS}
    fastest = max(probe.values())
    kept = [precision for precision, speed in probe.items() if speed * PROBE_MARGIN >= fastest]
    print(f"precision probe ({PROBE_STEPS} bare steps each): "
          + ", ".join(f"{precision} {speed:.0f} img/s" for precision, speed in probe.items())
          + f"; timing {', '.join(kept)}", flush=True)
    return kept


def contenders(runs: dict[str, list[float]]) -> list[str]:
    """The precisions to run next: all of them at first, then those whose first run came within
    STILL_IN_RACE of the fastest (a precision 3x slower on this CPU is not measured again)."""
    if not all(runs.values()):
        return list(runs)
    fastest = max(values[0] for values in runs.values())
    return [precision for precision, values in runs.items() if values[0] * STILL_IN_RACE >= fastest]


def add_ratios(results: dict) -> None:
    """The two ratios the targets are stated for."""
    ours = results["distvision"]["median"]
    results["ratios"] = {"distvision/bare": ours / results["bare"]["median"]}
    if results["lightning"]:
        results["ratios"]["distvision/lightning"] = ours / results["lightning"]["median"]


def report(results: dict) -> None:
    """Print the table of medians and ratios."""
    print()
    print(f"CPU: {results['cpu']} ({results['cores']} cores), torch {results['torch']}")
    print(f"model {results['model']}, global batch {results['global_batch_size']}, "
          f"{results['train_images']} training images, medians of {results['repeats']} alternations")
    rows = [
        ("(1) bare PyTorch, 1 process", results["bare"]["precision"], results["bare"]["median"]),
        (f"(2) distvision, {WORKERS} workers", "/".join(results["distvision"]["precisions"]),
         results["distvision"]["median"]),
    ]
    if results["lightning"]:
        rows.append((f"(3) Lightning DDP, {WORKERS} processes", results["lightning"]["precision"],
                     results["lightning"]["median"]))
    print(f"{'':<34} {'precision':<11} {'img/s':>8}")
    for name, precision, value in rows:
        print(f"{name:<34} {precision:<11} {value:>8.0f}")
    # The targets are stated for fastnet at global batch 512 only; other settings just show the ratio.
    targeted = results["model"] == "fastnet" and results["global_batch_size"] == 512
    for name, ratio in results["ratios"].items():
        verdict = f"target >= {TARGETS[name]}: {'met' if ratio >= TARGETS[name] else 'MISSED'}" if targeted else ""
        print(f"{name:<22} {ratio:6.3f}   {verdict}".rstrip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="data source or prepared folder (as for distvision train)")
    parser.add_argument("--model", default="fastnet", help="registered model name (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=512, help="global batch size (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="alternations of (1), (2) and (3) (default %(default)s)")
    parser.add_argument("--images", type=int, default=10240, help="images timed per bare-loop run (default %(default)s)")
    parser.add_argument("--subset", type=int, default=10240,
                        help="training images for (2) and (3), and drawn from by (1); 0 = all (default %(default)s)")
    parser.add_argument("--subset-test", type=int, default=1000, help="test images kept in the subset")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs of (2) and (3); the first is excluded from img/s (default %(default)s)")
    parser.add_argument("--skip-lightning", action="store_true")
    parser.add_argument("--json", help="also write the results to this JSON file")
    # Internal: one Lightning DDP rank (see lightning_run).
    parser.add_argument("--lightning-worker", choices=list(LIGHTNING_PRECISIONS), help=argparse.SUPPRESS)
    parser.add_argument("--lightning-result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is excluded from the measurement")
    if args.batch_size < WORKERS:
        parser.error(f"--batch-size must be at least {WORKERS}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.lightning_worker:
        lightning_worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="distvision-bench-") as scratch:
        try:
            results = measure(args, Path(scratch))
        except BenchmarkError as error:
            sys.exit(f"benchmark: {error}")
    add_ratios(results)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
