"""Building the index: project per-example training gradients, in shards, and merge.

Map: shard s of S computes v_i = P^T ∇θ L(z_i) (projection.py; g_i is the gradient of paper
Eq. 4–5) for the contiguous slice `shard_indices(n, s, S)` of the training set and writes
`part-0000s-of-0000S.safetensors` + `.json`. On Kubernetes this is an Indexed Job with
completions = S (`shard_from_env` reads JOB_COMPLETION_INDEX); locally, S processes.
Reduce: `merge_shards` checks that every part is there, all parts describe the same
projection and scope, the slices tile [0, n) without gaps or overlaps, and returns the vectors
sorted by id, ready for `store.save_index_data`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from pairdots_server.errors import BundleError, InvalidArgument
from pairdots_server.index.sketch import Projection
from pairdots_server.index.store import (
    IndexMeta,
    check_vectors,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)

GradFn = Callable[[Sequence[int]], torch.Tensor]
"""Per-example loss gradients for a batch of training-example indices: [B] -> [B, P]."""

PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.(json|safetensors)$")
PART_FORMAT_TAG = "pairdots-index-part"
SHARD_ENV = "JOB_COMPLETION_INDEX"
NUM_SHARDS_ENV = "PAIRDOTS_NUM_SHARDS"


def compute_projected(
    grad_fn: GradFn,
    indices: Sequence[int],
    projection: Projection,
    batch_size: int,
    progress: bool = True,
    should_stop: Callable[[], None] | None = None,
    lengths: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [N], vectors float32 [N, k]) with vectors[i] = P^T grad_fn([indices[i]]).

    grad_fn is called on batches of at most `batch_size` indices and must return
    [B, projection.in_dim] (any float dtype, any device; the projection runs on that device).
    The batches are consecutive runs of `indices`, or with `lengths` (one per index, e.g. text
    lengths) consecutive runs in order of length, so that a batch pads little; either way
    ids and vectors come back in the order of `indices`. (minilm-sst2, 512 examples, 2
    threads: 14.0–14.9 s by length against 16.7–17.9 s in index order, the same vectors to
    2.9e-7 of the largest.) On the Gaussian kind's blocked path every call regenerates P, so
    prefer large batches. should_stop is called before each batch and may raise
    (errors.Cancelled).
    """
    if batch_size < 1:
        raise InvalidArgument.for_field("batch_size", f"must be ≥ 1, got {batch_size}")
    ids = np.asarray(list(indices), dtype=np.int64).reshape(-1)  # [N]
    if ids.size and (ids.min() < 0 or np.unique(ids).size != ids.size):
        raise InvalidArgument.for_field("indices", "must be unique non-negative example indices")
    vectors = np.empty((ids.size, projection.out_dim), dtype=np.float32)  # [N, k]
    if lengths is not None and len(lengths) != ids.size:
        raise InvalidArgument.for_field("lengths", f"{len(lengths)} lengths for {ids.size} indices")
    order = (np.arange(ids.size) if lengths is None
             else np.array(sorted(range(ids.size), key=lambda r: (int(lengths[r]), r)),
                           dtype=np.int64))  # rows of ids, batched in this order

    from tqdm.auto import tqdm

    with tqdm(
        total=int(ids.size), unit="ex", desc="projected gradients", disable=not progress
    ) as bar:
        for start in range(0, ids.size, batch_size):
            if should_stop is not None:
                should_stop()
            rows = order[start : start + batch_size]
            batch = [int(i) for i in ids[rows]]
            grads = grad_fn(batch)  # [B, P]
            if tuple(grads.shape) != (len(batch), projection.in_dim):
                raise InvalidArgument(
                    f"grad_fn returned shape {list(grads.shape)} for {len(batch)} examples; "
                    f"expected [{len(batch)}, {projection.in_dim}] (projection.in_dim must equal "
                    "the number of parameters in scope)"
                )
            with torch.no_grad():
                proj = projection.project(grads.detach())  # [B, k]
            vectors[rows] = proj.to("cpu", torch.float32).numpy()
            bar.update(len(batch))
    if not np.isfinite(vectors).all():
        raise InvalidArgument("grad_fn produced NaN or Inf gradients; check the model and data")
    return ids, vectors


def shard_indices(n: int, shard: int, num_shards: int) -> range:
    """Positions [⌊s·n/S⌋, ⌊(s+1)·n/S⌋) of shard s: contiguous, disjoint, covering [0, n),
    sizes differing by at most one."""
    if n < 0:
        raise InvalidArgument.for_field("n", f"must be ≥ 0, got {n}")
    if num_shards < 1:
        raise InvalidArgument.for_field("num_shards", f"must be ≥ 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise InvalidArgument.for_field("shard", f"must be in [0, {num_shards}), got {shard}")
    return range(shard * n // num_shards, (shard + 1) * n // num_shards)


def shard_from_env(
    num_shards: int | None = None, environ: Mapping[str, str] | None = None
) -> tuple[int, int]:
    """(shard, num_shards) from JOB_COMPLETION_INDEX (set by a Kubernetes Indexed Job) and
    PAIRDOTS_NUM_SHARDS (or the `num_shards` argument, which wins)."""
    env = os.environ if environ is None else environ
    try:
        shard = int(env[SHARD_ENV])
        total = num_shards if num_shards is not None else int(env[NUM_SHARDS_ENV])
    except KeyError as exc:
        raise InvalidArgument(
            f"{exc.args[0]} is not set; run as a Kubernetes Indexed Job (completionMode: Indexed) "
            f"with {NUM_SHARDS_ENV} = completions, or pass --shard/--num-shards"
        ) from exc
    except ValueError as exc:
        raise InvalidArgument(f"{SHARD_ENV}/{NUM_SHARDS_ENV} must be integers ({exc})") from exc
    shard_indices(0, shard, total)  # validates the pair
    return shard, total


def part_name(shard: int, num_shards: int) -> str:
    """'part-00003-of-00008' for shard 3 of 8."""
    return f"part-{shard:05d}-of-{num_shards:05d}"


def write_shard(
    out_dir: str | os.PathLike[str],
    shard: int,
    num_shards: int,
    ids: np.ndarray,
    vectors: np.ndarray,
    meta: IndexMeta,
) -> Path:
    """Write part `shard` of `num_shards`: <name>.safetensors (ids, vectors) and <name>.json.

    `meta` describes the whole index (meta.count = n, the total number of examples); this part
    must hold exactly len(shard_indices(meta.count, shard, num_shards)) vectors.
    Returns the path of the .json file.
    """
    rng = shard_indices(meta.count, shard, num_shards)
    ids = np.asarray(ids)
    vectors = np.asarray(vectors)
    check_vectors(ids, vectors, len(rng), meta.out_dim, f"shard {shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = part_name(shard, num_shards)
    digest = write_tensors(out / f"{name}.safetensors", ids, vectors)
    record = {
        "format": PART_FORMAT_TAG,
        "shard": shard,
        "num_shards": num_shards,
        "start": rng.start,
        "stop": rng.stop,
        "count": len(rng),
        "sha256": digest,
        "meta": meta.to_dict(),
    }
    path = out / f"{name}.json"
    write_json(path, record)  # written last: its presence marks a complete part
    return path


def build_shard(
    grad_fn: GradFn,
    indices: Sequence[int],
    shard: int,
    num_shards: int,
    projection: Projection,
    meta: IndexMeta,
    out_dir: str | os.PathLike[str],
    batch_size: int,
    progress: bool = True,
    should_stop: Callable[[], None] | None = None,
    lengths: Sequence[int] | None = None,
) -> Path:
    """One map task: project the gradients of `indices[shard_indices(len(indices), shard, S)]`
    and write the part. meta.count must equal len(indices); lengths (one per index) batch the
    shard's examples in order of length (compute_projected)."""
    if meta.count != len(indices):
        raise InvalidArgument.for_field(
            "meta.count", f"must equal the number of examples {len(indices)}, got {meta.count}"
        )
    rng = shard_indices(len(indices), shard, num_shards)
    ids, vectors = compute_projected(
        grad_fn, [indices[i] for i in rng], projection, batch_size, progress, should_stop,
        None if lengths is None else [lengths[i] for i in rng],
    )
    return write_shard(out_dir, shard, num_shards, ids, vectors, meta)


def merge_shards(parts_dir: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, IndexMeta]:
    """Merge all parts in `parts_dir`: (ids int64 [n] ascending, vectors float32 [n, k], meta).

    Raises BundleError when parts are missing, come from different shardings, projections or
    scopes, do not tile [0, n), fail their checksum, or share ids.
    """
    src = Path(parts_dir)
    if not src.is_dir():
        raise BundleError(f"{src}: no such directory of index parts")
    found: dict[tuple[int, int], set[str]] = {}
    for entry in src.iterdir():
        m = PART_RE.match(entry.name)
        if m:
            found.setdefault((int(m.group(1)), int(m.group(2))), set()).add(m.group(3))
    if not found:
        raise BundleError(f"{src}: no part-XXXXX-of-YYYYY files; run the shard jobs first")
    totals = sorted({s for _, s in found})
    if len(totals) > 1:
        raise BundleError(
            f"{src}: parts from different shardings (of {totals}) overlap; remove the stale parts "
            "and keep one build"
        )
    num_shards = totals[0]
    missing = [s for s in range(num_shards) if "json" not in found.get((s, num_shards), set())]
    if missing:
        names = ", ".join(part_name(s, num_shards) for s in missing[:5])
        raise BundleError(
            f"{src}: {len(missing)} of {num_shards} parts missing or incomplete ({names}"
            f"{', ...' if len(missing) > 5 else ''}); rerun those shard(s)"
        )

    meta: IndexMeta | None = None
    all_ids: list[np.ndarray] = []
    all_vectors: list[np.ndarray] = []
    for shard in range(num_shards):
        name = part_name(shard, num_shards)
        record = read_json(src / f"{name}.json")
        if record.get("format") != PART_FORMAT_TAG:
            raise BundleError(f"{src / name}.json: not a pairdots index part")
        part_meta = IndexMeta.from_dict(record.get("meta"), f"{src / name}.json")
        if meta is None:
            meta = part_meta
        elif not (meta.same_source(part_meta) and meta.count == part_meta.count):
            raise BundleError(
                f"{src / name}.json: built with a different projection, scope or example count "
                f"than part 0 ({part_meta.to_dict()} vs {meta.to_dict()}); rebuild all shards "
                "with the same settings"
            )
        rng = shard_indices(meta.count, shard, num_shards)
        if (record.get("shard"), record.get("num_shards")) != (shard, num_shards) or (
            record.get("start"),
            record.get("stop"),
        ) != (rng.start, rng.stop):
            raise BundleError(
                f"{src / name}.json: covers examples [{record.get('start')}, {record.get('stop')}) "
                f"but shard {shard} of {num_shards} must cover [{rng.start}, {rng.stop}); "
                "rerun this shard"
            )
        digest = record.get("sha256")
        if not isinstance(digest, str):
            raise BundleError(f"{src / name}.json: missing 'sha256'; rerun this shard")
        ids, vectors = read_tensors(src / f"{name}.safetensors", digest)
        try:
            check_vectors(ids, vectors, len(rng), meta.out_dim, str(src / name))
        except InvalidArgument as exc:
            raise BundleError(f"{exc.message}; rerun this shard") from exc
        all_ids.append(ids)
        all_vectors.append(vectors)

    assert meta is not None  # num_shards ≥ 1 parts were read
    ids = np.concatenate(all_ids)  # [n]
    vectors = np.concatenate(all_vectors)  # [n, k]
    order = np.argsort(ids, kind="stable")
    ids, vectors = ids[order], vectors[order]
    dup = ids[1:][ids[1:] == ids[:-1]]
    if dup.size:
        raise BundleError(
            f"{src}: {dup.size} example id(s) appear in more than one part (e.g. {int(dup[0])}); "
            "the shards were given overlapping example lists — rebuild all shards"
        )
    return ids, vectors, meta
