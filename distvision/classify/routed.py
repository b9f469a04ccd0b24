"""`distvision classify --checkpoint EACH_DIR`: every image to its own subset's model.

EACH_DIR is what `distvision train-each` wrote: one trained run folder per subset. An input folder
is routed by its top-level subset folders (INPUT/<subset>/...); a CSV input by its `subset` column
(`path,subset`). Each subset's images are classified by an ordinary classify job into
OUT_FOLDER/subsets/<subset>/, then the rows are merged into one predictions.csv with a `subset`
column. An image of a subset without a model goes to errors.csv, or to the global model with
`--fallback global` (train-each --compare-global trains it).
"""

from __future__ import annotations

import csv
import os
from dataclasses import replace
from pathlib import Path

from distvision.classify.settings import ClassifyConfig
from distvision.data.sources import list_files
from distvision.data.subsets import GLOBAL_NAME
from distvision.errors import UserError
from distvision.fileio import write_json_atomic
from distvision.metrics import say

ROUTED_COLUMNS = ["path", "predicted_class", "probability", "top_classes", "top_probabilities", "subset", "model"]


def is_each_dir(path: Path) -> bool:
    """True for a train-each output folder (not a run folder)."""
    return path.is_dir() and (path / "subsets.csv").is_file() and not (path / "checkpoint").exists()


def subset_models(each_dir: Path) -> dict[str, Path]:
    return {d.name: d for d in sorted(each_dir.iterdir()) if (d / "checkpoint").is_dir()}


def classify_routed(config: ClassifyConfig, argv: list[str], fallback: str) -> dict:
    """Classify config.input with EACH_DIR's subset models; return the merged summary."""
    from distvision.classify.worker import classify_command

    each_dir = Path(config.checkpoint)
    models = subset_models(each_dir)
    if not models:
        raise UserError(f"{each_dir} holds no trained subset model yet: run `distvision train-each` first")
    if fallback == "global" and GLOBAL_NAME not in models:
        raise UserError(f"--fallback global: {each_dir} has no global model (train-each --compare-global makes it)")
    out_folder = config.outputs().folder
    groups, errors = _route(Path(config.input), models, fallback, out_folder / "subsets")
    rows, counts = [], {}
    for subset, (model_name, source, names) in sorted(groups.items()):
        predictions = out_folder / "subsets" / subset / "predictions.csv"
        predictions.parent.mkdir(parents=True, exist_ok=True)
        say(f"distvision: subset {subset}: {model_name} model")
        job = replace(config, checkpoint=str(models[model_name]), input=str(source), out=str(predictions))
        classify_command(job, [*argv, "--checkpoint", job.checkpoint, "--input", job.input, "--out", job.out])
        subset_rows = _read_csv(predictions)
        for row in subset_rows:
            row.update(path=names(row["path"]), subset=subset, model=model_name)
        errors += [(names(e["path"]), e["reason"]) for e in _read_csv(predictions.parent / "errors.csv")]
        rows += subset_rows
        counts[subset] = {"model": model_name, "images": len(subset_rows),
                          "summary": str(predictions.parent / "summary.json")}
    _write_csv(Path(config.out), ROUTED_COLUMNS, [[r[c] for c in ROUTED_COLUMNS] for r in sorted(
        rows, key=lambda r: r["path"])])
    _write_csv(out_folder / "errors.csv", ["path", "reason"], sorted(errors))
    summary = {"routed": True, "each_dir": str(each_dir), "images": len(rows), "unreadable_or_unrouted": len(errors),
               "subsets": counts}
    write_json_atomic(out_folder / "summary.json", summary)
    say(f"distvision: {len(rows)} image(s) classified by {len(counts)} subset model(s), {len(errors)} in "
        f"{out_folder / 'errors.csv'}; predictions in {config.out}")
    return summary


def _route(source: Path, models: dict[str, Path], fallback: str, work: Path):
    """{subset: (model name, classify input, row name mapper)} and the errors of unroutable files."""
    groups, errors = {}, []

    def model_for(subset: str) -> str | None:
        if subset in models and subset != GLOBAL_NAME:
            return subset
        return GLOBAL_NAME if fallback == "global" else None

    if source.is_dir():
        for entry in sorted(source.iterdir()):
            if not entry.is_dir():
                errors.append((entry.name, "not inside a subset folder"))
                continue
            model = model_for(entry.name)
            if model is None:
                images, others = list_files(entry)
                errors += [(os.path.relpath(f, source), f"no model for subset {entry.name!r}") for f in images + others]
                continue
            groups[entry.name] = (model, entry, lambda name, prefix=entry.name: f"{prefix}/{name}")
        return groups, errors
    listed: dict[str, list[str]] = {}
    try:
        with open(source, newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"path", "subset"} <= set(reader.fieldnames):
                raise UserError(f"{source}: a routed list is a CSV with the columns path,subset")
            for row in reader:
                listed.setdefault(row["subset"], []).append(row["path"])
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"input {source} is neither a folder of subsets nor a path,subset CSV ({error})") from None
    for subset, paths in listed.items():
        model = model_for(subset)
        if model is None:
            errors += [(p, f"no model for subset {subset!r}") for p in paths]
            continue
        # A list per subset, with absolute paths; rows are renamed back to the CSV's own names.
        work.joinpath(subset).mkdir(parents=True, exist_ok=True)
        absolute = {os.path.join(source.resolve().parent, p): p for p in paths}
        list_file = work / subset / "inputs.txt"
        list_file.write_text("".join(f"{a}\n" for a in absolute))
        groups[subset] = (model, list_file, lambda name, table=absolute: table.get(name, name))
    return groups, errors


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _write_csv(path: Path, header: list[str], rows: list) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)
