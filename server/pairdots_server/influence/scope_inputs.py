"""The scope-input cache: h_L(z_i), the hidden states entering the influence scope, per
training example (model/scope_split.py).

h_L does not depend on the scoped parameters, so exact scoring (Eq. 5, one jvp per batch)
runs through the scoped top only once h_L of a candidate is known:

    I(z_i, f) = -⟨s_test, ∇θL(z_i)⟩ = -d/dε L(top(h_L(z_i); θ + ε s_test), y_i) |_{ε=0}.

Rows are kept unpadded ([T_i, D], T_i = attended tokens of example i) in `dtype` (float32 by
default; float16 halves the memory, bench/scope_inputs.py measures what it costs in exactness).
Missing rows are computed on first use (one plain forward of the layers below the scope,
batched in order of length) and kept in memory, at most `max_bytes` of them (least recently
used evicted first; None = unbounded): words like "the" touch most of the training set, so
without a bound the rows of a 700k-example set computed lazily would grow to
700k · 26 tokens · 384 · 4 B ≈ 28 GB on a MiniLM. Rows from the bundle's file are one tensor
loaded at start and are never evicted (dropping a view frees nothing). A bundle may carry them precomputed
(SCOPE_INPUTS_FILE, written by `pairdots index scope-inputs`, influence/artifacts.py); that
file is used only when its key matches the served bundle: the SHA-256 of the model files and
train.jsonl as the manifest lists them, the max_length and the split point (`cache_key`); its
rows keep the file's dtype. A stale or mismatched file is ignored (the rows are computed
lazily instead) and the reason is logged.

File layout (safetensors): "hidden" [Σ_i T_i, D] in `dtype`, "offsets" [N+1] int64 (row i is
hidden[offsets[i]:offsets[i+1]]); metadata {"key", "split", "dtype", "count"}.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from pairdots_server.influence.runtime import EncodedExamples
    from pairdots_server.model.scope_split import ScopeSplit

log = logging.getLogger(__name__)

SCOPE_INPUTS_FILE = "scope_inputs.safetensors"
SCOPE_INPUT_MAX_BYTES = 2**30  # the runtime's default bound (config.ExplainLimits: 1024 MiB)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


def cache_key(files: Mapping[str, str], max_length: int, split_key: str) -> str:
    """SHA-256 over what h_L depends on: every model/ file's and train.jsonl's digest (the
    manifest's), the max_length and the split point."""
    deps = {k: v for k, v in sorted(files.items()) if k.startswith("model/") or k == "train.jsonl"}
    blob = json.dumps({"files": deps, "max_length": max_length, "split": split_key}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class ScopeInputs:
    """h_L per training index, computed on first use and kept (thread-safe).

    encode(indices) -> EncodedExamples of those training examples (the runtime's encoder);
    batch_size rows per trunk forward (sorted by text length: little padding); max_bytes
    bounds the rows computed here (LRU; None = unbounded), not those loaded from the file."""

    def __init__(
        self,
        split: ScopeSplit,
        encode: Callable[[Sequence[int]], EncodedExamples],
        count: int,
        key: str,
        dtype: str = "float32",
        batch_size: int = 64,
        max_bytes: int | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self.split = split
        self.count = count
        self.key = key
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_bytes = max_bytes
        self._encode = encode
        self._file: dict[int, Tensor] = {}  # rows of the bundle's file (never evicted)
        self._lru: OrderedDict[int, Tensor] = OrderedDict()  # rows computed here, LRU first
        self._lru_bytes = 0
        self._lock = threading.Lock()
        self.computed = 0  # rows computed here (not loaded), evicted ones included
        self.loaded = 0  # rows loaded from the bundle's file
        self.evicted = 0  # computed rows dropped to stay within max_bytes

    def __len__(self) -> int:
        return len(self._file) + len(self._lru)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held (file rows + computed rows)."""
        with self._lock:
            return sum(_nbytes(r) for r in self._file.values()) + self._lru_bytes

    def rows(self, indices: Sequence[int], lengths: Sequence[int] | None = None) -> list[Tensor]:
        """h_L(z_i) [T_i, D] (storage dtype) for every index, computing the missing ones.
        lengths (optional, e.g. text lengths) order the missing ones into batches. Every row
        asked for is returned even when the call alone needs more than max_bytes (the rows
        beyond the bound are then evicted once the call has them)."""
        want = [int(i) for i in indices]
        got: dict[int, Tensor] = {}
        with self._lock:
            for i in dict.fromkeys(want):
                r = self._file.get(i)
                if r is None and (r := self._lru.get(i)) is not None:
                    self._lru.move_to_end(i)
                if r is not None:
                    got[i] = r
        missing = sorted(i for i in dict.fromkeys(want) if i not in got)
        if missing:
            if lengths is not None:
                by = dict(zip(want, lengths, strict=True))
                missing.sort(key=lambda i: (by.get(i, 0), i))
            for b in range(0, len(missing), self.batch_size):
                chunk = missing[b : b + self.batch_size]
                fresh = self._compute(chunk)
                with self._lock:
                    for i, r in zip(chunk, fresh, strict=True):
                        got[i] = self._keep(i, r)
                    self.computed += len(chunk)
        return [got[i] for i in want]

    def _keep(self, index: int, row: Tensor) -> Tensor:
        """Hold a computed row (lock held), evicting the least recently used beyond max_bytes;
        returns the row held for `index` (an earlier one when another call computed it)."""
        held = self._file.get(index)
        if held is None:
            held = self._lru.get(index)
        if held is not None:
            return held
        self._lru[index] = row
        self._lru_bytes += _nbytes(row)
        while self.max_bytes is not None and self._lru_bytes > self.max_bytes and self._lru:
            _, old = self._lru.popitem(last=False)
            self._lru_bytes -= _nbytes(old)
            self.evicted += 1
        return row

    def _compute(self, chunk: Sequence[int]) -> list[Tensor]:
        enc = self._encode(chunk)
        t = int(enc.mask.sum(dim=1).max())
        hidden = self.split.trunk(enc.embeds[:, :t], enc.mask[:, :t])  # [B,t,D]
        lens = enc.mask.sum(dim=1).tolist()
        dt = DTYPES[self.dtype]
        return [hidden[b, : int(n)].to(dt).clone() for b, n in enumerate(lens)]

    def compute_all(
        self,
        progress: Callable[[int, int], None] | None = None,
        lengths: Sequence[int] | None = None,
    ) -> None:
        """Every training example's h_L (what the bundle file stores)."""
        order = list(range(self.count))
        if lengths is not None:
            order.sort(key=lambda i: (lengths[i], i))
        step = self.batch_size * 8
        for b in range(0, len(order), step):
            self.rows(order[b : b + step])
            if progress is not None:
                progress(min(b + step, len(order)), len(order))

    def adopt(self, other: ScopeInputs) -> int:
        """Take the rows `other` holds (file and computed; converted to this cache's dtype) as
        computed rows of this one: h_L of the same split and model under another key (the
        rows an index build computed before its bundle's files had digests). Rows held at a
        lower precision than this cache's dtype are left to be computed. Returns how many
        were taken."""
        if other.split.key != self.split.key or other.count != self.count:
            raise ValueError("adopt: the other cache is of another split or training set")
        dt = DTYPES[self.dtype]
        eps = torch.finfo(dt).eps
        with other._lock:
            held = {i: r for i, r in {**other._lru, **other._file}.items()
                    if torch.finfo(r.dtype).eps <= eps}
        with self._lock:
            for i, row in held.items():
                self._keep(i, row.to(dt))  # a new tensor when the dtype differs
        return len(held)

    # -- the bundle file ---------------------------------------------------------------------

    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """(tensors, metadata) of the file; every row must be present (compute_all)."""
        with self._lock:
            held = {**self._lru, **self._file}
        if len(held) != self.count:
            raise ValueError(
                f"{len(held)} of {self.count} rows held; run compute_all() first, with "
                "max_bytes None (a bounded cache cannot hold every row)"
            )
        rows = [held[i] for i in range(self.count)]
        lens = torch.tensor([0] + [int(r.shape[0]) for r in rows], dtype=torch.long)
        meta = {
            "key": self.key,
            "split": self.split.key,
            "dtype": self.dtype,
            "count": str(self.count),
        }
        return {"hidden": torch.cat(rows).contiguous(), "offsets": torch.cumsum(lens, 0)}, meta

    def load(self, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> str | None:
        """Take the rows of a bundle file; returns why it was NOT used (None when used)."""
        if meta.get("key") != self.key:
            return (
                "its key does not match the bundle (model weights, training set, "
                "max_length or scope split changed since it was built)"
            )
        hidden, offsets = tensors.get("hidden"), tensors.get("offsets")
        if (
            hidden is None
            or offsets is None
            or offsets.shape != (self.count + 1,)
            or int(offsets[-1]) != hidden.shape[0]
        ):
            return "its tensors are malformed (hidden/offsets missing or inconsistent)"
        bounds = offsets.tolist()
        with self._lock:
            for i in range(self.count):
                self._file[i] = hidden[bounds[i] : bounds[i + 1]]
            self._lru.clear()  # the file holds every row
            self._lru_bytes = 0
            self.loaded = self.count
            self.dtype = meta.get("dtype", self.dtype)
        return None


def _nbytes(row: Tensor) -> int:
    return row.numel() * row.element_size()
