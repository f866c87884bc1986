"""Precomputed low-rank curvature (Schioppa et al. 2022): Lanczos eigenpairs of H, then each
query's inverse-HVP is a projection.

``fit_lowrank`` runs m = rank + oversample Lanczos steps with full re-orthogonalisation on the
full-data operator (H + l2·I, the GGN by default), eigendecomposes the m×m tridiagonal matrix and
keeps the ``rank`` largest Ritz pairs (λ_i, u_i): H ≈ U diag(λ) Uᵀ on span(U).

``LowRankSolver`` solves with

    x = U diag(1 / (λ_i + δ)) Uᵀ v + (v - U Uᵀ v) / δ

i.e. the exact (H + δI)⁻¹ on the top-k eigenspace, and curvature taken as 0 on its orthogonal
complement (so that part is only damped, 1/δ). This is the choice that keeps the fixed point
comparable with the other solvers' (H + δI)⁻¹ v: it is exact when k = P, and for a GGN whose
spectrum decays fast the discarded eigenvalues are ≪ δ. (Dropping the complement term instead
would ignore every direction outside the top-k subspace.) Requires δ > 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from pairdots_server.core.aliases import ShouldStop
from pairdots_server.core.curvature import CurvatureOperator
from pairdots_server.core.exceptions import SolverError
from pairdots_server.core.ihvp.base import (
    InverseHVPSolver,
    SolveDiagnostics,
    SolveResult,
    check_vector,
)


@dataclass(frozen=True)
class LowRankFactors:
    """eigvals [k] (descending) and orthonormal eigvecs [P,k] of the curvature."""

    eigvals: Tensor
    eigvecs: Tensor

    def __post_init__(self) -> None:
        if self.eigvals.dim() != 1 or self.eigvecs.dim() != 2:
            raise SolverError(
                f"low-rank factors need eigvals [k] and eigvecs [P,k], got "
                f"{tuple(self.eigvals.shape)} and {tuple(self.eigvecs.shape)}"
            )
        if self.eigvecs.shape[1] != self.eigvals.shape[0]:
            raise SolverError(
                f"eigvecs has {self.eigvecs.shape[1]} columns but there are "
                f"{self.eigvals.shape[0]} eigenvalues; the stored factors are inconsistent"
            )

    @property
    def rank(self) -> int:
        return int(self.eigvals.shape[0])

    def to_tensors(self) -> dict[str, Tensor]:
        """Name -> tensor (contiguous), for safetensors storage."""
        return {"eigvals": self.eigvals.contiguous(), "eigvecs": self.eigvecs.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> LowRankFactors:
        missing = {"eigvals", "eigvecs"} - set(tensors)
        if missing:
            raise SolverError(
                f"low-rank factors are missing {sorted(missing)}; refit the curvature (fit_lowrank)"
            )
        return cls(eigvals=tensors["eigvals"], eigvecs=tensors["eigvecs"])


def fit_lowrank(
    op: CurvatureOperator,
    rank: int,
    oversample: int = 10,
    seed: int = 0,
    should_stop: ShouldStop | None = None,
) -> LowRankFactors:
    """Top-``rank`` eigenpairs of the full-data operator by Lanczos (full re-orthogonalisation).

    Cost: rank + oversample curvature-vector products; memory P × (rank + oversample).
    """
    p = op.num_params
    if rank < 1:
        raise SolverError(f"rank must be >= 1, got {rank}")
    if oversample < 0:
        raise SolverError(f"oversample must be >= 0, got {oversample}")
    m = min(rank + oversample, p)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(p, generator=gen, dtype=op.dtype).to(op.device)
    q /= q.norm()
    basis = torch.zeros(p, m, dtype=op.dtype, device=op.device)  # Q [P,m]
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    q_prev = torch.zeros_like(q)
    for j in range(m):
        if should_stop is not None:
            should_stop()
        basis[:, j] = q
        w = op.matvec(q)
        alpha = float(q @ w)
        w = w - alpha * q - beta * q_prev
        # full re-orthogonalisation (twice is enough)
        for _ in range(2):
            w = w - basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)
        alphas.append(alpha)
        beta = float(w.norm())
        if j == m - 1 or beta <= 1e-10 * max(abs(a) for a in alphas):
            m = j + 1  # invariant subspace found (or done)
            break
        betas.append(beta)
        q_prev, q = q, w / beta
    basis = basis[:, :m]
    t = torch.diag(torch.tensor(alphas[:m], dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    evals, evecs = torch.linalg.eigh(t)  # ascending
    order = torch.argsort(evals, descending=True)[: min(rank, m)]
    eigvals = evals[order].to(op.dtype).to(op.device)
    eigvecs = basis @ evecs[:, order].to(op.dtype).to(op.device)  # [P,k]
    return LowRankFactors(eigvals=eigvals, eigvecs=eigvecs)


class LowRankSolver(InverseHVPSolver):
    """x = U diag(1/(λ_i+δ)) Uᵀ v + (v - U Uᵀ v)/δ (see module docstring)."""

    def __init__(self, factors: LowRankFactors, damping: float) -> None:
        if not damping > 0:
            raise SolverError(
                f"the low-rank solver needs damping > 0 (it divides the complement by δ), "
                f"got {damping}"
            )
        low = float(factors.eigvals.min()) if factors.rank else 0.0
        if low + damping <= 0:
            raise SolverError(
                f"λ_min + δ = {low + damping:.3g} <= 0: the factors have a negative eigenvalue; "
                "fit them on the GGN or increase the damping"
            )
        self.factors = factors
        self.damping = float(damping)

    def solve(self, v: Tensor, should_stop: ShouldStop | None = None) -> SolveResult:
        u = self.factors.eigvecs
        check_vector(v, u.shape[0])
        t0 = time.perf_counter()
        v = v.to(u.dtype)
        coef = u.T @ v  # [k]
        x = u @ (coef / (self.factors.eigvals + self.damping)) + (v - u @ coef) / self.damping
        diag = SolveDiagnostics(
            method="lowrank",
            iterations=0,
            rel_change=0.0,
            norm=float(x.norm()),
            effective_damping=self.damping,
            converged=True,
            seconds=time.perf_counter() - t0,
        )
        return SolveResult(x=x, diagnostics=diag)
