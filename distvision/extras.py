"""The optional dependencies (pyproject.toml's extras): a one-line error, or a note, when one is missing.

`train`, `evaluate` and `classify` need only the core dependencies. The other commands import their
extra's packages inside `require_extra`, which turns a missing package into a UserError that names
the extra to install; an optional output (a plot) asks `missing` first and is skipped with a note.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

from distvision.errors import UserError

PACKAGE_NAMES = {"sklearn": "scikit-learn"}  # where the name one installs is not the name one imports


def install_hint(extra: str) -> str:
    return f"pip install 'distvision[{extra}]'"


@contextmanager
def require_extra(extra: str, needed_by: str) -> Iterator[None]:
    """Imports in this block are `extra`'s: a package missing there is a UserError saying what to install.

    Only a missing module is translated (ModuleNotFoundError naming a module outside distvision); any
    other import failure is a bug or a broken install and keeps its traceback.
    """
    try:
        yield
    except ModuleNotFoundError as error:
        module = (error.name or "").split(".")[0]
        if not module or module == "distvision":
            raise
        raise UserError(f"{needed_by} needs {PACKAGE_NAMES.get(module, module)}: {install_hint(extra)}") from None


def missing(module: str, extra: str) -> str | None:
    """None when `module` can be imported, else why not and what to install (for a note on a skipped output)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module left half-imported
        found = False
    return None if found else f"{module} is not installed ({install_hint(extra)})"
