"""LiSSA (Agarwal et al. 2017; paper App. B): stochastic Neumann-series inverse-HVP.

Recursion implemented (one repeat), with damping δ and scale s:

    h_0 = v
    h_j = v + (1 - δ/s) h_{j-1} - H_j h_{j-1} / s        j = 1..t
    x   = h_t / s

H_j is the curvature on a fresh random minibatch (or the full-data H when ``batch_size`` is
None). This is the paper's h_j = v + (1 - λ) h_{j-1} - H_j h_{j-1} / s with λ = δ/s. Its fixed
point h = v + (1 - δ/s) h - H h / s gives (H + δI) h / s = v, so x → (H + δI)⁻¹ v: the same
quantity as the exact, CG and low-rank solvers, with effective damping δ (the paper's λ·s).

Convergence: in the eigenbasis of H the error contracts by 1 - (μ + δ)/s per step, so the
recursion converges iff 0 < μ + δ < 2s for every eigenvalue μ of (every) H_j; slowest mode
ρ = 1 - (μ_min + δ)/s ≤ 1 - δ/s for a PSD H. Hence the GGN (PSD) and a damping relative to
λ_max. Defaults: δ = ``damping_ratio``·λ_max and s = ``scale_factor``·(λ_max + δ), λ_max from
power iteration on the full-data operator.

Stopping: every ``check_every`` = w steps, c = ‖h_j - h_{j-w}‖ / ‖h_j‖ (reported as
``rel_change``). For a linear recursion contracting by at most ρ = 1 - δ/s per step the
remaining relative error is at most c·ρ^w / (1 - ρ^w); a repeat stops when that bound is
≤ ``tol``. With stochastic H_j the minibatch noise puts a floor under c, so the repeat may run
to ``depth`` and report converged=False. ``repeats`` independent runs are averaged.

``progress(repeat, step, rel_change, norm)``, if given, is called at every check.

Divergence: a convergent recursion keeps ‖h_j‖ ≤ ‖v‖·s/δ; NaN/Inf or a norm beyond 10× that
bound raises ``SolverDiverged`` naming the settings to change.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from pairdots_server.core.aliases import ShouldStop
from pairdots_server.core.curvature import CurvatureOperator, estimate_lambda_max
from pairdots_server.core.exceptions import SolverDiverged, SolverError
from pairdots_server.core.ihvp.base import (
    InverseHVPSolver,
    SolveDiagnostics,
    SolveResult,
    check_vector,
)

DIVERGENCE_FACTOR = 10.0


class LissaSolver(InverseHVPSolver):
    """x ≈ (H + δI)⁻¹ v by the LiSSA recursion above (see module docstring)."""

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
        progress: Callable[[int, int, float, float], None] | None = None,
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
        self.progress = progress

    def resolve(self) -> tuple[float, float]:
        """(δ, s): the given values, or the defaults from a power-iteration λ_max (cached)."""
        if self._damping is None or self._scale is None:
            if self.lambda_max is None:
                self.lambda_max = abs(estimate_lambda_max(self.op, self.power_iters, self.seed))
            lam = self.lambda_max
            if self._damping is None:
                self._damping = self.damping_ratio * lam
                if not self._damping > 0:
                    raise SolverError(
                        f"λ_max = {lam:.3g}: the curvature is zero on this scope/data, so a "
                        "relative damping is 0; pass an absolute damping"
                    )
            if self._scale is None:
                self._scale = self.scale_factor * (lam + self._damping)
        return float(self._damping), float(self._scale)

    def _repeat(
        self, v: Tensor, damping: float, scale: float, repeat: int, should_stop: ShouldStop | None
    ) -> tuple[Tensor, int, float, bool]:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + repeat) % 2**64)  # uint64 seeds
        rho = 1.0 - damping / scale
        w = self.check_every
        factor = abs(rho) ** w / max(1.0 - abs(rho) ** w, 1e-12)
        bound = DIVERGENCE_FACTOR * float(v.norm()) * scale / damping
        h = v.clone()
        h_prev_check = h.clone()
        rel = float("inf")
        for j in range(1, self.depth + 1):
            if should_stop is not None:
                should_stop()
            batch = (
                None
                if self.batch_size is None
                else self.op.batches.sample(self.batch_size, gen)
            )
            h = v + (1.0 - damping / scale) * h - self.op.matvec(h, batch) / scale
            norm = float(h.norm())
            if not math.isfinite(norm) or norm > bound:
                raise SolverDiverged(
                    f"LiSSA diverged at step {j} (‖h‖ = {norm:.3g}, a convergent recursion stays "
                    f"below {bound / DIVERGENCE_FACTOR:.3g}). It needs 0 < μ + δ < 2s for every "
                    f"curvature eigenvalue μ: use curvature 'ggn' (the Hessian is indefinite), "
                    f"raise the damping (δ = {damping:.3g}) or the scale (s = {scale:.3g}; "
                    f"power-iteration λ_max = {self.lambda_max}), or a larger batch_size"
                )
            if j % w == 0:
                rel = float((h - h_prev_check).norm()) / max(norm, 1e-300)
                h_prev_check = h.clone()
                if self.progress is not None:
                    self.progress(repeat, j, rel, norm)
                if rel * factor <= self.tol:
                    return h / scale, j, rel, True
        return h / scale, self.depth, rel, False

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
        diag = SolveDiagnostics(
            method="lissa",
            iterations=steps,
            rel_change=worst_rel,
            norm=float(x.norm()),
            effective_damping=damping,
            converged=converged,
            seconds=time.perf_counter() - t0,
        )
        return SolveResult(x=x, diagnostics=diag)
