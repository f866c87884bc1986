"""Which training examples contain a word: the presence test of word-level pairing.

Two words match when their Porter stems are equal ("loved" ~ "love" ~ "loving"; nltk's
PorterStemmer needs no data files). `WordIndex` maps each stem to the training examples whose
words carry it, so the examples containing a test word are one dictionary lookup.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


@lru_cache(maxsize=1)
def _stemmer():  # type: ignore[no-untyped-def]
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """Porter stem of the lower-cased word (punctuation-only words stem to themselves)."""
    w = word.lower()
    return str(_stemmer().stem(w)) if _WORD.fullmatch(w) else w


def words_of(text: str) -> list[str]:
    """Lower-cased alphanumeric words of a text (apostrophes/hyphens inside a word kept)."""
    return _WORD.findall(text.lower())


class WordIndex:
    """stem -> sorted training indices whose text contains a word with that stem."""

    def __init__(self, texts: Sequence[str]) -> None:
        postings: dict[str, set[int]] = {}
        for i, text in enumerate(texts):
            for w in set(words_of(text)):
                postings.setdefault(stem(w), set()).add(i)
        self._postings = {k: sorted(v) for k, v in postings.items()}
        self.size = len(texts)

    def containing(self, word: str) -> list[int]:
        """Training indices that contain `word` or another form with the same stem."""
        return self._postings.get(stem(word), [])

    def containing_any(self, words: Iterable[str]) -> list[int]:
        out: set[int] = set()
        for w in words:
            out.update(self.containing(w))
        return sorted(out)
