"""Bundles on disk: save/load roundtrip, verification, atomicity, update, discovery, names."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import pairdots_server.storage.atomic as atomic_mod
import pairdots_server.storage.bundle as bundle_mod
import pairdots_server.storage.data as data_mod
from pairdots_server.errors import AlreadyExists, BundleError, InvalidArgument, NotFound
from pairdots_server.model.scope import ScopeSpec
from pairdots_server.model.task import Task
from pairdots_server.storage.bundle import (
    FORMAT_VERSION,
    discover_bundles,
    load_bundle,
    save_bundle,
    validate_bundle_name,
)
from pairdots_server.storage.data import Example
from pairdots_server.storage.update import read_artifact, update_bundle

TEXTS = ["a great film", "boring and awful", "I loved it!"]


@pytest.fixture
def tiny(tiny_bundle_root: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny bundle, free to corrupt."""
    root = tmp_path / "bundles"
    root.mkdir()
    return Path(shutil.copytree(tiny_bundle_root / "tiny", root / "tiny"))


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text(encoding="utf-8"))


def _write_manifest(path: Path, m: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(m), encoding="utf-8")


def _visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.mark.parametrize("name", ["tiny", "minilm-sst2", "a", "m.v1_2", "0" * 63])
def test_good_names(name: str) -> None:
    assert validate_bundle_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Tiny", "-x", ".x", "a/b", "../x", "a..b", "x" * 64, "a b", "a\\b", "é"]
)
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidArgument, match="bundle name"):
        validate_bundle_name(name)


def test_roundtrip_predictions_identical(tiny_task: Task, tmp_path: Path) -> None:
    train = [Example("good film", 1), Example("bad film", 0), Example("a ünïcode one", 1)]
    tiny_task.set_scope(ScopeSpec("last_n", n=2))
    extra = {"dataset": {"path": "mem"}, "defaults": {"curvature": "ggn"}, "dev": {"accuracy": 0.5}}
    path = save_bundle(tmp_path, "rt", tiny_task, train, extra)
    assert path == tmp_path / "rt" and _visible(tmp_path) == ["rt"]
    b = load_bundle(path)
    assert b.name == "rt" and b.train == train and b.labels == ["negative", "positive"]
    assert b.task.dtype == torch.float64 and b.task.scope == ScopeSpec("last_n", n=2)
    torch.testing.assert_close(b.task.predict(TEXTS), tiny_task.predict(TEXTS), rtol=0, atol=0)
    m = b.manifest
    assert m["format_version"] == FORMAT_VERSION
    assert m["dataset"] == {"path": "mem", "sha256": data_mod.sha256_of_examples(train), "count": 3}
    assert m["defaults"] == {"curvature": "ggn"} and m["dev"] == {"accuracy": 0.5}
    assert m["scope"] == {"kind": "last_n", "n": 2, "pattern": ""}
    assert {"torch", "transformers"} <= set(m["versions"])
    assert {"model/model.safetensors", "model/config.json", "train.jsonl"} <= set(m["files"])
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in m["files"])
    assert all((path / f).stat().st_mode & 0o444 == 0o444 for f in m["files"])  # readable
    with pytest.raises(AlreadyExists):
        save_bundle(tmp_path, "rt", tiny_task, train, {})
    with pytest.raises(InvalidArgument, match="managed by pairdots"):
        save_bundle(tmp_path, "rt2", tiny_task, train, {"files": {}})


def test_overwrite_replaces_atomically(tiny_task: Task, tmp_path: Path) -> None:
    save_bundle(tmp_path, "ow", tiny_task, [Example("one", 1)], {})
    save_bundle(
        tmp_path, "ow", tiny_task, [Example("two", 0), Example("three", 1)], {}, overwrite=True
    )
    assert _visible(tmp_path) == ["ow"]
    assert load_bundle(tmp_path / "ow").train == [Example("two", 0), Example("three", 1)]


def test_corrupted_file_is_rejected(tiny: Path) -> None:
    weights = tiny / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        load_bundle(tiny)
    msg = info.value.message
    assert "'tiny'" in msg and "model/model.safetensors" in msg and "pairdots prepare" in msg


def test_edited_train_file_is_rejected(tiny: Path) -> None:
    path = tiny / "train.jsonl"
    path.write_text(
        path.read_text(encoding="utf-8").replace('"label": 1', '"label": 0', 1), encoding="utf-8"
    )
    with pytest.raises(BundleError, match="train.jsonl does not match its SHA-256"):
        load_bundle(tiny)


def test_missing_file_is_rejected_even_without_hashing(tiny: Path) -> None:
    (tiny / "model" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="model/tokenizer.json is missing"):
        load_bundle(tiny, verify=False)


@pytest.mark.parametrize(
    "tamper,fragment",
    [
        (lambda m: m.update(format_version=2), "format_version 2"),
        (lambda m: m["files"].update({"train.jsonl": "0" * 64}), "train.jsonl does not match"),
        (lambda m: m["files"].pop("train.jsonl"), "does not list train.jsonl"),
        (lambda m: m["files"].update({"../evil": "0" * 64}), "bad path '../evil'"),
        (lambda m: m["dataset"].update(sha256="f" * 64), "dataset SHA-256"),
        (lambda m: m["dataset"].update(count=3), "the manifest says 3"),
        (lambda m: m.update(labels=["a", "b", "c"]), "3 labels"),
        (lambda m: m.update(name="Bad/Name"), "invalid"),
        (lambda m: m.pop("files"), "'files'"),
        (lambda m: m.update(scope={"kind": "bogus"}), "unknown scope kind"),
    ],
)
def test_tampered_manifest_is_rejected(tiny: Path, tamper, fragment: str) -> None:  # type: ignore[no-untyped-def]
    m = _manifest(tiny)
    tamper(m)
    _write_manifest(tiny, m)
    with pytest.raises(BundleError) as info:
        load_bundle(tiny)
    assert fragment in info.value.message and "pairdots prepare" in info.value.message


def test_unreadable_manifest(tiny: Path, tmp_path: Path) -> None:
    (tiny / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tiny)
    (tiny / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tiny)
    with pytest.raises(NotFound):
        load_bundle(tmp_path / "nowhere")


def _raise(*_a: object, **_k: object) -> None:
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("target", ["write_jsonl", "rename", "manifest"])
def test_crash_mid_save_leaves_nothing(
    tiny_task: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    if target == "write_jsonl":
        monkeypatch.setattr(data_mod, "write_jsonl", _raise)
    elif target == "rename":
        monkeypatch.setattr(bundle_mod.os, "rename", _raise)
    else:
        monkeypatch.setattr(atomic_mod, "write_json_atomic", _raise)
    with pytest.raises(OSError, match="simulated"):
        save_bundle(tmp_path, "crash", tiny_task, [Example("x", 1)], {})
    assert _visible(tmp_path) == []  # neither the bundle nor a temp dir is left
    monkeypatch.undo()
    good, bad = discover_bundles(tmp_path)
    assert good == [] and bad == {}


def test_crash_mid_overwrite_keeps_old(
    tiny_task: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_bundle(tmp_path, "keep", tiny_task, [Example("old", 1)], {})
    monkeypatch.setattr(data_mod, "write_jsonl", _raise)
    with pytest.raises(OSError):
        save_bundle(tmp_path, "keep", tiny_task, [Example("new", 1)], {}, overwrite=True)
    monkeypatch.undo()
    assert _visible(tmp_path) == ["keep"]
    assert load_bundle(tmp_path / "keep").train == [Example("old", 1)]


def test_update_bundle_adds_and_replaces(tiny: Path, tmp_path: Path) -> None:
    src = tmp_path / "vec.bin"
    src.write_bytes(b"\x01\x02\x03")
    m = update_bundle(
        tiny,
        {"index/vectors.bin": src, "lowrank.safetensors": b"abc"},
        {"defaults": {"solver": "lowrank"}, "index": {"dim": 8}},
    )
    assert m["defaults"]["solver"] == "lowrank" and m["index"] == {"dim": 8}
    b = load_bundle(tiny)
    assert read_artifact(b, "index/vectors.bin").read_bytes() == b"\x01\x02\x03"
    assert b.has_artifact("lowrank.safetensors")
    # replace one file, merge deeper, delete a key with None
    update_bundle(
        tiny, {"lowrank.safetensors": b"xyz"}, {"defaults": {"curvature": "ggn"}, "index": None}
    )
    b = load_bundle(tiny)
    assert read_artifact(b, "lowrank.safetensors").read_bytes() == b"xyz"
    assert b.manifest["defaults"] == {"solver": "lowrank", "curvature": "ggn"}
    assert "index" not in b.manifest
    with pytest.raises(NotFound, match="no artifact"):
        read_artifact(b, "index/faiss.index")
    with pytest.raises(InvalidArgument):
        update_bundle(tiny, {"../outside": b"x"}, {})
    with pytest.raises(InvalidArgument):
        update_bundle(tiny, {"manifest.json": b"{}"}, {})
    with pytest.raises(InvalidArgument, match="managed by pairdots"):
        update_bundle(tiny, {}, {"format_version": 9})


def test_update_crash_never_lists_a_bad_file(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    update_bundle(tiny, {"lowrank.safetensors": b"v1"}, {})
    real_write = atomic_mod.write_file
    calls = []

    def half_write(dest: Path, content: bytes | Path) -> None:
        calls.append(dest)
        dest.write_bytes(b"partial")  # the old content is already gone...
        raise OSError("killed (simulated)")  # ...and the process dies

    monkeypatch.setattr(atomic_mod, "write_file", half_write)
    with pytest.raises(OSError, match="simulated"):
        update_bundle(tiny, {"lowrank.safetensors": b"v2"}, {"defaults": {"x": 1}})
    monkeypatch.setattr(atomic_mod, "write_file", real_write)
    assert calls
    b = load_bundle(tiny)  # still loads and verifies: the replaced file is no longer listed
    assert not b.has_artifact("lowrank.safetensors")
    assert "x" not in b.manifest["defaults"]


def test_discover_bundles(tiny: Path, tiny_task: Task) -> None:
    root = tiny.parent
    bad = Path(shutil.copytree(tiny, root / "broken"))
    (bad / "model" / "config.json").write_text("{}", encoding="utf-8")
    dup = Path(shutil.copytree(tiny, root / "zz-dup"))
    (root / ".tmp-half-1234").mkdir()
    (root / "stray-file.txt").write_text("ignore me", encoding="utf-8")
    good, errors = discover_bundles(root)
    assert [b.name for b in good] == ["tiny"]
    assert set(errors) == {str(bad), str(dup)}
    assert "model/config.json" in errors[str(bad)]
    assert "same name" in errors[str(dup)]
    with pytest.raises(NotFound):
        discover_bundles(root / "missing")


def test_library_never_unpickles(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_bundle(tiny)
    assert os.path.isfile(tiny / "model" / "model.safetensors")
