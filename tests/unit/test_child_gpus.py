"""tune, train-each and scale children on a CUDA machine: each gets GPUs of its own through
CUDA_VISIBLE_DEVICES (a pretended device count here); on a machine without GPUs, nothing is set."""

from __future__ import annotations

import pytest

from distvision.parallel.child import GPU_VARIABLE, child_environment, gpu_share


@pytest.mark.parametrize("device_count, gpus_per_child, expected", [
    (4, 1, [[0], [1], [2], [3], [0], [1]]),  # round robin: the fifth child shares GPU 0 with the first
    (4, 2, [[0, 1], [2, 3], [0, 1]]),
    (3, 2, [[0, 1], [2, 0], [1, 2]]),  # every GPU carries two of three children
    (2, 4, [[0, 1], [0, 1]]),  # more workers than GPUs: all of them
    (0, 1, [[], [], []]),  # no GPU: no assignment
])
def test_gpu_share_round_robin(device_count, gpus_per_child, expected):
    assert [gpu_share(child, device_count, gpus_per_child) for child in range(len(expected))] == expected


def test_children_on_one_gpu_each_use_every_gpu_once():
    shares = [gpu_share(child, 8, 1) for child in range(8)]
    assert sorted(gpu for share in shares for gpu in share) == list(range(8))


def test_child_environment_gets_its_gpus_when_there_are_any():
    parent = {"PATH": "/usr/bin"}
    assert child_environment(parent, gpu_share(2, 4, 1))[GPU_VARIABLE] == "2"
    assert child_environment(parent, gpu_share(1, 4, 2))[GPU_VARIABLE] == "2,3"
    assert GPU_VARIABLE not in child_environment(parent, gpu_share(1, 0, 2))  # CPU machine: left unset
    assert child_environment(parent, [])["PATH"] == "/usr/bin"


def test_child_gpus_are_counted_among_the_parents_visible_devices():
    # A scheduler gave this job devices 4 and 6: child 1 of 2 is device 6, not device 1.
    parent = {GPU_VARIABLE: "4,6"}
    assert child_environment(parent, gpu_share(1, 2, 1))[GPU_VARIABLE] == "6"
    assert child_environment(parent, [])[GPU_VARIABLE] == "4,6"  # no share given: the parent's, unchanged
