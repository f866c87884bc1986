"""The Fisher label terms shared by the K-FAC fit (core.kfac_fit) and the diagonal solver
(core.ihvp.diagonal), and the batch helpers both fits use. See core.kfac_fit's docstring for
the three Fisher kinds and how a term's weight enters a statistic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from pairdots_server.core.aliases import LogitsFn
from pairdots_server.core.batches import Batch
from pairdots_server.core.exceptions import SolverError
from pairdots_server.core.grads import VmapMask, per_example_loss_grads
from pairdots_server.core.ihvp.kfac_factors import FISHER_KINDS

BatchLike = Any  # a core.batches.Batch or an (embeds [B,T,D], mask [B,T], labels [B]) tuple


def check_fisher(fisher: str, num_samples: int) -> None:
    if fisher not in FISHER_KINDS:
        raise SolverError(f"unknown fisher {fisher!r}; use one of {', '.join(FISHER_KINDS)}")
    if num_samples < 1:
        raise SolverError(f"num_samples must be >= 1, got {num_samples}")


def fisher_label_terms(
    logits: Tensor,
    labels: Tensor,
    fisher: str,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
) -> list[tuple[Tensor, Tensor]]:
    """The (labels [B], weights [B]) terms of the chosen Fisher for logits [B,C], gold labels [B].

    sampled: ``num_samples`` draws y ~ softmax(logits) (CPU generator), weight 1/num_samples;
    expected: y = c for every class c, weight p_c; empirical: the gold labels, weight 1.
    """
    check_fisher(fisher, num_samples)
    b, c = logits.shape
    dtype = logits.dtype
    if fisher == "empirical":
        return [(labels.long(), torch.ones(b, dtype=dtype, device=logits.device))]
    prob = torch.softmax(logits.detach(), dim=-1)  # [B,C]
    if fisher == "expected":
        return [
            (torch.full((b,), k, dtype=torch.long, device=logits.device), prob[:, k])
            for k in range(c)
        ]
    draws = torch.multinomial(
        prob.detach().to("cpu", torch.float64), num_samples, replacement=True, generator=generator
    ).to(logits.device)  # [B,k]
    w = torch.full((b,), 1.0 / num_samples, dtype=dtype, device=logits.device)
    return [(draws[:, j], w) for j in range(num_samples)]


def squared_grad_sum(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    embeds: Tensor,
    mask: Tensor,
    terms: list[tuple[Tensor, Tensor]],
    chunk_size: int | None = None,
    vmap_mask: VmapMask = VmapMask.ADDITIVE_4D,
) -> Tensor:
    """Σ_k Σ_n w_kn · (∇θ L_n(y_kn))² [P] (elementwise), per-example gradients by vmap."""
    total = None
    for y, w in terms:
        g = per_example_loss_grads(
            logits_fn, params, embeds, mask, y, chunk_size=chunk_size, vmap_mask=vmap_mask
        )  # [B,P]
        part = (w.to(g.dtype)[:, None] * g.square()).sum(0)
        total = part if total is None else total + part
    assert total is not None
    return total


def as_triple(batch: BatchLike) -> tuple[Tensor, Tensor, Tensor]:
    """A Batch or an (embeds, mask, labels) tuple -> (embeds [B,T,D], mask [B,T], labels [B])."""
    if isinstance(batch, Batch):
        return batch.embeds, batch.mask, batch.labels
    embeds, mask, labels = batch
    return embeds, mask, labels


def reiterable(batches: Any) -> Callable[[], Iterator[BatchLike]]:
    """A function returning a fresh iterator over the batches each call (the fit makes two
    passes): a BatchProvider (its ``full()``), or a re-iterable collection (list, tuple)."""
    if hasattr(batches, "full"):
        return lambda: iter(batches.full())
    if iter(batches) is batches:
        raise SolverError(
            "the K-FAC fit makes two passes over the data; pass a list of batches or a "
            "BatchProvider (e.g. core.batches.TensorBatches), not a one-shot iterator"
        )
    return lambda: iter(batches)
