"""Conjugate gradient on (H + δI) x = v with the full-data curvature operator.

Standard CG (Hestenes–Stiefel); stops when the relative residual ‖v - (H+δI)x‖ / ‖v‖ ≤ tol.
Requires H + δI positive definite: a non-positive curvature pᵀ(H+δI)p raises SolverDiverged.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from pairdots_server.core.aliases import ShouldStop
from pairdots_server.core.curvature import CurvatureOperator
from pairdots_server.core.exceptions import SolverDiverged, SolverError
from pairdots_server.core.ihvp.base import (
    InverseHVPSolver,
    SolveDiagnostics,
    SolveResult,
    check_vector,
)


class CGSolver(InverseHVPSolver):
    """x = (H + δI)⁻¹ v by conjugate gradient, at most ``max_iter`` matvecs."""

    def __init__(
        self, op: CurvatureOperator, damping: float = 0.0, max_iter: int = 100, tol: float = 1e-6
    ) -> None:
        if damping < 0:
            raise SolverError(f"damping must be >= 0, got {damping}")
        if max_iter < 1:
            raise SolverError(f"max_iter must be >= 1, got {max_iter}")
        if not 0 < tol < 1:
            raise SolverError(f"tol must be in (0, 1), got {tol}")
        self.op = op
        self.damping = float(damping)
        self.max_iter = max_iter
        self.tol = tol

    def _apply(self, p: Tensor) -> Tensor:
        return self.op.matvec(p) + self.damping * p

    def solve(self, v: Tensor, should_stop: ShouldStop | None = None) -> SolveResult:
        check_vector(v, self.op.num_params)
        t0 = time.perf_counter()
        x = torch.zeros_like(v)
        r = v.clone()
        p = r.clone()
        rs = float(r @ r)
        v_norm = max(float(v.norm()), torch.finfo(v.dtype).tiny)
        rel = float(rs**0.5) / v_norm
        it = 0
        while it < self.max_iter and rel > self.tol:
            if should_stop is not None:
                should_stop()
            ap = self._apply(p)
            curv = float(p @ ap)
            if not curv > 0:  # also catches NaN
                raise SolverDiverged(
                    f"CG met non-positive curvature pᵀ(H+δI)p = {curv:.3g} at iteration {it}: "
                    f"H + {self.damping:g}·I is not positive definite. Use curvature 'ggn' "
                    "(the Hessian is indefinite) or increase the damping"
                )
            alpha = rs / curv
            x = x + alpha * p
            r = r - alpha * ap
            rs_new = float(r @ r)
            p = r + (rs_new / rs) * p
            rs = rs_new
            rel = float(rs**0.5) / v_norm
            it += 1
        diag = SolveDiagnostics(
            method="cg",
            iterations=it,
            rel_change=rel,
            norm=float(x.norm()),
            effective_damping=self.damping,
            converged=rel <= self.tol,
            seconds=time.perf_counter() - t0,
        )
        return SolveResult(x=x, diagnostics=diag)
