"""Word-level pipeline steps: each word's contribution to the margin, the words to explain by
it, and the training examples that contain a word (influence/pipeline.py has the others).

  word_contribution       c_w = m_y(x) − m_y(x with w's pieces → [UNK]) of every word
  top_contributing_words  the m words with the largest signed c_w (letters or digits only)
  examples_containing     training indices whose text has a word with w's Porter stem
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

from pairdots_server.core.measure import word_occlusion
from pairdots_server.influence.pipeline import EncodedText
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.wordmatch import WordIndex, words_of


def word_contribution(rt: ModelRuntime, enc: EncodedText, label: int) -> list[float]:
    """c_w = m_y(x) − m_y(x with w → [UNK]) of every word (core/measure.py) -> [W]."""
    c = word_occlusion(
        rt.task.logits_fn, rt.params, enc.embeds, enc.mask, label, enc.word_ids,
        len(enc.words), rt.unk_embed,
    )  # [W]
    return [float(v) for v in c]


def top_contributing_words(
    contribution: Sequence[float], words: Sequence[str], pieces: Sequence[int], m: int
) -> list[int]:
    """The m words with the largest signed contribution c_w to the label's margin, among the
    words the model saw that have a letter or digit (punctuation is left out of the automatic
    choice; name it in word_positions to explain it)."""
    order = sorted(
        (i for i in range(len(contribution)) if pieces[i] > 0 and words_of(words[i])),
        key=lambda i: (-contribution[i], i),
    )
    return order[:m]


_WORD_INDEXES: weakref.WeakKeyDictionary[ModelRuntime, WordIndex] = weakref.WeakKeyDictionary()
_WORD_INDEX_LOCK = threading.Lock()


def examples_containing(rt: ModelRuntime, word: str) -> list[int]:
    """Training indices whose text contains `word` or another form with its Porter stem
    (influence/wordmatch.py); the index over the training texts is built once per model."""
    with _WORD_INDEX_LOCK:
        index = _WORD_INDEXES.get(rt)
        if index is None:
            index = WordIndex([ex.text for ex in rt.bundle.train])
            _WORD_INDEXES[rt] = index
    return index.containing(word)
