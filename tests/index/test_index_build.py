"""compute_projected, sharding (map) and merge (reduce) of the index build."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from pairdots_server.errors import BundleError, Cancelled, CancelToken, InvalidArgument
from pairdots_server.index.build import (
    build_shard,
    compute_projected,
    merge_shards,
    shard_from_env,
    shard_indices,
    write_shard,
)
from pairdots_server.index.projection import GaussianProjection
from pairdots_server.index.store import IndexMeta, load_index, save_index_data

P, K = 300, 24
N_EXAMPLES = 60
GRADS = torch.randn(N_EXAMPLES, P, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
INDICES = [3 * i + 1 for i in reversed(range(50))]  # 50 of the 60 examples, descending order


def grad_fn(batch: Sequence[int]) -> torch.Tensor:
    """Synthetic per-example gradients: row i of a fixed matrix ([B] -> [B, P])."""
    return GRADS[[i % N_EXAMPLES for i in batch]]


def _meta(projection: GaussianProjection, count: int, scope: str = "toy") -> IndexMeta:
    return IndexMeta.for_projection(projection, count=count, scope=scope)


def test_compute_projected_matches_direct_projection() -> None:
    proj = GaussianProjection(P, K, seed=1)
    ids, vectors = compute_projected(grad_fn, INDICES, proj, batch_size=7, progress=False)
    assert ids.dtype == np.int64 and ids.tolist() == INDICES
    assert vectors.dtype == np.float32 and vectors.shape == (50, K)
    direct = proj.project(grad_fn(INDICES)).numpy()
    np.testing.assert_allclose(vectors, direct, rtol=1e-5, atol=1e-5 * np.abs(direct).max())
    # batch size does not matter (up to float32 summation order)
    _, one_batch = compute_projected(grad_fn, INDICES, proj, batch_size=50, progress=False)
    np.testing.assert_allclose(vectors, one_batch, rtol=1e-5, atol=1e-5 * np.abs(direct).max())


def test_compute_projected_by_length_batches_short_rows_together_same_vectors() -> None:
    proj = GaussianProjection(P, K, seed=1)
    lengths = [(7 * i) % 13 for i in range(len(INDICES))]  # one per index, many ties
    seen: list[list[int]] = []

    def recording(batch: Sequence[int]) -> torch.Tensor:
        seen.append(list(batch))
        return grad_fn(batch)

    ids, vectors = compute_projected(recording, INDICES, proj, batch_size=7, progress=False,
                                     lengths=lengths)
    assert ids.tolist() == INDICES  # the caller's order, whatever the batching
    direct = proj.project(grad_fn(INDICES)).numpy()
    np.testing.assert_allclose(vectors, direct, rtol=1e-5, atol=1e-5 * np.abs(direct).max())
    by_index = dict(zip(INDICES, lengths, strict=True))
    flat = [by_index[i] for b in seen for i in b]
    assert flat == sorted(lengths) and sorted(i for b in seen for i in b) == sorted(INDICES)
    assert all(len(b) <= 7 for b in seen)
    with pytest.raises(InvalidArgument, match="lengths"):
        compute_projected(grad_fn, INDICES, proj, 7, progress=False, lengths=lengths[:-1])


def test_compute_projected_checks_and_cancels() -> None:
    proj = GaussianProjection(P, K, seed=1)
    with pytest.raises(InvalidArgument, match="in_dim"):
        compute_projected(lambda b: torch.zeros(len(b), P + 1), [0, 1], proj, 2, progress=False)
    with pytest.raises(InvalidArgument, match="unique"):
        compute_projected(grad_fn, [1, 1], proj, 2, progress=False)
    token, calls = CancelToken(), []

    def counting(batch: Sequence[int]) -> torch.Tensor:
        calls.append(len(batch))
        if len(calls) == 2:
            token.cancel("stop")
        return grad_fn(batch)

    with pytest.raises(Cancelled):
        compute_projected(counting, INDICES, proj, 5, progress=False, should_stop=token.check)
    assert calls == [5, 5]


def test_shard_indices_tile() -> None:
    for n in range(31):
        for s_count in range(1, 8):
            parts = [shard_indices(n, s, s_count) for s in range(s_count)]
            assert [i for r in parts for i in r] == list(range(n))
            sizes = [len(r) for r in parts]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(InvalidArgument):
        shard_indices(10, 3, 3)
    with pytest.raises(InvalidArgument):
        shard_indices(10, 0, 0)


def test_shard_from_env() -> None:
    env = {"JOB_COMPLETION_INDEX": "2", "PAIRDOTS_NUM_SHARDS": "8"}
    assert shard_from_env(environ=env) == (2, 8)
    assert shard_from_env(4, environ=env) == (2, 4)
    with pytest.raises(InvalidArgument, match="JOB_COMPLETION_INDEX"):
        shard_from_env(environ={})
    with pytest.raises(InvalidArgument):
        shard_from_env(environ={"JOB_COMPLETION_INDEX": "8", "PAIRDOTS_NUM_SHARDS": "8"})


def _build_all(out: Path, proj: GaussianProjection, num_shards: int = 3) -> None:
    meta = _meta(proj, len(INDICES))
    for s in range(num_shards):
        build_shard(grad_fn, INDICES, s, num_shards, proj, meta, out, batch_size=8, progress=False)


def test_sharded_build_equals_single_build(tmp_path: Path) -> None:
    proj = GaussianProjection(P, K, seed=2)
    _build_all(tmp_path / "parts", proj)
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == [
        f"part-0000{s}-of-00003.{ext}" for s in range(3) for ext in ("json", "safetensors")
    ]
    ids, vectors, meta = merge_shards(tmp_path / "parts")
    single_ids, single_vectors = compute_projected(grad_fn, INDICES, proj, 8, progress=False)
    order = np.argsort(single_ids)
    np.testing.assert_array_equal(ids, single_ids[order])
    assert (np.diff(ids) > 0).all()
    # each example is projected on its own row: equal up to float32 summation order
    np.testing.assert_allclose(vectors, single_vectors[order], rtol=1e-5, atol=1e-6)
    assert meta == _meta(proj, 50)
    # the merged result is a valid index directory
    save_index_data(tmp_path / "index", ids, vectors, meta)
    index, _ = load_index(tmp_path / "index", kind="flat", use_gpu=False)
    assert index.ntotal == 50


def test_missing_part(tmp_path: Path) -> None:
    _build_all(tmp_path, GaussianProjection(P, K, seed=2))
    (tmp_path / "part-00001-of-00003.json").unlink()
    with pytest.raises(BundleError, match="part-00001-of-00003"):
        merge_shards(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no part"):
        merge_shards(tmp_path / "empty")


def test_overlapping_parts(tmp_path: Path) -> None:
    proj = GaussianProjection(P, K, seed=2)
    _build_all(tmp_path / "a", proj)
    _build_all(tmp_path / "a", proj, num_shards=2)  # a stale build with another shard count
    with pytest.raises(BundleError, match="different shardings"):
        merge_shards(tmp_path / "a")
    # a part given the same examples as another (overlapping example lists)
    meta = _meta(proj, 50)
    ids0, vec0 = compute_projected(grad_fn, INDICES[:17], proj, 8, progress=False)
    for s in range(3):
        size = len(shard_indices(50, s, 3))
        write_shard(tmp_path / "b", s, 3, ids0[:size], vec0[:size], meta)
    with pytest.raises(BundleError, match="more than one part"):
        merge_shards(tmp_path / "b")


def test_inconsistent_or_corrupted_parts(tmp_path: Path) -> None:
    _build_all(tmp_path / "seed", GaussianProjection(P, K, seed=2))
    other = GaussianProjection(P, K, seed=3)  # part 2 rebuilt with another seed
    build_shard(grad_fn, INDICES, 2, 3, other, _meta(other, 50), tmp_path / "seed", 8, False)
    with pytest.raises(BundleError, match="different projection"):
        merge_shards(tmp_path / "seed")

    proj = GaussianProjection(P, K, seed=2)
    _build_all(tmp_path / "scope", proj)
    ids, vec = compute_projected(grad_fn, INDICES[:16], proj, 8, progress=False)
    write_shard(tmp_path / "scope", 0, 3, ids, vec, _meta(proj, 50, scope="other layers"))
    with pytest.raises(BundleError, match="scope"):
        merge_shards(tmp_path / "scope")

    _build_all(tmp_path / "sha", proj)
    path = tmp_path / "sha" / "part-00000-of-00003.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256"):
        merge_shards(tmp_path / "sha")

    _build_all(tmp_path / "range", proj)
    rec_path = tmp_path / "range" / "part-00001-of-00003.json"
    rec = json.loads(rec_path.read_text())
    rec["start"] += 1
    rec_path.write_text(json.dumps(rec))
    with pytest.raises(BundleError, match="must cover"):
        merge_shards(tmp_path / "range")


def test_write_shard_checks_size(tmp_path: Path) -> None:
    proj = GaussianProjection(P, K, seed=2)
    ids, vec = compute_projected(grad_fn, INDICES[:10], proj, 8, progress=False)
    with pytest.raises(InvalidArgument, match="shard 0"):
        write_shard(tmp_path, 0, 3, ids, vec, _meta(proj, 50))  # shard 0 of 50 holds 16
