"""The candidate-index interface: maximum-inner-product top-K search over projected gradients.

The index knows nothing about influence signs. The caller queries with +P^T s_test to find
examples whose gradient aligns with s_test (most negative I(z, w) = -<s_test, g_z>, paper
Eq. 5) and with -P^T s_test for the other end, then scores the returned candidates exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from pairdots_server.errors import InvalidArgument

PAD_ID = -1
"""Id returned in slots beyond the number of stored vectors."""

PAD_SCORE = float("-inf")
"""Score returned with PAD_ID."""


class CandidateIndex(ABC):
    """Stores (id, vector) pairs; `search` returns, per query q, the `top` ids maximising <q, v>.

    Results are ordered by decreasing score; rows with fewer than `top` stored vectors are padded
    with id PAD_ID (-1) and score PAD_SCORE (-inf). Ids are non-negative int64 and unique.
    """

    @property
    @abstractmethod
    def dim(self) -> int:
        """Vector dimension k."""

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Number of stored vectors."""

    @abstractmethod
    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Store vectors [N, dim] float32 under ids [N] int64."""

    @abstractmethod
    def search(self, queries: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, dim] -> (scores [Q, top] float32, ids [Q, top] int64)."""

    @abstractmethod
    def describe(self) -> dict[str, object]:
        """JSON-serialisable description (backend, kind, dim, ntotal, parameters)."""

    def search_within(
        self, queries: np.ndarray, top: int, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """`search` restricted to the stored ids in `allowed` [M] int64: per query the `top`
        allowed ids maximising <q, v>, padded like `search` when fewer are allowed.

        This default deepens a plain search (depth top·N/M, doubled until every query has
        `top` allowed ids or the depth reaches N) and filters it: exact wherever `search` is
        exact, at a cost that grows with N/M. Backends override it with a direct scan."""
        allowed = np.unique(np.asarray(allowed, dtype=np.int64))
        nq = np.asarray(queries).shape[0]
        out_s = np.full((nq, top), PAD_SCORE, dtype=np.float32)
        out_i = np.full((nq, top), PAD_ID, dtype=np.int64)
        n = self.ntotal
        if n == 0 or allowed.size == 0:
            check_search(queries, top, self.dim)
            return out_s, out_i
        depth = min(n, max(top, -(-top * n // allowed.size)))
        while True:
            scores, ids = self.search(queries, depth)  # [Q, depth]
            keep = np.isin(ids, allowed)
            counts = keep.sum(axis=1)
            if depth >= n or bool((counts >= min(top, allowed.size)).all()):
                break
            depth = min(n, 2 * depth)
        for r in range(nq):
            sel = np.flatnonzero(keep[r])[:top]
            out_s[r, : sel.size] = scores[r, sel]
            out_i[r, : sel.size] = ids[r, sel]
        return out_s, out_i


def check_add(vectors: np.ndarray, ids: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate an `add` call; return (vectors float32 C-contiguous [N, dim], ids int64 [N])."""
    vectors = np.asarray(vectors)
    ids = np.asarray(ids)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise InvalidArgument.for_field(
            "vectors", f"expected shape [N, {dim}], got {list(vectors.shape)}"
        )
    if ids.ndim != 1 or ids.shape[0] != vectors.shape[0]:
        raise InvalidArgument.for_field(
            "ids", f"expected shape [{vectors.shape[0]}] (one id per vector), got {list(ids.shape)}"
        )
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgument.for_field("ids", f"must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and ids.min() < 0:
        raise InvalidArgument.for_field("ids", "must be non-negative (-1 marks padding)")
    if np.unique(ids).size != ids.size:
        raise InvalidArgument.for_field("ids", "contains duplicates; give each vector its own id")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise InvalidArgument.for_field("vectors", "contains NaN or Inf")
    return vectors, ids


def check_search(queries: np.ndarray, top: int, dim: int) -> np.ndarray:
    """Validate a `search` call; return queries as float32 C-contiguous [Q, dim]."""
    queries = np.asarray(queries)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise InvalidArgument.for_field(
            "queries", f"expected shape [Q, {dim}], got {list(queries.shape)}"
        )
    if int(top) < 1:
        raise InvalidArgument.for_field("top", f"must be ≥ 1, got {top}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not np.isfinite(queries).all():
        raise InvalidArgument.for_field("queries", "contains NaN or Inf")
    return queries


def check_new_ids(existing: np.ndarray, ids: np.ndarray) -> None:
    """Raise if any of `ids` is already stored."""
    if existing.size and ids.size:
        clash = np.intersect1d(existing, ids)
        if clash.size:
            raise InvalidArgument.for_field(
                "ids", f"{clash.size} id(s) already in the index (e.g. {int(clash[0])})"
            )
