"""A served model: bundle + scoped parameters + training data access + index + caches.

Everything Explain, Attack and Repair need per model lives here and is built once at load:
the scope parameters θ, an encoder for training examples (indices → embeddings batch), a
curvature batch provider over a fixed seeded sample of the training set, the candidate
index (when the bundle has one) and the low-rank curvature factors (when present).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pairdots_server.bundle import Bundle
from pairdots_server.compute import ComputeGate
from pairdots_server.core.batches import Batch
from pairdots_server.errors import BundleError

INDEX_DIR = "index"
LOWRANK_FILE = "lowrank.safetensors"
# The dense projection matrix is cached when it fits this budget (building and serving).
PROJECTION_CACHE_BYTES = 8 * 2**30


@dataclass(frozen=True)
class EncodedExamples:
    """Training examples as model inputs: embeds [B,T,D], mask [B,T], labels [B]."""

    indices: list[int]
    embeds: Tensor
    mask: Tensor
    labels: Tensor
    input_ids: Tensor
    word_ids: list[list[int | None]]
    words: list[list[str]]


class TrainingSample:
    """A BatchProvider (core.batches) over a fixed, seeded sample of training examples
    (curvature H = mean over the sample). Encoded once on first use; each minibatch is
    trimmed to its own longest example so short sentences don't pay for long ones."""

    def __init__(self, runtime: ModelRuntime, size: int, batch_size: int, seed: int) -> None:
        n = len(runtime.bundle.train)
        g = torch.Generator().manual_seed(seed)
        self.indices = torch.randperm(n, generator=g)[: min(size, n)].tolist()
        self.batch_size = batch_size
        self._runtime = runtime
        self._encoded: EncodedExamples | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.indices)

    def _rows(self, rows: Sequence[int]) -> Batch:
        with self._lock:
            if self._encoded is None:
                self._encoded = self._runtime.encode_train(self.indices)
            enc = self._encoded
        idx = torch.as_tensor(list(rows), device=enc.mask.device)
        mask = enc.mask[idx]  # [B,T]
        t = int(mask.sum(dim=1).max())
        return Batch(enc.embeds[idx, :t], mask[:, :t], enc.labels[idx])

    def full(self) -> Iterator[Batch]:
        for start in range(0, len(self.indices), self.batch_size):
            yield self._rows(range(start, min(start + self.batch_size, len(self.indices))))

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        pick = torch.randperm(len(self.indices), generator=generator)[:batch_size].tolist()
        return self._rows(pick)


class LRUCache:
    """A small thread-safe LRU cache (s_test vectors keyed by the query)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: Hashable, value: Any) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class ModelRuntime:
    def __init__(self, bundle: Bundle, *, cache_size: int = 256) -> None:
        self.bundle = bundle
        self.task = bundle.task
        self.name = bundle.name
        self.params = self.task.scope_params()
        self.num_params = sum(int(p.numel()) for p in self.params.values())
        train_cfg = bundle.manifest.get("train_config") or bundle.manifest.get("train") or {}
        self.max_length = int(train_cfg.get("max_length", 128)) if isinstance(train_cfg, dict) \
            else 128
        self.defaults: dict[str, Any] = dict(bundle.manifest.get("defaults") or {})
        self.s_test_cache = LRUCache(cache_size)
        self._index: Any = None
        self._projection: Any = None
        self._lowrank: Any = None
        self._lock = threading.Lock()
        # every torch computation on this model (Explain, each job step) holds this gate
        self.compute = ComputeGate(self.name)
        self._curvature_samples: dict[tuple[int, int, int], TrainingSample] = {}
        self.unk_embed = self.task.embed(
            torch.tensor([[self.task.unk_token_id]], device=self.task.device)
        )[0, 0].detach()  # [D]

    # -- training data ---------------------------------------------------------------------

    @property
    def n_train(self) -> int:
        return len(self.bundle.train)

    def encode_train(self, indices: Sequence[int]) -> EncodedExamples:
        examples = [self.bundle.train[i] for i in indices]
        enc = self.task.encode([e.text for e in examples], max_length=self.max_length)
        with torch.no_grad():
            embeds = self.task.embed(enc.input_ids).detach()  # [B,T,D]
        labels = torch.tensor([e.label for e in examples], device=embeds.device)
        return EncodedExamples(
            list(indices), embeds, enc.attention_mask, labels, enc.input_ids, enc.word_ids,
            enc.words,
        )

    def curvature_sample(self, size: int, batch_size: int, seed: int) -> TrainingSample:
        key = (size, batch_size, seed)
        with self._lock:
            if key not in self._curvature_samples:
                self._curvature_samples[key] = TrainingSample(self, size, batch_size, seed)
            return self._curvature_samples[key]

    # -- artifacts -------------------------------------------------------------------------

    @property
    def has_index(self) -> bool:
        return self.bundle.has_artifact(f"{INDEX_DIR}/meta.json")

    @property
    def has_lowrank(self) -> bool:
        return self.bundle.has_artifact(LOWRANK_FILE)

    def index(self) -> tuple[Any, Any]:
        """(CandidateIndex, GaussianProjection), loaded on first use."""
        with self._lock:
            if self._index is None:
                from pairdots_server.index.projection import GaussianProjection
                from pairdots_server.index.store import load_index

                index, meta = load_index(self.bundle.path / INDEX_DIR)
                if meta.in_dim != self.num_params:
                    raise BundleError(
                        f"bundle {self.name!r}: the index was built for {meta.in_dim} scoped "
                        f"parameters but the scope has {self.num_params}; rebuild it with "
                        "`pairdots index build`"
                    )
                self._projection = GaussianProjection(
                    meta.in_dim, meta.out_dim, meta.projection_seed,
                    max_dense_bytes=PROJECTION_CACHE_BYTES,
                )
                self._index = index
            return self._index, self._projection

    def lowrank(self) -> Any:
        """LowRankFactors from the bundle, loaded on first use."""
        with self._lock:
            if self._lowrank is None:
                from safetensors.torch import load_file

                from pairdots_server.core.ihvp.lowrank import LowRankFactors

                tensors = load_file(str(self.bundle.path / LOWRANK_FILE))
                self._lowrank = LowRankFactors.from_tensors(
                    {k: v.to(self.task.device) for k, v in tensors.items()}
                )
            return self._lowrank

    def describe(self) -> dict[str, Any]:
        m = self.bundle.manifest
        return {
            "name": self.name,
            "labels": self.bundle.labels,
            "manifest": json.loads(json.dumps(m, default=str)),
            "scope_parameters": self.num_params,
        }
