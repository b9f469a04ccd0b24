"""Users' own models (`--model module:function`, `file.py:function`, the `distvision.models` entry points),
recipes from TOML files, and the Python API's keyword checks; trained for real in tests/e2e/test_own_model.py."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import distvision
from distvision.api import model_path
from distvision.config import TrainConfig
from distvision.errors import UserError
from distvision.models import registry
from distvision.models.registry import PLAIN_RECIPE, create, list_models, recipe_for, recorded_name
from distvision.training.setup import resolve_recipe

MODELS = '''
from torch import nn

def tiny(num_classes):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

def sized(num_classes, image_size, width=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, width), nn.Linear(width, num_classes))

def flexible(**options):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(options["num_classes"]))

def one_too_many(num_classes):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes + 1))

def not_a_module(num_classes):
    return "a string"

def no_classes():
    return nn.Identity()

def breaks(num_classes):
    return nn.Linear(5, num_classes)  # a 2 x 3 x S x S batch does not fit

if __name__ == "__main__":
    raise SystemExit("importing a model file must not run its script part")
'''


@pytest.fixture
def model_file(tmp_path, monkeypatch) -> Path:
    """usermodels.py in a folder that is the working directory (as where a user types the command)."""
    path = tmp_path / "usermodels.py"
    path.write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


@pytest.mark.parametrize("function", ["tiny", "sized", "flexible"])
def test_a_users_function_builds_with_the_arguments_it_takes(model_file, function):
    for name in (f"usermodels:{function}", f"{model_file}:{function}", f"usermodels.py:{function}"):
        model = create(name, num_classes=7, image_size=16)
        assert model(torch.zeros(3, 3, 16, 16)).shape == (3, 7)
    assert recipe_for(f"usermodels:{function}") == PLAIN_RECIPE


def test_a_users_model_is_not_listed_and_its_file_is_recorded_absolute(model_file):
    create("usermodels.py:tiny", num_classes=3, image_size=8)
    assert "usermodels.py:tiny" not in {entry.name for entry in list_models()}
    assert recorded_name("usermodels.py:tiny") == f"{model_file}:tiny"
    assert recorded_name("usermodels:tiny") == "usermodels:tiny"
    assert recorded_name("caffe-quick") == "caffe-quick"


@pytest.mark.parametrize(("name", "message"), [
    ("usermodels:one_too_many", "output of shape (2, 8), not (2, 7) logits"),
    ("usermodels:not_a_module", "returned str, not a torch.nn.Module"),
    ("usermodels:no_classes", "must take num_classes="),
    ("usermodels:breaks", "fails on a 2 x 3 x 16 x 16 batch"),
    ("usermodels:missing", "module 'usermodels' has no function 'missing'"),
    ("nosuchmodule:build", "cannot import 'nosuchmodule' on "),
    ("nosuchfile.py:build", "no file "),
    ("usermodels:", "expected package.module:function"),
    ("nosuchmodel", "unknown model 'nosuchmodel'"),
])
def test_a_bad_model_is_one_clear_error(model_file, name, message):
    with pytest.raises(UserError) as error:
        create(name, num_classes=7, image_size=16)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_module_that_fails_to_import_names_the_module(tmp_path, monkeypatch):
    (tmp_path / "broken.py").write_text("raise RuntimeError('no GPU driver here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"cannot import 'broken' on .*RuntimeError: no GPU driver here"):
        create("broken:build")


def test_installed_packages_register_models_through_entry_points(tmp_path, monkeypatch):
    # A real installed distribution's metadata on sys.path, as pip leaves it: importlib.metadata finds it.
    (tmp_path / "labnets.py").write_text(textwrap.dedent('''
        from torch import nn
        def wide(num_classes, image_size):
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, num_classes))
    '''))
    info = tmp_path / "labnets-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: labnets\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[distvision.models]\nlab-wide = labnets:wide\n"
                                           "lab-broken = labnets:nothing_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    names = {entry.name for entry in list_models()}
    assert "lab-wide" in names and "caffe-quick" in names
    assert "lab-broken" not in names  # a broken plugin is skipped with a warning, not fatal
    assert create("lab-wide", num_classes=4, image_size=8)(torch.zeros(1, 3, 8, 8)).shape == (1, 4)


def test_a_toml_recipe_lays_its_fields_over_the_models(tmp_path):
    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text('epochs = 3\nbatch-size = 64\nflip = true\nschedule = [[0, 1], [1, 0]]\n')
    recipe = resolve_recipe(TrainConfig(data="-", model="caffe-quick", recipe=str(recipe_file), lr=0.01))
    assert (recipe.epochs, recipe.batch_size, recipe.flip, recipe.lr) == (3, 64, True, 0.01)
    assert recipe.schedule == ((0, 1), (1, 0))
    assert recipe.momentum == recipe_for("caffe-quick").momentum  # the rest stays the model's
    recipe_file.write_text("epoch = 3\n")
    with pytest.raises(UserError, match="unknown field"):
        recipe_for("caffe-quick", str(recipe_file))
    with pytest.raises(UserError, match="cannot read it"):
        recipe_for("caffe-quick", str(tmp_path / "missing.toml"))


def named_function(num_classes):
    return nn.Linear(1, num_classes)


def test_the_api_names_a_function_by_its_import_path():
    assert model_path(named_function) == f"{__name__}:named_function"
    with pytest.raises(UserError, match="top level"):
        model_path(lambda num_classes: nn.Linear(1, num_classes))


@pytest.mark.parametrize(("call", "message"), [
    (lambda: distvision.train(data="-", batch_szie=8), "unknown keyword 'batch_szie'; did you mean 'batch_size'?"),
    (lambda: distvision.train(data="-", epochs="two"), "(): argument --epochs: invalid int value: 'two'"),
    (lambda: distvision.train(data="-", sync="gossip"), "argument --sync: invalid choice: 'gossip'"),
    (lambda: distvision.evaluate(checkpoint="-", data="-", top_k=3), "unknown keyword 'top_k'"),
    (lambda: distvision.classify(checkpoint="-", inputs="-"), "did you mean 'input'?"),
    (lambda: distvision.train(data="-", print_config=True), "print_config is the command line's"),
])
def test_the_api_refuses_bad_keywords_in_one_line_before_any_work(call, message):
    with pytest.raises(distvision.UserError) as error:
        call()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_api_reads_a_config_file_as_the_command_does(tmp_path):
    settings = tmp_path / "settings.toml"
    settings.write_text('modle = "mlp"\n')
    with pytest.raises(distvision.UserError, match="unknown setting 'modle'"):
        distvision.train(data="-", config=str(settings))


def test_the_package_keeps_its_functions_beside_the_modules_of_the_same_names():
    import distvision.classify.worker
    import distvision.evaluate
    import distvision.train

    assert all(callable(getattr(distvision, name)) for name in ("train", "evaluate", "classify"))
    assert distvision.TrainConfig is TrainConfig
