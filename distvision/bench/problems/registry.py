"""Problems for `distvision bench`: a data set, a model and a training budget.

Adding a problem is one small file in this package that calls `register_problem`; a user's own
image folder is a problem too (`folder:PATH`). A problem's data is anything `distvision train
--data` reads; generated problems write a prepared folder once into the cache.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from distvision.data.prepare import file_lock, is_prepared, prepare_source
from distvision.data.sources import Source
from distvision.errors import UserError


@dataclass(frozen=True)
class BenchSettings:
    """What every problem's data may need: where to cache generated data, where CIFAR-10 is."""

    cache_dir: Path
    cifar_data: str | None = None  # None: train downloads the official CIFAR-10


@dataclass(frozen=True)
class Problem:
    name: str
    description: str
    model: str
    epochs: int  # the budget: most epochs
    data: Callable[[BenchSettings], str]  # a path `distvision train --data` reads
    # Further train flags (batch size, lr, a target accuracy that ends the run early, ...).
    train_args: tuple[str, ...] = field(default_factory=tuple)


_PROBLEMS: dict[str, Problem] = {}


def register_problem(problem: Problem) -> Problem:
    _PROBLEMS[problem.name] = problem
    return problem


def list_problems() -> list[Problem]:
    _load_problem_files()
    return [_PROBLEMS[name] for name in sorted(_PROBLEMS)]


def get_problem(name: str) -> Problem:
    """A registered problem, or `folder:PATH` (a user's image folder, trained with caffe-quick)."""
    if name.startswith("folder:"):
        from distvision.bench.problems.imagefolder import folder_problem

        return folder_problem(Path(name.removeprefix("folder:")))
    _load_problem_files()
    if name not in _PROBLEMS:
        raise UserError(f"unknown problem {name!r}; known: {', '.join(sorted(_PROBLEMS))}, or folder:PATH")
    return _PROBLEMS[name]


def resolve(spec: str) -> list[Problem]:
    """'all' or a comma-separated list of problem names (and folder:PATH entries)."""
    names = [item.strip() for item in spec.split(",") if item.strip()]
    if not names:
        raise UserError(f"--problems needs 'all' or problem names, e.g. parity8,digits (got {spec!r})")
    if names == ["all"]:
        return list_problems()
    return [get_problem(name) for name in names]


def generated_data(settings: BenchSettings, name: str, make_source: Callable[[], Source], image_size: int) -> str:
    """A prepared folder for a generated problem, built once under a lock (bench runs may start together)."""
    target = settings.cache_dir / "bench" / name
    if not is_prepared(target):
        with file_lock(target.with_name(target.name + ".lock")):
            if not is_prepared(target):
                prepare_source(make_source(), target, f"distvision bench problem {name}", image_size, processes=1)
    return str(target)


def _load_problem_files() -> None:
    # Importing every module of this package runs its register_problem call.
    package = Path(__file__).parent
    for module in pkgutil.iter_modules([str(package)]):
        if module.name not in ("registry", "imagefolder"):
            importlib.import_module(f"distvision.bench.problems.{module.name}")
