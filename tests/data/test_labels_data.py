"""Any labelled data set: column flags, label sets read from the data (integers 0..C-1, names,
1-based with a classes file), TSV with a header, Parquet, and errors that say what to pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from news4 import NEWS_CLASSES, news_rows, write_news_csv

from pairdots_server.errors import DataError, InvalidArgument
from pairdots_server.storage.data import Example, RawRow, read_labelled
from pairdots_server.storage.labels import LabelSpec, resolve_label_names

COLS = {"text_column": "content", "label_column": "label"}


def _rows(*labels: object) -> list[RawRow]:
    return [RawRow(f"t{i}", lab, f"f:{i + 1}") for i, lab in enumerate(labels)]


@pytest.mark.parametrize(
    "labels,spec,names,base",
    [
        ((0, 1, 3, 2), LabelSpec(), ["0", "1", "2", "3"], 0),
        (("2", "0", "1"), LabelSpec(), ["0", "1", "2"], 0),
        ((1, 2, 4, 3), LabelSpec(), ["1", "2", "3", "4"], 1),
        (("b", "a", "c", "a"), LabelSpec(), ["a", "b", "c"], 0),
        ((1, 4, 2), LabelSpec(("w", "s", "b", "t")), ["w", "s", "b", "t"], 1),
        ((0, 3), LabelSpec(("w", "s", "b", "t")), ["w", "s", "b", "t"], 0),
        ((1, 2), LabelSpec(("w", "s", "b", "t"), base=1), ["w", "s", "b", "t"], 1),
        (("s", 0), LabelSpec(("w", "s", "b", "t")), ["w", "s", "b", "t"], 0),
    ],
)
def test_label_names_from_the_data(
    labels: tuple[object, ...], spec: LabelSpec, names: list[str], base: int
) -> None:
    assert resolve_label_names(_rows(*labels), spec) == (names, base)


@pytest.mark.parametrize(
    "labels,fragment",
    [
        ((0, "pos"), "mix integers [0] and names ['pos']"),
        ((2, 3, 4), "start at 2"),
        ((1, 1), "every label is 1"),
        (("x", "x"), "every label is 'x'"),
        ((0.5, 1), "neither an integer nor a name"),
        ((True, 0), "neither an integer nor a name"),
    ],
)
def test_label_set_errors_say_what_to_pass(labels: tuple[object, ...], fragment: str) -> None:
    with pytest.raises(DataError) as info:
        resolve_label_names(_rows(*labels), LabelSpec())
    assert fragment in info.value.message
    assert "f:" in info.value.message


def test_issue_csv_label_content_with_label_names(tmp_path: Path) -> None:
    rows = news_rows(12)
    p = write_news_csv(tmp_path / "news.csv", rows)
    got = read_labelled(p, LabelSpec(NEWS_CLASSES), **COLS)
    assert got.labels == list(NEWS_CLASSES)
    assert got.examples == [Example(t, y) for y, t in rows]
    # the same file without names: four classes "0".."3" read from the data
    assert read_labelled(p, **COLS).labels == ["0", "1", "2", "3"]
    # without --text-column the error names the header and the flags to pass
    with pytest.raises(DataError) as info:
        read_labelled(p)
    msg = info.value.message
    assert "['label', 'content']" in msg and "--text-column/--label-column" in msg


def test_one_based_with_classes_file(tmp_path: Path) -> None:
    rows = news_rows(8)
    p = write_news_csv(tmp_path / "news.csv", rows, base=1)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(NEWS_CLASSES) + "\n", encoding="utf-8")
    spec = LabelSpec.from_options(None, str(classes), None)
    got = read_labelled(p, spec, **COLS)
    assert got.labels == list(NEWS_CLASSES) and got.base == 1
    assert [e.label for e in got.examples] == [y for y, _ in rows]
    # a 5 is out of range for four classes, 1-based: the message names the range and the fix
    with p.open("a", encoding="utf-8") as f:
        f.write("5,one too many\n")
    with pytest.raises(
        DataError,
        match=r"news.csv:10: label 5 out of range; expected an integer "
        r"in \[1, 4\]",
    ):
        read_labelled(p, spec, **COLS)


def test_names_in_the_data_and_unknown_name(tmp_path: Path) -> None:
    rows = news_rows(8)
    p = write_news_csv(tmp_path / "news.csv", rows, names=True)
    got = read_labelled(p, **COLS)
    assert got.labels == sorted(NEWS_CLASSES)
    assert [got.labels[e.label] for e in got.examples] == [NEWS_CLASSES[y] for y, _ in rows]
    with pytest.raises(DataError, match="bad label 'Sports'; expected an integer in"):
        read_labelled(p, LabelSpec(("World", "Business")), **COLS)


def test_label_spec_options() -> None:
    assert LabelSpec.from_options("a, b,c", None, None).names == ("a", "b", "c")
    with pytest.raises(InvalidArgument, match="repeat"):
        LabelSpec.from_options("a,a", None, None)
    with pytest.raises(InvalidArgument, match="at least 2"):
        LabelSpec.from_options("a", None, None)
    with pytest.raises(InvalidArgument, match="not both"):
        LabelSpec.from_options("a,b", "classes.txt", None)
    with pytest.raises(InvalidArgument, match="0 or 1"):
        LabelSpec(base=2)


def test_tsv_with_header_jsonl_and_parquet_read_alike(tmp_path: Path) -> None:
    rows = news_rows(10)
    tsv = tmp_path / "news.tsv"
    tsv.write_text(
        "id\tlabel\tcontent\n" + "".join(f"{i}\t{y}\t{t}\n" for i, (y, t) in enumerate(rows)),
        encoding="utf-8",
    )
    jsonl = tmp_path / "news.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"content": t, "label": NEWS_CLASSES[y]}) + "\n" for y, t in rows),
        encoding="utf-8",
    )
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    parquet = tmp_path / "news.parquet"
    pq.write_table(
        pa.table({"content": [t for _, t in rows], "label": [y for y, _ in rows]}), parquet
    )
    spec = LabelSpec(NEWS_CLASSES)
    want = [Example(t, y) for y, t in rows]
    for p in (tsv, jsonl, parquet):
        got = read_labelled(p, spec, **COLS)
        assert got.examples == want and got.labels == list(NEWS_CLASSES), p
    assert read_labelled(parquet, **COLS, limit=3).examples == want[:3]
    with pytest.raises(DataError, match=r"columns \['content', 'label'\] lack \['text'\]"):
        read_labelled(parquet, spec)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_labelled(bad, spec, **COLS)


def test_hub_sources_parse_and_need_datasets() -> None:
    import importlib.util

    from pairdots_server.errors import FailedPrecondition
    from pairdots_server.storage.data import parse_hf_source

    assert parse_hf_source("hf:glue:sst2:train") == ("glue", "sst2", "train")
    assert parse_hf_source("hf:ag_news:test") == ("ag_news", None, "test")
    with pytest.raises(InvalidArgument, match="hf:NAME:SPLIT"):
        parse_hf_source("hf:ag_news")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(FailedPrecondition, match=r"pairdots\[hub\]"):
            read_labelled("hf:ag_news:train", text_column="text")
