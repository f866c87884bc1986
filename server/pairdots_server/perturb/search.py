"""One edit of one training example: word substitution and the two-stage greedy search.

Influence of a training example z on the saliency score w of a test word (Eq. 5):
    I(z, w) = -s_testᵀ ∇θL(z),  s_test = H⁻¹ ∇θw.
Replacing z by z̃ changes it by (Eq. 6–7)
    I(z, z̃, w) = I(z̃, w) - I(z, w) = -s_testᵀ (∇θL(z̃) - ∇θL(z)).
Token influence (Eq. 8): I(x_t, w) = I(z, w) - I(z̃(t, UNK), w), summed over a word's pieces.

Two-stage greedy (Eq. 11–12) for an objective "maximise d · (I(z̃, w) - I(z, w))", d = ±1
(attack: z̃ REPLACES z, the measurement moves by ≈ (I(z̃, w) - I(z, w))/N), or, for repair,
"maximise d · I(z̃, w)" (z̃ is ADDED, the measurement moves by ≈ I(z̃, w)/N; `additive`):
  Eq. 11  the word t* of z whose removal moves I in the wanted direction the most: removing
          t changes I by ≈ -I(x_t, w), so t* = argmax_t  -d · I(x_t, w) over substitutable words;
  Eq. 12  the substitute s* = argmax_s d · I(z, z̃(t*, s), w), computed exactly (Eq. 7) for
          every perturbed text, not a first-order estimate.
T further words are drawn at random (seeded per training example) and their substitutes scored
the same way; the best of all candidates is kept, and only when it moves I the wanted way
(d · change > 0; additive: d · I(z̃, w) > 0). Multi-word edits (`max_words` m > 1): greedily,
each further step tries every remaining candidate word's substitutes on top of the
substitutions chosen so far and keeps the best only while it raises the objective.

`greedy_edits` searches many training examples at once: no per-example gradient anywhere;
I(z̃, w) = -⟨s_test, ∇θL(z̃)⟩ is a directional derivative of the loss, one jvp per batch of
texts (core/scoring), so Eq. 8's [UNK] copies of all the examples go through one pass and every
greedy step scores all the examples' substituted copies in one pass; the tracked margin is
scored only for the chosen edits.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pairdots_server.core.scoring import (
    Row,
    batch_tokens_for,
    influence_jvp,
    token_influence_many,
)
from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.runtime import EncodedExamples, ModelRuntime
from pairdots_server.perturb.lexicon import Lexicon
from pairdots_server.perturb.vocabulary import is_substitutable
from pairdots_server.storage.data import Example

StopFn = Callable[[], None]
RELATIONS = ("synonym", "antonym")


@dataclass(frozen=True)
class SearchSettings:
    """The greedy search (Eq. 11–12): `random_candidates` T random words besides the Eq. 11
    one (paper: 5), at most `max_substitutes` substitutes per word, the WordNet relations used
    ("synonym" for the attack, both for repair), per-example-gradient batch size, at most
    `max_words` substituted words per example (m), `pos_agreement` (substitutes only of the
    word's dominant part of speech whose own dominant part of speech is the same; see
    `dominant_pos`), whether the edited example is ADDED (repair: objective d · I(z̃, w))
    rather than replacing z (attack: d · (I(z̃, w) - I(z, w))), and at most `candidate_batch`
    training examples searched together (greedy_edits)."""

    random_candidates: int = 5
    max_substitutes: int = 10
    relations: tuple[str, ...] = ("synonym",)
    batch_size: int = 32
    max_words: int = 1
    additive: bool = False
    pos_agreement: bool = True
    candidate_batch: int = 16

    def __post_init__(self) -> None:
        if self.random_candidates < 0:
            raise ValueError(f"random_candidates must be >= 0, got {self.random_candidates}")
        if self.max_substitutes < 1:
            raise ValueError(f"max_substitutes must be >= 1, got {self.max_substitutes}")
        if not self.relations or any(r not in RELATIONS for r in self.relations):
            raise ValueError(f"relations must be a non-empty subset of {RELATIONS}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {self.max_words}")
        if self.candidate_batch < 1:
            raise ValueError(f"candidate_batch must be >= 1, got {self.candidate_batch}")


@dataclass(frozen=True)
class Substitution:
    """One word of a text (index into its words, character span) and its substitute."""

    word_index: int
    original_word: str
    substitute: str
    relation: str  # synonym | antonym
    span: tuple[int, int]


@dataclass(frozen=True)
class WordEdit:
    """Words of a text replaced: `new_text` keeps every other character of the text. The
    first substitution is the one the greedy search chose first (word_index ... relation)."""

    word_index: int
    original_word: str
    substitute: str
    relation: str  # synonym | antonym
    new_text: str
    substitutions: tuple[Substitution, ...] = ()


@dataclass(frozen=True)
class ScoredEdit:
    edit: WordEdit
    influence_before: float  # I(z, w)
    influence_after: float  # I(z̃, w)
    tracked_before: tuple[float, ...] = ()  # I(z, f_j) for the tracked measurements
    tracked_after: tuple[float, ...] = ()  # I(z̃, f_j)

    @property
    def change(self) -> float:
        return self.influence_after - self.influence_before


def substitute_word(text: str, span: tuple[int, int], substitute: str) -> str:
    """text with the characters text[start:end] replaced by `substitute`; nothing else moves."""
    start, end = span
    if not 0 <= start < end <= len(text):
        raise ValueError(f"span {span} is outside the text of length {len(text)}")
    return text[:start] + substitute + text[end:]


def substitute_words(text: str, subs: Sequence[Substitution]) -> str:
    """text with every substitution's span replaced (spans of the original text, disjoint)."""
    out = text
    for sub in sorted(subs, key=lambda x: x.span[0], reverse=True):
        out = substitute_word(out, sub.span, sub.substitute)
    return out


def score_texts_multi(
    rt: ModelRuntime, s_tests: Tensor, texts: Sequence[str], labels: Sequence[int],
    batch_size: int = 32, should_stop: StopFn = steps.no_stop,
) -> Tensor:
    """I(z_i, f_j) = -⟨s_test_j, ∇θL(z_i)⟩ (Eq. 5) for labelled texts and several s_tests:
    s_tests [J,P] -> [N,J] (float64). No per-example gradient: each batch is encoded once and
    scored by one jvp per s_test (core/scoring.influence_jvp, a directional derivative of the
    per-example losses); texts are batched in order of length (little padding). With the
    runtime's scope split each batch goes through the trunk once (no tangent) and only the
    scoped top is differentiated, once per s_test."""
    out = torch.zeros(len(texts), s_tests.shape[0], dtype=torch.float64)
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    for b in range(0, len(order), batch_size):
        should_stop()
        chunk = order[b : b + batch_size]
        batch = rt.text_batch([texts[i] for i in chunk], [labels[i] for i in chunk])
        idx = torch.tensor(chunk, dtype=torch.long)
        for j in range(s_tests.shape[0]):
            out[idx, j] = influence_jvp(rt.curvature_logits_fn, rt.params, s_tests[j],
                                        batch.embeds, batch.mask, batch.labels).double().cpu()
    return out


def dominant_pos(lexicon: Lexicon, word: str) -> str | None:
    """The word's most frequent part of speech in WordNet ('n', 'v', 'a', 'r'; adjective
    satellites count as 'a'): the POS of its first sense, senses being ordered by the
    SemCor-tagged counts of each POS (Lexicon.senses). None when WordNet does not know it.
    No context is used: there is no offline POS tagger (nltk's needs a download)."""
    senses = lexicon.senses(word)
    if not senses:
        return None
    return "a" if senses[0].pos == "s" else senses[0].pos


def pos_mismatch(lexicon: Lexicon, word: str, substitute: str) -> bool:
    """The simple fluency check: the substitute's dominant POS differs from the word's."""
    a, b = dominant_pos(lexicon, word), dominant_pos(lexicon, substitute)
    return a is not None and b is not None and a != b


def word_substitutes(
    lexicon: Lexicon, word: str, relations: Sequence[str], limit: int,
    pos_agreement: bool = False,
) -> list[tuple[str, str]]:
    """(substitute, relation) pairs for `word`, antonyms first when asked for (they are few),
    then synonyms; at most `limit`; [] when the word is never substituted. `pos_agreement`:
    only senses of the word's dominant POS, and no substitute that `pos_mismatch` flags."""
    if not is_substitutable(word):
        return []
    pos = dominant_pos(lexicon, word) if pos_agreement else None
    out: list[tuple[str, str]] = []
    for rel in ("antonym", "synonym"):
        if rel not in relations:
            continue
        subs = lexicon.antonyms(word, pos) if rel == "antonym" else lexicon.synonyms(word, pos)
        if pos_agreement:
            subs = [x for x in subs if not pos_mismatch(lexicon, word, x)]
        out.extend((s, rel) for s in subs if s != word)
    seen: set[str] = set()
    unique = [(s, r) for s, r in out if not (s in seen or seen.add(s))]  # type: ignore[func-returns-value]
    if len(relations) > 1:  # keep both kinds under the limit: alternate antonym / synonym
        ants = [p for p in unique if p[1] == "antonym"]
        syns = [p for p in unique if p[1] == "synonym"]
        unique = [p for pair in zip(ants, syns) for p in pair]
        unique += ants[len(syns):] + syns[len(ants):]
    return unique[:limit]


@dataclass
class _Search:
    """The greedy search's state for one training example (greedy_edits)."""

    example: Example
    words: list[str]
    spans: list[tuple[int, int]]
    subs: dict[int, list[tuple[str, str]]]
    candidates: list[int] = field(default_factory=list)  # Eq. 11's word, then T random
    best: list[Substitution] = field(default_factory=list)
    best_value: float = 0.0  # the objective d · (I(z̃) - I(z)) or d · I(z̃)
    best_score: float = 0.0  # I(z̃, f)
    best_text: str = ""
    base: float | None = None  # I(z, f)
    active: bool = True

    def options(self) -> list[list[Substitution]]:
        """Every remaining candidate word's substitutes on top of the chosen ones."""
        taken = {c.word_index for c in self.best}
        return [
            [*self.best, Substitution(wi, self.words[wi], sub, rel, self.spans[wi])]
            for wi in self.candidates if wi not in taken for sub, rel in self.subs[wi]
        ]


def _substituted(text: str, option: Sequence[Substitution]) -> str:
    first = option[0]
    return (substitute_word(text, first.span, first.substitute) if len(option) == 1
            else substitute_words(text, option))


def _eq11_words(rt: ModelRuntime, s_test: Tensor, direction: int, states: Sequence[_Search],
                enc: EncodedExamples, need: Sequence[int], max_tokens: int) -> None:
    """Eq. 8 for the substitutable words of the examples `need` (indices into states / enc),
    every example's base and [UNK] copies in one core/scoring.token_influence_many pass, then
    Eq. 11's word first in each one's candidate list (with the runtime's scope split the copies
    go through the trunk without tangent and the jvp through the scoped top only)."""
    rows, positions = [], []
    for b in need:
        n = int(enc.mask[b].sum())
        rows.append(Row(enc.embeds[b, :n], enc.mask[b, :n], states[b].example.label))
        positions.append([t for t, w in enumerate(enc.word_ids[b][:n])
                          if w is not None and w in states[b].subs])
    trunk = None if rt.split is None else rt.split.trunk
    per_token = token_influence_many(rt.curvature_logits_fn, rt.params, s_test, rows, positions,
                                     rt.unk_embed, batch_size=max_tokens, max_tokens=max_tokens,
                                     trunk=trunk)
    for b, pos, vals in zip(need, positions, per_token, strict=True):
        totals = dict.fromkeys(states[b].subs, 0.0)
        for t in pos:
            w = enc.word_ids[b][t]
            assert w is not None
            totals[w] += float(vals[t])
        # removing t moves I by ≈ -I(x_t, f): t* = argmax_t -d · I(x_t, f)
        states[b].candidates = [max(totals, key=lambda w: (-direction * totals[w], -w))]


def greedy_edits(
    rt: ModelRuntime,
    s_test: Tensor,
    examples: Sequence[Example],
    direction: int,
    lexicon: Lexicon,
    search: SearchSettings,
    rngs: Sequence[random.Random],
    should_stop: StopFn | None = None,
    *,
    track: Tensor | None = None,
    max_tokens: int | None = None,
) -> list[ScoredEdit | None]:
    """For each training example, its best substitution of up to `search.max_words` words for
    the objective d · (I(z̃, f) - I(z, f)) (replacing z), or d · I(z̃, f) when
    `search.additive` (adding z̃); rngs[k] draws example k's T random words.

    Batched across the examples: Eq. 8 for every example's substitutable words in one pass
    (skipped for an example with at most T + 1 substitutable words, which are then all tried:
    Eq. 11's choice cannot change the candidate set), then per greedy step ONE scoring pass
    (one jvp per batch) over every example's substituted copies and bases (Eq. 12, exact Eq. 7),
    and, for the chosen edits only, one pass with the `track` s_tests [J,P] (I(z, ·), I(z̃, ·)).
    None for an example with no substitutable word, or no candidate of positive objective.
    max_tokens: padded tokens per Eq. 8 batch (None: core/scoring.batch_tokens_for the
    model's device).
    """
    if max_tokens is None:
        max_tokens = batch_tokens_for(rt.task.device)
    if direction not in (-1, 1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    if len(rngs) != len(examples):
        raise ValueError(f"{len(examples)} examples but {len(rngs)} rngs")
    stop = should_stop or steps.no_stop
    if not examples:
        return []
    enc = rt.encode_texts([e.text for e in examples], [e.label for e in examples])
    states: list[_Search] = []
    for b, ex in enumerate(examples):
        pieces = enc.pieces(b)
        subs: dict[int, list[tuple[str, str]]] = {}
        for wi, word in enumerate(enc.words[b]):
            if pieces[wi] == 0:
                continue
            cands = word_substitutes(lexicon, word, search.relations, search.max_substitutes,
                                     search.pos_agreement)
            if cands:
                subs[wi] = cands
        states.append(_Search(ex, enc.words[b], enc.spans[b], subs, best_text=ex.text,
                              active=bool(subs)))
    need: list[int] = []
    for b, st in enumerate(states):
        if not st.active:
            continue
        others = sorted(st.subs)
        if len(others) > 1 + search.random_candidates:
            need.append(b)
        else:
            st.candidates = others  # every word is a candidate; Eq. 11 cannot change the set
    if need:
        stop()
        _eq11_words(rt, s_test, direction, states, enc, need, max_tokens)
        for b in need:
            st = states[b]
            rest = sorted(w for w in st.subs if w != st.candidates[0])
            rngs[b].shuffle(rest)
            st.candidates += rest[: search.random_candidates]
    for _ in range(search.max_words):
        texts: list[str] = []
        labels: list[int] = []
        plan: list[tuple[_Search, list[list[Substitution]], int, bool]] = []
        for st in states:
            if not st.active:
                continue
            opts = st.options()
            if not opts:
                st.active = False
                continue
            lead = st.base is None
            plan.append((st, opts, len(texts), lead))
            if lead:
                texts.append(st.example.text)
                labels.append(st.example.label)
            texts += [_substituted(st.example.text, o) for o in opts]
            labels += [st.example.label] * len(opts)
        if not plan:
            break
        scores = score_texts_multi(rt, s_test[None], texts, labels, search.batch_size,
                                   stop)[:, 0].tolist()
        for st, opts, at, lead in plan:
            if lead:
                st.base, at = scores[at], at + 1
            assert st.base is not None
            ref = 0.0 if search.additive else st.base
            values = [direction * (scores[at + k] - ref) for k in range(len(opts))]
            k = max(range(len(opts)), key=lambda k: (values[k], -k))  # Eq. 12
            if not values[k] > st.best_value:
                st.active = False
                continue
            st.best, st.best_value, st.best_score = opts[k], values[k], scores[at + k]
            st.best_text = texts[at + k]
    chosen = [st for st in states if st.best]
    tracked: dict[int, tuple[list[float], list[float]]] = {}
    if track is not None and chosen:
        pairs = [t for st in chosen for t in (st.example.text, st.best_text)]
        rows = score_texts_multi(rt, track.to(s_test), pairs,
                                 [st.example.label for st in chosen for _ in (0, 1)],
                                 search.batch_size, stop)  # [2K, J]
        for k, st in enumerate(chosen):
            tracked[id(st)] = (rows[2 * k].tolist(), rows[2 * k + 1].tolist())
    out: list[ScoredEdit | None] = []
    for st in states:
        if not st.best or st.base is None:
            out.append(None)
            continue
        first = st.best[0]
        edit = WordEdit(first.word_index, first.original_word, first.substitute,
                        first.relation, st.best_text, tuple(st.best))
        before, after = tracked.get(id(st), ([], []))
        out.append(ScoredEdit(edit, st.base, st.best_score, tuple(before), tuple(after)))
    return out


def random_edit(
    rt: ModelRuntime,
    example: Example,
    lexicon: Lexicon,
    relations: Sequence[str],
    rng: random.Random,
    max_substitutes: int = 10,
    pos_agreement: bool = True,
) -> WordEdit | None:
    """The random baseline: a random substitutable word (the model saw) and a random one of
    its substitutes (the same candidate set as the greedy search). None when the example has
    no substitutable word."""
    enc = steps.encode_text(rt, example.text)
    choices = [
        (wi, cands) for wi, word in enumerate(enc.words)
        if enc.pieces[wi] > 0
        and (cands := word_substitutes(lexicon, word, relations, max_substitutes,
                                       pos_agreement))
    ]
    if not choices:
        return None
    wi, cands = choices[rng.randrange(len(choices))]
    sub, rel = cands[rng.randrange(len(cands))]
    one = Substitution(wi, enc.words[wi], sub, rel, enc.spans[wi])
    return WordEdit(
        wi, enc.words[wi], sub, rel, substitute_word(example.text, enc.spans[wi], sub), (one,)
    )
