"""Curvature-vector products against dense autograd references."""

import torch
import torch.nn.functional as F
from core_tiny import explicit_ggn, explicit_hessian

from pairdots_server.core.batches import TensorBatches
from pairdots_server.core.curvature import Curvature, CurvatureOperator, estimate_lambda_max
from pairdots_server.core.params import flatten, unflatten

N = 12


def _op(tiny, scope, curvature, batch_size=5, l2=0.0):
    data = TensorBatches(tiny.embeds[:N], tiny.mask[:N], tiny.labels[:N], batch_size=batch_size)
    return CurvatureOperator(tiny.logits_fn, tiny.scope(scope), data, curvature, l2=l2)


def _rand(op, seed):
    return torch.randn(op.num_params, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def test_ggn_and_hessian_match_dense_references(tiny) -> None:
    params = tiny.scope("pooler_head")
    g_dense = explicit_ggn(tiny, params, N)
    h_dense = explicit_hessian(tiny, params, N)
    for curvature, dense in ((Curvature.GGN, g_dense), (Curvature.HESSIAN, h_dense)):
        op = _op(tiny, "pooler_head", curvature)
        v = _rand(op, 0)
        torch.testing.assert_close(op.matvec(v), dense @ v, atol=1e-12, rtol=1e-9)
    # pooler (tanh) is nonlinear in θ, so here the two really differ
    assert (g_dense - h_dense).norm() > 1e-3 * h_dense.norm()


def test_products_with_layernorm_in_scope_match_references(tiny) -> None:
    """Last layer + pooler + head (LayerNorm weights scoped): GGN vs dense Jacobians, Hessian
    (forward-over-reverse) vs a double-backward HVP."""
    params = tiny.scope("last_layer_head")
    n = 6
    ggn = _op(tiny, "last_layer_head", Curvature.GGN, batch_size=n)
    hess = _op(tiny, "last_layer_head", Curvature.HESSIAN, batch_size=n)
    data = TensorBatches(tiny.embeds[:n], tiny.mask[:n], tiny.labels[:n], batch_size=n)
    ggn.batches = hess.batches = data
    v = _rand(ggn, 2)
    torch.testing.assert_close(ggn.matvec(v), explicit_ggn(tiny, params, n) @ v, atol=1e-12,
                               rtol=1e-9)
    theta = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    loss = F.cross_entropy(tiny.logits_fn(theta, tiny.embeds[:n], tiny.mask[:n]), tiny.labels[:n])
    grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
    dot = sum((g * u).sum() for g, u in zip(grads, unflatten(v, params).values(), strict=True))
    hv = flatten(dict(zip(theta, torch.autograd.grad(dot, list(theta.values())), strict=True)))
    torch.testing.assert_close(hess.matvec(v), hv, atol=1e-12, rtol=1e-9)


def test_ggn_equals_hessian_when_logits_are_linear_in_scope(tiny) -> None:
    """Only the classifier scoped: logits linear in θ, so ∇²L = Jᵀ H_logits J exactly."""
    ggn = _op(tiny, "head", Curvature.GGN)
    hess = _op(tiny, "head", Curvature.HESSIAN)
    for seed in range(3):
        v = _rand(ggn, seed)
        torch.testing.assert_close(ggn.matvec(v), hess.matvec(v), atol=1e-12, rtol=1e-10)


def test_full_pass_is_independent_of_provider_batch_size_and_adds_l2(tiny) -> None:
    v = _rand(_op(tiny, "pooler_head", Curvature.GGN), 1)
    a = _op(tiny, "pooler_head", Curvature.GGN, batch_size=5).matvec(v)
    b = _op(tiny, "pooler_head", Curvature.GGN, batch_size=N).matvec(v)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    c = _op(tiny, "pooler_head", Curvature.GGN, batch_size=4, l2=0.3).matvec(v)
    torch.testing.assert_close(c, a + 0.3 * v, atol=1e-12, rtol=1e-10)


def test_power_iteration_finds_lambda_max(tiny) -> None:
    params = tiny.scope("pooler_head")
    lam_true = float(torch.linalg.eigvalsh(explicit_ggn(tiny, params, N).detach()).max())
    op = _op(tiny, "pooler_head", Curvature.GGN, batch_size=N)
    lam = estimate_lambda_max(op, iters=40, seed=0)
    assert abs(lam - lam_true) <= 1e-3 * lam_true
