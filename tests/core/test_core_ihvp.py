"""Inverse-HVP solvers vs torch.linalg.solve(H + δI, v) with H formed densely by autograd.

Problem: tiny BERT, classifier head scoped (P = 34), GGN over 24 padded examples, δ = 0.2·λ_max.
Tolerances (relative error ‖x - x*‖/‖x*‖): exact 1e-6, CG 1e-4, LiSSA 2 %, low-rank at full
rank 1e-6.
"""

import pytest
import torch
from core_tiny import explicit_ggn

from pairdots_server.core.batches import TensorBatches
from pairdots_server.core.curvature import Curvature, CurvatureOperator
from pairdots_server.core.exceptions import SolverDiverged, SolverError
from pairdots_server.core.ihvp.cg import CGSolver
from pairdots_server.core.ihvp.exact import ExactSolver
from pairdots_server.core.ihvp.lissa import LissaSolver
from pairdots_server.core.ihvp.lowrank import LowRankFactors, LowRankSolver, fit_lowrank

N = 24


class Problem:
    def __init__(self, tiny) -> None:
        params = tiny.scope("head")
        data = TensorBatches(tiny.embeds[:N], tiny.mask[:N], tiny.labels[:N], batch_size=N)
        self.op = CurvatureOperator(tiny.logits_fn, params, data, Curvature.GGN)
        self.h = explicit_ggn(tiny, params, N).detach()
        self.lam_max = float(torch.linalg.eigvalsh(self.h).max())
        self.damping = 0.2 * self.lam_max
        gen = torch.Generator().manual_seed(0)
        self.v = torch.randn(self.op.num_params, generator=gen, dtype=torch.float64)
        eye = torch.eye(self.op.num_params, dtype=torch.float64)
        self.x = torch.linalg.solve(self.h + self.damping * eye, self.v)

    def err(self, x: torch.Tensor) -> float:
        return float((x - self.x).norm() / self.x.norm())


@pytest.fixture(scope="module")
def prob(tiny) -> Problem:
    return Problem(tiny)


def test_exact(prob) -> None:
    res = ExactSolver(prob.op, prob.damping).solve(prob.v)
    assert prob.err(res.x) <= 1e-6
    assert res.diagnostics.converged and res.diagnostics.effective_damping == prob.damping


def test_cg(prob) -> None:
    res = CGSolver(prob.op, prob.damping, max_iter=100, tol=1e-8).solve(prob.v)
    assert prob.err(res.x) <= 1e-4
    assert res.diagnostics.converged and res.diagnostics.rel_change <= 1e-8


def test_lissa_full_batch(prob) -> None:
    solver = LissaSolver(
        prob.op, damping=prob.damping, batch_size=None, tol=1e-3, depth=500,
        lambda_max=prob.lam_max,
    )
    res = solver.solve(prob.v)
    assert prob.err(res.x) <= 0.02
    d = res.diagnostics
    assert d.converged and d.iterations < 500 and d.effective_damping == prob.damping


def test_lissa_minibatch_repeats(prob) -> None:
    """Stochastic H_j on minibatches of 8, 2 repeats averaged: within 5 % here."""
    solver = LissaSolver(
        prob.op, damping=prob.damping, batch_size=8, repeats=2, tol=1e-2, depth=100,
        lambda_max=prob.lam_max, seed=1,
    )
    res = solver.solve(prob.v)
    print("lissa minibatch", prob.err(res.x), res.diagnostics)
    assert prob.err(res.x) <= 0.05


def test_lissa_default_damping_and_scale_come_from_power_iteration(prob) -> None:
    solver = LissaSolver(prob.op, damping_ratio=0.2, power_iters=40, batch_size=None)
    damping, scale = solver.resolve()
    assert damping == pytest.approx(0.2 * prob.lam_max, rel=1e-3)
    assert scale == pytest.approx(1.2 * prob.lam_max, rel=1e-3)


def test_lissa_too_small_scale_diverges(prob) -> None:
    solver = LissaSolver(
        prob.op, damping=prob.damping, scale=0.3 * prob.lam_max, batch_size=None, depth=200
    )
    with pytest.raises(SolverDiverged, match="scale"):
        solver.solve(prob.v)


def test_lissa_on_indefinite_hessian_diverges(tiny) -> None:
    """Pooler + head Hessian at this (untrained) point has eigenvalues near -1 and +1."""
    data = TensorBatches(tiny.embeds[:6], tiny.mask[:6], tiny.labels[:6], batch_size=6)
    op = CurvatureOperator(tiny.logits_fn, tiny.scope("pooler_head"), data, Curvature.HESSIAN)
    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    solver = LissaSolver(op, damping_ratio=0.01, batch_size=None, depth=300, power_iters=5)
    with pytest.raises(SolverDiverged, match="ggn"):
        solver.solve(v)


def test_lowrank_full_rank_is_exact_and_partial_rank_finds_top_eigenvalues(prob) -> None:
    p = prob.op.num_params
    factors = fit_lowrank(prob.op, rank=p, oversample=0)
    res = LowRankSolver(factors, prob.damping).solve(prob.v)
    assert prob.err(res.x) <= 1e-6
    top = fit_lowrank(prob.op, rank=4, oversample=12, seed=3)
    true = torch.linalg.eigvalsh(prob.h).flip(0)[:4]
    torch.testing.assert_close(top.eigvals, true, rtol=1e-6, atol=1e-10)
    # the rank-4 solve is the exact solve of the truncated curvature: an independent dense
    # linear solve with H_4 = Σ_{i≤4} λ_i u_i u_iᵀ built from eigh, not the solver's formula
    evals, evecs = torch.linalg.eigh(prob.h)
    u = evecs[:, -4:]
    h4 = u @ torch.diag(evals[-4:]) @ u.T + prob.damping * torch.eye(p, dtype=u.dtype)
    expected = torch.linalg.solve(h4, prob.v)
    got = LowRankSolver(top, prob.damping).solve(prob.v).x
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)


def test_lowrank_factors_roundtrip(prob) -> None:
    factors = fit_lowrank(prob.op, rank=3, oversample=5)
    back = LowRankFactors.from_tensors(factors.to_tensors())
    assert torch.equal(back.eigvals, factors.eigvals) and torch.equal(back.eigvecs, factors.eigvecs)
    with pytest.raises(SolverError, match="refit"):
        LowRankFactors.from_tensors({"eigvals": factors.eigvals})


def test_exact_refuses_large_scopes_and_should_stop_aborts(prob) -> None:
    with pytest.raises(SolverError, match="lowrank"):
        ExactSolver(prob.op, prob.damping, max_params=10)

    class Cancelled(Exception):
        pass

    calls = []

    def stop() -> None:
        calls.append(1)
        if len(calls) > 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        CGSolver(prob.op, prob.damping, max_iter=100, tol=1e-12).solve(prob.v, stop)
    calls.clear()
    with pytest.raises(Cancelled):
        LissaSolver(prob.op, damping=prob.damping, lambda_max=prob.lam_max).solve(prob.v, stop)
