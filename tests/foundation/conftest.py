"""Shared fixtures for the foundation tests: tiny BERT models and bundles built in code."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pairdots_server.model.task import Task
from pairdots_server.testing import BASE_WORDS, build_tiny_model_dir, make_tiny_bundle


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on shared cores several threads
    per process thrash (measured here: 3.5 s vs 73 s for make_tiny_bundle)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float64 BERT classifier (2 layers, hidden 32) with a char-complete vocab."""
    d = tmp_path_factory.mktemp("tiny-model")
    return build_tiny_model_dir(d, BASE_WORDS, dtype=torch.float64)


@pytest.fixture
def tiny_task(tiny_dir: Path) -> Task:
    return Task.from_pretrained(tiny_dir, labels=["negative", "positive"], dtype=torch.float64)


@pytest.fixture(scope="session")
def tiny_bundle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle root holding one tiny bundle 'tiny' (built once; copy it before mutating)."""
    root = tmp_path_factory.mktemp("bundles")
    make_tiny_bundle(root, "tiny", n_train=32, finetune_steps=10)
    return root
