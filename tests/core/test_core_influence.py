"""Influence (Eq. 5–8) against closed forms, leave-one-out retraining, and explicit gradients.

Convex problem: a tiny BERT's classifier head (the only scoped parameters) on its frozen pooled
features = L2-regularised multinomial logistic regression. Objective
R(θ) = (1/N) Σ_i CE_i(θ) + (l2/2)‖θ‖², trained to a gradient norm < 1e-12 by Newton's method
written independently of the core (on the features, with torch.autograd.functional).
"""

import pytest
import torch
import torch.nn.functional as F
from core_tiny import make_tiny
from scipy import stats

from pairdots_server.core.batches import TensorBatches
from pairdots_server.core.curvature import Curvature, CurvatureOperator
from pairdots_server.core.grads import per_example_loss_grads
from pairdots_server.core.ihvp.exact import ExactSolver
from pairdots_server.core.influence import (
    influence_on_score,
    perturbed_influence,
    token_influence_exact,
    token_influence_fast,
)
from pairdots_server.core.saliency import Target, TokenScore, grad_theta_word_score, token_saliency

N = 40
L2 = 0.01


class Convex:
    def __init__(self) -> None:
        self.tiny = make_tiny(n=N + 1, seed=5)
        m = self.tiny.model
        with torch.no_grad():
            self.feats = m.bert(
                inputs_embeds=self.tiny.embeds, attention_mask=self.tiny.mask
            ).pooler_output  # [N+1,D]
        self.d = self.feats.shape[1]
        self.train = slice(0, N)
        self.test = N  # the last example is the test input
        self.theta = self.fit(torch.ones(N, dtype=torch.float64))

    def objective(self, theta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        w, b = theta[: 2 * self.d].view(2, self.d), theta[2 * self.d :]
        logits = self.feats[:N] @ w.T + b
        ce = F.cross_entropy(logits, self.tiny.labels[:N], reduction="none")
        return (weights * ce).sum() / N + 0.5 * L2 * theta.square().sum()

    def fit(self, weights: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        theta = torch.zeros(2 * self.d + 2, dtype=torch.float64) if start is None else start
        for _ in range(50):
            g = torch.autograd.functional.jacobian(lambda t: self.objective(t, weights), theta)
            if g.norm() < 1e-12:
                break
            h = torch.autograd.functional.hessian(lambda t: self.objective(t, weights), theta)
            theta = theta - torch.linalg.solve(h, g)
        assert g.norm() < 1e-10
        return theta

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "classifier.weight": theta[: 2 * self.d].view(2, self.d).clone(),
            "classifier.bias": theta[2 * self.d :].clone(),
        }

    def example(self, i: int):
        t = self.tiny
        length = t.lengths[i]
        return t.embeds[i : i + 1, :length], t.mask[i : i + 1, :length], int(t.labels[i])

    def train_grads(self) -> torch.Tensor:
        t = self.tiny
        return per_example_loss_grads(
            t.logits_fn, self.params(self.theta), t.embeds[:N], t.mask[:N], t.labels[:N]
        )

    def solver(self) -> ExactSolver:
        t = self.tiny
        data = TensorBatches(t.embeds[:N], t.mask[:N], t.labels[:N], batch_size=N)
        op = CurvatureOperator(t.logits_fn, self.params(self.theta), data, Curvature.GGN, l2=L2)
        return ExactSolver(op, damping=0.0)


@pytest.fixture(scope="module")
def convex() -> Convex:
    return Convex()


def test_eq5_test_loss_influence_matches_closed_form(convex) -> None:
    """I(z, L_test) = -∇L_testᵀ H⁻¹ ∇L_z with H = ∇²R from the independent feature-space code."""
    e, m, y = convex.example(convex.test)
    params = convex.params(convex.theta)
    g_test = per_example_loss_grads(convex.tiny.logits_fn, params, e, m, torch.tensor([y]))[0]
    got = influence_on_score(convex.solver().solve(g_test).x, convex.train_grads())

    ones = torch.ones(N, dtype=torch.float64)
    h = torch.autograd.functional.hessian(lambda t: convex.objective(t, ones), convex.theta)
    w, b = convex.theta[: 2 * convex.d].view(2, -1), convex.theta[2 * convex.d :]
    p = torch.softmax(convex.feats @ w.T + b, -1)  # [N+1,2]
    resid = p - F.one_hot(convex.tiny.labels, 2).double()  # ∂CE/∂logits
    x1 = torch.cat([convex.feats, torch.ones(N + 1, 1, dtype=torch.float64)], 1)
    grads = torch.cat(
        [(resid[:, :, None] * convex.feats[:, None, :]).reshape(N + 1, -1), resid], 1
    )  # [N+1,P] in the (weight, bias) flattening order
    assert x1.shape[1] == convex.d + 1
    expected = -(grads[:N] @ torch.linalg.solve(h, grads[N]))
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)


def test_eq5_word_score_influence_predicts_leave_one_out(convex) -> None:
    """Removing z changes the word score by ≈ -I(z, w)/N. Checked on the 8 most and 8 least
    influential training points: Pearson and Spearman > 0.9."""
    t = convex.tiny
    e, m, y = convex.example(convex.test)
    positions = [1, 2]

    def word(theta: torch.Tensor) -> float:
        s = token_saliency(t.logits_fn, convex.params(theta), e, m, y)
        return float(s[positions].sum())

    grad_w = grad_theta_word_score(
        t.logits_fn, convex.params(convex.theta), e, m, y, Target.LOG_PROB,
        TokenScore.GRAD_INPUT, positions,
    )
    infl = influence_on_score(convex.solver().solve(grad_w).x, convex.train_grads())
    order = torch.argsort(infl)
    picked = torch.cat([order[:8], order[-8:]]).tolist()
    base = word(convex.theta)
    predicted, actual = [], []
    for i in picked:
        weights = torch.ones(N, dtype=torch.float64)
        weights[i] = 0.0
        theta_i = convex.fit(weights, start=convex.theta.clone())
        actual.append(word(theta_i) - base)
        predicted.append(-float(infl[i]) / N)
    pearson = stats.pearsonr(predicted, actual)[0]
    spearman = stats.spearmanr(predicted, actual)[0]
    print("LOO word score: pearson", pearson, "spearman", spearman)
    assert pearson > 0.9 and spearman > 0.9, (pearson, spearman)


def test_eq6_7_replacement_influence_predicts_retraining(convex) -> None:
    """Replacing training example z by z̃ (its token 1 swapped for another example's) and
    retraining changes the word score by ≈ I(z, z̃, w)/N (Eq. 6–7: upweight z̃ by 1/N, downweight
    z by 1/N). Checked on the 8 most positive and 8 most negative predictions: Pearson and
    Spearman > 0.9 against the retrained optimum of the independent feature-space code."""
    t = convex.tiny
    e, m, y = convex.example(convex.test)
    positions = [1, 2]

    def word(theta: torch.Tensor) -> float:
        s = token_saliency(t.logits_fn, convex.params(theta), e, m, y)
        return float(s[positions].sum())

    params = convex.params(convex.theta)
    grad_w = grad_theta_word_score(t.logits_fn, params, e, m, y, Target.LOG_PROB,
                                   TokenScore.GRAD_INPUT, positions)
    s_test = convex.solver().solve(grad_w).x
    pert = t.embeds[:N].clone()
    pert[:, 1] = t.embeds[:N].roll(1, dims=0)[:, 1]  # z̃_i: token 1 of example i-1
    g_pert = per_example_loss_grads(t.logits_fn, params, pert, t.mask[:N], t.labels[:N])
    predicted_all = perturbed_influence(s_test, convex.train_grads(), g_pert) / N  # [N]
    with torch.no_grad():
        feats_pert = t.model.bert(inputs_embeds=pert, attention_mask=t.mask[:N]).pooler_output
    order = torch.argsort(predicted_all)
    picked = torch.cat([order[:8], order[-8:]]).tolist()
    base = word(convex.theta)
    feats = convex.feats
    predicted, actual = [], []
    try:
        for i in picked:
            convex.feats = feats.clone()
            convex.feats[i] = feats_pert[i]
            theta_i = convex.fit(torch.ones(N, dtype=torch.float64), start=convex.theta.clone())
            actual.append(word(theta_i) - base)
            predicted.append(float(predicted_all[i]))
    finally:
        convex.feats = feats
    pearson = stats.pearsonr(predicted, actual)[0]
    spearman = stats.spearmanr(predicted, actual)[0]
    assert pearson > 0.9 and spearman > 0.9, (pearson, spearman)


def _s_test(tiny, params) -> torch.Tensor:
    i = 0
    length = tiny.lengths[i]
    g = grad_theta_word_score(
        tiny.logits_fn, params, tiny.embeds[i : i + 1, :length], tiny.mask[i : i + 1, :length],
        int(tiny.labels[i]), Target.LOG_PROB, TokenScore.GRAD_INPUT, [1],
    )
    return g / g.norm()


def test_eq8_exact_matches_explicit_gradients(tiny) -> None:
    """The jvp-based I(z,w) - I(z̃,w) equals the same from explicit per-example gradients."""
    params = tiny.scope("last_layer_head")
    s_test = _s_test(tiny, params)
    i = 5
    e, m, y = tiny.embeds[i : i + 1], tiny.mask[i : i + 1], tiny.labels[i : i + 1]
    positions = list(range(1, tiny.lengths[i] - 1))  # no [CLS]/[SEP]
    got = token_influence_exact(
        tiny.logits_fn, params, s_test, e, m, int(y), tiny.unk_embed, positions, batch_size=3
    )
    copies = e.repeat(len(positions), 1, 1)
    for k, t in enumerate(positions):
        copies[k, t] = tiny.unk_embed
    g_orig = per_example_loss_grads(tiny.logits_fn, params, e, m, y)
    g_pert = per_example_loss_grads(
        tiny.logits_fn, params, copies, m.repeat(len(positions), 1), y.repeat(len(positions))
    )
    expected = influence_on_score(s_test, g_orig.repeat(len(positions), 1)) - influence_on_score(
        s_test, g_pert
    )
    torch.testing.assert_close(got[positions], expected, atol=1e-12, rtol=1e-9)
    assert got[0] == 0 and got[tiny.lengths[i] - 1 :].abs().max() == 0
    assert got.abs().max() > 1e-6


def test_eq8_fast_path_is_the_first_order_term(tiny) -> None:
    """With a replacement embedding ε-close to e_t, exact and first-order agree to O(ε)
    (relative error ≤ 1e-3 at ε = 1e-4·‖e_t‖)."""
    params = tiny.scope("last_layer_head")
    s_test = _s_test(tiny, params)
    i = 6
    e, m, y = tiny.embeds[i : i + 1], tiny.mask[i : i + 1], int(tiny.labels[i])
    gen = torch.Generator().manual_seed(0)
    for t in (1, 3):
        u = torch.randn(e.shape[2], generator=gen, dtype=torch.float64)
        near = e[0, t] + 1e-4 * e[0, t].norm() * u / u.norm()
        ex = token_influence_exact(tiny.logits_fn, params, s_test, e, m, y, near, [t])[t]
        fa = token_influence_fast(tiny.logits_fn, params, s_test, e, m, y, near, [t])[t]
        assert abs(float(ex - fa)) <= 1e-3 * abs(float(ex)), (float(ex), float(fa))


def test_eq8_fast_path_tracks_exact_for_real_unk(tiny) -> None:
    """Replacing a whole token by [UNK] is not infinitesimal: we only require that the
    first-order scores rank tokens like the exact ones (Pearson > 0.8 over the non-special
    tokens of 6 training examples)."""
    params = tiny.scope("last_layer_head")
    s_test = _s_test(tiny, params)
    ex_all, fa_all = [], []
    for i in range(6, 12):
        e, m, y = tiny.embeds[i : i + 1], tiny.mask[i : i + 1], int(tiny.labels[i])
        pos = list(range(1, tiny.lengths[i] - 1))
        ex = token_influence_exact(tiny.logits_fn, params, s_test, e, m, y, tiny.unk_embed, pos)
        fa = token_influence_fast(tiny.logits_fn, params, s_test, e, m, y, tiny.unk_embed, pos)
        ex_all += ex[pos].tolist()
        fa_all += fa[pos].tolist()
    pearson = stats.pearsonr(ex_all, fa_all)[0]
    print("eq8 fast vs exact pearson", pearson, stats.spearmanr(ex_all, fa_all)[0])
    assert pearson > 0.8, pearson
