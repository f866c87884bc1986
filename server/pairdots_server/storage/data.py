"""Dataset readers: labelled text examples z_i = (x_i, y_i) from TSV / CSV / JSONL files or
the HuggingFace hub.

Formats:
  * ``.tsv``   ``text<TAB>label``, no header (the SST-2 files in shared/data/sst2)
  * ``.csv``   header row with named ``text_column`` / ``label_column``
  * ``.jsonl`` one JSON object per line with those keys
Labels are integers in [0, C) or names mapped through ``label_names``. Any malformed row
raises DataError("file:line: what is wrong; what is expected").
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairdots_server.errors import DataError, FailedPrecondition, InvalidArgument, NotFound

FORMATS = ("tsv", "csv", "jsonl")
SST2_ENV = "PAIRDOTS_SST2_DIR"


@dataclass(frozen=True)
class Example:
    """One labelled training/eval example: text x and class index y."""

    text: str
    label: int

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "label": self.label}


def infer_format(path: str | Path) -> str:
    """'tsv' | 'csv' | 'jsonl' from the file suffix (.json is read as JSON lines)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in ("tsv", "csv", "jsonl"):
        return suffix
    if suffix in ("json", "ndjson"):
        return "jsonl"
    raise InvalidArgument.for_field(
        "format",
        f"cannot infer the format of {path} from its suffix; use .tsv, .csv or .jsonl "
        "or pass the format explicitly",
    )


class _LabelParser:
    """Maps a raw label (int, digit string or name) to a class index."""

    def __init__(self, label_names: Sequence[str] | None) -> None:
        self.names = [str(n) for n in label_names] if label_names is not None else None
        self.index = {n: i for i, n in enumerate(self.names)} if self.names else {}

    def expected(self) -> str:
        if self.names:
            return f"an integer in [0, {len(self.names)}) or one of {self.names}"
        return "a non-negative integer class index"

    def __call__(self, raw: Any, where: str) -> int:
        if isinstance(raw, bool):
            raise DataError(f"{where}: label {raw!r} is a boolean; expected {self.expected()}")
        if isinstance(raw, int):
            value = raw
        elif isinstance(raw, float) and raw.is_integer():
            value = int(raw)
        elif isinstance(raw, str) and raw.strip() in self.index:
            return self.index[raw.strip()]
        elif isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
            value = int(raw.strip())
        else:
            raise DataError(f"{where}: bad label {raw!r}; expected {self.expected()}")
        if value < 0 or (self.names is not None and value >= len(self.names)):
            raise DataError(f"{where}: label {value} out of range; expected {self.expected()}")
        return value


def _check_text(text: Any, where: str, column: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"{where}: {column!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(f"{where}: empty text in {column!r}; every example needs non-empty text")
    return text


def _read_tsv(path: Path, parse: _LabelParser, limit: int | None) -> list[Example]:
    out: list[Example] = []
    with path.open("r", encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            line = line.rstrip("\r\n")
            where = f"{path}:{lineno}"
            if not line.strip():
                raise DataError(f"{where}: empty line; expected 'text<TAB>label'")
            cols = line.split("\t")
            if len(cols) != 2:
                raise DataError(
                    f"{where}: {len(cols)} tab-separated columns; expected 2 ('text<TAB>label', "
                    "no header)"
                )
            text = _check_text(cols[0], where, "text")
            out.append(Example(text, parse(cols[1], where)))
    return out


def _read_csv(
    path: Path, parse: _LabelParser, text_col: str, label_col: str, limit: int | None
) -> list[Example]:
    out: list[Example] = []
    with path.open("r", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(
                f"{path}:1: empty file; expected a header row with {text_col!r} and {label_col!r}"
            ) from None
        missing = [c for c in (text_col, label_col) if c not in header]
        if missing:
            raise DataError(
                f"{path}:1: header {header} lacks column(s) {missing}; expected {text_col!r} and "
                f"{label_col!r} (or pass text_column/label_column)"
            )
        ti, li = header.index(text_col), header.index(label_col)
        for row in reader:
            if limit is not None and len(out) >= limit:
                break
            where = f"{path}:{reader.line_num}"
            if len(row) != len(header):
                raise DataError(
                    f"{where}: {len(row)} columns; expected {len(header)} like the header"
                )
            text = _check_text(row[ti], where, text_col)
            out.append(Example(text, parse(row[li], where)))
    return out


def _read_jsonl(
    path: Path, parse: _LabelParser, text_col: str, label_col: str, limit: int | None
) -> list[Example]:
    out: list[Example] = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            where = f"{path}:{lineno}"
            if not line.strip():
                continue  # blank lines (e.g. a trailing one) are allowed in JSON lines
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where}: invalid JSON ({exc.msg}); expected one object a line"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: a JSON {type(obj).__name__}; expected an object")
            for col in (text_col, label_col):
                if col not in obj:
                    raise DataError(
                        f"{where}: missing key {col!r}; expected keys "
                        f"{text_col!r} and {label_col!r}"
                    )
            text = _check_text(obj[text_col], where, text_col)
            out.append(Example(text, parse(obj[label_col], where)))
    return out


def read_examples(
    path: str | Path,
    fmt: str | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Read labelled examples from a TSV/CSV/JSONL file (format from the suffix unless given).

    Raises NotFound for a missing file, DataError naming file:line for a malformed row.
    """
    p = Path(path)
    fmt = (fmt or infer_format(p)).lower()
    if fmt not in FORMATS:
        raise InvalidArgument.for_field("format", f"unknown format {fmt!r}; use tsv, csv or jsonl")
    if limit is not None and limit < 0:
        raise InvalidArgument.for_field("limit", f"must be >= 0, got {limit}")
    if not p.is_file():
        raise NotFound(f"dataset file {p} does not exist; check the path")
    parse = _LabelParser(label_names)
    try:
        if fmt == "tsv":
            out = _read_tsv(p, parse, limit)
        elif fmt == "csv":
            out = _read_csv(p, parse, text_column, label_column, limit)
        else:
            out = _read_jsonl(p, parse, text_column, label_column, limit)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8"
        ) from None
    if not out and limit != 0:
        raise DataError(f"{p}: no examples; expected at least one row")
    return out


def write_jsonl(path: str | Path, examples: Iterable[Example]) -> None:
    """Write examples as JSON lines {"text", "label"} (the bundle's train.jsonl)."""
    with Path(path).open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n" for ex in examples)


def sha256_of_examples(examples: Iterable[Example]) -> str:
    """Deterministic SHA-256 over (text, label) in order (each as a canonical JSON line)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.text, ex.label], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def load_hf_dataset(
    name: str,
    split: str,
    *,
    config_name: str | None = None,
    text_column: str = "sentence",
    label_column: str = "label",
    limit: int | None = None,
) -> list[Example]:
    """Examples from a HuggingFace hub dataset (e.g. ``("glue", "train", config_name="sst2")``).

    Needs the optional ``datasets`` package and network access; raises FailedPrecondition
    saying so otherwise.
    """
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise FailedPrecondition(
            "the 'datasets' package is not installed; `pip install pairdots[hub]` or pass local "
            "--train/--dev files (TSV/CSV/JSONL)"
        ) from None
    try:
        ds = datasets.load_dataset(name, config_name, split=split)
    except Exception as exc:  # the hub raises many types (ConnectionError, HfHubHTTPError, ...)
        raise FailedPrecondition(
            f"could not load dataset {name!r} split {split!r} from the HuggingFace hub ({exc}); "
            "check the name and network access, or pass local --train/--dev files"
        ) from exc
    out: list[Example] = []
    for i, row in enumerate(ds):
        if limit is not None and len(out) >= limit:
            break
        where = f"{name}[{split}]:{i}"
        for col in (text_column, label_column):
            if col not in row:
                raise DataError(f"{where}: missing column {col!r}; columns are {sorted(row)}")
        out.append(
            Example(
                _check_text(row[text_column], where, text_column),
                _LabelParser(None)(row[label_column], where),
            )
        )
    return out


def default_sst2_dir() -> Path:
    """Directory holding SST-2 train/dev/test.tsv.

    Order: $PAIRDOTS_SST2_DIR; ../shared/data/sst2 relative to the cwd; the same relative to
    any parent of this file (the repo root). NotFound otherwise.
    """
    env = os.environ.get(SST2_ENV)
    if env:
        p = Path(env)
        if not (p / "train.tsv").is_file():
            raise NotFound(f"${SST2_ENV}={env} has no train.tsv; point it at the SST-2 directory")
        return p
    candidates = [Path.cwd() / ".." / "shared" / "data" / "sst2"]
    candidates += [
        parent / ".." / "shared" / "data" / "sst2" for parent in Path(__file__).resolve().parents
    ]
    for c in candidates:
        if (c / "train.tsv").is_file():
            return c.resolve()
    raise NotFound(
        "no SST-2 data found (looked for ../shared/data/sst2/train.tsv beside the cwd and the "
        f"repository); pass --train/--dev files or set {SST2_ENV}"
    )
