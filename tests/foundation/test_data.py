"""Dataset readers: the real SST-2 files, CSV/JSONL, malformed rows, hashing, SST-2 lookup."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pairdots_server.errors import DataError, FailedPrecondition, InvalidArgument, NotFound
from pairdots_server.storage.data import (
    Example,
    default_sst2_dir,
    load_hf_dataset,
    read_examples,
    sha256_of_examples,
    write_jsonl,
)

SST2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2"
needs_sst2 = pytest.mark.skipif(not (SST2 / "train.tsv").is_file(), reason="no shared SST-2 data")


@needs_sst2
@pytest.mark.parametrize("split,count", [("train", 6920), ("dev", 872), ("test", 1821)])
def test_sst2_counts_and_last_line(split: str, count: int) -> None:
    path = SST2 / f"{split}.tsv"
    examples = read_examples(path)
    assert len(examples) == count
    assert {ex.label for ex in examples} == {0, 1}
    last_text, last_label = (
        path.read_text(encoding="utf-8").rstrip("\n").split("\n")[-1].split("\t")
    )
    assert examples[-1] == Example(last_text, int(last_label))


@needs_sst2
def test_default_sst2_dir_finds_shared_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAIRDOTS_SST2_DIR", raising=False)
    assert default_sst2_dir().resolve() == SST2.resolve()


def test_default_sst2_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text("good\t1\n", encoding="utf-8")
    monkeypatch.setenv("PAIRDOTS_SST2_DIR", str(tmp_path))
    assert default_sst2_dir() == tmp_path
    monkeypatch.setenv("PAIRDOTS_SST2_DIR", str(tmp_path / "nope"))
    with pytest.raises(NotFound, match="PAIRDOTS_SST2_DIR"):
        default_sst2_dir()


def test_default_sst2_dir_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import pairdots_server.storage.data as data_mod

    monkeypatch.delenv("PAIRDOTS_SST2_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    # a module path whose ancestors have no ../shared (tmp_path's may: a clone in /tmp/x
    # with its data in /tmp/shared, as a clean-venv CI run lays it out)
    fake = Path("/nonexistent-pairdots-test") / "a" / "b" / "data.py"
    monkeypatch.setattr(data_mod, "__file__", str(fake))
    with pytest.raises(NotFound, match="--train/--dev"):
        default_sst2_dir()


def test_tsv_with_and_without_trailing_newline(tmp_path: Path) -> None:
    p = tmp_path / "x.tsv"
    p.write_text("a good film\t1\nbad\t0", encoding="utf-8")
    assert read_examples(p) == [Example("a good film", 1), Example("bad", 0)]
    p.write_text("a good film\t1\nbad\t0\n", encoding="utf-8")
    assert read_examples(p) == [Example("a good film", 1), Example("bad", 0)]
    assert read_examples(p, limit=1) == [Example("a good film", 1)]


def test_tsv_label_names(tmp_path: Path) -> None:
    p = tmp_path / "x.tsv"
    p.write_text("fine\tpositive\nmeh\tnegative\nok\t1\n", encoding="utf-8")
    got = read_examples(p, label_names=["negative", "positive"])
    assert [ex.label for ex in got] == [1, 0, 1]


@pytest.mark.parametrize(
    "content,line,fragment",
    [
        ("good\t1\nbad\n", 2, "1 tab-separated columns; expected 2"),
        ("good\t1\nbad\t0\textra\n", 2, "3 tab-separated columns"),
        ("good\t1\nfine\t1\nbad\tx\n", 3, "bad label 'x'"),
        ("good\t1\n\t0\n", 2, "empty text"),
        ("good\t1\n\nbad\t0\n", 2, "empty line"),
        ("good\t-1\n", 1, "out of range"),
    ],
)
def test_tsv_malformed_names_file_and_line(
    tmp_path: Path, content: str, line: int, fragment: str
) -> None:
    p = tmp_path / "bad.tsv"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_examples(p)
    assert f"{p}:{line}:" in info.value.message
    assert fragment in info.value.message


def test_label_out_of_range_for_names(tmp_path: Path) -> None:
    p = tmp_path / "x.tsv"
    p.write_text("good\t2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x.tsv:1: label 2 out of range"):
        read_examples(p, label_names=["negative", "positive"])


def test_csv(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_text('id,sentence,y\n1,"hello, world",pos\n2,bye,neg\n', encoding="utf-8")
    got = read_examples(p, text_column="sentence", label_column="y", label_names=["neg", "pos"])
    assert got == [Example("hello, world", 1), Example("bye", 0)]


def test_csv_missing_column_and_bad_row(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_text("sentence,label\nhi,1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x.csv:1: .*lacks column\(s\) \['text'\]"):
        read_examples(p)
    p.write_text("text,label\nhi,1\nbye,0,3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x.csv:3: 3 columns; expected 2"):
        read_examples(p)


def test_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text(
        '{"text": "nice", "label": 1}\n{"text": "ugh", "label": "negative"}\n\n', encoding="utf-8"
    )
    got = read_examples(p, label_names=["negative", "positive"])
    assert got == [Example("nice", 1), Example("ugh", 0)]


@pytest.mark.parametrize(
    "line2,fragment",
    [
        ('{"text": "x"', "invalid JSON"),
        ('{"text": "x"}', "missing key 'label'"),
        ('{"text": "", "label": 0}', "empty text"),
        ('{"text": "x", "label": true}', "boolean"),
        ('{"text": "x", "label": "maybe"}', "bad label 'maybe'"),
        ("[1, 2]", "expected an object"),
    ],
)
def test_jsonl_malformed(tmp_path: Path, line2: str, fragment: str) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok", "label": 0}\n' + line2 + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_examples(p, label_names=["negative", "positive"])
    assert f"{p}:2:" in info.value.message and fragment in info.value.message


def test_format_inference_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "x.txt"
    p.write_text("good\t1\n", encoding="utf-8")
    with pytest.raises(InvalidArgument, match="suffix"):
        read_examples(p)
    assert read_examples(p, "tsv") == [Example("good", 1)]
    with pytest.raises(NotFound):
        read_examples(tmp_path / "missing.tsv")
    empty = tmp_path / "e.tsv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no examples"):
        read_examples(empty)


def test_jsonl_roundtrip_and_hash(tmp_path: Path) -> None:
    exs = [Example("a ünïcode text", 1), Example('tab\tinside? no, quotes " ok', 0)]
    p = tmp_path / "t.jsonl"
    write_jsonl(p, exs)
    assert read_examples(p) == exs
    h = sha256_of_examples(exs)
    assert h == sha256_of_examples(list(exs))
    assert len(h) == 64
    assert h != sha256_of_examples(exs[::-1])
    assert h != sha256_of_examples([exs[0], Example(exs[1].text, 1)])
    # the separator is unambiguous: moving text between examples changes the hash
    assert sha256_of_examples([Example("ab", 0), Example("c", 0)]) != sha256_of_examples(
        [Example("a", 0), Example("bc", 0)]
    )
    assert json.loads(p.read_text(encoding="utf-8").splitlines()[0])["text"] == exs[0].text


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets installed")
def test_load_hf_dataset_without_datasets() -> None:
    with pytest.raises(FailedPrecondition, match="datasets"):
        load_hf_dataset("glue", "train", config_name="sst2")
