"""Training from a CSV list of image files, through the same CLI users run."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import make_class_image, run_cli


def test_train_from_a_csv_list_of_odd_sized_images(tmp_path: Path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    rows = ["path,label"]
    for label, name in enumerate(["cat", "dog"]):
        for i in range(12):
            file = f"images/{name}-{i}.png"
            make_class_image(label, i, size=40).convert("L" if i % 2 else "RGB").save(tmp_path / "data" / file)
            rows.append(f"{file},{name}")
    rows.append("images/gone.png,cat")
    listing = tmp_path / "data" / "list.csv"
    listing.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    result = run_cli(["train", "--data", str(listing), "--out", str(out), "--workers", "1", "--epochs", "1",
                      "--model", "mlp", "--precision", "fp32", "--batch-size", "8"], tmp_path / "cache", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no test split" in result.stderr and "skipped 1 unreadable file" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(p).name for p in summary["skipped_files"]] == ["gone.png"]
