"""Fixtures for the data-set / import / batch tests: one intra-op thread for tiny models."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# the real-server helpers of tests/server (start_server on a loopback port)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads; on shared cores they thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
