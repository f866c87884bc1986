"""The job service of a serving replica without an in-process worker (`pairdots serve
--no-worker`): it accepts, answers and reads operations, and runs none.

`submit` records the operation as PENDING with no owner — queued in the shared store for any
`pairdots worker` that serves its kind (JobRunner in claim mode) — and returns it at once; the
job function the caller built (to validate the request) is not kept. Cancel marks the row
CANCELLED; the worker running it stops at its next lease renewal. Wait polls the store (every
`poll_s`). A reaper thread calls `store.expire_leases()` every `poll_s`, so a worker killed
mid-job is reported by the replicas even when no other worker is left.

Admission: at most `max_queued` operations PENDING or RUNNING in the whole store (all replicas
and workers), else ResourceExhausted with a retry hint. Kinds that no worker can rebuild from
the stored request (not in `kinds`) are FailedPrecondition: start serve without --no-worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection

from pairdots_server import errors
from pairdots_server.service.jobs.runner import DEFAULT_POLL_S, JobFn, Listener
from pairdots_server.service.jobs.store import JobRecord, JobStore

log = logging.getLogger(__name__)

_RETRY_AFTER_S = 30.0


class JobQueue:
    """Submit / cancel / wait over a shared JobStore; the work runs in `pairdots worker`s."""

    def __init__(
        self,
        store: JobStore,
        kinds: Collection[str],
        max_queued: int = 16,
        poll_s: float = DEFAULT_POLL_S,
    ) -> None:
        if max_queued < 1:
            raise errors.InvalidArgument.for_field(
                "jobs.max_queued", f"is {max_queued}; set it to 1 or more"
            )
        self.store = store
        self.kinds = frozenset(kinds)
        self.max_queued = max_queued
        self.poll_s = poll_s
        self._closing = False
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="pairdots-reaper", daemon=True)
        self._reaper.start()

    def submit(
        self,
        kind: str,
        request_type: str,
        request_bytes: bytes,
        fn: JobFn | None,
        *,
        request_id: str = "",
        fingerprint: str = "",
        metadata: tuple[str, bytes] | None = None,
    ) -> JobRecord:
        """Queue a PENDING operation for the workers (`fn` is not used: a worker rebuilds the
        job from the stored request). Same idempotency and errors as JobRunner.submit."""
        if request_id:
            existing = self.store.find_request(request_id, fingerprint)
            if existing is not None:
                return existing
        if self._closing:
            raise errors.Unavailable(
                "the server is shutting down and accepts no new jobs; retry on another replica"
            )
        if kind not in self.kinds:
            raise errors.FailedPrecondition(
                f"{kind} jobs run only in-process and this server was started with "
                "--no-worker; start it without --no-worker to run them"
            )
        active = self.store.count_active()
        if active >= self.max_queued:
            raise errors.ResourceExhausted(
                f"the job queue is full ({active} jobs waiting or running in the shared store, "
                f"limit jobs.max_queued={self.max_queued}); retry later, cancel a job you no "
                "longer need, add workers, or raise --max-queued-jobs",
                retry_after_s=_RETRY_AFTER_S,
            )
        record, _ = self.store.create_once(
            kind,
            request_type,
            request_bytes,
            metadata=metadata,
            request_id=request_id,
            fingerprint=fingerprint,
        )
        return record

    def cancel(self, name: str) -> JobRecord:
        """CANCELLED at once (a finished one is returned unchanged); the worker running it
        stops at its next lease renewal. NotFound if the operation does not exist."""
        return self.store.cancel(name)

    def wait(self, name: str, timeout: float | None) -> JobRecord:
        """Poll until the operation is done or `timeout` seconds passed."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            record = self.store.get(name)
            if record.done:
                return record
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return record
            time.sleep(self.poll_s if remaining is None else min(self.poll_s, remaining))

    def add_listener(self, fn: Listener) -> None:
        """No-op: changes happen in other processes; WaitOperation polls the store."""

    def remove_listener(self, fn: Listener) -> None:
        """No-op (see add_listener)."""

    def active_count(self) -> int:
        """Operations PENDING or RUNNING in the whole store."""
        return self.store.count_active()

    def shutdown(self, grace_s: float = 10.0) -> int:
        """Stop accepting jobs and the reaper; queued and running jobs are the workers' and
        stay as they are. Returns 0 (nothing here is interrupted)."""
        self._closing = True
        self._stop.set()
        self._reaper.join(max(0.0, grace_s))
        return 0

    def _reap(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                for name in self.store.expire_leases():
                    log.warning(
                        "operation %s: its worker's lease expired; marked interrupted", name
                    )
            except errors.PairdotsError as exc:
                log.warning("job store: %s", exc.message)
            except Exception:
                log.exception("lease reaper failed; retrying")
