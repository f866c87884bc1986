"""Retry policy shared by the sync and asyncio clients.

Only UNAVAILABLE and RESOURCE_EXHAUSTED are retried, at most ``max_retries`` times, and never
past the call's deadline. The wait before retry k+1 (k = 0, 1, ...) is

    base_k = min(max_backoff, initial_backoff * multiplier**k)
    wait_k = base_k * (1 - jitter * u),   u ~ Uniform[0, 1)

unless the server sent google.rpc.RetryInfo, whose delay is used as is (honoured even above
``max_backoff``). When the wait would end after the deadline the error is raised at once.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from pairdots.config import ClientConfig
from pairdots.errors import DeadlineExceededError, PairdotsError

__all__ = ["CallDeadline", "RetryPolicy"]


@dataclass
class RetryPolicy:
    """Decides whether and how long to wait before retrying a failed attempt."""

    max_retries: int = 3
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    rng: random.Random = field(default_factory=random.Random, repr=False)

    @classmethod
    def from_config(cls, config: ClientConfig) -> RetryPolicy:
        return cls(
            max_retries=config.max_retries,
            initial_backoff_s=config.retry_initial_backoff_s,
            max_backoff_s=config.retry_max_backoff_s,
            multiplier=config.retry_backoff_multiplier,
            jitter=config.retry_jitter,
        )

    def backoff(self, retry_index: int) -> float:
        """wait_k of the module docstring for k = retry_index (0 for the first retry)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** retry_index)
        return base * (1.0 - self.jitter * self.rng.random())

    def delay(self, error: PairdotsError, retries_done: int, remaining_s: float) -> float | None:
        """Seconds to wait before the next attempt, or None to raise `error` now.

        `retries_done` counts retries already made; `remaining_s` is the time left until the
        call's deadline.
        """
        if not error.retryable or retries_done >= self.max_retries:
            return None
        wait = error.retry_after_s if error.retry_after_s is not None else self.backoff(retries_done)
        if wait >= remaining_s:
            return None
        return wait


class CallDeadline:
    """The absolute deadline of one logical call (all of its attempts)."""

    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout={timeout_s!r}; pass a number of seconds > 0")
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def expired_error(self, what: str, last: PairdotsError | None = None) -> DeadlineExceededError:
        """The error raised when the deadline passed between attempts."""
        msg = f"{what}: deadline of {self.timeout_s:g} s passed"
        if last is not None:
            msg += f" (last error: {last.code.name}: {last.message})"
        return DeadlineExceededError(msg, reason="CLIENT_DEADLINE_EXCEEDED")
