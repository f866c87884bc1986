"""prepare_bundle end to end on a tiny model; crash safety; make_tiny_bundle; MiniLM (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pairdots_server.errors import AlreadyExists, Cancelled, InvalidArgument
from pairdots_server.model.prepare import PrepareConfig, packaged_minilm_dir, prepare_bundle
from pairdots_server.model.scope import ScopeSpec
from pairdots_server.model.task import Task
from pairdots_server.model.train import TrainConfig
from pairdots_server.storage.bundle import discover_bundles, load_bundle
from pairdots_server.storage.data import Example, read_examples
from pairdots_server.storage.update import read_artifact
from pairdots_server.testing import make_tiny_bundle, synthetic_examples


def _tsv(path: Path, exs: list[Example]) -> Path:
    path.write_text("".join(f"{e.text}\t{e.label}\n" for e in exs), encoding="utf-8")
    return path


@pytest.fixture
def cfg(tiny_dir: Path, tmp_path: Path) -> PrepareConfig:
    return PrepareConfig(
        model_path=str(tiny_dir),
        train_path=str(_tsv(tmp_path / "train.tsv", synthetic_examples(24, seed=1))),
        dev_path=str(_tsv(tmp_path / "dev.tsv", synthetic_examples(8, seed=2))),
        name="tiny-prep",
        out_root=str(tmp_path / "bundles"),
        labels=("negative", "positive"),
        scope=ScopeSpec("head"),
        train=TrainConfig(batch_size=8, lr=1e-3, max_length=32),
    )


def test_prepare_bundle_end_to_end(cfg: PrepareConfig, tmp_path: Path) -> None:
    seen = {}

    def after_train(task: Task, train: list[Example], scratch: Path) -> dict[str, bytes | Path]:
        seen["n"] = len(train)
        seen["training"] = task.model.training
        (scratch / "vectors.bin").write_bytes(b"\x00" * 16)
        return {"index/vectors.bin": scratch / "vectors.bin", "index/meta.json": b"{}"}

    path = prepare_bundle(
        cfg,
        progress=False,
        after_train=after_train,
        manifest_extra={"defaults": {"solver": "lissa"}},
    )
    assert path == Path(cfg.out_root) / "tiny-prep"
    assert seen == {"n": 24, "training": False}
    b = load_bundle(path)
    m = b.manifest
    assert b.train == read_examples(cfg.train_path)  # type: ignore[arg-type]
    assert b.task.scope == ScopeSpec("head") and b.labels == ["negative", "positive"]
    assert m["dev"]["count"] == 8 and 0.0 <= m["dev"]["accuracy"] <= 1.0
    assert m["train"]["steps"] == 3 and m["train"]["batch_size"] == 8
    assert m["dataset"]["path"] == cfg.train_path and m["model"]["source"] == cfg.model_path
    assert m["defaults"] == {"solver": "lissa"}
    assert read_artifact(b, "index/vectors.bin").read_bytes() == b"\x00" * 16
    # fine-tuned weights differ from the starting checkpoint, and the scratch dir is gone
    start = Task.from_pretrained(cfg.model_path, labels=["negative", "positive"])  # type: ignore[arg-type]
    assert not torch.equal(
        start.model.classifier.weight.float(), b.task.model.classifier.weight.float()
    )
    assert sorted(p.name for p in Path(cfg.out_root).iterdir()) == ["tiny-prep"]
    with pytest.raises(AlreadyExists):
        prepare_bundle(cfg, progress=False)


def test_crash_in_after_train_leaves_no_bundle(cfg: PrepareConfig) -> None:
    def boom(task: Task, train: list[Example], scratch: Path) -> dict[str, bytes | Path]:
        (scratch / "half.bin").write_bytes(b"x")
        raise RuntimeError("index build failed (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        prepare_bundle(cfg, progress=False, after_train=boom)
    root = Path(cfg.out_root)
    assert list(root.iterdir()) == []
    assert discover_bundles(root) == ([], {})


def test_cancel_during_fine_tune_leaves_no_bundle(cfg: PrepareConfig) -> None:
    calls = []

    def stop() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise Cancelled("operator cancelled")

    with pytest.raises(Cancelled):
        prepare_bundle(cfg, progress=False, should_stop=stop)
    root = Path(cfg.out_root)
    assert not root.exists() or list(root.iterdir()) == []


def test_prepare_config_validation(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="bundle name"):
        PrepareConfig(name="../x")
    with pytest.raises(InvalidArgument, match="repeat"):
        PrepareConfig(labels=("a", "a"))
    with pytest.raises(InvalidArgument, match="at least 2"):
        PrepareConfig(labels=("only",))
    with pytest.raises(InvalidArgument, match="limit_train"):
        PrepareConfig(limit_train=0)
    # custom train data without dev data → no evaluation; "" disables dev explicitly
    assert PrepareConfig(train_path=str(tmp_path / "t.tsv")).resolved_dev_path() is None
    assert PrepareConfig(dev_path="").resolved_dev_path() is None
    # label names: SST-2's for the default SST-2 data, else the data's (None here)
    assert PrepareConfig().label_spec().names == ("negative", "positive")
    assert PrepareConfig(train_path=str(tmp_path / "t.tsv")).label_spec().names is None


def test_make_tiny_bundle_deterministic(tmp_path: Path) -> None:
    a = make_tiny_bundle(tmp_path, "a", n_train=16, finetune_steps=5)
    b = make_tiny_bundle(tmp_path, "b", n_train=16, finetune_steps=5)
    c = make_tiny_bundle(tmp_path, "c", n_train=16, finetune_steps=5, seed=1)
    fa, fb, fc = (json.loads((p / "manifest.json").read_text())["files"] for p in (a, b, c))
    assert fa == fb
    assert fa["model/model.safetensors"] != fc["model/model.safetensors"]
    bundle = load_bundle(a)
    assert len(bundle.train) == 16 and bundle.manifest["train"]["steps"] == 5
    assert (
        bundle.task.tokenizer.unk_token_id
        not in bundle.task.encode([e.text for e in bundle.train]).input_ids
    )


@pytest.mark.slow
def test_minilm_loads_and_encodes() -> None:
    task = Task.from_pretrained(packaged_minilm_dir(), labels=["negative", "positive"])
    enc = task.encode(["A stirring, funny re-imagining!"])
    assert enc.words[0] == ["A", "stirring", ",", "funny", "re", "-", "imagining", "!"]
    assert enc.word_ids[0][0] is None and enc.word_ids[0][-1] is None
    assert sum(t.numel() for t in task.scope_params().values()) == 1_923_074
    with torch.no_grad():
        got = task.forward_ids(enc.input_ids, enc.attention_mask)
        ref = task.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert task.model.config._attn_implementation == "eager"


@pytest.mark.slow
def test_minilm_prepare_small(tmp_path: Path) -> None:
    cfg = PrepareConfig(
        out_root=str(tmp_path),
        name="minilm-small",
        limit_train=64,
        limit_dev=64,
        train=TrainConfig(batch_size=16, max_steps=4),
    )
    b = load_bundle(prepare_bundle(cfg, progress=False))
    assert b.manifest["train"]["steps"] == 4 and len(b.train) == 64
    assert b.manifest["dev"]["count"] == 64
