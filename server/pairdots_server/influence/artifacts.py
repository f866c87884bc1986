"""Per-bundle precomputed artifacts: the candidate index and the low-rank curvature.

index/  Sᵀ∇θL(z_i) for every training example (docs/DESIGN.md §3 "Prefilter"), S a seeded
        sparse sign sketch (index/sparse_sign.py; older bundles: a Gaussian); built whole, or as shards (`--shard i --num-shards N`, one per Kubernetes
        Indexed Job completion) that `merge` joins.
lowrank.safetensors  top-k GGN eigenpairs on the curvature sample (Schioppa et al. 2022);
        SOLVER_LOW_RANK answers s_test with one projection. Also stores the tail: the
        (k+1)-th Ritz value and the relative Ritz residuals of the kept pairs.
ekfac.safetensors  EK-FAC factors (core.kfac_fit.fit_ekfac, sampled Fisher) over the WHOLE
        training set; SOLVER_EKFAC.
diagonal.safetensors  the diagonal empirical Fisher (core.ihvp.diagonal.fit_diagonal) over the
        whole training set; SOLVER_DIAGONAL.
scope_inputs.safetensors  h_L(z_i), the hidden states entering the influence scope, of every
        training example (influence/scope_inputs.py; `pairdots index scope-inputs`), so exact
        scoring runs through the scoped top only from the first query on. Optional: without
        it the rows are computed on first use.

How each curvature artifact was fitted goes into manifest["curvature"][kind]: file, seconds,
bytes (the file), num_examples, fisher, batch_size, seed, fitted_at, scope_num_parameters (and
for lowrank: rank, next_eigval, max_residual). ``fit_curvature`` computes every requested kind
in memory first, so a failure writes nothing; ``add_curvature`` then adds them to a bundle in
one crash-safe storage.update.update_bundle.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pairdots_server.core.grads import per_example_loss_grads
from pairdots_server.errors import InvalidArgument
from pairdots_server.index.sketch import DEFAULT_PROJECTION
from pairdots_server.influence.runtime import (
    CURVATURE_KEY,
    DIAGONAL_FILE,
    EKFAC_FILE,
    INDEX_DIR,
    LOWRANK_FILE,
    PROJECTION_CACHE_BYTES,
    ModelRuntime,
)
from pairdots_server.influence.scope_inputs import SCOPE_INPUTS_FILE

CURVATURE_KINDS = ("ekfac", "diagonal")
CURVATURE_FILES = {"ekfac": EKFAC_FILE, "diagonal": DIAGONAL_FILE, "lowrank": LOWRANK_FILE}


@dataclass(frozen=True)
class CurvatureConfig:
    """How the EK-FAC / diagonal factors are fitted: over every training example in batches of
    batch_size; ekfac_fisher "sampled" (kronfluence's true Fisher, one label drawn per example
    from the model, = GGN in expectation), diagonal_fisher "empirical" (gold labels); seed for
    the sampled labels."""

    batch_size: int = 32
    seed: int = 0
    ekfac_fisher: str = "sampled"
    diagonal_fisher: str = "empirical"


INDEX_DEFAULT_BYTES = 256 * 2**20
"""The index size up to which the default sketch dimension grows beyond 1024 (ArtifactConfig.
resolved_dim): on minilm-sst2 (6,920 examples, 40 queries) recall@10 of the prefilter against
the exhaustive exact ranking is 0.935 / 0.974 / 0.9825 at k = 1024 / 2048 / 4096 with K = 2 %
of N per direction, and 0.884 / 0.939 / 0.9675 at 1 % (bench/results/prefilter_dims.json);
N = 6,920 at k = 4096 is 113 MB. 256 MiB holds k = 4096 up to 16,384 examples and 2048 up
to 32,768."""


@dataclass(frozen=True)
class ArtifactConfig:
    """What `prepare` / `index build` precompute. index_dim None: resolved_dim (4096 / 2048 /
    1024 by the training set's size, INDEX_DEFAULT_BYTES). Measured earlier on the
    MiniLM SST-2 bundle (bench/prefilter.py, 20 test sentences): recall@10 0.907 at 2 % of
    the training set per direction with k = 1024, against 0.70 with k = 256. The dense
    projection of the 1.9M-parameter scope is 7.9 GB at k = 1024 (2 GB at 256), cached in
    memory when building and serving. index_projection "sparse_sign" (the default; index/
    sparse_sign.py) never builds that matrix: 12 bytes per scoped parameter at any k;
    "gaussian" builds indexes like older bundles'. The sparse sign sketch at k = 1024 on the
    same bundle: recall@10 0.946 at 2 % per direction, 0.894 at 1 % (40 queries,
    bench/results/prefilter.json)."""

    index: bool = True
    index_dim: int | None = None
    index_seed: int = 0
    index_projection: str = DEFAULT_PROJECTION
    index_kind: str = "auto"
    grad_batch_size: int = 32
    low_rank: int = 24  # 0: none
    low_rank_seed: int = 0
    ekfac: bool = True
    diagonal: bool = True
    curvature: CurvatureConfig = field(default_factory=lambda: CurvatureConfig())

    def resolved_dim(self, n_train: int) -> int:
        """index_dim, or by default for the sparse sign sketch the largest k of 4096 / 2048
        whose index (N · k · 4 bytes) fits INDEX_DEFAULT_BYTES, else 1024; 1024 for the dense
        Gaussian projection (its P × k matrix)."""
        if self.index_dim is not None:
            return self.index_dim
        if self.index_projection == "sparse_sign":
            for k in (4096, 2048):
                if n_train * k * 4 <= INDEX_DEFAULT_BYTES:
                    return k
        return 1024


def train_grad_fn(rt: ModelRuntime) -> Callable[[Sequence[int]], Tensor]:
    """indices -> ∇θL(z_i) rows [B,P] over the bundle's scope. With the runtime's scope split
    vmap(grad) runs through the scoped top only, from the scope-input cache's h_L (computed by
    the trunk on first use and kept, or the bundle's file; model/scope_split.py): the same
    gradients up to round-off (float16 rows from a file: their rounding)."""

    def grads(indices: Sequence[int]) -> Tensor:
        b = rt.train_batch(indices)  # h_L rows [B,t,D] with the split, else embeddings
        return per_example_loss_grads(rt.curvature_logits_fn, rt.params, b.embeds, b.mask,
                                      b.labels)

    return grads


def _projection(meta: Any) -> Any:
    return meta.projection(max_dense_bytes=PROJECTION_CACHE_BYTES)


def _meta(rt: ModelRuntime, cfg: ArtifactConfig) -> Any:
    from pairdots_server.index.store import IndexMeta

    return IndexMeta(
        projection_seed=cfg.index_seed, in_dim=rt.num_params,
        out_dim=cfg.resolved_dim(rt.n_train), kind=cfg.index_kind, count=rt.n_train,
        scope=rt.task.scope.describe(), projection_kind=cfg.index_projection,
    )


def build_index_dir(
    rt: ModelRuntime, cfg: ArtifactConfig, out_dir: Path, progress: bool = True,
    should_stop: Callable[[], None] | None = None,
    grad_fn: Callable[[Sequence[int]], Tensor] | None = None,
) -> Path:
    """Project every training gradient and write an index directory (grad_fn: the gradient
    rows to project, default train_grad_fn(rt); prepare passes a DiagonalFromGradients)."""
    from pairdots_server.index.build import compute_projected
    from pairdots_server.index.store import save_index_data

    meta = _meta(rt, cfg)
    ids, vectors = compute_projected(
        grad_fn or train_grad_fn(rt), range(rt.n_train), _projection(meta),
        cfg.grad_batch_size, progress, should_stop, _text_lengths(rt),
    )
    return save_index_data(out_dir, ids, vectors, meta)


def build_index_shard(
    rt: ModelRuntime, cfg: ArtifactConfig, shard: int, num_shards: int, parts_dir: Path,
    progress: bool = True,
) -> Path:
    """One map task of a sharded build: writes parts_dir/part-<shard>-of-<N>."""
    from pairdots_server.index.build import build_shard

    meta = _meta(rt, cfg)
    return build_shard(
        train_grad_fn(rt), list(range(rt.n_train)), shard, num_shards,
        _projection(meta), meta, parts_dir,
        cfg.grad_batch_size, progress, lengths=_text_lengths(rt),
    )


def _text_lengths(rt: ModelRuntime) -> list[int]:
    """Characters of every training text: the order the index build batches them in (a
    proxy of the token count: little padding per batch)."""
    return [len(ex.text) for ex in rt.bundle.train]


def merge_index_parts(parts_dir: Path, out_dir: Path) -> Path:
    from pairdots_server.index.build import merge_shards
    from pairdots_server.index.store import save_index_data

    ids, vectors, meta = merge_shards(parts_dir)
    return save_index_data(out_dir, ids, vectors, meta)


class DiagonalFromGradients:
    """A gradient function that also accumulates the diagonal empirical Fisher of the rows it
    returns: d = (1/N) Σ_i ∇θL(z_i)², the gold-label per-example gradients the index projects
    (the same quantity as fit_diagonal(fisher="empirical"), without a second pass over the
    training set). Call it on every training example once, then artifact()."""

    def __init__(self, grad_fn: Callable[[Sequence[int]], Tensor]) -> None:
        self.grad_fn = grad_fn
        self.total: Tensor | None = None  # Σ_i g_i² [P] (float64)
        self.count = 0
        self.seconds = 0.0  # time spent accumulating (the gradients are the index's)
        self.dtype: torch.dtype | None = None

    def __call__(self, indices: Sequence[int]) -> Tensor:
        grads = self.grad_fn(indices)  # [B, P]
        t0 = time.perf_counter()
        part = torch.einsum("bp,bp->p", grads, grads).double()  # [P]: Σ_b g_b² in their dtype
        self.total = part if self.total is None else self.total + part
        self.count += int(grads.shape[0])
        self.dtype = grads.dtype
        self.seconds += time.perf_counter() - t0
        return grads

    def artifact(self, rt: ModelRuntime, batch_size: int) -> FittedArtifact:
        """The diagonal.safetensors artifact of the accumulated rows."""
        from pairdots_server.core.ihvp.diagonal import DiagonalFactors

        if self.total is None or self.count != rt.n_train:
            raise RuntimeError(f"diagonal: {self.count} of {rt.n_train} gradients accumulated")
        assert self.dtype is not None
        factors = DiagonalFactors((self.total / self.count).to(self.dtype), "empirical",
                                  self.count)
        content = _safetensors(factors.to_tensors())
        return FittedArtifact("diagonal", DIAGONAL_FILE, content, _info(
            rt, DIAGONAL_FILE, self.seconds, content, num_examples=factors.num_examples,
            fisher=factors.fisher, batch_size=batch_size, seed=None,
            factor_bytes=factors.num_bytes, fitted_with="the index's per-example gradients",
        ))


def index_files(index_dir: Path) -> dict[str, Path]:
    """{bundle relpath: file} for an index directory, for bundle.update_bundle/save."""
    return {f"{INDEX_DIR}/{p.name}": p for p in sorted(index_dir.iterdir()) if p.is_file()}


def lowrank_bytes(rt: ModelRuntime, rank: int, seed: int = 0,
                  should_stop: Callable[[], None] | None = None) -> bytes:
    """Fit the top-`rank` GGN eigenpairs and serialise them (safetensors)."""
    from safetensors.torch import save

    from pairdots_server.influence.solver_policy import fit_lowrank_factors

    tensors = fit_lowrank_factors(rt, rank, seed=seed, should_stop=should_stop)
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _safetensors(tensors: Mapping[str, Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


class Progress:
    """A should_stop hook that prints "<label>: step i/total (elapsed, eta)" at most every
    `every` seconds (and at the last step), then calls the caller's should_stop."""

    def __init__(self, label: str, total: int, enabled: bool = True, every: float = 10.0,
                 should_stop: Callable[[], None] | None = None) -> None:
        self.label, self.total, self.enabled, self.every = label, max(1, total), enabled, every
        self.should_stop = should_stop
        self.count = 0
        self.t0 = time.perf_counter()
        self._last = self.t0

    def __call__(self) -> None:
        if self.should_stop is not None:
            self.should_stop()
        self.count += 1
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.every or self.count in (1, self.total)):
            self._last = now
            elapsed = now - self.t0
            eta = elapsed / self.count * max(0, self.total - self.count)
            print(f"  {self.label}: {self.count}/{self.total} batches, {elapsed:.0f} s "
                  f"elapsed, ~{eta:.0f} s left", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class FittedArtifact:
    """One fitted curvature artifact: its bundle relpath, safetensors bytes and manifest info."""

    kind: str
    relpath: str
    content: bytes
    info: dict[str, Any]


def _info(rt: ModelRuntime, relpath: str, seconds: float, content: bytes,
          **extra: Any) -> dict[str, Any]:
    return {
        "file": relpath, "seconds": round(seconds, 2), "bytes": len(content),
        "fitted_at": _now(), "scope_num_parameters": rt.num_params,
        "device": str(rt.task.device), **extra,
    }


def fit_ekfac_artifact(
    rt: ModelRuntime, cfg: CurvatureConfig = CurvatureConfig(), progress: bool = True,
    should_stop: Callable[[], None] | None = None,
) -> FittedArtifact:
    """EK-FAC factors over every training example (two passes) -> ekfac.safetensors."""
    from pairdots_server.core.kfac_fit import fit_ekfac

    data = rt.training_pass(cfg.batch_size)
    hook = Progress("ekfac (pass 1 + pass 2)", 2 * data.num_batches, progress, should_stop=should_stop)
    t0 = time.perf_counter()
    factors = fit_ekfac(
        rt.task.model, rt.params, rt.capture_logits_fn, data,
        fisher=cfg.ekfac_fisher, seed=cfg.seed, should_stop=hook,
    )
    content = _safetensors(factors.to_tensors())
    seconds = time.perf_counter() - t0
    return FittedArtifact("ekfac", EKFAC_FILE, content, _info(
        rt, EKFAC_FILE, seconds, content, num_examples=factors.num_examples,
        fisher=factors.fisher, batch_size=cfg.batch_size, seed=cfg.seed,
        factor_bytes=factors.num_bytes, linear_blocks=len(factors.linear),
        diagonal_blocks=len(factors.diag),
        stats={k: round(float(v), 3) for k, v in factors.stats.items()},
    ))


def fit_diagonal_artifact(
    rt: ModelRuntime, cfg: CurvatureConfig = CurvatureConfig(), progress: bool = True,
    should_stop: Callable[[], None] | None = None,
) -> FittedArtifact:
    """The diagonal Fisher over every training example (one pass) -> diagonal.safetensors."""
    from pairdots_server.core.ihvp.diagonal import fit_diagonal

    data = rt.training_pass(cfg.batch_size)
    hook = Progress("diagonal", data.num_batches, progress, should_stop=should_stop)
    t0 = time.perf_counter()
    factors = fit_diagonal(
        data.logits_fn, rt.params, data, fisher=cfg.diagonal_fisher, seed=cfg.seed,
        should_stop=hook,
    )
    content = _safetensors(factors.to_tensors())
    seconds = time.perf_counter() - t0
    return FittedArtifact("diagonal", DIAGONAL_FILE, content, _info(
        rt, DIAGONAL_FILE, seconds, content, num_examples=factors.num_examples,
        fisher=factors.fisher, batch_size=cfg.batch_size, seed=cfg.seed,
        factor_bytes=factors.num_bytes,
    ))


def fit_lowrank_artifact(
    rt: ModelRuntime, rank: int, seed: int = 0, progress: bool = True,
    should_stop: Callable[[], None] | None = None,
) -> FittedArtifact:
    """Top-`rank` GGN eigenpairs on the curvature sample, with the tail stats."""
    from pairdots_server.core.ihvp.lowrank import LowRankFactors
    from pairdots_server.influence.solver_policy import fit_lowrank_factors

    if progress:
        print(f"fitting rank-{rank} GGN eigendecomposition (Lanczos)...", file=sys.stderr,
              flush=True)
    t0 = time.perf_counter()
    tensors = fit_lowrank_factors(rt, rank, seed=seed, should_stop=should_stop)
    factors = LowRankFactors.from_tensors(tensors)
    content = _safetensors(tensors)
    seconds = time.perf_counter() - t0
    if progress:
        print(f"  lowrank: {seconds:.1f} s, {len(content) / 2**20:.1f} MiB, λ_1 "
              f"{float(factors.eigvals.max()):.3g}, λ_(k+1) {factors.next_eigval}, max Ritz "
              f"residual {factors.max_residual}", file=sys.stderr, flush=True)
    return FittedArtifact("lowrank", LOWRANK_FILE, content, _info(
        rt, LOWRANK_FILE, seconds, content, rank=factors.rank, seed=seed,
        eigval_max=float(factors.eigvals.max()) if factors.rank else None,
        next_eigval=factors.next_eigval, max_residual=factors.max_residual,
    ))


FITTERS: dict[str, Callable[..., FittedArtifact]] = {
    "ekfac": fit_ekfac_artifact,
    "diagonal": fit_diagonal_artifact,
}


def parse_kinds(spec: str | Sequence[str]) -> tuple[str, ...]:
    """"ekfac,diagonal" (or a list) -> ("ekfac", "diagonal"); InvalidArgument on others."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    kinds = tuple(dict.fromkeys(k.strip().lower() for k in items if k.strip()))
    bad = [k for k in kinds if k not in CURVATURE_KINDS]
    if bad or not kinds:
        raise InvalidArgument.for_field(
            "kind", f"unknown curvature kind(s) {bad or [spec]}; use a comma-separated subset "
            f"of {','.join(CURVATURE_KINDS)}"
        )
    return kinds


def fit_curvature(
    rt: ModelRuntime, kinds: Sequence[str], cfg: CurvatureConfig = CurvatureConfig(),
    progress: bool = True, should_stop: Callable[[], None] | None = None,
) -> list[FittedArtifact]:
    """Fit every requested kind in memory (nothing is written), printing progress/timings."""
    out: list[FittedArtifact] = []
    for kind in parse_kinds(kinds):
        if progress:
            print(f"fitting {kind} over all {rt.n_train} training examples "
                  f"(batch {cfg.batch_size}, scope {rt.num_params:,} parameters, device "
                  f"{rt.task.device})...", file=sys.stderr, flush=True)
        art = FITTERS[kind](rt, cfg, progress, should_stop)
        if progress:
            print(f"  {kind}: {art.info['seconds']:.1f} s, {len(art.content) / 2**20:.2f} MiB",
                  file=sys.stderr, flush=True)
        out.append(art)
    return out


def curvature_files_and_manifest(
    fitted: Sequence[FittedArtifact], default_solver: str | None = None,
) -> tuple[dict[str, bytes | Path], dict[str, Any]]:
    """({relpath: bytes}, manifest updates {"curvature": {kind: info}, ["defaults"]})."""
    files: dict[str, bytes | Path] = {a.relpath: a.content for a in fitted}
    manifest: dict[str, Any] = {CURVATURE_KEY: {a.kind: a.info for a in fitted}} if fitted else {}
    if default_solver is not None:
        manifest["defaults"] = {"solver": default_solver}
    return files, manifest


def add_curvature(
    bundle_dir: str | Path, rt: ModelRuntime, kinds: Sequence[str],
    cfg: CurvatureConfig = CurvatureConfig(), progress: bool = True,
    default_solver: str | None = None, should_stop: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Fit `kinds` and add them to the bundle at bundle_dir in one crash-safe update (a failed
    fit writes nothing; the bundle verifies at every instant). Returns the new manifest."""
    from pairdots_server.storage.update import update_bundle_staged

    fitted = fit_curvature(rt, kinds, cfg, progress, should_stop)
    files, manifest = curvature_files_and_manifest(fitted, default_solver)
    return update_bundle_staged(bundle_dir, files, manifest)


@dataclass(frozen=True)
class BuiltArtifacts:
    """What `prepare` adds to a new bundle: files {relpath: content} and manifest additions."""

    files: dict[str, bytes | Path]
    manifest: dict[str, Any]


def build_bundle_artifacts(
    rt: ModelRuntime, cfg: ArtifactConfig, scratch: Path, progress: bool = True,
    should_stop: Callable[[], None] | None = None,
) -> BuiltArtifacts:
    """The index, low-rank, EK-FAC and diagonal artifacts `cfg` asks for, with their fit
    records for manifest["curvature"]. With the index, the diagonal empirical Fisher comes
    from the index's per-example gradients (DiagonalFromGradients) instead of its own pass."""
    files: dict[str, bytes | Path] = {}
    fitted: list[FittedArtifact] = []
    kinds = [k for k, on in (("ekfac", cfg.ekfac), ("diagonal", cfg.diagonal)) if on]
    diagonal: DiagonalFromGradients | None = None
    if cfg.index:
        if "diagonal" in kinds and cfg.curvature.diagonal_fisher == "empirical":
            diagonal = DiagonalFromGradients(train_grad_fn(rt))  # d from the index's pass
            kinds.remove("diagonal")
        files.update(index_files(build_index_dir(rt, cfg, scratch / INDEX_DIR, progress,
                                                 should_stop, grad_fn=diagonal)))
    if diagonal is not None:
        fitted.append(diagonal.artifact(rt, cfg.grad_batch_size))
    if cfg.low_rank > 0:
        fitted.append(fit_lowrank_artifact(rt, cfg.low_rank, cfg.low_rank_seed, progress,
                                           should_stop))
    if kinds:
        fitted.extend(fit_curvature(rt, kinds, cfg.curvature, progress, should_stop))
    more, manifest = curvature_files_and_manifest(fitted)
    files.update(more)
    return BuiltArtifacts(files, manifest)


def build_artifacts(
    rt: ModelRuntime, cfg: ArtifactConfig, scratch: Path, progress: bool = True
) -> Mapping[str, bytes | Path]:
    """Everything `prepare` adds to a new bundle, as {relpath: content} (the manifest records
    are in build_bundle_artifacts)."""
    return build_bundle_artifacts(rt, cfg, scratch, progress).files


def scope_inputs_bytes(
    rt: ModelRuntime, dtype: str = "float32", progress: bool = True,
    files: Mapping[str, str] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Every training example's h_L (influence/scope_inputs.py) as scope_inputs.safetensors
    bytes, and its manifest info (seconds, bytes, dtype, count, split, reused: the rows the
    runtime's own cache already held, e.g. from the index build, which are not recomputed).
    files: the bundle file digests the file is keyed by (ModelRuntime.scope_inputs_key;
    default the runtime's bundle's)."""
    from safetensors.torch import save

    from pairdots_server.influence.scope_inputs import ScopeInputs

    if rt.split is None:
        raise InvalidArgument.for_field(
            "scope", f"bundle {rt.name!r}: the model/scope has no split below the scope "
            "(model/scope_split.py), so there are no scope inputs to store")
    t0 = time.perf_counter()
    cache = ScopeInputs(rt.split, rt.encode_train, rt.n_train, rt.scope_inputs_key(files),
                        dtype)
    held = rt.scope_inputs()
    reused = cache.adopt(held) if held is not None else 0

    def report(done: int, total: int) -> None:
        if progress:
            print(f"  scope inputs: {done}/{total} examples, {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)

    cache.compute_all(report, [len(ex.text) for ex in rt.bundle.train])
    tensors, meta = cache.to_tensors()
    content = save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    info = {"file": SCOPE_INPUTS_FILE, "seconds": round(time.perf_counter() - t0, 2),
            "bytes": len(content), "dtype": dtype, "count": rt.n_train,
            "split": rt.split.key, "reused": reused, "built_at": _now()}
    return content, info


def add_scope_inputs(bundle_dir: Path, rt: ModelRuntime, dtype: str = "float32",
                     progress: bool = True) -> dict[str, Any]:
    """Compute and add scope_inputs.safetensors to the bundle (crash-safe update; manifest
    "scope_inputs" records how it was built); returns that info. `rt` may be the runtime
    that built the bundle before it was saved (prepare / import): the file is keyed by the
    saved bundle's manifest, and the rows its index build computed are reused."""
    from pairdots_server.storage.manifest import read_manifest
    from pairdots_server.storage.update import update_bundle

    files = read_manifest(bundle_dir).get("files", {})
    content, info = scope_inputs_bytes(rt, dtype, progress, files=files)
    update_bundle(bundle_dir, {SCOPE_INPUTS_FILE: content}, {"scope_inputs": info})
    return info
