"""Diagonal Fisher (core.ihvp.diagonal) and identity solvers.

Tiny float64 BERT, pooler + classifier scoped (P = 306), 12 padded examples in batches of 5.
References: d = mean_n g_n² with g_n from core.grads.per_example_loss_grads_loop (one autograd
call per example); the "expected" Fisher diagonal also vs the diagonal of the dense GGN of
core_tiny. Tolerance rtol 1e-10.
"""

from __future__ import annotations

import pytest
import torch
from core_tiny import explicit_ggn

from pairdots_server.core.batches import Batch, TensorBatches
from pairdots_server.core.exceptions import SolverError
from pairdots_server.core.grads import per_example_loss_grads_loop
from pairdots_server.core.ihvp.diagonal import DiagonalFactors, DiagonalSolver, fit_diagonal
from pairdots_server.core.ihvp.identity import IdentitySolver

N = 12


@pytest.fixture(scope="module")
def setup(tiny):
    params = tiny.scope("pooler_head")
    data = TensorBatches(tiny.embeds[:N], tiny.mask[:N], tiny.labels[:N], batch_size=5)
    return params, data


def loop_grads(tiny, params, labels):
    return per_example_loss_grads_loop(
        tiny.logits_fn, params, tiny.embeds[:N], tiny.mask[:N], labels
    )


def test_empirical_diagonal_is_the_mean_squared_gradient(tiny, setup) -> None:
    params, data = setup
    factors = fit_diagonal(tiny.logits_fn, params, data)
    g = loop_grads(tiny, params, tiny.labels[:N])  # [N,P]
    ref = (g**2).mean(0)
    torch.testing.assert_close(factors.diag, ref, rtol=1e-10, atol=1e-14)
    assert factors.fisher == "empirical" and factors.num_examples == N
    # the solve, absolute and heuristic damping
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = DiagonalSolver(factors, 1e-3).solve(v)
    torch.testing.assert_close(res.x, v / (ref + 1e-3), rtol=1e-10, atol=0.0)
    assert res.diagnostics.damping_rule == "absolute" and res.diagnostics.effective_damping == 1e-3
    heur = DiagonalSolver(factors, None).solve(v)
    lam = 0.1 * float(ref.mean())
    assert heur.diagnostics.effective_damping == pytest.approx(lam, rel=1e-10)
    torch.testing.assert_close(heur.x, v / (ref + lam), rtol=1e-9, atol=0.0)
    assert heur.diagnostics.damping_rule.startswith("heuristic")


def test_true_fisher_diagonal_expected_equals_ggn_and_sampled_uses_model_labels(
    tiny, setup
) -> None:
    params, data = setup
    expected = fit_diagonal(tiny.logits_fn, params, data, fisher="expected")
    with torch.no_grad():
        p = torch.softmax(tiny.logits_fn(params, tiny.embeds[:N], tiny.mask[:N]), -1)  # [N,C]
    ref = sum(
        (p[:, c, None] * loop_grads(tiny, params, torch.full((N,), c)) ** 2).mean(0)
        for c in range(p.shape[1])
    )
    torch.testing.assert_close(expected.diag, ref, rtol=1e-10, atol=1e-14)
    ggn = torch.diagonal(explicit_ggn(tiny, params, N))
    torch.testing.assert_close(expected.diag, ggn, rtol=1e-9, atol=1e-14)
    # sampled: one draw per example from a generator seeded 7, one multinomial per batch
    sampled = fit_diagonal(tiny.logits_fn, params, data, fisher="sampled", seed=7)
    gen = torch.Generator().manual_seed(7)
    ys = []
    for b in data.full():
        with torch.no_grad():
            pb = torch.softmax(tiny.logits_fn(params, b.embeds, b.mask), -1)
        ys.append(torch.multinomial(pb.double(), 1, replacement=True, generator=gen)[:, 0])
    g = loop_grads(tiny, params, torch.cat(ys))
    torch.testing.assert_close(sampled.diag, (g**2).mean(0), rtol=1e-10, atol=1e-14)


def test_identity_is_the_zero_curvature_diagonal_and_plain_dot_product(tiny, setup) -> None:
    params, _ = setup
    p = sum(t.numel() for t in params.values())
    v = torch.randn(p, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    zero = DiagonalFactors(torch.zeros(p, dtype=torch.float64))
    for lam in (1.0, 0.25):
        x = IdentitySolver(lam, num_params=p).solve(v).x
        torch.testing.assert_close(x, DiagonalSolver(zero, lam).solve(v).x, rtol=0, atol=0)
    assert torch.equal(IdentitySolver().solve(v).x, v)  # λ = 1: TracIn-style gradient dot product
    with pytest.raises(SolverError, match="damping > 0"):
        IdentitySolver(0.0)
    with pytest.raises(ValueError, match="parameters"):
        IdentitySolver(num_params=p + 1).solve(v)


def test_roundtrip_and_errors(tiny, setup) -> None:
    params, _ = setup
    batches = [Batch(tiny.embeds[:4], tiny.mask[:4], tiny.labels[:4])]
    factors = fit_diagonal(tiny.logits_fn, params, batches, fisher="expected")
    back = DiagonalFactors.from_tensors(factors.to_tensors())
    assert torch.equal(back.diag, factors.diag) and back.fisher == "expected"
    assert back.num_examples == 4 and factors.num_bytes == factors.diag.numel() * 8
    with pytest.raises(SolverError, match="refit"):
        DiagonalFactors.from_tensors({"diag": factors.diag})
    with pytest.raises(SolverError, match="fisher"):
        fit_diagonal(tiny.logits_fn, params, batches, fisher="gold")
    with pytest.raises(SolverError, match="no examples"):
        fit_diagonal(tiny.logits_fn, params, [])
    with pytest.raises(SolverError, match="damping"):
        DiagonalSolver(DiagonalFactors(torch.zeros(3, dtype=torch.float64)), 0.0)
