"""Texts to explain from files (storage/inputs.read_text_inputs), read by the same reader as
the training data (storage/data.read_records): every format gives the same inputs, labels and
ids; bad files fail with file:line; and the labelled reader sees the same rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pairdots_server.errors import DataError, InvalidArgument, NotFound
from pairdots_server.storage.data import read_examples, read_records
from pairdots_server.storage.inputs import TextInput, read_text_inputs

LABELS = ["negative", "positive"]
#: texts with the characters that trip naive readers: quotes, a comma, a tab-free apostrophe
ROWS = [
    {"key": "a1", "body": 'he said "great" , twice', "y": "positive"},
    {"key": "a2", "body": "it 's dull", "y": "negative"},
    {"key": "a3", "body": "fine, i guess", "y": 1},
]
WANT = [
    TextInput('he said "great" , twice', 1, "a1"),
    TextInput("it 's dull", 0, "a2"),
    TextInput("fine, i guess", 1, "a3"),
]


def write_all_formats(d: Path) -> dict[str, Path]:
    """The same three rows as CSV, TSV, JSONL and Parquet."""
    import csv

    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    paths = {f: d / f"in.{f}" for f in ("csv", "tsv", "jsonl", "parquet")}
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["key", "body", "y"])
        w.writerows([[r["key"], r["body"], r["y"]] for r in ROWS])
    paths["tsv"].write_text(
        "key\tbody\ty\n" + "".join(f"{r['key']}\t{r['body']}\t{r['y']}\n" for r in ROWS),
        encoding="utf-8",
    )
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    table = pa.table({k: [str(r[k]) for r in ROWS] for k in ("key", "body", "y")})
    pq.write_table(table, paths["parquet"])
    return paths


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_every_format_gives_the_same_inputs(tmp_path: Path, fmt: str) -> None:
    path = write_all_formats(tmp_path)[fmt]
    got = read_text_inputs(
        path, text_column="body", label_column="y", id_column="key", label_names=LABELS
    )
    assert got == WANT
    # without label and id columns: no gold label, ids are the row numbers
    plain = read_text_inputs(path, text_column="body")
    assert plain == [TextInput(w.text, None, str(i)) for i, w in enumerate(WANT)]


def test_txt_is_one_text_a_line(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_text('first "one"\n\n  \nsecond, two\n', encoding="utf-8")
    assert read_text_inputs(path) == [
        TextInput('first "one"', None, "1"),
        TextInput("second, two", None, "4"),
    ]


def test_the_labelled_reader_reads_the_same_rows(tmp_path: Path) -> None:
    """One reader: the training-data path sees the texts and labels the batch path sees."""
    for fmt, path in write_all_formats(tmp_path).items():
        examples = read_examples(path, text_column="body", label_column="y", label_names=LABELS)
        assert [(e.text, e.label) for e in examples] == [(w.text, w.gold_label) for w in WANT], fmt
        records = read_records(path, columns=("key", "body"))
        assert [r.values for r in records] == [{"key": r["key"], "body": r["body"]} for r in ROWS]


def test_bad_files_name_the_file_and_line(tmp_path: Path) -> None:
    paths = write_all_formats(tmp_path)
    with pytest.raises(DataError, match=r"in\.csv:1: header .* lacks column\(s\) \['text'\]"):
        read_text_inputs(paths["csv"])
    with pytest.raises(DataError, match=r"in\.jsonl:1: missing key 'text'.*--text-column"):
        read_text_inputs(paths["jsonl"])
    with pytest.raises(DataError, match=r"in\.parquet: columns .* lack \['nope'\]"):
        read_text_inputs(paths["parquet"], text_column="body", id_column="nope")
    bad = tmp_path / "bad.csv"
    bad.write_text("body,y\nok,positive\nhm,maybe\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:3: .*'maybe'"):
        read_text_inputs(bad, text_column="body", label_column="y", label_names=LABELS)
    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("text\tid\nfine\t1\nextra\t2\t3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ragged\.tsv:3: 3 columns; expected 2"):
        read_text_inputs(ragged)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no inputs"):
        read_text_inputs(empty)
    with pytest.raises(NotFound, match="does not exist"):
        read_text_inputs(tmp_path / "missing.csv")


def test_more_than_the_limit_is_refused(tmp_path: Path) -> None:
    path = write_all_formats(tmp_path)["jsonl"]
    assert len(read_text_inputs(path, text_column="body", limit=3)) == 3
    with pytest.raises(InvalidArgument, match="more than 2 inputs"):
        read_text_inputs(path, text_column="body", limit=2)
