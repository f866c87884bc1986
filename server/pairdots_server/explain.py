"""The Explain pipeline (paper §3, §4.1): saliency → salient words → s_test → candidates →
exact influence → token-level influence.

For a test input x and label y:
  1. word saliency s(x_t) (Eq. 1–2, core.saliency), for y (and the gold label y_g in error
     analysis, Table 2);
  2. the top-m words by saliency (or the caller's positions);
  3. per word w: ∇θw by double backprop, s_test = H⁻¹∇θw (solver from the request or the
     bundle default; cached for identical queries);
  4. candidates: the FAISS index over projected training gradients queried with ∓Pᵀs_test
     (supporting examples have I = -⟨s_test, g_i⟩ > 0, i.e. ⟨-s_test, g_i⟩ large), or all;
  5. exact I(z_i, w) = -⟨s_test, ∇θL(z_i)⟩ (Eq. 5) for every candidate;
  6. for each returned example, I(x_t, w) (Eq. 8) per word, and the responsible word.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pairdots_server.core import influence as infl
from pairdots_server.core.grads import per_example_loss_grads
from pairdots_server.core.saliency import (
    Target,
    TokenScore,
    grad_theta_word_score,
    token_saliency,
    word_scores,
)
from pairdots_server.errors import FailedPrecondition, InvalidArgument
from pairdots_server.runtime import ModelRuntime
from pairdots_server.solvers import SolverSettings, solve_s_test

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
    target: Target = Target.LOG_PROB
    token_score: TokenScore = TokenScore.L2_NORM
    solver: SolverSettings = field(default_factory=SolverSettings)
    use_index: bool | None = None  # None: index when the bundle has one
    candidates: int = 0  # 0: server default
    token_influence: str = "exact"  # exact | first_order | none


# -- answer --------------------------------------------------------------------------------


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


@dataclass
class LabelAnswer:
    label: int
    role: str  # target | gold
    word_saliency: list[float]
    salient_words: list[SalientWordAnswer]


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


class _Timer:
    """Wall time per pipeline stage, summed over explained words."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.t[stage] = self.t.get(stage, 0.0) + seconds

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)


# -- pipeline ------------------------------------------------------------------------------


def explain(
    rt: ModelRuntime,
    q: ExplainQuery,
    should_stop: Callable[[], None],
    *,
    default_candidates: int,
    scoring_batch_size: int = 32,
) -> ExplainAnswer:
    start = time.perf_counter()
    task = rt.task
    timer = _Timer()
    warnings: list[str] = []
    notes: list[str] = []
    n_labels = len(rt.bundle.labels)
    for fname, value in (("target_label", q.target_label), ("gold_label", q.gold_label)):
        if value is not None and not 0 <= value < n_labels:
            raise InvalidArgument.for_field(
                fname, f"{value} is not a label of model {rt.name!r}; valid: 0..{n_labels - 1} "
                f"({', '.join(rt.bundle.labels)})"
            )

    # [1] encode + predict
    enc = task.encode([q.text], max_length=rt.max_length)
    with torch.no_grad():
        embeds = task.embed(enc.input_ids).detach()  # [1,T,D]
        logits = task.logits_fn({}, embeds, enc.attention_mask)  # [1,C]
        probs = torch.softmax(logits.double(), dim=-1)[0]
    predicted = int(probs.argmax())
    word_ids = enc.word_ids[0]
    words = enc.words[0]
    pieces = [0] * len(words)
    for w in word_ids:
        if w is not None:
            pieces[w] += 1
    if not any(pieces):
        raise InvalidArgument.for_field(
            "text", "has no word the model's tokenizer can read (it drops control characters "
            "and similar); send readable text"
        )
    if any(p == 0 for p in pieces):
        unseen = sum(p == 0 for p in pieces)
        if int(enc.attention_mask.sum()) >= rt.max_length:
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
        WordInfo(i, w, s, e, pieces[i]) for i, (w, (s, e)) in enumerate(zip(words, enc.word_spans[0]))
    ]
    for pos in q.word_positions:
        if not 0 <= pos < len(words) or pieces[pos] == 0:
            raise InvalidArgument.for_field(
                "word_positions", f"{pos} is not a word the model saw; valid: 0..{len(words) - 1}"
                " (words beyond the truncation point have no tokens)"
            )

    y = predicted if q.target_label is None else q.target_label
    labels: list[tuple[int, str]] = [(y, "target")]
    if q.gold_label is not None and q.gold_label != y:
        labels.append((q.gold_label, "gold"))

    compute_influence = q.top_words > 0 or bool(q.word_positions)
    used_index = False
    candidates_scored = 0
    if compute_influence:
        used_index = resolve_index(rt, q.use_index)
    else:
        notes.append("influence not computed: top_words = 0 and no word_positions were given")

    explanations: list[LabelAnswer] = []
    for label, role in labels:
        should_stop()
        with timer.stage("saliency"):
            ws_list = word_saliency(
                rt, embeds, enc.attention_mask, word_ids, len(words), label, q.target,
                q.token_score,
            )
        chosen = list(q.word_positions) if q.word_positions else _top_words(
            ws_list, pieces, q.top_words
        )
        salient: list[SalientWordAnswer] = []
        for wi in chosen if compute_influence else []:
            should_stop()
            s_test, diag = word_s_test(
                rt, q.text, embeds, enc.attention_mask, word_ids, wi, label, q.target,
                q.token_score, q.solver, should_stop, timer,
            )
            cand, n_scored = _candidates(
                rt, s_test, used_index, q.candidates or default_candidates, timer
            )
            candidates_scored = max(candidates_scored, n_scored)
            scores = _score_exact(rt, s_test, cand, should_stop, scoring_batch_size, timer)
            sup, opp = _top_k(cand, scores, q.examples_per_word)
            sup_ans = [_influential(rt, i, s) for i, s in sup]
            opp_ans = [_influential(rt, i, s) for i, s in opp]
            if q.token_influence != "none":
                start_t = time.perf_counter()
                for item in sup_ans + opp_ans:
                    should_stop()
                    _token_level(rt, s_test, item, q.token_influence)
                timer.add("token_influence", time.perf_counter() - start_t)
            if not diag["converged"]:
                warnings.append(
                    f"s_test for word {words[wi]!r} did not converge "
                    f"(relative change {diag['rel_change']:.3g} after {diag['iterations']} "
                    "iterations); raise max_iterations or damping"
                )
            salient.append(SalientWordAnswer(
                wi, words[wi], ws_list[wi], sup_ans, opp_ans, diag
            ))
        explanations.append(LabelAnswer(label, role, ws_list, salient))

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
    )


def word_saliency(
    rt: ModelRuntime, embeds: Tensor, mask: Tensor, word_ids: Sequence[int | None],
    n_words: int, label: int, target: Target, token_score: TokenScore,
) -> list[float]:
    """s(x_t) of every word for `label` (Eq. 1–2; word = sum of its pieces): embeds [1,T,D]."""
    tok = token_saliency(
        rt.task.logits_fn, rt.params, embeds, mask, label, target, token_score,
        baseline=rt.unk_embed,
    )  # [T]
    return [float(v) for v in word_scores(tok, word_ids, n_words)]  # [W]


def word_s_test(
    rt: ModelRuntime, text: str, embeds: Tensor, mask: Tensor, word_ids: Sequence[int | None],
    word: int, label: int, target: Target, token_score: TokenScore, solver: SolverSettings,
    should_stop: Callable[[], None], timer: _Timer | None = None,
) -> tuple[Tensor, dict[str, float | int | bool | str]]:
    """s_test = H⁻¹∇θw for the score w of word `word` (Eq. 5; ∇θw by double backprop),
    cached per (text, label, word, settings)."""
    timer = timer or _Timer()
    positions = [t for t, w in enumerate(word_ids) if w == word]
    with timer.stage("grad_score"):
        grad_w = grad_theta_word_score(
            rt.task.logits_fn, rt.params, embeds, mask, label, target, token_score, positions,
            baseline=rt.unk_embed,
        )  # [P]
    key = (text, label, word, target, token_score, solver)
    with timer.stage("solve"):
        return solve_s_test(rt, grad_w, solver, should_stop, cache_key=key)


def resolve_index(rt: ModelRuntime, use_index: bool | None) -> bool:
    """Whether to prefilter with the index: the request's choice, else when the bundle has one."""
    used = rt.has_index if use_index is None else use_index
    if used and not rt.has_index:
        raise FailedPrecondition(
            f"model {rt.name!r} has no candidate index; use CANDIDATE_SEARCH_EXHAUSTIVE or "
            "build one with `pairdots index build`"
        )
    return used


def _top_words(scores: Sequence[float], pieces: Sequence[int], m: int) -> list[int]:
    """The m words with the largest saliency magnitude |s(x_t)| for the label (words the model
    saw): a word with a large negative score pulls against y and is salient too."""
    order = sorted(
        (i for i in range(len(scores)) if pieces[i] > 0), key=lambda i: (-abs(scores[i]), i)
    )
    return order[:m]


def _candidates(
    rt: ModelRuntime, s_test: Tensor, used_index: bool, k: int, timer: _Timer
) -> tuple[list[int], int]:
    """Training indices to score exactly, and how many."""
    if not used_index:
        return list(range(rt.n_train)), rt.n_train
    start = time.perf_counter()
    index, projection = rt.index()
    q = projection.project(s_test[None].float()).cpu().numpy()  # [1,k]
    k = min(k, rt.n_train)
    _, sup_ids = index.search(-q, k)  # supporting: ⟨-s_test, g⟩ large
    _, opp_ids = index.search(q, k)  # opposing: ⟨s_test, g⟩ large
    ids = sorted({int(i) for i in sup_ids[0].tolist() + opp_ids[0].tolist() if i >= 0})
    timer.add("candidates", time.perf_counter() - start)
    return ids, len(ids)


def _score_exact(
    rt: ModelRuntime,
    s_test: Tensor,
    indices: Sequence[int],
    should_stop: Callable[[], None],
    batch_size: int,
    timer: _Timer,
) -> Tensor:
    """I(z_i, w) = -⟨s_test, ∇θL(z_i)⟩ (Eq. 5) for the given training indices -> [K]."""
    start = time.perf_counter()
    out = []
    for b in range(0, len(indices), batch_size):
        should_stop()
        enc = rt.encode_train(indices[b : b + batch_size])
        g = per_example_loss_grads(rt.task.logits_fn, rt.params, enc.embeds, enc.mask, enc.labels)
        out.append(infl.influence_on_score(s_test.to(g.dtype), g))  # [B]
    timer.add("exact_scoring", time.perf_counter() - start)
    return torch.cat(out) if out else torch.zeros(0)


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


def _token_level(rt: ModelRuntime, s_test: Tensor, item: Influential, method: str) -> None:
    """Fill item.words with Eq. 8 word influences and pick the responsible word."""
    enc = rt.encode_train([item.train_index])
    fn = infl.token_influence_exact if method == "exact" else infl.token_influence_fast
    per_token = fn(
        rt.task.logits_fn, rt.params, s_test, enc.embeds, enc.mask, int(enc.labels[0]),
        rt.unk_embed,
    )  # [T]
    word_ids = enc.word_ids[0]
    words = enc.words[0]
    totals = [0.0] * len(words)
    for t, w in enumerate(word_ids):
        if w is not None:
            totals[w] += float(per_token[t])
    item.words = list(zip(words, totals))
    if totals:
        sign = 1.0 if item.influence >= 0 else -1.0
        item.responsible_word = max(range(len(totals)), key=lambda i: (sign * totals[i], -i))
