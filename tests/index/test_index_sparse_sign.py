"""SparseSignProjection (CountSketch): equals its dense matrix, unbiased inner products with
the exact CountSketch variance, seeding, and old (Gaussian) index metadata still read."""

from __future__ import annotations

import math

import pytest
import torch

from pairdots_server.errors import InvalidArgument
from pairdots_server.index.projection import GaussianProjection
from pairdots_server.index.sketch import make_projection
from pairdots_server.index.sparse_sign import ROW_CHUNK, SparseSignProjection
from pairdots_server.index.store import IndexMeta


def _count_sketch_sigma(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Std of <Sx, Sy>: sqrt((|x|²|y|² + <x,y>² − 2 Σ x_a² y_a²) / k), per row."""
    dot = (x * y).sum(-1)
    var = x.square().sum(-1) * y.square().sum(-1) + dot**2 - 2 * (x.square() * y.square()).sum(-1)
    return torch.sqrt(var / k)


def test_project_equals_an_independent_dense_computation() -> None:
    # (Sx)_j = Σ_{a: h(a)=j} σ(a) x_a, written out as a Python loop over coordinates.
    proj = SparseSignProjection(37, 5, seed=3, dtype=torch.float64)
    x = torch.randn(ROW_CHUNK + 3, 37, dtype=torch.float64)  # more rows than one chunk
    expect = torch.zeros(x.shape[0], 5, dtype=torch.float64)
    for a in range(37):
        expect[:, int(proj.buckets[a])] += float(proj.signs[a]) * x[:, a]
    assert torch.allclose(proj.project(x), expect, rtol=0, atol=1e-12)
    assert torch.allclose(proj.project(x), x @ proj.dense(), rtol=0, atol=1e-12)
    dense = proj.dense()
    assert torch.equal(dense.abs().sum(1), torch.ones(37, dtype=torch.float64))  # one ±1 a row


def test_unbiased_with_the_count_sketch_variance() -> None:
    # E[<Sx, Sy>] = <x, y>: mean over 400 seeds within 4 standard errors, and the spread over
    # seeds matches the CountSketch sigma within 15 %.
    torch.manual_seed(1)
    in_dim, k, seeds = 200, 16, 400
    x = torch.randn(1, in_dim, dtype=torch.float64)
    y = x + torch.randn(1, in_dim, dtype=torch.float64)
    est = torch.stack(
        [
            (
                SparseSignProjection(in_dim, k, s, dtype=torch.float64).project(x)
                * SparseSignProjection(in_dim, k, s, dtype=torch.float64).project(y)
            ).sum()
            for s in range(seeds)
        ]
    )
    sigma = _count_sketch_sigma(x, y, k)[0]
    assert abs(est.mean() - (x * y).sum()) < 4 * sigma / math.sqrt(seeds)
    assert 0.85 < (est.std() / sigma).item() < 1.15


def test_errors_within_bound_at_index_size() -> None:
    # 64 pairs, k = 1024, in_dim = 3000: every error within 5 sigma.
    torch.manual_seed(0)
    proj = SparseSignProjection(3000, 1024, seed=7, dtype=torch.float64)
    x = torch.randn(64, 3000, dtype=torch.float64)
    y = 0.5 * x + torch.randn(64, 3000, dtype=torch.float64)
    err = (proj.project(x) * proj.project(y)).sum(-1) - (x * y).sum(-1)
    assert (err / _count_sketch_sigma(x, y, 1024)).abs().max() < 5.0


def test_seeded_and_reproducible() -> None:
    a, b = SparseSignProjection(5000, 32, 42), SparseSignProjection(5000, 32, 42)
    c = SparseSignProjection(5000, 32, 43)
    assert torch.equal(a.buckets, b.buckets) and torch.equal(a.signs, b.signs)
    assert not torch.equal(a.buckets, c.buckets)
    assert int(a.buckets.min()) >= 0 and int(a.buckets.max()) < 32
    x = torch.randn(3, 5000)
    assert torch.equal(a.project(x)[1:2], a.project(x[1:2]))  # independent of the batch


def test_bad_arguments_rejected() -> None:
    with pytest.raises(InvalidArgument):
        SparseSignProjection(10, 0, seed=0)
    with pytest.raises(InvalidArgument):
        SparseSignProjection(10, 4, seed=-1)
    with pytest.raises(InvalidArgument, match="expected shape"):
        SparseSignProjection(10, 4, seed=0).project(torch.zeros(2, 11))
    with pytest.raises(InvalidArgument, match="projection_kind"):
        make_projection("srht", 10, 4, 0)


def test_meta_records_the_kind_and_old_meta_reads_as_gaussian() -> None:
    sparse = SparseSignProjection(300, 8, seed=9)
    meta = IndexMeta.for_projection(sparse, count=4, scope="toy")
    assert meta.projection_kind == "sparse_sign"
    rebuilt = meta.projection()
    assert isinstance(rebuilt, SparseSignProjection)
    assert torch.equal(rebuilt.buckets, sparse.buckets)
    old = meta.to_dict()
    del old["projection_kind"]  # meta.json written before the sparse sketch
    old_meta = IndexMeta.from_dict(old, "old/meta.json")
    assert old_meta.projection_kind == "gaussian"
    gauss = old_meta.projection()
    assert isinstance(gauss, GaussianProjection)
    assert torch.equal(gauss.dense(), GaussianProjection(300, 8, seed=9).dense())
    assert not meta.same_source(old_meta)
