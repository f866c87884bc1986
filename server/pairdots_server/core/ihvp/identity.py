"""Identity curvature: x = (0 + λI)⁻¹ v = v / λ.

With H taken as 0 the influence is the plain gradient dot product ∇θL(z_test)ᵀ ∇θL(z) / λ
(TracIn-style, Pruthi et al. 2020, single checkpoint); λ = 1 (the default) returns v itself.
"""

from __future__ import annotations

import time

from torch import Tensor

from pairdots_server.core.aliases import ShouldStop
from pairdots_server.core.exceptions import SolverError
from pairdots_server.core.ihvp.base import (
    InverseHVPSolver,
    SolveDiagnostics,
    SolveResult,
    check_vector,
)


class IdentitySolver(InverseHVPSolver):
    """x = v / λ (λ > 0, default 1); ``num_params`` (optional) checks the vector's length."""

    def __init__(self, damping: float = 1.0, num_params: int | None = None) -> None:
        if not damping > 0:
            raise SolverError(
                f"the identity solver returns v / damping and needs damping > 0, got {damping}; "
                "use damping=1 for the plain gradient dot product"
            )
        self.damping = float(damping)
        self.num_params = num_params

    def solve(self, v: Tensor, should_stop: ShouldStop | None = None) -> SolveResult:
        if self.num_params is not None:
            check_vector(v, self.num_params)
        elif v.dim() != 1:
            raise ValueError(f"v must be a vector [P], got shape {tuple(v.shape)}")
        t0 = time.perf_counter()
        x = v.clone() if self.damping == 1.0 else v / self.damping
        diag = SolveDiagnostics(
            method="identity",
            iterations=0,
            rel_change=0.0,
            norm=float(x.norm()),
            effective_damping=self.damping,
            converged=True,
            seconds=time.perf_counter() - t0,
        )
        return SolveResult(x=x, diagnostics=diag)
