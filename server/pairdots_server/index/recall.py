"""Recall of the prefilter against the exhaustive ranking (DESIGN.md §3 "Prefilter")."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from pairdots_server.errors import InvalidArgument
from pairdots_server.index.base import PAD_ID


def recall_at(candidate_ids: Iterable[int], exact_ranking: Sequence[int], m: int) -> float:
    """recall@m = |top-m of the exact ranking ∩ candidates| / m.

    candidate_ids: the K ids the index returned (PAD_ID entries are ignored).
    exact_ranking: all ids (or at least the first m) ordered by the exact score, best first.
    """
    if m < 1:
        raise InvalidArgument.for_field("m", f"must be ≥ 1, got {m}")
    ranking = np.asarray(exact_ranking, dtype=np.int64).reshape(-1)
    if ranking.size < m:
        raise InvalidArgument.for_field(
            "m", f"the exact ranking has {ranking.size} ids, fewer than m = {m}"
        )
    top = ranking[:m]
    if np.unique(top).size != m:
        raise InvalidArgument.for_field("exact_ranking", "contains duplicate ids")
    cands = np.asarray(list(candidate_ids), dtype=np.int64).reshape(-1)
    cands = cands[cands != PAD_ID]
    return float(np.isin(top, cands).sum()) / m
