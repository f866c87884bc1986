"""One edit of one training example: word substitution and the two-stage greedy search.

Influence of a training example z on the saliency score w of a test word (Eq. 5):
    I(z, w) = -s_testᵀ ∇θL(z),  s_test = H⁻¹ ∇θw.
Replacing z by z̃ changes it by (Eq. 6–7)
    I(z, z̃, w) = I(z̃, w) - I(z, w) = -s_testᵀ (∇θL(z̃) - ∇θL(z)).
Token influence (Eq. 8): I(x_t, w) = I(z, w) - I(z̃(t, UNK), w), summed over a word's pieces.

Two-stage greedy (Eq. 11–12) for an objective "maximise d · (I(z̃, w) - I(z, w))", d = ±1:
  Eq. 11  the word t* of z whose removal moves I in the wanted direction the most: removing
          t changes I by ≈ -I(x_t, w), so t* = argmax_t  -d · I(x_t, w) over substitutable words;
  Eq. 12  the substitute s* = argmax_s d · I(z, z̃(t*, s), w), computed exactly with per-example
          gradients of every perturbed text in one batch (Eq. 7), not a first-order estimate.
T further words are drawn at random (seeded) and their substitutes scored the same way; the best
of all candidates is kept, and only when it moves I the wanted way (d · change > 0).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

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
    ("synonym" for the attack, both for repair), per-example-gradient batch size."""

    random_candidates: int = 5
    max_substitutes: int = 10
    relations: tuple[str, ...] = ("synonym",)
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.random_candidates < 0:
            raise ValueError(f"random_candidates must be >= 0, got {self.random_candidates}")
        if self.max_substitutes < 1:
            raise ValueError(f"max_substitutes must be >= 1, got {self.max_substitutes}")
        if not self.relations or any(r not in RELATIONS for r in self.relations):
            raise ValueError(f"relations must be a non-empty subset of {RELATIONS}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class WordEdit:
    """One word of a text replaced: `new_text` keeps every other character of the text."""

    word_index: int
    original_word: str
    substitute: str
    relation: str  # synonym | antonym
    new_text: str


@dataclass(frozen=True)
class ScoredEdit:
    edit: WordEdit
    influence_before: float  # I(z, w)
    influence_after: float  # I(z̃, w)

    @property
    def change(self) -> float:
        return self.influence_after - self.influence_before


def substitute_word(text: str, span: tuple[int, int], substitute: str) -> str:
    """text with the characters text[start:end] replaced by `substitute`; nothing else moves."""
    start, end = span
    if not 0 <= start < end <= len(text):
        raise ValueError(f"span {span} is outside the text of length {len(text)}")
    return text[:start] + substitute + text[end:]


def word_substitutes(
    lexicon: Lexicon, word: str, relations: Sequence[str], limit: int
) -> list[tuple[str, str]]:
    """(substitute, relation) pairs for `word`, antonyms first when asked for (they are few),
    then synonyms; at most `limit`; [] when the word is never substituted."""
    if not is_substitutable(word):
        return []
    out: list[tuple[str, str]] = []
    for rel in ("antonym", "synonym"):
        if rel not in relations:
            continue
        subs = lexicon.antonyms(word) if rel == "antonym" else lexicon.synonyms(word)
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
) -> ScoredEdit | None:
    """Best single-word substitution of `example` for maximising d · (I(z̃, w) - I(z, w)).

    Eq. 11 picks the word, Eq. 12 the substitute (exact Eq. 7 over a batch of perturbed
    texts), plus `search.random_candidates` random words. None when no substitutable word
    has a substitute or no candidate moves I in direction d.
    """
    if direction not in (-1, 1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    enc = steps.encode_text(rt, example.text)
    subs: dict[int, list[tuple[str, str]]] = {}
    for wi, word in enumerate(enc.words):
        if enc.pieces[wi] == 0:
            continue
        cands = word_substitutes(lexicon, word, search.relations, search.max_substitutes)
        if cands:
            subs[wi] = cands
    if not subs:
        return None
    totals = steps.word_attribution(rt, s_test, enc, example.label)  # Eq. 8 per word
    greedy = max(subs, key=lambda w: (-direction * totals[w], -w))  # Eq. 11
    others = sorted(w for w in subs if w != greedy)
    rng.shuffle(others)
    words = [greedy] + others[: search.random_candidates]
    candidates = [
        WordEdit(wi, enc.words[wi], sub, rel, substitute_word(example.text, enc.spans[wi], sub))
        for wi in words
        for sub, rel in subs[wi]
    ]
    texts = [example.text] + [c.new_text for c in candidates]
    scores = steps.score_texts(
        rt, s_test, texts, [example.label] * len(texts), search.batch_size,
        should_stop or steps.no_stop,
    )  # [1+K]
    base = float(scores[0])
    changes = [float(s) - base for s in scores[1:].tolist()]
    best = max(range(len(candidates)), key=lambda k: (direction * changes[k], -k))  # Eq. 12
    if not direction * changes[best] > 0:
        return None
    return ScoredEdit(candidates[best], base, base + changes[best])


def random_edit(
    rt: ModelRuntime,
    example: Example,
    lexicon: Lexicon,
    relations: Sequence[str],
    rng: random.Random,
    max_substitutes: int = 10,
) -> WordEdit | None:
    """The random baseline: a random substitutable word (the model saw) and a random one of
    its substitutes. None when the example has no substitutable word."""
    enc = steps.encode_text(rt, example.text)
    choices = [
        (wi, cands) for wi, word in enumerate(enc.words)
        if enc.pieces[wi] > 0
        and (cands := word_substitutes(lexicon, word, relations, max_substitutes))
    ]
    if not choices:
        return None
    wi, cands = choices[rng.randrange(len(choices))]
    sub, rel = cands[rng.randrange(len(cands))]
    return WordEdit(
        wi, enc.words[wi], sub, rel, substitute_word(example.text, enc.spans[wi], sub)
    )
