"""The proximal Bregman response retrain (model/converged.py) on a tiny float64 BERT bundle.

Independent references, none of which runs the module's own objective:
- stationarity: ∇J at the returned θ̂ computed through the *full* model (Task.logits_fn over
  the word embeddings, every layer, plain autograd; the solver ran the split's top over
  cached h_L), written out from the formula;
- first order: θ̂ − θ_s against −(G + λI)⁻¹ (1/N)(Σ_A ∇L − Σ_R ∇L), with G the exact
  Gauss–Newton matrix of the mean loss applied by jvp/vjp and inverted by conjugate gradients
  to 1e-12 (a damped influence function's claim, which the response must meet to first order);
- the unchanged training set returns the served parameters bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from pairdots_server.errors import FailedPrecondition
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.model import converged
from pairdots_server.model.retrain import RetrainMode, RetrainSpec, check_supported, retrain
from pairdots_server.model.task import Task
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.storage.data import Example
from pairdots_server.testing import make_tiny_bundle

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAMBDA = 0.1
TIGHT = converged.ConvergedConfig(damping=LAMBDA, tolerance=1e-10, max_iterations=300)


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    root = tmp_path_factory.mktemp("converged")
    make_tiny_bundle(root, "t64", n_train=24, finetune_steps=8, dtype=torch.float64)
    return ModelRuntime(load_bundle(root / "t64"))


def _flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def _full_logits(task: Task, examples: list[Example]) -> Callable[[dict[str, torch.Tensor]],
                                                                  torch.Tensor]:
    """θ_scope -> logits [B, C] of `examples` through every layer of the model."""
    enc = task.encode([e.text for e in examples], max_length=64)
    embeds = task.embed(enc.input_ids).detach()
    return lambda p: task.logits_fn(p, embeds, enc.attention_mask)


def _grad_J(rt: ModelRuntime, theta: dict[str, torch.Tensor], added: list[Example],
            removed: list[Example]) -> torch.Tensor:
    """∇J(θ) by autograd through the full model, J written out from its formula."""
    task, train = rt.task, list(rt.bundle.train)
    served = {k: v.clone() for k, v in task.scope_params().items()}
    n = len(train)
    p = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    base = _full_logits(task, train)
    with torch.no_grad():
        q = F.softmax(base(served), dim=-1)  # p_s [N, C]
    logp = F.log_softmax(base(p), dim=-1)
    j = (q * (q.log() - logp)).sum() / n
    for sign, ex in ((1.0, added), (-1.0, removed)):
        if ex:
            y = torch.tensor([e.label for e in ex])
            j = j + sign * F.cross_entropy(_full_logits(task, ex)(p), y, reduction="sum") / n
    j = j + 0.5 * LAMBDA * sum(((p[k] - served[k]) ** 2).sum() for k in p)
    grads = torch.autograd.grad(j, list(p.values()))
    return torch.cat([g.reshape(-1) for g in grads])


def _edit(rt: ModelRuntime) -> tuple[list[Example], list[Example], list[Example]]:
    """An attack-like training set: example 3 replaced by another text with its label flipped,
    example 10 removed, and one new example appended; (new_train, added, removed)."""
    train = list(rt.bundle.train)
    z3, z10 = train[3], train[10]
    new3 = Example("what a dull , lifeless film", 1 - z3.label)
    extra = Example("a warm and funny story", 1)
    new = [new3 if i == 3 else e for i, e in enumerate(train) if i != 10] + [extra]
    return new, [new3, extra], [z3, z10]


def test_difference_is_a_multiset_difference() -> None:
    a, b, c = Example("a", 0), Example("b", 1), Example("c", 0)
    served = [a, b, a, c]
    new = [b, a, Example("a", 1), c, c]  # one "a"/0 fewer, "a"/1 and a second c added
    added, removed = converged.difference(served, new)
    assert added == [Example("a", 1), c]
    assert removed == [a]
    assert converged.difference(served, list(reversed(served))) == ([], [])


def test_unchanged_training_set_returns_the_served_model(rt: ModelRuntime) -> None:
    train = list(rt.bundle.train)
    task, result, how = converged.retrain_converged(rt, train[::-1], TIGHT)
    assert (how.iterations, how.added, how.removed, how.converged) == (0, 0, 0, True)
    for k, v in rt.task.scope_params().items():
        assert torch.equal(task.scope_params()[k], v), k
    assert result.steps == 0


def test_response_is_stationary_for_the_objective_through_the_full_model(
    rt: ModelRuntime,
) -> None:
    new, added, removed = _edit(rt)
    task, _, how = converged.retrain_converged(rt, new, TIGHT)
    assert (how.added, how.removed) == (2, 2) and how.iterations > 0
    served = rt.task.scope_params()
    theta = task.scope_params()
    g0 = _grad_J(rt, dict(served), added, removed)
    g1 = _grad_J(rt, dict(theta), added, removed)
    assert float(g0.abs().max()) > 1e-4  # the edits do move the optimum
    assert float(g1.abs().max()) <= 1e-5 * float(g0.abs().max())  # a wrong J: O(1)
    assert float((_flat(theta) - _flat(served)).norm()) > 1e-4
    # only the scope moved; every other parameter is the served model's
    scoped = set(rt.task.scope_names)
    for (name, a), (_, b) in zip(task.model.named_parameters(),
                                 rt.task.model.named_parameters(), strict=True):
        if name not in scoped:
            assert torch.equal(a, b), name


def _ggn_solve(rt: ModelRuntime, rhs: torch.Tensor, lam: float) -> torch.Tensor:
    """(G + λI)⁻¹ rhs, G = (1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i of the full model at θ_s,
    by conjugate gradients to a 1e-12 relative residual."""
    task, train = rt.task, list(rt.bundle.train)
    theta = dict(task.scope_params())
    names = list(theta)
    shapes = [theta[k].shape for k in names]
    sizes = [theta[k].numel() for k in names]
    f = _full_logits(task, train)
    n = len(train)

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: x.reshape(s) for k, x, s in zip(names, v.split(sizes), shapes, strict=True)}

    with torch.no_grad():
        p = F.softmax(f(theta), dim=-1)  # [N, C]

    def gv(v: torch.Tensor) -> torch.Tensor:
        _, jv = torch.func.jvp(f, (theta,), (unflat(v),))  # [N, C]
        hjv = p * jv - p * (p * jv).sum(dim=1, keepdim=True)
        _, vjp = torch.func.vjp(f, theta)
        (back,) = vjp(hjv / n)
        return _flat(back) + lam * v

    x = torch.zeros_like(rhs)
    r = rhs.clone()
    d = r.clone()
    rr = float(r @ r)
    for _ in range(2000):
        ad = gv(d)
        alpha = rr / float(d @ ad)
        x += alpha * d
        r -= alpha * ad
        new = float(r @ r)
        if new ** 0.5 <= 1e-12 * float(rhs.norm()):
            break
        d = r + (new / rr) * d
        rr = new
    return x


def _first_order_error(rt: ModelRuntime, lam: float) -> tuple[float, float]:
    """One removed training example z: ‖Δθ̂ − Δθ_pred‖/‖Δθ_pred‖ and their cosine, where
    Δθ_pred = (G + λI)⁻¹ ∇L(z)/N."""
    train = list(rt.bundle.train)
    z = train[5]
    cfg = converged.ConvergedConfig(damping=lam, tolerance=1e-10, max_iterations=300)
    task, _, _ = converged.retrain_converged(rt, train[:5] + train[6:], cfg)
    theta_s = dict(rt.task.scope_params())
    p = {k: v.clone().requires_grad_(True) for k, v in theta_s.items()}
    loss = F.cross_entropy(_full_logits(rt.task, [z])(p), torch.tensor([z.label]))
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, list(p.values()))])
    predicted = _ggn_solve(rt, g / len(train), lam)
    measured = _flat(dict(task.scope_params())) - _flat(theta_s)
    rel = float((measured - predicted).norm() / predicted.norm())
    return rel, float(measured @ predicted / (measured.norm() * predicted.norm()))


def test_response_matches_the_damped_influence_to_first_order(rt: ModelRuntime) -> None:
    """θ̂ − θ_s = (G + λI)⁻¹ ∇L(z)/N + O(‖Δθ‖²): close, and closer as the response shrinks
    (a larger λ); a wrong sign, weight or curvature is off by O(1) at every λ. Measured
    here: 6 % at λ = 1 and 1.2 % at λ = 10 (the response 5.6x smaller)."""
    rel1, cos1 = _first_order_error(rt, 1.0)
    rel10, cos10 = _first_order_error(rt, 10.0)
    assert rel10 < 0.03 and cos10 > 0.9995, (rel10, cos10)
    assert rel1 < 0.15 and cos1 > 0.99, (rel1, cos1)
    assert rel10 < 0.4 * rel1  # the error is of second order


def test_retrain_dispatches_and_notes_what_ran(rt: ModelRuntime) -> None:
    new, _, _ = _edit(rt)
    task, result, notes = retrain(rt, new, RetrainSpec(RetrainMode.SCOPE_PROXIMAL), lambda: None)
    assert len(notes) == 1 and "proximal Bregman response" in notes[0]
    assert "2 examples added, 2 removed" in notes[0] and result.steps > 0
    again, _, _ = retrain(rt, new, RetrainSpec(RetrainMode.SCOPE_PROXIMAL, seed=7), lambda: None)
    for k, v in task.scope_params().items():  # deterministic: the seed changes nothing
        assert torch.equal(again.scope_params()[k], v), k


def test_model_without_the_split_is_a_failed_precondition(rt: ModelRuntime) -> None:
    plain = ModelRuntime(rt.bundle, scope_inputs=False)
    with pytest.raises(FailedPrecondition) as err:
        check_supported(plain, RetrainSpec(RetrainMode.SCOPE_PROXIMAL))
    assert "RETRAIN_MODE_SCOPE_ONLY" in err.value.message
    check_supported(plain, RetrainSpec(RetrainMode.SCOPE_ONLY))  # the others need no split
    check_supported(rt, RetrainSpec(RetrainMode.SCOPE_PROXIMAL))


@pytest.mark.parametrize("bad", [{"damping": 0.0}, {"damping": float("nan")},
                                 {"tolerance": 0.0}, {"max_iterations": 0},
                                 {"batch_tokens": 0}])
def test_config_rejects_what_cannot_run(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        converged.ConvergedConfig(**bad)  # type: ignore[arg-type]


def test_a_growing_gradient_is_reported_as_diverged() -> None:
    common = {"iterations": 100, "evaluations": 200, "objective": -1.0, "non_finite": 0,
              "damping": 0.05, "added": 685, "removed": 685, "seconds": 1.0}
    bad = converged.ConvergedResult(grad_max=0.4, grad_max_start=0.01, converged=False,
                                    **common)  # type: ignore[arg-type]
    slow = converged.ConvergedResult(grad_max=1e-4, grad_max_start=0.01, converged=False,
                                     **common)  # type: ignore[arg-type]
    assert bad.diverged and "DIVERGED" in bad.note() and "fewer edits" in bad.note()
    assert not slow.diverged and "stopped before the tolerance" in slow.note()
