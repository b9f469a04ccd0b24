"""A user's own image folder as a bench problem: `--problems folder:PATH` (caffe-quick, 10 epochs)."""

from __future__ import annotations

from pathlib import Path

from distvision.bench.problems.registry import Problem, register_family
from distvision.errors import UserError


@register_family("folder", argument="PATH")
def folder_problem(folder: str) -> Problem:
    """The image folder at `folder` as a problem named after it, trained with caffe-quick for 10 epochs."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"--problems folder:{path}: no such folder (expected ROOT/<class>/* or ROOT/train/<class>/*)")
    return Problem(name=f"folder:{path.name}", description=f"the image folder {path}", model="caffe-quick",
                   epochs=10, data=lambda settings: str(path))
