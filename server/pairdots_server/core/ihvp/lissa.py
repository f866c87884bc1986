"""LiSSA (Agarwal et al. 2017; paper App. B): stochastic Neumann-series inverse-HVP, optionally
preconditioned by a fitted curvature.

With A = H + δI (damping δ), scale s and a preconditioner M ≈ A (M⁻¹ applied by a solver; M = I
is the paper's recursion), one repeat runs

    x_0 = M⁻¹ v / s
    x_j = x_{j-1} + M⁻¹ (v - A_j x_{j-1}) / s                 j = 1..t

with A_j = H_j + δI, H_j the curvature on a fresh random minibatch (or the full-data H when
``batch_size`` is None). With M = I and x_j = h_j / s this is the paper's
h_j = v + (1 - λ) h_{j-1} - H_j h_{j-1} / s (λ = δ/s), x = h_t / s. With M ≠ I it is the same
recursion on the symmetric preconditioned problem Ã = M^{-1/2} A M^{-1/2}, ṽ = M^{-1/2} v,
y_j = ṽ + (I - Ã_j/s) y_{j-1}, mapped back by x_j = M^{-1/2} y_j / s. The fixed point of both
is A x = v, i.e. x = (H + δI)⁻¹ v for every M: the same quantity as the exact, CG and low-rank
solvers, with effective damping δ (the paper's λ·s).

Convergence: the error contracts by 1 - μ̃/s per step in the eigenbasis of M⁻¹A (eigenvalues
μ̃ > 0, those of Ã), so the recursion converges iff 0 < μ̃ < 2s for every μ̃ of (every) M⁻¹A_j.
Unpreconditioned, μ̃ = μ + δ ∈ [δ, λ_max + δ] for a PSD H: the slowest mode contracts by
ρ = 1 - δ/s, about 1 - 1/κ with κ = (λ_max + δ)/δ (≈ 100 at δ = 0.01·λ_max: hundreds of steps).
With M = U diag(λ_1..k) Uᵀ + δI (the bundle's top-k GGN eigenpairs, ``LowRankSolver``) the top
k modes map to μ̃ = 1 and the rest to (μ + δ)/δ ≤ 1 + λ_{k+1}/δ, so κ drops to 1 + λ_{k+1}/δ
(docs/DESIGN.md §2 has the measured spectrum). Defaults: δ = ``damping_ratio``·λ_max; s =
``scale_factor``·(λ_max + δ) unpreconditioned, ``scale_factor``·μ̃_max preconditioned, μ̃_max
by power iteration on M⁻¹A (``estimate_preconditioned_lambda_max``) or, for the low-rank M,
1 + λ_{k+1}/δ from the stored eigenvalues (influence/solvers_iterative.lowrank_mu_max).

Stopping: every ``check_every`` = w steps, c = ‖x_j - x_{j-w}‖ / ‖x_j‖ (reported as
``rel_change``). For a linear recursion contracting by q per window the remaining relative
error is at most c·q / (1 - q). Unpreconditioned q = (1 - δ/s)^w (a bound for PSD H);
preconditioned q is the observed ratio c_k / c_{k-1} of the last two windows (the dominant
contraction; needs two checks). A repeat stops when max(c, c·q/(1 - q)) ≤ ``tol``. With
stochastic H_j the minibatch noise puts a floor under c, so a repeat may run to ``depth`` and
report converged=False. ``repeats`` independent runs are averaged.

``progress(repeat, step, rel_change, norm)``, if given, is called at every check, and
``observe(repeat, step, x)`` with the iterate (benchmarks trace the error with it).

Divergence: the fixed point has ‖x‖ ≤ ‖v‖/δ (PSD H); NaN/Inf or a norm beyond 10× that bound
raises ``SolverDiverged`` naming the settings to change.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pairdots_server.core.aliases import ShouldStop
from pairdots_server.core.batches import Batch
from pairdots_server.core.curvature import CurvatureOperator, estimate_lambda_max, power_iteration
from pairdots_server.core.exceptions import SolverDiverged, SolverError
from pairdots_server.core.ihvp.base import (
    InverseHVPSolver,
    SolveDiagnostics,
    SolveResult,
    check_vector,
)

DIVERGENCE_FACTOR = 10.0

#: (repeat, step, rel_change, norm) at every check.
Progress = Callable[[int, int, float, float], None]
#: (repeat, step, iterate x_j) at every check.
Observe = Callable[[int, int, Tensor], None]


@dataclass(frozen=True)
class LissaDiagnostics(SolveDiagnostics):
    """``SolveDiagnostics`` plus the scale s that ran and the preconditioner's name ("none":
    the paper's plain recursion)."""

    scale: float = 0.0
    preconditioner: str = "none"


def apply_inverse(m_inv: InverseHVPSolver | None, v: Tensor) -> Tensor:
    """M⁻¹ v (v itself when there is no preconditioner), in v's dtype."""
    if m_inv is None:
        return v
    return m_inv.solve(v).x.to(v.dtype)


def estimate_preconditioned_lambda_max(
    op: CurvatureOperator,
    m_inv: InverseHVPSolver,
    damping: float,
    iters: int = 20,
    seed: int = 0,
    batch: Batch | None = None,
) -> float:
    """μ̃_max, the largest eigenvalue of M⁻¹(H + δI) (H on ``batch``, or the full data), by power
    iteration: y ← M⁻¹A y / ‖M⁻¹A y‖, estimate ‖M⁻¹A y‖ / ‖y‖ at the last step. M⁻¹A is
    similar to the symmetric M^{-1/2} A M^{-1/2}, so its eigenvalues are real and positive."""
    return power_iteration(
        lambda y: apply_inverse(m_inv, op.matvec(y, batch) + damping * y), op.num_params,
        iters=iters, seed=seed, dtype=op.dtype, device=op.device, rayleigh=False)


class LissaSolver(InverseHVPSolver):
    """x ≈ (H + δI)⁻¹ v by the (preconditioned) LiSSA recursion above (see module docstring).

    ``preconditioner``: a solver whose ``solve(v).x`` is M⁻¹ v for an SPD M ≈ H + δI (None:
    M = I); ``preconditioner_name`` is what the diagnostics report. ``mu_max``: a known μ̃_max
    of M⁻¹A for the default scale (else power iteration on the full data)."""

    def __init__(
        self,
        op: CurvatureOperator,
        damping: float | None = None,
        scale: float | None = None,
        depth: int = 1000,
        repeats: int = 1,
        batch_size: int | None = 8,
        tol: float = 0.05,
        seed: int = 0,
        damping_ratio: float = 0.01,
        scale_factor: float = 1.0,
        check_every: int = 10,
        power_iters: int = 20,
        lambda_max: float | None = None,
        progress: Progress | None = None,
        preconditioner: InverseHVPSolver | None = None,
        preconditioner_name: str = "",
        mu_max: float | None = None,
        observe: Observe | None = None,
    ) -> None:
        if damping is not None and damping <= 0:
            raise SolverError(f"LiSSA damping must be > 0 (it bounds the series), got {damping}")
        if damping is None and not damping_ratio > 0:
            raise SolverError(f"damping_ratio must be > 0, got {damping_ratio}")
        if scale is not None and scale <= 0:
            raise SolverError(f"LiSSA scale must be > 0, got {scale}; or leave it unset")
        if not scale_factor > 0.5:
            raise SolverError(
                f"scale_factor must be > 0.5 (the recursion needs s > (λ_max + δ)/2), "
                f"got {scale_factor}"
            )
        for name, val in (("depth", depth), ("repeats", repeats), ("check_every", check_every)):
            if val < 1:
                raise SolverError(f"LiSSA {name} must be >= 1, got {val}")
        if batch_size is not None and batch_size < 1:
            raise SolverError(f"batch_size must be >= 1 or None (full data), got {batch_size}")
        if not 0 < tol < 1:
            raise SolverError(f"tol must be in (0, 1), got {tol}")
        self.op = op
        self.depth = depth
        self.repeats = repeats
        self.batch_size = batch_size
        self.tol = tol
        self.seed = seed
        self.damping_ratio = damping_ratio
        self.scale_factor = scale_factor
        self.check_every = check_every
        self.power_iters = power_iters
        self._damping = damping
        self._scale = scale
        self.lambda_max = lambda_max
        self.mu_max = mu_max
        self.progress = progress
        self.observe = observe
        self.preconditioner = preconditioner
        self.preconditioner_name = preconditioner_name or (
            "none" if preconditioner is None else "given"
        )

    def resolve(self) -> tuple[float, float]:
        """(δ, s): the given values, or the defaults from power iteration (cached)."""
        if self._damping is None:
            lam = self._lambda_max()
            self._damping = self.damping_ratio * lam
            if not self._damping > 0:
                raise SolverError(
                    f"λ_max = {lam:.3g}: the curvature is zero on this scope/data, so a "
                    "relative damping is 0; pass an absolute damping"
                )
        if self._scale is None:
            if self.preconditioner is None:
                self._scale = self.scale_factor * (self._lambda_max() + self._damping)
            else:
                if self.mu_max is None:
                    self.mu_max = estimate_preconditioned_lambda_max(
                        self.op, self.preconditioner, self._damping, self.power_iters, self.seed
                    )
                self._scale = self.scale_factor * self.mu_max
        return float(self._damping), float(self._scale)

    def _lambda_max(self) -> float:
        if self.lambda_max is None:
            self.lambda_max = abs(estimate_lambda_max(self.op, self.power_iters, self.seed))
        return self.lambda_max

    def _repeat(
        self, v: Tensor, damping: float, scale: float, repeat: int, should_stop: ShouldStop | None
    ) -> tuple[Tensor, int, float, bool]:
        gen = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + repeat) % 2**64
        )  # uint64 seeds
        w = self.check_every
        prior: float | None = None  # q per window, known a priori (M = I, PSD H)
        if self.preconditioner is None:
            rho = abs(1.0 - damping / scale)
            prior = rho**w
        bound = DIVERGENCE_FACTOR * float(v.norm()) / damping
        x = apply_inverse(self.preconditioner, v) / scale
        x_prev_check = x.clone()
        rel = float("inf")
        prev_rel: float | None = None
        for j in range(1, self.depth + 1):
            if should_stop is not None:
                should_stop()
            batch = (
                None if self.batch_size is None else self.op.batches.sample(self.batch_size, gen)
            )
            residual = v - self.op.matvec(x, batch) - damping * x
            x = x + apply_inverse(self.preconditioner, residual) / scale
            norm = float(x.norm())
            if not math.isfinite(norm) or norm > bound:
                raise SolverDiverged(
                    f"LiSSA diverged at step {j} (‖x‖ = {norm:.3g}, the solution is below "
                    f"{bound / DIVERGENCE_FACTOR:.3g}). It needs 0 < μ̃ < 2s for every "
                    f"eigenvalue μ̃ of the (preconditioned) curvature plus damping: use "
                    f"curvature 'ggn' (the Hessian is indefinite), raise the damping "
                    f"(δ = {damping:.3g}) or the scale (s = {scale:.3g}; power-iteration "
                    f"λ_max = {self.lambda_max}), or a larger batch_size"
                )
            if j % w == 0:
                rel = float((x - x_prev_check).norm()) / max(norm, 1e-300)
                x_prev_check = x.clone()
                if self.progress is not None:
                    self.progress(repeat, j, rel, norm)
                if self.observe is not None:
                    self.observe(repeat, j, x)
                q = prior
                if q is None and prev_rel is not None and prev_rel > 0:
                    q = rel / prev_rel
                prev_rel = rel
                if q is not None and q < 1 and max(rel, rel * q / (1.0 - q)) <= self.tol:
                    return x, j, rel, True
        return x, self.depth, rel, False

    def solve(self, v: Tensor, should_stop: ShouldStop | None = None) -> SolveResult:
        check_vector(v, self.op.num_params)
        t0 = time.perf_counter()
        damping, scale = self.resolve()
        v = v.detach()
        total = torch.zeros_like(v)
        steps = 0
        worst_rel = 0.0
        converged = True
        for r in range(self.repeats):
            x_r, n, rel, ok = self._repeat(v, damping, scale, r, should_stop)
            total += x_r
            steps += n
            worst_rel = max(worst_rel, rel)
            converged = converged and ok
        x = total / self.repeats
        diag = LissaDiagnostics(
            method="lissa",
            iterations=steps,
            rel_change=worst_rel,
            norm=float(x.norm()),
            effective_damping=damping,
            converged=converged,
            seconds=time.perf_counter() - t0,
            scale=scale,
            preconditioner=self.preconditioner_name,
        )
        return SolveResult(x=x, diagnostics=diag)
