"""fastnet's record recipe: each trick checked on its own (distvision/tricks.py); in real runs:
tests/e2e/test_recipe.py."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
from torch import nn

from distvision.cli import build_parser
from distvision.config import TrainConfig
from distvision.data.augment import AugmentSettings, augment_batch
from distvision.evaluate import evaluate_part
from distvision.inference import forward_logits
from distvision.models import create
from distvision.recipes import lr_multiplier
from distvision.training.setup import make_optimizer, resolve_recipe
from distvision.tricks import Lookahead, freeze_norm_scales, image_patches, init_whitening, whitening_filters

CPU = torch.device("cpu")


def correlated_images(count: int = 200, seed: int = 0) -> torch.Tensor:
    """Smooth noise with correlated channels: neighbouring pixels covary, as in photographs."""
    base = torch.randn(count, 3, 35, 35, generator=torch.Generator().manual_seed(seed))
    smooth = base[:, :, :32, :32] + base[:, :, 1:33, 1:33] + base[:, :, 3:, 3:]
    return smooth + smooth.mean(1, keepdim=True)


def test_whitening_makes_the_patch_covariance_near_identity():
    images = correlated_images()
    patches = image_patches(images, (2, 2))
    raw_covariance = patches.T @ patches / len(patches)
    assert (raw_covariance - torch.eye(12, dtype=raw_covariance.dtype)).abs().max() > 0.5  # far from white

    model = create("fastnet")
    init_whitening(model, images, rank=0)
    stem = model[0]
    assert not stem.weight.requires_grad and stem.bias.requires_grad  # filters frozen, bias learns
    out = nn.functional.conv2d(images, stem.weight)  # no bias: the whitened patches themselves
    components = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    covariance = components.T @ components / len(components)
    torch.testing.assert_close(covariance, torch.eye(12, dtype=torch.float64), atol=5e-3, rtol=0)
    torch.testing.assert_close(out[:, 12:], -out[:, :12])  # the second half: the same axes negated
    # Strongest axis first, as a later layer's dirac init expects the same order on every run.
    assert torch.equal(stem.weight[:12].flatten(1), whitening_filters(patches)[:12])


def test_frozen_norm_scales_leave_only_shifts_to_the_optimizer():
    model = create("fastnet")
    freeze_norm_scales(model)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not m.weight.requires_grad and bool((m.weight == 1).all()) for m in norms)
    recipe = resolve_recipe(TrainConfig(data="-", model="fastnet"))
    optimizer = make_optimizer(model, recipe)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(m.weight) not in in_optimizer and id(m.bias) in in_optimizer for m in norms)
    shifts = next(g for g in optimizer.param_groups if any(p is norms[0].bias for p in g["params"]))
    assert shifts["lr_mult"] == 64.0
    stem_bias = next(g for g in optimizer.param_groups if any(p is model[0].bias for p in g["params"]))
    assert stem_bias["lr_mult"] == 1.0  # the stem's bias is no norm shift


def test_decoupled_weight_decay_per_step_does_not_follow_the_learning_rate():
    decays = []
    for lr in (0.5, 3.0):
        recipe = resolve_recipe(TrainConfig(data="-", model="fastnet", lr=lr))
        optimizer = make_optimizer(create("fastnet"), recipe)
        # SGD shrinks a weight by lr * weight_decay per step (before momentum).
        decays.append(sorted({round(lr * g["lr_mult"] * g["weight_decay"], 12) for g in optimizer.param_groups}))
    assert decays[0] == decays[1] == [0.002]  # 0.002 per 1024 samples, at the recipe's batch of 1024
    coupled = resolve_recipe(TrainConfig(data="-", model="fastnet", lr=3.0, disable=["decoupled-wd"]))
    assert {g["weight_decay"] for g in make_optimizer(create("fastnet"), coupled).param_groups} == {0.002}


def test_schedule_per_step_follows_the_global_batch_and_epochs():
    recipe = resolve_recipe(TrainConfig(data="-", model="fastnet"))
    steps = 10 * -(-50_000 // recipe.batch_size)  # 10 epochs of 49 global batches, on any worker count
    lrs = [recipe.lr * lr_multiplier(recipe.schedule, step / steps) for step in range(steps)]
    assert lrs[0] == pytest.approx(0.2 * 1.5)
    peak = int(np.argmax(lrs))
    assert peak == round(0.23 * steps) and lrs[peak] == pytest.approx(1.5, rel=1e-2)
    assert all(a <= b for a, b in pairwise(lrs[: peak + 1]))  # warm up, then only down
    assert all(a >= b for a, b in pairwise(lrs[peak:]))
    assert lrs[-1] == pytest.approx(0.07 * 1.5, rel=0.05)


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    image = torch.arange(4 * 4 * 3, dtype=torch.uint8).view(1, 4, 4, 3).expand(64, 4, 4, 3).contiguous()
    indices = np.arange(64)
    settings = AugmentSettings(flip=True, alternating_flip=True)
    flipped = [
        torch.tensor([torch.equal(augment_batch(image, indices, settings, 0, epoch)[i], image[i].flip(1))
                      for i in range(64)]) for epoch in range(4)
    ]
    assert torch.equal(flipped[1], ~flipped[0]) and torch.equal(flipped[2], flipped[0])
    assert 16 < int(flipped[0].sum()) < 48  # the starting views are a random half


def stripes(count: int, seed: int, noise: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four noisy classes that flips and small shifts do not change: rows, columns, grid, flat."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, count)
    images = np.full((count, 16, 16, 3), 80.0, np.float32)
    for i, label in enumerate(labels):
        line = ((np.arange(16) + rng.integers(0, 4)) // 2) % 2 * 100.0
        images[i] += [line[:, None, None], line[None, :, None],
                      (line[:, None, None] + line[None, :, None]) / 2, 50.0][label]
    images += rng.normal(0, noise, images.shape)
    return torch.from_numpy(np.clip(images, 0, 255).astype(np.uint8)), torch.from_numpy(labels)


@pytest.fixture
def one_thread():
    """For tiny models: one thread is as fast as two, and does not collapse when other work shares
    the cores (with two threads beside a training run this test took 126 s instead of about 5)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_test_time_augmentation_raises_accuracy_of_an_augmented_model(one_thread):
    train_images, train_labels = stripes(2000, seed=0)
    test_images, test_labels = stripes(1000, seed=1)

    def inputs(images):
        return (images.permute(0, 3, 1, 2).float() - 128) / 64

    def accuracies(seed: int) -> np.ndarray:
        """Test accuracy of one trained model with 1, 2 and 6 views."""
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                              nn.Linear(8, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        augment = AugmentSettings(translate=2, flip=True)
        for step in range(200):
            batch = np.random.default_rng(step).integers(0, 2000, 64)
            x = inputs(augment_batch(train_images[batch], batch, augment, seed, step))
            loss = nn.functional.cross_entropy(model(x), train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            return np.array([(forward_logits(model, inputs(test_images), "fp32", CPU, *views).argmax(1)
                              == test_labels).float().mean().item()
                             for views in ((False, False), (True, False), (True, True))])

    # Averaged over three models: one model's margins are a few test images, and CPUs differ in the
    # last bits of fp32 convolutions (a single model's plain accuracy was 0.977 on Zen 4, below 0.97 on a Xeon).
    plain, flip, flip_shift = np.mean([accuracies(seed) for seed in range(3)], axis=0)
    assert 0.6 < plain < 0.985, plain  # hard enough for more views to matter
    assert plain < flip < flip_shift, (plain, flip, flip_shift)


def test_lookahead_lowers_the_loss_of_noisy_sgd(one_thread):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 20, generator=generator)
    y = (x @ torch.randn(20, 4, generator=generator) + 2 * torch.randn(4096, 4, generator=generator)).argmax(1)

    def train(lookahead_every: int) -> tuple[float, float]:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.85, nesterov=True)
        lookahead = Lookahead(model, lookahead_every) if lookahead_every else None
        batches = torch.Generator().manual_seed(2)
        for step in range(1, 401):
            batch = torch.randint(0, 3072, (32,), generator=batches)
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if lookahead:
                lookahead.maybe_update(model, step, step / 400)
        if lookahead:
            lookahead.finish(model)
        with torch.no_grad():
            logits = model(x[3072:])
        return nn.functional.cross_entropy(logits, y[3072:]).item(), (logits.argmax(1) == y[3072:]).float().mean().item()

    plain_loss, plain_accuracy = train(0)
    averaged_loss, averaged_accuracy = train(5)
    assert averaged_loss < 0.9 * plain_loss and averaged_accuracy >= plain_accuracy


def test_a_round_s_catch_up_pull_weighs_each_pull_it_crossed():
    """Under local SGD the lookahead pulls once per round: a round of one step is exactly the per-step
    pull, and a round that crossed n pulls forgets the old average as n pulls would."""
    def fresh() -> tuple[nn.Module, Lookahead]:
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        return model, Lookahead(model, 5)

    def moved(model: nn.Module) -> None:
        with torch.no_grad():
            model.weight.add_(1.0)

    per_step, by_step = fresh()
    per_round, by_round = fresh()
    for step in range(10):  # one-step rounds: both ways pull at steps 5 and 10
        moved(per_step)
        moved(per_round)
        by_step.maybe_update(per_step, step + 1, 0.9)
        assert by_round.catch_up(per_round, step, step + 1, 0.9) == ((step + 1) % 5 == 0)
    assert torch.equal(per_step.weight, per_round.weight)

    model, lookahead = fresh()
    start = model.weight.detach().clone()
    moved(model)
    assert not lookahead.catch_up(model, 1, 4, 0.9)  # no multiple of 5 in (1, 4]
    assert lookahead.catch_up(model, 3, 21, 0.9)  # 5, 10, 15, 20: four pulls
    kept = lookahead.decay(0.9) ** 4
    assert torch.allclose(model.weight, start + (1 - kept))


def test_trick_switches_reach_the_recipe():
    args = build_parser().parse_args(["train", "--model", "fastnet", "--no-whiten", "--no-ema", "--no-tta"])
    assert args.disable == ["whiten", "ema", "tta"]
    recipe = resolve_recipe(TrainConfig(data="-", model="fastnet", disable=args.disable))
    assert not recipe.whiten and recipe.ema_every == 0 and not recipe.test_time_flip and not recipe.test_time_shift
    assert recipe.frozen_norm_scale and recipe.alternating_flip  # the others stay on
    assert build_parser().parse_args(["train"]).disable == []


def test_an_evaluation_reports_the_views_it_was_asked_for():
    """The per-epoch evaluation stays plain (one view); only the final one pays for six."""
    calls = []

    class Counting(nn.Module):
        def forward(self, x):
            calls.append(len(x))
            return torch.zeros(len(x), 2)

    images = np.zeros((10, 8, 8, 3), np.uint8)
    labels = np.zeros(10, np.int64)
    from distvision.data.batches import Preprocessing

    preprocess = Preprocessing.build("standardize", [0.5] * 3, [0.25] * 3, None)
    evaluate_part(Counting(), images, labels, preprocess, "fp32", CPU)
    assert sum(calls) == 10
    calls.clear()
    evaluate_part(Counting(), images, labels, preprocess, "fp32", CPU, True, True)
    assert sum(calls) == 60
