"""Inputs to explain (ExplainBatch, `pairdots explain --input`): texts with an optional gold
label and id, from a .txt file (one text a line) or a headed CSV/TSV, JSONL or Parquet file."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairdots_server.errors import DataError, FailedPrecondition, InvalidArgument, NotFound
from pairdots_server.storage.data import check_text, infer_format
from pairdots_server.storage.labels import LabelParser


@dataclass(frozen=True)
class TextInput:
    """One input to explain: its text, optional gold label (class index) and the caller's id."""

    text: str
    gold_label: int | None = None
    id: str = ""


def _records(path: Path, fmt: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each row of a headed CSV/TSV, a JSONL or a Parquet file."""
    if fmt in ("csv", "tsv"):
        with path.open("r", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
            for row in reader:
                yield f"{path}:{reader.line_num}", dict(row)
    elif fmt == "jsonl":
        with path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{where}: invalid JSON ({exc.msg}); expected one object a line"
                    ) from None
                if not isinstance(obj, dict):
                    raise DataError(f"{where}: a JSON {type(obj).__name__}; expected an object")
                yield where, obj
    else:
        try:
            import pyarrow.parquet as pq  # type: ignore[import-untyped]
        except ImportError:
            raise FailedPrecondition(
                f"{path}: reading Parquet needs the optional 'pyarrow' package; "
                "`pip install pairdots[parquet]`"
            ) from None
        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
        for i, row in enumerate(rows):
            yield f"{path}:row {i}", row


def read_text_inputs(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "",
    id_column: str = "",
    label_names: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[TextInput]:
    """Inputs to explain from a file: ``.txt`` (one text a line, blank lines skipped) or a
    headed CSV/TSV, JSONL or Parquet file with ``text_column`` and, when named, a gold label
    (an integer or a name in label_names) and an id (default: the row number). More than
    ``limit`` inputs is an InvalidArgument; a bad row a DataError naming file:line."""
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"input file {p} does not exist; check the path")
    fmt = "txt" if p.suffix.lower() == ".txt" else infer_format(p)
    parse = LabelParser(label_names)
    out: list[TextInput] = []

    def add(item: TextInput) -> None:
        if limit is not None and len(out) >= limit:
            raise InvalidArgument.for_field(
                "input_path", f"{p} has more than {limit} inputs; split it into several batches"
            )
        out.append(item)

    try:
        if fmt == "txt":
            with p.open("r", encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        add(TextInput(line.rstrip("\r\n"), None, str(lineno)))
        else:
            for where, rec in _records(p, fmt):
                if text_column not in rec:
                    raise DataError(
                        f"{where}: no column {text_column!r} (columns: {sorted(rec)}); pass "
                        "the text column's name (--text-column / text_column)"
                    )
                for col in (label_column, id_column):
                    if col and col not in rec:
                        raise DataError(f"{where}: no column {col!r} (columns: {sorted(rec)})")
                text = check_text(rec[text_column], where, text_column)
                gold = parse(rec[label_column], where) if label_column else None
                rid = str(rec[id_column]) if id_column else str(len(out))
                add(TextInput(text, gold, rid))
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8"
        ) from None
    if not out:
        raise DataError(f"{p}: no inputs; expected at least one text")
    return out
