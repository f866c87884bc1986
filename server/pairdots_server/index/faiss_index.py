"""FAISS inner-product index (flat or IVF), on the GPU when faiss-gpu sees one.

faiss is imported lazily inside functions: the service imports this module without faiss and
only fails (FailedPrecondition naming the pip package) when an index is actually built.

Kinds:
    flat  exact maximum inner product (IndexFlatIP); the default below AUTO_IVF_THRESHOLD vectors.
    ivf   IndexIVFFlat with METRIC_INNER_PRODUCT, coarse quantizer trained (spherical k-means)
          on the vectors themselves; nlist ≈ 4√N, nprobe ≈ nlist/8 (at least 8) by default.
    auto  flat when the first `add` brings fewer than AUTO_IVF_THRESHOLD vectors, else ivf.

The kind is resolved, and an IVF index trained, on the first `add`; add every vector in one call
(as `store.load_index` does). Ids are kept in a numpy array next to the FAISS index (row i of the
FAISS index is ids[i]), which works identically on CPU and GPU.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from pairdots_server.errors import FailedPrecondition, InvalidArgument
from pairdots_server.index.base import (
    PAD_ID,
    PAD_SCORE,
    CandidateIndex,
    check_add,
    check_new_ids,
    check_search,
)

IndexKind = Literal["auto", "flat", "ivf"]
UseGpu = Literal["auto"] | bool

AUTO_IVF_THRESHOLD = 2_000_000
"""auto switches to IVF only from here. Below it flat is both exact and fast enough: at
N = 700,000 (bench/scale.py, k = 64) a flat top-2000 search took 27.6 ms, while the default IVF
(nlist ≈ 4√N, nprobe ≈ nlist/8) had recall@10 0.705 against it — inner-product IVF misses the
high-norm gradient sketches (norms 0.04–7, effective rank ≈ 3) — and only probing every list
reached 0.95. IVF-Flat stores the same vectors as flat, so it saves no memory."""
GPU_MAX_TOP = 2048
"""FAISS GPU k-selection supports k ≤ 2048; larger searches run on a CPU copy."""
MIN_POINTS_PER_CENTROID = 39
"""FAISS's k-means warns below 39 training points per centroid; the default nlist respects it."""


def import_faiss() -> Any:
    """Import faiss or raise FailedPrecondition saying what to install."""
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise FailedPrecondition(
            "the candidate index needs FAISS, which is not installed: run "
            "`pip install faiss-cpu` (or `pip install faiss-gpu-cu12` on a CUDA 12 machine), "
            "or install the extra `pairdots[cpu]` / `pairdots[gpu]`",
            reason="FAISS_MISSING",
        ) from exc
    return faiss


def faiss_num_gpus() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    faiss = import_faiss()
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def default_nlist(n: int) -> int:
    """≈ 4√N inverted lists, at most N / 39 (FAISS's points-per-centroid floor), at least 1."""
    return max(1, min(round(4.0 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))


def default_nprobe(nlist: int) -> int:
    """≈ nlist / 8 lists probed per query, at least 8, at most nlist."""
    return min(nlist, max(8, nlist // 8))


class FaissIndex(CandidateIndex):
    """Maximum-inner-product top-K with FAISS.

    Args:
        dim: vector dimension k.
        kind: "auto" | "flat" | "ivf" (see the module docstring).
        nlist: IVF inverted lists (default `default_nlist(N)` at the first add).
        nprobe: IVF lists searched per query (default `default_nprobe(nlist)`); can be changed
            later with `set_nprobe`.
        use_gpu: "auto" (GPU when faiss sees one), True (require one), False (CPU).
    """

    def __init__(
        self,
        dim: int,
        kind: IndexKind = "auto",
        nlist: int | None = None,
        nprobe: int | None = None,
        use_gpu: UseGpu = "auto",
    ) -> None:
        if dim < 1:
            raise InvalidArgument.for_field("dim", f"must be ≥ 1, got {dim}")
        if kind not in ("auto", "flat", "ivf"):
            raise InvalidArgument.for_field(
                "kind", f"must be 'auto', 'flat' or 'ivf', got {kind!r}"
            )
        if nlist is not None and nlist < 1:
            raise InvalidArgument.for_field("nlist", f"must be ≥ 1, got {nlist}")
        if nprobe is not None and nprobe < 1:
            raise InvalidArgument.for_field("nprobe", f"must be ≥ 1, got {nprobe}")
        if use_gpu not in ("auto", True, False):
            raise InvalidArgument.for_field(
                "use_gpu", f"must be 'auto', True or False, got {use_gpu!r}"
            )
        self._faiss = import_faiss()
        self._dim = int(dim)
        self._kind: IndexKind = kind
        self._nlist = nlist
        self._nprobe = nprobe
        self._gpu = self._want_gpu(use_gpu)
        self._index: Any = None  # built on the first add
        self._cpu_copy: Any = None  # lazily made for GPU searches with top > GPU_MAX_TOP
        self._gpu_res: Any = None  # must outlive the GPU index
        self._quantizer: Any = None  # the IVF index borrows it; keep it alive
        self._ids = np.zeros((0,), dtype=np.int64)

    def _want_gpu(self, use_gpu: UseGpu) -> bool:
        n = faiss_num_gpus()
        if use_gpu is True and n == 0:
            raise FailedPrecondition(
                "use_gpu=True but FAISS sees no GPU: install `faiss-gpu-cu12` (instead of "
                "faiss-cpu) on a CUDA 12 machine, or set use_gpu to 'auto' or False",
                reason="FAISS_NO_GPU",
            )
        return use_gpu is not False and n > 0

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        return int(self._ids.shape[0])

    @property
    def kind(self) -> IndexKind:
        """The resolved kind ("auto" until the first add)."""
        return self._kind

    def _build(self, vectors: np.ndarray) -> None:
        faiss = self._faiss
        n = vectors.shape[0]
        if self._kind == "auto":
            self._kind = "ivf" if n >= AUTO_IVF_THRESHOLD else "flat"
        if self._kind == "flat":
            index = faiss.IndexFlatIP(self._dim)
        else:
            nlist = self._nlist if self._nlist is not None else default_nlist(n)
            if nlist > n:
                raise InvalidArgument.for_field(
                    "nlist", f"{nlist} inverted lists need at least as many vectors, got {n}"
                )
            quantizer = faiss.IndexFlatIP(self._dim)
            index = faiss.IndexIVFFlat(quantizer, self._dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)  # spherical k-means (IndexIVF sets it for inner product)
            self._quantizer = quantizer
            self._nlist = nlist
            self._nprobe = min(nlist, self._nprobe or default_nprobe(nlist))
            index.nprobe = self._nprobe
        if self._gpu:
            self._gpu_res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
            if self._kind == "ivf":
                index.nprobe = self._nprobe
        self._index = index

    def set_nprobe(self, nprobe: int) -> None:
        """Change the number of IVF lists searched per query (no effect on flat)."""
        if nprobe < 1:
            raise InvalidArgument.for_field("nprobe", f"must be ≥ 1, got {nprobe}")
        self._nprobe = int(nprobe)
        if self._index is not None and self._kind == "ivf":
            self._nprobe = min(self._nprobe, int(self._nlist or nprobe))
            self._index.nprobe = self._nprobe
            if self._cpu_copy is not None:
                self._cpu_copy.nprobe = self._nprobe

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        vectors, ids = check_add(vectors, ids, self._dim)
        check_new_ids(self._ids, ids)
        if vectors.shape[0] == 0:
            return
        if self._index is None:
            self._build(vectors)
        self._index.add(vectors)
        self._cpu_copy = None
        self._ids = np.concatenate([self._ids, ids])

    def search(self, queries: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
        queries = check_search(queries, top, self._dim)
        nq = queries.shape[0]
        if self._index is None or nq == 0:
            return (
                np.full((nq, top), PAD_SCORE, dtype=np.float32),
                np.full((nq, top), PAD_ID, dtype=np.int64),
            )
        index = self._index
        if self._gpu and top > GPU_MAX_TOP:
            if self._cpu_copy is None:
                self._cpu_copy = self._faiss.index_gpu_to_cpu(self._index)
                if self._kind == "ivf":
                    self._cpu_copy.nprobe = self._nprobe
            index = self._cpu_copy
        dist, rows = index.search(queries, min(top, self.ntotal))  # [Q, k] each
        return self._padded(dist, rows, top)

    def _padded(self, dist: np.ndarray, rows: np.ndarray, top: int
                ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's (scores, row numbers) [Q, k] as (scores, ids) [Q, top]: rows mapped to ids,
        row -1 (IVF may return fewer than k when the probed lists are short) and the slots
        beyond k padded with (PAD_SCORE, PAD_ID)."""
        nq, k = rows.shape
        scores = np.full((nq, top), PAD_SCORE, dtype=np.float32)
        ids = np.full((nq, top), PAD_ID, dtype=np.int64)
        found = rows >= 0
        scores[:, :k] = np.where(found, dist, PAD_SCORE)
        ids[:, :k] = np.where(found, self._ids[np.maximum(rows, 0)], PAD_ID)
        return scores, ids

    def search_within(
        self, queries: np.ndarray, top: int, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Flat on the CPU: one scan restricted to the allowed rows (a FAISS IDSelectorBatch
        over row numbers), exact. IVF and GPU indexes: the base class's deepening search."""
        if self._kind != "flat" or self._gpu or self._index is None:
            return super().search_within(queries, top, allowed)
        queries = check_search(queries, top, self._dim)
        rows = np.flatnonzero(np.isin(self._ids, np.asarray(allowed, dtype=np.int64)))
        if rows.size == 0:  # nothing allowed is stored: all padding
            nq = queries.shape[0]
            return self._padded(np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64), top)
        sel = self._faiss.IDSelectorBatch(rows.astype(np.int64))
        params = self._faiss.SearchParameters(sel=sel)
        dist, found = self._index.search(queries, min(top, int(rows.size)), params=params)
        return self._padded(dist, found, top)  # [Q, top] each

    def describe(self) -> dict[str, object]:
        info: dict[str, object] = {
            "backend": "faiss",
            "kind": self._kind,
            "metric": "inner_product",
            "dim": self._dim,
            "ntotal": self.ntotal,
            "device": "gpu" if self._gpu else "cpu",
            "faiss_version": getattr(self._faiss, "__version__", "unknown"),
        }
        if self._kind == "ivf":
            info["nlist"] = self._nlist
            info["nprobe"] = self._nprobe
        return info
