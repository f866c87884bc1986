"""A bounded pool for model work: `max_workers` threads, at most `max_queue` waiting.

Model computations are CPU/GPU-bound and run in threads so the asyncio server stays
responsive. A caller that finds the pool full gets ResourceExhausted with a retry hint at
once instead of queueing without bound. Work is cooperative-cancellable through the
CancelToken it receives: cancelling the awaiting coroutine (client went away) or passing the
deadline makes the work raise at its next check (between solver iterations and batches).
The work runs in a copy of the caller's contextvars, so a tracing span current in the RPC
handler (telemetry.py) is the parent of the spans the work opens.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pairdots_server.errors import CancelToken, ResourceExhausted

T = TypeVar("T")


class WorkerPool:
    def __init__(self, max_workers: int, max_queue: int) -> None:
        self.max_workers = max_workers
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="pairdots-model")
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._mean_seconds = 1.0  # running mean of job time, for the retry hint
        self.on_depth_change: Callable[[int], None] | None = None

    @property
    def depth(self) -> int:
        return self._admitted

    def _admit(self) -> None:
        with self._lock:
            if self._admitted >= self.max_workers + self.max_queue:
                wait = self._mean_seconds * (self._admitted / self.max_workers)
                raise ResourceExhausted(
                    f"the server is busy: {self._admitted} requests running or queued "
                    f"(limit {self.max_workers + self.max_queue}); retry after ~{wait:.1f} s "
                    "or scale out replicas",
                    retry_after_s=round(max(wait, 0.1), 2),
                    reason="SERVER_BUSY",
                )
            self._admitted += 1
        if self.on_depth_change:
            self.on_depth_change(self._admitted)

    def _release(self, seconds: float) -> None:
        with self._lock:
            self._admitted -= 1
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds
        if self.on_depth_change:
            self.on_depth_change(self._admitted)

    async def run(self, fn: Callable[[CancelToken], T], token: CancelToken) -> T:
        """Run fn(token) in a worker; cancel the token if the awaiting task is cancelled."""
        import time

        self._admit()
        start = time.perf_counter()

        def job() -> T:
            token.check()  # deadline may have passed while queued
            return fn(token)

        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, contextvars.copy_context().run, job)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            token.cancel("the client cancelled the call")
            raise
        finally:
            if future.done():
                self._release(time.perf_counter() - start)
            else:
                future.add_done_callback(lambda _f: self._release(time.perf_counter() - start))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
