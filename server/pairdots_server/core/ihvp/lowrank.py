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

Tail honesty. The complement term is only right when the discarded eigenvalues are ≪ δ, so the
fit also stores, when the Lanczos run has them,

* ``next_eigval``: the (k+1)-th largest Ritz value θ_{k+1} (the fit always runs at least k + 1
  steps when P > k). By Cauchy interlacing θ_{k+1} ≤ λ_{k+1}: it is a lower bound that becomes
  exact once the Krylov space has converged (m = P, or an invariant subspace);
* ``residuals`` [k]: the relative Ritz residuals ‖H u_i − θ_i u_i‖ / |θ_i| of the kept pairs,
  from the Lanczos identity ‖H u_i − θ_i u_i‖ = β_m |s_i[m]| (s_i the eigenvector of the
  tridiagonal T, β_m the last off-diagonal; exact with full re-orthogonalisation, 0 for an
  invariant subspace).

``LowRankSolver`` reports θ_{k+1}/δ and max residual in its diagnostics (None = unknown, for
factors fitted before these were stored), and ``tail_warning`` turns them into the text of an
Explain warning.
"""

from __future__ import annotations

import math
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

# Explain warns when the first discarded eigenvalue is not below the damping, or a kept
# eigenpair has not converged.
TAIL_RATIO_WARN = 1.0
RESIDUAL_WARN = 0.1


@dataclass(frozen=True)
class LowRankFactors:
    """eigvals [k] (descending) and orthonormal eigvecs [P,k] of the curvature; next_eigval:
    the (k+1)-th Ritz value (None: unknown); residuals [k]: relative Ritz residuals
    ‖Hu − λu‖/|λ| of the kept pairs (None: unknown). See the module docstring."""

    eigvals: Tensor
    eigvecs: Tensor
    next_eigval: float | None = None
    residuals: Tensor | None = None

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

        if self.residuals is not None and tuple(self.residuals.shape) != tuple(
            self.eigvals.shape
        ):
            raise SolverError(
                f"low-rank residuals have shape {tuple(self.residuals.shape)}, expected "
                f"{tuple(self.eigvals.shape)}; the stored factors are inconsistent"
            )

    @property
    def rank(self) -> int:
        return int(self.eigvals.shape[0])

    @property
    def max_residual(self) -> float | None:
        if self.residuals is None or self.residuals.numel() == 0:
            return None
        return float(self.residuals.max())

    def to_tensors(self) -> dict[str, Tensor]:
        """Name -> tensor (contiguous), for safetensors storage: eigvals, eigvecs and, when
        known, next_eigval [1] and residuals [k] (float64)."""
        out = {"eigvals": self.eigvals.contiguous(), "eigvecs": self.eigvecs.contiguous()}
        if self.next_eigval is not None:
            out["next_eigval"] = torch.tensor([self.next_eigval], dtype=torch.float64)
        if self.residuals is not None:
            out["residuals"] = self.residuals.to(torch.float64).contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> LowRankFactors:
        missing = {"eigvals", "eigvecs"} - set(tensors)
        if missing:
            raise SolverError(
                f"low-rank factors are missing {sorted(missing)}; refit the curvature (fit_lowrank)"
            )
        nxt = tensors.get("next_eigval")
        return cls(
            eigvals=tensors["eigvals"],
            eigvecs=tensors["eigvecs"],
            next_eigval=float(nxt.reshape(-1)[0]) if nxt is not None and nxt.numel() else None,
            residuals=tensors.get("residuals"),
        )


def fit_lowrank(
    op: CurvatureOperator,
    rank: int,
    oversample: int = 10,
    seed: int = 0,
    should_stop: ShouldStop | None = None,
) -> LowRankFactors:
    """Top-``rank`` eigenpairs of the full-data operator by Lanczos (full re-orthogonalisation).

    Cost: rank + max(oversample, 1) curvature-vector products (at least one step beyond the
    rank, for the tail estimate next_eigval); memory P × that many.
    """
    p = op.num_params
    if rank < 1:
        raise SolverError(f"rank must be >= 1, got {rank}")
    if oversample < 0:
        raise SolverError(f"oversample must be >= 0, got {oversample}")
    m = min(rank + max(oversample, 1), p)
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
    ranked = torch.argsort(evals, descending=True)
    order = ranked[: min(rank, m)]
    eigvals = evals[order].to(op.dtype).to(op.device)
    eigvecs = basis @ evecs[:, order].to(op.dtype).to(op.device)  # [P,k]
    # Ritz residuals ‖H u_i − θ_i u_i‖ = β_m |s_i[m-1]| (β_m = 0 for an invariant subspace,
    # where the loop stopped on a tiny beta, and when every direction is spanned, m = P)
    beta_m = 0.0 if (m == p or beta <= 1e-10 * max(abs(a) for a in alphas)) else beta
    sel = evals[order].abs().clamp_min(torch.finfo(torch.float64).tiny)
    residuals = beta_m * evecs[m - 1, order].abs() / sel  # [k] float64
    next_eigval = float(evals[ranked[rank]]) if m > rank else None
    return LowRankFactors(
        eigvals=eigvals, eigvecs=eigvecs, next_eigval=next_eigval, residuals=residuals
    )


def tail_warning(next_over_damping: float | None, max_residual: float | None) -> str | None:
    """The Explain warning for low-rank factors whose tail is not negligible, or None.

    Warns when λ_{k+1}/δ > 1 (the complement, taken as curvature 0, holds eigenvalues as large
    as the damping: s_test overweights those directions) or when a kept eigenpair's relative
    Ritz residual is > 0.1 (not converged). Unknown values (old factors) give no warning.
    """
    parts: list[str] = []
    if next_over_damping is not None and math.isfinite(next_over_damping) \
            and next_over_damping > TAIL_RATIO_WARN:
        parts.append(
            f"the first discarded GGN eigenvalue is {next_over_damping:.3g}× the damping "
            "(λ_{k+1}/δ > 1): the low-rank solver treats that part of the curvature as 0, so "
            "s_test overweights those directions; refit with a larger rank (`pairdots prepare "
            "--low-rank`) or raise the damping"
        )
    if max_residual is not None and math.isfinite(max_residual) and max_residual > RESIDUAL_WARN:
        parts.append(
            f"a low-rank eigenpair has relative Ritz residual {max_residual:.3g} (> "
            f"{RESIDUAL_WARN:g}): the factors are not converged; refit with more Lanczos "
            "oversampling"
        )
    return "; ".join(parts) if parts else None


@dataclass(frozen=True)
class LowRankSolveDiagnostics(SolveDiagnostics):
    """SolveDiagnostics plus the tail: next_eigval (θ_{k+1}), next_over_damping (θ_{k+1}/δ),
    max_residual (max relative Ritz residual); None = unknown (factors fitted before these
    were stored)."""

    next_eigval: float | None = None
    next_over_damping: float | None = None
    max_residual: float | None = None
    damping_rule: str = "absolute"

    @property
    def warning(self) -> str | None:
        return tail_warning(self.next_over_damping, self.max_residual)


class LowRankSolver(InverseHVPSolver):
    """x = U diag(1/(λ_i+δ)) Uᵀ v + (v - U Uᵀ v)/δ (see module docstring)."""

    def __init__(
        self, factors: LowRankFactors, damping: float, damping_rule: str = "absolute"
    ) -> None:
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
        self.damping_rule = damping_rule

    def solve(self, v: Tensor, should_stop: ShouldStop | None = None) -> SolveResult:
        u = self.factors.eigvecs
        check_vector(v, u.shape[0])
        t0 = time.perf_counter()
        v = v.to(u.dtype)
        coef = u.T @ v  # [k]
        x = u @ (coef / (self.factors.eigvals + self.damping)) + (v - u @ coef) / self.damping
        nxt = self.factors.next_eigval
        diag = LowRankSolveDiagnostics(
            method="lowrank",
            iterations=0,
            rel_change=0.0,
            norm=float(x.norm()),
            effective_damping=self.damping,
            converged=True,
            seconds=time.perf_counter() - t0,
            next_eigval=nxt,
            next_over_damping=None if nxt is None else max(nxt, 0.0) / self.damping,
            max_residual=self.factors.max_residual,
            damping_rule=self.damping_rule,
        )
        return SolveResult(x=x, diagnostics=diag)
