"""Exhaustive inner-product search: the reference every approximate index is measured against."""

from __future__ import annotations

import numpy as np

from pairdots_server.errors import InvalidArgument
from pairdots_server.index.base import (
    PAD_ID,
    PAD_SCORE,
    CandidateIndex,
    check_add,
    check_new_ids,
    check_search,
)


def topk_rows(scores: np.ndarray, ids: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of scores [Q, M] (entry labelled by ids [Q, M]), the `top` largest ordered by
    (score descending, id ascending); padded with (PAD_SCORE, PAD_ID) when M < top."""
    q, m = scores.shape
    out_s = np.full((q, top), PAD_SCORE, dtype=scores.dtype)
    out_i = np.full((q, top), PAD_ID, dtype=np.int64)
    keep = min(top, m)
    for r in range(q if keep else 0):
        row, row_ids = scores[r], ids[r]
        if keep < m:
            # Everything scoring >= the keep-th largest value, so ties at the cut-off are all
            # considered by the id-ascending tie-break below.
            cut = np.partition(row, m - keep)[m - keep]
            part = np.flatnonzero(row >= cut)
        else:
            part = np.arange(m)
        order = np.lexsort((row_ids[part], -row[part]))[:keep]  # last key is primary
        out_s[r, :keep] = row[part[order]]
        out_i[r, :keep] = row_ids[part[order]]
    return out_s, out_i


class ExactIndex(CandidateIndex):
    """Full scan: scores = queries @ vectors^T accumulated in float64, exact top-K.

    Memory for one search is [Q, chunk] float64; `chunk` bounds it for large indexes.
    """

    def __init__(self, dim: int, chunk: int = 65536) -> None:
        if dim < 1:
            raise InvalidArgument.for_field("dim", f"must be ≥ 1, got {dim}")
        if chunk < 1:
            raise InvalidArgument.for_field("chunk", f"must be ≥ 1, got {chunk}")
        self._dim = int(dim)
        self._chunk = int(chunk)
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._ids = np.zeros((0,), dtype=np.int64)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        return int(self._ids.shape[0])

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        vectors, ids = check_add(vectors, ids, self._dim)
        check_new_ids(self._ids, ids)
        self._vectors = np.concatenate([self._vectors, vectors])
        self._ids = np.concatenate([self._ids, ids])

    def search(self, queries: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
        queries64 = check_search(queries, top, self._dim).astype(np.float64)  # [Q, k]
        nq = queries64.shape[0]
        best_s = np.full((nq, top), PAD_SCORE, dtype=np.float64)
        best_i = np.full((nq, top), PAD_ID, dtype=np.int64)
        for start in range(0, self.ntotal, self._chunk):
            vec = self._vectors[start : start + self._chunk].astype(np.float64)  # [C, k]
            chunk_s = queries64 @ vec.T  # [Q, C]
            chunk_i = np.broadcast_to(self._ids[start : start + self._chunk], chunk_s.shape)
            best_s, best_i = topk_rows(  # merge running best [Q, top] with chunk [Q, C]
                np.concatenate([best_s, chunk_s], axis=1),
                np.concatenate([best_i, chunk_i], axis=1),
                top,
            )
        return best_s.astype(np.float32), best_i

    def search_within(
        self, queries: np.ndarray, top: int, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-K among `allowed`: a scan of those vectors only (float64)."""
        queries64 = check_search(queries, top, self._dim).astype(np.float64)  # [Q, k]
        rows = np.flatnonzero(np.isin(self._ids, np.asarray(allowed, dtype=np.int64)))
        scores = queries64 @ self._vectors[rows].astype(np.float64).T  # [Q, M]
        ids = np.broadcast_to(self._ids[rows], scores.shape)
        best_s, best_i = topk_rows(scores, ids, top)
        return best_s.astype(np.float32), best_i

    def describe(self) -> dict[str, object]:
        return {
            "backend": "exact",
            "kind": "exact",
            "metric": "inner_product",
            "dim": self._dim,
            "ntotal": self.ntotal,
            "device": "cpu",
        }

    def ranking(self, query: np.ndarray) -> np.ndarray:
        """All stored ids ordered by decreasing <query, v> (ties by id): query [k] -> [N]."""
        _, ids = self.search(np.asarray(query).reshape(1, -1), max(self.ntotal, 1))
        order: np.ndarray = ids[0][ids[0] != PAD_ID]
        return order
