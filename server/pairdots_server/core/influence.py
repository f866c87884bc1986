"""Influence of training examples (and of their tokens) on a test word's saliency score.

Sign convention (Koh & Liang): I(z, ·) is the derivative of the quantity w.r.t. *upweighting* z.
Removing z from n training examples changes the quantity by about -I/n. Positive I = upweighting
z raises the salient score ("supporting"); negative = "opposing".

* Eq. 5:   I(z, w) = -∇θwᵀ H⁻¹ ∇θL(z) = -s_testᵀ ∇θL(z),  s_test = H⁻¹ ∇θw (one solve per query).
* Eq. 6–7: I(z, z̃, w) = -s_testᵀ (∇θL(z̃) - ∇θL(z)), the effect of replacing z by z̃.
* Eq. 8:   I(x_t, w) = I(z, w) - I(z̃(t, UNK), w), z̃(t, UNK) = z with token t replaced by [UNK].

For Eq. 8 the scalar -s_testᵀ∇θL(z) is a directional derivative of the loss along s_test, so it
is computed with one forward-mode product (jvp) for a whole batch of UNK-replaced copies; no
per-example gradient is materialised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from pairdots_server.core.aliases import LogitsFn
from pairdots_server.core.params import unflatten
from pairdots_server.core.scoring import (
    Row,
    neg_directional_losses,
    token_influence_first_order_many,
)


def influence_on_score(s_test: Tensor, train_grads: Tensor) -> Tensor:
    """Eq. 5: I(z_i, w) = -∇θL(z_i) · s_test for train_grads [N,P], s_test [P] -> [N]."""
    if train_grads.dim() != 2 or train_grads.shape[1] != s_test.shape[0]:
        raise ValueError(
            f"train_grads {tuple(train_grads.shape)} and s_test {tuple(s_test.shape)} do not "
            "match; both must come from the same parameter scope"
        )
    return -(train_grads @ s_test.to(train_grads.dtype))


def perturbed_influence(s_test: Tensor, grads_orig: Tensor, grads_pert: Tensor) -> Tensor:
    """Eq. 6–7: I(z, z̃, w) = -s_test · (∇θL(z̃) - ∇θL(z)): [N,P], [N,P] -> [N]."""
    if grads_orig.shape != grads_pert.shape:
        raise ValueError(
            f"grads_orig {tuple(grads_orig.shape)} and grads_pert {tuple(grads_pert.shape)} differ"
        )
    return influence_on_score(s_test, grads_pert - grads_orig)


def _default_positions(mask: Tensor, positions: Sequence[int] | None) -> list[int]:
    if positions is None:
        return [int(t) for t in torch.nonzero(mask[0]).flatten()]
    return [int(t) for t in positions]


def _check_single(embeds: Tensor, mask: Tensor, unk_embed: Tensor) -> None:
    if embeds.dim() != 3 or embeds.shape[0] != 1 or mask.shape != embeds.shape[:2]:
        raise ValueError(
            f"expected one example: embeds [1,T,D], mask [1,T]; got {tuple(embeds.shape)}, "
            f"{tuple(mask.shape)}"
        )
    if unk_embed.shape != embeds.shape[2:]:
        raise ValueError(
            f"unk_embed has shape {tuple(unk_embed.shape)}, expected [D] = [{embeds.shape[2]}]"
        )


def token_influence_exact(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    s_test: Tensor,
    embeds: Tensor,
    mask: Tensor,
    label: int,
    unk_embed: Tensor,
    positions: Sequence[int] | None = None,
    batch_size: int = 32,
) -> Tensor:
    """Eq. 8 for every position t: I(z, w) - I(z̃(t, UNK), w) -> [T].

    embeds [1,T,D] are the training example's word embeddings, unk_embed [D] the [UNK] word
    embedding. ``positions`` defaults to every attended position; pass the non-special ones.
    Positions not evaluated are 0.
    """
    _check_single(embeds, mask, unk_embed)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pos = _default_positions(mask, positions)
    detached = {k: v.detach() for k, v in params.items()}
    direction = unflatten(s_test.detach().to(embeds.dtype), detached)
    label_t = torch.tensor([label], device=embeds.device)
    with torch.no_grad():
        base = neg_directional_losses(logits_fn, detached, direction, embeds, mask, label_t)[0]
    out = torch.zeros(embeds.shape[1], dtype=embeds.dtype, device=embeds.device)
    for start in range(0, len(pos), batch_size):
        chunk = pos[start : start + batch_size]
        b = len(chunk)
        copies = embeds.detach().expand(b, -1, -1).clone()  # [b,T,D]
        copies[torch.arange(b), torch.tensor(chunk)] = unk_embed.to(embeds.dtype)
        with torch.no_grad():
            pert = neg_directional_losses(
                logits_fn,
                detached,
                direction,
                copies,
                mask.expand(b, -1),
                label_t.expand(b),
            )  # [b]
        out[torch.tensor(chunk)] = base - pert
    return out


def token_influence_fast(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    s_test: Tensor,
    embeds: Tensor,
    mask: Tensor,
    label: int,
    unk_embed: Tensor,
    positions: Sequence[int] | None = None,
) -> Tensor:
    """First-order Eq. 8: with g(E) = -s_testᵀ∇θL(z; E) = I(z, w) as a function of the embeddings,

        I(z, w) - I(z̃(t, UNK), w) = g(E) - g(Ẽ_t) ≈ ∇_{e_t} g · (e_t - e_unk)

    for every t from one mixed second derivative -> [T] (one row of
    core/scoring.token_influence_first_order_many, which says why it is a double backward).
    Positions not in ``positions`` (default: all attended) are 0.
    """
    _check_single(embeds, mask, unk_embed)
    pos = _default_positions(mask, positions)
    row = Row(embeds[0].detach(), mask[0], int(label))
    return token_influence_first_order_many(
        logits_fn, params, s_test, [row], [pos], unk_embed, max_tokens=max(1, embeds.shape[1])
    )[0]
