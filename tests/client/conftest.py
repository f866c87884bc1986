"""Fixtures for the client tests: a real gRPC server with test servicers (see
pairdots_client_fakes)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pairdots_client_fakes import Harness, serve

from pairdots import ClientConfig


@pytest.fixture
def harness() -> Iterator[Harness]:
    with serve() as h:
        yield h


@pytest.fixture
def harness_no_wait() -> Iterator[Harness]:
    """A server whose Operations service answers WaitOperation with UNIMPLEMENTED."""
    with serve(wait_implemented=False) as h:
        yield h


def fast_config(address: str, **changes: Any) -> ClientConfig:
    """Short backoffs and poll interval so retries and waits take milliseconds."""
    base: dict[str, Any] = {"address": address, "retry_initial_backoff_s": 0.01,
                            "retry_max_backoff_s": 0.05, "default_timeout_s": 10.0,
                            "poll_interval_s": 0.05, "default_model": "tiny-sst2"}
    base.update(changes)
    return ClientConfig(**base)


@pytest.fixture
def make_config() -> Any:
    return fast_config
