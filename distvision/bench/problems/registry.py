"""Problems for `distvision bench`: a data set, a model and a training budget.

Adding a problem is one small file in this package that calls `register_problem`, imported by the
package's __init__.py (as timm's model files are); this module never imports the problem files. A
family of problems named `PREFIX:ARGUMENT` registers its builder with `@register_family` (a user's
own image folder, `folder:PATH`). A problem's data is anything `distvision train --data` reads;
generated problems write a prepared folder once into the cache.
"""

from __future__ import annotations

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
# prefix -> (what follows the prefix, e.g. "PATH"; builder of the problem `prefix:ARGUMENT`)
_FAMILIES: dict[str, tuple[str, Callable[[str], Problem]]] = {}


def register_problem(problem: Problem) -> Problem:
    """Make a problem known by its name (called at import time by its file in this package)."""
    _PROBLEMS[problem.name] = problem
    return problem


def register_family(prefix: str, argument: str) -> Callable[[Callable[[str], Problem]], Callable[[str], Problem]]:
    """Decorator: builder(text) -> Problem answers every problem name `prefix:text`.

    `argument` names the text in messages, e.g. "PATH" for `folder:PATH`.
    """

    def wrap(builder: Callable[[str], Problem]) -> Callable[[str], Problem]:
        _FAMILIES[prefix] = (argument, builder)
        return builder

    return wrap


def list_problems() -> list[Problem]:
    """Every registered problem by name (families such as folder:PATH have no fixed members)."""
    return [_PROBLEMS[name] for name in sorted(_PROBLEMS)]


def get_problem(name: str) -> Problem:
    """A registered problem, or one of a family's (`folder:PATH`: a user's image folder)."""
    prefix, separator, argument = name.partition(":")
    if separator and prefix in _FAMILIES:
        return _FAMILIES[prefix][1](argument)
    if name not in _PROBLEMS:
        families = "".join(f", or {family}:{usage}" for family, (usage, _) in sorted(_FAMILIES.items()))
        raise UserError(f"unknown problem {name!r}; known: {', '.join(sorted(_PROBLEMS))}{families}")
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
