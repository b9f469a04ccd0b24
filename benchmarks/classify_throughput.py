"""Batch classification throughput: `distvision classify --workers 2` against a bare single-process loop.

Both classify the test images of an ImageFolder data set (DATA/test/<class>/*) from their files with
the same trained checkpoint:
  (1) bare        one process using every core: a plain loop that decodes each batch of files with PIL
                  (the decode training uses), runs the model (channels_last, the checkpoint's precision
                  and test-time flip) and takes the top 5; images/s after its first batch
  (2) classify    `distvision classify --workers 2`; summary.json's steady-state images/s
They alternate --repeats times and the medians are reported, with start-up seconds (from process start
until classifying began) apart. The accuracy classify reports is checked against `distvision evaluate`
on the same checkpoint.

    python benchmarks/classify_throughput.py --checkpoint RUN_DIR --data ../shared/datasets/cifar10-jpg
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distvision.classify.settings import ClassifyConfig
from distvision.data.sources import list_files, read_image
from distvision.inference import forward_logits, load_inference_model
from distvision.precision import cpu_model_name

WORKERS = 2
BATCH_SIZE = ClassifyConfig.batch_size  # the same batches as classify's default
TOP_K = 5
TARGET = 0.9  # classify / bare, steady state


def _process_started_at() -> float:
    from distvision.classify.worker import _process_started_at as started

    return started()


def bare_worker(checkpoint: Path, folder: Path, result_file: Path) -> None:
    """(1): one process, every core, a plain loop over the files."""
    started_at = _process_started_at()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    loaded = load_inference_model(checkpoint)
    model, preprocess, device = loaded.model, loaded.preprocess, loaded.device
    files = sorted(list_files(folder)[0])
    labels = [loaded.classes.index(Path(f).relative_to(folder).parts[0]) for f in files]
    correct, timed_images, timed_from = 0, 0, None
    first_batch_at = time.time()
    with torch.inference_mode():
        for start in range(0, len(files), BATCH_SIZE):
            batch = np.stack([read_image(f, loaded.image_size) for f in files[start : start + BATCH_SIZE]])
            x = preprocess(torch.from_numpy(batch))
            logits = forward_logits(model, x, loaded.precision, device, loaded.test_time_flip,
                                    loaded.test_time_shift)
            top = torch.softmax(logits, dim=1).topk(TOP_K, dim=1).indices
            correct += int((top[:, 0] == torch.tensor(labels[start : start + BATCH_SIZE])).sum())
            if timed_from is None:
                timed_from = time.perf_counter()  # the first batch is warm-up
            else:
                timed_images += len(batch)
    seconds = time.perf_counter() - timed_from
    result_file.write_text(json.dumps({
        "steady_state_images_per_second": timed_images / seconds,
        "startup_seconds": first_batch_at - started_at,
        "end_to_end_seconds": time.time() - started_at,
        "accuracy": correct / len(files),
        "threads": torch.get_num_threads(),
    }))


def _run(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"benchmark: {what} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    return result.stdout


def bare_run(checkpoint: Path, folder: Path, scratch: Path) -> dict:
    result = scratch / "bare.json"
    _run([sys.executable, str(Path(__file__).resolve()), "--checkpoint", str(checkpoint), "--data", str(folder),
          "--bare-worker", str(result)], "the bare loop")
    return json.loads(result.read_text())


def classify_run(checkpoint: Path, folder: Path, scratch: Path) -> dict:
    out = scratch / "classify" / "predictions.csv"
    _run([sys.executable, "-m", "distvision", "classify", "--checkpoint", str(checkpoint), "--input", str(folder),
          "--out", str(out), "--workers", str(WORKERS), "--top-k", str(TOP_K), "--no-resume"], "distvision classify")
    return json.loads((out.parent / "summary.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a trained run folder (e.g. fastnet)")
    parser.add_argument("--data", required=True, help="ImageFolder data set root; its test/ folder is classified")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--bare-worker", help=argparse.SUPPRESS)  # internal: run (1) and write its result here
    args = parser.parse_args(argv)
    checkpoint, data = Path(args.checkpoint), Path(args.data)
    if args.bare_worker:
        bare_worker(checkpoint, data, Path(args.bare_worker))
        return

    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.1f} before starting: other work is running, figures will be noisy")
    folder = data / "test"
    bare, ours = [], []
    with tempfile.TemporaryDirectory(prefix="distvision-classify-bench-") as scratch:
        for repeat in range(args.repeats):
            bare.append(bare_run(checkpoint, folder, Path(scratch)))
            ours.append(classify_run(checkpoint, folder, Path(scratch)))
            print(f"repeat {repeat + 1}/{args.repeats}: bare {bare[-1]['steady_state_images_per_second']:.0f} img/s "
                  f"(start-up {bare[-1]['startup_seconds']:.1f}s), classify "
                  f"{ours[-1]['steady_state_images_per_second']:.0f} img/s (start-up "
                  f"{ours[-1]['startup_seconds']:.1f}s, end to end {ours[-1]['end_to_end_images_per_second']:.0f} "
                  "img/s)", flush=True)
    evaluated = json.loads(_run([sys.executable, "-m", "distvision", "evaluate", "--checkpoint", str(checkpoint),
                                 "--data", str(data)], "distvision evaluate"))

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    results = {
        "cpu": cpu_model_name(), "cores": os.cpu_count(), "torch": torch.__version__, "load_average_at_start": load,
        "model": ours[0]["model"], "precision": ours[0]["precision"], "test_time_flip": ours[0]["test_time_flip"],
        "images": ours[0]["images"], "repeats": args.repeats,
        "bare": {"runs": bare, "steady_state_images_per_second": median(bare, "steady_state_images_per_second"),
                 "startup_seconds": median(bare, "startup_seconds"), "accuracy": bare[0]["accuracy"]},
        "classify": {
            "runs": [{k: v for k, v in run.items() if k != "per_class"} for run in ours],
            "steady_state_images_per_second": median(ours, "steady_state_images_per_second"),
            "end_to_end_images_per_second": median(ours, "end_to_end_images_per_second"),
            "startup_seconds": median(ours, "startup_seconds"),
            "accuracies": sorted({run["accuracy"] for run in ours}),
        },
        "evaluate_test_accuracy": evaluated["test_accuracy"],
    }
    ratio = results["classify"]["steady_state_images_per_second"] / results["bare"]["steady_state_images_per_second"]
    results["ratio"] = ratio
    print()
    print(f"CPU: {results['cpu']} ({results['cores']} cores), torch {results['torch']}")
    print(f"{results['model']} ({results['precision']}, test-time flip {results['test_time_flip']}), "
          f"{results['images']} JPEG files, batch {BATCH_SIZE}, median of {args.repeats}")
    print(f"{'':<36} {'steady img/s':>12} {'start-up s':>10}")
    print(f"{'(1) bare loop, 1 process x all cores':<36} {results['bare']['steady_state_images_per_second']:>12.0f} "
          f"{results['bare']['startup_seconds']:>10.1f}")
    print(f"{f'(2) distvision classify, {WORKERS} workers':<36} "
          f"{results['classify']['steady_state_images_per_second']:>12.0f} {results['classify']['startup_seconds']:>10.1f}")
    print(f"classify/bare {ratio:.3f}   target >= {TARGET}: {'met' if ratio >= TARGET else 'MISSED'}")
    accuracies = results["classify"]["accuracies"]
    same = accuracies == [evaluated["test_accuracy"]]
    print(f"accuracy: classify {accuracies}, evaluate {evaluated['test_accuracy']}, bare {bare[0]['accuracy']}: "
          f"{'equal' if same else 'DIFFERENT'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
