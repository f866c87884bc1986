"""Typed values read from the service's responses: frozen result dataclasses (each with
``from_proto``; `Explanation` and `ModelInfo` keep the message as ``.raw``). The option enums
and request options are in pairdots.options.

Influence sign convention (proto header, paper Eq. 5): I(z, w) = -∇θw(x)ᵀ H⁻¹ ∇θL(z) is the
derivative of w with respect to upweighting training example z. Positive: z is *supporting*
(training more on z raises w); negative: z is *opposing*. Token-level influence of word t of z
is I(x_t, w) = I(z, w) - I(z̃(t, UNK), w) (paper Eq. 8).

Repeated fields become tuples (the dataclasses are frozen and hashable-ish); enums are
`enum.IntEnum`s with the proto's numbers, so ``Solver.LISSA == pairdots_pb2.SOLVER_LISSA``;
google.protobuf.Duration fields are `datetime.timedelta`s. Field names follow the proto (counts
end in ``_count``); the names these fields had before the v1 renames (``training_examples``,
``candidates_scored``, ``seconds``, ...) remain as read-only properties with the old meaning
and type (float seconds for durations), so existing readers keep working. ``ModelInfo.name``
and ``Explanation.model`` are the bare model id ("minilm-sst2", what every call takes); the
proto carries the resource name "models/minilm-sst2" (``ModelInfo.resource_name``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pairdots.options import (
    CandidateSearch,
    Curvature,
    ExplanationRole,
    Solver,
    TargetFunction,
    TokenInfluenceMethod,
    TokenScoreMethod,
    WordCandidates,
    WordMeasurement,
    datetime_from_proto,
    enum_from_proto,
    model_id,
    timedelta_from_proto,
)
from pairdots.v1 import pairdots_pb2

__all__ = [
    "Diagnostics",
    "ExplainSettings",
    "Explanation",
    "InfluentialExample",
    "LabelExplanation",
    "ModelInfo",
    "Prediction",
    "PredictionInfluence",
    "SalientWord",
    "SolverDiagnostics",
    "StageTiming",
    "Word",
    "WordInfluence",
    "word_separators",
]


# ---------------------------------------------------------------------------------------------
# Models

@dataclass(frozen=True)
class ModelInfo:
    """A served model bundle (pairdots.v1.Model). `name` is the bare id ("minilm-sst2");
    `resource_name` the proto's Model.name ("models/minilm-sst2"). `dev_accuracy` is NaN
    when not measured."""

    name: str
    labels: tuple[str, ...]
    base_model: str
    training_example_count: int
    dev_accuracy: float
    scope: str
    scope_parameter_count: int
    has_index: bool
    has_low_rank: bool
    default_solver: Solver
    create_time: datetime | None
    format_version: int
    max_length: int
    has_ekfac: bool
    has_diagonal: bool
    raw: pairdots_pb2.Model = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.Model) -> ModelInfo:
        return cls(
            name=model_id(msg.name), labels=tuple(msg.labels), base_model=msg.base_model,
            training_example_count=msg.training_example_count, dev_accuracy=msg.dev_accuracy,
            scope=msg.scope, scope_parameter_count=msg.scope_parameter_count,
            has_index=msg.has_index,
            has_low_rank=msg.has_low_rank,
            default_solver=enum_from_proto(Solver, msg.default_solver),
            create_time=datetime_from_proto(msg.create_time) if msg.HasField("create_time") else None,
            format_version=msg.format_version, max_length=msg.max_length,
            has_ekfac=msg.has_ekfac, has_diagonal=msg.has_diagonal, raw=msg,
        )

    @property
    def resource_name(self) -> str:
        """The model's resource name, "models/{model}" (AIP-122)."""
        return f"models/{self.name}"

    @property
    def training_examples(self) -> int:
        """training_example_count (its name before the v1 renames)."""
        return self.training_example_count

    @property
    def scope_parameters(self) -> int:
        """scope_parameter_count (its name before the v1 renames)."""
        return self.scope_parameter_count

    @property
    def dev_accuracy_known(self) -> bool:
        return not math.isnan(self.dev_accuracy)


# ---------------------------------------------------------------------------------------------
# Explain

@dataclass(frozen=True)
class Prediction:
    """The model's prediction: argmax label, its name, p(y|x) for every label and every
    label's name (`label_names`, aligned with `probabilities`; empty from an older server)."""

    label: int
    label_name: str
    probabilities: tuple[float, ...]
    label_names: tuple[str, ...] = ()

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.Prediction) -> Prediction:
        return cls(msg.label, msg.label_name, tuple(msg.probabilities), tuple(msg.label_names))


@dataclass(frozen=True)
class Word:
    """A word of the input; [char_start, char_end) are code-point offsets into the text."""

    index: int
    text: str
    char_start: int
    char_end: int
    piece_count: int

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.Word) -> Word:
        return cls(msg.index, msg.text, msg.char_start, msg.char_end, msg.piece_count)

    @property
    def pieces(self) -> int:
        """piece_count (its name before the v1 renames)."""
        return self.piece_count


@dataclass(frozen=True)
class WordInfluence:
    """I(x_t, w) of one word of a training example (paper Eq. 8)."""

    text: str
    influence: float

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.WordInfluence) -> WordInfluence:
        return cls(msg.text, msg.influence)


@dataclass(frozen=True)
class InfluentialExample:
    """A training example z with I(z, w) (paper Eq. 5) and its per-word influence (Eq. 8).

    `responsible_word` indexes `words`; None when token influence was not requested (the
    proto's -1).
    """

    train_index: int
    text: str
    label: int
    label_name: str
    influence: float
    words: tuple[WordInfluence, ...]
    responsible_word: int | None

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.InfluentialExample) -> InfluentialExample:
        words = tuple(WordInfluence.from_proto(w) for w in msg.words)
        responsible = msg.responsible_word if 0 <= msg.responsible_word < len(words) else None
        return cls(msg.train_index, msg.text, msg.label, msg.label_name, msg.influence, words,
                   responsible)

    @property
    def responsible(self) -> WordInfluence | None:
        """The responsible word, or None."""
        return None if self.responsible_word is None else self.words[self.responsible_word]

    @property
    def supporting(self) -> bool:
        """I(z, w) > 0: training more on z raises the word's saliency."""
        return self.influence > 0


@dataclass(frozen=True)
class SolverDiagnostics:
    """Convergence of one inverse-HVP solve s_test = (H + λI)⁻¹∇θw."""

    solver: Solver
    curvature: Curvature
    iteration_count: int
    relative_change: float
    norm: float
    effective_damping: float
    converged: bool
    duration: timedelta
    cached: bool
    damping_rule: str = ""

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.SolverDiagnostics) -> SolverDiagnostics:
        return cls(
            solver=enum_from_proto(Solver, msg.solver),
            curvature=enum_from_proto(Curvature, msg.curvature),
            iteration_count=msg.iteration_count, relative_change=msg.relative_change,
            norm=msg.norm, effective_damping=msg.effective_damping, converged=msg.converged,
            duration=timedelta_from_proto(msg.duration), cached=msg.cached,
            damping_rule=msg.damping_rule,
        )

    @property
    def iterations(self) -> int:
        """iteration_count (its name before the v1 renames)."""
        return self.iteration_count

    @property
    def seconds(self) -> float:
        """The solve's wall time in seconds (the field before the v1 renames)."""
        return self.duration.total_seconds()


@dataclass(frozen=True)
class PredictionInfluence:
    """Prediction-level influence: the training examples that support (I(z, m_y) > 0, largest
    first) and oppose (most negative first) the prediction itself, measured on the logit
    margin m_y = z_y − max_{c≠y} z_c of the explained label. `solver` is None when the server
    sent no diagnostics."""

    margin: float
    supporting: tuple[InfluentialExample, ...]
    opposing: tuple[InfluentialExample, ...]
    solver: SolverDiagnostics | None
    scored_candidate_count: int

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.PredictionInfluence) -> PredictionInfluence:
        return cls(
            margin=msg.margin,
            supporting=tuple(InfluentialExample.from_proto(e) for e in msg.supporting),
            opposing=tuple(InfluentialExample.from_proto(e) for e in msg.opposing),
            solver=SolverDiagnostics.from_proto(msg.solver) if msg.HasField("solver") else None,
            scored_candidate_count=msg.scored_candidate_count,
        )

    @property
    def candidates_scored(self) -> int:
        """scored_candidate_count (its name before the v1 renames)."""
        return self.scored_candidate_count


@dataclass(frozen=True)
class SalientWord:
    """A salient input word with the training examples that raise (`supporting`, largest
    first) and lower (`opposing`, most negative first) its measurement (c_w under
    WordMeasurement.OCCLUSION, else its saliency). `contribution` is c_w, the word's
    contribution to the logit margin; `containing_example_count` the number of training
    examples containing the word (same stem). `solver` is None when the server sent no diagnostics."""

    word_index: int
    text: str
    saliency: float
    supporting: tuple[InfluentialExample, ...]
    opposing: tuple[InfluentialExample, ...]
    solver: SolverDiagnostics | None
    contribution: float = 0.0
    containing_example_count: int = 0

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.SalientWord) -> SalientWord:
        return cls(
            word_index=msg.word_index, text=msg.text, saliency=msg.saliency,
            supporting=tuple(InfluentialExample.from_proto(e) for e in msg.supporting),
            opposing=tuple(InfluentialExample.from_proto(e) for e in msg.opposing),
            solver=SolverDiagnostics.from_proto(msg.solver) if msg.HasField("solver") else None,
            contribution=msg.contribution,
            containing_example_count=msg.containing_example_count,
        )

    @property
    def containing_examples(self) -> int:
        """containing_example_count (its name before the v1 renames)."""
        return self.containing_example_count


@dataclass(frozen=True)
class LabelExplanation:
    """The explanation of one label: saliency s(x_t) of every word (aligned with
    Explanation.words), the explained salient words (most salient first), c_w of every word
    (`word_contribution`, aligned with the words; empty unless the word measurement is
    OCCLUSION) and the prediction-level influence (`prediction`; None when not requested)."""

    label: int
    label_name: str
    role: ExplanationRole
    word_saliency: tuple[float, ...]
    salient_words: tuple[SalientWord, ...]
    word_contribution: tuple[float, ...] = ()
    prediction: PredictionInfluence | None = None

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.LabelExplanation) -> LabelExplanation:
        return cls(
            label=msg.label, label_name=msg.label_name,
            role=enum_from_proto(ExplanationRole, msg.role),
            word_saliency=tuple(msg.word_saliency),
            salient_words=tuple(SalientWord.from_proto(s) for s in msg.salient_words),
            word_contribution=tuple(msg.word_contribution),
            prediction=(PredictionInfluence.from_proto(msg.prediction)
                        if msg.HasField("prediction") else None),
        )


@dataclass(frozen=True)
class StageTiming:
    """Wall time of one pipeline stage."""

    stage: str
    duration: timedelta

    @property
    def seconds(self) -> float:
        """The wall time in seconds (the field before the v1 renames)."""
        return self.duration.total_seconds()


@dataclass(frozen=True)
class Diagnostics:
    """How an Explain answer was computed."""

    influence_computed: bool
    candidate_search: CandidateSearch
    scored_candidate_count: int
    training_example_count: int
    timings: tuple[StageTiming, ...]
    warnings: tuple[str, ...]
    notes: tuple[str, ...]
    total_duration: timedelta

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.Diagnostics) -> Diagnostics:
        return cls(
            influence_computed=msg.influence_computed,
            candidate_search=enum_from_proto(CandidateSearch, msg.candidate_search),
            scored_candidate_count=msg.scored_candidate_count,
            training_example_count=msg.training_example_count,
            timings=tuple(StageTiming(t.stage, timedelta_from_proto(t.duration))
                          for t in msg.timings),
            warnings=tuple(msg.warnings), notes=tuple(msg.notes),
            total_duration=timedelta_from_proto(msg.total_duration),
        )

    @property
    def candidates_scored(self) -> int:
        """scored_candidate_count (its name before the v1 renames)."""
        return self.scored_candidate_count

    @property
    def training_examples(self) -> int:
        """training_example_count (its name before the v1 renames)."""
        return self.training_example_count

    @property
    def total_seconds(self) -> float:
        """The total server-side wall time in seconds (the field before the v1 renames)."""
        return self.total_duration.total_seconds()


#: Token scores that are signed (the word raises or lowers S_y); L2_NORM is unsigned (≥ 0).
SIGNED_TOKEN_SCORES = frozenset({TokenScoreMethod.GRADIENT_TIMES_INPUT, TokenScoreMethod.SUM,
                                 TokenScoreMethod.GRADIENT_TIMES_DELTA_UNK})


@dataclass(frozen=True)
class ExplainSettings:
    """The settings an Explain answer was computed with, every default resolved by the server
    (ExplainResponse.settings): saliency target S_y and token score, what a salient word's
    influence is measured on and which training examples it is paired with, the solver and
    curvature of s_test, the candidate search and its K, the Eq. 8 method and whether
    prediction-level influence was computed."""

    target_function: TargetFunction
    token_score: TokenScoreMethod
    word_measurement: WordMeasurement
    word_candidates: WordCandidates
    solver: Solver
    curvature: Curvature
    candidate_search: CandidateSearch
    candidate_count: int
    token_influence: TokenInfluenceMethod
    prediction_influence: bool

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.ExplainSettings) -> ExplainSettings:
        return cls(
            target_function=enum_from_proto(TargetFunction, msg.target_function),
            token_score=enum_from_proto(TokenScoreMethod, msg.token_score),
            word_measurement=enum_from_proto(WordMeasurement, msg.word_measurement),
            word_candidates=enum_from_proto(WordCandidates, msg.word_candidates),
            solver=enum_from_proto(Solver, msg.solver),
            curvature=enum_from_proto(Curvature, msg.curvature),
            candidate_search=enum_from_proto(CandidateSearch, msg.candidate_search),
            candidate_count=msg.candidate_count,
            token_influence=enum_from_proto(TokenInfluenceMethod, msg.token_influence),
            prediction_influence=msg.prediction_influence,
        )

    @property
    def candidates(self) -> int:
        """candidate_count (its name before the v1 renames)."""
        return self.candidate_count

    @property
    def signed_saliency(self) -> bool:
        """Whether the word saliency is signed (every token score but L2_NORM)."""
        return self.token_score in SIGNED_TOKEN_SCORES


@dataclass(frozen=True)
class Explanation:
    """An Explain answer: the prediction, the input's words, one LabelExplanation per
    explained label (target first, then gold for error analysis), diagnostics and the settings
    used (`settings`; None from a server that does not report them). `model` is the bare id
    of the resource name ExplainResponse.model."""

    model: str
    prediction: Prediction
    words: tuple[Word, ...]
    explanations: tuple[LabelExplanation, ...]
    diagnostics: Diagnostics
    raw: pairdots_pb2.ExplainResponse = field(repr=False, compare=False)
    settings: ExplainSettings | None = None

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.ExplainResponse) -> Explanation:
        return cls(
            model=model_id(msg.model),
            prediction=Prediction.from_proto(msg.prediction),
            words=tuple(Word.from_proto(w) for w in msg.words),
            explanations=tuple(LabelExplanation.from_proto(e) for e in msg.explanations),
            diagnostics=Diagnostics.from_proto(msg.diagnostics),
            raw=msg,
            settings=(ExplainSettings.from_proto(msg.settings)
                      if msg.HasField("settings") else None),
        )

    def label_name(self, label: int) -> str:
        """The class name of `label`: from the prediction's label names, else from the
        explanations and their training examples, else "label N"."""
        names = self.prediction.label_names
        if 0 <= label < len(names):
            return names[label]
        if label == self.prediction.label:
            return self.prediction.label_name
        for lab in self.explanations:
            if lab.label == label:
                return lab.label_name
        return f"label {label}"

    def _role(self, role: ExplanationRole) -> LabelExplanation | None:
        return next((e for e in self.explanations if e.role == role), None)

    @property
    def target(self) -> LabelExplanation | None:
        """The explanation of the target label (the prediction unless one was asked for)."""
        return self._role(ExplanationRole.TARGET) or (
            self.explanations[0] if self.explanations else None)

    @property
    def gold(self) -> LabelExplanation | None:
        """The gold-label explanation of an error-analysis request, else None."""
        return self._role(ExplanationRole.GOLD)

    @property
    def text(self) -> str:
        """The input rebuilt from the words (the server does not echo the text back): one
        space wherever the character offsets leave a gap, none where words touch ("film.")."""
        return "".join(sep + w.text for sep, w in zip(word_separators(self.words), self.words))


def word_separators(words: Sequence[Word]) -> list[str]:
    """For each word the separator to put before it: "" for the first word and for words that
    touch the previous one (char_start == previous char_end), else one space."""
    out: list[str] = []
    prev_end: int | None = None
    for w in words:
        touches = prev_end is not None and w.char_start == prev_end and w.char_end > w.char_start
        out.append("" if prev_end is None or touches else " ")
        prev_end = w.char_end
    return out
