"""The influence pipeline's steps (paper §3), public and composed by Explain
(influence/explain.py), Attack and Repair (perturb/) and the benchmarks (bench/):

  encode_text            text -> EncodedText (tokens, words, embeddings; one encoder)
  word_saliency          s(x_t) of every word for a label (Eq. 1–2)
                         (word contributions and the examples containing a word: words.py)
  top_words              the m most salient words the model saw
  measurement_gradient   what f is (a Measurement) -> ∇θf, flat [P] (one backward)
  s_test                 s_test = (H + δI)⁻¹ ∇θf (the runtime's cache, else solver_policy)
  candidates             training indices to score (index prefilter, or all; optional subset)
  score_examples         I(z_i, f) = -⟨s_test, ∇θL(z_i)⟩ (Eq. 5) for training indices, one
                         jvp per batch (core/scoring.py), skipping those a ScoreMemo holds
  score_texts            the same for arbitrary labelled texts (perturbed examples)
  score_texts_many       the same against many s_tests at once (per-example gradients)
  word_attribution       I(x_t, f) (Eq. 8) per word of one text
  word_attributions      the same for several training examples, every [UNK] copy batched

Every step takes the resolved PipelineSettings (influence/settings.py) or the part of it it
needs; `Timer` sums wall time per stage.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from pairdots_server import telemetry
from pairdots_server.core import influence as infl
from pairdots_server.core.grads import per_example_loss_grads
from pairdots_server.core.measure import (
    grad_theta_margin,
    grad_theta_occlusion,
    margin,
)
from pairdots_server.core.saliency import (
    Target,
    TokenScore,
    grad_theta_word_score,
    token_saliency,
    word_scores,
)
from pairdots_server.core.scoring import (
    Row,
    batch_tokens_for,
    influence_jvp,
    score_rows,
    token_influence_first_order_many,
    token_influence_many,
)
from pairdots_server.errors import FailedPrecondition
from pairdots_server.influence.runtime import EncodedExamples, ModelRuntime
from pairdots_server.influence.scope_inputs import ScopeInputs
from pairdots_server.influence.settings import PipelineSettings
from pairdots_server.influence.solver_policy import solve_s_test

StopFn = Callable[[], None]


def no_stop() -> None:
    """A should_stop callback that never cancels."""


class Timer:
    """Wall time per pipeline stage, summed over explained words; each stage is also a
    tracing span (telemetry.py; a no-op unless tracing is on)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def add(self, stage: str, seconds: float, *, span: bool = True) -> None:
        self.t[stage] = self.t.get(stage, 0.0) + seconds
        if span:
            telemetry.record_stage(stage, seconds)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with telemetry.stage_span(name):
            try:
                yield
            finally:
                self.add(name, time.perf_counter() - start, span=False)


# -- encode ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedText:
    """One text as model input: embeds [1,T,D], mask [1,T], word_ids [T] (word of token t or
    None for special tokens), words / spans / pieces [W] (pieces 0 = cut off by truncation)."""

    text: str
    words: list[str]
    spans: list[tuple[int, int]]
    pieces: list[int]
    embeds: Tensor
    mask: Tensor
    word_ids: list[int | None]

    def positions(self, word: int) -> list[int]:
        """Token positions of word `word`."""
        return [t for t, w in enumerate(self.word_ids) if w == word]

    @property
    def word_positions(self) -> list[int]:
        """Token positions that belong to some word (special tokens excluded)."""
        return [t for t, w in enumerate(self.word_ids) if w is not None]


def encode_text(rt: ModelRuntime, text: str) -> EncodedText:
    return _row(rt.encode_texts([text]), 0, text)


def _row(enc: EncodedExamples, b: int, text: str) -> EncodedText:
    return EncodedText(
        text, enc.words[b], enc.spans[b], enc.pieces(b), enc.embeds[b : b + 1],
        enc.mask[b : b + 1], enc.word_ids[b],
    )


def predict(rt: ModelRuntime, enc: EncodedText) -> Tensor:
    """p(y|x) for every label -> [C] (float64)."""
    with torch.no_grad():
        logits = rt.task.logits_fn({}, enc.embeds, enc.mask)  # [1,C]
        return torch.softmax(logits.double(), dim=-1)[0]


def margin_of(rt: ModelRuntime, enc: EncodedText, label: int) -> float:
    """m_y(x) = z_y − max_{c≠y} z_c for the label (core/measure.margin)."""
    with torch.no_grad():
        logits = rt.task.logits_fn({}, enc.embeds, enc.mask)  # [1,C]
        return float(margin(logits, torch.tensor([label], device=logits.device))[0])


# -- saliency --------------------------------------------------------------------------------


def word_saliency(
    rt: ModelRuntime, enc: EncodedText, label: int, target: Target, token_score: TokenScore
) -> list[float]:
    """s(x_t) of every word for `label` (Eq. 1–2; word = sum of its pieces) -> [W]."""
    tok = token_saliency(
        rt.task.logits_fn, rt.params, enc.embeds, enc.mask, label, target, token_score,
        baseline=rt.unk_embed,
    )  # [T]
    return [float(v) for v in word_scores(tok, enc.word_ids, len(enc.words))]  # [W]


def top_words(scores: Sequence[float], pieces: Sequence[int], m: int) -> list[int]:
    """The m words with the largest saliency magnitude |s(x_t)| for the label (words the model
    saw): a word with a large negative score pulls against y and is salient too."""
    order = sorted(
        (i for i in range(len(scores)) if pieces[i] > 0), key=lambda i: (-abs(scores[i]), i)
    )
    return order[:m]


# -- measurement gradient --------------------------------------------------------------------


class MeasurementKind(enum.Enum):
    """What the measurement f of a test input is (∇θf is what s_test inverts; core/measure.py)."""

    WORD_SALIENCY = "word_saliency"  # f = the saliency score w of one word (Eq. 1–2, Eq. 5)
    WORD_OCCLUSION = "word_occlusion"  # f = c_w = m_y(x) − m_y(x with w → [UNK])
    PREDICTION_MARGIN = "prediction_margin"  # f = m_y(x) = z_y − max_{c≠y} z_c


@dataclass(frozen=True)
class Measurement:
    """A measurement f of a test input: its kind, the label it is taken for and, for
    word-level kinds, the word; target/token_score define the saliency score."""

    kind: MeasurementKind
    label: int
    word: int | None = None
    target: Target = Target.LOG_PROB
    token_score: TokenScore = TokenScore.L2_NORM


def _grad_word_saliency(rt: ModelRuntime, enc: EncodedText, m: Measurement) -> Tensor:
    """∇θw for the score w of word m.word by double backprop -> [P]."""
    assert m.word is not None
    return grad_theta_word_score(
        rt.task.logits_fn, rt.params, enc.embeds, enc.mask, m.label, m.target, m.token_score,
        enc.positions(m.word), baseline=rt.unk_embed,
    )


def _grad_word_occlusion(rt: ModelRuntime, enc: EncodedText, m: Measurement) -> Tensor:
    """∇θc_w by two ordinary backward passes (x and its occluded copy) -> [P]."""
    assert m.word is not None
    return grad_theta_occlusion(
        rt.task.logits_fn, rt.params, enc.embeds, enc.mask, m.label, enc.positions(m.word),
        rt.unk_embed,
    )


def _grad_prediction_margin(rt: ModelRuntime, enc: EncodedText, m: Measurement) -> Tensor:
    """∇θm_y by one backward pass -> [P]."""
    return grad_theta_margin(rt.task.logits_fn, rt.params, enc.embeds, enc.mask, m.label)


# One entry per MeasurementKind: (runtime, encoded text, measurement) -> flat ∇θf [P].
MEASUREMENTS: dict[MeasurementKind, Callable[[ModelRuntime, EncodedText, Measurement], Tensor]] = {
    MeasurementKind.WORD_SALIENCY: _grad_word_saliency,
    MeasurementKind.WORD_OCCLUSION: _grad_word_occlusion,
    MeasurementKind.PREDICTION_MARGIN: _grad_prediction_margin,
}


def measurement_gradient(rt: ModelRuntime, enc: EncodedText, m: Measurement) -> Tensor:
    """∇θf of the measurement m of the text `enc` -> flat [P]."""
    return MEASUREMENTS[m.kind](rt, enc, m)


# -- s_test ----------------------------------------------------------------------------------


def s_test(
    rt: ModelRuntime, grad_f: Tensor, settings: PipelineSettings, should_stop: StopFn,
    *, cache_key: Hashable | None = None,
) -> tuple[Tensor, dict[str, float | int | bool | str]]:
    """s_test = (H + δI)⁻¹ ∇θf with the solver's diagnostics; a query whose cache_key was
    solved before comes from the runtime's s_test cache (diagnostics "cached": True)."""
    key = None if cache_key is None else ("s_test", cache_key)
    if key is not None:
        hit = rt.s_test_cache.get(key)
        if hit is not None:
            x, diag = hit
            return x, {**diag, "cached": True}
    x, diag = solve_s_test(rt, grad_f, settings.solver, should_stop)
    if key is not None:
        rt.s_test_cache.put(key, (x, diag))
    return x, diag


def measurement_s_test(
    rt: ModelRuntime, enc: EncodedText, m: Measurement, settings: PipelineSettings,
    should_stop: StopFn, timer: Timer | None = None,
) -> tuple[Tensor, dict[str, float | int | bool | str]]:
    """s_test = H⁻¹∇θf for the measurement m of `enc` (Eq. 5 with f = m), cached per
    (text, measurement, solver settings)."""
    timer = timer or Timer()
    with timer.stage("grad_score"):
        grad_f = measurement_gradient(rt, enc, m)  # [P]
    key = (enc.text, m, settings.solver)
    with timer.stage("solve"):
        return s_test(rt, grad_f, settings, should_stop, cache_key=key)


def word_s_test(
    rt: ModelRuntime, enc: EncodedText, word: int, label: int, settings: PipelineSettings,
    should_stop: StopFn, timer: Timer | None = None,
) -> tuple[Tensor, dict[str, float | int | bool | str]]:
    """s_test = H⁻¹∇θw for the saliency score w of word `word` (Eq. 5), the paper's word-level
    measurement (Attack and Repair optimise it)."""
    m = Measurement(MeasurementKind.WORD_SALIENCY, label, word, settings.target,
                    settings.token_score)
    return measurement_s_test(rt, enc, m, settings, should_stop, timer)


# -- candidates and exact scores -------------------------------------------------------------

def check_index(rt: ModelRuntime, settings: PipelineSettings) -> None:
    """FailedPrecondition when the settings ask for an index the model does not have."""
    if settings.use_index and not rt.has_index:
        raise FailedPrecondition(
            f"model {rt.name!r} has no candidate index; use CANDIDATE_SEARCH_EXHAUSTIVE or "
            "build one with `pairdots index build`"
        )


def candidates(
    rt: ModelRuntime, s_test: Tensor, settings: PipelineSettings, timer: Timer | None = None,
    *, allowed: Sequence[int] | None = None,
) -> list[int]:
    """Training indices to score exactly: all of them (or `allowed`), or, with the index,
    the union of the top-K supporting (⟨-s_test, g⟩ large) and opposing (⟨s_test, g⟩ large)
    neighbours of the projected query. With `allowed`, only those: all of them when they are at
    most 2K, else the top K of each direction among them (CandidateIndex.search_within)."""
    check_index(rt, settings)
    keep = None if allowed is None else set(allowed)
    if not settings.use_index:
        ids = list(range(rt.n_train))
        return ids if keep is None else [i for i in ids if i in keep]
    if keep is not None and len(keep) <= 2 * settings.candidates:
        return sorted(keep)  # no more than the index would return: score them all exactly
    start = time.perf_counter()
    index, projection = rt.index()
    q = projection.project(s_test[None].float()).cpu().numpy()  # [1,k]
    k = min(settings.candidates, rt.n_train)
    if keep is None:
        _, sup_ids = index.search(-q, k)  # supporting: ⟨-s_test, g⟩ large
        _, opp_ids = index.search(q, k)  # opposing: ⟨s_test, g⟩ large
    else:
        within = np.fromiter(keep, dtype=np.int64, count=len(keep))
        _, sup_ids = index.search_within(-q, k, within)
        _, opp_ids = index.search_within(q, k, within)
    ids = sorted({int(i) for i in sup_ids[0].tolist() + opp_ids[0].tolist() if i >= 0})
    if timer is not None:
        timer.add("candidates", time.perf_counter() - start)
    return ids


@dataclass
class ScoreMemo:
    """What one request already computed for one s_test (one measurement): exact scores
    I(z_i, f) by training index, and Eq. 8 word attributions (words, totals) by training index,
    so the union of all explained words' candidates is scored once."""

    scores: dict[int, float] = field(default_factory=dict)
    words: dict[int, WordAttribution] = field(default_factory=dict)


def _influence(rt: ModelRuntime, s_test: Tensor, enc: EncodedExamples) -> Tensor:
    """-⟨s_test, ∇θL(z_b)⟩ for every encoded, labelled example, by one jvp -> [B]."""
    return influence_jvp(rt.task.logits_fn, rt.params, s_test, enc.embeds, enc.mask, enc.labels)


def score_examples(
    rt: ModelRuntime, s_test: Tensor, indices: Sequence[int], settings: PipelineSettings,
    should_stop: StopFn, timer: Timer | None = None, *, memo: ScoreMemo | None = None,
) -> Tensor:
    """I(z_i, f) = -⟨s_test, ∇θL(z_i)⟩ (Eq. 5) for the given training indices -> [K] (float64).

    Examples are batched in order of text length (little padding); those in `memo` are not
    recomputed, and the new scores are added to it. With the runtime's scope-input cache
    (influence/scope_inputs.py) the jvp runs through the scoped top only, from h_L(z_i)."""
    start = time.perf_counter()
    batch = settings.scoring_batch_size
    known = memo.scores if memo is not None else {}
    todo = sorted({int(i) for i in indices if int(i) not in known},
                  key=lambda i: (len(rt.bundle.train[i].text), i))
    fresh: dict[int, float] = {}
    cache = rt.scope_inputs()
    step = batch if cache is None else batch * 8  # the cache path batches inside score_rows
    for b in range(0, len(todo), step):
        should_stop()
        chunk = todo[b : b + step]
        if cache is None:
            vals = _influence(rt, s_test, rt.encode_train(chunk))  # [B]
        else:
            vals = _influence_cached(rt, cache, s_test, chunk, batch)  # [B]
        fresh.update(zip(chunk, vals.double().tolist(), strict=True))
    if memo is not None:
        memo.scores.update(fresh)
    if timer is not None:
        timer.add("exact_scoring", time.perf_counter() - start)
    return torch.tensor([known[int(i)] if int(i) in known else fresh[int(i)] for i in indices],
                        dtype=torch.float64)


def _influence_cached(
    rt: ModelRuntime, cache: ScopeInputs, s_test: Tensor, indices: Sequence[int], batch: int,
) -> Tensor:
    """-⟨s_test, ∇θL(z_i)⟩ for training indices from their cached h_L, one jvp of the scoped
    top per batch of `batch` rows -> [B] (the model's dtype)."""
    assert rt.split is not None
    return score_rows(rt.split.top, rt.params, s_test, rt.scope_rows(indices, cache),
                      batch_size=batch)


def score_texts(
    rt: ModelRuntime, s_test: Tensor, texts: Sequence[str], labels: Sequence[int],
    batch_size: int = 32, should_stop: StopFn = no_stop,
) -> Tensor:
    """I(z_i, f) = -s_testᵀ ∇θL(z_i) (Eq. 5) for arbitrary labelled texts -> [N] (float64)."""
    out: list[Tensor] = []
    for b in range(0, len(texts), batch_size):
        should_stop()
        enc = rt.encode_texts(texts[b : b + batch_size], labels[b : b + batch_size])
        out.append(_influence(rt, s_test, enc).double().cpu())  # [B]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def score_texts_many(
    rt: ModelRuntime, s_tests: Tensor | Sequence[Tensor], texts: Sequence[str],
    labels: Sequence[int], batch_size: int = 32, should_stop: StopFn = no_stop,
    *, max_stack_bytes: int = 1 << 30,
) -> Tensor:
    """I(z_i, f_j) = -⟨s_test_j, ∇θL(z_i)⟩ (Eq. 5) for labelled texts against many s_tests:
    s_tests [J,P] (or J vectors [P]) -> [N,J] (float64).

    One per-example gradient per text, G [B,P] per batch, then -G S_tᵀ: the cost does not grow
    with J (score_texts runs one jvp per s_test instead; cheaper for J of 1 or 2). With the
    scope split the trunk runs without gradient and the per-example gradients are those of
    the scoped top. Texts are batched in order of length (little padding). Given as separate
    vectors, the s_tests are stacked once when J·P fits max_stack_bytes, else in groups of
    that size for every batch (memory stays bounded for a request of many examples)."""
    count = int(s_tests.shape[0]) if isinstance(s_tests, Tensor) else len(s_tests)
    out = torch.zeros(len(texts), count, dtype=torch.float64)
    if not texts or count == 0:
        return out
    group = max(1, min(count, max_stack_bytes // max(1, s_tests[0].numel() * 8)))  # float64

    def stacked(lo: int, hi: int) -> Tensor:  # s_tests lo..hi-1 as [J_c,P] float64
        return torch.stack([s_tests[j] for j in range(lo, hi)]).double()

    whole = stacked(0, count) if group >= count else None
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    for b in range(0, len(order), batch_size):
        should_stop()
        chunk = order[b : b + batch_size]
        batch = rt.text_batch([texts[i] for i in chunk], [labels[i] for i in chunk])
        g = per_example_loss_grads(rt.curvature_logits_fn, rt.params, batch.embeds, batch.mask,
                                   batch.labels).double()  # [B,P]
        idx = torch.tensor(chunk, dtype=torch.long)
        for c0 in range(0, count, group):
            s = whole if whole is not None else stacked(c0, min(count, c0 + group))
            # [B,P] @ [P,J_c] -> [B,J_c]
            out[idx, c0 : c0 + s.shape[0]] = -(g @ s.to(g.device).T).cpu()
    return out


# -- token attribution -----------------------------------------------------------------------


class TokenInfluence(enum.Enum):
    """How Eq. 8 is computed for the returned training examples."""

    EXACT = "exact"  # one [UNK] copy per token
    FIRST_ORDER = "first_order"  # one mixed second derivative
    NONE = "none"  # not computed
    EXACT_BF16 = "exact_bf16"  # EXACT with the trunk's products in bfloat16 (trunk_in)
    AUTO = "auto"  # EXACT_BF16 where it runs natively (resolve_token_influence), else EXACT

    @property
    def exact(self) -> bool:
        """[UNK] copies (EXACT, EXACT_BF16), not the first-order estimate."""
        return self in (TokenInfluence.EXACT, TokenInfluence.EXACT_BF16)


def native_bfloat16(device: str | torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively: a CPU with AVX512-BF16 or AMX
    (oneDNN's check), a CUDA device that supports bfloat16."""
    kind = torch.device(device).type
    try:
        if kind == "cpu":
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if kind == "cuda":
            return bool(torch.cuda.is_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    return False


def resolve_token_influence(rt: ModelRuntime, method: TokenInfluence) -> TokenInfluence:
    """The Eq. 8 method that actually runs: AUTO is EXACT_BF16 where that is both possible and
    fast, else EXACT; EXACT_BF16 runs as EXACT where it cannot change anything (no scope
    split, so no trunk to run in bfloat16, or a model not in float32, which autocast leaves
    alone). Possible and fast: a float32 model with a scope split on a device with native
    bfloat16 products (native_bfloat16)."""
    if method not in (TokenInfluence.AUTO, TokenInfluence.EXACT_BF16):
        return method
    possible = rt.split is not None and rt.task.dtype == torch.float32
    if method is TokenInfluence.EXACT_BF16:
        return method if possible else TokenInfluence.EXACT
    if possible and native_bfloat16(rt.task.device):
        return TokenInfluence.EXACT_BF16
    return TokenInfluence.EXACT


def word_attribution(
    rt: ModelRuntime, s_test: Tensor, enc: EncodedText, label: int,
    method: TokenInfluence = TokenInfluence.EXACT,
) -> list[float]:
    """Eq. 8 per word of `enc` labelled `label`: Σ_{t ∈ word} I(z, f) - I(z̃(t, UNK), f) -> [W]."""
    positions = enc.word_positions
    totals = [0.0] * len(enc.words)
    if not positions or method is TokenInfluence.NONE:
        return totals
    fn = (infl.token_influence_exact if method is TokenInfluence.EXACT
          else infl.token_influence_fast)
    per_token = fn(
        rt.task.logits_fn, rt.params, s_test, enc.embeds, enc.mask, label, rt.unk_embed,
        positions=positions,
    )  # [T]
    for t in positions:
        w = enc.word_ids[t]
        assert w is not None
        totals[w] += float(per_token[t])
    return totals


@dataclass
class WordAttribution:
    """Eq. 8 for one training example: words [W]; totals [W], Σ_{t ∈ word} I(z, f) −
    I(z̃(t, UNK), f); exact [W], True where the total is exact ([UNK] copies), False where it
    is the first-order estimate (core/scoring.token_influence_first_order_many: the
    FIRST_ORDER method, and the words top_words mode did not score exactly)."""

    words: list[str]
    totals: list[float]
    exact: list[bool]


def word_attributions(
    rt: ModelRuntime, s_test: Tensor, indices: Sequence[int],
    method: TokenInfluence = TokenInfluence.EXACT, *, max_tokens: int | None = None,
    memo: ScoreMemo | None = None, top_words: int = 0, keep_word: str | None = None,
) -> list[WordAttribution]:
    """Eq. 8 per word for each training example in `indices`, labelled with its own label.

    EXACT, top_words = 0: every word exact; every example's base and [UNK] copies scored
    together in batches of at most max_tokens padded tokens (core/scoring.token_influence_many;
    with the runtime's scope split the copies go through the trunk without tangent and the jvp
    through the scoped top only). EXACT, top_words = k > 0: the words are ranked by the
    first-order estimate (all examples in one double backward per batch), signed towards the
    example's influence when memo holds its score; only the k best and the words matching
    `keep_word` (same Porter stem: the explained word) are scored exactly, the others keep the
    estimate (exact False). FIRST_ORDER: the estimate for every word. Results accumulate in
    memo (by training index), so a word scored exactly once is not scored again. max_tokens
    None: core/scoring.batch_tokens_for the model's device. EXACT_BF16 is EXACT with the
    copies' trunk in bfloat16 (ScopeSplit.trunk_in); AUTO is resolved first
    (resolve_token_influence)."""
    from pairdots_server.influence.wordmatch import stem

    if max_tokens is None:
        max_tokens = batch_tokens_for(rt.task.device)
    known = memo.words if memo is not None else {}
    order = [int(i) for i in dict.fromkeys(int(i) for i in indices)]
    out: dict[int, WordAttribution] = {}
    method = resolve_token_influence(rt, method)
    trunk_precision = torch.bfloat16 if method is TokenInfluence.EXACT_BF16 else None
    if not method.exact:
        for i in order:
            if i in known:
                out[i] = known[i]
                continue
            e = encode_train_example(rt, i)
            totals = word_attribution(rt, s_test, e, rt.bundle.train[i].label, method)
            out[i] = WordAttribution(e.words, totals, [False] * len(totals))
    else:
        current: dict[int, WordAttribution | None] = {i: known.get(i) for i in order}
        encs = {i: encode_train_example(rt, i) for i in order
                if (att0 := current[i]) is None or not all(att0.exact)}
        if top_words > 0:
            fresh = [i for i in encs if current[i] is None]
            estimates = _first_order(rt, s_test, fresh, [encs[i] for i in fresh], max_tokens)
            current.update(zip(fresh, estimates, strict=True))
        keep = stem(keep_word) if keep_word else None
        need: dict[int, list[int]] = {}
        for i, e in encs.items():
            att = current[i]
            if top_words <= 0 or att is None:
                want = set(range(len(e.words)))
            else:
                score = memo.scores.get(i) if memo is not None else None
                sign = 0.0 if score is None else (1.0 if score >= 0 else -1.0)
                seen = [w for w in range(len(att.totals)) if e.pieces[w] > 0]
                est = att.totals
                key = [sign * est[w] if sign else abs(est[w]) for w in range(len(est))]
                ranked = sorted(seen, key=lambda w: (-key[w], w))
                want = set(ranked[:top_words])
                if keep is not None:
                    want |= {w for w, txt in enumerate(e.words) if stem(txt) == keep}
            have = {w for w, x in enumerate(att.exact) if x} if att is not None else set()
            missing = sorted(w for w in want - have if e.pieces[w] > 0)
            if missing or att is None:
                need[i] = missing
        exact_vals = _exact_words(rt, s_test, {i: encs[i] for i in need}, need, max_tokens,
                                  trunk_precision)
        for i, e in encs.items():
            att = current[i]
            totals = list(att.totals) if att is not None else [0.0] * len(e.words)
            flags = list(att.exact) if att is not None else [False] * len(e.words)
            for w, v in exact_vals.get(i, {}).items():
                totals[w] = v
                flags[w] = True
            flags = [f or e.pieces[w] == 0 for w, f in enumerate(flags)]  # unseen: exactly 0
            current[i] = WordAttribution(e.words, totals, flags)
        for i in order:
            att = current[i]
            assert att is not None
            out[i] = att
    if memo is not None:
        memo.words.update(out)
    return [out[int(i)] for i in indices]


def _first_order(
    rt: ModelRuntime, s_test: Tensor, ids: Sequence[int], encs: Sequence[EncodedText],
    max_tokens: int,
) -> list[WordAttribution]:
    """First-order Eq. 8 per word of the encoded training examples `ids` (exact False; words
    the model never saw are exactly 0)."""
    if not encs:
        return []
    rows = [Row(e.embeds[0], e.mask[0], rt.bundle.train[i].label)
            for i, e in zip(ids, encs, strict=True)]
    per_token = token_influence_first_order_many(
        rt.task.logits_fn, rt.params, s_test, rows, [e.word_positions for e in encs],
        rt.unk_embed, max_tokens=max_tokens,
    )  # [T_r] each
    out = []
    for e, vals in zip(encs, per_token, strict=True):
        totals = [0.0] * len(e.words)
        for t in e.word_positions:
            w = e.word_ids[t]
            assert w is not None
            totals[w] += float(vals[t])
        out.append(WordAttribution(e.words, totals, [p == 0 for p in e.pieces]))
    return out


def _exact_words(
    rt: ModelRuntime, s_test: Tensor, encs: dict[int, EncodedText],
    words: dict[int, list[int]], max_tokens: int, trunk_precision: torch.dtype | None = None,
) -> dict[int, dict[int, float]]:
    """Exact Eq. 8 totals of the given words of each training example: one [UNK] copy per
    token of those words, all copies batched -> {index: {word: total}}."""
    if not encs:
        return {}
    ids = list(encs)
    rows = [Row(encs[i].embeds[0], encs[i].mask[0], rt.bundle.train[i].label) for i in ids]
    positions = [[t for t in encs[i].word_positions if encs[i].word_ids[t] in set(words[i])]
                 for i in ids]
    trunk = None if rt.split is None else rt.split.trunk_in(trunk_precision)
    per_token = token_influence_many(
        rt.curvature_logits_fn, rt.params, s_test, rows, positions, rt.unk_embed,
        batch_size=max_tokens, max_tokens=max_tokens, trunk=trunk,
    )  # [T_r] each
    out: dict[int, dict[int, float]] = {}
    for i, pos, vals in zip(ids, positions, per_token, strict=True):
        totals = dict.fromkeys(words[i], 0.0)
        for t in pos:
            w = encs[i].word_ids[t]
            assert w is not None
            totals[w] += float(vals[t])
        out[i] = totals
    return out


def encode_train_example(rt: ModelRuntime, index: int) -> EncodedText:
    """Training example `index` encoded as one text."""
    return _row(rt.encode_train([index]), 0, rt.bundle.train[index].text)
