"""Telemetry (issue 16 item 4) on a real server with the tiny bundle: after Explain + Attack
every Prometheus metric family has a sample (scraped over HTTP, with the `model` label where
it applies); one Explain's trace (an in-memory span exporter) holds the RPC's server span and
the pipeline stage spans under it; the per-call log line carries method, status code,
duration, request id, model and trace id, in text and in JSON."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pdserver_util import RunningServer
from prometheus_client.parser import text_string_to_metric_families

from pairdots import AttackMode, AttackOutcome, RetrainMode, RetrainOptions
from pairdots.v1 import pairdots_pb2 as pb
from pairdots.v1 import pairdots_pb2_grpc as pbg
from pairdots_server import telemetry
from pairdots_server.cli.logs import JsonFormatter
from pairdots_server.config import ServerConfig
from pairdots_server.rpc.app import create_server
from pairdots_server.testing import tiny_examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXPLAIN = "/pairdots.v1.PairdotsService/Explain"
REQUEST_ID = "telemetry-test-0001"
STAGES = ("saliency", "grad_score", "solve", "exact_scoring", "token_influence")


@dataclass
class Traced:
    running: RunningServer
    spans: list[ReadableSpan]  # the spans of the one Explain call's trace
    records: list[logging.LogRecord]  # the pairdots.rpc log records of the calls
    attack: AttackOutcome


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _start(config: ServerConfig, provider: TracerProvider) -> RunningServer:
    import asyncio
    import threading

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    coro = create_server(config, tracer_provider=provider)
    app, port = asyncio.run_coroutine_threadsafe(coro, loop).result(300)
    return RunningServer(app, port, loop, thread, config.bundles)


@pytest.fixture(scope="module")
def traced(bundle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    keep = _Keep()
    rpc_log = logging.getLogger("pairdots.rpc")
    before = rpc_log.level
    rpc_log.setLevel(logging.INFO)
    rpc_log.addHandler(keep)
    jobs = tmp_path_factory.mktemp("jobs") / "jobs.sqlite3"
    running = _start(ServerConfig(bundles=bundle_root, port=0, jobs_db=jobs, metrics_port=0,
                                  watch_interval_s=0), provider)
    try:
        with grpc.insecure_channel(running.address) as ch:
            req = pb.ExplainRequest(model="tiny", text="i loved it , a great movie !",
                                    top_words=1, examples_per_word=2)
            pbg.PairdotsServiceStub(ch).Explain(
                req, timeout=120, metadata=(("x-request-id", REQUEST_ID),))
        explain_spans = list(exporter.get_finished_spans())
        with grpc.insecure_channel(running.address) as ch, pytest.raises(grpc.RpcError):
            pbg.PairdotsServiceStub(ch).Explain(
                pb.ExplainRequest(model="nope", text="x"), timeout=30,
                metadata=(("x-request-id", "telemetry-test-nope"),))
        with running.client() as client:
            tests = [(x.text, x.label) for x in tiny_examples(2, split="dev")]
            handle = client.attack(tests, model="tiny", mode=AttackMode.DEMOTE_SALIENT,
                                   examples_per_test=1, random_candidates=2,
                                   retrain=RetrainOptions(mode=RetrainMode.SCOPE_ONLY, epochs=1))
            outcome = client.wait_operation(handle.name, timeout=300)
            assert isinstance(outcome, AttackOutcome)
        yield Traced(running, explain_spans, keep.records, outcome)
    finally:
        running.stop()
        rpc_log.removeHandler(keep)
        rpc_log.setLevel(before)
        telemetry.install(None)


def _scrape(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)
            if f.name.startswith("pairdots_")}


def test_every_metric_family_has_samples_after_explain_and_attack(traced: Traced) -> None:
    metrics = traced.running.app.metrics
    assert metrics.port is not None
    families = _scrape(metrics.port)
    # every family this server registered (prometheus strips _total from counter names)
    registered = {f.name for f in metrics.registry.collect()}
    assert {"pairdots_requests", "pairdots_request_seconds", "pairdots_queue_seconds",
            "pairdots_stage_seconds", "pairdots_solver_iterations", "pairdots_jobs",
            "pairdots_queue_depth", "pairdots_models", "pairdots_refused_bundles",
            "pairdots_bundle_reloads"} <= registered
    empty = sorted(n for n in registered if not families.get(n) or not families[n].samples)
    assert empty == [], f"families without a sample: {empty}"

    def labelled(family: str, **labels: str) -> list[Any]:
        return [s for s in families[family].samples
                if all(s.labels.get(k) == v for k, v in labels.items())]

    assert labelled("pairdots_requests", method=EXPLAIN, code="OK", model="tiny")
    assert labelled("pairdots_request_seconds", method=EXPLAIN, model="tiny")
    assert labelled("pairdots_queue_seconds", kind="explain", model="tiny")
    assert labelled("pairdots_queue_seconds", kind="attack", model="tiny")
    for stage in ("saliency", "solve", "exact_scoring"):
        assert labelled("pairdots_stage_seconds", stage=stage, model="tiny"), stage
    assert labelled("pairdots_solver_iterations", model="tiny")
    for state in ("PENDING", "RUNNING", "SUCCEEDED"):
        got = labelled("pairdots_jobs", kind="attack", state=state, model="tiny")
        assert got and got[0].value == 1, (state, got)
    # the shared bundle root may hold bundles that earlier tests saved (e.g. a repair's
    # save_as): the gauge counts what this server loaded
    served = traced.running.app.registry.names()
    assert "tiny" in served
    assert labelled("pairdots_models")[0].value == len(served)
    # one Explain RPC was made on "tiny" (the attack's steps are not RPCs)
    explains = labelled("pairdots_requests", method=EXPLAIN, code="OK", model="tiny")
    assert explains[0].value == 1


def test_one_explain_trace_shows_the_pipeline_stages(traced: Traced) -> None:
    spans = traced.spans
    by_id = {s.context.span_id: s for s in spans}
    server = [s for s in spans if s.name == EXPLAIN]
    assert len(server) == 1, [s.name for s in spans]
    root = server[0]
    assert root.parent is None or root.parent.span_id not in by_id
    explain = [s for s in spans if s.name == "pairdots.explain"]
    assert len(explain) == 1 and explain[0].parent is not None
    assert explain[0].parent.span_id == root.context.span_id
    assert explain[0].attributes is not None and explain[0].attributes["pairdots.model"] == "tiny"
    names = {s.name for s in spans}
    for stage in STAGES:
        assert telemetry.STAGE_PREFIX + stage in names, (stage, sorted(names))
    for s in spans:  # one trace; every stage span hangs under the explain span
        assert s.context.trace_id == root.context.trace_id
        if s.name.startswith(telemetry.STAGE_PREFIX):
            assert s.parent is not None and s.parent.span_id == explain[0].context.span_id
            assert s.start_time is not None and s.end_time is not None
            assert explain[0].start_time <= s.start_time <= s.end_time <= explain[0].end_time


def test_rpc_log_line_has_method_code_duration_request_id(traced: Traced) -> None:
    mine = [r for r in traced.records if getattr(r, "request_id", None) == REQUEST_ID]
    assert len(mine) == 1
    record = mine[0]
    assert (record.method, record.code, record.model) == (EXPLAIN, "OK", "tiny")  # type: ignore[attr-defined]
    assert record.seconds > 0  # type: ignore[attr-defined]
    trace_id = format(traced.spans[0].context.trace_id, "032x")
    assert record.trace_id == trace_id  # type: ignore[attr-defined]
    text = logging.Formatter("%(levelname)s %(name)s: %(message)s").format(record)
    for part in (EXPLAIN, " OK ", f"request_id={REQUEST_ID}", "model=tiny"):
        assert part in text, text
    data = json.loads(JsonFormatter().format(record))
    assert data["method"] == EXPLAIN and data["code"] == "OK"
    assert data["request_id"] == REQUEST_ID and data["model"] == "tiny"
    assert data["trace_id"] == trace_id and data["seconds"] == record.seconds  # type: ignore[attr-defined]
    # an error is logged with its code, and a name that is not served gets no model label
    nope = [r for r in traced.records if getattr(r, "request_id", "") == "telemetry-test-nope"]
    assert len(nope) == 1
    assert (nope[0].code, nope[0].model) == ("NOT_FOUND", "")  # type: ignore[attr-defined]
    assert "model=" not in nope[0].getMessage()
