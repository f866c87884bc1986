"""Issue 15 item 3: ExplainBatch through a real server — inline and file inputs (under the
server's batch input root only), JSON-lines results equal to one Explain per input, progress,
paged results, cancel, idempotency, validation, and `pairdots explain --input --output`."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict
from pdserver_util import RunningServer, start_server

from pairdots import (
    BatchItem,
    ExplainBatchOutcome,
    FailedPreconditionError,
    InvalidArgumentError,
    JobProgress,
    NotFoundError,
    PairdotsClient,
    RpcCancelledError,
)
from pairdots.v1 import pairdots_pb2
from pairdots_server.cli.main import main
from pairdots_server.config import ServerConfig
from pairdots_server.testing import make_tiny_root

TEXTS = [
    "i loved it !",
    "a dull , tedious film .",
    "the cast is great",
    "bad",
    "it was fine",
    "not good at all",
    "a moving story",
]


@pytest.fixture(scope="module")
def jobs_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jobs") / "jobs.sqlite3"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, jobs_db: Path) -> Iterator[RunningServer]:
    root = make_tiny_root(tmp_path_factory.mktemp("bundles"))
    inputs = tmp_path_factory.mktemp("batch-inputs")
    (inputs / "in.jsonl").write_text(
        "".join(
            json.dumps({"sentence": t, "y": "positive", "key": f"k{i}"}) + "\n"
            for i, t in enumerate(TEXTS[:3])
        ),
        encoding="utf-8",
    )
    running = start_server(
        ServerConfig(bundles=root, port=0, jobs_db=jobs_db, batch_input_root=inputs)
    )
    yield running
    running.stop()


@pytest.fixture()
def client(server: RunningServer) -> Iterator[PairdotsClient]:
    with server.client() as c:
        yield c


def _all_items(client: PairdotsClient, name: str, page_size: int) -> list[BatchItem]:
    items: list[BatchItem] = []
    token = ""
    while True:
        page = client.batch_results(name, page_size=page_size, page_token=token)
        assert len(page.items) <= page_size and page.done
        items += page.items
        token = page.next_page_token
        if not token:
            return items


def _record_progress_writes(path: Path) -> Callable[[str], list[JobProgress]]:
    """Log every write of an operation's progress metadata with an SQLite trigger on the
    server's job store; return a reader of that log for one operation name, oldest first."""
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE IF NOT EXISTS test_progress_log ("
            "  seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT, metadata BLOB);"
            "CREATE TRIGGER IF NOT EXISTS test_progress_logger AFTER UPDATE OF metadata "
            "ON operations BEGIN "
            "  INSERT INTO test_progress_log (name, metadata) VALUES (NEW.name, NEW.metadata);"
            "END;"
        )

    def read(name: str) -> list[JobProgress]:
        with sqlite3.connect(path) as db:
            rows = db.execute(
                "SELECT metadata FROM test_progress_log WHERE name = ? ORDER BY seq", (name,)
            ).fetchall()
        return [JobProgress.from_proto(pairdots_pb2.JobMetadata.FromString(r[0])) for r in rows]

    return read


def _comparable(raw: object) -> object:
    """The answer without what differs from call to call: timings and the s_test cache
    flag (the second call of the same query hits the server's cache)."""

    def strip(x: object) -> object:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("duration", "cached")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    d = MessageToDict(raw)  # type: ignore[arg-type]
    d.pop("diagnostics", None)
    return strip(d)


def test_inline_batch_equals_one_explain_per_input(
    client: PairdotsClient, jobs_db: Path
) -> None:
    inputs = [(t, 1 if i % 2 else None, f"row-{i}") for i, t in enumerate(TEXTS)]
    history = _record_progress_writes(jobs_db)
    op = client.explain_batch(inputs, model="tiny", top_words=1, examples_per_word=2)
    assert op.progress is not None and op.progress.kind == "explain_batch"
    seen: list[JobProgress] = []
    outcome = client.wait_operation(op.name, timeout=300, progress=seen.append)
    assert isinstance(outcome, ExplainBatchOutcome)
    assert (outcome.input_count, outcome.succeeded_count, outcome.failed_count) == (7, 7, 0)
    assert outcome.inputs_per_second > 0
    # every progress report the server wrote, read back from the store's own table (the
    # client's polls may miss them all when a tiny batch finishes between two polls): the
    # reporter is throttled within a stage, so "explaining" goes 0 of 7 → … → 7 of 7,
    # counting strictly up, always out of 7
    explaining = [(p.done, p.total) for p in history(op.name) if p.stage == "explaining"]
    counts = [d for d, _ in explaining]
    assert {t for _, t in explaining} == {7} and counts[0] == 0 and counts[-1] == 7
    assert all(a < b for a, b in pairwise(counts))
    assert seen and seen[-1].stage == "done" and seen[-1].kind == "explain_batch"
    # the results file sits beside the job store, one JSON line per input in input order
    path = Path(outcome.results_path)
    assert path.parent.name == "batch-results"
    assert (path.parent.parent / "jobs.sqlite3").is_file()
    lines = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()]
    assert [ln["index"] for ln in lines] == list(range(7))
    items = _all_items(client, op.name, page_size=3)
    assert [(i.index, i.id) for i in items] == [(n, f"row-{n}") for n in range(7)]
    for (text, gold, _), item in zip(inputs, items, strict=True):
        assert item.explanation is not None and not item.error_code
        single = client.explain(
            text, model="tiny", top_words=1, examples_per_word=2, gold_label=gold
        )
        assert _comparable(item.explanation.raw) == _comparable(single.raw)
    # the same request_id returns the same operation and starts nothing new
    again = client.explain_batch(inputs[:2], model="tiny", request_id="batch-key-1")
    assert (
        client.explain_batch(inputs[:2], model="tiny", request_id="batch-key-1").name == again.name
    )
    client.wait_operation(again.name, timeout=300)


def test_file_input_under_the_root_only(client: PairdotsClient) -> None:
    op = client.explain_batch(
        input_path="in.jsonl",
        text_column="sentence",
        label_column="y",
        id_column="key",
        model="tiny",
        top_words=0,
    )
    outcome = client.wait_operation(op.name, timeout=300)
    assert isinstance(outcome, ExplainBatchOutcome) and outcome.succeeded_count == 3
    items = _all_items(client, op.name, page_size=50)
    assert [i.id for i in items] == ["k0", "k1", "k2"]
    for item in items:  # gold "positive" = label 1, explained beside the prediction
        assert item.explanation is not None
        assert 1 in [e.label for e in item.explanation.explanations]
    with pytest.raises(InvalidArgumentError, match="outside the server's batch input root"):
        client.explain_batch(input_path="../in.jsonl", model="tiny")
    with pytest.raises(NotFoundError, match="does not exist"):
        client.explain_batch(input_path="missing.jsonl", model="tiny")
    with pytest.raises(InvalidArgumentError, match="missing key 'text'"):
        client.explain_batch(input_path="in.jsonl", model="tiny")


def test_bad_inputs_are_rejected_with_their_positions(client: PairdotsClient) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        client.explain_batch([("fine", None), ("   ", None), ("ok", 7)], model="tiny")
    fields = {v.field for v in info.value.field_violations}
    assert fields == {"inputs[1].text", "inputs[2].gold_label"}
    with pytest.raises(InvalidArgumentError, match="exactly one of inputs"):
        client.explain_batch([], model="tiny")
    with pytest.raises(InvalidArgumentError, match="examples_per_word"):
        client.explain_batch(["fine"], model="tiny", examples_per_word=1000)
    with pytest.raises(NotFoundError):
        client.explain_batch(["fine"], model="nope")
    with pytest.raises(InvalidArgumentError, match="page_token"):
        client.batch_results("operations/explain_batch-0", page_token="garbage")
    with pytest.raises(NotFoundError):
        client.batch_results("operations/explain_batch-0")


def test_cancel_stops_the_batch_and_keeps_what_was_written(client: PairdotsClient) -> None:
    op = client.explain_batch(
        [f"the film number {i} was good" for i in range(200)], model="tiny", top_words=2
    )

    def cancel_after_two(p: JobProgress) -> None:
        if p.stage == "explaining" and p.done >= 2:
            client.cancel_operation(op.name)

    with pytest.raises(RpcCancelledError):
        client.wait_operation(op.name, timeout=300, progress=cancel_after_two)
    page = client.batch_results(op.name, page_size=500)
    assert page.done and 2 <= page.total_size < 200
    assert [i.index for i in page.items] == list(range(page.total_size))
    assert not page.next_page_token


def test_cli_explain_input_output(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(TEXTS[:4]) + "\n\n", encoding="utf-8")
    out = tmp_path / "results.jsonl"
    rc = main(
        [
            "explain",
            "--input",
            str(src),
            "--output",
            str(out),
            "--address",
            server.address,
            "--model",
            "tiny",
            "--top-words",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    lines = [json.loads(ln) for ln in out.read_text(encoding="utf-8").splitlines()]
    assert [ln["id"] for ln in lines] == ["1", "2", "3", "4"]  # .txt: the line numbers
    assert all("response" in ln and ln["response"]["model"] == "models/tiny" for ln in lines)
    assert "4 results written" in capsys.readouterr().out
    assert main(["explain", "--input", str(src), "--address", server.address]) == 2
    assert "--output" in capsys.readouterr().err


def test_server_without_input_root_refuses_paths(server: RunningServer, tmp_path: Path) -> None:
    other = start_server(
        ServerConfig(bundles=server.root, port=0, jobs_db=tmp_path / "jobs.sqlite3")
    )
    try:
        with (
            other.client() as c,
            pytest.raises(FailedPreconditionError, match="--batch-input-root"),
        ):
            c.explain_batch(input_path="in.jsonl", model="tiny")
    finally:
        other.stop()
