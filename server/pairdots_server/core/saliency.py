"""Gradient saliency of input tokens (paper Eq. 1–2, §3.1) and its parameter gradient ∇θ w.

Eq. 1 linearises the target S_y around the input embeddings E: S_y(E) ≈ w_y(E)ᵀE + b with
w_y(e_t) = ∇_{e_t} S_y(E) (Eq. 2). A token score s(x_t) is then read off w_y(e_t):

* ``TokenScore.GRAD_DELTA_UNK``: s = w_y(e_t) · (e_t − e_[UNK]), the first-order change of
  S_y when token t is replaced by [UNK] (the replacement Eq. 8 uses for training tokens).

Measured on the fine-tuned MiniLM SST-2 bundle (60 test sentences; reference: the real drop of
log p(y|x) when a word is replaced by [UNK]), mean Spearman of the word scores / of their
magnitudes against the occlusion effect / its magnitude, and how often the top word by
magnitude is the top occlusion word: GRAD_INPUT −0.02 / 0.17 / 27 %, GRAD_DELTA_UNK
0.13 / 0.24 / 22 %, L2_NORM 0.12 / 0.38 / 32 %. The service therefore ranks salient words by
``L2_NORM`` by default (which words the model is sensitive to, the paper's question); the
signed scores are offered for direction, none of them is reliable as a sign on this model.
* ``TokenScore.GRAD_INPUT``: s = w_y(e_t) · e_t, the linear term of Eq. 1 that token t
  contributes (gradient × input, i.e. relative to a zero embedding).
* ``TokenScore.L2_NORM`` (the service default): s = ‖w_y(e_t)‖₂ (magnitude only, sign-free).
* ``TokenScore.SUM``: s = Σ_j w_y(e_t)_j, the paper's literal reading of Eq. 2. For BERT-family
  models this is ~0 (numerical noise): the embedding output passes through LayerNorm, which is
  invariant to adding the same constant to every dimension of its input, so the directional
  derivative along (1,…,1) vanishes, i.e. the gradient entries sum to zero. Kept for fidelity
  to the paper only.

A word's score is the sum of its word pieces' token scores; special tokens are dropped.

The target S_y is ``Target.LOG_PROB`` log p(y|x) by default (the probability saturates: at
p = 0.98 all gradients are ~1e-9), ``Target.PROB`` p(y|x) as in the paper, or ``Target.LOGIT``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from pairdots_server.core.aliases import LogitsFn
from pairdots_server.core.params import flatten


class Target(enum.Enum):
    """What S_y is: log p(y|x) (default), p(y|x) (paper), or the logit z_y."""

    LOG_PROB = "log_prob"
    PROB = "prob"
    LOGIT = "logit"


class TokenScore(enum.Enum):
    """How a token score is read off w_y(e_t) (see the module docstring)."""

    GRAD_INPUT = "grad_input"
    GRAD_DELTA_UNK = "grad_delta_unk"
    L2_NORM = "l2_norm"
    SUM = "sum"


def target_value(logits: Tensor, labels: Tensor, target: Target = Target.LOG_PROB) -> Tensor:
    """S_y for each row: logits [B,C], labels [B] (long) -> [B]."""
    idx = labels.reshape(-1, 1).long()
    if target is Target.LOG_PROB:
        vals = torch.log_softmax(logits, dim=-1)
    elif target is Target.PROB:
        vals = torch.softmax(logits, dim=-1)
    elif target is Target.LOGIT:
        vals = logits
    else:  # pragma: no cover - exhaustive enum
        raise ValueError(f"unknown target {target!r}; use one of {[t.value for t in Target]}")
    return vals.gather(1, idx).squeeze(1)


def _scores_from_grad(
    grad_e: Tensor, embeds: Tensor, method: TokenScore, baseline: Tensor | None = None
) -> Tensor:
    """Token scores from w_y(e_t): grad_e, embeds [T,D] (baseline [D]) -> [T]."""
    if method is TokenScore.GRAD_INPUT:
        return (grad_e * embeds).sum(-1)
    if method is TokenScore.GRAD_DELTA_UNK:
        if baseline is None:
            raise ValueError(
                "TokenScore.GRAD_DELTA_UNK needs the baseline embedding (the [UNK] token's)"
            )
        return (grad_e * (embeds - baseline)).sum(-1)
    if method is TokenScore.L2_NORM:
        return grad_e.norm(dim=-1)
    if method is TokenScore.SUM:
        return grad_e.sum(-1)
    raise ValueError(f"unknown token score {method!r}; use one of {[m.value for m in TokenScore]}")


def _check_single(embeds: Tensor, mask: Tensor) -> None:
    if embeds.dim() != 3 or embeds.shape[0] != 1 or mask.shape != embeds.shape[:2]:
        raise ValueError(
            f"expected one example: embeds [1,T,D] and mask [1,T], got {tuple(embeds.shape)} "
            f"and {tuple(mask.shape)}"
        )


def _token_scores_graph(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    embeds: Tensor,
    mask: Tensor,
    label: int,
    target: Target,
    method: TokenScore,
    create_graph: bool,
    baseline: Tensor | None = None,
) -> Tensor:
    """Token scores [T] (differentiable w.r.t. ``params`` when ``create_graph``)."""
    e = embeds.detach().requires_grad_(True)  # [1,T,D]
    labels = torch.tensor([label], device=embeds.device)
    s = target_value(logits_fn(params, e, mask), labels, target).sum()
    (grad_e,) = torch.autograd.grad(s, e, create_graph=create_graph)  # [1,T,D]
    scores = _scores_from_grad(grad_e[0], e[0], method, baseline)  # [T]
    return scores * mask[0].to(scores.dtype)


def token_saliency(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    embeds: Tensor,
    mask: Tensor,
    label: int,
    target: Target = Target.LOG_PROB,
    method: TokenScore = TokenScore.GRAD_INPUT,
    baseline: Tensor | None = None,
) -> Tensor:
    """Token scores s(x_t) for one input (Eq. 1–2): embeds [1,T,D], mask [1,T] -> [T].

    ``baseline`` [D] is the reference embedding of GRAD_DELTA_UNK (the [UNK] embedding).
    Padding positions score 0. No autograd graph is kept.
    """
    _check_single(embeds, mask)
    detached = {k: v.detach() for k, v in params.items()}
    with torch.enable_grad():
        scores = _token_scores_graph(
            logits_fn, detached, embeds, mask, label, target, method, create_graph=False,
            baseline=baseline,
        )
    return scores.detach()


def word_scores(token_scores: Tensor, word_ids: Sequence[int | None], n_words: int) -> Tensor:
    """Word score = sum of its word pieces' token scores: [T] -> [W].

    ``word_ids[t]`` is the word index of token t or None for special tokens (dropped), as
    returned by a fast tokenizer's ``word_ids()``.
    """
    if len(word_ids) != token_scores.shape[0]:
        raise ValueError(
            f"word_ids has {len(word_ids)} entries but there are {token_scores.shape[0]} tokens; "
            "pass the word_ids of the same tokenisation"
        )
    out = torch.zeros(n_words, dtype=token_scores.dtype, device=token_scores.device)
    for t, w in enumerate(word_ids):
        if w is None:
            continue
        if not 0 <= w < n_words:
            raise ValueError(f"word id {w} at token {t} is outside [0, {n_words}); check n_words")
        out[w] += token_scores[t]
    return out


def grad_theta_word_score(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    embeds: Tensor,
    mask: Tensor,
    label: int,
    target: Target,
    method: TokenScore,
    token_positions: Sequence[int],
    baseline: Tensor | None = None,
) -> Tensor:
    """∇θ w for the word score w = Σ_{t ∈ token_positions} s(x_t) -> flat [P].

    Double backprop: w depends on θ through w_y(e_t) = ∇_{e_t} S_y, so the first gradient is taken
    with ``create_graph=True`` and differentiated again w.r.t. the scoped params only. Needs a
    model whose attention supports double backward (HF: attn_implementation="eager").
    """
    _check_single(embeds, mask)
    if len(token_positions) == 0:
        raise ValueError("token_positions is empty; pass the word-piece positions of the word")
    theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        scores = _token_scores_graph(
            logits_fn, theta, embeds, mask, label, target, method, create_graph=True,
            baseline=baseline,
        )
        w = scores[list(token_positions)].sum()
        grads = torch.autograd.grad(w, list(theta.values()), allow_unused=True)
    filled = {
        k: (g if g is not None else torch.zeros_like(theta[k])).detach()
        for k, g in zip(theta, grads, strict=True)
    }
    return flatten(filled)
