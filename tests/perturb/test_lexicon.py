"""Tests for perturb/lexicon.py + perturb/wordnet_data.py against the real WordNet 3.0 files.

The direct wndb reader is cross-checked against nltk's WordNetCorpusReader, built from a copy of
the same files in a temporary nltk data dir (docs/DESIGN.md §4 recipe: copy files into
<dir>/corpora/wordnet/, write `lexnames` from the lexnames(5WN) man page table).
"""

from __future__ import annotations

import gzip
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pairdots_server.errors import FailedPrecondition, InvalidArgument
from pairdots_server.perturb import inflection
from pairdots_server.perturb.lexicon import Lexicon, LexiconConfig, default_lexicon, normalize_pos
from pairdots_server.perturb.vocabulary import STOP_WORDS, is_substitutable
from pairdots_server.perturb.wordnet_data import ENV_VAR, REQUIRED_FILES, WordNetDB

SYSTEM_WN = Path("/usr/share/wordnet")
LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")

# Words for the nltk cross-check: SST-2-like vocabulary, inflections (regular and .exc),
# multi-POS words, satellites, two-lemma forms ("axes": axe/axis).
CROSS_WORDS = [
    "good", "bad", "loved", "love", "happy", "unhappy", "run", "running", "ran", "movies",
    "film", "better", "best", "children", "funny", "funnier", "boring", "stopped", "glad",
    "hated", "axes", "well", "fast", "light", "cold", "dull", "great", "beautiful", "story",
    "acting", "plot", "characters", "laughs", "worst", "mess", "thriller", "heart", "smart",
    "entertaining", "wonderful", "terrible", "lives", "saw", "leaves", "brilliant", "slow",
]  # fmt: skip


@pytest.fixture(scope="module")
def lex() -> Lexicon:
    return Lexicon.load()


# The 45 lexicographer files of WordNet 3.0 in file-number order (lexnames(5WN)); used when
# the man page is absent (Docker images often drop /usr/share/man).
_LEXNAMES_30_TEXT = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
)
LEXNAMES_30 = _LEXNAMES_30_TEXT.split()


def _lexnames_rows() -> list[tuple[int, str]]:
    """(file number, name) from the table in lexnames(5WN), else the WordNet 3.0 constant."""
    if not LEXNAMES_MAN.is_file():
        return list(enumerate(LEXNAMES_30))
    rows = []
    with gzip.open(LEXNAMES_MAN, "rt") as fh:
        for line in fh:
            m = re.match(r"^(\d\d)\t([a-z]+\.[A-Za-z]+)\s*\t", line)
            if m:
                rows.append((int(m.group(1)), m.group(2)))
    return rows


def test_lexnames_table() -> None:
    assert _lexnames_rows() == list(enumerate(LEXNAMES_30))


def _write_lexnames(target: Path) -> None:
    """nltk's `lexnames`: NN<TAB>name<TAB>category (1 noun, 2 verb, 3 adj, 4 adv)."""
    category = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
    target.write_text(
        "".join(
            f"{n:02d}\t{name}\t{category[name.split('.')[0]]}\n" for n, name in _lexnames_rows()
        )
    )


@pytest.fixture(scope="module")
def nltk_wn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """nltk's WordNet reader over a copy of /usr/share/wordnet (reference implementation)."""
    import nltk.data  # type: ignore[import-untyped]
    from nltk.corpus.reader.wordnet import WordNetCorpusReader  # type: ignore[import-untyped]

    data_root = tmp_path_factory.mktemp("nltk_data")
    wn_dir = data_root / "corpora" / "wordnet"
    wn_dir.mkdir(parents=True)
    for f in SYSTEM_WN.iterdir():
        if f.is_file():
            shutil.copyfile(f, wn_dir / f.name)
    _write_lexnames(wn_dir / "lexnames")
    nltk.data.path.insert(0, str(data_root))
    try:
        with pytest.warns(UserWarning, match="multilingual"):
            reader = WordNetCorpusReader(nltk.data.find("corpora/wordnet"), None)
        yield reader
    finally:
        nltk.data.path.remove(str(data_root))


# -- is_substitutable ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "word",
    [",", ".", "!", "--", "...", "'", "(", "-lrb-", "-rrb-", "3", "1990", "2nd", "3.5",
     "the", "a", "not", "n't", "'s", "and", "is", "The", "NOT", "don't",
     "[CLS]", "[SEP]", "[UNK]", "[PAD]", "[MASK]", "<s>", "</s>", "<unk>", "<pad>", "<mask>",
     "[unused7]", "<|endoftext|>", "##ing", "", " ", "x", "café", "good movie"],
)  # fmt: skip
def test_not_substitutable(word: str, lex: Lexicon) -> None:
    assert not is_substitutable(word)
    assert lex.synonyms(word) == []
    assert lex.antonyms(word) == []
    assert lex.substitutes(word, "synonym_or_antonym") == []


@pytest.mark.parametrize("word", ["good", "movie", "loved", "well-made", "Funny", "hated"])
def test_substitutable(word: str) -> None:
    assert is_substitutable(word)


def test_stop_list_is_fixed_and_lower_case() -> None:
    assert len(STOP_WORDS) > 179
    assert all(w == w.lower() for w in STOP_WORDS)
    assert {"not", "no", "very", "the", "but"} <= STOP_WORDS


# -- lookups -------------------------------------------------------------------------------


def test_good(lex: Lexicon) -> None:
    syns = lex.synonyms("good")
    assert {"beneficial", "well", "respectable", "proficient"} <= set(syns)
    assert "good" not in syns
    assert lex.antonyms("good")[0] == "bad"
    assert "bad" in lex.antonyms("good", pos="a")
    # Adjective senses of "good" are far more frequent than noun senses, so they lead.
    assert lex.senses("good")[0].pos == "a"


def test_happy_unhappy_antonyms(lex: Lexicon) -> None:
    assert lex.antonyms("happy") == ["unhappy"]
    assert lex.antonyms("unhappy") == ["happy"]


def test_lemma_aware_loved(lex: Lexicon) -> None:
    assert lex.morphy("loved", "v") == ["love"]
    senses = lex.senses("loved", "v")
    assert senses and all(s.base == "love" for s in senses)
    syns = lex.synonyms("loved", "v")
    assert "enjoyed" in syns  # love.v.02 {love, enjoy}, re-inflected like the input
    assert "loved" not in syns and "love" not in syns
    assert lex.antonyms("loved", "v") == ["hated"]
    plain = Lexicon(lex.db, LexiconConfig(inflect=False))
    assert "enjoy" in plain.synonyms("loved", "v")
    assert plain.antonyms("loved", "v") == ["hate"]


@pytest.mark.parametrize(
    ("word", "pos", "expected"),
    [
        ("running", "v", "escaping"),  # .exc form with an -ing ending; escape -> escaping
        ("stopped", "v", "halted"),
        ("stopped", "v", "broke"),  # irregular past from verb.exc (break)
        ("loved", "v", "bedded"),  # consonant doubling from verb.exc
        ("movies", "n", "films"),
        ("children", "n", "kids"),
        ("happier", "a", "gladder"),  # adjective comparative only via adj.exc
        ("happier", "a", "felicitous"),  # no comparative known: lemma form
        ("ran", "v", "escape"),  # irregular input: lemma forms
    ],
)
def test_inflection(lex: Lexicon, word: str, pos: str, expected: str) -> None:
    assert expected in lex.synonyms(word, pos)


def test_regular_inflection_rules() -> None:
    rule = inflection.regular_inflection
    assert [rule(w, "plural") for w in ("film", "box", "story", "day", "church")] == [
        "films", "boxes", "stories", "days", "churches"
    ]  # fmt: skip
    assert [rule(w, "past") for w in ("adore", "cry", "play", "walk")] == [
        "adored", "cried", "played", "walked"
    ]  # fmt: skip
    assert [rule(w, "ing") for w in ("adore", "die", "see", "walk")] == [
        "adoring", "dying", "seeing", "walking"
    ]  # fmt: skip


def test_pos_hint_filters(lex: Lexicon) -> None:
    verb = lex.synonyms("run", pos="v")
    noun = lex.synonyms("run", pos="n")
    assert "operate" in verb and "operate" not in noun
    assert "trial" in noun and "trial" not in verb
    assert all(s.pos == "v" for s in lex.senses("run", "v"))
    both = lex.synonyms("run")
    assert set(verb) | set(noun) == set(both)
    assert lex.senses("run")[0].pos == "v"  # verb senses are tagged more often
    assert lex.synonyms("run", pos="VBD") == verb  # Penn tag
    assert lex.synonyms("glad", pos="s") == lex.synonyms("glad", pos="a")
    assert "gladiolus" in lex.synonyms("glad") and "gladiolus" not in lex.synonyms("glad", "a")
    with pytest.raises(InvalidArgument, match="pos"):
        lex.synonyms("run", pos="X")


def test_multiword(lex: Lexicon) -> None:
    assert all(" " not in s and "_" not in s for s in lex.synonyms("look"))
    multi = Lexicon(lex.db, LexiconConfig(multiword=True)).synonyms("look")
    assert "take care" in multi and all("_" not in s for s in multi)


def test_indirect_antonyms(lex: Lexicon) -> None:
    # "glad" sense 2 ({glad, happy}: "glad to help") is a satellite of "willing" <-> "unwilling".
    assert lex.antonyms("glad", "a") == ["sad"]
    indirect = Lexicon(lex.db, LexiconConfig(indirect_antonyms=True)).antonyms("glad", "a")
    assert indirect[: len(lex.antonyms("glad", "a"))] == lex.antonyms("glad", "a")
    assert indirect == ["sad", "unwilling", "ungrateful", "depressing"]


def test_outputs_are_clean_words(lex: Lexicon) -> None:
    for word in CROSS_WORDS:
        for kind in ("synonym", "antonym"):
            for cand in lex.candidates(word, kind):  # type: ignore[arg-type]
                assert cand.text not in STOP_WORDS and cand.text != word
                assert re.fullmatch(r"[a-z]+(?:[-' ][a-z]+)*", cand.text), cand


def test_limit_and_substitutes(lex: Lexicon) -> None:
    assert lex.synonyms("good", limit=3) == lex.synonyms("good")[:3]
    assert lex.synonyms("good", limit=0) == []
    merged = lex.substitutes("good", "synonym_or_antonym")
    assert merged[:4] == ["bad", lex.synonyms("good")[0], "evil", lex.synonyms("good")[1]]
    assert set(merged) == set(lex.synonyms("good")) | set(lex.antonyms("good"))
    assert lex.substitutes("good", "synonym_or_antonym", limit=2) == merged[:2]
    assert lex.substitutes("good") == lex.synonyms("good")
    with pytest.raises(InvalidArgument, match="limit"):
        lex.synonyms("good", limit=-1)
    with pytest.raises(InvalidArgument, match="kind"):
        lex.substitutes("good", "antonym")  # type: ignore[arg-type]


def test_case_is_restored(lex: Lexicon) -> None:
    assert lex.synonyms("Good", limit=3) == [s.capitalize() for s in lex.synonyms("good", limit=3)]
    assert lex.antonyms("GOOD") == [s.upper() for s in lex.antonyms("good")]


def test_deterministic_across_loads() -> None:
    a, b = Lexicon.load(), Lexicon.load(SYSTEM_WN)
    for word in ("good", "run", "film", "loved", "light"):
        assert a.synonyms(word) == b.synonyms(word)
        assert a.substitutes(word, "synonym_or_antonym") == b.substitutes(
            word, "synonym_or_antonym"
        )


def test_thread_safe_lazy_load() -> None:
    fresh = Lexicon.load()
    expected = Lexicon.load().synonyms("beautiful")
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(fresh.synonyms("beautiful"))
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [expected] * 8


def test_default_lexicon_cached() -> None:
    assert default_lexicon() is default_lexicon()
    assert "bad" in default_lexicon().antonyms("good")


# -- locating the data ---------------------------------------------------------------------


def test_missing_dir_fails_with_install_hint(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as info:
        Lexicon.load(tmp_path / "nowhere")
    msg = info.value.message
    assert "apt-get install wordnet-base wordnet-sense-index" in msg
    assert "nltk.download('wordnet')" in msg and "nowhere" in msg
    assert info.value.reason == "WORDNET_MISSING"


def test_incomplete_dir_fails(tmp_path: Path) -> None:
    shutil.copyfile(SYSTEM_WN / "index.noun", tmp_path / "index.noun")
    with pytest.raises(FailedPrecondition, match="data.noun"):
        Lexicon.load(tmp_path)


def test_env_var_is_used_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(FailedPrecondition, match=ENV_VAR):
        Lexicon.load()
    nltk_layout = tmp_path / "corpora" / "wordnet"
    nltk_layout.mkdir(parents=True)
    for name in REQUIRED_FILES:
        shutil.copyfile(SYSTEM_WN / name, nltk_layout / name)
    lex = Lexicon.load()
    assert lex.source == str(nltk_layout)
    # Without index.sense all counts are 0: sense order, then alphabetical within a synset.
    assert lex.db.lemma_count("good", "a", 1123148) == 0
    assert "bad" in lex.antonyms("good")


def test_zip_source(tmp_path: Path) -> None:
    import zipfile

    zpath = tmp_path / "wordnet.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for name in (*REQUIRED_FILES, "index.sense"):
            zf.write(SYSTEM_WN / name, f"wordnet/{name}")
    lex = Lexicon.load(tmp_path)
    assert lex.source.endswith("wordnet.zip:wordnet/")
    assert lex.synonyms("film") == Lexicon.load(SYSTEM_WN).synonyms("film")


def test_corrupt_offset_is_reported(lex: Lexicon) -> None:
    with pytest.raises(FailedPrecondition, match="no synset at offset"):
        lex.db.synset("n", 5)


# -- cross-check against nltk ------------------------------------------------------------


def _nltk_pos(synset: Any) -> str:
    return "a" if synset.pos() == "s" else synset.pos()


@pytest.mark.parametrize("pos", ["n", "v", "a", "r"])
def test_reader_matches_nltk(pos: str, lex: Lexicon, nltk_wn: Any) -> None:
    """morphy, sense order, lemma names, antonym pointers and counts equal nltk's."""
    checked = 0
    for word in CROSS_WORDS:
        assert lex.morphy(word, pos) == nltk_wn._morphy(word, pos), (word, pos)
        ours = lex.senses(word, pos)
        theirs = list(dict.fromkeys(nltk_wn.synsets(word, pos)))
        assert [(s.pos, s.offset) for s in ours] == [(_nltk_pos(s), s.offset()) for s in theirs]
        for sense, synset in zip(ours, theirs):
            record = lex.db.synset(sense.pos, sense.offset)
            assert list(record.lemmas) == synset.lemma_names()
            for lemma in synset.lemmas():
                key = lemma.name().lower()
                assert lex.db.lemma_count(key, sense.pos, sense.offset) == lemma.count()
            ours_ant = {
                (lex.db.synset(p.pos, p.offset).lemmas[p.target - 1], p.source)
                for p in record.pointers
                if p.symbol == "!"
            }
            theirs_ant = {
                (ant.name(), i + 1)
                for i, lemma in enumerate(synset.lemmas())
                for ant in lemma.antonyms()
            }
            assert ours_ant == theirs_ant, (word, synset)
            checked += 1
    assert checked > 20


def _expected_from_nltk(lex: Lexicon, wn: Any, word: str, pos: str, kind: str) -> list[str]:
    """The documented ordering rule, computed with nltk objects (inflect off, multiword on)."""
    bases = wn._morphy(word, pos)
    excluded = {word} | {b.replace("_", " ") for b in bases}
    out: list[str] = []
    for synset in dict.fromkeys(wn.synsets(word, pos)):
        names = [lem.name().lower() for lem in synset.lemmas()]
        base = next(b for b in bases if b in names)
        if kind == "synonym":
            group = [lem for lem in synset.lemmas() if lem.name().lower() != base]
        else:
            group = [a for lem in synset.lemmas() if lem.name().lower() == base
                     for a in lem.antonyms()]  # fmt: skip
        group.sort(key=lambda lem: (-lem.count(), lem.name().lower()))
        for lem in group:
            text = lem.name().lower().replace("_", " ")
            if text in out or text in excluded or text in STOP_WORDS:
                continue
            if re.fullmatch(r"[a-z]+(?:[-' ][a-z]+)*", text):
                out.append(text)
    return out


@pytest.mark.parametrize("kind", ["synonym", "antonym"])
def test_ranked_lists_match_nltk(kind: str, lex: Lexicon, nltk_wn: Any) -> None:
    plain = Lexicon(lex.db, LexiconConfig(inflect=False, multiword=True))
    nonempty = 0
    for word in CROSS_WORDS:
        for pos in ("n", "v", "a", "r"):
            ours = plain.synonyms(word, pos) if kind == "synonym" else plain.antonyms(word, pos)
            assert ours == _expected_from_nltk(plain, nltk_wn, word, pos, kind), (word, pos)
            nonempty += bool(ours)
    assert nonempty > 20


def test_normalize_pos() -> None:
    assert [normalize_pos(p) for p in ("n", "VERB", "s", "adj", "RB", "JJR", None)] == [
        "n", "v", "a", "a", "r", "a", None
    ]  # fmt: skip


def test_db_load_is_lazy() -> None:
    db = WordNetDB.load()
    assert db._index == {} and db._data == {}
    db.index("r")
    assert set(db._index) == {"r"}
