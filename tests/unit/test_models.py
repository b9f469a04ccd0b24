"""The registry and its models."""

from __future__ import annotations

import pytest
import torch

from distvision.errors import UserError
from distvision.models import create, list_models, recipe_for
from distvision.models.registry import count_parameters


@pytest.mark.parametrize("name", [e.name for e in list_models()])
@pytest.mark.parametrize("image_size", [32, 48])
def test_every_model_follows_the_input_size(name: str, image_size: int):
    model = create(name, num_classes=7, image_size=image_size)
    out = model(torch.randn(2, 3, image_size, image_size))
    assert out.shape == (2, 7)


def test_caffe_quick_matches_caffes_layer_shapes():
    model = create("caffe-quick")
    # conv 2,432 + 25,632 + 51,264, ip1 65,600 (64x4x4 inputs after ceil-mode pooling), ip2 650.
    assert count_parameters(model) == 145_578
    assert model[0].weight.std().item() == pytest.approx(1e-4, rel=0.1)
    assert all(m.bias.abs().sum() == 0 for m in model if hasattr(m, "bias") and m.bias is not None)


def test_caffe_full_has_lrn_and_decay_multiplier():
    model = create("caffe-full")
    assert count_parameters(model) == 2_432 + 25_632 + 51_264 + 10_250
    assert model[-1].weight.decay_mult == 250.0


def test_unknown_names_are_user_errors():
    with pytest.raises(UserError, match="unknown model"):
        create("nope")
    with pytest.raises(UserError, match="no recipe"):
        recipe_for("fastnet", "caffe")
    assert recipe_for("caffe-quick", "caffe").lr == 0.001
