"""The Explain use case (paper §3, §4.1), composed from the pipeline steps (pipeline.py):

For a test input x and label y:
  1. encode x and predict p(y|x);
  2. word saliency s(x_t) (Eq. 1–2) for y (and the gold label y_g in error analysis, Table 2);
  3. the top-m words by |saliency| (or the caller's positions);
  4. per word w: ∇θw by double backprop, s_test = H⁻¹∇θw (solver from the request or the
     bundle default; cached for identical queries);
  5. candidates: the FAISS index over projected training gradients queried with ∓Pᵀs_test
     (supporting examples have I = -⟨s_test, g_i⟩ > 0, i.e. ⟨-s_test, g_i⟩ large), or all;
  6. exact I(z_i, w) = -⟨s_test, ∇θL(z_i)⟩ (Eq. 5) for every candidate, top-k each way;
  7. for each returned example, I(x_t, w) (Eq. 8) per word, and the responsible word.
Steps 6–7 share one pipeline.ScoreMemo per measurement within a request: the prediction and
every word paired on the margin (the default) share s_test, so the union of their candidates
is scored once, and an example returned twice is attributed once.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from torch import Tensor

from pairdots_server.errors import InvalidArgument
from pairdots_server.influence import pipeline as steps
from pairdots_server.influence import words as words_
from pairdots_server.influence.pipeline import TokenInfluence
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import (
    InfluenceSettings,
    PipelineSettings,
    WordCandidates,
    WordMeasurement,
)
from pairdots_server.influence.solver_policy import solver_warnings

# -- query ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExplainQuery:
    """A validated Explain request (rpc/convert.py builds it)."""

    text: str
    target_label: int | None = None
    gold_label: int | None = None
    top_words: int = 3
    word_positions: tuple[int, ...] = ()
    examples_per_word: int = 5
    influence: InfluenceSettings = field(default_factory=InfluenceSettings)
    token_influence: TokenInfluence = TokenInfluence.AUTO  # resolved in explain()


# -- answer --------------------------------------------------------------------------------


class Role(enum.Enum):
    """Which label an explanation is for."""

    TARGET = "target"  # the requested (or predicted) label
    GOLD = "gold"  # the caller's gold label, when it differs (error analysis)


@dataclass
class WordInfo:
    index: int
    text: str
    char_start: int
    char_end: int
    pieces: int


@dataclass
class Influential:
    train_index: int
    text: str
    label: int
    influence: float
    words: list[tuple[str, float]] = field(default_factory=list)
    responsible_word: int = -1


@dataclass
class SalientWordAnswer:
    word_index: int
    text: str
    saliency: float
    supporting: list[Influential]
    opposing: list[Influential]
    solver: dict[str, float | int | bool | str]
    contribution: float = 0.0  # c_w on the margin
    containing_examples: int = 0  # training examples with the word's stem


@dataclass
class PredictionAnswer:
    """Prediction-level influence I(z, m_y) on the label's logit margin."""

    margin: float
    supporting: list[Influential]
    opposing: list[Influential]
    solver: dict[str, float | int | bool | str]
    candidates_scored: int


@dataclass
class LabelAnswer:
    label: int
    role: Role
    word_saliency: list[float]
    salient_words: list[SalientWordAnswer]
    word_contribution: list[float] = field(default_factory=list)
    prediction: PredictionAnswer | None = None


@dataclass
class ExplainAnswer:
    probabilities: list[float]
    predicted: int
    words: list[WordInfo]
    explanations: list[LabelAnswer]
    influence_computed: bool
    used_index: bool
    candidates_scored: int
    training_examples: int
    timings: dict[str, float]
    warnings: list[str]
    notes: list[str]
    total_seconds: float
    settings: PipelineSettings | None = None  # every default resolved (what ran)
    token_influence: TokenInfluence = TokenInfluence.EXACT


# -- the use case --------------------------------------------------------------------------


def explain(
    rt: ModelRuntime,
    q: ExplainQuery,
    should_stop: Callable[[], None],
    *,
    default_candidates: int,
    scoring_batch_size: int = 32,
) -> ExplainAnswer:
    start = time.perf_counter()
    settings = q.influence.resolve(
        rt, default_candidates=default_candidates, scoring_batch_size=scoring_batch_size
    )
    q = replace(q, token_influence=steps.resolve_token_influence(rt, q.token_influence))
    timer = steps.Timer()
    warnings: list[str] = []
    notes: list[str] = []
    _check_labels(rt, q)

    # [1] encode + predict
    enc = steps.encode_text(rt, q.text)
    probs = steps.predict(rt, enc)  # [C]
    predicted = int(probs.argmax())
    words, pieces = enc.words, enc.pieces
    if not any(pieces):
        raise InvalidArgument.for_field(
            "text", "has no word the model's tokenizer can read (it drops control characters "
            "and similar); send readable text"
        )
    if any(p == 0 for p in pieces):
        unseen = sum(p == 0 for p in pieces)
        if int(enc.mask.sum()) >= rt.max_length:
            warnings.append(
                f"input truncated to {rt.max_length} word pieces: "
                f"{unseen} words were not seen by the model"
            )
        else:
            warnings.append(
                f"{unseen} words have no word pieces (characters the tokenizer drops) and "
                "were not seen by the model"
            )
    word_infos = [
        WordInfo(i, w, s, e, pieces[i]) for i, (w, (s, e)) in enumerate(zip(words, enc.spans))
    ]
    for pos in q.word_positions:
        if not 0 <= pos < len(words) or pieces[pos] == 0:
            raise InvalidArgument.for_field(
                "word_positions", f"{pos} is not a word the model saw; valid: 0..{len(words) - 1}"
                " (words beyond the truncation point have no tokens)"
            )

    y = predicted if q.target_label is None else q.target_label
    labels: list[tuple[int, Role]] = [(y, Role.TARGET)]
    if q.gold_label is not None and q.gold_label != y:
        labels.append((q.gold_label, Role.GOLD))

    compute_influence = q.top_words > 0 or bool(q.word_positions)
    if compute_influence:
        steps.check_index(rt, settings)
    else:
        notes.append("influence not computed: top_words = 0 and no word_positions were given")

    candidates_scored = 0
    explanations: list[LabelAnswer] = []
    memos: dict[steps.Measurement, steps.ScoreMemo] = {}
    for label, role in labels:
        should_stop()
        # [2] saliency and contributions, [3] the words to explain
        with timer.stage("saliency"):
            ws_list = steps.word_saliency(rt, enc, label, settings.target, settings.token_score)
            contrib = words_.word_contribution(rt, enc, label)
        if q.word_positions:
            chosen = list(q.word_positions)
        elif settings.word_measurement is not WordMeasurement.SALIENCY:
            chosen = words_.top_contributing_words(contrib, words, pieces, q.top_words)
        else:
            chosen = steps.top_words(ws_list, pieces, q.top_words)
        prediction = None
        if compute_influence and settings.prediction_influence:
            should_stop()
            prediction = _explain_prediction(rt, q, settings, enc, label, should_stop, timer,
                                             memos)
            candidates_scored = max(candidates_scored, prediction.candidates_scored)
            _warn_unconverged(warnings, prediction.solver, "the prediction")
        salient: list[SalientWordAnswer] = []
        for wi in chosen if compute_influence else []:
            should_stop()
            answer, n_scored = _explain_word(
                rt, q, settings, enc, wi, ws_list[wi], label, should_stop, timer, notes, memos
            )
            answer.contribution = contrib[wi]
            candidates_scored = max(candidates_scored, n_scored)
            _warn_unconverged(warnings, answer.solver, f"word {words[wi]!r}")
            salient.append(answer)
        explanations.append(LabelAnswer(label, role, ws_list, salient, contrib, prediction))

    used_index = compute_influence and settings.use_index
    if used_index and candidates_scored < 2 * q.examples_per_word:
        warnings.append(
            f"only {candidates_scored} candidates were scored for {q.examples_per_word} examples "
            "per direction; raise `candidates` for a reliable top-k"
        )
    return ExplainAnswer(
        probabilities=[float(p) for p in probs],
        predicted=predicted,
        words=word_infos,
        explanations=explanations,
        influence_computed=compute_influence,
        used_index=used_index,
        candidates_scored=candidates_scored,
        training_examples=rt.n_train,
        timings=timer.t,
        warnings=warnings,
        notes=notes,
        total_seconds=time.perf_counter() - start,
        settings=settings,
        token_influence=q.token_influence,
    )


def _check_labels(rt: ModelRuntime, q: ExplainQuery) -> None:
    n_labels = len(rt.bundle.labels)
    for fname, value in (("target_label", q.target_label), ("gold_label", q.gold_label)):
        if value is not None and not 0 <= value < n_labels:
            raise InvalidArgument.for_field(
                fname, f"{value} is not a label of model {rt.name!r}; valid: 0..{n_labels - 1} "
                f"({', '.join(rt.bundle.labels)})"
            )


def _warn_unconverged(
    warnings: list[str], diag: dict[str, float | int | bool | str], what: str
) -> None:
    """A warning when the solve did not converge, and the solver's own (e.g. the low-rank
    tail: λ_{k+1}/δ > 1 or a Ritz residual > 0.1), each once per answer."""
    texts = solver_warnings(diag)
    if not diag["converged"]:
        texts.insert(0,
            f"s_test for {what} did not converge (relative change {diag['rel_change']:.3g} "
            f"after {diag['iterations']} iterations); raise max_iterations or damping"
        )
    warnings.extend(t for t in texts if t not in warnings)


def _ranked_examples(
    rt: ModelRuntime, q: ExplainQuery, settings: PipelineSettings, s_test: Tensor,
    cand: list[int], should_stop: Callable[[], None], timer: steps.Timer,
    memo: steps.ScoreMemo, keep_word: str | None = None,
) -> tuple[list[Influential], list[Influential]]:
    """Steps 6–7: exact scores of the candidates, top-k each way, Eq. 8 responsible words
    (with settings.eq8_top_words, the explained word `keep_word` is always scored exactly)."""
    scores = steps.score_examples(rt, s_test, cand, settings, should_stop, timer, memo=memo)
    sup, opp = _top_k(cand, scores, q.examples_per_word)
    sup_ans = [_influential(rt, i, s) for i, s in sup]
    opp_ans = [_influential(rt, i, s) for i, s in opp]
    if q.token_influence is not TokenInfluence.NONE:
        should_stop()
        start_t = time.perf_counter()
        items = sup_ans + opp_ans
        attributions = steps.word_attributions(
            rt, s_test, [it.train_index for it in items], q.token_influence, memo=memo,
            top_words=settings.eq8_top_words, keep_word=keep_word,
            max_tokens=settings.eq8_batch_tokens,
        )
        for item, att in zip(items, attributions, strict=True):
            _responsible_word(item, att)
        timer.add("token_influence", time.perf_counter() - start_t)
    return sup_ans, opp_ans


def _explain_prediction(
    rt: ModelRuntime, q: ExplainQuery, settings: PipelineSettings, enc: steps.EncodedText,
    label: int, should_stop: Callable[[], None], timer: steps.Timer,
    memos: dict[steps.Measurement, steps.ScoreMemo],
) -> PredictionAnswer:
    """Prediction-level influence: f = m_y(x), over every training example (or the index)."""
    m = steps.Measurement(steps.MeasurementKind.PREDICTION_MARGIN, label)
    s_test, diag = steps.measurement_s_test(rt, enc, m, settings, should_stop, timer)
    cand = steps.candidates(rt, s_test, settings, timer)
    memo = memos.setdefault(m, steps.ScoreMemo())
    sup, opp = _ranked_examples(rt, q, settings, s_test, cand, should_stop, timer, memo)
    return PredictionAnswer(steps.margin_of(rt, enc, label), sup, opp, diag, len(cand))


def _explain_word(
    rt: ModelRuntime, q: ExplainQuery, settings: PipelineSettings, enc: steps.EncodedText,
    wi: int, saliency: float, label: int, should_stop: Callable[[], None], timer: steps.Timer,
    notes: list[str], memos: dict[steps.Measurement, steps.ScoreMemo],
) -> tuple[SalientWordAnswer, int]:
    """Steps 4–7 for one word: its answer and the number of candidates scored."""
    if settings.word_measurement is WordMeasurement.MARGIN:  # the prediction's s_test (cached)
        m = steps.Measurement(steps.MeasurementKind.PREDICTION_MARGIN, label)
    else:
        kind = (steps.MeasurementKind.WORD_OCCLUSION
                if settings.word_measurement is WordMeasurement.OCCLUSION
                else steps.MeasurementKind.WORD_SALIENCY)
        m = steps.Measurement(kind, label, wi, settings.target, settings.token_score)
    s_test, diag = steps.measurement_s_test(rt, enc, m, settings, should_stop, timer)
    containing = words_.examples_containing(rt, enc.words[wi])
    allowed: list[int] | None = None
    if settings.word_candidates is WordCandidates.CONTAINING:
        if containing:
            allowed = containing
        else:
            notes.append(
                f"no training example contains {enc.words[wi]!r}; its pairing is over all "
                "training examples"
            )
    cand = steps.candidates(rt, s_test, settings, timer, allowed=allowed)
    memo = memos.setdefault(m, steps.ScoreMemo())
    sup, opp = _ranked_examples(rt, q, settings, s_test, cand, should_stop, timer, memo,
                                enc.words[wi])
    answer = SalientWordAnswer(wi, enc.words[wi], saliency, sup, opp, diag,
                               containing_examples=len(containing))
    return answer, len(cand)


def _top_k(
    indices: Sequence[int], scores: Tensor, k: int
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Top-k positive (supporting, largest first) and negative (opposing, most negative first)."""
    pairs = [(int(i), float(s)) for i, s in zip(indices, scores.tolist()) if math.isfinite(s)]
    sup = sorted((p for p in pairs if p[1] > 0), key=lambda p: (-p[1], p[0]))[:k]
    opp = sorted((p for p in pairs if p[1] < 0), key=lambda p: (p[1], p[0]))[:k]
    return sup, opp


def _influential(rt: ModelRuntime, index: int, score: float) -> Influential:
    ex = rt.bundle.train[index]
    return Influential(index, ex.text, ex.label, score)


def _responsible_word(item: Influential, att: steps.WordAttribution) -> None:
    """Fill item.words with Eq. 8 word influences and pick the responsible word: the largest
    influence in the example's direction among the exactly scored words (all words when none
    is exact: the FIRST_ORDER method)."""
    totals = att.totals
    item.words = list(zip(att.words, totals))
    pool = [i for i, x in enumerate(att.exact) if x] or list(range(len(totals)))
    if totals:
        sign = 1.0 if item.influence >= 0 else -1.0
        item.responsible_word = max(pool, key=lambda i: (sign * totals[i], -i))
