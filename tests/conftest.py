"""Shared fixtures: CPU only, one thread, deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first (stable otherwise): with pytest-xdist's ``--dist loadfile
    --no-loadscope-reorder`` (``make test``) the long files start at once instead of leaving one
    worker busy at the end while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
