"""Typed values sent to the service: the option enums (numbers equal to the proto's, so
``Solver.LISSA == pairdots_pb2.SOLVER_LISSA``; UNSPECIFIED = the server default) and the
request option dataclasses (each with ``to_proto``)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TypeVar

from google.protobuf import duration_pb2, timestamp_pb2

from pairdots.v1 import pairdots_pb2

__all__ = [
    "AttackMode",
    "CandidateSearch",
    "Curvature",
    "ExplanationRole",
    "InfluenceOptions",
    "LabeledText",
    "RepairMode",
    "RetrainMode",
    "RetrainOptions",
    "SaliencyOptions",
    "Solver",
    "SolverOptions",
    "TargetFunction",
    "TokenInfluenceMethod",
    "TokenScoreMethod",
    "WordCandidates",
    "WordMeasurement",
    "datetime_from_proto",
    "enum_from_proto",
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
    #: EK-FAC factors stored in the bundle (ModelInfo.has_ekfac).
    EKFAC = 5
    #: Diagonal empirical Fisher stored in the bundle (ModelInfo.has_diagonal).
    DIAGONAL = 6
    #: H = I: the plain gradient dot product (TracIn at one checkpoint).
    IDENTITY = 7


class WordMeasurement(enum.IntEnum):
    """What a salient word's influence is measured on. MARGIN (server default): the
    prediction's margin m_y = z_y − max_{c≠y} z_c, among the training examples that contain the
    word. OCCLUSION: c_w = m_y(x) − m_y(x with the word → [UNK]), the word's contribution to
    the margin. Both rank words by c_w (signed). SALIENCY: the word's saliency score (paper
    Eq. 5), words ranked by |saliency|."""

    UNSPECIFIED = 0
    OCCLUSION = 1
    SALIENCY = 2
    MARGIN = 3


class WordCandidates(enum.IntEnum):
    """Which training examples a salient word is paired with. CONTAINING (server default):
    those containing the word (same Porter stem; all when none does). ALL: every example."""

    UNSPECIFIED = 0
    CONTAINING = 1
    ALL = 2


class SubstitutionRelation(enum.IntEnum):
    """How a substitute relates to the word it replaces (the proto's TrainingEdit.relation;
    TrainingEdit.relation / Substitution.relation here are its lower-case names)."""

    UNSPECIFIED = 0
    SYNONYM = 1
    ANTONYM = 2


class EffectMeasurement(enum.IntEnum):
    """The quantity f an attack/repair objective moves (the proto's TargetEffect.measurement;
    TargetEffect.measurement here is its lower-case name, e.g. "prediction_margin")."""

    UNSPECIFIED = 0
    PREDICTION_MARGIN = 1
    WORD_OCCLUSION = 2
    WORD_SALIENCY = 3


class JobKind(enum.IntEnum):
    """The kind of a long-running operation (the proto's JobMetadata.kind; JobProgress.kind
    here is its lower-case name, e.g. "attack", as in the filter "kind=attack")."""

    UNSPECIFIED = 0
    ATTACK = 1
    REPAIR = 2
    EXPLAIN_BATCH = 3


def enum_name(cls: type[enum.IntEnum], value: int) -> str:
    """The lower-case member name of `value` in `cls` ("" for UNSPECIFIED or an unknown
    value), e.g. enum_name(JobKind, 1) == "attack"."""
    try:
        member = cls(value)
    except ValueError:
        return ""
    return "" if member.name == "UNSPECIFIED" else member.name.lower()


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
    EXACT_BF16 = 4


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
    PREDICTION_MARGIN = 5  # the test prediction's margin itself (Koh & Liang)


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
    SCOPE_PROXIMAL = 3


_E = TypeVar("_E", bound=enum.IntEnum)


def enum_from_proto(cls: type[_E], value: int) -> _E:
    """`cls(value)`, or `cls(0)` (UNSPECIFIED) for a number this client does not know yet."""
    try:
        return cls(value)
    except ValueError:
        return cls(0)


def datetime_from_proto(ts: timestamp_pb2.Timestamp) -> datetime | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=timezone.utc)


def timedelta_from_proto(d: duration_pb2.Duration) -> timedelta:
    """A google.protobuf.Duration as a datetime.timedelta (microsecond resolution)."""
    return timedelta(seconds=d.seconds, microseconds=d.nanos / 1e3)


#: The resource-name prefix of a model (AIP-122): the server returns "models/{model}".
MODEL_PREFIX = "models/"


def model_id(name: str) -> str:
    """The bare model id of a resource name: "models/minilm-sst2" → "minilm-sst2" (a bare id
    is returned unchanged). The dataclasses keep the bare id (ModelInfo.name,
    Explanation.model, JobProgress.model), which every call accepts."""
    return name.removeprefix(MODEL_PREFIX)


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
    """Influence settings. `candidates` 0 = server default; UNSPECIFIED enums = server
    default (WordMeasurement.MARGIN, WordCandidates.CONTAINING); `prediction_influence`
    None = not sent (the server's default, true: LabelExplanation.prediction is filled)."""

    solver: SolverOptions = field(default_factory=SolverOptions)
    candidate_search: CandidateSearch = CandidateSearch.UNSPECIFIED
    candidates: int = 0
    token_influence: TokenInfluenceMethod = TokenInfluenceMethod.UNSPECIFIED
    word_measurement: WordMeasurement = WordMeasurement.UNSPECIFIED
    word_candidates: WordCandidates = WordCandidates.UNSPECIFIED
    prediction_influence: bool | None = None

    def to_proto(self) -> pairdots_pb2.InfluenceOptions:
        return pairdots_pb2.InfluenceOptions(
            solver=self.solver.to_proto(),
            candidate_search=pairdots_pb2.CandidateSearch.ValueType(int(self.candidate_search)),
            candidate_count=self.candidates,
            token_influence=pairdots_pb2.TokenInfluenceMethod.ValueType(int(self.token_influence)),
            word_measurement=pairdots_pb2.WordMeasurement.ValueType(int(self.word_measurement)),
            word_candidates=pairdots_pb2.WordCandidates.ValueType(int(self.word_candidates)),
            prediction_influence=self.prediction_influence,
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
