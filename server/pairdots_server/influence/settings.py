"""The one settings object of the influence pipeline: saliency + solver + candidates + batching.

A request (Explain, Attack, Repair) carries an `InfluenceSettings` whose unset fields (None / 0)
mean "the default". `InfluenceSettings.resolve` fills every one of them once, against the
served model (bundle manifest "defaults", whether it has an index / low-rank factors) and the
server's limits, and the pipeline steps take the resolved `PipelineSettings` whole:

  field               unset means                                   where the default lives
  target, token_score LOG_PROB, L2_NORM                             here (the dataclass)
  solver              the bundle's default method and its options   solver_policy.resolve_solver
  use_index           the bundle's index when it has one            resolve() below
  word_measurement    MARGIN (m_y among examples with the word)     here (the dataclass)
  word_candidates     CONTAINING (examples with the word's stem)    here (the dataclass)
  prediction_influence True                                         here (the dataclass)
  candidates          clamp(2 % · N, 50, 2000) per direction        config.ExplainLimits
  scoring_batch_size  the server's batch for exact scoring          config.ExplainLimits
  eq8_top_words       the bundle's defaults.eq8_top_words, else 0   resolve() below
                      (0: every word of a returned example gets exact Eq. 8; k > 0: only
                      the k words the first-order estimate ranks highest and the explained
                      word's matches, pipeline.word_attributions)
  eq8_batch_tokens    by the model's device (core/scoring.BATCH_TOKENS) resolve() below
                      (padded tokens per batch of Eq. 8's [UNK] copies)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pairdots_server.core.saliency import Target, TokenScore
from pairdots_server.core.scoring import batch_tokens_for
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.solver_policy import SolverSettings, resolve_solver


class WordMeasurement(enum.Enum):
    """What a salient word's influence is measured on (core/measure.py, core/saliency.py)."""

    MARGIN = "margin"  # f = m_y among the examples containing w; words ranked by c_w
    OCCLUSION = "occlusion"  # f = c_w = m_y(x) − m_y(x with w → [UNK]); words ranked by c_w
    SALIENCY = "saliency"  # f = the word's saliency score (paper Eq. 5); ranked by |s|


class WordCandidates(enum.Enum):
    """Which training examples a salient word is paired with."""

    CONTAINING = "containing"  # examples that contain the word (same Porter stem)
    ALL = "all"  # every example (through the index prefilter when it is used)


@dataclass(frozen=True)
class InfluenceSettings:
    """How the salient word, s_test and the candidate training examples are obtained, as a
    request states it (None / 0 = default; see the module docstring)."""

    target: Target = Target.LOG_PROB
    token_score: TokenScore = TokenScore.L2_NORM
    solver: SolverSettings = field(default_factory=SolverSettings)
    use_index: bool | None = None  # None: the bundle's index when it has one
    candidates: int = 0  # 0: the server default
    scoring_batch_size: int | None = None  # None: the server default
    word_measurement: WordMeasurement = WordMeasurement.MARGIN
    word_candidates: WordCandidates = WordCandidates.CONTAINING
    prediction_influence: bool = True
    eq8_top_words: int | None = None  # None: the bundle default (0 = every word exact)

    def __post_init__(self) -> None:
        if self.candidates < 0:
            raise ValueError(f"candidates must be >= 0, got {self.candidates}")
        if self.eq8_top_words is not None and self.eq8_top_words < 0:
            raise ValueError(f"eq8_top_words must be >= 0, got {self.eq8_top_words}")

    def resolve(
        self, rt: ModelRuntime, *, default_candidates: int, scoring_batch_size: int = 32
    ) -> PipelineSettings:
        """Every default filled in, for model `rt`; `default_candidates` and
        `scoring_batch_size` are the server's (config.ExplainLimits)."""
        return PipelineSettings(
            target=self.target,
            token_score=self.token_score,
            solver=resolve_solver(rt, self.solver),
            use_index=rt.has_index if self.use_index is None else self.use_index,
            candidates=self.candidates or default_candidates,
            scoring_batch_size=self.scoring_batch_size or scoring_batch_size,
            word_measurement=self.word_measurement,
            word_candidates=self.word_candidates,
            prediction_influence=self.prediction_influence,
            eq8_top_words=(
                self.eq8_top_words
                if self.eq8_top_words is not None
                else int(rt.defaults.get("eq8_top_words", 0) or 0)
            ),
            eq8_batch_tokens=batch_tokens_for(rt.task.device),
        )


@dataclass(frozen=True)
class PipelineSettings:
    """InfluenceSettings with every default resolved for one model (what the steps take)."""

    target: Target
    token_score: TokenScore
    solver: SolverSettings
    use_index: bool
    candidates: int  # K per direction when the index prefilters
    scoring_batch_size: int
    word_measurement: WordMeasurement = WordMeasurement.MARGIN
    word_candidates: WordCandidates = WordCandidates.CONTAINING
    prediction_influence: bool = True
    eq8_top_words: int = 0  # 0: exact Eq. 8 for every word; k: the top k + the explained word
    eq8_batch_tokens: int = 1024  # padded tokens per batch of [UNK] copies (core/scoring)
