"""Which words attack and repair may substitute.

`is_substitutable(word)` is the gate: punctuation, numbers, stop words (the fixed list
STOP_WORDS below, no download), special tokens ([CLS], <s>, ...), word pieces ("##ing") and
anything that is not a plain (hyphenated) ASCII word are never substituted.
"""

from __future__ import annotations

import re

# nltk's English stop-word list (179 words), fixed here so nothing is downloaded, plus SST/PTB
# bracket tokens and contraction pieces.
STOP_WORDS: frozenset[str] = frozenset(
    """
    i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
    yourselves he him his himself she she's her hers herself it it's its itself they them their
    theirs themselves what which who whom this that that'll these those am is are was were be
    been being have has had having do does did doing a an the and but if or because as until
    while of at by for with about against between into through during before after above below
    to from up down in out on off over under again further then once here there when where why
    how all any both each few more most other some such no nor not only own same so than too
    very s t can will just don don't should should've now d ll m o re ve y ain aren aren't
    couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't
    ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't
    weren weren't won won't wouldn wouldn't
    n't 's 're 've 'll 'd 'm -lrb- -rrb- -lsb- -rsb- -lcb- -rcb-
    """.split()  # noqa: SIM905 - one readable word list
)

SPECIAL_TOKENS: frozenset[str] = frozenset(
    """
    [CLS] [SEP] [UNK] [PAD] [MASK] <s> </s> <unk> <pad> <mask> <cls> <sep> <|endoftext|>
    """.split()  # noqa: SIM905
)
_SPECIAL_PATTERN = re.compile(r"^(\[[A-Za-z_0-9]+\]|<[^<>\s]*>|<\|[^|]*\|>)$")
_WORD_PATTERN = re.compile(r"^[a-z]+(?:-[a-z]+)*$")


def is_substitutable(word: str) -> bool:
    """True iff attack/repair may replace `word`: a plain ASCII word (letters, inner hyphens),
    at least 2 letters, not a stop word, number, punctuation, special token or word piece."""
    if not word or word in SPECIAL_TOKENS or _SPECIAL_PATTERN.match(word):
        return False
    lowered = word.lower()
    if lowered in STOP_WORDS or len(lowered) < 2:
        return False
    return _WORD_PATTERN.match(lowered) is not None
