"""Inputs to explain (ExplainBatch, `pairdots explain --input`): texts with an optional gold
label and id, from a .txt file (one text a line) or a headed CSV/TSV, JSONL or Parquet file
(read by storage/data.read_records, the same reader as the training data)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pairdots_server.errors import DataError, InvalidArgument, NotFound
from pairdots_server.storage.data import check_text, infer_format, read_records
from pairdots_server.storage.labels import LabelParser


@dataclass(frozen=True)
class TextInput:
    """One input to explain: its text, optional gold label (class index) and the caller's id."""

    text: str
    gold_label: int | None = None
    id: str = ""


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
            columns = list(dict.fromkeys(c for c in (text_column, label_column, id_column) if c))
            hint = ("pass the names of your columns (--text-column/--label-column/--id-column; "
                    "text_column/label_column/id_column)")
            # one row over the limit is read, so that more than `limit` is an error
            records = read_records(p, fmt, columns=columns, hint=hint,
                                   limit=None if limit is None else limit + 1)
            for rec in records:
                text = check_text(rec.values[text_column], rec.where, text_column)
                gold = parse(rec.values[label_column], rec.where) if label_column else None
                rid = str(rec.values[id_column]) if id_column else str(len(out))
                add(TextInput(text, gold, rid))
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8"
        ) from None
    if not out:
        raise DataError(f"{p}: no inputs; expected at least one text")
    return out
