"""Attack/Repair operations → Prometheus: a JobRunner listener (called after every state or
metadata change) that counts each operation's entry into a state (pairdots_jobs_total) and
observes its queue time (created → RUNNING, pairdots_queue_seconds{kind=attack|repair}).

The model comes from the operation's JobMetadata. Only jobs run by this process's runner are
seen (a serving replica without an in-process worker counts none).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pairdots.v1 import pairdots_pb2 as pb
from pairdots_server.metrics import Metrics
from pairdots_server.rpc.job_results import METADATA_TYPE
from pairdots_server.service.registry import model_id

log = logging.getLogger("pairdots.rpc")


class JobMetricsListener:
    """`listener(name)` reads the operation and observes the state it entered, once per
    (operation, state); finished operations are forgotten."""

    def __init__(self, store: Any, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._lock = threading.Lock()
        self._state: dict[str, str] = {}  # operation → last state observed

    def __call__(self, name: str) -> None:
        try:
            record = self._store.get(name)
        except Exception:  # noqa: BLE001 (deleted meanwhile: nothing to observe)
            return
        state = str(getattr(record.state, "value", record.state))
        with self._lock:
            if self._state.get(name) == state:
                return
            first = name not in self._state
            self._state[name] = state
            if record.done:
                self._state.pop(name, None)
        model = _model_of(record)
        if first and state != "PENDING":  # its PENDING row was created before any change
            self._metrics.observe_job(record.kind, "PENDING", model)
        self._metrics.observe_job(record.kind, state, model)
        if state == "RUNNING":
            self._metrics.observe_queue(record.kind, model, time.time() - record.created_at)


def _model_of(record: Any) -> str:
    if record.metadata_type_url != METADATA_TYPE or not record.metadata:
        return ""
    try:
        return model_id(str(pb.JobMetadata.FromString(record.metadata).model))
    except Exception:  # noqa: BLE001 (a label never breaks a job)
        log.debug("unreadable JobMetadata on %s", record.name)
        return ""
