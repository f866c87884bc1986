"""Where curvature operators get their data: (embeds, mask, labels) minibatches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class Batch:
    """One minibatch: embeds [B,T,D] (word embeddings), mask [B,T], labels [B]."""

    embeds: Tensor
    mask: Tensor
    labels: Tensor

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


class BatchProvider(Protocol):
    """Data for the curvature H = mean over the provider's examples.

    ``full`` yields a deterministic partition of all examples (exact/CG/Lanczos/power iteration);
    ``sample`` draws a random minibatch (LiSSA's H_j).
    """

    def full(self) -> Iterator[Batch]: ...

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch: ...


class TensorBatches:
    """A ``BatchProvider`` over in-memory tensors: embeds [N,T,D], mask [N,T], labels [N]."""

    def __init__(self, embeds: Tensor, mask: Tensor, labels: Tensor, batch_size: int = 32) -> None:
        if embeds.dim() != 3 or mask.shape != embeds.shape[:2] or labels.shape != embeds.shape[:1]:
            raise ValueError(
                f"expected embeds [N,T,D], mask [N,T], labels [N]; got {tuple(embeds.shape)}, "
                f"{tuple(mask.shape)}, {tuple(labels.shape)}"
            )
        if embeds.shape[0] == 0:
            raise ValueError("TensorBatches: no examples; the curvature needs at least one")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.embeds = embeds.detach()
        self.mask = mask
        self.labels = labels
        self.batch_size = batch_size

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def full(self) -> Iterator[Batch]:
        n = len(self)
        for start in range(0, n, self.batch_size):
            sl = slice(start, min(start + self.batch_size, n))
            yield Batch(self.embeds[sl], self.mask[sl], self.labels[sl])

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        n = len(self)
        idx = torch.randperm(n, generator=generator)[: min(batch_size, n)]
        idx = idx.to(self.embeds.device)
        return Batch(self.embeds[idx], self.mask[idx], self.labels[idx])
