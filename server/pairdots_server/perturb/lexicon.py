"""WordNet synonyms (attack, paper §4.2) and synonyms + antonyms (repair, §4.3) for one word.

Lookup of a word w (lower-cased; SST-2 text is lower case):

1. POS: the optional hint ('n', 'v', 'a'/'s', 'r', the names noun/verb/adj/adv, or a Penn tag
   NN*/VB*/JJ*/RB*), else every POS in which WordNet knows w.
2. Lemmas: nltk-compatible morphy per POS: if w is in {pos}.exc only its listed bases are
   tried, else the detachment rules ("loved" -> "love", "movies" -> "movie"); w itself is
   tried too; forms that are not in index.{pos} are dropped.
3. Senses, in this order: POS by the tagged frequency of w's senses in that POS (sum of
   index.sense counts, ties n, v, a, r) — so "good" is read as an adjective first and "run"
   as a verb — then lemma order from morphy, then WordNet's sense order (most frequent first,
   as nltk's `wordnet.synsets`). The same synset reached twice is used once.
4. Candidates: synonyms are the other lemmas of each sense's synset; antonyms are the
   targets of the lexical '!' pointers from w's lemma in that synset (with
   `LexiconConfig.indirect_antonyms`, also the antonyms of the head adjective of a satellite
   synset, listed after all direct ones). A candidate keeps the position of its first sense;
   candidates of one synset are ordered by tagged count (nltk `Lemma.count()`), descending,
   ties alphabetical. Output is lower case (title/upper case of w is restored).
5. Filters: multi-word lemmas (WordNet writes them with '_') are dropped unless
   `LexiconConfig.multiword`, which renders them with spaces; the word itself, any of its
   lemmas, duplicates, stop words and non-words (digits, dots: "o.k.") are never returned.
6. Inflection (`LexiconConfig.inflect`, on by default): when w is an inflection of its
   lemma whose class is visible — a detachment rule (plural/3rd-person -s, -ed, -ing,
   adjective -er/-est), or an .exc form with such an ending ("running", "stopped",
   "happier"; every noun.exc form is a plural) — each substitute gets the same inflection:
   its irregular form from WordNet's .exc lists if it has one ("run" -> "running"), else the
   regular spelling rule ("adore" -> "adored") for nouns and verbs; adjectives only through
   the .exc lists. The inflected form is kept only if morphy maps it back to the
   substitute's lemma. Otherwise — and for inputs like "ran", "better", "worse" — the
   substitute is returned in its lemma form.

Which words attack/repair may substitute at all is perturb/vocabulary.py (is_substitutable).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pairdots_server.errors import InvalidArgument
from pairdots_server.perturb import inflection
from pairdots_server.perturb.vocabulary import STOP_WORDS, is_substitutable
from pairdots_server.perturb.wordnet_data import WordNetDB

SubstituteKind = Literal["synonym", "synonym_or_antonym"]
CandidateKind = Literal["synonym", "antonym"]

POS_ORDER: tuple[str, ...] = ("n", "v", "a", "r")

# Outputs may also contain spaces (multi-word lemmas, when enabled) and apostrophes ("ain't").
_OUTPUT_PATTERN = re.compile(r"^[a-z]+(?:[-' ][a-z]+)*$")

_POS_ALIASES: dict[str, str] = {
    "n": "n", "noun": "n",
    "v": "v", "verb": "v",
    "a": "a", "s": "a", "adj": "a", "adjective": "a",
    "r": "r", "adv": "r", "adverb": "r",
}  # fmt: skip
_PENN_PREFIX = (("NN", "n"), ("VB", "v"), ("JJ", "a"), ("RB", "r"))

def normalize_pos(pos: str | None) -> str | None:
    """Map a POS hint to WordNet's file POS n/v/a/r (None stays None).

    Accepts n v a s r, noun verb adj adjective adv adverb, and Penn tags NN* VB* JJ* RB*.
    """
    if pos is None:
        return None
    found = _POS_ALIASES.get(pos.lower())
    if found is not None:
        return found
    for prefix, wn_pos in _PENN_PREFIX:
        if pos.upper().startswith(prefix):
            return wn_pos
    raise InvalidArgument.for_field(
        "pos",
        f"unknown part of speech {pos!r}; use one of n, v, a, r (noun, verb, adj, adv), "
        "a Penn tag NN*/VB*/JJ*/RB*, or leave it unset",
    )


@dataclass(frozen=True)
class LexiconConfig:
    """How candidates are rendered.

    multiword: keep multi-word lemmas ("look_into" -> "look into"); off by default because a
        substitute then changes the token count of the example.
    inflect: re-inflect substitutes like the input word (see module docstring, step 6).
    indirect_antonyms: for adjective satellites, also the antonyms of the cluster head
        ("glad" is a satellite of "happy" -> "unhappy").
    """

    multiword: bool = False
    inflect: bool = True
    indirect_antonyms: bool = False

    def __post_init__(self) -> None:
        for name in ("multiword", "inflect", "indirect_antonyms"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgument.for_field(
                    f"lexicon.{name}", f"must be true or false, got {getattr(self, name)!r}"
                )


@dataclass(frozen=True)
class Sense:
    """One WordNet sense of the looked-up word: `base` is its lemma (morphy output), `rank`
    its 0-based position in index.{pos}, `offset` the synset's byte offset in data.{pos}."""

    pos: str
    base: str
    rank: int
    offset: int


@dataclass(frozen=True)
class Candidate:
    """A substitute: `text` as returned (inflected, lower case or the input's case), `lemma`
    the WordNet lemma (spaces for '_'), from which `sense` of the input it came."""

    text: str
    kind: CandidateKind
    lemma: str
    sense: Sense


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise InvalidArgument.for_field(
            "limit", f"must be a non-negative integer or unset, got {limit!r}"
        )


class Lexicon:
    """WordNet synonym/antonym lookup. Build with `Lexicon.load()` or `default_lexicon()`."""

    def __init__(self, db: WordNetDB, config: LexiconConfig | None = None) -> None:
        self.db = db
        self.config = config if config is not None else LexiconConfig()

    @classmethod
    def load(
        cls,
        data_dir: str | os.PathLike[str] | None = None,
        config: LexiconConfig | None = None,
    ) -> Lexicon:
        """Locate WordNet (data_dir -> $PAIRDOTS_WORDNET_DIR -> /usr/share/wordnet -> nltk
        data) and return a lexicon reading it lazily. Raises FailedPrecondition with the
        install commands when no WordNet is found."""
        return cls(WordNetDB.load(data_dir), config)

    @property
    def source(self) -> str:
        """Where the WordNet files were found."""
        return self.db.source.description

    is_substitutable = staticmethod(is_substitutable)

    # -- morphology ------------------------------------------------------------------------

    def morphy(self, word: str, pos: str) -> list[str]:
        """All lemmas of `word` in WordNet POS `pos` (nltk's `_morphy`, check_exceptions)."""
        wn_pos = normalize_pos(pos)
        assert wn_pos is not None
        form = word.lower().replace(" ", "_")
        index = self.db.index(wn_pos)
        exceptions = self.db.exceptions(wn_pos)
        if form in exceptions:
            forms = [form, *exceptions[form]]
        else:
            forms = [form] + [
                form[: len(form) - len(old)] + new
                for old, new, _ in inflection.RULES[wn_pos]
                if form.endswith(old)
            ]
        out: list[str] = []
        for f in forms:
            if f in index and f not in out:
                out.append(f)
        return out

    def _inflection_class(self, form: str, base: str, pos: str) -> str | None:
        """Which inflection turns `base` into `form`: a rule's class, or for .exc forms the
        class their suffix shows ("running" -> ing, "stopped" -> past, "happier" ->
        comparative, "children" -> plural); None when the same or not recognisable ("ran",
        "better", "worse")."""
        if form == base:
            return None
        if form in self.db.exceptions(pos):
            if pos == "n":
                return "plural"
            for suffix, cls in inflection.EXC_SUFFIXES.get(pos, ()):
                if form.endswith(suffix):
                    return cls
            return None
        for old, new, cls in inflection.RULES[pos]:
            if form.endswith(old) and form[: len(form) - len(old)] + new == base:
                return cls
        return None

    def _inflect(self, lemma: str, cls: str | None, pos: str) -> str:
        """`lemma` (spaces for '_') inflected as `cls`; the lemma itself when not possible."""
        if cls is None or not self.config.inflect:
            return lemma
        words = lemma.split(" ")
        if len(words) > 1 and pos not in ("n", "v"):
            return lemma
        head = 0 if pos == "v" else len(words) - 1  # "look into" -> "looked into"
        word = words[head]
        irregular = [f for f in self.db.reverse_exceptions(pos).get(word, ()) if f != word]
        suffix = {"3sg": "s", "past": "ed", "ing": "ing", "comparative": "er",
                  "superlative": "est"}.get(cls, "")  # fmt: skip
        choices = [f for f in irregular if f.endswith(suffix)] if suffix else list(irregular)
        if not choices and cls == "past":
            choices = [f for f in irregular if not f.endswith(("ing", "s"))]
        if choices:
            inflected = choices[0]
        elif pos in ("n", "v"):
            inflected = inflection.regular_inflection(word, cls)
        else:
            return lemma
        if word not in self.morphy(inflected, pos):
            return lemma
        words[head] = inflected
        return " ".join(words)

    # -- senses ----------------------------------------------------------------------------

    def senses(self, word: str, pos: str | None = None) -> list[Sense]:
        """The senses of `word` in lookup order (module docstring, steps 1-3)."""
        wn_pos = normalize_pos(pos)
        form = word.strip().lower().replace(" ", "_")
        if not form:
            return []
        per_pos: dict[str, list[Sense]] = {}
        for p in (wn_pos,) if wn_pos is not None else POS_ORDER:
            seen: set[int] = set()
            found: list[Sense] = []
            for base in self.morphy(form, p):
                for rank, offset in enumerate(self.db.index(p)[base]):
                    if offset not in seen:
                        seen.add(offset)
                        found.append(Sense(p, base, rank, offset))
            if found:
                per_pos[p] = found

        def weight(p: str) -> tuple[int, int]:
            tagged = sum(self.db.lemma_count(s.base, p, s.offset) for s in per_pos[p])
            return (-tagged, POS_ORDER.index(p))

        return [s for p in sorted(per_pos, key=weight) for s in per_pos[p]]

    # -- candidates ------------------------------------------------------------------------

    def _ranked(self, names: Iterable[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
        """(name, pos, offset) sorted by tagged count desc, then alphabetically."""
        return sorted(
            names, key=lambda t: (-self.db.lemma_count(t[0].lower(), t[1], t[2]), t[0].lower())
        )

    def _synonym_names(self, sense: Sense) -> list[tuple[str, str, int]]:
        record = self.db.synset(sense.pos, sense.offset)
        return self._ranked(
            (name, sense.pos, sense.offset) for name in record.lemmas if name.lower() != sense.base
        )

    def _antonym_names(self, sense: Sense, indirect: bool) -> list[tuple[str, str, int]]:
        record = self.db.synset(sense.pos, sense.offset)
        if not indirect:
            sources = [(record, i + 1) for i, n in enumerate(record.lemmas)
                       if n.lower() == sense.base]  # fmt: skip
        elif record.ss_type == "s":
            heads = [self.db.synset(p.pos, p.offset) for p in record.pointers if p.symbol == "&"]
            sources = [(h, i + 1) for h in heads for i in range(len(h.lemmas))]
        else:
            return []
        names: list[tuple[str, str, int]] = []
        for rec, word_number in sources:
            for ptr in rec.pointers:
                if ptr.symbol == "!" and ptr.source == word_number:
                    target = self.db.synset(ptr.pos, ptr.offset)
                    names.append((target.lemmas[ptr.target - 1], ptr.pos, ptr.offset))
        return self._ranked(names)

    def candidates(
        self,
        word: str,
        kind: CandidateKind,
        pos: str | None = None,
        limit: int | None = None,
    ) -> list[Candidate]:
        """Synonyms or antonyms of `word` with their provenance, in lookup order."""
        _check_limit(limit)
        if kind not in ("synonym", "antonym"):
            raise InvalidArgument.for_field("kind", f"must be 'synonym' or 'antonym', got {kind!r}")
        if not is_substitutable(word) or limit == 0:
            return []
        senses = self.senses(word, pos)
        form = word.strip().lower()
        wn_pos = normalize_pos(pos)
        excluded = {form} | {
            base.replace("_", " ")
            for p in ((wn_pos,) if wn_pos is not None else POS_ORDER)
            for base in self.morphy(form, p)
        }
        passes = [False]
        if kind == "antonym" and self.config.indirect_antonyms:
            passes.append(True)
        out: list[Candidate] = []
        seen: set[str] = set()
        for indirect in passes:
            for sense in senses:
                if kind == "synonym":
                    names = self._synonym_names(sense)
                else:
                    names = self._antonym_names(sense, indirect)
                cls = self._inflection_class(form, sense.base, sense.pos)
                for name, _, _ in names:
                    if "_" in name and not self.config.multiword:
                        continue
                    lemma = name.lower().replace("_", " ")
                    text = self._inflect(lemma, cls, sense.pos)
                    if (
                        text in seen
                        or text in excluded
                        or lemma in excluded
                        or text in STOP_WORDS
                        or not _OUTPUT_PATTERN.match(text)
                    ):
                        continue
                    seen.add(text)
                    out.append(Candidate(inflection.restore_case(word.strip(), text), kind, lemma, sense))
                    if limit is not None and len(out) >= limit:
                        return out
        return out

    def synonyms(self, word: str, pos: str | None = None, limit: int | None = None) -> list[str]:
        """WordNet synonyms of `word` (attack candidates), best first; [] when the word is not
        substitutable or unknown to WordNet."""
        return [c.text for c in self.candidates(word, "synonym", pos, limit)]

    def antonyms(self, word: str, pos: str | None = None, limit: int | None = None) -> list[str]:
        """WordNet antonyms of `word` (lexical '!' pointers), best first."""
        return [c.text for c in self.candidates(word, "antonym", pos, limit)]

    def substitutes(
        self,
        word: str,
        kind: SubstituteKind = "synonym",
        pos: str | None = None,
        limit: int | None = None,
    ) -> list[str]:
        """Substitutes for attack ("synonym") or repair ("synonym_or_antonym").

        For "synonym_or_antonym" the two lists are interleaved (antonym, synonym, antonym,
        ...; the rest of the longer list after) so that a `limit` keeps both kinds; antonyms
        lead because they are few and are what repair adds over the attack.
        """
        _check_limit(limit)
        if kind == "synonym":
            return self.synonyms(word, pos, limit)
        if kind != "synonym_or_antonym":
            raise InvalidArgument.for_field(
                "kind", f"must be 'synonym' or 'synonym_or_antonym', got {kind!r}"
            )
        ants = self.antonyms(word, pos, limit)
        syns = self.synonyms(word, pos, limit)
        merged: list[str] = []
        for i in range(max(len(ants), len(syns))):
            for group in (ants, syns):
                if i < len(group) and group[i] not in merged:
                    merged.append(group[i])
        return merged if limit is None else merged[:limit]


_DEFAULT: Lexicon | None = None
_DEFAULT_LOCK = threading.Lock()


def default_lexicon() -> Lexicon:
    """The process-wide lexicon over the default WordNet location (created once, cached)."""
    global _DEFAULT
    if _DEFAULT is None:
        with _DEFAULT_LOCK:
            if _DEFAULT is None:
                _DEFAULT = Lexicon.load()
    return _DEFAULT
