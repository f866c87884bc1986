"""Issue 15 item 2: `pairdots import` makes a bundle from an already fine-tuned classifier and
its training data without re-training (θ bit-identical to the source, evaluated on the dev
file, index and curvatures fitted, manifest says pairdots did not train it), from a directory
and from an MLflow registry (a local file store made here: models:/ and runs:/ URIs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from news4 import NEWS_CLASSES, news_rows, write_news_csv
from pdserver_util import start_server

from pairdots_server.cli.main import main
from pairdots_server.config import ServerConfig
from pairdots_server.influence.runtime import LOWRANK_FILE
from pairdots_server.model.task import Task
from pairdots_server.model.train import TrainConfig, evaluate, fine_tune
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.storage.data import Example
from pairdots_server.testing import build_tiny_model_dir

FAST = [
    "--max-length",
    "32",
    "--index-dim",
    "32",
    "--low-rank",
    "4",
    "--curvature-batch-size",
    "8",
    "--quiet",
]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-class classifier fine-tuned outside pairdots's prepare, saved with its id2label."""
    d = tmp_path_factory.mktemp("user-model")
    build_tiny_model_dir(d / "base", num_labels=4)
    task = Task.from_pretrained(d / "base", labels=list(NEWS_CLASSES))
    train = [Example(t, y) for y, t in news_rows(64)]
    fine_tune(
        task, train, TrainConfig(epochs=6, batch_size=8, lr=3e-3, max_length=32, warmup_ratio=0.0)
    )
    task.save_pretrained(d / "finetuned")
    return d / "finetuned"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("news")
    return (
        write_news_csv(d / "train.csv", news_rows(64), names=True),
        write_news_csv(d / "dev.csv", news_rows(16, seed=1), names=True),
    )


def _weights(task: Task) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.model.state_dict().items()}


def _import(model: str, data: tuple[Path, Path], root: Path, name: str, *more: str) -> Path:
    rc = main(
        [
            "import",
            "--model",
            model,
            "--train",
            str(data[0]),
            "--dev",
            str(data[1]),
            "--text-column",
            "content",
            "--name",
            name,
            "--out",
            str(root),
            *FAST,
            *more,
        ]
    )
    assert rc == 0
    return root / name


def test_import_dir_keeps_theta_evaluates_and_serves(
    finetuned: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    root = tmp_path / "bundles"
    path = _import(str(finetuned), data, root, "news")
    b = load_bundle(path)
    src = Task.from_pretrained(finetuned)
    want, got = _weights(src), _weights(b.task)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)  # not re-trained: bit-identical
    m = b.manifest
    assert m["train"]["trained_by_pairdots"] is False and m["model"]["imported"] is True
    assert m["model"]["source"] == str(finetuned) and m["model"]["weights_sha256"]
    assert b.labels == list(NEWS_CLASSES)  # from the model's id2label
    dev = [Example(t, y) for y, t in news_rows(16, seed=1)]
    ev = evaluate(src, dev, max_length=32)
    assert m["dev"]["count"] == 16 and m["dev"]["accuracy"] == pytest.approx(ev.accuracy)
    assert any(f.startswith("index/") for f in m["files"]) and LOWRANK_FILE in m["files"]
    assert "curvature" in m and {"ekfac", "diagonal"} <= set(m["curvature"])

    server = start_server(ServerConfig(bundles=root, port=0, jobs_db=tmp_path / "jobs.db"))
    try:
        with server.client() as client:
            assert list(client.get_model("news").labels) == list(NEWS_CLASSES)
            expl = client.explain(
                "the stock market fell", model="news", top_words=1, examples_per_word=2
            )
    finally:
        server.stop()
    probs = src.predict(["the stock market fell"], max_length=32)[0]
    assert expl.prediction.probabilities == pytest.approx(probs.tolist(), abs=1e-5)
    assert expl.prediction.label_name == NEWS_CLASSES[int(probs.argmax())]


def test_import_errors(
    finetuned: Path, data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "import",
        "--train",
        str(data[0]),
        "--text-column",
        "content",
        "--name",
        "x",
        "--out",
        str(tmp_path / "b"),
        *FAST,
    ]
    assert main([*base, "--model", str(tmp_path / "nope")]) == 2
    assert "config.json missing" in capsys.readouterr().err
    assert main([*base, "--model", str(finetuned), "--labels", "a,b"]) == 2
    assert "2 label names for a model with 4 outputs" in capsys.readouterr().err
    # data labels that are not the model's classes: the message lists them and the fix
    assert main([*base, "--model", str(finetuned), "--labels", "w,s,b,t"]) == 2
    err = capsys.readouterr().err
    assert "bad label 'World'" in err and "--labels" in err
    assert not (tmp_path / "b" / "x").exists()


def test_import_from_mlflow_registry(
    finetuned: Path,
    data: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mlflow = pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store, no server
    uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(finetuned), artifact_path="model")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("news-classifier")
    client.create_model_version(
        "news-classifier", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    root = tmp_path / "bundles"
    want = _weights(Task.from_pretrained(finetuned))
    for name, model_uri in (
        ("from-registry", "models:/news-classifier/1"),
        ("from-run", f"runs:/{run.info.run_id}/model"),
    ):
        path = _import(
            model_uri,
            data,
            root,
            name,
            "--mlflow-tracking-uri",
            uri,
            "--no-ekfac",
            "--no-diagonal",
            "--low-rank",
            "0",
            "--no-index",
        )
        b = load_bundle(path)
        got = _weights(b.task)
        assert all(torch.equal(want[k], got[k]) for k in want), model_uri
        assert b.manifest["model"]["source"] == model_uri
        assert b.manifest["train"]["trained_by_pairdots"] is False
    assert (
        main(
            [
                "import",
                "--model",
                "models:/news-classifier/7",
                "--train",
                str(data[0]),
                "--text-column",
                "content",
                "--name",
                "y",
                "--out",
                str(root),
                "--mlflow-tracking-uri",
                uri,
                *FAST,
            ]
        )
        == 2
    )
    assert "could not download models:/news-classifier/7" in capsys.readouterr().err
