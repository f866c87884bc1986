"""Run long jobs (attack, repair) in worker threads, recording their life in a JobStore.

A job is a function `fn(ctx) -> (result_type_url, result_bytes)`. It reports progress with
`ctx.set_metadata(type_url, bytes)` (a serialized metadata proto; it becomes
Operation.metadata) and calls `ctx.check()` between steps: that raises `Cancelled` once the
operation is cancelled (or the server is shutting down), so the work stops at the next step.
Pass `ctx.check` as the `should_stop` callback of core code.

Outcome mapping (google.rpc.Code values, ints, no gRPC import):
  * fn returns            → SUCCEEDED with the returned result
  * CancelOperation       → CANCELLED (code 1) at once; the thread stops at its next check
  * fn raises PairdotsError → FAILED with its code from the error table (errors.CODES; INTERNAL
                            for a class the table does not name), its reason and message
  * any other exception   → FAILED with INTERNAL (13); the traceback goes to the log
  * shutdown()            → FAILED, code ABORTED (10), reason INTERRUPTED

Admission: at most `max_queued` jobs waiting plus running; beyond that `submit` raises
ResourceExhausted with a retry hint. `max_concurrent` worker threads run jobs FIFO.

Leases: every job this runner holds (waiting or running) has `owner` = the runner's id and a
lease of `lease_s` seconds in the store. A keeper thread renews them every lease_s / 3 and, at
each renewal, stops a job that another process cancelled (CancelOperation on another replica)
or whose lease was taken away (marked interrupted because renewals were late); every
`poll_s` it also calls `store.expire_leases()`, so a job of a process that died (kill -9) is
marked FAILED / ABORTED / INTERRUPTED within a lease of its last renewal, by whichever
process sharing the store notices first.

Two ways jobs arrive:
  * submit(kind, ..., fn): the in-process worker of `pairdots serve` (the default) runs `fn`;
  * claim mode (`builder` given; `pairdots worker`): every `poll_s`, while a thread is free, the
    runner claims the oldest queued operation of its `kinds` from the store (queued there by
    serving replicas started with --no-worker, service/jobs/queue.py) and runs
    `builder(record)`, the job function rebuilt from the stored request.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

from pairdots_server import errors
from pairdots_server.service.jobs.store import (
    INTERRUPTED_MESSAGE,
    INTERRUPTED_REASON,
    JobRecord,
    JobState,
    JobStore,
)

log = logging.getLogger(__name__)

JobResult = tuple[str, bytes]
JobFn = Callable[["JobContext"], JobResult]
Listener = Callable[[str], None]
#: rebuilds the job function of a stored operation (claim mode); raises PairdotsError when it
#: cannot (e.g. the model is not served by this worker): the operation then FAILS with it
JobBuilder = Callable[[JobRecord], JobFn]

DEFAULT_LEASE_S = 30.0
DEFAULT_POLL_S = 1.0


def process_owner(role: str) -> str:
    """A lease owner id naming this process: <role>@<host>:<pid>/<random>."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}/{uuid.uuid4().hex[:6]}"


class JobService(Protocol):
    """What the RPC layer uses of a JobRunner (in-process worker) or a JobQueue (--no-worker):
    submit, cancel and wait on operations, listeners for WaitOperation, shutdown."""

    store: JobStore

    def submit(self, kind: str, request_type: str, request_bytes: bytes, fn: JobFn | None, *,
               request_id: str = "", fingerprint: str = "",
               metadata: tuple[str, bytes] | None = None) -> JobRecord: ...

    def cancel(self, name: str) -> JobRecord: ...

    def wait(self, name: str, timeout: float | None) -> JobRecord: ...

    def add_listener(self, fn: Listener) -> None: ...

    def remove_listener(self, fn: Listener) -> None: ...

    def active_count(self) -> int: ...

    def shutdown(self, grace_s: float = 10.0) -> int: ...

#: google.rpc.Code names and the one error table (errors.CODES); re-exported here.
Code = errors.Code
status_code_for = errors.code_for

_DEFAULT_RETRY_AFTER_S = 30.0
_MAX_RETRY_AFTER_S = 3600.0


class JobContext:
    """Handed to a job function: its operation name, progress reporting and cancellation."""

    def __init__(self, name: str, store: JobStore, token: errors.CancelToken,
                 on_change: Callable[[str], None]) -> None:
        self.name = name
        self.token = token
        self._store = store
        self._on_change = on_change

    @property
    def cancelled(self) -> bool:
        """True once cancellation was requested (the next `check()` raises)."""
        return self.token.cancelled

    def check(self) -> None:
        """Raise errors.Cancelled if the operation was cancelled (or DeadlineExceeded if the
        token's deadline passed). Call between iterations."""
        self.token.check()

    def set_metadata(self, type_url: str, data: bytes) -> None:
        """Publish progress: `data` is a serialized proto whose Any type URL is `type_url`
        (e.g. "type.googleapis.com/pairdots.v1.AttackMetadata"). Replaces the previous one."""
        try:
            self._store.update_metadata(self.name, type_url, data)
        except errors.NotFound:  # cancelled and deleted meanwhile; the next check() raises
            return
        self._on_change(self.name)


@dataclass
class _Job:
    name: str
    kind: str
    fn: JobFn | None  # None: claimed, built from `record` when it starts
    record: JobRecord | None = None
    token: errors.CancelToken = field(default_factory=errors.CancelToken)
    interrupted: bool = False  # set by shutdown(): a Cancelled outcome becomes INTERRUPTED
    started_at: float | None = None


class JobRunner:
    """Thread pool with admission control and cooperative cancellation over a JobStore."""

    def __init__(self, store: JobStore, max_concurrent: int = 1, max_queued: int = 16, *,
                 owner: str | None = None, lease_s: float = DEFAULT_LEASE_S,
                 poll_s: float = DEFAULT_POLL_S, builder: JobBuilder | None = None,
                 kinds: Collection[str] | None = None) -> None:
        if max_concurrent < 1:
            raise errors.InvalidArgument.for_field(
                "jobs.max_concurrent", f"is {max_concurrent}; set it to 1 or more")
        if max_queued < max_concurrent:
            raise errors.InvalidArgument.for_field(
                "jobs.max_queued",
                f"is {max_queued}, below max_concurrent={max_concurrent}; it counts waiting "
                "plus running jobs, so set it to at least max_concurrent")
        if not 0 < poll_s < lease_s:
            raise errors.InvalidArgument.for_field(
                "jobs.lease_s", f"lease {lease_s} s must be longer than the poll {poll_s} s "
                "(renewals run every lease / 3); raise --lease-s")
        self.store = store
        self.owner = owner or process_owner("serve")
        self.lease_s = float(lease_s)
        self.poll_s = float(poll_s)
        self.builder = builder
        self.kinds = None if kinds is None else frozenset(kinds)
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self._cond = threading.Condition()
        self._jobs: dict[str, _Job] = {}  # waiting + running, guarded by _cond
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._durations: collections.deque[float] = collections.deque(maxlen=20)
        self._listeners: list[Listener] = []
        self._version = 0  # bumped on every change, guarded by _cond
        self._closing = False
        self._workers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._keeper = threading.Thread(target=self._keep_leases, name="pairdots-leases",
                                        daemon=True)
        self._keeper.start()

    # -- listeners (used by the async WaitOperation to avoid blocking threads) -----------------

    def add_listener(self, fn: Listener) -> None:
        """Call `fn(name)` (from a worker thread) after every state or metadata change."""
        with self._cond:
            self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        """Undo add_listener (no error if absent)."""
        with self._cond:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def _changed(self, name: str) -> None:
        with self._cond:
            self._version += 1
            self._cond.notify_all()
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(name)
            except Exception:  # a listener must never break a job
                log.exception("job listener failed for %s", name)

    # -- public API ----------------------------------------------------------------------------

    def submit(self, kind: str, request_type: str, request_bytes: bytes, fn: JobFn | None, *,
               request_id: str = "", fingerprint: str = "",
               metadata: tuple[str, bytes] | None = None) -> JobRecord:
        """Record a PENDING operation and queue `fn` to run; returns the new record at once.

        `request_id` (AIP-155): when an operation was already created for it (with the same
        `fingerprint`, a digest of the request without its id) that operation is returned and
        nothing new runs; another fingerprint is AlreadyExists. `metadata` (type URL, bytes)
        is the operation's initial progress metadata.

        Raises ResourceExhausted when `max_queued` jobs are already waiting or running, and
        Unavailable after shutdown() began.
        """
        with self._cond:
            if request_id:
                existing = self.store.find_request(request_id, fingerprint)
                if existing is not None:
                    return existing
            if self._closing:
                raise errors.Unavailable(
                    "the server is shutting down and accepts no new jobs; retry on another "
                    "replica or after it restarts")
            if len(self._jobs) >= self.max_queued:
                raise errors.ResourceExhausted(
                    f"the job queue is full ({len(self._jobs)} jobs waiting or running, limit "
                    f"jobs.max_queued={self.max_queued}); retry later, cancel a job you no "
                    "longer need, or raise jobs.max_queued",
                    retry_after_s=self._retry_after_locked(),
                )
            if fn is None:
                raise errors.FailedPrecondition(
                    f"a {kind} job needs its job function to run in this process")
            record, created = self.store.create_once(
                kind, request_type, request_bytes, metadata=metadata, request_id=request_id,
                fingerprint=fingerprint, owner=self.owner, lease_s=self.lease_s)
            if not created:
                return record
            self._enqueue_locked(_Job(name=record.name, kind=kind, fn=fn))
        return record

    def _enqueue_locked(self, job: _Job) -> None:
        self._jobs[job.name] = job
        if len(self._workers) < self.max_concurrent:
            self._start_worker_locked()
        self._queue.put(job)  # under the lock: always ahead of shutdown()'s sentinels

    def cancel(self, name: str) -> JobRecord:
        """Request cancellation; the record becomes CANCELLED at once (a finished one is
        returned unchanged). NotFound if the operation does not exist."""
        record = self.store.get(name)
        if record.done:
            return record
        with self._cond:
            job = self._jobs.get(name)
            if job is not None:
                job.token.cancel()
        record = self.store.cancel(name)
        self._changed(name)
        return record

    def wait(self, name: str, timeout: float | None) -> JobRecord:
        """Block until the operation is done or `timeout` seconds passed; return its record
        (possibly unfinished). NotFound if it does not exist."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            with self._cond:
                seen = self._version
            record = self.store.get(name)
            if record.done:
                return record
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return record
            with self._cond:
                # the 1 s cap also catches changes made outside this runner
                self._cond.wait_for(lambda seen=seen: self._version != seen,  # type: ignore[misc]
                                    1.0 if remaining is None else min(remaining, 1.0))

    def active_count(self) -> int:
        """Jobs waiting or running in this runner."""
        with self._cond:
            return len(self._jobs)

    def running_count(self) -> int:
        """Jobs currently executing."""
        with self._cond:
            return sum(1 for j in self._jobs.values() if j.started_at is not None)

    def shutdown(self, grace_s: float = 10.0) -> int:
        """Stop accepting jobs, cancel every waiting and running job and wait up to `grace_s`
        seconds for the threads to stop. Every job that did not finish on its own is recorded
        as FAILED with reason INTERRUPTED. Returns how many jobs were interrupted."""
        with self._cond:
            if self._closing:
                return 0
            self._closing = True
            self._stop.set()
            jobs = list(self._jobs.values())
            for job in jobs:
                job.interrupted = True
                job.token.cancel("the server is shutting down")
            workers = list(self._workers)
        for _ in workers:
            self._queue.put(None)  # after the queued jobs, which now stop at once
        deadline = time.monotonic() + max(0.0, grace_s)
        for t in workers:
            t.join(max(0.0, deadline - time.monotonic()))
        self._keeper.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in workers if t.is_alive()]
        if stuck:
            log.warning("job threads still running after %.1f s grace: %s (their results are "
                        "discarded)", grace_s, stuck)
        interrupted = 0
        for job in jobs:
            try:
                record = self.store.interrupt(job.name)  # no-op when already finished
            except errors.NotFound:  # cancelled and deleted while its thread was stopping
                continue
            self._changed(job.name)
            if record.error_reason == INTERRUPTED_REASON:
                interrupted += 1
        return interrupted

    # -- internals -----------------------------------------------------------------------------

    def _retry_after_locked(self) -> float:
        """Seconds until a slot probably frees: the mean duration of the last 20 jobs
        (clamped to [1 s, 1 h]), or 30 s before any job finished."""
        if not self._durations:
            return _DEFAULT_RETRY_AFTER_S
        mean = sum(self._durations) / len(self._durations)
        return float(min(_MAX_RETRY_AFTER_S, max(1.0, mean)))

    def _start_worker_locked(self) -> None:
        t = threading.Thread(
            target=self._worker, name=f"pairdots-job-{len(self._workers)}", daemon=True)
        self._workers.append(t)
        t.start()

    def _worker(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._run(job)
            except errors.NotFound:
                log.info("operation %s was deleted before its job stopped", job.name)
            except Exception:  # store failure etc.: never kill the worker thread
                log.exception("job %s could not be recorded", job.name)
            finally:
                with self._cond:
                    self._jobs.pop(job.name, None)
                    if job.started_at is not None:
                        self._durations.append(time.monotonic() - job.started_at)
                self._changed(job.name)

    def _run(self, job: _Job) -> None:
        if job.token.cancelled:
            self._record_cancel(job, errors.Cancelled(job.token.why))
            return
        if job.fn is not None:  # submitted here; a claimed job is RUNNING already
            rec = self.store.set_running(job.name, owner=self.owner, lease_s=self.lease_s)
            if rec.state is not JobState.RUNNING or rec.owner != self.owner:
                return  # cancelled while waiting
        with self._cond:
            job.started_at = time.monotonic()
        self._changed(job.name)
        ctx = JobContext(job.name, self.store, job.token, self._changed)
        try:
            fn = job.fn
            if fn is None:
                assert self.builder is not None and job.record is not None
                fn = self.builder(job.record)
            type_url, data = fn(ctx)
        except errors.Cancelled as exc:
            self._record_cancel(job, exc)
        except errors.PairdotsError as exc:
            log.info("job %s failed: %s (%s)", job.name, exc.message, exc.reason)
            self.store.fail(job.name, status_code_for(exc), exc.message, exc.reason)
        except Exception as exc:
            log.exception("job %s raised an unexpected error", job.name)
            self.store.fail(
                job.name, Code.INTERNAL,
                f"internal error in the {job.kind} job ({type(exc).__name__}: {exc}); this is a "
                "server bug, the server log has the traceback; please report it",
                "INTERNAL",
            )
        else:  # a no-op if the operation was cancelled meanwhile (terminal states stick)
            self.store.succeed(job.name, type_url, data)

    # -- leases and claims (the keeper thread) ----------------------------------------------------

    def _keep_leases(self) -> None:
        """Every poll_s: expire dead leases, claim queued jobs (claim mode); every lease_s / 3:
        renew this runner's leases and stop the jobs cancelled or lost elsewhere."""
        last_renewal = time.monotonic()
        while not self._stop.wait(self.poll_s):
            try:
                for name in self.store.expire_leases():
                    log.warning("operation %s: its holder's lease expired; marked interrupted",
                                name)
                    self._changed(name)
                if time.monotonic() - last_renewal >= self.lease_s / 3:
                    last_renewal = time.monotonic()
                    self._renew()
                if self.builder is not None:
                    self._claim()
            except errors.PairdotsError as exc:  # store unreachable or closed: next poll
                log.warning("job store: %s", exc.message)
            except Exception:
                log.exception("lease keeper failed; retrying")

    def _renew(self) -> None:
        with self._cond:
            names = list(self._jobs)
        for name, rec in self.store.renew(names, self.owner, self.lease_s).items():
            if rec is not None and not rec.done and rec.owner == self.owner:
                continue
            with self._cond:
                job = self._jobs.get(name)
            if job is None or job.token.cancelled:
                continue
            why = ("cancelled by the caller (CancelOperation)"
                   if rec is not None and rec.state is JobState.CANCELLED
                   else "this runner no longer holds the job (deleted, or its lease expired)")
            log.info("operation %s: %s; stopping it", name, why)
            job.token.cancel(why)
            self._changed(name)

    def _claim(self) -> None:
        while True:
            with self._cond:
                if self._closing or len(self._jobs) >= self.max_concurrent:
                    return
            record = self.store.claim(self.owner, self.lease_s, self.kinds)
            if record is None:
                return
            log.info("claimed %s (%s)", record.name, record.kind)
            with self._cond:
                if self._closing:  # shutting down meanwhile: the claim is interrupted
                    self.store.interrupt(record.name)
                    return
                self._enqueue_locked(_Job(name=record.name, kind=record.kind, fn=None,
                                          record=record))
            self._changed(record.name)

    def _record_cancel(self, job: _Job, exc: errors.Cancelled) -> None:
        if job.interrupted:
            self.store.interrupt(job.name, INTERRUPTED_MESSAGE)
        elif job.token.cancelled:
            self.store.cancel(job.name)
        else:  # fn raised Cancelled on its own (e.g. a nested deadline): a failure like others
            self.store.fail(job.name, status_code_for(exc), exc.message, exc.reason)
