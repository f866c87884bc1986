"""Issue 14 item 1: torch work for a model is never shared between threads.

Concurrent Explain calls from 8 threads (with several worker threads) and Explain calls sent
while an Attack job runs must each end OK or RESOURCE_EXHAUSTED with a RetryInfo — never
INTERNAL — and the job must succeed.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pdserver_util import RunningServer, start_server

from pairdots import AttackMode, RetrainMode, RetrainOptions
from pairdots.v1 import pairdots_pb2 as pb
from pairdots.v1 import pairdots_pb2_grpc as pb_grpc
from pairdots_server.config import ServerConfig
from pairdots_server.testing import tiny_examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [x.text for x in tiny_examples(8, split="dev")]


@pytest.fixture(scope="module")
def busy_server(bundle_root: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[RunningServer]:
    jobs = tmp_path_factory.mktemp("jobs-conc") / "jobs.sqlite3"
    running = start_server(ServerConfig(bundles=bundle_root, port=0, jobs_db=jobs,
                                        max_workers=4, max_queue=4))
    yield running
    running.stop()


def _has_retry_info(err: grpc.RpcError) -> bool:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is None:
        return False
    for d in status.details:
        if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            return True
    return False


def _hammer(address: str, threads: int, calls: int) -> collections.Counter[str]:
    """`threads` threads, `calls` Explain calls each; counts outcomes ('RE-no-retry' marks a
    RESOURCE_EXHAUSTED without RetryInfo)."""
    counts: collections.Counter[str] = collections.Counter()
    messages: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.PairdotsServiceStub(ch)
            for i in range(calls):
                req = pb.ExplainRequest(model="tiny", text=TEXTS[(k + i) % len(TEXTS)],
                                        top_words=1, examples_per_word=2)
                try:
                    stub.Explain(req, timeout=120)
                    key = "OK"
                except grpc.RpcError as err:
                    key = err.code().name
                    if err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and \
                            not _has_retry_info(err):
                        key = "RE-no-retry"
                    if key != "RESOURCE_EXHAUSTED":
                        with lock:
                            messages.append(f"{key}: {err.details()}")
                with lock:
                    counts[key] += 1

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(600)
    assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED"}, (counts, messages[:5])
    return counts


def test_concurrent_explain_from_8_threads(busy_server: RunningServer) -> None:
    counts = _hammer(busy_server.address, threads=8, calls=4)
    assert sum(counts.values()) == 32
    assert counts["OK"] >= 1


def test_explain_during_a_running_attack(busy_server: RunningServer) -> None:
    tests = [(x.text, x.label) for x in tiny_examples(4, split="dev")]
    with busy_server.client() as c:
        handle = c.attack(tests, model="tiny", mode=AttackMode.COMBINED, examples_per_test=2,
                          random_candidates=2,
                          retrain=RetrainOptions(mode=RetrainMode.SCOPE_ONLY, epochs=1))
        counts = _hammer(busy_server.address, threads=8, calls=3)
        assert counts["OK"] >= 1
        c.wait_operation(handle.name, timeout=600)  # raises if the job failed
        op = c.get_operation(handle.name)
        assert op.done and op.error is None


# -- the gate itself (no torch) ------------------------------------------------------------

def test_gate_bounds_its_queue_and_answers_with_a_retry_hint() -> None:
    import time

    from pairdots_server.compute import ComputeGate
    from pairdots_server.errors import CancelToken, ResourceExhausted

    gate = ComputeGate("m", max_waiting=1)
    gate.acquire()
    waiter_in = threading.Event()
    order: list[str] = []

    def waiter() -> None:
        waiter_in.set()
        with gate.hold():
            order.append("waiter")

    t = threading.Thread(target=waiter)
    t.start()
    waiter_in.wait(10)
    while gate.waiting == 0:
        time.sleep(0.01)

    def in_thread(token: CancelToken | None = None) -> BaseException | None:
        got: list[BaseException | None] = [None]

        def run() -> None:
            try:
                gate.acquire(token)
                gate.release()
            except BaseException as exc:  # noqa: BLE001
                got[0] = exc

        th = threading.Thread(target=run)
        th.start()
        th.join(10)
        return got[0]

    full = in_thread()  # the queue is full
    assert isinstance(full, ResourceExhausted)
    assert full.retry_after_s and full.reason == "MODEL_BUSY"
    # a deadline that leaves no time to compute: answered at once, not after the deadline
    gate.max_waiting = 5
    late = in_thread(CancelToken(deadline=time.monotonic() + 0.01))
    assert isinstance(late, ResourceExhausted) and late.retry_after_s
    # pause() hands the gate to the waiter first, then gives it back to the holder
    gate.pause()
    order.append("holder")
    gate.release()
    t.join(10)
    assert order == ["waiter", "holder"]
    assert gate.waiting == 0
