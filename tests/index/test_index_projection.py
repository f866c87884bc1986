"""GaussianProjection: JL inner-product preservation, dense == blocked, seeding."""

from __future__ import annotations

import math

import pytest
import torch

from pairdots_server.errors import InvalidArgument
from pairdots_server.index.projection import BLOCK_ROWS, GaussianProjection, block_seed


def _pair_sigma(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Std of <Px, Py> for P_aj ~ N(0, 1/k): sqrt((<x,y>^2 + |x|^2 |y|^2) / k), per row."""
    dot = (x * y).sum(-1)
    return torch.sqrt((dot**2 + x.square().sum(-1) * y.square().sum(-1)) / k)


def test_inner_products_preserved_within_jl_bound() -> None:
    # 64 independent pairs, k = 1024: every error within 5 sigma (sigma above), and the
    # normalised errors look like a standard normal (|mean| < 0.5, std in [0.7, 1.3]).
    torch.manual_seed(0)
    in_dim, k = 3000, 1024
    proj = GaussianProjection(in_dim, k, seed=7, dtype=torch.float64)
    x = torch.randn(64, in_dim, dtype=torch.float64)
    y = 0.5 * x + torch.randn(64, in_dim, dtype=torch.float64)  # correlated pairs
    est = (proj.project(x) * proj.project(y)).sum(-1)
    err = est - (x * y).sum(-1)
    z = err / _pair_sigma(x, y, k)
    assert z.abs().max() < 5.0
    assert abs(z.mean().item()) < 0.5
    assert 0.7 < z.std().item() < 1.3
    # squared norms: relative error std is sqrt(2/k) = 0.044
    rel = proj.project(x).square().sum(-1) / x.square().sum(-1) - 1.0
    assert rel.abs().max() < 5 * math.sqrt(2 / k)


def test_unbiased_over_seeds() -> None:
    # E_P[<Px, Py>] = <x, y>: the mean over 400 seeds is within 4 standard errors, and the
    # spread over seeds matches sigma within 15 % (checks the 1/out_dim variance).
    torch.manual_seed(1)
    in_dim, k, seeds = 200, 16, 400
    x = torch.randn(1, in_dim, dtype=torch.float64)
    y = x + torch.randn(1, in_dim, dtype=torch.float64)
    est = torch.stack(
        [
            (
                GaussianProjection(in_dim, k, s, dtype=torch.float64).project(x)
                * GaussianProjection(in_dim, k, s, dtype=torch.float64).project(y)
            ).sum()
            for s in range(seeds)
        ]
    )
    sigma = _pair_sigma(x, y, k)[0]
    exact = (x * y).sum()
    assert abs(est.mean() - exact) < 4 * sigma / math.sqrt(seeds)
    assert 0.85 < (est.std() / sigma).item() < 1.15


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_dense_and_blocked_paths_agree(dtype: torch.dtype, rtol: float) -> None:
    in_dim, k = 2 * BLOCK_ROWS + 123, 64  # three blocks, the last one partial
    dense = GaussianProjection(in_dim, k, seed=3, dtype=dtype, max_dense_bytes=1 << 30)
    blocked = GaussianProjection(in_dim, k, seed=3, dtype=dtype, max_dense_bytes=0)
    assert dense.is_dense and not blocked.is_dense
    x = torch.randn(5, in_dim, dtype=dtype, generator=torch.Generator().manual_seed(0))
    a, b = dense.project(x), blocked.project(x)
    assert a.dtype == b.dtype == dtype and a.shape == (5, k)
    # tolerance relative to the scale of the result (sum order differs between paths)
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * a.abs().max().item())
    # the cached matrix is exactly the stack of the regenerated blocks
    stacked = torch.cat([blocked.block(i) for i in range(blocked.num_blocks)])
    assert torch.equal(dense.dense(), stacked)


def test_matrix_independent_of_dtype_and_limit() -> None:
    p32 = GaussianProjection(500, 8, seed=11, dtype=torch.float32)
    p64 = GaussianProjection(500, 8, seed=11, dtype=torch.float64, max_dense_bytes=0)
    assert torch.equal(p32.dense().double(), p64.dense())


def test_same_seed_same_matrix_different_seed_different() -> None:
    a = GaussianProjection(5000, 32, seed=42).dense()
    b = GaussianProjection(5000, 32, seed=42).dense()
    c = GaussianProjection(5000, 32, seed=43).dense()
    assert torch.equal(a, b)
    corr = torch.corrcoef(torch.stack([a.flatten(), c.flatten()]))[0, 1]
    assert abs(corr.item()) < 0.01  # independent draws, 160k entries: std of corr ~ 0.0025
    # entries have the documented std 1/sqrt(k)
    assert abs(a.std().item() * math.sqrt(32) - 1.0) < 0.01


def test_block_seeds_distinct() -> None:
    seeds = {block_seed(s, b) for s in range(20) for b in range(20)}
    assert len(seeds) == 400
    assert block_seed(0, 1) != block_seed(1, 0)


def test_project_rejects_wrong_shape() -> None:
    proj = GaussianProjection(10, 4, seed=0)
    with pytest.raises(InvalidArgument, match=r"\[B, 10\]"):
        proj.project(torch.zeros(3, 11))
    with pytest.raises(InvalidArgument):
        proj.project(torch.zeros(10))
    with pytest.raises(InvalidArgument):
        GaussianProjection(10, 0, seed=0)


def test_project_on_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = torch.randn(4, 9000, generator=torch.Generator().manual_seed(0))
    for limit in (1 << 30, 0):
        proj = GaussianProjection(9000, 128, seed=5, max_dense_bytes=limit)
        cpu, gpu = proj.project(x), proj.project(x.cuda())
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4 * cpu.abs().max().item())
