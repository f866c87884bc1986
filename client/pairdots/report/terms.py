"""What the numbers of an Explain answer measure, named from the settings the server reports
(ExplainResponse.settings), for the HTML report and the CLI's text rendering alike.

  word measurement f   MARGIN: m_y = z_y − max_{c≠y} z_c among the examples with the word
                       OCCLUSION: c_w = m_y(x) − m_y(x with the word → [UNK])
                       SALIENCY: s_w, the word's saliency score (paper Eq. 5)
  saliency s(x_t)      the token score of ∇_{e_t} S_y (paper Eq. 1–2), S_y the target function
  influence            I(z, f) = −∇θfᵀ H⁻¹ ∇θL(z) (Eq. 5); I(x_t, f) per word of z (Eq. 8)

An answer from a server that reports no settings is named generically (f, s) and says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pairdots.options import (
    TargetFunction,
    TokenScoreMethod,
    WordCandidates,
    WordMeasurement,
)
from pairdots.results import ExplainSettings

__all__ = ["MARGIN", "Terms"]

#: The prediction-level measurement: the logit margin of the explained label.
MARGIN = "m_y"

_SYMBOL = {
    WordMeasurement.MARGIN: MARGIN,
    WordMeasurement.OCCLUSION: "c_w",
    WordMeasurement.SALIENCY: "s_w",
}
_MEASUREMENT = {
    WordMeasurement.MARGIN: "the prediction's logit margin m_y = z_y − max_{c≠y} z_c",
    WordMeasurement.OCCLUSION: (
        "the word's contribution c_w = m_y(x) − m_y(x with the word → [UNK]) to the logit margin"
    ),
    WordMeasurement.SALIENCY: "the word's saliency score s_w (paper Eq. 5)",
}
_CANDIDATES = {
    WordCandidates.CONTAINING: "the training examples that contain the word (same stem)",
    WordCandidates.ALL: "every training example",
}
_TARGET = {
    TargetFunction.LOG_PROBABILITY: "log p(y|x)",
    TargetFunction.PROBABILITY: "p(y|x)",
    TargetFunction.LOGIT: "z_y",
}
_TOKEN_SCORE = {
    TokenScoreMethod.L2_NORM: "‖∇_{e_t} S_y‖₂",
    TokenScoreMethod.GRADIENT_TIMES_INPUT: "∇_{e_t} S_y · e_t",
    TokenScoreMethod.SUM: "Σ_j (∇_{e_t} S_y)_j",
    TokenScoreMethod.GRADIENT_TIMES_DELTA_UNK: "∇_{e_t} S_y · (e_t − e_[UNK])",
}


@dataclass(frozen=True)
class Terms:
    """Names of an answer's measurements, from its settings (None: not reported)."""

    settings: ExplainSettings | None

    @property
    def word_symbol(self) -> str:
        """The salient words' measurement f as written in I(z, f): m_y, c_w, s_w (or f)."""
        s = self.settings
        return _SYMBOL.get(s.word_measurement, "f") if s is not None else "f"

    @property
    def word_measurement(self) -> str:
        """What a salient word's influence is measured on, as a phrase."""
        s = self.settings
        if s is None or s.word_measurement not in _MEASUREMENT:
            return "the word's measurement f (the server did not report which)"
        text = _MEASUREMENT[s.word_measurement]
        among = _CANDIDATES.get(s.word_candidates)
        return f"{text}, among {among}" if among else text

    @property
    def word_symbol_is_margin(self) -> bool:
        """Whether a word's examples are measured on the prediction's margin m_y."""
        return self.word_symbol == MARGIN

    def saliency_signed(self, values: Sequence[float]) -> bool:
        """Whether the word saliency is signed: from the token score when reported, else
        whether any value is negative."""
        if self.settings is not None and self.settings.token_score in _TOKEN_SCORE:
            return self.settings.signed_saliency
        return any(v < 0 for v in values if math.isfinite(v))

    @property
    def saliency(self) -> str:
        """The saliency score's formula, e.g. "‖∇_{e_t} S_y‖₂ with S_y = log p(y|x)"."""
        s = self.settings
        if s is None or s.token_score not in _TOKEN_SCORE:
            return "s(x_t) (token score not reported)"
        target = _TARGET.get(s.target_function, "S_y")
        return f"{_TOKEN_SCORE[s.token_score]} with S_y = {target}"

    def rows(self) -> list[tuple[str, str]]:
        """(setting, value and meaning) for every reported setting; [] when none."""
        s = self.settings
        if s is None:
            return []
        signed = "signed" if s.signed_saliency else "unsigned, ≥ 0"
        return [
            (
                "word measurement",
                f"{s.word_measurement.name}: I(z, {self.word_symbol}) on {self.word_measurement}",
            ),
            (
                "word candidates",
                f"{s.word_candidates.name}: {_CANDIDATES.get(s.word_candidates, '?')}",
            ),
            (
                "prediction-level influence",
                (
                    f"{'yes' if s.prediction_influence else 'no'}: "
                    f"I(z, {MARGIN}) over the training set"
                ),
            ),
            ("word saliency (token score)", f"{s.token_score.name}: {self.saliency} ({signed})"),
            (
                "saliency target S_y",
                f"{s.target_function.name}: {_TARGET.get(s.target_function, '?')}",
            ),
            ("solver of s_test = H⁻¹∇θf", f"{s.solver.name} / {s.curvature.name}"),
            (
                "candidate search",
                f"{s.candidate_search.name}"
                + (
                    f", {s.candidates} candidates per direction"
                    if s.candidate_search.name == "INDEX"
                    else ""
                ),
            ),
            ("responsible word (Eq. 8)", s.token_influence.name),
        ]
