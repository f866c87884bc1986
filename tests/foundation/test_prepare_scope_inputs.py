"""`pairdots prepare` stores the scope inputs (h_L of every training example) by default,
reusing the rows its index build computed, keyed so that the saved bundle uses them.

Reference: the served runtime of the saved bundle recomputes h_L of every example with its
own trunk (float64 tiny model); the stored float32 rows must match it to float32 round-off
(1e-6 of the largest value), and the runtime must load them instead of computing any."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pairdots_server.cli.main import main
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.scope_inputs import SCOPE_INPUTS_FILE
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.storage.manifest import verify_bundle
from pairdots_server.testing import synthetic_examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prepare(tiny_dir: Path, tmp_path: Path, name: str, *flags: str) -> Path:
    train = tmp_path / "train.tsv"
    train.write_text("".join(f"{e.text}\t{e.label}\n" for e in synthetic_examples(24, seed=2)),
                     encoding="utf-8")
    rc = main([
        "prepare", "--model", str(tiny_dir), "--train", str(train), "--dev", "",
        "--name", name, "--out", str(tmp_path / "bundles"), "--low-rank", "0", "--no-ekfac",
        "--index-dim", "16", "--max-steps", "2", "--batch-size", "8", "--max-length", "32",
        "--quiet", *flags,
    ])
    assert rc == 0
    return tmp_path / "bundles" / name


def test_prepare_stores_scope_inputs_that_the_served_bundle_uses(
    tiny_dir: Path, tmp_path: Path
) -> None:
    path = _prepare(tiny_dir, tmp_path, "si", "--scope-inputs", "float32")
    m = verify_bundle(path)  # the file is listed and hashed
    assert SCOPE_INPUTS_FILE in m["files"]
    info = m["scope_inputs"]
    assert info["dtype"] == "float32" and info["count"] == 24
    assert info["reused"] == 24  # the index build had computed every row

    rt = ModelRuntime(load_bundle(path))
    cache = rt.scope_inputs()
    assert cache is not None and rt.split is not None
    assert rt.scope_inputs_note == ""  # the key matched the saved bundle
    assert cache.loaded == 24
    stored = cache.rows(range(24))
    assert cache.computed == 0
    enc = rt.encode_train(list(range(24)))
    fresh = rt.split.trunk(enc.embeds, enc.mask)  # [24,T,D] in float64
    scale = float(fresh.abs().max())
    for i, row in enumerate(stored):
        n = int(enc.mask[i].sum())
        assert row.shape[0] == n
        assert float((row.double() - fresh[i, :n]).abs().max()) <= 1e-6 * scale


def test_scope_inputs_none_and_default(tiny_dir: Path, tmp_path: Path) -> None:
    bare = _prepare(tiny_dir, tmp_path, "bare", "--scope-inputs", "none")
    assert SCOPE_INPUTS_FILE not in json.loads((bare / "manifest.json").read_text())["files"]
    default = _prepare(tiny_dir, tmp_path, "dflt")
    m = verify_bundle(default)
    assert m["scope_inputs"]["dtype"] == "float16"
    rt = ModelRuntime(load_bundle(default))
    cache = rt.scope_inputs()
    assert cache is not None and cache.loaded == 24
    assert cache.rows([0])[0].dtype == torch.float16

    # re-storing at a higher precision recomputes the rows instead of widening float16 ones
    assert main(["index", "scope-inputs", "--bundle", str(default), "--dtype", "float32",
                 "--quiet"]) == 0
    m32 = verify_bundle(default)
    assert m32["scope_inputs"]["dtype"] == "float32" and m32["scope_inputs"]["reused"] == 0
    rt32 = ModelRuntime(load_bundle(default))
    cache32 = rt32.scope_inputs()
    assert cache32 is not None and rt32.split is not None and cache32.loaded == 24
    enc = rt32.encode_train([3])
    fresh = rt32.split.trunk(enc.embeds, enc.mask)[0]
    row = cache32.rows([3])[0]
    assert float((row.double() - fresh[: row.shape[0]]).abs().max()) <= 1e-6 * float(
        fresh.abs().max())


def test_default_index_dimension_grows_with_the_budget(tiny_dir: Path, tmp_path: Path) -> None:
    """k = 4096 while N · k · 4 bytes fits 256 MiB, then 2048, then 1024; explicit --index-dim
    and the dense Gaussian projection (its P × k matrix) keep their own; prepare's default
    reaches the stored index."""
    from pairdots_server.index.store import load_index_data
    from pairdots_server.influence.artifacts import INDEX_DEFAULT_BYTES, ArtifactConfig

    cfg = ArtifactConfig()
    per_4096 = INDEX_DEFAULT_BYTES // (4096 * 4)  # examples that fit at k = 4096
    assert cfg.resolved_dim(6920) == 4096 and cfg.resolved_dim(per_4096) == 4096
    assert cfg.resolved_dim(per_4096 + 1) == 2048
    assert cfg.resolved_dim(2 * per_4096) == 2048
    assert cfg.resolved_dim(2 * per_4096 + 1) == 1024
    assert ArtifactConfig(index_dim=64).resolved_dim(10) == 64
    assert ArtifactConfig(index_projection="gaussian").resolved_dim(10) == 1024

    train = tmp_path / "train.tsv"
    train.write_text("".join(f"{e.text}\t{e.label}\n" for e in synthetic_examples(24, seed=2)),
                     encoding="utf-8")
    assert main([
        "prepare", "--model", str(tiny_dir), "--train", str(train), "--dev", "",
        "--name", "k", "--out", str(tmp_path / "bundles"), "--low-rank", "0", "--no-ekfac",
        "--max-steps", "1", "--batch-size", "8", "--max-length", "32", "--scope-inputs",
        "none", "--quiet",
    ]) == 0
    _, vectors, meta = load_index_data(tmp_path / "bundles" / "k" / "index")
    assert meta.out_dim == 4096 and vectors.shape == (24, 4096)
