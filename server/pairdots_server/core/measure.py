"""Measurements f(θ) whose influence Explain reports, and their parameter gradients ∇θf.

Influence of a training example z on any differentiable measurement f of the test input is
I(z, f) = -∇θfᵀ H⁻¹ ∇θL(z) (Koh & Liang 2017, Eq. 2; the paper's Eq. 5 with f = the word's
saliency score w). Which f is measured decides what "supporting" means:

* prediction level (Koh & Liang; the training-focused view of the paper's Figure 1):
  f = m_y(x) = z_y(x) − max_{c≠y} z_c(x), the logit margin of label y. It does not saturate
  (unlike p(y|x)) and, for two labels, equals log p_y − log p_{y'}.
* word level, occlusion: f = c_w(x) = m_y(x) − m_y(x with the word pieces of w → [UNK]), the
  word's contribution to the margin measured by replacing it (the replacement Eq. 8 uses for
  training tokens). Its θ-gradient needs two ordinary backward passes, no double backprop.
  ``word_occlusion`` returns c_w for every word at once (one batched forward).

Why not the paper's saliency score w = ‖∇_e log p_y‖ here: in the binary case
∇_e log p_y = (1 − p_y)∇_e m_y, so ∇θw ≈ −‖∇_e m_y‖∇θp_y is the same direction for every word of
the sentence, and its supporting examples are those that lower the model's confidence
(measured: 0 % identical class on MiniLM/SST-2). ``core.saliency.grad_theta_word_score`` keeps
that measurement available.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from pairdots_server.core.aliases import LogitsFn
from pairdots_server.core.params import flatten


def margin(logits: Tensor, labels: Tensor) -> Tensor:
    """m_y = z_y − max_{c≠y} z_c for each row: logits [B,C], labels [B] -> [B]."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"margin needs logits [B,C] with C ≥ 2, got {tuple(logits.shape)}")
    idx = labels.reshape(-1, 1).long()
    z_y = logits.gather(1, idx).squeeze(1)  # [B]
    others = logits.scatter(1, idx, float("-inf"))  # [B,C], label column masked
    return z_y - others.max(dim=1).values


def occlude(embeds: Tensor, positions: Sequence[int], unk_embed: Tensor) -> Tensor:
    """A copy of embeds [1,T,D] with the given token positions replaced by unk_embed [D]."""
    out = embeds.clone()
    out[0, list(positions)] = unk_embed.to(out.dtype)
    return out


def word_occlusion(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    embeds: Tensor,
    mask: Tensor,
    label: int,
    word_ids: Sequence[int | None],
    n_words: int,
    unk_embed: Tensor,
) -> Tensor:
    """c_w = m_y(x) − m_y(x with word w → [UNK]) for every word: embeds [1,T,D] -> [W].

    Words without tokens (truncated away) get 0. One forward over W+1 copies.
    """
    positions = [[t for t, w in enumerate(word_ids) if w == i] for i in range(n_words)]
    seen = [i for i in range(n_words) if positions[i]]
    copies = [embeds] + [occlude(embeds, positions[i], unk_embed) for i in seen]
    batch = torch.cat(copies)  # [1+W',T,D]
    masks = mask.expand(batch.shape[0], -1)  # [1+W',T]
    with torch.no_grad():
        m = margin(
            logits_fn(params, batch, masks),
            torch.full((batch.shape[0],), label, device=embeds.device),
        )  # [1+W']
    out = torch.zeros(n_words, dtype=m.dtype, device=m.device)
    for j, i in enumerate(seen):
        out[i] = m[0] - m[1 + j]
    return out


def _grad_flat(value: Tensor, theta: Mapping[str, Tensor]) -> Tensor:
    grads = torch.autograd.grad(value, list(theta.values()), allow_unused=True)
    return flatten({
        k: (g if g is not None else torch.zeros_like(theta[k])).detach()
        for k, g in zip(theta, grads, strict=True)
    })


def grad_theta_margin(
    logits_fn: LogitsFn, params: Mapping[str, Tensor], embeds: Tensor, mask: Tensor, label: int
) -> Tensor:
    """∇θ m_y(x) for one input (prediction-level measurement): embeds [1,T,D] -> flat [P]."""
    theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        m = margin(logits_fn(theta, embeds.detach(), mask), torch.tensor([label], device=embeds.device))  # [1]
        return _grad_flat(m.sum(), theta)


def grad_theta_occlusion(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    embeds: Tensor,
    mask: Tensor,
    label: int,
    positions: Sequence[int],
    unk_embed: Tensor,
) -> Tensor:
    """∇θ c_w for the word at token `positions` (word-level measurement): embeds [1,T,D] ->
    flat [P]. Supporting examples (I > 0) raise c_w: they make the word push the input more
    towards `label` (or less away from it)."""
    if len(positions) == 0:
        raise ValueError("positions is empty; pass the word-piece positions of the word")
    theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    batch = torch.cat([embeds.detach(), occlude(embeds.detach(), positions, unk_embed)])  # [2,T,D]
    with torch.enable_grad():
        m = margin(
            logits_fn(theta, batch, mask.expand(2, -1)), torch.tensor([label, label], device=embeds.device)
        )  # [2]
        return _grad_flat(m[0] - m[1], theta)
