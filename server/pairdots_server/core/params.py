"""Flat-vector view of a dict of scoped parameters.

Every solver and influence formula works on flat vectors θ ∈ R^P; the model sees a
``name -> tensor`` mapping. The order is the mapping's iteration order, so always flatten and
unflatten against the same mapping (the scoped ``params`` of the task).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def num_params(params: Mapping[str, Tensor]) -> int:
    """P = total number of scalar entries in ``params``."""
    return sum(int(t.numel()) for t in params.values())


def flatten(params: Mapping[str, Tensor]) -> Tensor:
    """Concatenate the tensors of ``params`` (in iteration order) into one vector [P]."""
    if not params:
        raise ValueError("flatten: params is empty; select at least one scoped parameter")
    return torch.cat([t.reshape(-1) for t in params.values()])


def flatten_batched(grads: Mapping[str, Tensor], batch: int) -> Tensor:
    """Flatten a dict of per-example tensors, each [B, *shape], into a matrix [B, P]."""
    return torch.cat([t.reshape(batch, -1) for t in grads.values()], dim=1)


def unflatten(vec: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split ``vec`` [P] into tensors shaped like ``like`` (views of ``vec``, same key order)."""
    total = num_params(like)
    if vec.dim() != 1 or vec.numel() != total:
        raise ValueError(
            f"unflatten: vector has shape {tuple(vec.shape)} but the scoped parameters hold "
            f"{total} entries; flatten against the same parameter scope"
        )
    out: dict[str, Tensor] = {}
    offset = 0
    for name, t in like.items():
        n = int(t.numel())
        out[name] = vec[offset : offset + n].view(t.shape)
        offset += n
    return out
