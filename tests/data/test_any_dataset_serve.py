"""Issue 15 item 1, done-when: the 4-class `label,content` CSV prepares with flags alone, and
its bundle serves 4 label names through a real server (ListModels, the prediction, every
returned training example)."""

from __future__ import annotations

from pathlib import Path

import pytest
from news4 import NEWS_CLASSES, news_rows, write_news_csv
from pdserver_util import start_server

from pairdots_server.cli.main import main
from pairdots_server.config import ServerConfig
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.testing import build_tiny_model_dir

PREPARE_FAST = [
    "--max-length",
    "32",
    "--batch-size",
    "8",
    "--lr",
    "3e-3",
    "--index-dim",
    "32",
    "--low-rank",
    "4",
    "--curvature-batch-size",
    "8",
    "--quiet",
]


def test_four_class_csv_prepares_with_flags_alone_and_serves_label_names(
    tmp_path: Path,
) -> None:
    model = build_tiny_model_dir(tmp_path / "base", num_labels=2)  # a 2-output base: new head
    train = write_news_csv(tmp_path / "news.csv", news_rows(64), base=1)
    dev = write_news_csv(tmp_path / "news-dev.csv", news_rows(16, seed=1), base=1)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(NEWS_CLASSES) + "\n", encoding="utf-8")
    root = tmp_path / "bundles"
    rc = main(
        [
            "prepare",
            "--model",
            str(model),
            "--train",
            str(train),
            "--dev",
            str(dev),
            "--text-column",
            "content",
            "--label-column",
            "label",
            "--classes-file",
            str(classes),
            "--name",
            "news",
            "--out",
            str(root),
            "--epochs",
            "6",
            *PREPARE_FAST,
        ]
    )
    assert rc == 0
    b = load_bundle(root / "news")
    assert b.labels == list(NEWS_CLASSES) and b.task.model.config.num_labels == 4
    assert b.manifest["dev"]["count"] == 16 and b.manifest["train"]["trained_by_pairdots"]
    # label k of the file (1-based) is class k-1 in the bundle
    assert [e.label for e in b.train] == [y for y, _ in news_rows(64)]

    server = start_server(ServerConfig(bundles=root, port=0, jobs_db=tmp_path / "jobs.db"))
    try:
        with server.client() as client:
            assert list(client.get_model("news").labels) == list(NEWS_CLASSES)
            expl = client.explain(
                "the team won the match", model="news", top_words=1, examples_per_word=3
            )
    finally:
        server.stop()
    assert len(expl.prediction.probabilities) == 4
    assert expl.prediction.label_name == NEWS_CLASSES[expl.prediction.label]
    target = expl.target
    assert target is not None and target.label_name == NEWS_CLASSES[target.label]
    examples = list(target.prediction.supporting) if target.prediction else []
    for w in target.salient_words:
        examples += list(w.supporting) + list(w.opposing)
    assert examples
    for ex in examples:
        assert ex.label_name == NEWS_CLASSES[ex.label]


def test_prepare_errors_name_the_columns_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = build_tiny_model_dir(tmp_path / "base")
    train = write_news_csv(tmp_path / "news.csv", news_rows(8), base=1)
    args = [
        "prepare",
        "--model",
        str(model),
        "--train",
        str(train),
        "--dev",
        "",
        "--name",
        "x",
        "--out",
        str(tmp_path / "b"),
        *PREPARE_FAST,
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "['label', 'content']" in err and "--text-column/--label-column" in err
    assert main([*args, "--text-column", "content", "--labels", "a,b"]) == 2
    err = capsys.readouterr().err
    assert "label 3 out of range" in err and "--classes-file" in err
    assert not (tmp_path / "b" / "x").exists()
