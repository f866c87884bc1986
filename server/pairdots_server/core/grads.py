"""Per-example gradients of the training loss, ∇θ L(z_i) with L = -log p(y_i | x_i).

These are the ∇θL(z) of Eq. 4–7. ``per_example_loss_grads`` uses ``torch.func.vmap(grad(...))``
over a functional call, one example per vmap lane; ``per_example_loss_grads_loop`` is the
reference (one autograd call per example, the example's own 2D mask).

Padding: every example keeps its own mask. HF models build their attention mask with
data-dependent Python control flow (``mask.all()`` to skip an all-ones mask), which vmap cannot
trace. Under vmap we therefore hand the model the *prepared* additive mask [1,1,1,T]
(0 where attended, dtype-min where padded) — ``VmapMask.ADDITIVE_4D``, the default — which HF
returns unchanged and adds to the attention scores, exactly what it would build itself from the
2D mask in eager attention. A ``logits_fn`` that only accepts a 0/1 [B,T] mask and is itself
vmap-friendly can use ``VmapMask.BINARY_2D``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from pairdots_server.core.aliases import LogitsFn
from pairdots_server.core.params import flatten, flatten_batched


class VmapMask(enum.Enum):
    """How the per-example attention mask is passed to ``logits_fn`` under vmap."""

    ADDITIVE_4D = "additive_4d"
    BINARY_2D = "binary_2d"


def additive_attention_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0/1 mask [B,T] -> additive mask [B,T]: 0 where attended, finfo(dtype).min where padded."""
    return (1.0 - mask.to(dtype)) * torch.finfo(dtype).min


def _check_batch(embeds: Tensor, mask: Tensor, labels: Tensor) -> None:
    if embeds.dim() != 3 or mask.shape != embeds.shape[:2] or labels.shape != embeds.shape[:1]:
        raise ValueError(
            f"expected embeds [B,T,D], mask [B,T], labels [B]; got {tuple(embeds.shape)}, "
            f"{tuple(mask.shape)}, {tuple(labels.shape)}"
        )


def per_example_loss_grads(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    embeds: Tensor,
    mask: Tensor,
    labels: Tensor,
    chunk_size: int | None = None,
    vmap_mask: VmapMask = VmapMask.ADDITIVE_4D,
) -> Tensor:
    """∇θ L(z_i) for every example: embeds [B,T,D], mask [B,T], labels [B] -> [B,P].

    ``chunk_size`` bounds how many examples vmap processes at once (memory); the result does
    not depend on it.
    """
    _check_batch(embeds, mask, labels)
    detached = {k: v.detach() for k, v in params.items()}
    if vmap_mask is VmapMask.ADDITIVE_4D:
        lane_mask = additive_attention_mask(mask, embeds.dtype)  # [B,T]
    else:
        lane_mask = mask

    def loss_one(p: Mapping[str, Tensor], e: Tensor, m: Tensor, y: Tensor) -> Tensor:
        # e [T,D], m [T], y [] -> scalar
        m_in = m[None, None, None, :] if vmap_mask is VmapMask.ADDITIVE_4D else m[None, :]
        logits = logits_fn(p, e[None], m_in)  # [1,C]
        return F.cross_entropy(logits, y[None].long())

    grad_fn = torch.func.vmap(
        torch.func.grad(loss_one), in_dims=(None, 0, 0, 0), chunk_size=chunk_size
    )
    grads = grad_fn(detached, embeds.detach(), lane_mask, labels)  # name -> [B,*shape]
    return flatten_batched(grads, embeds.shape[0]).detach()  # [B,P]


def per_example_loss_grads_loop(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    embeds: Tensor,
    mask: Tensor,
    labels: Tensor,
) -> Tensor:
    """Reference for ``per_example_loss_grads``: one autograd call per example -> [B,P]."""
    _check_batch(embeds, mask, labels)
    theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    rows = []
    for i in range(embeds.shape[0]):
        with torch.enable_grad():
            logits = logits_fn(theta, embeds[i : i + 1].detach(), mask[i : i + 1])  # [1,C]
            loss = F.cross_entropy(logits, labels[i : i + 1].long())
            grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
        filled = {
            k: (g if g is not None else torch.zeros_like(theta[k]))
            for k, g in zip(theta, grads, strict=True)
        }
        rows.append(flatten(filled).detach())
    return torch.stack(rows)  # [B,P]
