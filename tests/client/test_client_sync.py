"""The sync client against a real in-process gRPC server with test servicers."""

from __future__ import annotations

import math

import grpc
import pytest
from google.rpc import code_pb2
from pairdots_client_fakes import HOSTILE, OK, Harness, explain_response, rich_status

from pairdots import (
    AttackMode,
    AttackOutcome,
    CandidateSearch,
    DeadlineExceededError,
    ExplanationRole,
    FailedPreconditionError,
    InfluenceOptions,
    InvalidArgumentError,
    JobProgress,
    NotFoundError,
    PairdotsClient,
    PairdotsError,
    PermissionDeniedError,
    RepairOutcome,
    ResourceExhaustedError,
    RetrainOptions,
    RpcCancelledError,
    SaliencyOptions,
    Solver,
    SolverOptions,
    TargetFunction,
    TokenInfluenceMethod,
    UnauthenticatedError,
    UnavailableError,
)
from pairdots.v1 import pairdots_pb2


def _unavailable() -> tuple[str, object]:
    return ("abort", rich_status(code_pb2.UNAVAILABLE, "server is draining", reason="DRAINING"))


def test_list_and_get_models(harness: Harness, make_config) -> None:
    with PairdotsClient(make_config(harness.address)) as client:
        models = client.list_models()
        assert [m.name for m in models] == ["a-model", "tiny-sst2"]
        m = client.get_model("tiny-sst2")
    assert m.labels == ("negative", "positive")
    assert m.default_solver is Solver.LISSA
    assert m.dev_accuracy == 0.875 and m.training_examples == 100 and m.has_index
    assert m.create_time is not None and m.create_time.timestamp() == 1_700_000_000
    assert m.raw.name == "models/tiny-sst2" and m.resource_name == "models/tiny-sst2"
    assert m.name == "tiny-sst2" and m.scope_parameters == 1538  # the bare id, as before


def test_explain_converts_every_field(harness: Harness, make_config) -> None:
    with PairdotsClient(make_config(harness.address)) as client:
        expl = client.explain("a gripping , funny film", target_label=1, gold_label=0,
                              top_words=1, word_positions=[0], examples_per_word=2)
    want = explain_response()
    assert expl.raw == want
    assert expl.model == "tiny-sst2"
    assert expl.prediction.label_name == "positive"
    assert expl.prediction.probabilities == (0.25, 0.75)
    assert [w.text for w in expl.words] == ["a", "gripping", ",", "funny", "film"]
    assert expl.words[1].char_start == 2 and expl.words[1].char_end == 10
    target, gold = expl.target, expl.gold
    assert target is not None and gold is not None
    assert target.role is ExplanationRole.TARGET and gold.role is ExplanationRole.GOLD
    assert target.word_saliency == pytest.approx([0.5, 0.2, -0.1, -0.4, -0.7], abs=1e-12)
    sw = target.salient_words[0]
    assert (sw.word_index, sw.text, sw.saliency) == (0, "a", 0.5)
    assert [e.train_index for e in sw.supporting] == [7, 3]
    assert [e.train_index for e in sw.opposing] == [11]
    top = sw.supporting[0]
    assert top.influence == 0.25 and top.supporting
    assert top.responsible_word == 1 and top.responsible is not None
    assert top.responsible.text == "gripping" and top.responsible.influence == 0.125
    assert sw.supporting[1].text.startswith(HOSTILE)
    assert sw.solver is not None and sw.solver.converged and sw.solver.iterations == 200
    assert sw.solver.solver is Solver.LISSA
    # proto -1 becomes None; an unset SolverDiagnostics becomes None
    assert gold.salient_words[0].supporting[0].responsible_word is None
    assert gold.salient_words[0].solver is None
    d = expl.diagnostics
    assert d.candidate_search is CandidateSearch.EXHAUSTIVE and d.candidates_scored == 100
    assert [t.stage for t in d.timings] == ["saliency", "solve"]
    assert d.warnings[0].endswith(HOSTILE)


def test_explain_request_fields(harness: Harness, make_config) -> None:
    infl = InfluenceOptions(solver=SolverOptions(solver=Solver.CONJUGATE_GRADIENT, damping=0.1,
                                                 max_iterations=50, seed=3),
                            candidate_search=CandidateSearch.INDEX, candidates=200,
                            token_influence=TokenInfluenceMethod.EXACT)
    with PairdotsClient(make_config(harness.address)) as client:
        client.explain("text", model="other", gold_label=0, word_positions=(2, 4),
                       saliency=SaliencyOptions(target_function=TargetFunction.LOGIT),
                       influence=infl)
        client.explain("plain")
    req, plain = harness.service.requests["Explain"]
    assert req.model == "other" and req.text == "text"
    assert req.HasField("gold_label") and req.gold_label == 0
    assert not req.HasField("target_label") and not req.HasField("top_words")
    assert list(req.word_positions) == [2, 4]
    assert req.saliency.target_function == pairdots_pb2.TARGET_FUNCTION_LOGIT
    assert req.influence.solver.solver == pairdots_pb2.SOLVER_CONJUGATE_GRADIENT
    assert req.influence.solver.damping == 0.1 and req.influence.solver.HasField("damping")
    assert not req.influence.solver.HasField("scale")
    assert req.influence.solver.max_iterations == 50 and req.influence.solver.seed == 3
    assert req.influence.candidate_search == pairdots_pb2.CANDIDATE_SEARCH_INDEX
    assert req.influence.candidate_count == 200
    assert req.influence.token_influence == pairdots_pb2.TOKEN_INFLUENCE_METHOD_EXACT
    # defaults: model from ClientConfig.default_model, no options sent
    assert plain.model == "tiny-sst2" and not plain.HasField("influence")


def test_explain_without_model_is_a_local_error(harness: Harness, make_config) -> None:
    with PairdotsClient(make_config(harness.address, default_model="")) as client, pytest.raises(ValueError, match="default_model"):
        client.explain("text")
    assert harness.service.calls["Explain"] == []


def test_bearer_token_sent_on_every_call(harness: Harness, make_config) -> None:
    with PairdotsClient(make_config(harness.address, token="s3cret")) as client:
        client.list_models()
        client.explain("x")
    for method in ("ListModels", "Explain"):
        assert harness.service.calls[method][0]["authorization"] == "Bearer s3cret"
    with PairdotsClient(make_config(harness.address)) as client:
        client.list_models()
    assert "authorization" not in harness.service.calls["ListModels"][1]


def test_retried_on_unavailable_then_succeeds(harness: Harness, make_config) -> None:
    harness.service.scripts["Explain"] = [_unavailable(), _unavailable(), OK]
    with PairdotsClient(make_config(harness.address)) as client:
        expl = client.explain("x")
    assert expl.model == "tiny-sst2"
    assert len(harness.service.calls["Explain"]) == 3


def test_retries_bounded_by_max_retries(harness: Harness, make_config) -> None:
    harness.service.scripts["Explain"] = [_unavailable()] * 5
    with PairdotsClient(make_config(harness.address, max_retries=2)) as client, pytest.raises(UnavailableError) as info:
        client.explain("x")
    assert len(harness.service.calls["Explain"]) == 3
    assert info.value.reason == "DRAINING" and info.value.code is grpc.StatusCode.UNAVAILABLE


def test_invalid_argument_not_retried_and_violations_parsed(harness: Harness, make_config) -> None:
    harness.service.scripts["Explain"] = [("abort", rich_status(
        code_pb2.INVALID_ARGUMENT, "top_words: must be in 0..32", reason="FIELD_OUT_OF_RANGE",
        violations=(("top_words", "must be in 0..32, got 40"),)))]
    with PairdotsClient(make_config(harness.address)) as client, pytest.raises(InvalidArgumentError) as info:
        client.explain("x", top_words=40)
    err = info.value
    assert len(harness.service.calls["Explain"]) == 1
    assert err.reason == "FIELD_OUT_OF_RANGE" and err.domain == "pairdots.dev"
    assert err.error_metadata == {"k": "v"}
    assert [(v.field, v.description) for v in err.field_violations] == [
        ("top_words", "must be in 0..32, got 40")]
    assert err.message == "top_words: must be in 0..32"
    assert "top_words" in str(err) and not err.retryable


def test_retry_info_delay_is_honoured(harness: Harness, make_config) -> None:
    # Backoff alone (30 s) would not fit the 5 s deadline, so the retry happens only because
    # the client waits RetryInfo's 0.01 s instead.
    harness.service.scripts["Explain"] = [("abort", rich_status(
        code_pb2.RESOURCE_EXHAUSTED, "queue full", reason="QUEUE_FULL", retry_delay_s=0.01)), OK]
    cfg = make_config(harness.address, retry_initial_backoff_s=30.0, retry_max_backoff_s=30.0)
    with PairdotsClient(cfg) as client:
        client.explain("x", timeout=5.0)
    assert len(harness.service.calls["Explain"]) == 2


def test_retry_info_longer_than_deadline_raises_at_once(harness: Harness, make_config) -> None:
    harness.service.scripts["Explain"] = [("abort", rich_status(
        code_pb2.RESOURCE_EXHAUSTED, "queue full", reason="QUEUE_FULL", retry_delay_s=60.0))]
    with PairdotsClient(make_config(harness.address)) as client, pytest.raises(ResourceExhaustedError) as info:
        client.explain("x", timeout=5.0)
    assert info.value.retry_after_s == pytest.approx(60.0)
    assert len(harness.service.calls["Explain"]) == 1


def test_deadline_exceeded(harness: Harness, make_config) -> None:
    harness.service.scripts["Explain"] = [("hang", 30.0)]
    with PairdotsClient(make_config(harness.address)) as client, pytest.raises(DeadlineExceededError) as info:
        client.explain("x", timeout=0.3)
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(harness.service.calls["Explain"]) == 1


def test_default_deadline_always_set(harness: Harness, make_config) -> None:
    harness.service.scripts["ListModels"] = [("hang", 30.0)]
    with PairdotsClient(make_config(harness.address, default_timeout_s=0.3)) as client, pytest.raises(DeadlineExceededError):
        client.list_models()


@pytest.mark.parametrize(("code", "cls"), [
    (code_pb2.NOT_FOUND, NotFoundError),
    (code_pb2.FAILED_PRECONDITION, FailedPreconditionError),
    (code_pb2.UNAUTHENTICATED, UnauthenticatedError),
    (code_pb2.PERMISSION_DENIED, PermissionDeniedError),
    (code_pb2.RESOURCE_EXHAUSTED, ResourceExhaustedError),
    (code_pb2.CANCELLED, RpcCancelledError),
])
def test_status_codes_map_to_typed_errors(harness: Harness, make_config, code: int,
                                          cls: type[PairdotsError]) -> None:
    harness.service.scripts["GetModel"] = [("abort", rich_status(code, "nope", reason="WHY"))] * 9
    with PairdotsClient(make_config(harness.address, max_retries=0)) as client, pytest.raises(cls) as info:
        client.get_model("tiny-sst2")
    assert type(info.value) is cls and info.value.reason == "WHY"
    assert info.value.code.value[0] == code


def test_unknown_model_is_not_found(harness: Harness, make_config) -> None:
    with PairdotsClient(make_config(harness.address)) as client, pytest.raises(NotFoundError) as info:
        client.get_model("nope")
    assert info.value.reason == "MODEL_NOT_FOUND" and "nope" in info.value.message


def test_unreachable_server_is_unavailable(make_config) -> None:
    # Port 1 on localhost: nothing listens; every attempt fails with UNAVAILABLE.
    with PairdotsClient(make_config("127.0.0.1:1", max_retries=1)) as client, pytest.raises(UnavailableError):
        client.list_models(timeout=5.0)


def test_attack_and_wait_with_progress(harness: Harness, make_config) -> None:
    seen: list[JobProgress] = []
    with PairdotsClient(make_config(harness.address)) as client:
        handle = client.attack([("a dull film", 0)], mode=AttackMode.DEMOTE_SALIENT,
                               examples_per_test=2, retrain=RetrainOptions(epochs=1), seed=5)
        assert handle.name.startswith("operations/attack-") and not handle.done
        assert handle.progress is not None and handle.progress.stage == "explaining"
        outcome = client.wait_operation(handle.name, timeout=10.0, progress=seen.append)
    req = harness.service.requests["Attack"][0]
    assert req.mode == pairdots_pb2.ATTACK_MODE_DEMOTE_SALIENT and req.examples_per_test == 2
    assert req.examples[0].text == "a dull film" and req.retrain.epochs == 1 and req.seed == 5
    assert isinstance(outcome, AttackOutcome)
    assert outcome.edits[0].substitute == "riveting"
    assert outcome.evaluation is not None and outcome.evaluation.accuracy_after == 0.6
    assert [p.stage for p in seen] == ["perturbing", "retraining", "done"]
    assert seen[0].fraction == 0.5
    assert harness.ops.calls["WaitOperation"] >= 3


def test_wait_falls_back_to_polling(harness_no_wait: Harness, make_config) -> None:
    h = harness_no_wait
    with PairdotsClient(make_config(h.address)) as client:
        handle = client.repair([("x", 1)], examples_per_error=4)
        outcome = client.wait_operation(handle.name, timeout=10.0)
    assert isinstance(outcome, RepairOutcome) and outcome.errors_found == 2
    assert h.ops.calls["WaitOperation"] == 1 and h.ops.calls["GetOperation"] == 1


def test_failed_operation_raises_its_error(harness: Harness, make_config) -> None:
    harness.ops.fail_with = rich_status(code_pb2.FAILED_PRECONDITION, "solver diverged",
                                        reason="SOLVER_DIVERGED")
    with PairdotsClient(make_config(harness.address)) as client:
        handle = client.attack([("x", 0)], mode=AttackMode.RANDOM, examples_per_test=1)
        with pytest.raises(FailedPreconditionError) as info:
            client.wait_operation(handle.name, timeout=10.0)
    assert info.value.reason == "SOLVER_DIVERGED" and info.value.message == "solver diverged"


def test_cancel_then_wait_raises_cancelled(harness: Harness, make_config) -> None:
    with PairdotsClient(make_config(harness.address)) as client:
        handle = client.attack([("x", 0)], mode=AttackMode.COMBINED, examples_per_test=1)
        client.cancel_operation(handle.name)
        with pytest.raises(RpcCancelledError):
            client.wait_operation(handle.name, timeout=10.0)
        state = client.get_operation(handle.name)
    assert state.done and isinstance(state.error, RpcCancelledError)
    with pytest.raises(RpcCancelledError):
        state.result()


def test_wait_timeout(harness: Harness, make_config) -> None:
    harness.ops.frozen = True
    with PairdotsClient(make_config(harness.address)) as client:
        handle = client.attack([("x", 0)], mode=AttackMode.COMBINED, examples_per_test=1)
        with pytest.raises(DeadlineExceededError) as info:
            client.wait_operation(handle.name, timeout=0.3)
    assert info.value.reason == "CLIENT_WAIT_TIMEOUT"
    assert info.value.error_metadata["operation"] == handle.name


def test_list_get_delete_operations(harness: Harness, make_config) -> None:
    with PairdotsClient(make_config(harness.address)) as client:
        a = client.attack([("x", 0)], mode=AttackMode.RANDOM, examples_per_test=1)
        client.repair([("x", 0)], examples_per_error=1)
        client.attack([("y", 0)], mode=AttackMode.RANDOM, examples_per_test=1)
        page = client.list_operations(filter="kind=attack", page_size=1)
        assert len(page.operations) == 1 and page.next_page_token == "1"
        page2 = client.list_operations(filter="kind=attack", page_size=1,
                                       page_token=page.next_page_token)
        assert page2.next_page_token == ""
        names = {page.operations[0].name, page2.operations[0].name}
        assert all(n.startswith("operations/attack-") for n in names) and len(names) == 2
        client.delete_operation(a.name)
        with pytest.raises(NotFoundError):
            client.get_operation(a.name)


def test_nan_dev_accuracy(harness: Harness, make_config) -> None:
    from pairdots_client_fakes import model_proto

    from pairdots.results import ModelInfo

    msg = model_proto()
    msg.dev_accuracy = math.nan
    info = ModelInfo.from_proto(msg)
    assert not info.dev_accuracy_known and math.isnan(info.dev_accuracy)
