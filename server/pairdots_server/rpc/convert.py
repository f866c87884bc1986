"""Proto ⇄ domain conversion with request validation.

Validation collects every bad field of a request into one InvalidArgument with BadRequest
field violations, so a caller fixes all of them in one round trip.
"""

from __future__ import annotations

import datetime
import enum
import math
from collections.abc import Iterable
from typing import Any, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2

from pairdots.v1 import pairdots_pb2 as pb
from pairdots_server.config import ExplainLimits
from pairdots_server.core.curvature import Curvature
from pairdots_server.core.saliency import Target, TokenScore
from pairdots_server.influence.explain import ExplainAnswer, ExplainQuery, Influential, Role
from pairdots_server.influence.pipeline import TokenInfluence
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import InfluenceSettings, WordCandidates, WordMeasurement
from pairdots_server.influence.solver_policy import SolverChoice
from pairdots_server.rpc.validation import SOLVERS, Violations, solver_settings
from pairdots_server.service.registry import MODEL_PREFIX

E = TypeVar("E", bound=enum.Enum)


def duration(seconds: float) -> duration_pb2.Duration:
    """A google.protobuf.Duration of `seconds` (rounded to the nanosecond)."""
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def model_name(model: str) -> str:
    """The resource name "models/{model}" of a served model's bare id (AIP-122)."""
    return model if model.startswith(MODEL_PREFIX) else MODEL_PREFIX + model


def enum_table(pb_enum: Any, prefix: str, members: Iterable[E], *,
               unspecified: E | None = None) -> dict[int, E]:
    """proto enum value → domain member, matched by name: `prefix + member.name` for every
    member (in the domain enum's order), after `prefix + "UNSPECIFIED"` → `unspecified` when
    one is given (without it UNSPECIFIED is not in the table: a required field)."""
    table: dict[int, E] = {}
    if unspecified is not None:
        table[pb_enum.Value(prefix + "UNSPECIFIED")] = unspecified
    for member in members:
        table[pb_enum.Value(prefix + member.name)] = member
    return table


TARGETS = {
    pb.TARGET_FUNCTION_UNSPECIFIED: Target.LOG_PROB,
    pb.TARGET_FUNCTION_LOG_PROBABILITY: Target.LOG_PROB,
    pb.TARGET_FUNCTION_PROBABILITY: Target.PROB,
    pb.TARGET_FUNCTION_LOGIT: Target.LOGIT,
}
TOKEN_SCORES = {
    pb.TOKEN_SCORE_METHOD_UNSPECIFIED: TokenScore.L2_NORM,
    pb.TOKEN_SCORE_METHOD_GRADIENT_TIMES_DELTA_UNK: TokenScore.GRAD_DELTA_UNK,
    pb.TOKEN_SCORE_METHOD_GRADIENT_TIMES_INPUT: TokenScore.GRAD_INPUT,
    pb.TOKEN_SCORE_METHOD_L2_NORM: TokenScore.L2_NORM,
    pb.TOKEN_SCORE_METHOD_SUM: TokenScore.SUM,
}
SOLVER_TO_PB = {v: k for k, v in SOLVERS.items() if v is not None}
CURVATURE_TO_PB = {Curvature.GGN.value: pb.CURVATURE_GAUSS_NEWTON,
                   Curvature.HESSIAN.value: pb.CURVATURE_HESSIAN}
SEARCH = {
    pb.CANDIDATE_SEARCH_UNSPECIFIED: None,
    pb.CANDIDATE_SEARCH_INDEX: True,
    pb.CANDIDATE_SEARCH_EXHAUSTIVE: False,
}
TARGET_TO_PB = {Target.LOG_PROB: pb.TARGET_FUNCTION_LOG_PROBABILITY,
                Target.PROB: pb.TARGET_FUNCTION_PROBABILITY, Target.LOGIT: pb.TARGET_FUNCTION_LOGIT}
TOKEN_SCORE_TO_PB = {v: k for k, v in TOKEN_SCORES.items() if k != pb.TOKEN_SCORE_METHOD_UNSPECIFIED}
WORD_MEASUREMENTS = enum_table(pb.WordMeasurement, "WORD_MEASUREMENT_", WordMeasurement,
                               unspecified=WordMeasurement.MARGIN)
WORD_CANDIDATES = enum_table(pb.WordCandidates, "WORD_CANDIDATES_", WordCandidates,
                             unspecified=WordCandidates.CONTAINING)
TOKEN_INFLUENCE = enum_table(pb.TokenInfluenceMethod, "TOKEN_INFLUENCE_METHOD_",
                             [m for m in TokenInfluence if m is not TokenInfluence.AUTO],
                             unspecified=TokenInfluence.EXACT)  # AUTO: the serve flag only


def explain_query(req: pb.ExplainRequest, limits: ExplainLimits) -> ExplainQuery:
    """Validate an ExplainRequest (model existence and label ranges are checked later)."""
    v = Violations()
    text = req.text
    if not text.strip():
        v.add("text", "must contain at least one non-whitespace character")
    elif len(text) > limits.max_text_chars:
        v.add("text", f"has {len(text)} characters; at most {limits.max_text_chars} are accepted")
    if "\x00" in text:
        v.add("text", "must not contain NUL characters")
    top = limits.default_top_words if not req.HasField("top_words") else req.top_words
    if not 0 <= top <= limits.max_top_words:
        v.add("top_words", f"must be in 0..{limits.max_top_words}, got {top}")
    if len(req.word_positions) > limits.max_top_words:
        v.add("word_positions", f"at most {limits.max_top_words} positions, got "
              f"{len(req.word_positions)}")
    if any(p < 0 for p in req.word_positions):
        v.add("word_positions", "positions must be >= 0")
    if len(set(req.word_positions)) != len(req.word_positions):
        v.add("word_positions", "positions must be distinct")
    k = req.examples_per_word or limits.default_examples_per_word
    if not 1 <= k <= limits.max_examples_per_word:
        v.add("examples_per_word", f"must be in 1..{limits.max_examples_per_word}, got {k}")
    for name in ("target_label", "gold_label"):
        if req.HasField(name) and getattr(req, name) < 0:
            v.add(name, f"must be >= 0, got {getattr(req, name)}")
    target = v.enum("saliency.target_function", req.saliency.target_function, TARGETS,
                    "TargetFunction")
    score = v.enum("saliency.token_score", req.saliency.token_score, TOKEN_SCORES,
                   "TokenScoreMethod")
    infl = req.influence
    solver = solver_settings(v, infl.solver, "influence.solver")
    use_index = v.enum("influence.candidate_search", infl.candidate_search, SEARCH,
                       "CandidateSearch")
    if not 0 <= infl.candidate_count <= limits.max_candidates:
        v.add("influence.candidate_count", f"must be in 0..{limits.max_candidates}, got "
              f"{infl.candidate_count}")
    token_infl = v.enum("influence.token_influence", infl.token_influence, TOKEN_INFLUENCE,
                        "TokenInfluenceMethod")
    if infl.token_influence == pb.TOKEN_INFLUENCE_METHOD_UNSPECIFIED:
        token_infl = TokenInfluence(limits.default_token_influence)  # serve flag
    word_measurement = v.enum("influence.word_measurement", infl.word_measurement,
                              WORD_MEASUREMENTS, "WordMeasurement")
    word_candidates = v.enum("influence.word_candidates", infl.word_candidates,
                             WORD_CANDIDATES, "WordCandidates")
    v.raise_if_any()
    return ExplainQuery(
        text=text,
        target_label=req.target_label if req.HasField("target_label") else None,
        gold_label=req.gold_label if req.HasField("gold_label") else None,
        top_words=top,
        word_positions=tuple(req.word_positions),
        examples_per_word=k,
        influence=InfluenceSettings(
            target=target,  # type: ignore[arg-type]
            token_score=score,  # type: ignore[arg-type]
            solver=solver,
            use_index=use_index,  # type: ignore[arg-type]
            candidates=infl.candidate_count,
            word_measurement=word_measurement,  # type: ignore[arg-type]
            word_candidates=word_candidates,  # type: ignore[arg-type]
            prediction_influence=(infl.prediction_influence
                                  if infl.HasField("prediction_influence") else True),
        ),
        token_influence=token_infl,  # type: ignore[arg-type]
    )


def _example(rt: ModelRuntime, item: Influential) -> pb.InfluentialExample:
    return pb.InfluentialExample(
        train_index=item.train_index,
        text=item.text,
        label=item.label,
        label_name=rt.bundle.labels[item.label],
        influence=item.influence,
        words=[pb.WordInfluence(text=w, influence=x) for w, x in item.words],
        responsible_word=item.responsible_word,
    )


def _solver_diagnostics(d: dict[str, float | int | bool | str]) -> pb.SolverDiagnostics:
    return pb.SolverDiagnostics(
        solver=SOLVER_TO_PB.get(SolverChoice(d["method"]), pb.SOLVER_UNSPECIFIED),
        curvature=CURVATURE_TO_PB.get(str(d["curvature"]), pb.CURVATURE_UNSPECIFIED),
        iteration_count=int(d["iterations"]),
        relative_change=float(d["rel_change"]),
        norm=float(d["norm"]),
        effective_damping=float(d["effective_damping"]),
        converged=bool(d["converged"]),
        duration=duration(float(d["seconds"])),
        cached=bool(d["cached"]),
        damping_rule=str(d.get("damping_rule") or ""),
    )


def _inverse(table: dict[int, E]) -> dict[E, int]:
    """domain member → proto value of an enum_table (UNSPECIFIED left out)."""
    return {member: value for value, member in table.items() if value != 0}


def explain_settings(a: ExplainAnswer) -> pb.ExplainSettings | None:
    """The settings an answer was computed with (ExplainResponse.settings), or None when the
    answer does not carry them."""
    s = a.settings
    if s is None:
        return None
    method = s.solver.method
    curvature = s.solver.curvature
    return pb.ExplainSettings(
        target_function=TARGET_TO_PB[s.target],
        token_score=TOKEN_SCORE_TO_PB[s.token_score],
        word_measurement=pb.WordMeasurement.ValueType(
            _inverse(WORD_MEASUREMENTS)[s.word_measurement]),
        word_candidates=pb.WordCandidates.ValueType(_inverse(WORD_CANDIDATES)[s.word_candidates]),
        solver=SOLVER_TO_PB[method] if method is not None else pb.SOLVER_UNSPECIFIED,
        curvature=(CURVATURE_TO_PB.get(curvature.value, pb.CURVATURE_UNSPECIFIED)
                   if curvature is not None else pb.CURVATURE_UNSPECIFIED),
        candidate_search=(pb.CANDIDATE_SEARCH_INDEX if s.use_index
                          else pb.CANDIDATE_SEARCH_EXHAUSTIVE),
        candidate_count=s.candidates,
        token_influence=pb.TokenInfluenceMethod.ValueType(
            _inverse(TOKEN_INFLUENCE)[a.token_influence]),
        prediction_influence=s.prediction_influence,
    )


def explain_response(rt: ModelRuntime, a: ExplainAnswer) -> pb.ExplainResponse:
    labels = rt.bundle.labels
    roles = {Role.TARGET: pb.EXPLANATION_ROLE_TARGET, Role.GOLD: pb.EXPLANATION_ROLE_GOLD}
    explanations = []
    for e in a.explanations:
        words = [
            pb.SalientWord(
                word_index=s.word_index,
                text=s.text,
                saliency=s.saliency,
                supporting=[_example(rt, x) for x in s.supporting],
                opposing=[_example(rt, x) for x in s.opposing],
                solver=_solver_diagnostics(s.solver),
                contribution=s.contribution,
                containing_example_count=s.containing_examples,
            )
            for s in e.salient_words
        ]
        p = e.prediction
        prediction = None if p is None else pb.PredictionInfluence(
            margin=p.margin,
            supporting=[_example(rt, x) for x in p.supporting],
            opposing=[_example(rt, x) for x in p.opposing],
            solver=_solver_diagnostics(p.solver),
            scored_candidate_count=p.candidates_scored,
        )
        explanations.append(pb.LabelExplanation(
            label=e.label, label_name=labels[e.label], role=roles[e.role],
            word_saliency=e.word_saliency, salient_words=words,
            word_contribution=e.word_contribution, prediction=prediction,
        ))
    return pb.ExplainResponse(
        model=model_name(rt.name),
        prediction=pb.Prediction(
            label=a.predicted, label_name=labels[a.predicted], probabilities=a.probabilities,
            label_names=labels,
        ),
        words=[
            pb.Word(index=w.index, text=w.text, char_start=w.char_start, char_end=w.char_end,
                    piece_count=w.pieces)
            for w in a.words
        ],
        explanations=explanations,
        diagnostics=pb.Diagnostics(
            influence_computed=a.influence_computed,
            candidate_search=(pb.CANDIDATE_SEARCH_INDEX if a.used_index
                              else pb.CANDIDATE_SEARCH_EXHAUSTIVE)
            if a.influence_computed else pb.CANDIDATE_SEARCH_UNSPECIFIED,
            scored_candidate_count=a.candidates_scored,
            training_example_count=a.training_examples,
            timings=[pb.StageTiming(stage=k, duration=duration(v)) for k, v in a.timings.items()],
            warnings=a.warnings,
            notes=a.notes,
            total_duration=duration(a.total_seconds),
        ),
        settings=explain_settings(a),
    )


def model_proto(rt: ModelRuntime) -> pb.Model:
    m = rt.bundle.manifest
    created = timestamp_pb2.Timestamp()
    try:
        created.FromDatetime(datetime.datetime.fromisoformat(str(m.get("created_at"))))
    except (TypeError, ValueError):
        pass
    dev = (m.get("dev") or {}).get("accuracy") if isinstance(m.get("dev"), dict) else None
    from pairdots_server.influence.solver_policy import default_method

    has_lowrank = rt.has_lowrank
    default_solver = SOLVER_TO_PB[default_method(rt)]
    return pb.Model(
        name=model_name(rt.name),
        labels=rt.bundle.labels,
        base_model=str((m.get("model") or {}).get("source", "")
                       if isinstance(m.get("model"), dict) else m.get("model", "")),
        training_example_count=rt.n_train,
        dev_accuracy=float(dev) if isinstance(dev, (int, float)) else math.nan,
        scope=rt.task.scope.describe(),
        scope_parameter_count=rt.num_params,
        has_index=rt.has_index,
        has_low_rank=has_lowrank,
        has_ekfac=rt.has_ekfac,
        has_diagonal=rt.has_diagonal,
        default_solver=default_solver,
        create_time=created,
        format_version=int(m.get("format_version", 0)),
        max_length=rt.max_length,
    )
