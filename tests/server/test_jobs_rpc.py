"""Attack and Repair as long-running operations over a real server (tiny bundle): the RPC
returns an Operation at once, progress metadata appears, the result is readable after a
restart, cancel stops the job, and bad requests get the documented status codes."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from pdserver_util import RunningServer, start_server

from pairdots import (
    AttackMode,
    AttackOutcome,
    InvalidArgumentError,
    LabeledText,
    NotFoundError,
    PairdotsClient,
    RepairOutcome,
    ResourceExhaustedError,
    RetrainMode,
    RetrainOptions,
)
from pairdots.errors import AlreadyExistsError
from pairdots.operations import JobProgress
from pairdots_server.config import JobLimits, ServerConfig
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.testing import tiny_examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TESTS = [(x.text, x.label) for x in tiny_examples(2, split="dev")]
DEV = [(x.text, x.label) for x in tiny_examples(16, split="dev")]


def _long_attack(client: PairdotsClient, model: str = "tiny") -> str:
    """An attack that runs for minutes unless cancelled (many examples, long retrain)."""
    many = [(f"{t} {i}", y) for i in range(40) for t, y in TESTS]
    handle = client.attack(many, model=model, mode=AttackMode.DEMOTE_SALIENT,
                           examples_per_test=10,
                           retrain=RetrainOptions(mode=RetrainMode.SCOPE_ONLY, epochs=10))
    return handle.name


def _wait_for(pred: object, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached")


def test_attack_operation_end_to_end(client: PairdotsClient, server: RunningServer) -> None:
    handle = client.attack(TESTS, model="tiny", mode=AttackMode.DEMOTE_SALIENT,
                           examples_per_test=1, random_candidates=2,
                           retrain=RetrainOptions(mode=RetrainMode.SCOPE_ONLY, epochs=1))
    assert handle.name.startswith("operations/")
    seen: list[JobProgress] = []
    outcome = client.wait_operation(handle.name, timeout=300, progress=seen.append)
    assert isinstance(outcome, AttackOutcome)
    assert outcome.edits and all(e.influence_change < 0 for e in outcome.edits)
    assert all(e.objective == "decrease I(z, w_y)" for e in outcome.edits)
    ev = outcome.evaluation
    assert ev is not None and ev.examples == len(TESTS) and ev.retrain_seconds > 0
    assert 0 <= ev.accuracy_before <= 1 and 0 <= ev.accuracy_after <= 1
    # one effect per example: predicted margin change = Σ of its edits', measured after retrain
    assert [x.example_index for x in outcome.effects] == list(range(len(TESTS)))
    for x in outcome.effects:
        mine = [e for e in outcome.edits if e.example_index == x.example_index]
        assert x.edits == len(mine) and x.label == TESTS[x.example_index][1]
        assert x.predicted_margin_change == pytest.approx(
            sum(e.predicted_margin_change for e in mine))
        assert x.measured_margin is not None and x.targets[0].objective == "decrease I(z, w_y)"
        assert all(e.substitutions and e.substitutions[0].substitute == e.substitute
                   for e in mine)
        # the whole request's predicted change comes over the wire with its flip verdict
        assert x.predicted_flip == (
            (x.margin + x.request_predicted_margin_change) * x.margin < 0)
        # one edit per example: one round, so the request budget is 1 or extrapolated
        rate = -math.copysign(1.0, x.margin) * x.request_predicted_margin_change
        want = 1 if x.predicted_flip else (
            max(2, math.ceil(abs(x.margin) / rate)) if rate > 0 else 0)
        assert (x.request_flip_budget, x.request_flip_budget_reached) == (want, x.predicted_flip)
    assert any(x.request_predicted_margin_change != 0 for x in outcome.effects)
    final = client.get_operation(handle.name)
    assert final.done and final.progress is not None
    assert final.progress.kind == "attack" and final.progress.model == "tiny"
    assert final.progress.stage == "done"
    assert final.progress.create_time is not None


def test_attack_with_the_proximal_retrain_is_deterministic(client: PairdotsClient) -> None:
    """RETRAIN_MODE_SCOPE_PROXIMAL over the wire: the note says what ran, and the same request
    twice measures the same margins (no batch order or dropout in the retrain)."""
    def run() -> AttackOutcome:
        handle = client.attack(TESTS, model="tiny", mode=AttackMode.PREDICTION_MARGIN,
                               examples_per_test=2, random_candidates=2,
                               retrain=RetrainOptions(mode=RetrainMode.SCOPE_PROXIMAL))
        outcome = client.wait_operation(handle.name, timeout=300)
        assert isinstance(outcome, AttackOutcome)
        return outcome

    first, second = run(), run()
    assert any("proximal Bregman response" in n for n in first.notes)
    assert first.evaluation is not None and first.evaluation.examples == len(TESTS)
    got = [x.measured_margin for x in first.effects]
    assert all(m is not None for m in got)
    assert got == [x.measured_margin for x in second.effects]
    assert got != [x.margin for x in first.effects]  # the edits moved the served margins


def test_repair_operation_saves_a_bundle(client: PairdotsClient, server: RunningServer) -> None:
    handle = client.repair(DEV, model="tiny", examples_per_error=1,
                           retrain=RetrainOptions(mode=RetrainMode.SCOPE_ONLY, epochs=1,
                                                  save_as="tiny-repaired"))
    outcome = client.wait_operation(handle.name, timeout=300)
    assert isinstance(outcome, RepairOutcome)
    assert outcome.errors_found >= 1
    assert outcome.evaluation is not None and outcome.evaluation.saved_model == "tiny-repaired"
    saved = load_bundle(server.root / "tiny-repaired")
    assert len(saved.train) == 64 + len(outcome.edits)
    with pytest.raises(AlreadyExistsError):
        client.repair(DEV, model="tiny", examples_per_error=1,
                      retrain=RetrainOptions(save_as="tiny-repaired"))


def test_cancel_stops_a_running_attack(client: PairdotsClient, server: RunningServer) -> None:
    name = _long_attack(client)
    _wait_for(lambda: client.get_operation(name).progress is not None)
    client.cancel_operation(name)
    op = client.get_operation(name)
    assert op.done and op.error is not None and op.error.code.name == "CANCELLED"
    # the worker thread stops at its next check: the runner becomes idle
    _wait_for(lambda: server.app.jobs.active_count() == 0, 60)
    assert client.get_operation(name).error is not None


def test_attack_result_survives_restart(bundle_root: Path, tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    first = start_server(ServerConfig(bundles=bundle_root, port=0, jobs_db=db))
    try:
        with first.client() as c:
            name = c.attack(TESTS, model="tiny", mode=AttackMode.RANDOM,
                            examples_per_test=2, seed=5).name
            outcome = c.wait_operation(name, timeout=120)
    finally:
        first.stop()
    second = start_server(ServerConfig(bundles=bundle_root, port=0, jobs_db=db))
    try:
        with second.client() as c:
            again = c.get_operation(name)
            assert again.done and isinstance(again.outcome, AttackOutcome)
            assert again.outcome.edits == outcome.edits and len(outcome.edits) == 4
    finally:
        second.stop()


def _violations(err: InvalidArgumentError) -> list[str]:
    return [v.field for v in err.field_violations]


@pytest.mark.parametrize("kwargs,field", [
    ({"mode": AttackMode.UNSPECIFIED, "examples_per_test": 1}, "mode"),
    ({"mode": AttackMode.RANDOM, "examples_per_test": 0}, "examples_per_test"),
    ({"mode": AttackMode.RANDOM, "examples_per_test": 51}, "examples_per_test"),
    ({"mode": AttackMode.RANDOM, "examples_per_test": 1, "random_candidates": 21},
     "random_candidates"),
    ({"mode": AttackMode.RANDOM, "examples_per_test": 1,
      "retrain": RetrainOptions(epochs=11)}, "retrain.epochs"),
    ({"mode": AttackMode.RANDOM, "examples_per_test": 1, "max_words": 11}, "max_words"),
    ({"mode": AttackMode.RANDOM, "examples_per_test": 1, "max_words": 0}, "max_words"),
    ({"mode": AttackMode.RANDOM, "examples_per_test": 1,
      "retrain": RetrainOptions(save_as="../evil")}, "retrain.save_as"),
])
def test_bad_attack_requests(client: PairdotsClient, kwargs: dict[str, object],
                             field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        client.attack(TESTS, model="tiny", **kwargs)  # type: ignore[arg-type]
    assert field in _violations(info.value)


def test_bad_examples(client: PairdotsClient) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        client.attack([], model="tiny", mode=AttackMode.RANDOM, examples_per_test=1)
    assert "examples" in _violations(info.value)
    with pytest.raises(InvalidArgumentError) as info:
        client.attack([LabeledText("a fine film", 2)], model="tiny", mode=AttackMode.RANDOM,
                      examples_per_test=1)
    assert "examples[0].label" in _violations(info.value)
    with pytest.raises(InvalidArgumentError) as info:
        client.repair([("  ", 0)], model="tiny", examples_per_error=1)
    assert "examples[0].text" in _violations(info.value)
    with pytest.raises(InvalidArgumentError) as info:
        client.repair(DEV, model="tiny", examples_per_error=0)
    assert "examples_per_error" in _violations(info.value)


def test_unknown_model(client: PairdotsClient) -> None:
    with pytest.raises(NotFoundError):
        client.attack(TESTS, model="nope", mode=AttackMode.RANDOM, examples_per_test=1)
    with pytest.raises(NotFoundError):
        client.repair(DEV, model="nope", examples_per_error=1)


def test_queue_limit(bundle_root: Path, tmp_path: Path) -> None:
    cfg = ServerConfig(bundles=bundle_root, port=0, jobs_db=tmp_path / "jobs.sqlite3",
                       jobs=JobLimits(max_concurrent=1, max_queued=1))
    running = start_server(cfg)
    try:
        with running.client() as c:
            name = _long_attack(c)
            with pytest.raises(ResourceExhaustedError):
                c.attack(TESTS, model="tiny", mode=AttackMode.RANDOM, examples_per_test=1)
            c.cancel_operation(name)
    finally:
        running.stop()
