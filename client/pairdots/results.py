"""Typed values exchanged with the service: option enums and dataclasses sent in requests, and
frozen result dataclasses read from responses (each with ``from_proto``; `Explanation` and
`ModelInfo` keep the message as ``.raw``).

Influence sign convention (proto header, paper Eq. 5): I(z, w) = -∇θw(x)ᵀ H⁻¹ ∇θL(z) is the
derivative of w with respect to upweighting training example z. Positive: z is *supporting*
(training more on z raises w); negative: z is *opposing*. Token-level influence of word t of z
is I(x_t, w) = I(z, w) - I(z̃(t, UNK), w) (paper Eq. 8).

Repeated fields become tuples (the dataclasses are frozen and hashable-ish); enums are
`enum.IntEnum`s with the proto's numbers, so ``Solver.LISSA == pairdots_pb2.SOLVER_LISSA``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TypeVar

from google.protobuf import timestamp_pb2

from pairdots.v1 import pairdots_pb2

__all__ = [
    "AttackMode", "CandidateSearch", "Curvature", "Diagnostics", "Explanation",
    "ExplanationRole", "InfluenceOptions", "InfluentialExample", "LabelExplanation",
    "LabeledText", "ModelInfo", "Prediction", "RepairMode", "RetrainMode", "RetrainOptions",
    "SaliencyOptions", "SalientWord", "Solver", "SolverDiagnostics", "SolverOptions",
    "StageTiming", "TargetFunction", "TokenInfluenceMethod", "TokenScoreMethod", "Word",
    "WordInfluence", "word_separators",
]


# ---------------------------------------------------------------------------------------------
# Enums (numbers equal to the proto's; UNSPECIFIED = server default)

class TargetFunction(enum.IntEnum):
    """The scalar S_y whose gradient defines saliency (paper Eq. 1)."""

    UNSPECIFIED = 0
    LOG_PROBABILITY = 1
    PROBABILITY = 2
    LOGIT = 3


class TokenScoreMethod(enum.IntEnum):
    """How a token score s(x_t) is formed from w_y(e_t) = ∇_{e_t} S_y (paper §3.1)."""

    UNSPECIFIED = 0
    GRADIENT_TIMES_INPUT = 1
    L2_NORM = 2
    SUM = 3
    GRADIENT_TIMES_DELTA_UNK = 4


class Curvature(enum.IntEnum):
    """The curvature H of H⁻¹v (GAUSS_NEWTON is PSD; HESSIAN as in the paper)."""

    UNSPECIFIED = 0
    GAUSS_NEWTON = 1
    HESSIAN = 2


class Solver(enum.IntEnum):
    """The inverse-HVP solver for s_test = H⁻¹∇θw (paper App. B for LiSSA)."""

    UNSPECIFIED = 0
    LISSA = 1
    CONJUGATE_GRADIENT = 2
    LOW_RANK = 3
    EXACT = 4


class CandidateSearch(enum.IntEnum):
    """How training examples to score exactly are chosen."""

    UNSPECIFIED = 0
    INDEX = 1
    EXHAUSTIVE = 2


class TokenInfluenceMethod(enum.IntEnum):
    """How the responsible word of a training example is found (paper Eq. 8)."""

    UNSPECIFIED = 0
    EXACT = 1
    FIRST_ORDER = 2
    NONE = 3


class ExplanationRole(enum.IntEnum):
    """Why a LabelExplanation is there: the explained label, or the gold label."""

    UNSPECIFIED = 0
    TARGET = 1
    GOLD = 2


class AttackMode(enum.IntEnum):
    """What an attack optimises (paper §4.2, Eq. 9-10)."""

    UNSPECIFIED = 0
    DEMOTE_SALIENT = 1
    PROMOTE_WRONG = 2
    COMBINED = 3
    RANDOM = 4


class RepairMode(enum.IntEnum):
    """How repair examples are made (paper §4.3)."""

    UNSPECIFIED = 0
    INFLUENCE = 1
    RANDOM = 2


class RetrainMode(enum.IntEnum):
    """How retraining runs."""

    UNSPECIFIED = 0
    FULL = 1
    SCOPE_ONLY = 2


_E = TypeVar("_E", bound=enum.IntEnum)


def enum_from_proto(cls: type[_E], value: int) -> _E:
    """`cls(value)`, or `cls(0)` (UNSPECIFIED) for a number this client does not know yet."""
    try:
        return cls(value)
    except ValueError:
        return cls(0)


def _timestamp(ts: timestamp_pb2.Timestamp) -> datetime | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=timezone.utc)


# ---------------------------------------------------------------------------------------------
# Request options

@dataclass(frozen=True)
class SaliencyOptions:
    """Saliency settings; UNSPECIFIED fields take the server defaults
    (log p(y|x), L2 norm of the embedding gradient)."""

    target_function: TargetFunction = TargetFunction.UNSPECIFIED
    token_score: TokenScoreMethod = TokenScoreMethod.UNSPECIFIED

    def to_proto(self) -> pairdots_pb2.SaliencyOptions:
        return pairdots_pb2.SaliencyOptions(
            target_function=pairdots_pb2.TargetFunction.ValueType(int(self.target_function)),
            token_score=pairdots_pb2.TokenScoreMethod.ValueType(int(self.token_score)),
        )


@dataclass(frozen=True)
class SolverOptions:
    """Inverse-HVP settings: solves (H + λI)x = v. None = the bundle's default (reported back
    in SolverDiagnostics). The server validates ranges and answers INVALID_ARGUMENT."""

    solver: Solver = Solver.UNSPECIFIED
    curvature: Curvature = Curvature.UNSPECIFIED
    damping: float | None = None
    scale: float | None = None
    max_iterations: int | None = None
    repeats: int | None = None
    batch_size: int | None = None
    tolerance: float | None = None
    seed: int | None = None

    def to_proto(self) -> pairdots_pb2.SolverOptions:
        return pairdots_pb2.SolverOptions(
            solver=pairdots_pb2.Solver.ValueType(int(self.solver)),
            curvature=pairdots_pb2.Curvature.ValueType(int(self.curvature)),
            damping=self.damping, scale=self.scale, max_iterations=self.max_iterations,
            repeats=self.repeats, batch_size=self.batch_size, tolerance=self.tolerance,
            seed=self.seed,
        )


@dataclass(frozen=True)
class InfluenceOptions:
    """Influence settings. `candidates` 0 = server default."""

    solver: SolverOptions = field(default_factory=SolverOptions)
    candidate_search: CandidateSearch = CandidateSearch.UNSPECIFIED
    candidates: int = 0
    token_influence: TokenInfluenceMethod = TokenInfluenceMethod.UNSPECIFIED

    def to_proto(self) -> pairdots_pb2.InfluenceOptions:
        return pairdots_pb2.InfluenceOptions(
            solver=self.solver.to_proto(),
            candidate_search=pairdots_pb2.CandidateSearch.ValueType(int(self.candidate_search)),
            candidates=self.candidates,
            token_influence=pairdots_pb2.TokenInfluenceMethod.ValueType(int(self.token_influence)),
        )


@dataclass(frozen=True)
class LabeledText:
    """A text with its gold label (an index into ModelInfo.labels)."""

    text: str
    label: int

    def to_proto(self) -> pairdots_pb2.LabeledText:
        return pairdots_pb2.LabeledText(text=self.text, label=self.label)

    @classmethod
    def coerce(cls, value: LabeledText | tuple[str, int]) -> LabeledText:
        """Accept ``LabeledText`` or a ``(text, label)`` pair."""
        if isinstance(value, LabeledText):
            return value
        text, label = value
        return cls(text, int(label))


@dataclass(frozen=True)
class RetrainOptions:
    """Retrain on the edited training set and evaluate. `epochs` None = the bundle's recipe
    (otherwise 1..10); empty `eval_examples` = the request's examples; `save_as` "" = do not
    save."""

    enabled: bool = True
    mode: RetrainMode = RetrainMode.UNSPECIFIED
    epochs: int | None = None
    eval_examples: Sequence[LabeledText | tuple[str, int]] = ()
    save_as: str = ""

    def to_proto(self) -> pairdots_pb2.RetrainOptions:
        return pairdots_pb2.RetrainOptions(
            enabled=self.enabled,
            mode=pairdots_pb2.RetrainMode.ValueType(int(self.mode)),
            epochs=self.epochs,  # None leaves it unset
            eval_examples=[LabeledText.coerce(e).to_proto() for e in self.eval_examples],
            save_as=self.save_as,
        )


# ---------------------------------------------------------------------------------------------
# Models

@dataclass(frozen=True)
class ModelInfo:
    """A served model bundle (pairdots.v1.Model). `dev_accuracy` is NaN when not measured."""

    name: str
    labels: tuple[str, ...]
    base_model: str
    training_examples: int
    dev_accuracy: float
    scope: str
    scope_parameters: int
    has_index: bool
    has_low_rank: bool
    default_solver: Solver
    create_time: datetime | None
    format_version: int
    max_length: int
    raw: pairdots_pb2.Model = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.Model) -> ModelInfo:
        return cls(
            name=msg.name, labels=tuple(msg.labels), base_model=msg.base_model,
            training_examples=msg.training_examples, dev_accuracy=msg.dev_accuracy,
            scope=msg.scope, scope_parameters=msg.scope_parameters, has_index=msg.has_index,
            has_low_rank=msg.has_low_rank,
            default_solver=enum_from_proto(Solver, msg.default_solver),
            create_time=_timestamp(msg.create_time) if msg.HasField("create_time") else None,
            format_version=msg.format_version, max_length=msg.max_length, raw=msg,
        )

    @property
    def dev_accuracy_known(self) -> bool:
        return not math.isnan(self.dev_accuracy)


# ---------------------------------------------------------------------------------------------
# Explain

@dataclass(frozen=True)
class Prediction:
    """The model's prediction: argmax label, its name, p(y|x) for every label."""

    label: int
    label_name: str
    probabilities: tuple[float, ...]

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.Prediction) -> Prediction:
        return cls(msg.label, msg.label_name, tuple(msg.probabilities))


@dataclass(frozen=True)
class Word:
    """A word of the input; [char_start, char_end) are code-point offsets into the text."""

    index: int
    text: str
    char_start: int
    char_end: int
    pieces: int

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.Word) -> Word:
        return cls(msg.index, msg.text, msg.char_start, msg.char_end, msg.pieces)


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
    iterations: int
    relative_change: float
    norm: float
    effective_damping: float
    converged: bool
    seconds: float
    cached: bool

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.SolverDiagnostics) -> SolverDiagnostics:
        return cls(
            solver=enum_from_proto(Solver, msg.solver),
            curvature=enum_from_proto(Curvature, msg.curvature),
            iterations=msg.iterations, relative_change=msg.relative_change, norm=msg.norm,
            effective_damping=msg.effective_damping, converged=msg.converged,
            seconds=msg.seconds, cached=msg.cached,
        )


@dataclass(frozen=True)
class SalientWord:
    """A salient input word with the training examples that raise (`supporting`, largest
    first) and lower (`opposing`, most negative first) its saliency. `solver` is None when
    the server sent no diagnostics for it."""

    word_index: int
    text: str
    saliency: float
    supporting: tuple[InfluentialExample, ...]
    opposing: tuple[InfluentialExample, ...]
    solver: SolverDiagnostics | None

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.SalientWord) -> SalientWord:
        return cls(
            word_index=msg.word_index, text=msg.text, saliency=msg.saliency,
            supporting=tuple(InfluentialExample.from_proto(e) for e in msg.supporting),
            opposing=tuple(InfluentialExample.from_proto(e) for e in msg.opposing),
            solver=SolverDiagnostics.from_proto(msg.solver) if msg.HasField("solver") else None,
        )


@dataclass(frozen=True)
class LabelExplanation:
    """The explanation of one label: saliency s(x_t) of every word (aligned with
    Explanation.words) and the explained salient words, most salient first."""

    label: int
    label_name: str
    role: ExplanationRole
    word_saliency: tuple[float, ...]
    salient_words: tuple[SalientWord, ...]

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.LabelExplanation) -> LabelExplanation:
        return cls(
            label=msg.label, label_name=msg.label_name,
            role=enum_from_proto(ExplanationRole, msg.role),
            word_saliency=tuple(msg.word_saliency),
            salient_words=tuple(SalientWord.from_proto(s) for s in msg.salient_words),
        )


@dataclass(frozen=True)
class StageTiming:
    """Wall time of one pipeline stage, seconds."""

    stage: str
    seconds: float


@dataclass(frozen=True)
class Diagnostics:
    """How an Explain answer was computed."""

    influence_computed: bool
    candidate_search: CandidateSearch
    candidates_scored: int
    training_examples: int
    timings: tuple[StageTiming, ...]
    warnings: tuple[str, ...]
    notes: tuple[str, ...]
    total_seconds: float

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.Diagnostics) -> Diagnostics:
        return cls(
            influence_computed=msg.influence_computed,
            candidate_search=enum_from_proto(CandidateSearch, msg.candidate_search),
            candidates_scored=msg.candidates_scored, training_examples=msg.training_examples,
            timings=tuple(StageTiming(t.stage, t.seconds) for t in msg.timings),
            warnings=tuple(msg.warnings), notes=tuple(msg.notes),
            total_seconds=msg.total_seconds,
        )


@dataclass(frozen=True)
class Explanation:
    """An Explain answer: the prediction, the input's words, one LabelExplanation per
    explained label (target first, then gold for error analysis) and diagnostics."""

    model: str
    prediction: Prediction
    words: tuple[Word, ...]
    explanations: tuple[LabelExplanation, ...]
    diagnostics: Diagnostics
    raw: pairdots_pb2.ExplainResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.ExplainResponse) -> Explanation:
        return cls(
            model=msg.model,
            prediction=Prediction.from_proto(msg.prediction),
            words=tuple(Word.from_proto(w) for w in msg.words),
            explanations=tuple(LabelExplanation.from_proto(e) for e in msg.explanations),
            diagnostics=Diagnostics.from_proto(msg.diagnostics),
            raw=msg,
        )

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
