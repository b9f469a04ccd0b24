"""Optional dependencies: a command whose extra is missing says which to install in one line, exit 2; a plot
whose matplotlib is missing is skipped with a note, and the rest of the outputs are written.

A package counts as missing the way Python makes it so: `sys.modules[name] = None` makes `import name`
raise ModuleNotFoundError. The distvision modules that import it are dropped from sys.modules first, so
the command imports them again, as a fresh `distvision` process would (this tier starts no process).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from distvision.cli import main
from distvision.errors import UserError
from tests.helpers import tune_args


def uninstall(monkeypatch, package: str, *importers: str) -> None:
    """Make `package` missing, and forget the distvision modules (and their submodules) that import it."""
    for name in [package, *(name for name in sys.modules if name.startswith(package + "."))]:
        monkeypatch.setitem(sys.modules, name, None)  # a submodule already imported would still be found
    for name in list(sys.modules):
        if any(name == prefix or name.startswith(prefix + ".") for prefix in importers):
            parent, _, leaf = name.rpartition(".")
            if hasattr(sys.modules.get(parent), leaf):  # the import again rebinds it: put the original back after
                monkeypatch.setattr(sys.modules[parent], leaf, sys.modules[name])
            monkeypatch.delitem(sys.modules, name)


def error_line(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_status:
        main(list(argv))
    stderr = capsys.readouterr().err
    assert exit_status.value.code == 2 and stderr.count("\n") == 1, stderr
    return stderr.strip()


def test_tune_without_optuna_names_the_extra(monkeypatch, capsys, tiny_images, tmp_path):
    uninstall(monkeypatch, "optuna", "distvision.tune", "distvision.commands.tune")
    line = error_line(capsys, *tune_args(tiny_images, tmp_path / "search"))
    assert line == "distvision: error: distvision tune needs optuna: pip install 'distvision[tune]'"
    assert not (tmp_path / "search").exists()


def test_tune_help_needs_no_optuna(monkeypatch, capsys):
    uninstall(monkeypatch, "optuna", "distvision.tune", "distvision.commands.tune")
    with pytest.raises(SystemExit) as exit_status:
        main(["tune", "--help"])
    assert exit_status.value.code == 0 and "--workers-per-trial" in capsys.readouterr().out


def test_scale_without_scipy_names_the_extra_before_measuring(monkeypatch, capsys, tiny_images, tmp_path):
    uninstall(monkeypatch, "scipy", "distvision.scale", "distvision.commands.scale")
    line = error_line(capsys, "scale", "--data", str(tiny_images), "--out", str(tmp_path / "scale"))
    assert line == "distvision: error: distvision scale needs scipy: pip install 'distvision[scale]'"
    assert not (tmp_path / "scale").exists()


def test_digits_problem_without_scikit_learn_names_the_extra(monkeypatch):
    from distvision.bench.problems.digits import digits_source

    uninstall(monkeypatch, "sklearn")
    with pytest.raises(UserError, match=r"^distvision bench's digits problem needs scikit-learn: "
                                         r"pip install 'distvision\[bench\]'$"):
        digits_source()


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # heartbeats, as in tune
def test_postgres_storage_without_its_driver_names_the_extra(monkeypatch):
    from distvision.tune.config import TuneConfig
    from distvision.tune.study import open_storage

    uninstall(monkeypatch, "psycopg2")
    with pytest.raises(UserError, match=r"needs psycopg2: pip install 'distvision\[postgres\]'$") as error:
        open_storage(TuneConfig(storage="postgresql://tuner:secret@localhost/study"))
    assert "secret" not in str(error.value)


def test_a_missing_module_of_distvision_itself_is_not_blamed_on_an_extra():
    from distvision.extras import require_extra

    with pytest.raises(ModuleNotFoundError), require_extra("tune", "distvision tune"):
        import distvision.no_such_module  # noqa: F401


def test_classify_skips_its_plot_without_matplotlib(monkeypatch, capsys, tmp_path):
    from distvision.classify.report import plot_confusion

    uninstall(monkeypatch, "matplotlib")
    plot_confusion(np.array([[3, 1], [0, 4]]), ["cat", "dog"], 0.875, tmp_path / "confusion_matrix.png")
    assert not (tmp_path / "confusion_matrix.png").exists()
    assert capsys.readouterr().out == ("distvision: no confusion_matrix.png: matplotlib is not installed "
                                       "(pip install 'distvision[plots]')\n")


def test_train_each_skips_its_plot_without_matplotlib(monkeypatch, capsys, tmp_path):
    from distvision.train_each_report import plot_comparison

    uninstall(monkeypatch, "matplotlib")
    plot_comparison([], tmp_path / "comparison.png")
    assert not (tmp_path / "comparison.png").exists()
    assert "train-each: no comparison.png: matplotlib is not installed" in capsys.readouterr().out


def test_tune_records_its_skipped_plots_without_matplotlib(monkeypatch, tmp_path):
    import optuna

    from distvision.tune.report import write_plots

    uninstall(monkeypatch, "matplotlib")
    skipped = write_plots(optuna.create_study(direction="maximize"), tmp_path)
    assert skipped == ["plots: matplotlib is not installed (pip install 'distvision[plots]')"]
    assert list(tmp_path.iterdir()) == []


def test_scale_skips_its_plots_without_matplotlib(monkeypatch, capsys, tmp_path):
    from distvision.scale.plots import write_plots

    uninstall(monkeypatch, "matplotlib")
    assert write_plots(tmp_path, None, [], [], 1000, "1") == []
    assert list(tmp_path.iterdir()) == []
    assert "distvision scale: no plots: matplotlib is not installed" in capsys.readouterr().out
