"""Locate and read the WordNet 3.0 database (wndb(5WN) files) directly, without nltk.

Why a direct reader: nltk 3.10 only opens WordNet under its own data directories (no symlinks),
needs a `lexnames` file that Debian's wordnet-base does not ship, and is configured through the
process-global NLTK_DATA. The lexicon needs only four things from WordNet, all read here:

- index.{noun,verb,adj,adv}: lemma -> synset offsets, in WordNet's sense order (most frequent
  sense first; the same order nltk's `wordnet.synsets` returns);
- data.{noun,verb,adj,adv}: the synset at a byte offset -> lemma names and pointers
  (antonyms are lexical '!' pointers, `source/target` = 1-based word numbers);
- {noun,verb,adj,adv}.exc: irregular inflections for morphy;
- index.sense (optional): tagged-sense counts, i.e. nltk's `Lemma.count()`.

Adjective satellites (ss_type 's') live in data.adj / index.adj and are reported with file
POS 'a'; `SynsetRecord.ss_type` keeps the 's'.

Search order for the files (`locate_wordnet`): the explicit `data_dir` argument, then the
environment variable PAIRDOTS_WORDNET_DIR, then /usr/share/wordnet (Debian/Ubuntu packages
wordnet-base + wordnet-sense-index), then nltk's data directories (`nltk.download('wordnet')`,
directory or zip). An explicit `data_dir` or PAIRDOTS_WORDNET_DIR that holds no WordNet is an
error (no silent fallback); nothing found anywhere is an error with the install commands.

Each POS's files are read lazily on first use (index.noun parses in ~0.2 s, the other POS are
smaller); lookups are thread-safe (loads happen under a lock, records are immutable).
"""

from __future__ import annotations

import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pairdots_server.errors import FailedPrecondition

ENV_VAR = "PAIRDOTS_WORDNET_DIR"
SYSTEM_DIR = Path("/usr/share/wordnet")

# WordNet file POS ('a' covers adjective satellites too) -> file suffix.
POS_FILES: dict[str, str] = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
REQUIRED_FILES: tuple[str, ...] = tuple(
    f"{kind}.{suffix}" for suffix in POS_FILES.values() for kind in ("index", "data")
) + tuple(f"{suffix}.exc" for suffix in POS_FILES.values())
SENSE_INDEX = "index.sense"

# ss_type digit of a sense key (lemma%D:...) -> file POS.
_SENSE_KEY_POS = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}

INSTALL_HINT = (
    "install WordNet 3.0 with `apt-get install wordnet-base wordnet-sense-index` (files land in "
    "/usr/share/wordnet), or run `python -c \"import nltk; nltk.download('wordnet')\"`, or set "
    f"{ENV_VAR} to a directory holding index.noun, data.noun, noun.exc (and the verb/adj/adv "
    "files, optionally index.sense)"
)


class WordNetSource(Protocol):
    """Where the wndb files come from (a directory or nltk's wordnet.zip)."""

    @property
    def description(self) -> str: ...

    def has(self, name: str) -> bool: ...

    def read(self, name: str) -> bytes: ...


@dataclass(frozen=True)
class DirectorySource:
    """wndb files directly inside `path`."""

    path: Path

    @property
    def description(self) -> str:
        return str(self.path)

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()


@dataclass(frozen=True)
class ZipSource:
    """wndb files inside a zip (nltk's corpora/wordnet.zip holds them under `wordnet/`)."""

    path: Path
    prefix: str

    @property
    def description(self) -> str:
        return f"{self.path}:{self.prefix}"

    def has(self, name: str) -> bool:
        with zipfile.ZipFile(self.path) as zf:
            return (self.prefix + name) in zf.namelist()

    def read(self, name: str) -> bytes:
        with zipfile.ZipFile(self.path) as zf:
            return zf.read(self.prefix + name)


def _complete(source: WordNetSource) -> bool:
    try:
        return all(source.has(name) for name in REQUIRED_FILES)
    except (OSError, zipfile.BadZipFile):
        return False


def _zip_source(path: Path) -> ZipSource | None:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    for name in names:
        if name.endswith("index.noun"):
            return ZipSource(path, name[: -len("index.noun")])
    return None


def _sources_under(path: Path) -> list[WordNetSource]:
    """The layouts accepted at `path`: the files themselves, WordNet's `dict/`, nltk's
    `corpora/wordnet/` or `wordnet/`, or a zip of any of them."""
    found: list[WordNetSource] = []
    if path.is_file():
        zs = _zip_source(path)
        return [zs] if zs is not None else []
    for sub in (path, path / "dict", path / "wordnet", path / "corpora" / "wordnet"):
        if sub.is_dir():
            found.append(DirectorySource(sub))
    for zpath in (path / "wordnet.zip", path / "corpora" / "wordnet.zip"):
        if zpath.is_file():
            zs = _zip_source(zpath)
            if zs is not None:
                found.append(zs)
    return found


def _first_complete(path: Path) -> WordNetSource | None:
    for source in _sources_under(path):
        if _complete(source):
            return source
    return None


def _nltk_data_dirs() -> list[Path]:
    try:
        import nltk.data  # type: ignore[import-untyped]  # heavy import: only when the earlier places had nothing
    except ImportError:
        return []
    return [Path(p) for p in nltk.data.path]


def locate_wordnet(data_dir: str | os.PathLike[str] | None = None) -> WordNetSource:
    """Find a complete WordNet database (search order in the module docstring).

    Raises FailedPrecondition naming what was searched and how to install WordNet.
    """
    for label, value in (("data_dir", data_dir), (ENV_VAR, os.environ.get(ENV_VAR))):
        if value is None or value == "":
            continue
        source = _first_complete(Path(value))
        if source is None:
            raise FailedPrecondition(
                f"WordNet not found at {label}={str(value)!r}: it must hold "
                f"{', '.join(REQUIRED_FILES)} (or be nltk's corpora/wordnet[.zip]); fix the path, "
                f"or {INSTALL_HINT}",
                reason="WORDNET_MISSING",
            )
        return source
    searched = [SYSTEM_DIR]
    source = _first_complete(SYSTEM_DIR)
    if source is not None:
        return source
    for nltk_dir in _nltk_data_dirs():
        searched.append(nltk_dir)
        source = _first_complete(nltk_dir)
        if source is not None:
            return source
    raise FailedPrecondition(
        "WordNet 3.0 not found (searched "
        + ", ".join(str(p) for p in searched)
        + "); "
        + INSTALL_HINT,
        reason="WORDNET_MISSING",
    )


@dataclass(frozen=True)
class Pointer:
    """One pointer of a synset. `source`/`target` are 1-based word numbers (0 = the whole
    synset, a semantic pointer); `pos` is the target's file POS ('s' mapped to 'a')."""

    symbol: str
    offset: int
    pos: str
    source: int
    target: int


@dataclass(frozen=True)
class SynsetRecord:
    """A parsed data.* line. `lemmas` are the words as written (case kept, multi-word joined
    by '_', adjective markers like '(p)' stripped)."""

    offset: int
    pos: str  # file POS: n v a r
    ss_type: str  # n v a s r
    lemmas: tuple[str, ...]
    pointers: tuple[Pointer, ...]


def _strip_marker(word: str) -> str:
    """'galore(ip)' -> 'galore' (adjective syntactic markers (a), (p), (ip))."""
    if word.endswith(")"):
        cut = word.rfind("(")
        if cut > 0:
            return word[:cut]
    return word


def parse_data_line(line: str, pos: str) -> SynsetRecord:
    """Parse one data.* line (wndb(5WN)): offset lex_filenum ss_type w_cnt(hex) [word
    lex_id(hex)]... p_cnt(dec) [symbol offset pos source/target(hex 2+2)]... [frames] | gloss."""
    fields = line.split(" | ", 1)[0].split()
    offset = int(fields[0])
    ss_type = fields[2]
    n_words = int(fields[3], 16)
    lemmas = tuple(_strip_marker(fields[4 + 2 * i]) for i in range(n_words))
    at = 4 + 2 * n_words
    n_ptrs = int(fields[at])
    at += 1
    pointers: list[Pointer] = []
    for _ in range(n_ptrs):
        symbol, target_offset, target_pos, st = fields[at : at + 4]
        at += 4
        source_target = int(st, 16)  # ssss tttt: two hex digits each
        pointers.append(
            Pointer(
                symbol=symbol,
                offset=int(target_offset),
                pos="a" if target_pos == "s" else target_pos,
                source=source_target >> 8,
                target=source_target & 0xFF,
            )
        )
    return SynsetRecord(offset, pos, ss_type, lemmas, tuple(pointers))


class WordNetDB:
    """Lazy, thread-safe access to one WordNet database."""

    def __init__(self, source: WordNetSource) -> None:
        self.source = source
        self._lock = threading.Lock()
        self._index: dict[str, dict[str, tuple[int, ...]]] = {}
        self._exc: dict[str, dict[str, tuple[str, ...]]] = {}
        self._rev_exc: dict[str, dict[str, tuple[str, ...]]] = {}
        self._data: dict[str, bytes] = {}
        self._synsets: dict[tuple[str, int], SynsetRecord] = {}
        self._counts: dict[tuple[str, str, int], int] | None = None

    @classmethod
    def load(cls, data_dir: str | os.PathLike[str] | None = None) -> WordNetDB:
        return cls(locate_wordnet(data_dir))

    # -- raw files -------------------------------------------------------------------------

    def _read(self, name: str) -> bytes:
        try:
            return self.source.read(name)
        except (OSError, KeyError, zipfile.BadZipFile) as exc:
            raise FailedPrecondition(
                f"cannot read WordNet file {name} from {self.source.description}: {exc}; "
                + INSTALL_HINT,
                reason="WORDNET_MISSING",
            ) from exc

    def index(self, pos: str) -> dict[str, tuple[int, ...]]:
        """lemma (lower case, '_' for spaces) -> synset offsets in sense order."""
        table = self._index.get(pos)
        if table is not None:
            return table
        with self._lock:
            if pos not in self._index:
                self._index[pos] = self._parse_index(self._read(f"index.{POS_FILES[pos]}"))
            return self._index[pos]

    @staticmethod
    def _parse_index(raw: bytes) -> dict[str, tuple[int, ...]]:
        table: dict[str, tuple[int, ...]] = {}
        for line in raw.decode("utf-8").splitlines():
            if not line or line[0] == " ":  # license header lines start with two spaces
                continue
            parts = line.split()
            n_synsets = int(parts[2])
            table[parts[0]] = tuple(int(x) for x in parts[len(parts) - n_synsets :])
        return table

    def exceptions(self, pos: str) -> dict[str, tuple[str, ...]]:
        """inflected form -> base forms, from {pos}.exc."""
        table = self._exc.get(pos)
        if table is not None:
            return table
        with self._lock:
            if pos not in self._exc:
                exc: dict[str, tuple[str, ...]] = {}
                rev: dict[str, list[str]] = {}
                for line in self._read(f"{POS_FILES[pos]}.exc").decode("utf-8").splitlines():
                    parts = line.split()
                    if len(parts) < 2:
                        continue
                    exc[parts[0]] = tuple(parts[1:])
                    for base in parts[1:]:
                        rev.setdefault(base, []).append(parts[0])
                self._rev_exc[pos] = {k: tuple(sorted(v)) for k, v in rev.items()}
                self._exc[pos] = exc
            return self._exc[pos]

    def reverse_exceptions(self, pos: str) -> dict[str, tuple[str, ...]]:
        """base form -> its irregular inflected forms (sorted), from {pos}.exc."""
        self.exceptions(pos)
        return self._rev_exc[pos]

    def _data_bytes(self, pos: str) -> bytes:
        raw = self._data.get(pos)
        if raw is not None:
            return raw
        with self._lock:
            if pos not in self._data:
                self._data[pos] = self._read(f"data.{POS_FILES[pos]}")
            return self._data[pos]

    def synset(self, pos: str, offset: int) -> SynsetRecord:
        """The synset at byte `offset` of data.{pos}."""
        key = (pos, offset)
        record = self._synsets.get(key)
        if record is not None:
            return record
        raw = self._data_bytes(pos)
        end = raw.find(b"\n", offset)
        line = raw[offset : end if end >= 0 else len(raw)].decode("utf-8")
        if not line.startswith(f"{offset:08d} "):
            raise FailedPrecondition(
                f"WordNet data.{POS_FILES[pos]} in {self.source.description} has no synset at "
                f"offset {offset} (index and data files from different WordNet versions?); "
                "reinstall WordNet 3.0: " + INSTALL_HINT,
                reason="WORDNET_CORRUPT",
            )
        record = parse_data_line(line, pos)
        with self._lock:
            self._synsets[key] = record
        return record

    def lemma_count(self, lemma: str, pos: str, offset: int) -> int:
        """Tagged-sense count of `lemma` (lower case, '_') in synset (pos, offset): the last
        field of its index.sense line, nltk's `Lemma.count()`. 0 when untagged or when
        index.sense is absent (then ordering falls back to sense order + alphabetical)."""
        counts = self._counts
        if counts is None:
            with self._lock:
                if self._counts is None:
                    self._counts = self._parse_counts()
                counts = self._counts
        return counts.get((lemma, pos, offset), 0)

    def _parse_counts(self) -> dict[tuple[str, str, int], int]:
        if not self.source.has(SENSE_INDEX):
            return {}
        counts: dict[tuple[str, str, int], int] = {}
        for line in self._read(SENSE_INDEX).decode("utf-8").splitlines():
            parts = line.split()
            if len(parts) != 4 or parts[3] == "0":
                continue
            lemma, _, rest = parts[0].partition("%")
            counts[(lemma, _SENSE_KEY_POS[rest[0]], int(parts[1]))] = int(parts[3])
        return counts
