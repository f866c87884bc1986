"""Seeded Gaussian random projection of training gradients (the prefilter's sketch).

Influence is an inner product, I(z_i, w) = -<s_test, g_i> with g_i = ∇θ L(z_i) (paper Eq. 5),
so the prefilter indexes P^T g_i for a random matrix P ∈ R^{in_dim × out_dim} with i.i.d.
entries P_aj ~ N(0, 1/out_dim). Then for any x, y

    E[<P^T x, P^T y>] = Σ_j Σ_ab x_a y_b E[P_aj P_bj] = <x, y>,

and by Johnson–Lindenstrauss the error is |<P^T x, P^T y> - <x, y>| = O(||x|| ||y|| / √out_dim)
with high probability (for a fixed pair the standard deviation is
√((<x,y>² + ||x||² ||y||²) / out_dim)).

The matrix is a pure function of (seed, in_dim, out_dim): it is generated on the CPU, in
blocks of BLOCK_ROWS rows, each block from its own torch.Generator seeded from (seed, block
number). A projection built on a GPU machine therefore equals the one rebuilt on a CPU-only
server, and the dense (cached) and blocked (regenerated every call) paths give the same result
up to floating-point summation order.

Cost: regenerating the matrix takes in_dim·out_dim normal draws per `project` call on the
blocked path (about 1.5–2·10⁸ draws/s per CPU core; blocks are drawn on torch.get_num_threads()
threads), so project many rows per call, or raise `max_dense_bytes` where memory allows to keep
the matrix cached (in_dim = 1.92M, out_dim = 1024: 7.9 GB in float32).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from pairdots_server.errors import InvalidArgument

BLOCK_ROWS = 4096
"""Rows of P generated from one per-block seed. Part of the matrix's identity: changing it
changes every projection, so it is recorded in the index metadata."""

DEFAULT_MAX_DENSE_BYTES = 256 * 2**20


def block_seed(seed: int, block: int) -> int:
    """A 63-bit torch seed for block `block` of the projection with seed `seed`.

    Derived by hashing (seed, block) so that distinct pairs never share a stream (unlike
    seed * c + block).
    """
    digest = hashlib.blake2b(f"pairdots-projection:{seed}:{block}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)



def check_projection_args(in_dim: int, out_dim: int, seed: int, dtype: torch.dtype) -> None:
    """InvalidArgument unless in_dim, out_dim ≥ 1, seed ≥ 0 and dtype is floating: the
    arguments every seeded projection of the index takes (Gaussian and sparse sign)."""
    if in_dim < 1:
        raise InvalidArgument.for_field("in_dim", f"must be ≥ 1, got {in_dim}")
    if out_dim < 1:
        raise InvalidArgument.for_field("out_dim", f"must be ≥ 1, got {out_dim}")
    if seed < 0:
        raise InvalidArgument.for_field("seed", f"must be a non-negative integer, got {seed}")
    if not dtype.is_floating_point:
        raise InvalidArgument.for_field("dtype", f"must be a floating dtype, got {dtype}")

class GaussianProjection:
    """x ↦ x P with P ∈ R^{in_dim × out_dim}, P_aj ~ N(0, 1/out_dim), seeded and reproducible.

    Args:
        in_dim: dimension of the vectors to project (number of parameters in scope, P).
        out_dim: sketch dimension k (1–4k for the prefilter).
        seed: any non-negative integer; the same seed gives the same matrix everywhere.
        dtype: dtype of the matrix and of the result (the draws are float32, then cast).
        max_dense_bytes: if in_dim·out_dim·itemsize is at most this, the dense matrix is built
            once per device and cached; otherwise it is never materialised and is regenerated
            block by block on every call.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        seed: int,
        dtype: torch.dtype = torch.float32,
        max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
    ) -> None:
        check_projection_args(in_dim, out_dim, seed, dtype)
        if max_dense_bytes < 0:
            raise InvalidArgument.for_field("max_dense_bytes", "must be ≥ 0")
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)
        self.seed = int(seed)
        self.dtype = dtype
        self.max_dense_bytes = int(max_dense_bytes)
        self._scale = 1.0 / float(out_dim) ** 0.5
        self._dense: dict[torch.device, torch.Tensor] = {}

    @property
    def matrix_bytes(self) -> int:
        """Size the dense matrix would take in `dtype`."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.in_dim * self.out_dim * itemsize

    @property
    def is_dense(self) -> bool:
        """True when the dense matrix is cached (matrix_bytes ≤ max_dense_bytes)."""
        return self.matrix_bytes <= self.max_dense_bytes

    @property
    def num_blocks(self) -> int:
        return -(-self.in_dim // BLOCK_ROWS)

    def describe(self) -> dict[str, object]:
        """Everything that identifies the matrix (what an index's metadata must record)."""
        return {
            "kind": "gaussian",
            "seed": self.seed,
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "block_rows": BLOCK_ROWS,
            "entry_std": self._scale,
        }

    def block(self, b: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Rows [b·BLOCK_ROWS, min((b+1)·BLOCK_ROWS, in_dim)) of P, shape [rows, out_dim]."""
        if not 0 <= b < self.num_blocks:
            raise InvalidArgument.for_field("block", f"must be in [0, {self.num_blocks}), got {b}")
        start = b * BLOCK_ROWS
        rows = min(BLOCK_ROWS, self.in_dim - start)
        gen = torch.Generator(device="cpu").manual_seed(block_seed(self.seed, b))
        draws = torch.randn(rows, self.out_dim, generator=gen, dtype=torch.float32)  # [rows, k]
        draws.mul_(self._scale)
        return draws.to(device=device or "cpu", dtype=self.dtype)

    def _blocks(self, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, block) for every block, in order. Blocks have independent generators, so
        up to `workers` of them are drawn concurrently (torch releases the GIL while drawing;
        a single generator is sequential), at most 2·workers blocks held at a time."""
        workers = max(1, min(torch.get_num_threads(), self.num_blocks))
        if workers == 1:
            for b in range(self.num_blocks):
                yield b * BLOCK_ROWS, self.block(b, device)
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque[Future[torch.Tensor]] = deque()
            next_block = 0
            for b in range(self.num_blocks):
                while next_block < self.num_blocks and len(pending) < 2 * workers:
                    pending.append(pool.submit(self.block, next_block, device))
                    next_block += 1
                yield b * BLOCK_ROWS, pending.popleft().result()

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The full matrix P, shape [in_dim, out_dim] (materialised regardless of the limit;
        cached only when `is_dense`)."""
        dev = torch.device(device or "cpu")
        cached = self._dense.get(dev)
        if cached is not None:
            return cached
        mat = torch.empty(self.in_dim, self.out_dim, dtype=self.dtype, device=dev)
        for start, blk in self._blocks(dev):
            mat[start : start + blk.shape[0]] = blk
        if self.is_dense:
            self._dense[dev] = mat
        return mat

    @torch.no_grad()
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x P for a batch of rows: [B, in_dim] -> [B, out_dim], on x's device, in `dtype`."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise InvalidArgument.for_field(
                "x", f"expected shape [B, {self.in_dim}], got {list(x.shape)}"
            )
        xs = x.detach().to(dtype=self.dtype)
        if self.is_dense:
            return xs @ self.dense(xs.device)  # [B, k]
        out = torch.zeros(xs.shape[0], self.out_dim, dtype=self.dtype, device=xs.device)
        for start, blk in self._blocks(xs.device):
            out.addmm_(xs[:, start : start + blk.shape[0]], blk)  # [B, rows] @ [rows, k]
        return out

    def __repr__(self) -> str:
        return (
            f"GaussianProjection(in_dim={self.in_dim}, out_dim={self.out_dim}, seed={self.seed}, "
            f"dtype={self.dtype}, dense={self.is_dense})"
        )
