"""Per-bundle precomputed artifacts: the candidate index and the low-rank curvature.

index/  Pᵀ∇θL(z_i) for every training example (docs/DESIGN.md §3 "Prefilter"), P a seeded
        Gaussian projection; built whole, or as shards (`--shard i --num-shards N`, one per Kubernetes
        Indexed Job completion) that `merge` joins.
lowrank.safetensors  top-k GGN eigenpairs on the curvature sample (Schioppa et al. 2022);
        SOLVER_LOW_RANK answers s_test with one projection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from pairdots_server.core.grads import per_example_loss_grads
from pairdots_server.influence.runtime import (
    INDEX_DIR,
    LOWRANK_FILE,
    PROJECTION_CACHE_BYTES,
    ModelRuntime,
)


@dataclass(frozen=True)
class ArtifactConfig:
    """What `prepare` / `index build` precompute. index_dim None: 1024. Measured on the
    MiniLM SST-2 bundle (bench/prefilter.py, 20 test sentences): recall@10 0.907 at 2 % of
    the training set per direction with k = 1024, against 0.70 with k = 256. The dense
    projection of the 1.9M-parameter scope is 7.9 GB at k = 1024 (2 GB at 256), cached in
    memory when building and serving; pass a smaller index_dim on small machines."""

    index: bool = True
    index_dim: int | None = None
    index_seed: int = 0
    index_kind: str = "auto"
    grad_batch_size: int = 32
    low_rank: int = 24  # 0: none
    low_rank_seed: int = 0

    def resolved_dim(self) -> int:
        return self.index_dim if self.index_dim is not None else 1024


def train_grad_fn(rt: ModelRuntime) -> Callable[[list[int]], Tensor]:
    """indices -> ∇θL(z_i) rows [B,P] over the bundle's scope."""

    def grads(indices: list[int]) -> Tensor:
        enc = rt.encode_train(indices)
        return per_example_loss_grads(rt.task.logits_fn, rt.params, enc.embeds, enc.mask,
                                      enc.labels)

    return grads


def _projection(rt: ModelRuntime, dim: int, seed: int) -> Any:
    from pairdots_server.index.projection import GaussianProjection

    return GaussianProjection(rt.num_params, dim, seed, max_dense_bytes=PROJECTION_CACHE_BYTES)


def _meta(rt: ModelRuntime, cfg: ArtifactConfig) -> Any:
    from pairdots_server.index.store import IndexMeta

    return IndexMeta(
        projection_seed=cfg.index_seed, in_dim=rt.num_params,
        out_dim=cfg.resolved_dim(), kind=cfg.index_kind, count=rt.n_train,
        scope=rt.task.scope.describe(),
    )


def build_index_dir(
    rt: ModelRuntime, cfg: ArtifactConfig, out_dir: Path, progress: bool = True,
    should_stop: Callable[[], None] | None = None,
) -> Path:
    """Project every training gradient and write an index directory."""
    from pairdots_server.index.build import compute_projected
    from pairdots_server.index.store import save_index_data

    meta = _meta(rt, cfg)
    ids, vectors = compute_projected(
        train_grad_fn(rt), range(rt.n_train), _projection(rt, meta.out_dim, meta.projection_seed),
        cfg.grad_batch_size, progress, should_stop,
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
        _projection(rt, meta.out_dim, meta.projection_seed), meta, parts_dir,
        cfg.grad_batch_size, progress,
    )


def merge_index_parts(parts_dir: Path, out_dir: Path) -> Path:
    from pairdots_server.index.build import merge_shards
    from pairdots_server.index.store import save_index_data

    ids, vectors, meta = merge_shards(parts_dir)
    return save_index_data(out_dir, ids, vectors, meta)


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


def build_artifacts(
    rt: ModelRuntime, cfg: ArtifactConfig, scratch: Path, progress: bool = True
) -> Mapping[str, bytes | Path]:
    """Everything `prepare` adds to a new bundle, as {relpath: content}."""
    files: dict[str, bytes | Path] = {}
    if cfg.index:
        files.update(index_files(build_index_dir(rt, cfg, scratch / INDEX_DIR, progress)))
    if cfg.low_rank > 0:
        if progress:
            print(f"fitting rank-{cfg.low_rank} GGN eigendecomposition (Lanczos)...", flush=True)
        files[LOWRANK_FILE] = lowrank_bytes(rt, cfg.low_rank, cfg.low_rank_seed)
    return files
