"""One compute discipline per model: its torch work runs one computation at a time.

A served model's torch state is not safe to share between threads: ``functional_call`` swaps
the module's parameters for functorch wrappers while a transform runs, and torch.func's
forward-mode (jvp) nesting is process-global. So every computation on a model — an Explain
request, each step of an Attack or Repair job — goes through that model's ComputeGate:

  * FIFO, one holder at a time (re-entrant for the holding thread);
  * a bounded wait queue: a caller that finds `max_waiting` callers already waiting gets
    ResourceExhausted (RetryInfo) at once;
  * a caller with a deadline gives up with ResourceExhausted (RetryInfo) as soon as the
    wait would leave too little time to compute before the deadline (the running mean of
    hold times), instead of timing out later;
  * a long job holds the gate across its run but calls ``pause()`` at its checkpoints
    (between solver iterations, batches, optimiser steps), which hands the gate to the
    waiting callers first, so Explain and jobs interleave.

core.aliases.FORWARD_AD_LOCK serialises forward-mode transforms across models (torch.func's
jvp nesting counter is a module global, so two models must not run a jvp at the same moment).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator

from pairdots_server.errors import CancelToken, ResourceExhausted

DEFAULT_MAX_WAITING = 64
_POLL_S = 0.25  # how often a waiter re-checks its token (cancellation)


class ComputeGate:
    """A fair, bounded, deadline-aware lock for one model's computations."""

    def __init__(self, name: str, max_waiting: int = DEFAULT_MAX_WAITING) -> None:
        self.name = name
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._waiting: collections.deque[object] = collections.deque()
        self._owner: int | None = None
        self._depth = 0
        self._since = 0.0
        self._mean_hold_s = 0.2  # running mean of one hold (for the give-up rule and hints)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _retry_after_locked(self) -> float:
        return round(max(0.1, self._mean_hold_s * (len(self._waiting) + 1)), 2)

    def _busy(self, why: str) -> ResourceExhausted:
        return ResourceExhausted(
            f"model {self.name!r} is busy: {why}; retry after ~{self._retry_after_locked():.1f} s, "
            "raise the call deadline, or scale out replicas",
            retry_after_s=self._retry_after_locked(), reason="MODEL_BUSY",
        )

    def acquire(self, token: CancelToken | None = None, *, bounded: bool = True) -> None:
        """Wait for the gate (FIFO). Raises ResourceExhausted when the wait queue is full
        (unless `bounded` is False: jobs, which their own queue bounds already) or
        the token's deadline leaves no time to compute; Cancelled when the token is cancelled
        while waiting."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            if self._owner is None and not self._waiting:
                self._take_locked(me)
                return
            if bounded and len(self._waiting) >= self.max_waiting:
                raise self._busy(f"{len(self._waiting)} computations already wait for it "
                                 f"(limit {self.max_waiting})")
            ticket = object()
            self._waiting.append(ticket)
            try:
                while not (self._owner is None and self._waiting[0] is ticket):
                    timeout = _POLL_S
                    if token is not None:
                        if token.cancelled:
                            token.check()  # raises Cancelled
                        if token.deadline is not None:
                            left = token.deadline - time.monotonic() - self._mean_hold_s
                            if left <= 0:
                                raise self._busy(
                                    "the call's deadline would pass before its turn came")
                            timeout = min(timeout, left)
                    self._cond.wait(timeout)
                self._waiting.popleft()
                self._take_locked(me)
            except BaseException:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                    self._cond.notify_all()
                raise

    def _take_locked(self, me: int) -> None:
        self._owner = me
        self._depth = 1
        self._since = time.monotonic()

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("ComputeGate.release() by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                held = time.monotonic() - self._since
                self._mean_hold_s = 0.8 * self._mean_hold_s + 0.2 * held
                self._owner = None
                self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, token: CancelToken | None = None, *, bounded: bool = True
             ) -> Iterator[ComputeGate]:
        self.acquire(token, bounded=bounded)
        try:
            yield self
        finally:
            if self._owner == threading.get_ident():  # not after a pause() was cancelled
                self.release()

    def pause(self, token: CancelToken | None = None) -> None:
        """Called by the holder at a checkpoint: when others wait, let them go first and
        re-acquire (behind them). Never call it inside a torch.func transform."""
        with self._cond:
            if self._owner != threading.get_ident() or not self._waiting:
                return
            depth = self._depth
            self._depth = 1
        self.release()
        try:
            self._acquire_behind(token)
        finally:
            with self._cond:
                if self._owner == threading.get_ident():
                    self._depth = depth

    def _acquire_behind(self, token: CancelToken | None) -> None:
        """Re-acquire after pause(): waits in line without the queue bound or the deadline
        rule (the job already holds its place in the model's work)."""
        me = threading.get_ident()
        with self._cond:
            ticket = object()
            self._waiting.append(ticket)
            try:
                while not (self._owner is None and self._waiting[0] is ticket):
                    if token is not None and token.cancelled:
                        token.check()
                    self._cond.wait(_POLL_S)
                self._waiting.popleft()
                self._take_locked(me)
            except BaseException:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                    self._cond.notify_all()
                raise
