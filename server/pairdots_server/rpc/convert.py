"""Proto ⇄ domain conversion with request validation.

Validation collects every bad field of a request into one InvalidArgument with BadRequest
field violations, so a caller fixes all of them in one round trip.
"""

from __future__ import annotations

import datetime
import math

from google.protobuf import timestamp_pb2

from pairdots.v1 import pairdots_pb2 as pb
from pairdots_server.config import ExplainLimits
from pairdots_server.core.curvature import Curvature
from pairdots_server.core.saliency import Target, TokenScore
from pairdots_server.errors import FieldViolation, InvalidArgument
from pairdots_server.explain import ExplainAnswer, ExplainQuery, Influential
from pairdots_server.runtime import ModelRuntime
from pairdots_server.solvers import SolverChoice, SolverSettings

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
CURVATURES = {
    pb.CURVATURE_UNSPECIFIED: None,
    pb.CURVATURE_GAUSS_NEWTON: Curvature.GGN,
    pb.CURVATURE_HESSIAN: Curvature.HESSIAN,
}
SOLVERS = {
    pb.SOLVER_UNSPECIFIED: None,
    pb.SOLVER_LISSA: SolverChoice.LISSA,
    pb.SOLVER_CONJUGATE_GRADIENT: SolverChoice.CG,
    pb.SOLVER_LOW_RANK: SolverChoice.LOW_RANK,
    pb.SOLVER_EXACT: SolverChoice.EXACT,
}
# SolverOptions fields that only the iterative solvers use (LiSSA; CG uses the first two)
ITERATIVE_ONLY = ("max_iterations", "tolerance", "scale", "repeats", "batch_size", "seed")
SOLVER_TO_PB = {v: k for k, v in SOLVERS.items() if v is not None}
CURVATURE_TO_PB = {Curvature.GGN.value: pb.CURVATURE_GAUSS_NEWTON,
                   Curvature.HESSIAN.value: pb.CURVATURE_HESSIAN}
SEARCH = {
    pb.CANDIDATE_SEARCH_UNSPECIFIED: None,
    pb.CANDIDATE_SEARCH_INDEX: True,
    pb.CANDIDATE_SEARCH_EXHAUSTIVE: False,
}
TOKEN_INFLUENCE = {
    pb.TOKEN_INFLUENCE_METHOD_UNSPECIFIED: "exact",
    pb.TOKEN_INFLUENCE_METHOD_EXACT: "exact",
    pb.TOKEN_INFLUENCE_METHOD_FIRST_ORDER: "first_order",
    pb.TOKEN_INFLUENCE_METHOD_NONE: "none",
}


class _Violations:
    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def enum(self, field: str, value: int, table: dict[int, object], name: str) -> object:
        if value not in table:
            self.add(field, f"{value} is not a valid {name}; see the proto for the values")
            return None
        return table[value]

    def raise_if_any(self) -> None:
        if self.items:
            summary = "; ".join(f"{v.field}: {v.description}" for v in self.items)
            raise InvalidArgument(f"invalid request: {summary}", violations=self.items)


def _solver_settings(v: _Violations, s: pb.SolverOptions, prefix: str) -> SolverSettings:
    method = v.enum(f"{prefix}.solver", s.solver, SOLVERS, "Solver")
    curvature = v.enum(f"{prefix}.curvature", s.curvature, CURVATURES, "Curvature")

    def positive(name: str, value: float, upper: float = math.inf) -> float | None:
        if not s.HasField(name):
            return None
        if not (math.isfinite(value) and 0 < value < upper):
            bound = "" if upper == math.inf else f" and < {upper}"
            v.add(f"{prefix}.{name}", f"must be a finite number > 0{bound}, got {value}")
            return None
        return float(value)

    def bounded(name: str, value: int, lo: int, hi: int) -> int | None:
        if not s.HasField(name):
            return None
        if not lo <= value <= hi:
            v.add(f"{prefix}.{name}", f"must be in {lo}..{hi}, got {value}")
            return None
        return int(value)

    if method is SolverChoice.LOW_RANK:
        if curvature is Curvature.HESSIAN:
            v.add(f"{prefix}.curvature", "SOLVER_LOW_RANK solves with the precomputed "
                  "Gauss-Newton factors; for CURVATURE_HESSIAN choose SOLVER_LISSA, "
                  "SOLVER_CONJUGATE_GRADIENT or SOLVER_EXACT")
        for name in ITERATIVE_ONLY:
            if s.HasField(name):
                v.add(f"{prefix}.{name}", "is not used by SOLVER_LOW_RANK (a closed-form solve "
                      "from the precomputed factors; only damping applies); remove it or "
                      "choose SOLVER_LISSA / SOLVER_CONJUGATE_GRADIENT")
    return SolverSettings(
        method=method,  # type: ignore[arg-type]
        curvature=curvature,  # type: ignore[arg-type]
        damping=positive("damping", s.damping),
        scale=positive("scale", s.scale),
        max_iterations=bounded("max_iterations", s.max_iterations, 1, 100_000),
        repeats=bounded("repeats", s.repeats, 1, 16),
        batch_size=bounded("batch_size", s.batch_size, 1, 1024),
        tolerance=positive("tolerance", s.tolerance, 1.0),
        seed=int(s.seed) if s.HasField("seed") else None,
    )


def explain_query(req: pb.ExplainRequest, limits: ExplainLimits) -> ExplainQuery:
    """Validate an ExplainRequest (model existence and label ranges are checked later)."""
    v = _Violations()
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
    solver = _solver_settings(v, infl.solver, "influence.solver")
    use_index = v.enum("influence.candidate_search", infl.candidate_search, SEARCH,
                       "CandidateSearch")
    if not 0 <= infl.candidates <= limits.max_candidates:
        v.add("influence.candidates", f"must be in 0..{limits.max_candidates}, got "
              f"{infl.candidates}")
    token_infl = v.enum("influence.token_influence", infl.token_influence, TOKEN_INFLUENCE,
                        "TokenInfluenceMethod")
    v.raise_if_any()
    return ExplainQuery(
        text=text,
        target_label=req.target_label if req.HasField("target_label") else None,
        gold_label=req.gold_label if req.HasField("gold_label") else None,
        top_words=top,
        word_positions=tuple(req.word_positions),
        examples_per_word=k,
        target=target,  # type: ignore[arg-type]
        token_score=score,  # type: ignore[arg-type]
        solver=solver,
        use_index=use_index,  # type: ignore[arg-type]
        candidates=infl.candidates,
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


def explain_response(rt: ModelRuntime, a: ExplainAnswer) -> pb.ExplainResponse:
    labels = rt.bundle.labels
    roles = {"target": pb.EXPLANATION_ROLE_TARGET, "gold": pb.EXPLANATION_ROLE_GOLD}
    explanations = []
    for e in a.explanations:
        words = []
        for s in e.salient_words:
            d = s.solver
            words.append(pb.SalientWord(
                word_index=s.word_index,
                text=s.text,
                saliency=s.saliency,
                supporting=[_example(rt, x) for x in s.supporting],
                opposing=[_example(rt, x) for x in s.opposing],
                solver=pb.SolverDiagnostics(
                    solver=SOLVER_TO_PB[SolverChoice(d["method"])],
                    curvature=CURVATURE_TO_PB[str(d["curvature"])],
                    iterations=int(d["iterations"]),
                    relative_change=float(d["rel_change"]),
                    norm=float(d["norm"]),
                    effective_damping=float(d["effective_damping"]),
                    converged=bool(d["converged"]),
                    seconds=float(d["seconds"]),
                    cached=bool(d["cached"]),
                ),
            ))
        explanations.append(pb.LabelExplanation(
            label=e.label, label_name=labels[e.label], role=roles[e.role],
            word_saliency=e.word_saliency, salient_words=words,
        ))
    return pb.ExplainResponse(
        model=rt.name,
        prediction=pb.Prediction(
            label=a.predicted, label_name=labels[a.predicted], probabilities=a.probabilities
        ),
        words=[
            pb.Word(index=w.index, text=w.text, char_start=w.char_start, char_end=w.char_end,
                    pieces=w.pieces)
            for w in a.words
        ],
        explanations=explanations,
        diagnostics=pb.Diagnostics(
            influence_computed=a.influence_computed,
            candidate_search=(pb.CANDIDATE_SEARCH_INDEX if a.used_index
                              else pb.CANDIDATE_SEARCH_EXHAUSTIVE)
            if a.influence_computed else pb.CANDIDATE_SEARCH_UNSPECIFIED,
            candidates_scored=a.candidates_scored,
            training_examples=a.training_examples,
            timings=[pb.StageTiming(stage=k, seconds=v) for k, v in a.timings.items()],
            warnings=a.warnings,
            notes=a.notes,
            total_seconds=a.total_seconds,
        ),
    )


def model_proto(rt: ModelRuntime) -> pb.Model:
    m = rt.bundle.manifest
    created = timestamp_pb2.Timestamp()
    try:
        created.FromDatetime(datetime.datetime.fromisoformat(str(m.get("created_at"))))
    except (TypeError, ValueError):
        pass
    dev = (m.get("dev") or {}).get("accuracy") if isinstance(m.get("dev"), dict) else None
    has_lowrank = rt.has_lowrank
    default_solver = pb.SOLVER_LOW_RANK if has_lowrank else pb.SOLVER_LISSA
    return pb.Model(
        name=rt.name,
        labels=rt.bundle.labels,
        base_model=str((m.get("model") or {}).get("source", "")
                       if isinstance(m.get("model"), dict) else m.get("model", "")),
        training_examples=rt.n_train,
        dev_accuracy=float(dev) if isinstance(dev, (int, float)) else math.nan,
        scope=rt.task.scope.describe(),
        scope_parameters=rt.num_params,
        has_index=rt.has_index,
        has_low_rank=has_lowrank,
        default_solver=default_solver,
        create_time=created,
        format_version=int(m.get("format_version", 0)),
        max_length=rt.max_length,
    )
