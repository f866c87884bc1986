"""Token saliency (Eq. 1–2), word aggregation and the double-backprop gradient ∇θ w."""

import pytest
import torch

from pairdots_server.core.params import flatten, unflatten
from pairdots_server.core.saliency import (
    Target,
    TokenScore,
    _token_scores_graph,
    grad_theta_word_score,
    target_value,
    token_saliency,
    word_scores,
)


def _one(tiny, i: int = 0):
    length = tiny.lengths[i]
    return tiny.embeds[i : i + 1, :length], tiny.mask[i : i + 1, :length], int(tiny.labels[i])


def test_target_value_matches_definitions() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
    labels = torch.tensor([1, 2])
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(target_value(logits, labels), lp[[0, 1], [1, 2]])
    torch.testing.assert_close(target_value(logits, labels, Target.PROB), lp[[0, 1], [1, 2]].exp())
    torch.testing.assert_close(target_value(logits, labels, Target.LOGIT), logits[[0, 1], [1, 2]])


def test_grad_input_matches_manual_autograd_and_padding_is_zero(tiny) -> None:
    params = tiny.scope("last_layer_head")
    i = min(range(len(tiny.lengths)), key=lambda k: tiny.lengths[k])
    e, m, y = tiny.embeds[i : i + 1], tiny.mask[i : i + 1], int(tiny.labels[i])
    scores = token_saliency(tiny.logits_fn, params, e, m, y)
    ee = e.clone().requires_grad_(True)
    s = torch.log_softmax(tiny.logits_fn(params, ee, m), -1)[0, y]
    (g,) = torch.autograd.grad(s, ee)
    expected = (g[0] * e[0]).sum(-1) * m[0]
    torch.testing.assert_close(scores, expected, atol=1e-12, rtol=0)
    assert scores[tiny.lengths[i] :].abs().max() == 0
    assert scores.abs().max() > 1e-4


def test_literal_sum_is_degenerate_under_embedding_layernorm(tiny) -> None:
    """The paper's s = Σ_j w_y(e_t)_j vanishes: LayerNorm ignores a constant shift of e_t."""
    params = tiny.scope("last_layer_head")
    e, m, y = _one(tiny, 1)
    total = token_saliency(tiny.logits_fn, params, e, m, y, method=TokenScore.SUM)
    norm = token_saliency(tiny.logits_fn, params, e, m, y, method=TokenScore.L2_NORM)
    assert norm.min() > 1e-6
    assert (total.abs() / norm).max() < 1e-10


def test_word_scores_sum_pieces_and_drop_specials() -> None:
    tok = torch.tensor([9.0, 1.0, 2.0, 3.0, 4.0, 9.0])
    got = word_scores(tok, [None, 0, 0, 1, 2, None], 3)
    assert torch.equal(got, torch.tensor([3.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="n_words"):
        word_scores(tok, [None, 0, 0, 1, 5, None], 3)


@pytest.mark.parametrize(
    "target,method",
    [
        (Target.LOG_PROB, TokenScore.GRAD_INPUT),
        (Target.PROB, TokenScore.GRAD_INPUT),
        (Target.LOGIT, TokenScore.L2_NORM),
    ],
)
def test_grad_theta_word_score_matches_finite_differences(tiny, target, method) -> None:
    """∇θ w · u == central difference of w along random directions u (tol 1e-6 relative)."""
    params = tiny.scope("last_layer_head")
    e, m, y = _one(tiny, 2)
    positions = [1, 2]
    grad = grad_theta_word_score(tiny.logits_fn, params, e, m, y, target, method, positions)
    theta = flatten(params)
    gen = torch.Generator().manual_seed(0)
    h = 1e-5
    for _ in range(3):
        u = torch.randn(theta.shape, generator=gen, dtype=theta.dtype)

        def w(vec):
            s = token_saliency(tiny.logits_fn, unflatten(vec, params), e, m, y, target, method)
            return s[positions].sum()

        fd = (w(theta + h * u) - w(theta - h * u)) / (2 * h)
        an = grad @ u
        assert abs(float(an - fd)) <= 1e-6 * max(abs(float(fd)), 1e-8), (float(an), float(fd))


def test_double_backprop_passes_gradcheck(tiny) -> None:
    """torch.autograd.gradcheck on θ ↦ word score, whose backward is the double backprop."""
    params = tiny.scope("head")
    e, m, y = _one(tiny, 3)

    def w(vec):
        scores = _token_scores_graph(
            tiny.logits_fn,
            unflatten(vec, params),
            e,
            m,
            y,
            Target.LOG_PROB,
            TokenScore.GRAD_INPUT,
            create_graph=True,
        )
        return scores[[1, 2]].sum()

    theta = flatten(params).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(w, (theta,), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)



def test_grad_delta_unk_is_gradient_dot_difference_to_baseline(tiny) -> None:
    """GRAD_DELTA_UNK = w_y(e_t)·(e_t − b) = GRAD_INPUT − w_y(e_t)·b for every token."""
    params = tiny.scope("last_layer_head")
    e, m, y = _one(tiny)
    b = torch.randn(e.shape[-1], dtype=e.dtype, generator=torch.Generator().manual_seed(0))
    delta = token_saliency(tiny.logits_fn, params, e, m, y, Target.LOG_PROB,
                           TokenScore.GRAD_DELTA_UNK, baseline=b)
    gi = token_saliency(tiny.logits_fn, params, e, m, y, Target.LOG_PROB, TokenScore.GRAD_INPUT)
    ee = e.clone().requires_grad_(True)
    lp = torch.log_softmax(tiny.logits_fn(params, ee, m), -1)[0, y]
    (g,) = torch.autograd.grad(lp, ee)
    mask = m[0].to(e.dtype)
    torch.testing.assert_close(delta, (g[0] * (e[0] - b)).sum(-1) * mask, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gi - delta, (g[0] @ b) * mask, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="baseline"):
        token_saliency(tiny.logits_fn, params, e, m, y, Target.LOG_PROB, TokenScore.GRAD_DELTA_UNK)
