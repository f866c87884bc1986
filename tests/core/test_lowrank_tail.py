"""Low-rank tail honesty: λ_{k+1} and the Ritz residuals stored by fit_lowrank, against a dense
eigendecomposition of the GGN on a tiny scope (classifier head, P = 34, 24 examples), and
the diagnostics / warning built from them."""

from __future__ import annotations

import pytest
import torch
from core_tiny import explicit_ggn

from pairdots_server.core.batches import TensorBatches
from pairdots_server.core.curvature import Curvature, CurvatureOperator
from pairdots_server.core.ihvp.lowrank import (
    LowRankFactors,
    LowRankSolver,
    fit_lowrank,
    tail_warning,
)

N = 24


@pytest.fixture(scope="module")
def ggn(tiny):
    params = tiny.scope("head")
    data = TensorBatches(tiny.embeds[:N], tiny.mask[:N], tiny.labels[:N], batch_size=N)
    op = CurvatureOperator(tiny.logits_fn, params, data, Curvature.GGN)
    h = explicit_ggn(tiny, params, N).detach()
    return op, h


class DenseOp:
    """A curvature operator given by a dense symmetric matrix (what fit_lowrank needs)."""

    def __init__(self, h: torch.Tensor) -> None:
        self.h = h
        self.num_params = h.shape[0]
        self.dtype = h.dtype
        self.device = h.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.h @ v


def _explicit_residuals(h: torch.Tensor, f: LowRankFactors) -> torch.Tensor:
    r = h @ f.eigvecs - f.eigvecs * f.eigvals  # [P,k]
    return r.norm(dim=0) / f.eigvals.abs()


def test_converged_lanczos_stores_exact_next_eigenvalue_and_zero_residuals(ggn) -> None:
    op, h = ggn
    true = torch.linalg.eigvalsh(h).flip(0)  # descending
    k = 4
    f = fit_lowrank(op, rank=k, oversample=op.num_params, seed=1)
    assert f.next_eigval is not None and f.residuals is not None
    torch.testing.assert_close(f.eigvals, true[:k], rtol=1e-6, atol=1e-10)
    assert f.next_eigval == pytest.approx(float(true[k]), rel=1e-6, abs=1e-10)
    assert f.max_residual is not None and f.max_residual < 1e-6
    assert float(_explicit_residuals(h, f).max()) < 1e-6


def test_partial_lanczos_residuals_match_explicit_and_next_is_a_lower_bound() -> None:
    g = torch.Generator().manual_seed(0)
    p = 40
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    evals = 0.7 ** torch.arange(p, dtype=torch.float64)  # slowly decaying spectrum
    h = (q * evals) @ q.T
    f = fit_lowrank(DenseOp(h), rank=3, oversample=3, seed=0)
    explicit = _explicit_residuals(h, f)
    assert f.residuals is not None
    torch.testing.assert_close(f.residuals, explicit, rtol=1e-6, atol=1e-9)
    assert float(explicit.max()) > 1e-4  # not converged: the residuals are informative
    # Cauchy interlacing: the (k+1)-th Ritz value is at most the true λ_{k+1}
    assert f.next_eigval is not None and 0 < f.next_eigval <= float(evals[3]) + 1e-12
    # oversample 0 still runs one step beyond the rank for the tail estimate
    f0 = fit_lowrank(DenseOp(h), rank=3, oversample=0, seed=0)
    assert f0.rank == 3 and f0.next_eigval is not None


def test_solver_diagnostics_and_warning(ggn) -> None:
    op, h = ggn
    f = fit_lowrank(op, rank=4, oversample=op.num_params, seed=1)
    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(2), dtype=h.dtype)
    assert f.next_eigval is not None
    small = f.next_eigval / 10  # δ below λ_{k+1}: the tail is not negligible
    d = LowRankSolver(f, small).solve(v).diagnostics
    assert d.next_eigval == f.next_eigval
    assert d.next_over_damping == pytest.approx(10.0)
    assert d.max_residual == f.max_residual
    assert d.warning is not None and "λ_{k+1}/δ > 1" in d.warning
    big = f.next_eigval * 10
    assert LowRankSolver(f, big).solve(v).diagnostics.warning is None
    assert tail_warning(0.5, 0.2) is not None and "residual" in tail_warning(0.5, 0.2)
    assert tail_warning(0.5, 0.05) is None and tail_warning(None, None) is None


def test_roundtrip_and_old_factors_without_tail(ggn) -> None:
    op, h = ggn
    f = fit_lowrank(op, rank=3, oversample=5)
    back = LowRankFactors.from_tensors(f.to_tensors())
    assert back.next_eigval == f.next_eigval
    assert back.residuals is not None and torch.equal(back.residuals, f.residuals)
    old = LowRankFactors.from_tensors({"eigvals": f.eigvals, "eigvecs": f.eigvecs})
    assert old.next_eigval is None and old.residuals is None and old.max_residual is None
    v = torch.ones(op.num_params, dtype=h.dtype)
    d = LowRankSolver(old, 0.1).solve(v).diagnostics
    assert d.next_eigval is None and d.next_over_damping is None and d.max_residual is None
    assert d.warning is None
