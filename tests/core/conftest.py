"""Fixtures of the core tests (helpers live in core_tiny.py)."""

from __future__ import annotations

import pytest
from core_tiny import Tiny, make_tiny


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    return make_tiny()


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Every core test module runs with one intra-op thread (tests/conftest.py)."""
