"""A served model: bundle + scoped parameters + training data access + index + caches.

Everything Explain, Attack and Repair need per model lives here and is built once at load:
the scope parameters θ, an encoder for training examples (indices → embeddings batch), a
curvature batch provider over a fixed seeded sample of the training set, the candidate
index (when the bundle has one) and the curvature artifacts (when present): low-rank GGN
eigenpairs, EK-FAC factors and the diagonal Fisher, each loaded lazily on first use.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pairdots_server.compute import ComputeGate
from pairdots_server.core.aliases import LogitsFn
from pairdots_server.core.batches import Batch
from pairdots_server.core.curvature import Curvature
from pairdots_server.core.scoring import Row, pad_rows
from pairdots_server.errors import BundleError
from pairdots_server.influence.scope_inputs import (
    SCOPE_INPUT_MAX_BYTES,
    SCOPE_INPUTS_FILE,
    ScopeInputs,
    cache_key,
)
from pairdots_server.model.scope_split import ScopeSplit
from pairdots_server.storage.bundle import Bundle

if TYPE_CHECKING:
    from pairdots_server.core.ihvp.diagonal import DiagonalFactors
    from pairdots_server.core.ihvp.kfac import KFACFactors
    from pairdots_server.core.ihvp.lowrank import LowRankFactors
    from pairdots_server.index.base import CandidateIndex
    from pairdots_server.index.sketch import Projection

log = logging.getLogger(__name__)

INDEX_DIR = "index"
LOWRANK_FILE = "lowrank.safetensors"
EKFAC_FILE = "ekfac.safetensors"
DIAGONAL_FILE = "diagonal.safetensors"
# manifest["curvature"][kind]: how each curvature artifact was fitted (seconds, bytes, ...)
CURVATURE_KEY = "curvature"
# A Gaussian index's dense projection matrix is cached when it fits this budget.
PROJECTION_CACHE_BYTES = 8 * 2**30


@dataclass(frozen=True)
class EncodedExamples:
    """Texts as model inputs: embeds [B,T,D], mask [B,T], labels [B] (empty when the texts
    carry none), the tokenizer's word segmentation (word_ids[b][t] = word of token t or None
    for special tokens; spans[b][w] = characters of word w) and the training indices (empty
    for texts that are not training examples)."""

    indices: list[int]
    embeds: Tensor
    mask: Tensor
    labels: Tensor
    input_ids: Tensor
    word_ids: list[list[int | None]]
    words: list[list[str]]
    spans: list[list[tuple[int, int]]] = field(default_factory=list)

    def pieces(self, row: int) -> list[int]:
        """Word pieces per word of text `row` the model saw (0 = cut off by truncation)."""
        out = [0] * len(self.words[row])
        for w in self.word_ids[row]:
            if w is not None:
                out[w] += 1
        return out


class TrainingSample:
    """A BatchProvider (core.batches) over a fixed, seeded sample of training examples
    (curvature H = mean over the sample), for the runtime's curvature_logits_fn: with the scope
    split, batches of h_L from the scope-input cache (the frozen layers below the scope run
    once per example, not once per curvature-vector product); else the word embeddings,
    encoded once on first use. Each minibatch is trimmed to its own longest example so short
    sentences don't pay for long ones."""

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

    @property
    def logits_fn(self) -> LogitsFn:
        """What the batches feed: the runtime's curvature_logits_fn."""
        return self._runtime.curvature_logits_fn

    def _rows(self, rows: Sequence[int]) -> Batch:
        if self._runtime.split is not None:
            return self._runtime.train_batch([self.indices[r] for r in rows])
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


class TrainingPass:
    """A BatchProvider over EVERY training example in order of text length (each batch pads
    little), for the runtime's curvature_logits_fn (train_batch: h_L from the scope-input
    cache with the scope split, which then holds every example's rows; else encoded batch by
    batch). What the EK-FAC and diagonal fits run over (the curvature of the whole training
    set)."""

    def __init__(self, runtime: ModelRuntime, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        train = runtime.bundle.train
        self.indices = sorted(range(len(train)), key=lambda i: (len(train[i].text), i))
        self.batch_size = batch_size
        self._runtime = runtime

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_batches(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return self.full()

    @property
    def logits_fn(self) -> LogitsFn:
        """What the batches feed: the runtime's curvature_logits_fn."""
        return self._runtime.curvature_logits_fn

    def full(self) -> Iterator[Batch]:
        for start in range(0, len(self.indices), self.batch_size):
            yield self._runtime.train_batch(self.indices[start : start + self.batch_size])

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        pick = torch.randperm(len(self.indices), generator=generator)[:batch_size].tolist()
        return self._runtime.train_batch([self.indices[i] for i in pick])


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
    """One served bundle: its model, training set and artifacts (loaded lazily).

    scope_inputs: keep h_L(z_i) (influence/scope_inputs.py) so exact scoring runs through the
    scoped top only; scope_input_dtype the storage dtype of rows computed here ("float32",
    "float16"; default the model's dtype; rows from the bundle's file keep the file's);
    scope_input_max_bytes bounds the rows computed here (LRU; None = unbounded).
    warm_words: build the training set's word index (influence/words.py) now, at load, not in
    the first Explain (importing nltk for its Porter stemmer alone took 2.6 s of it)."""

    def __init__(self, bundle: Bundle, *, cache_size: int = 256, scope_inputs: bool = True,
                 scope_input_dtype: str | None = None, warm_words: bool = True,
                 scope_input_max_bytes: int | None = SCOPE_INPUT_MAX_BYTES) -> None:
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
        self.lambda_max: dict[tuple[Curvature, int], float] = {}  # (curvature, seed) -> |λ|max
        self._index: CandidateIndex | None = None
        self._projection: Projection | None = None
        self._lowrank: LowRankFactors | None = None
        self._ekfac: KFACFactors | None = None
        self._diagonal: DiagonalFactors | None = None
        self._lock = threading.Lock()
        self.split = ScopeSplit.for_task(self.task) if scope_inputs else None
        self.scope_input_dtype = scope_input_dtype or str(self.task.dtype).removeprefix("torch.")
        self._scope_inputs: ScopeInputs | None = None
        self.scope_input_max_bytes = scope_input_max_bytes
        self.scope_inputs_note = ""  # why the bundle's scope-input file was not used
        # every torch computation on this model (Explain, each job step) holds this gate
        self.compute = ComputeGate(self.name)
        self._curvature_samples: dict[tuple[int, int, int], TrainingSample] = {}
        self.unk_embed = self.task.embed(
            torch.tensor([[self.task.unk_token_id]], device=self.task.device)
        )[0, 0].detach()  # [D]
        if warm_words:
            from pairdots_server.influence.words import examples_containing

            examples_containing(self, "")

    # -- training data ---------------------------------------------------------------------

    @property
    def n_train(self) -> int:
        return len(self.bundle.train)

    def encode_texts(
        self, texts: Sequence[str], labels: Sequence[int] = ()
    ) -> EncodedExamples:
        """Tokenize (at the model's max_length) and embed: the one encoder of the pipeline."""
        enc = self.task.encode(list(texts), max_length=self.max_length)
        with torch.no_grad():
            embeds = self.task.embed(enc.input_ids).detach()  # [B,T,D]
        y = torch.tensor(list(labels), dtype=torch.long, device=embeds.device)  # [B] or [0]
        return EncodedExamples(
            [], embeds, enc.attention_mask, y, enc.input_ids, enc.word_ids, enc.words,
            enc.word_spans,
        )

    def encode_train(self, indices: Sequence[int]) -> EncodedExamples:
        examples = [self.bundle.train[i] for i in indices]
        enc = self.encode_texts([e.text for e in examples], [e.label for e in examples])
        return replace(enc, indices=list(indices))

    @property
    def curvature_logits_fn(self) -> LogitsFn:
        """The LogitsFn that train_batch's batches feed: the scoped top over h_L with the scope
        split (model/scope_split.py), else Task.logits_fn over word embeddings. Gradients and
        curvature with respect to θ_scope are the same either way (up to round-off)."""
        return self.task.logits_fn if self.split is None else self.split.top

    @property
    def capture_logits_fn(self) -> LogitsFn:
        """curvature_logits_fn with every scoped layer run at every position through its own
        modules (ScopeSplit.top_every_token): what the K-FAC fit's forward hooks record. The
        logits are the same; curvature_logits_fn may run the last layer at [CLS] only."""
        return self.task.logits_fn if self.split is None else self.split.top_every_token

    def scope_rows(self, indices: Sequence[int], cache: ScopeInputs | None = None) -> list[Row]:
        """Training examples `indices` as unpadded rows of h_L [T_i, D] (from `cache`, default
        the runtime's scope-input cache; computed on first use; in the model's dtype) with
        all-ones masks and their labels: what the scoped top takes (needs the scope split)."""
        cache = cache if cache is not None else self.scope_inputs()
        assert cache is not None
        train = self.bundle.train
        dtype = self.task.dtype
        hidden = cache.rows(indices, [len(train[i].text) for i in indices])
        return [Row(h.to(dtype), torch.ones(h.shape[0], dtype=torch.long, device=h.device),
                    train[i].label) for i, h in zip(indices, hidden, strict=True)]

    def train_batch(self, indices: Sequence[int]) -> Batch:
        """Training examples `indices` as one Batch for curvature_logits_fn, trimmed to the
        longest: with the split, scope_rows padded [B,t,D] with mask [B,t]; else the
        embedded texts."""
        if self.split is None:
            enc = self.encode_train(indices)
            t = int(enc.mask.sum(dim=1).max())
            return Batch(enc.embeds[:, :t], enc.mask[:, :t], enc.labels)
        hidden, mask, labels = pad_rows(self.scope_rows(indices))  # [B,t,D], [B,t], [B]
        return Batch(hidden, mask, labels)

    def text_batch(self, texts: Sequence[str], labels: Sequence[int]) -> Batch:
        """Labelled texts as one Batch for curvature_logits_fn, trimmed to the longest: with
        the split, the trunk's h_L [B,t,D'] (plain forward, no gradient); else the embedded
        texts [B,t,D]."""
        enc = self.encode_texts(texts, labels)
        t = int(enc.mask.sum(dim=1).max())  # trim to the longest attended length
        x, mask = enc.embeds[:, :t], enc.mask[:, :t]  # [B,t,D], [B,t]
        if self.split is not None:
            with torch.no_grad():
                x = self.split.trunk(x, mask)  # h_L [B,t,D']
        return Batch(x, mask, enc.labels)

    def training_pass(self, batch_size: int = 32) -> TrainingPass:
        """Every training example, batch by batch (the EK-FAC / diagonal fits)."""
        return TrainingPass(self, batch_size)

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

    @property
    def has_ekfac(self) -> bool:
        return self.bundle.has_artifact(EKFAC_FILE)

    @property
    def has_diagonal(self) -> bool:
        return self.bundle.has_artifact(DIAGONAL_FILE)

    def curvature_info(self, kind: str) -> dict[str, Any]:
        """manifest["curvature"][kind] (how the artifact was fitted), {} when not recorded."""
        info = (self.bundle.manifest.get(CURVATURE_KEY) or {})
        out = info.get(kind) if isinstance(info, dict) else None
        return dict(out) if isinstance(out, dict) else {}

    def _tensors(self, relpath: str) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(self.bundle.path / relpath))
        except (OSError, RuntimeError, ValueError) as exc:
            raise BundleError(
                f"bundle {self.name!r}: cannot read {relpath} ({type(exc).__name__}: {exc}); "
                "refit it with `pairdots curvature fit`"
            ) from exc
        return {k: v.to(self.task.device) for k, v in tensors.items()}

    def _check_params(self, relpath: str, num_params: int) -> None:
        if num_params != self.num_params:
            raise BundleError(
                f"bundle {self.name!r}: {relpath} was fitted for {num_params} scoped parameters "
                f"but the scope has {self.num_params}; refit it with `pairdots curvature fit "
                f"--bundle {self.bundle.path}`"
            )

    def ekfac(self) -> KFACFactors:
        """EK-FAC factors (ekfac.safetensors), loaded on first use."""
        with self._lock:
            if self._ekfac is None:
                from pairdots_server.core.exceptions import SolverError
                from pairdots_server.core.ihvp.kfac import KFACFactors

                try:
                    factors = KFACFactors.from_tensors(self._tensors(EKFAC_FILE))
                except SolverError as exc:
                    raise BundleError(f"bundle {self.name!r}: {EKFAC_FILE}: {exc}") from exc
                self._check_params(EKFAC_FILE, factors.num_params)
                if list(factors.shapes) != list(self.params):
                    raise BundleError(
                        f"bundle {self.name!r}: {EKFAC_FILE} covers other parameters than the "
                        f"scope; refit it with `pairdots curvature fit --bundle "
                        f"{self.bundle.path} --kind ekfac`"
                    )
                self._ekfac = factors
            return self._ekfac

    def diagonal(self) -> DiagonalFactors:
        """Diagonal Fisher factors (diagonal.safetensors), loaded on first use."""
        with self._lock:
            if self._diagonal is None:
                from pairdots_server.core.exceptions import SolverError
                from pairdots_server.core.ihvp.diagonal import DiagonalFactors

                try:
                    factors = DiagonalFactors.from_tensors(self._tensors(DIAGONAL_FILE))
                except SolverError as exc:
                    raise BundleError(f"bundle {self.name!r}: {DIAGONAL_FILE}: {exc}") from exc
                self._check_params(DIAGONAL_FILE, factors.num_params)
                self._diagonal = factors
            return self._diagonal

    def index(self) -> tuple[CandidateIndex, Projection]:
        """(CandidateIndex, the projection that built it: index/sketch.py), loaded on first use.
        A Gaussian index (bundles before the sparse sketch) caches its dense P × k matrix on
        the first query (7.9 GB and ~22 s for MiniLM at k = 1024); a sparse-sign one holds
        12 bytes per scoped parameter."""
        with self._lock:
            if self._index is None:
                from pairdots_server.index.store import load_index

                index, meta = load_index(self.bundle.path / INDEX_DIR)
                if meta.in_dim != self.num_params:
                    raise BundleError(
                        f"bundle {self.name!r}: the index was built for {meta.in_dim} scoped "
                        f"parameters but the scope has {self.num_params}; rebuild it with "
                        "`pairdots index build`"
                    )
                self._projection = meta.projection(max_dense_bytes=PROJECTION_CACHE_BYTES)
                self._index = index
            assert self._projection is not None
            return self._index, self._projection

    def scope_inputs(self) -> ScopeInputs | None:
        """The scope-input cache (None when the model/scope has no split): rows from the
        bundle's scope_inputs.safetensors when its key matches, else computed on first use."""
        if self.split is None:
            return None
        with self._lock:
            if self._scope_inputs is None:
                cache = ScopeInputs(self.split, self.encode_train, self.n_train,
                                    self.scope_inputs_key(), self.scope_input_dtype,
                                    max_bytes=self.scope_input_max_bytes)
                if self.bundle.has_artifact(SCOPE_INPUTS_FILE):
                    self.scope_inputs_note = self._load_scope_inputs(cache) or ""
                self._scope_inputs = cache
            return self._scope_inputs

    def scope_inputs_key(self, files: Mapping[str, str] | None = None) -> str:
        """What h_L depends on, hashed (influence/scope_inputs.cache_key); files: the file
        digests to key by (default the served bundle's manifest; prepare passes the saved
        bundle's, which the unsaved runtime does not have)."""
        assert self.split is not None
        return cache_key(self.bundle.files if files is None else files, self.max_length,
                         self.split.key)

    def _load_scope_inputs(self, cache: ScopeInputs) -> str | None:
        from safetensors import safe_open

        path = self.bundle.path / SCOPE_INPUTS_FILE
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                if meta.get("key") != cache.key:  # do not read a stale file's tensors
                    why = cache.load({}, meta)
                else:
                    # rows live on the model's device (offsets stay on the CPU)
                    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
                    if "hidden" in tensors:
                        tensors["hidden"] = tensors["hidden"].to(self.task.device)
                    why = cache.load(tensors, meta)
        except (OSError, RuntimeError, ValueError) as exc:
            why = f"it cannot be read ({type(exc).__name__}: {exc})"
        if why is not None:
            log.warning("bundle %r: %s not used: %s; computing scope inputs on first use "
                        "(rebuild it with `pairdots index scope-inputs`)", self.name,
                        SCOPE_INPUTS_FILE, why)
        return why

    def lowrank(self) -> LowRankFactors:
        """LowRankFactors from the bundle, loaded on first use."""
        with self._lock:
            if self._lowrank is None:
                from safetensors.torch import load_file

                from pairdots_server.core.ihvp.lowrank import LowRankFactors

                tensors = load_file(str(self.bundle.path / LOWRANK_FILE))
                self._lowrank = LowRankFactors.from_tensors(
                    {k: v.to(self.task.device) if k in ("eigvals", "eigvecs") else v
                     for k, v in tensors.items()}
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
