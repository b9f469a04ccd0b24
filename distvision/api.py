"""The Python API: `distvision.train`, `evaluate` and `classify`, the commands as functions.

Each takes the command's long option names as keywords (`batch_size=512` for `--batch-size 512`), runs
exactly what the command line runs (the same parser, the same launcher starting the same workers) and
returns the result as a dict instead of printing it. Anything a user can fix raises `UserError`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import sys
from collections.abc import Callable
from contextlib import redirect_stderr
from io import StringIO
from pathlib import Path

from distvision.cli import build_parser, parse_command_line
from distvision.config import TrainConfig
from distvision.errors import UserError


def train(config: TrainConfig | None = None, /, **options) -> dict:
    """Train as `distvision train` does and return its summary (RUN_DIR/summary.json).

    `config` (a TrainConfig) gives settings, keywords override them; `model` may also be a function,
    passed to the workers by its import path (in a script: define it at module level and call
    distvision.train under `if __name__ == "__main__":`, as multiprocessing asks).
    """
    if options.get("print_config"):
        raise UserError("distvision.train(): print_config is the command line's (distvision train --print-config); "
                        "from Python, a TrainConfig holds the settings")
    if callable(options.get("model")):
        options["model"] = model_path(options["model"])
    base = config.to_argv() if config is not None else []
    argv = ["train", *base, *_flags("train", options)]
    settings = TrainConfig.from_namespace(_parse(argv))
    # The run folder is settled here (a default one is named after the time), to find its summary.
    run_dir = settings.run_dir()
    argv += ["--out", str(run_dir)]
    _run(argv)
    return _read_summary(run_dir / "summary.json")


def evaluate(**options) -> dict:
    """A checkpoint's accuracy on a data set's test split, as `distvision evaluate` prints it."""
    from distvision.evaluate import evaluate_checkpoint

    args = _parse(["evaluate", *_flags("evaluate", options)])
    return evaluate_checkpoint(Path(args.checkpoint), Path(args.data), Path(args.cache_dir) if args.cache_dir else None)


def classify(**options) -> dict:
    """Classify images as `distvision classify` does; its summary (summary.json beside the predictions)."""
    argv = ["classify", *_flags("classify", options)]
    args = _parse(argv)
    _run(argv)
    return _read_summary(Path(args.out).parent / "summary.json")


def model_path(builder: Callable) -> str:
    """The `--model` name of a model function: module:function, or the script's file:function for a
    function defined in the script being run."""
    name = getattr(builder, "__qualname__", "")
    if not name.isidentifier():
        raise UserError(f"model {builder!r}: pass a function defined at a module's top level, so that every "
                        "worker can import it")
    module = builder.__module__
    if module == "__main__":
        script = getattr(sys.modules["__main__"], "__file__", None)
        if script is None:
            raise UserError("model: a function defined in an interactive session cannot be imported by the "
                            "workers; put it in a file and pass 'file.py:function'")
        return f"{Path(script).resolve()}:{name}"
    return f"{module}:{name}"


def _subparser(command: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[command]


def _flags(command: str, options: dict) -> list[str]:
    """The command-line flags that say what the keywords say; an unknown keyword is a UserError."""
    actions = {}
    for action in _subparser(command)._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        for option in action.option_strings:
            actions[option.lstrip("-").replace("-", "_")] = (option, action)
        actions.setdefault(action.dest, (action.option_strings[0], action))
    argv: list[str] = []
    for keyword, value in options.items():
        if keyword not in actions:
            close = difflib.get_close_matches(keyword, list(actions), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"distvision.{command.replace('-', '_')}(): unknown keyword {keyword!r}{hint}")
        option, action = actions[keyword]
        if value is None:
            continue
        if action.nargs == 0:  # a switch: store_true, or --x/--no-x
            negative = next((o for o in action.option_strings if o.startswith("--no-")), None)
            if value:
                argv.append(option)
            elif negative and option != negative:
                argv.append(negative)
        elif isinstance(value, (list, tuple)):
            argv += [item for entry in value for item in (option, str(entry))]
        else:
            argv += [option, str(value)]
    return argv


def _parse(argv: list[str]) -> argparse.Namespace:
    """argv parsed by the command line's own parser; its complaint becomes a UserError."""
    complaint = StringIO()
    try:
        with redirect_stderr(complaint):
            return parse_command_line(argv)
    except SystemExit:
        lines = complaint.getvalue().strip().splitlines()
        message = lines[-1].partition("error: ")[2] if lines else "invalid arguments"
        raise UserError(f"distvision.{argv[0].replace('-', '_')}(): {message}") from None


def _run(argv: list[str]) -> None:
    args = _parse(argv)
    command = importlib.import_module(f"distvision.commands.{argv[0].replace('-', '_')}")
    status = command.run(args, argv[1:])
    if status:
        raise UserError(f"distvision {argv[0]} ended with status {status}")


def _read_summary(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"the run ended without a readable {path}: {error}") from None
