"""On-disk format of a bundle's candidate index (no pickles).

Layout of the index directory (a bundle keeps it at `<bundle>/index/`):

    vectors.safetensors   tensors "ids" int64 [N] and "vectors" float32 [N, out_dim]
                          (row i is P^T ∇θ L(z_ids[i]), see projection.py)
    meta.json             IndexMeta fields + format tag + SHA-256 of vectors.safetensors

The FAISS index itself is not stored: it is rebuilt from the vectors on load (a flat index is a
copy; an IVF index retrains its coarse quantizer, seconds for 10⁶ vectors).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, cast

import numpy as np

from pairdots_server.errors import BundleError, InvalidArgument
from pairdots_server.index.base import CandidateIndex
from pairdots_server.index.projection import BLOCK_ROWS
from pairdots_server.index.sketch import GAUSSIAN, PROJECTION_KINDS, Projection, make_projection

FORMAT_TAG = "pairdots-index"
FORMAT_VERSION = 1
VECTORS_FILE = "vectors.safetensors"
META_FILE = "meta.json"
KINDS = ("auto", "flat", "ivf", "exact")


@dataclass(frozen=True)
class IndexMeta:
    """What the stored vectors are: which projection of which gradients.

    Attributes:
        projection_seed, in_dim, out_dim, projection_block_rows, projection_kind: identify the
            projection S (in_dim = number of parameters in scope, out_dim = k; kind "gaussian",
            the default an index written before the sparse sketch reads as, or "sparse_sign",
            sketch.py; block rows matter for the Gaussian kind only).
        kind: index kind to build on load ("auto", "flat", "ivf" or "exact").
        count: number of vectors N.
        scope: human-readable description of the parameter scope the gradients were taken over
            (must match the serving scope, or the projected query is meaningless).
        dtype: dtype of the stored vectors (always "float32").
    """

    projection_seed: int
    in_dim: int
    out_dim: int
    kind: str
    count: int
    scope: str
    dtype: str = "float32"
    projection_block_rows: int = BLOCK_ROWS
    format_version: int = FORMAT_VERSION
    projection_kind: str = GAUSSIAN

    def __post_init__(self) -> None:
        for name in ("projection_seed", "in_dim", "out_dim", "count", "projection_block_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidArgument.for_field(name, f"must be an integer, got {value!r}")
        if self.projection_seed < 0:
            raise InvalidArgument.for_field("projection_seed", "must be ≥ 0")
        if self.in_dim < 1 or self.out_dim < 1:
            raise InvalidArgument.for_field("in_dim/out_dim", "must both be ≥ 1")
        if self.count < 0:
            raise InvalidArgument.for_field("count", "must be ≥ 0")
        if self.kind not in KINDS:
            raise InvalidArgument.for_field("kind", f"must be one of {KINDS}, got {self.kind!r}")
        if self.projection_kind not in PROJECTION_KINDS:
            raise InvalidArgument.for_field(
                "projection_kind",
                f"must be one of {PROJECTION_KINDS}, got {self.projection_kind!r}; this server "
                "cannot reproduce that projection — rebuild the index (`pairdots index build`)",
            )
        if not isinstance(self.scope, str):
            raise InvalidArgument.for_field("scope", "must be a string")
        if self.dtype != "float32":
            raise InvalidArgument.for_field(
                "dtype", f"only 'float32' is supported, got {self.dtype!r}"
            )
        if self.format_version != FORMAT_VERSION:
            raise InvalidArgument.for_field(
                "format_version",
                f"this server reads index format {FORMAT_VERSION}, got {self.format_version}; "
                "rebuild the index with this version (`pairdots index`)",
            )

    @classmethod
    def for_projection(
        cls, projection: Projection, count: int, scope: str, kind: str = "auto"
    ) -> IndexMeta:
        """Metadata for `count` vectors projected with `projection`."""
        return cls(
            projection_seed=projection.seed,
            in_dim=projection.in_dim,
            out_dim=projection.out_dim,
            kind=kind,
            count=count,
            scope=scope,
            projection_kind=str(projection.describe()["kind"]),
        )

    def projection(self, max_dense_bytes: int | None = None) -> Projection:
        """The projection that produced the vectors (max_dense_bytes: the Gaussian cache)."""
        return make_projection(
            self.projection_kind, self.in_dim, self.out_dim, self.projection_seed,
            max_dense_bytes=max_dense_bytes,
        )

    def same_source(self, other: IndexMeta) -> bool:
        """True if both describe vectors from the same projection and scope (count may differ)."""
        keys = ("projection_seed", "in_dim", "out_dim", "projection_block_rows", "scope", "dtype",
                "projection_kind")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str) -> IndexMeta:
        """Parse a dict read from `source`; any problem is a BundleError naming the file."""
        if not isinstance(data, dict):
            raise BundleError(f"{source}: expected a JSON object with the index metadata")
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise BundleError(f"{source}: missing field(s) {missing}; rebuild the index")
        try:
            return cls(**{n: data[n] for n in names if n in data})
        except InvalidArgument as exc:
            raise BundleError(
                f"{source}: invalid metadata: {exc.message}; rebuild the index"
            ) from exc


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write `obj` as indented JSON, atomically."""
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object; a missing or unparsable file is a BundleError."""
    if not path.is_file():
        raise BundleError(f"{path}: missing; rebuild the index")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); rebuild the index") from exc
    if not isinstance(obj, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return obj


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_vectors(
    ids: np.ndarray, vectors: np.ndarray, count: int, out_dim: int, what: str
) -> None:
    """ids int64 [count] unique ≥ 0, vectors float32 [count, out_dim] finite; else InvalidArgument."""
    if ids.dtype != np.int64 or ids.shape != (count,):
        raise InvalidArgument.for_field(
            f"{what}.ids", f"expected int64 [{count}], got {ids.dtype} {list(ids.shape)}"
        )
    if vectors.dtype != np.float32 or vectors.shape != (count, out_dim):
        raise InvalidArgument.for_field(
            f"{what}.vectors",
            f"expected float32 [{count}, {out_dim}], got {vectors.dtype} {list(vectors.shape)}",
        )
    if count and (ids.min() < 0 or np.unique(ids).size != count):
        raise InvalidArgument.for_field(f"{what}.ids", "must be unique and non-negative")
    if not np.isfinite(vectors).all():
        raise InvalidArgument.for_field(f"{what}.vectors", "contains NaN or Inf")


def write_tensors(path: Path, ids: np.ndarray, vectors: np.ndarray) -> str:
    """Write ids/vectors as safetensors, atomically; return the file's SHA-256."""
    from safetensors.numpy import save

    data = save({"ids": np.ascontiguousarray(ids), "vectors": np.ascontiguousarray(vectors)})
    _atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_tensors(path: Path, sha256: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Read (ids, vectors) written by write_tensors, verifying the SHA-256 when given."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    if not path.is_file():
        raise BundleError(f"{path}: missing; rebuild the index")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise BundleError(
            f"{path}: SHA-256 does not match the metadata (file changed or truncated); "
            "rebuild the index"
        )
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as exc:
        raise BundleError(f"{path}: not a readable safetensors file ({exc})") from exc
    if set(tensors) != {"ids", "vectors"}:
        raise BundleError(f"{path}: expected tensors 'ids' and 'vectors', found {sorted(tensors)}")
    return tensors["ids"], tensors["vectors"]


def save_index_data(
    directory: str | os.PathLike[str], ids: np.ndarray, vectors: np.ndarray, meta: IndexMeta
) -> Path:
    """Write `directory`/vectors.safetensors and `directory`/meta.json (created if needed).

    ids int64 [meta.count], vectors float32 [meta.count, meta.out_dim]. Returns the directory.
    """
    out = Path(directory)
    ids = np.asarray(ids)
    vectors = np.asarray(vectors)
    check_vectors(ids, vectors, meta.count, meta.out_dim, "index")
    out.mkdir(parents=True, exist_ok=True)
    digest = write_tensors(out / VECTORS_FILE, ids, vectors)
    record = {"format": FORMAT_TAG, "vectors_file": VECTORS_FILE, "vectors_sha256": digest}
    write_json(out / META_FILE, {**meta.to_dict(), **record})
    return out


def load_index_data(
    directory: str | os.PathLike[str], verify_hash: bool = True
) -> tuple[np.ndarray, np.ndarray, IndexMeta]:
    """Read and verify an index directory: (ids int64 [N], vectors float32 [N, k], meta)."""
    src = Path(directory)
    meta_path = src / META_FILE
    raw = read_json(meta_path)
    if raw.get("format") != FORMAT_TAG:
        raise BundleError(f"{meta_path}: not a pairdots index (format {raw.get('format')!r})")
    meta = IndexMeta.from_dict(raw, str(meta_path))
    if meta.projection_kind == GAUSSIAN and meta.projection_block_rows != BLOCK_ROWS:
        raise BundleError(
            f"{meta_path}: built with projection block size {meta.projection_block_rows}, this "
            f"server generates blocks of {BLOCK_ROWS}; the query projection would differ — "
            "rebuild the index"
        )
    digest = raw.get("vectors_sha256")
    if verify_hash and not isinstance(digest, str):
        raise BundleError(f"{meta_path}: missing 'vectors_sha256'; rebuild the index")
    ids, vectors = read_tensors(src / VECTORS_FILE, digest if verify_hash else None)
    try:
        check_vectors(ids, vectors, meta.count, meta.out_dim, str(src / VECTORS_FILE))
    except InvalidArgument as exc:
        raise BundleError(
            f"index data does not match {meta_path} (count={meta.count}, out_dim={meta.out_dim}): "
            f"{exc.message}; rebuild the index"
        ) from exc
    return ids, vectors, meta


def load_index(
    directory: str | os.PathLike[str],
    kind: str | None = None,
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    use_gpu: bool | str = "auto",
    verify_hash: bool = True,
) -> tuple[CandidateIndex, IndexMeta]:
    """Load an index directory and build a searchable index over it.

    kind: None (use meta.kind), "auto" | "flat" | "ivf" (FaissIndex) or "exact" (ExactIndex).
    """
    ids, vectors, meta = load_index_data(directory, verify_hash=verify_hash)
    kind = meta.kind if kind is None else kind
    if kind not in KINDS:
        raise InvalidArgument.for_field("kind", f"must be one of {KINDS} or None, got {kind!r}")
    index: CandidateIndex
    if kind == "exact":
        from pairdots_server.index.exact import ExactIndex

        index = ExactIndex(meta.out_dim)
    else:
        from pairdots_server.index.faiss_index import FaissIndex, IndexKind, UseGpu

        index = FaissIndex(
            meta.out_dim,
            kind=cast(IndexKind, kind),
            nlist=nlist,
            nprobe=nprobe,
            use_gpu=cast(UseGpu, use_gpu),
        )
    index.add(vectors, ids)
    return index, meta
