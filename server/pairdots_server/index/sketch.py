"""Which projection built an index: the Projection protocol and the one factory by kind.

An index's vectors are v_i = Sᵀ∇θL(z_i) (paper Eq. 5's g_i) for a seeded linear map S, and the
query must be projected with the same S. Two kinds are readable:

  "gaussian"     projection.GaussianProjection, dense i.i.d. N(0, 1/k) (indexes built before
                 the sparse sketch; their meta.json has no "projection_kind" and reads as this);
  "sparse_sign"  sparse_sign.SparseSignProjection, CountSketch (the default for new indexes:
                 23 MB instead of P·k·4 bytes, same inner-product variance or less).
"""

from __future__ import annotations

from typing import Protocol

import torch

from pairdots_server.errors import InvalidArgument
from pairdots_server.index.projection import GaussianProjection
from pairdots_server.index.sparse_sign import KIND as SPARSE_SIGN
from pairdots_server.index.sparse_sign import SparseSignProjection

GAUSSIAN = "gaussian"
PROJECTION_KINDS = (GAUSSIAN, SPARSE_SIGN)
DEFAULT_PROJECTION = SPARSE_SIGN


class Projection(Protocol):
    """A seeded linear map R^in_dim -> R^out_dim with E[<Sx, Sy>] = <x, y>."""

    in_dim: int
    out_dim: int
    seed: int

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_dim] -> [B, out_dim]."""
        ...

    def describe(self) -> dict[str, object]:
        """What identifies the map."""
        ...


def make_projection(
    kind: str, in_dim: int, out_dim: int, seed: int, *, max_dense_bytes: int | None = None
) -> Projection:
    """The projection of `kind` (PROJECTION_KINDS); max_dense_bytes: the Gaussian cache budget."""
    if kind == GAUSSIAN:
        if max_dense_bytes is None:
            return GaussianProjection(in_dim, out_dim, seed)
        return GaussianProjection(in_dim, out_dim, seed, max_dense_bytes=max_dense_bytes)
    if kind == SPARSE_SIGN:
        return SparseSignProjection(in_dim, out_dim, seed)
    raise InvalidArgument.for_field(
        "projection_kind", f"must be one of {PROJECTION_KINDS}, got {kind!r}"
    )
