"""CIFAR-10 with Caffe's cifar10_quick and with fastnet, each at its own recipe's settings."""

from __future__ import annotations

from distvision.bench.problems.registry import BenchSettings, Problem, register_problem


def cifar_data(settings: BenchSettings) -> str | None:
    return settings.cifar_data  # None: `distvision train` downloads the official CIFAR-10


register_problem(Problem(
    name="cifar10-caffe-quick",
    description="CIFAR-10, Caffe's cifar10_quick, its default recipe, 10 epochs",
    model="caffe-quick",
    epochs=10,
    data=cifar_data,
))

register_problem(Problem(
    name="cifar10-fastnet",
    description="CIFAR-10, fastnet (airbench94's net), its default recipe, 10 epochs",
    model="fastnet",
    epochs=10,
    data=cifar_data,
))
