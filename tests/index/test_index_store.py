"""Index directory: save/load roundtrip and every kind of corruption -> BundleError."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pairdots_server.errors import BundleError, InvalidArgument
from pairdots_server.index.exact import ExactIndex
from pairdots_server.index.faiss_index import FaissIndex
from pairdots_server.index.projection import GaussianProjection
from pairdots_server.index.store import (
    META_FILE,
    VECTORS_FILE,
    IndexMeta,
    load_index,
    load_index_data,
    save_index_data,
)

N, K = 120, 16


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, IndexMeta]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N, K)).astype(np.float32)
    ids = rng.permutation(N).astype(np.int64) + 1000
    meta = IndexMeta.for_projection(
        GaussianProjection(300, K, seed=9),
        count=N,
        scope="encoder.layer.5+pooler+classifier",
        kind="flat",
    )
    out = save_index_data(tmp_path / "index", ids, vectors, meta)
    return out, ids, vectors, meta


def test_roundtrip(saved: tuple[Path, np.ndarray, np.ndarray, IndexMeta]) -> None:
    out, ids, vectors, meta = saved
    got_ids, got_vectors, got_meta = load_index_data(out)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_vectors, vectors)
    assert got_meta == meta
    raw = json.loads((out / META_FILE).read_text())
    assert raw["format"] == "pairdots-index" and len(raw["vectors_sha256"]) == 64
    q = np.random.default_rng(1).standard_normal((4, K)).astype(np.float32)
    ref = ExactIndex(K)
    ref.add(vectors, ids)
    for kind, cls in ((None, FaissIndex), ("flat", FaissIndex), ("exact", ExactIndex)):
        index, m = load_index(out, kind=kind, use_gpu=False)
        assert isinstance(index, cls) and m == meta and index.ntotal == N
        np.testing.assert_array_equal(index.search(q, 7)[1], ref.search(q, 7)[1])


def test_meta_rebuilds_the_projection(
    saved: tuple[Path, np.ndarray, np.ndarray, IndexMeta],
) -> None:
    _, _, _, meta = saved
    assert torch.equal(meta.projection().dense(), GaussianProjection(300, K, seed=9).dense())


def _edit_meta(out: Path, **changes: object) -> None:
    raw = json.loads((out / META_FILE).read_text())
    raw.update(changes)
    (out / META_FILE).write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"count": N + 1}, "does not match"),
        ({"out_dim": K * 2}, "does not match"),
        ({"count": "120"}, "invalid metadata"),
        ({"kind": "hnsw"}, "invalid metadata"),
        ({"format_version": 99}, "format"),
        ({"projection_block_rows": 1024}, "block size"),
        ({"format": "something-else"}, "not a pairdots index"),
        ({"vectors_sha256": "0" * 64}, "SHA-256"),
    ],
)
def test_mismatched_meta(
    saved: tuple[Path, np.ndarray, np.ndarray, IndexMeta], changes: dict[str, object], match: str
) -> None:
    out = saved[0]
    _edit_meta(out, **changes)
    with pytest.raises(BundleError, match=match):
        load_index_data(out)


def test_missing_field(saved: tuple[Path, np.ndarray, np.ndarray, IndexMeta]) -> None:
    out = saved[0]
    raw = json.loads((out / META_FILE).read_text())
    del raw["projection_seed"]
    (out / META_FILE).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="projection_seed"):
        load_index_data(out)


def test_corrupted_files(saved: tuple[Path, np.ndarray, np.ndarray, IndexMeta]) -> None:
    out = saved[0]
    data = bytearray((out / VECTORS_FILE).read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the vector payload
    (out / VECTORS_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256"):
        load_index_data(out)
    # without the hash check the flipped payload still parses; a truncated file does not
    (out / VECTORS_FILE).write_bytes(bytes(data[:50]))
    with pytest.raises(BundleError, match="safetensors"):
        load_index_data(out, verify_hash=False)
    (out / VECTORS_FILE).unlink()
    with pytest.raises(BundleError, match="missing"):
        load_index_data(out)
    (out / META_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="JSON"):
        load_index_data(out)
    (out / META_FILE).unlink()
    with pytest.raises(BundleError, match="missing"):
        load_index(out)


def test_other_vectors_under_valid_meta(
    saved: tuple[Path, np.ndarray, np.ndarray, IndexMeta], tmp_path: Path
) -> None:
    out, ids, vectors, meta = saved
    # a valid index of 60 vectors copied over the 120-vector one, hash check off
    other = save_index_data(
        tmp_path / "other", ids[:60], vectors[:60], IndexMeta(**{**meta.to_dict(), "count": 60})
    )
    (out / VECTORS_FILE).write_bytes((other / VECTORS_FILE).read_bytes())
    with pytest.raises(BundleError, match="count=120"):
        load_index_data(out, verify_hash=False)


def test_save_validates(tmp_path: Path) -> None:
    meta = IndexMeta(projection_seed=0, in_dim=10, out_dim=4, kind="auto", count=3, scope="s")
    v = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(InvalidArgument):
        save_index_data(tmp_path, np.arange(2, dtype=np.int64), v[:2], meta)
    with pytest.raises(InvalidArgument):
        save_index_data(tmp_path, np.arange(3, dtype=np.int64), v.astype(np.float64), meta)
    with pytest.raises(InvalidArgument):
        save_index_data(tmp_path, np.zeros(3, dtype=np.int64), v, meta)
    with pytest.raises(InvalidArgument, match="kind"):
        IndexMeta(projection_seed=0, in_dim=10, out_dim=4, kind="hnsw", count=3, scope="s")
    assert not (tmp_path / META_FILE).exists()
