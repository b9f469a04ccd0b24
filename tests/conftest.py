"""Fixtures both tiers use; the helpers are in tests/helpers.py, each tier's own fixtures in its conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import write_image_tree


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker tests/e2e/conftest.py puts on every end-to-end test."""
    config.addinivalue_line("markers", "slow: starts processes (the end-to-end tier, tests/e2e); "
                                       "-m 'not slow' runs the unit tier alone")


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory) -> Path:
    """distvision tune's data: 3 classes, 30 training and 6 test images each; read-only for the tests."""
    return write_image_tree(tmp_path_factory.mktemp("tune") / "images", classes=3, train_per_class=30,
                            test_per_class=6)
