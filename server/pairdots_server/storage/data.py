"""Dataset readers: labelled text examples z_i = (x_i, y_i) from TSV / CSV / JSONL / Parquet
files or the HuggingFace hub.

Formats:
  * ``.tsv``     ``text<TAB>label`` with no header (the SST-2 files in shared/data/sst2), or a
                 header row naming ``text_column`` and ``label_column`` (then any columns)
  * ``.csv``     header row with named ``text_column`` / ``label_column``
  * ``.jsonl``   one JSON object per line with those keys
  * ``.parquet`` those columns (needs the optional ``pyarrow``: ``pip install pairdots[parquet]``)
Labels are integers in [0, C) or names mapped through ``label_names``; `read_labelled` also
reads the label set from the data itself (storage/labels.py: integers 0..C-1, names, or
1-based integers with a classes file). `read_records` is the one file reader: storage/inputs.py
reads texts to explain with it. Any malformed row raises DataError("file:line: what is wrong;
what is expected").
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairdots_server.errors import DataError, FailedPrecondition, InvalidArgument, NotFound
from pairdots_server.storage.labels import LabelParser, LabelSpec, resolve_label_names

FORMATS = ("tsv", "csv", "jsonl", "parquet")
SST2_ENV = "PAIRDOTS_SST2_DIR"


@dataclass(frozen=True)
class Example:
    """One labelled training/eval example: text x and class index y."""

    text: str
    label: int

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "label": self.label}


def infer_format(path: str | Path) -> str:
    """'tsv' | 'csv' | 'jsonl' | 'parquet' from the file suffix (.json is read as JSON lines)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix
    if suffix in ("json", "ndjson"):
        return "jsonl"
    if suffix == "pq":
        return "parquet"
    raise InvalidArgument.for_field(
        "format",
        f"cannot infer the format of {path} from its suffix; use .tsv, .csv, .jsonl or .parquet "
        "or pass the format explicitly",
    )


def check_text(text: Any, where: str, column: str) -> str:
    """The text of a row, or a DataError naming file:line when it is not a non-empty string."""
    if not isinstance(text, str):
        raise DataError(f"{where}: {column!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(f"{where}: empty text in {column!r}; every example needs non-empty text")
    return text


@dataclass(frozen=True)
class RawRow:
    """One row as read from a file, before its label is mapped: text, raw label, "file:line"."""

    text: str
    label: Any
    where: str


@dataclass(frozen=True)
class Record:
    """One row of a data file: the raw values of the columns asked for, and "file:line"."""

    values: dict[str, Any]
    where: str


def _columns_hint(text_col: str, label_col: str) -> str:
    return (
        f"expected {text_col!r} and {label_col!r}; pass --text-column/--label-column "
        "(text_column/label_column) naming your columns"
    )


def _records_from_header(
    path: Path,
    reader: Iterable[list[str]],
    line_of: Callable[[], int],
    columns: Sequence[str],
    limit: int | None,
    hint: str,
) -> list[Record]:
    it = iter(reader)
    try:
        header = next(it)
    except StopIteration:
        raise DataError(
            f"{path}:1: empty file; expected a header row naming {list(columns)}"
        ) from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}:1: header {header} lacks column(s) {missing}; {hint}")
    idx = {c: header.index(c) for c in columns}
    out: list[Record] = []
    for row in it:
        if limit is not None and len(out) >= limit:
            break
        where = f"{path}:{line_of()}"
        if len(row) != len(header):
            raise DataError(f"{where}: {len(row)} columns; expected {len(header)} like the header")
        out.append(Record({c: row[i] for c, i in idx.items()}, where))
    return out


def _read_delimited(
    path: Path, fmt: str, columns: Sequence[str], limit: int | None, hint: str,
    headerless: Sequence[str],
) -> list[Record]:
    """CSV, or TSV (no quoting: SST-2's texts contain bare quotes). A TSV whose first line does
    not name the columns is read as headerless rows of the `headerless` columns, in order
    (``text<TAB>label``), when `headerless` is given."""
    tsv = fmt == "tsv"
    if tsv and headerless:
        with path.open("r", encoding="utf-8", newline="") as f:
            first = f.readline().rstrip("\r\n").split("\t")
        if not all(c in first for c in columns):
            return _read_headerless_tsv(path, columns, limit, headerless)
    with path.open("r", encoding="utf-8", newline="") as f:
        reader = (csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv
                  else csv.reader(f))
        return _records_from_header(path, reader, lambda: reader.line_num, columns, limit, hint)


def _read_headerless_tsv(
    path: Path, columns: Sequence[str], limit: int | None, headerless: Sequence[str]
) -> list[Record]:
    layout = "<TAB>".join(headerless)
    out: list[Record] = []
    with path.open("r", encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            line = line.rstrip("\r\n")
            where = f"{path}:{lineno}"
            if not line.strip():
                raise DataError(f"{where}: empty line; expected '{layout}'")
            cols = line.split("\t")
            if len(cols) != len(headerless):
                raise DataError(
                    f"{where}: {len(cols)} tab-separated columns; expected {len(headerless)} "
                    f"('{layout}', no header) or a header row naming {list(columns)}"
                )
            values = dict(zip(headerless, cols, strict=True))
            out.append(Record({c: values[c] for c in columns}, where))
    return out


def _read_jsonl(path: Path, columns: Sequence[str], limit: int | None, hint: str) -> list[Record]:
    out: list[Record] = []
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
            for col in columns:
                if col not in obj:
                    raise DataError(f"{where}: missing key {col!r} (keys: {sorted(obj)}); {hint}")
            out.append(Record({c: obj[c] for c in columns}, where))
    return out


def _read_parquet(
    path: Path, columns: Sequence[str], limit: int | None, hint: str
) -> list[Record]:
    try:
        import pyarrow.parquet as pq  # type: ignore[import-untyped]
    except ImportError:
        raise FailedPrecondition(
            f"{path}: reading Parquet needs the optional 'pyarrow' package; "
            "`pip install pairdots[parquet]` or convert the file to CSV/JSONL"
        ) from None
    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataError(f"{path}: columns {schema.names} lack {missing}; {hint}")
    table = pq.read_table(path, columns=list(dict.fromkeys(columns)))
    values = {c: table.column(c).to_pylist() for c in columns}
    n = table.num_rows if limit is None else min(limit, table.num_rows)
    return [Record({c: values[c][i] for c in columns}, f"{path}:row {i}") for i in range(n)]


def read_records(
    path: str | Path,
    fmt: str | None = None,
    *,
    columns: Sequence[str],
    limit: int | None = None,
    hint: str = "",
    headerless: Sequence[str] = (),
) -> list[Record]:
    """The given columns of every row of a TSV/CSV/JSONL/Parquet file (format from the suffix
    unless given; at most `limit` rows): the one reader behind `read_rows` (labelled
    examples) and storage/inputs.py (texts to explain). A TSV without a header is read as
    rows of the `headerless` columns when given. NotFound for a missing file, DataError naming
    file:line (with `hint` on what to pass) for a bad row or a missing column."""
    p = Path(path)
    fmt = (fmt or infer_format(p)).lower()
    if fmt not in FORMATS:
        raise InvalidArgument.for_field(
            "format", f"unknown format {fmt!r}; use tsv, csv, jsonl or parquet"
        )
    if limit is not None and limit < 0:
        raise InvalidArgument.for_field("limit", f"must be >= 0, got {limit}")
    if not p.is_file():
        raise NotFound(f"dataset file {p} does not exist; check the path")
    hint = hint or f"expected columns {list(columns)}"
    try:
        if fmt in ("csv", "tsv"):
            return _read_delimited(p, fmt, columns, limit, hint, headerless)
        if fmt == "jsonl":
            return _read_jsonl(p, columns, limit, hint)
        return _read_parquet(p, columns, limit, hint)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8"
        ) from None


def read_rows(
    path: str | Path,
    fmt: str | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    limit: int | None = None,
) -> list[RawRow]:
    """The rows of a TSV/CSV/JSONL/Parquet file with their raw labels (format from the suffix
    unless given; a TSV may be headerless ``text<TAB>label``). NotFound for a missing file,
    DataError naming file:line for a bad row."""
    records = read_records(
        path, fmt, columns=(text_column, label_column), limit=limit,
        hint=_columns_hint(text_column, label_column), headerless=(text_column, label_column),
    )
    out = [
        RawRow(check_text(r.values[text_column], r.where, text_column), r.values[label_column],
               r.where)
        for r in records
    ]
    if not out and limit != 0:
        raise DataError(f"{path}: no examples; expected at least one row")
    return out


def read_examples(
    path: str | Path,
    fmt: str | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    limit: int | None = None,
    label_base: int = 0,
) -> list[Example]:
    """Read labelled examples from a TSV/CSV/JSONL/Parquet file (format from the suffix unless
    given): labels are class indices (integers, ``label_base``-based) or names in label_names.

    Raises NotFound for a missing file, DataError naming file:line for a malformed row.
    """
    rows = read_rows(path, fmt, text_column=text_column, label_column=label_column, limit=limit)
    parse = LabelParser(label_names, label_base)
    return [Example(r.text, parse(r.label, r.where)) for r in rows]


@dataclass(frozen=True)
class Labelled:
    """Examples with the class names their labels index."""

    examples: list[Example]
    labels: list[str]
    base: int = 0  # integer labels k were read as class k - base


def read_labelled(
    path: str | Path,
    spec: LabelSpec | None = None,
    fmt: str | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    limit: int | None = None,
) -> Labelled:
    """Examples and their class names: the spec's names, or those the data's labels imply
    (`resolve_label_names`); every label is checked against them. ``path`` may be a hub
    source ``hf:NAME[:CONFIG]:SPLIT`` (needs `datasets` and the network)."""
    spec = spec if spec is not None else LabelSpec()
    if fmt is None:
        rows = read_source_rows(
            path, text_column=text_column, label_column=label_column, limit=limit
        )
    else:
        rows = read_rows(path, fmt, text_column=text_column, label_column=label_column, limit=limit)
    return labelled_from_rows(rows, spec)


def labelled_from_rows(rows: Sequence[RawRow], spec: LabelSpec) -> Labelled:
    """`Labelled` for rows already read (a file's or a hub split's)."""
    names, base = resolve_label_names(rows, spec)
    parse = LabelParser(names, base)
    return Labelled([Example(r.text, parse(r.label, r.where)) for r in rows], names, base)


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


HF_PREFIX = "hf:"


def load_hf_rows(
    name: str,
    split: str,
    *,
    config_name: str | None = None,
    text_column: str = "sentence",
    label_column: str = "label",
    limit: int | None = None,
) -> list[RawRow]:
    """Rows of a HuggingFace hub dataset (e.g. ``("glue", "train", config_name="sst2")``).

    Needs the optional ``datasets`` package and network access; raises FailedPrecondition
    saying so otherwise.
    """
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise FailedPrecondition(
            "the 'datasets' package is not installed; `pip install pairdots[hub]` or pass local "
            "--train/--dev files (TSV/CSV/JSONL/Parquet)"
        ) from None
    try:
        ds = datasets.load_dataset(name, config_name, split=split)
    except Exception as exc:  # the hub raises many types (ConnectionError, HfHubHTTPError, ...)
        raise FailedPrecondition(
            f"could not load dataset {name!r} split {split!r} from the HuggingFace hub ({exc}); "
            "check the name and network access, or pass local --train/--dev files"
        ) from exc
    out: list[RawRow] = []
    for i, row in enumerate(ds):
        if limit is not None and len(out) >= limit:
            break
        where = f"{name}[{split}]:{i}"
        for col in (text_column, label_column):
            if col not in row:
                raise DataError(
                    f"{where}: missing column {col!r}; columns are {sorted(row)}; "
                    + _columns_hint(text_column, label_column)
                )
        out.append(
            RawRow(check_text(row[text_column], where, text_column), row[label_column], where)
        )
    return out


def load_hf_dataset(
    name: str,
    split: str,
    *,
    config_name: str | None = None,
    text_column: str = "sentence",
    label_column: str = "label",
    limit: int | None = None,
) -> list[Example]:
    """Examples (integer labels) of a HuggingFace hub dataset; see `load_hf_rows`."""
    rows = load_hf_rows(
        name,
        split,
        config_name=config_name,
        text_column=text_column,
        label_column=label_column,
        limit=limit,
    )
    parse = LabelParser(None)
    return [Example(r.text, parse(r.label, r.where)) for r in rows]


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """``hf:NAME:SPLIT`` or ``hf:NAME:CONFIG:SPLIT`` → (name, config, split)."""
    parts = source[len(HF_PREFIX) :].split(":")
    if len(parts) == 2 and all(parts):
        return parts[0], None, parts[1]
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2]
    raise InvalidArgument.for_field(
        "train",
        f"bad hub source {source!r}; use hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT "
        "(e.g. hf:glue:sst2:train)",
    )


def read_source_rows(
    source: str | Path, *, text_column: str, label_column: str, limit: int | None = None
) -> list[RawRow]:
    """Rows of a local file, or of a hub split when ``source`` is ``hf:NAME[:CONFIG]:SPLIT``."""
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        name, config, split = parse_hf_source(source)
        return load_hf_rows(
            name,
            split,
            config_name=config,
            text_column=text_column,
            label_column=label_column,
            limit=limit,
        )
    return read_rows(source, text_column=text_column, label_column=label_column, limit=limit)


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
