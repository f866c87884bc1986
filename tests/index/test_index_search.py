"""ExactIndex (reference) vs FaissIndex flat / IVF, padding, validation, recall_at."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from pairdots_server.errors import FailedPrecondition, InvalidArgument
from pairdots_server.index.base import PAD_ID
from pairdots_server.index.exact import ExactIndex
from pairdots_server.index.faiss_index import FaissIndex, default_nlist, faiss_num_gpus
from pairdots_server.index.recall import recall_at


def _data(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, k)).astype(np.float32)
    ids = (rng.permutation(n) * 3 + 7).astype(np.int64)  # not 0..n-1, not sorted
    return vectors, ids


@pytest.mark.parametrize("nq", [3, 25])  # FAISS uses a loop below 20 queries, BLAS above
def test_flat_matches_exact(nq: int) -> None:
    vectors, ids = _data(2000, 32, seed=0)
    queries = np.random.default_rng(1).standard_normal((nq, 32)).astype(np.float32)
    exact, flat = ExactIndex(32), FaissIndex(32, kind="flat", use_gpu=False)
    exact.add(vectors, ids)
    flat.add(vectors[:700], ids[:700])  # two adds == one
    flat.add(vectors[700:], ids[700:])
    s_e, i_e = exact.search(queries, 10)
    s_f, i_f = flat.search(queries, 10)
    assert i_f.dtype == np.int64 and s_f.dtype == np.float32 and s_f.shape == (nq, 10)
    np.testing.assert_array_equal(i_f, i_e)
    # scores: same float32 inputs, different summation order (FAISS SIMD/BLAS vs float64 here)
    np.testing.assert_allclose(s_f, s_e, rtol=1e-5, atol=1e-5)
    assert (np.diff(s_e, axis=1) <= 0).all()
    # and the reference is right: brute force in float64
    full = queries.astype(np.float64) @ vectors.T.astype(np.float64)
    np.testing.assert_array_equal(i_e, ids[np.argsort(-full, axis=1)[:, :10]])


def test_padding_when_fewer_than_top() -> None:
    vectors, ids = _data(5, 8, seed=2)
    q = np.ones((2, 8), dtype=np.float32)
    for index in (ExactIndex(8), FaissIndex(8, kind="flat", use_gpu=False)):
        assert index.search(q, 3)[1].tolist() == [[PAD_ID] * 3] * 2  # empty index
        index.add(vectors, ids)
        scores, got = index.search(q, 8)
        assert (got[:, 5:] == PAD_ID).all() and np.isneginf(scores[:, 5:]).all()
        assert sorted(got[0, :5].tolist()) == sorted(ids.tolist())
        assert index.ntotal == 5 and index.dim == 8


def test_exact_ties_broken_by_id() -> None:
    index = ExactIndex(2, chunk=2)  # several chunks: exercises the running merge
    index.add(np.array([[1, 0]] * 5, dtype=np.float32), np.array([9, 4, 7, 1, 3]))
    _, ids = index.search(np.array([[1.0, 0.0]], dtype=np.float32), 3)
    assert ids.tolist() == [[1, 3, 4]]
    assert index.ranking(np.array([1.0, 0.0])).tolist() == [1, 3, 4, 7, 9]


def test_exact_chunking_invariant() -> None:
    vectors, ids = _data(300, 16, seed=3)
    q = np.random.default_rng(4).standard_normal((4, 16)).astype(np.float32)
    big, small = ExactIndex(16), ExactIndex(16, chunk=7)
    big.add(vectors, ids)
    small.add(vectors, ids)
    for a, b in zip(big.search(q, 20), small.search(q, 20), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "make", [lambda: ExactIndex(4), lambda: FaissIndex(4, "flat", use_gpu=False)]
)
def test_add_and_search_validation(make) -> None:  # type: ignore[no-untyped-def]
    index = make()
    v = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(InvalidArgument, match="duplicates"):
        index.add(v, np.array([1, 1, 2]))
    with pytest.raises(InvalidArgument, match="non-negative"):
        index.add(v, np.array([0, -1, 2]))
    with pytest.raises(InvalidArgument, match=r"\[N, 4\]"):
        index.add(np.zeros((3, 5), dtype=np.float32), np.arange(3))
    with pytest.raises(InvalidArgument, match="NaN"):
        index.add(np.full((3, 4), np.nan, dtype=np.float32), np.arange(3))
    index.add(v, np.arange(3))
    with pytest.raises(InvalidArgument, match="already"):
        index.add(v[:1], np.array([2]))
    with pytest.raises(InvalidArgument, match="top"):
        index.search(v, 0)
    with pytest.raises(InvalidArgument, match=r"\[Q, 4\]"):
        index.search(np.zeros((1, 3), dtype=np.float32), 1)


def _clustered(n: int, k: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gradient-like data: cluster directions + noise, norms varying over ~an order of magnitude."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, k))
    labels = rng.integers(0, clusters, n)
    x = centers[labels] + 0.5 * rng.standard_normal((n, k))
    x *= rng.lognormal(0.0, 0.7, (n, 1))
    return x.astype(np.float32), centers


def test_ivf_recall_at_10() -> None:
    n, k = 20_000, 32
    vectors, centers = _clustered(n, k, clusters=50, seed=5)
    ids = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(6)
    queries = centers[rng.integers(0, 50, 40)] + 0.5 * rng.standard_normal((40, k))
    queries = queries.astype(np.float32)
    exact = ExactIndex(k)
    exact.add(vectors, ids)
    ivf = FaissIndex(k, kind="ivf", use_gpu=False)  # default nlist / nprobe
    ivf.add(vectors, ids)
    info = ivf.describe()
    assert info["kind"] == "ivf" and info["nlist"] == default_nlist(n) == 512
    assert info["nprobe"] == 64
    _, ivf_ids = ivf.search(queries, 10)
    _, ranking = exact.search(queries, 10)
    recalls = [recall_at(ivf_ids[r], ranking[r], 10) for r in range(len(queries))]
    assert np.mean(recalls) >= 0.9, np.mean(recalls)
    ivf.set_nprobe(512)  # probing every list is exhaustive: recall 1
    _, all_ids = ivf.search(queries, 10)
    np.testing.assert_array_equal(all_ids, ranking)


def test_auto_kind_small_is_flat() -> None:
    vectors, ids = _data(500, 8, seed=7)
    index = FaissIndex(8, use_gpu=False)
    assert index.kind == "auto"
    index.add(vectors, ids)
    assert index.describe()["kind"] == "flat"


def test_ivf_rejects_too_many_lists() -> None:
    vectors, ids = _data(50, 8, seed=8)
    with pytest.raises(InvalidArgument, match="nlist"):
        FaissIndex(8, kind="ivf", nlist=100, use_gpu=False).add(vectors, ids)


def test_use_gpu_true_without_gpu() -> None:
    if faiss_num_gpus() > 0:
        pytest.skip("a GPU is visible to faiss")
    with pytest.raises(FailedPrecondition, match="faiss-gpu-cu12"):
        FaissIndex(8, use_gpu=True)


def test_faiss_missing_is_failed_precondition(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(FailedPrecondition, match="pip install faiss-cpu"):
        FaissIndex(8)


def test_recall_at() -> None:
    ranking = [5, 3, 9, 1, 0]
    assert recall_at([3, 5, 7], ranking, 2) == 1.0
    assert recall_at([3, 7, -1], ranking, 2) == 0.5
    assert recall_at([0], ranking, 4) == 0.0
    assert recall_at([0, 1, 9, 3, 5], ranking, 5) == 1.0
    with pytest.raises(InvalidArgument):
        recall_at([1], ranking, 6)
    with pytest.raises(InvalidArgument):
        recall_at([1], ranking, 0)


def test_faiss_gpu_matches_exact() -> None:
    if faiss_num_gpus() == 0:
        pytest.skip("needs faiss-gpu and a GPU")
    vectors, ids = _data(5000, 32, seed=9)
    queries = np.random.default_rng(10).standard_normal((30, 32)).astype(np.float32)
    exact = ExactIndex(32)
    exact.add(vectors, ids)
    gpu = FaissIndex(32, kind="flat", use_gpu=True)
    gpu.add(vectors, ids)
    assert gpu.describe()["device"] == "gpu"
    for top in (10, 3000):  # 3000 > GPU_MAX_TOP: served by the CPU copy
        s_e, i_e = exact.search(queries, top)
        s_g, i_g = gpu.search(queries, top)
        np.testing.assert_allclose(s_g, s_e, rtol=1e-4, atol=1e-4)
        assert (i_g[:, :10] == i_e[:, :10]).mean() > 0.99  # GPU sums in another order
    vectors, centers = _clustered(20_000, 32, clusters=50, seed=5)
    ivf = FaissIndex(32, kind="ivf", use_gpu=True)
    ivf.add(vectors, np.arange(20_000))
    exact = ExactIndex(32)
    exact.add(vectors, np.arange(20_000))
    q = centers[:20].astype(np.float32)
    _, got = ivf.search(q, 10)
    _, ref = exact.search(q, 10)
    assert np.mean([recall_at(got[r], ref[r], 10) for r in range(20)]) >= 0.9


@pytest.mark.parametrize("make", [
    lambda k: ExactIndex(k),
    lambda k: FaissIndex(k, kind="flat", use_gpu=False),  # IDSelectorBatch scan
    lambda k: FaissIndex(k, kind="ivf", nlist=4, nprobe=4, use_gpu=False),  # deepening (base)
], ids=["exact", "faiss-flat", "faiss-ivf-all-probed"])
@pytest.mark.parametrize("share", [0.01, 0.02, 0.4])
def test_search_within_is_the_top_k_of_the_allowed(make: object, share: float) -> None:
    """search_within(q, top, allowed) = the `top` allowed ids with the largest ⟨q, v⟩, by brute
    force in float64 over the allowed vectors only; padded when fewer are allowed; ids that are
    not stored are ignored. The IVF probes every list, so its search is exact too."""
    vectors, ids = _data(1500, 16, seed=3)
    rng = np.random.default_rng(4)
    allowed = rng.choice(ids, size=int(share * len(ids)), replace=False)
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    index = make(16)  # type: ignore[operator]
    index.add(vectors, ids)
    top = 20
    scores, got = index.search_within(queries, top, np.concatenate([allowed, [10**9]]))
    rows = np.flatnonzero(np.isin(ids, allowed))
    full = queries.astype(np.float64) @ vectors[rows].T.astype(np.float64)  # [Q, M]
    want = ids[rows][np.argsort(-full, axis=1)[:, : min(top, rows.size)]]
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    np.testing.assert_allclose(scores[:, : want.shape[1]],
                               np.sort(full, axis=1)[:, ::-1][:, : want.shape[1]],
                               rtol=1e-5, atol=1e-5)
    assert (got[:, want.shape[1]:] == PAD_ID).all()
    assert index.search_within(queries, 5, np.array([], dtype=np.int64))[1].tolist() == \
        [[PAD_ID] * 5] * 3
