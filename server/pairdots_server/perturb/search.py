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
  Eq. 12  the substitute s* = argmax_s d · I(z, z̃(t*, s), w), computed exactly with per-example
          gradients of every perturbed text in one batch (Eq. 7), not a first-order estimate.
T further words are drawn at random (seeded) and their substitutes scored the same way; the best
of all candidates is kept, and only when it moves I the wanted way (d · change > 0; additive:
d · I(z̃, w) > 0). Multi-word edits (`max_words` m > 1): greedily, each further step tries every
remaining candidate word's substitutes on top of the substitutions chosen so far and keeps the
best only while it raises the objective.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pairdots_server.core.grads import per_example_loss_grads
from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.runtime import ModelRuntime
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
    `dominant_pos`), and whether the edited example is ADDED
    (repair: objective d · I(z̃, w)) rather than replacing z (attack: d · (I(z̃, w) - I(z, w)))."""

    random_candidates: int = 5
    max_substitutes: int = 10
    relations: tuple[str, ...] = ("synonym",)
    batch_size: int = 32
    max_words: int = 1
    additive: bool = False
    pos_agreement: bool = True

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
    """I(z_i, f_j) = -∇θL(z_i) · s_test_j (Eq. 5) for labelled texts and several s_tests at
    once, one per-example-gradient pass: s_tests [J,P] -> [N,J] (float64)."""
    out: list[Tensor] = []
    for b in range(0, len(texts), batch_size):
        should_stop()
        enc = rt.encode_texts(texts[b : b + batch_size], labels[b : b + batch_size])
        g = per_example_loss_grads(rt.task.logits_fn, rt.params, enc.embeds, enc.mask,
                                   enc.labels)  # [B,P]
        out.append((-(g @ s_tests.to(g.dtype).T)).double().cpu())  # [B,J]
    return torch.cat(out) if out else torch.zeros(0, s_tests.shape[0], dtype=torch.float64)


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


def greedy_edit(
    rt: ModelRuntime,
    s_test: Tensor,
    example: Example,
    direction: int,
    lexicon: Lexicon,
    search: SearchSettings,
    rng: random.Random,
    should_stop: StopFn | None = None,
    *,
    track: Tensor | None = None,
) -> ScoredEdit | None:
    """Best substitution of up to `search.max_words` words of `example` for the objective
    d · (I(z̃, w) - I(z, w)) (replacing z), or d · I(z̃, w) when `search.additive` (adding z̃).

    Eq. 11 picks the word, Eq. 12 the substitute (exact Eq. 7 over a batch of perturbed
    texts), plus `search.random_candidates` random words; each further word is the best
    remaining one on top of those chosen, kept only while the objective rises. `track` [J,P]:
    further s_tests whose I(z, ·) and I(z̃, ·) are returned (same gradient pass). None when no
    substitutable word has a substitute or no candidate has a positive objective.
    """
    if direction not in (-1, 1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    stop = should_stop or steps.no_stop
    enc = steps.encode_text(rt, example.text)
    subs: dict[int, list[tuple[str, str]]] = {}
    for wi, word in enumerate(enc.words):
        if enc.pieces[wi] == 0:
            continue
        cands = word_substitutes(lexicon, word, search.relations, search.max_substitutes,
                                 search.pos_agreement)
        if cands:
            subs[wi] = cands
    if not subs:
        return None
    totals = steps.word_attribution(rt, s_test, enc, example.label)  # Eq. 8 per word
    greedy = max(subs, key=lambda w: (-direction * totals[w], -w))  # Eq. 11
    others = sorted(w for w in subs if w != greedy)
    rng.shuffle(others)
    words = [greedy] + others[: search.random_candidates]
    s_all = s_test[None] if track is None else torch.cat([s_test[None], track.to(s_test)])

    def options(chosen: list[Substitution]) -> list[list[Substitution]]:
        taken = {c.word_index for c in chosen}
        return [
            [*chosen, Substitution(wi, enc.words[wi], sub, rel, enc.spans[wi])]
            for wi in words if wi not in taken for sub, rel in subs[wi]
        ]

    best: list[Substitution] = []
    best_value, best_row, best_text = 0.0, None, example.text
    base_row: Tensor | None = None
    for _ in range(search.max_words):
        opts = options(best)
        if not opts:
            break
        texts = [substitute_word(example.text, o[0].span, o[0].substitute) if len(o) == 1
                 else substitute_words(example.text, o) for o in opts]
        lead = [example.text] if base_row is None else []
        rows = score_texts_multi(rt, s_all, lead + texts, [example.label] * (len(lead)
                                 + len(texts)), search.batch_size, stop)  # [(1+)K, J]
        if base_row is None:
            base_row, rows = rows[0], rows[1:]
        base = float(base_row[0])
        values = [direction * (float(r[0]) - (0.0 if search.additive else base))
                  for r in rows]
        k = max(range(len(opts)), key=lambda k: (values[k], -k))  # Eq. 12
        if not values[k] > best_value:
            break
        best, best_value, best_row, best_text = opts[k], values[k], rows[k], texts[k]
    if best_row is None or base_row is None:
        return None
    first = best[0]
    edit = WordEdit(first.word_index, first.original_word, first.substitute, first.relation,
                    best_text, tuple(best))
    return ScoredEdit(edit, float(base_row[0]), float(best_row[0]),
                      tuple(float(v) for v in base_row[1:]),
                      tuple(float(v) for v in best_row[1:]))


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
