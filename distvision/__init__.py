"""distvision: distributed image classification and model training.

From Python: `distvision.train(data=..., model=..., workers=2, epochs=1, out=...)` returns the run's
summary; `distvision.evaluate(...)` and `distvision.classify(...)` likewise (distvision/api.py).
"""

import importlib
import sys
import types

from distvision.errors import UserError

__version__ = "0.1.0"
__all__ = ["TrainConfig", "UserError", "__version__", "classify", "evaluate", "train"]


def train(config=None, /, **options) -> dict:
    """Train as `distvision train` does (the flags' long names as keywords); the run's summary."""
    return _api().train(config, **options)


def evaluate(**options) -> dict:
    """A checkpoint's accuracy on a data set's test split, as `distvision evaluate` measures it."""
    return _api().evaluate(**options)


def classify(**options) -> dict:
    """Classify images as `distvision classify` does; its summary."""
    return _api().classify(**options)


def _api():
    # Imported by name on first use: the command line and the workers read __version__ from this package
    # and need none of the API (which sits above them in the layers, pyproject.toml).
    return importlib.import_module("distvision.api")


def __getattr__(name: str):
    if name == "TrainConfig":  # imported on first use: every worker imports this package, and needs none of it
        from distvision.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'distvision' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps distvision.train, .evaluate and .classify the functions above: importing the modules of the
    same names (the training loop, evaluation, the classify package) would otherwise replace them, as
    Python sets a package's attribute to each submodule it imports."""

    def __setattr__(self, name: str, value) -> None:
        if name in ("train", "evaluate", "classify") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
