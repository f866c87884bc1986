"""Exact solve: form the dense (H + δI) from P matvecs (vmapped in blocks of columns) and call
torch.linalg.solve.

Only for small scopes (tests, the classifier head): cost P curvature-vector products and P²
memory. The dense matrix is built once and reused for later solves.
"""

from __future__ import annotations

import time

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


class ExactSolver(InverseHVPSolver):
    """x = (H + δI)⁻¹ v with H formed explicitly (column j = H e_j), symmetrised."""

    def __init__(
        self, op: CurvatureOperator, damping: float = 0.0, max_params: int = 4096, block: int = 64
    ) -> None:
        if damping < 0:
            raise SolverError(f"damping must be >= 0, got {damping}")
        if op.num_params > max_params:
            raise SolverError(
                f"the exact solver forms a dense {op.num_params}x{op.num_params} matrix; the scope "
                f"has more than max_params={max_params} parameters. Use solver 'lowrank', 'cg' or "
                "'lissa', or scope fewer parameters (e.g. the classifier head)"
            )
        self.op = op
        self.damping = float(damping)
        self.block = max(1, block)
        self._matrix: Tensor | None = None

    def matrix(self, should_stop: ShouldStop | None = None) -> Tensor:
        """The dense H + l2·I [P,P] (without δ), computed once."""
        if self._matrix is None:
            p = self.op.num_params
            eye = torch.eye(p, dtype=self.op.dtype, device=self.op.device)
            blocks = []
            for start in range(0, p, self.block):
                if should_stop is not None:
                    should_stop()
                blocks.append(self.op.matmat(eye[:, start : start + self.block]))
            h = torch.cat(blocks, dim=1)  # [P,P]
            self._matrix = 0.5 * (h + h.T)
        return self._matrix

    def solve(self, v: Tensor, should_stop: ShouldStop | None = None) -> SolveResult:
        check_vector(v, self.op.num_params)
        t0 = time.perf_counter()
        h = self.matrix(should_stop)
        a = h + self.damping * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        try:
            x = torch.linalg.solve(a, v.to(h.dtype))
        except RuntimeError as exc:  # singular matrix
            raise SolverError(
                f"H + {self.damping:g}·I is singular ({exc}); increase the damping"
            ) from exc
        diag = SolveDiagnostics(
            method="exact",
            iterations=h.shape[0],
            rel_change=0.0,
            norm=float(x.norm()),
            effective_damping=self.damping,
            converged=True,
            seconds=time.perf_counter() - t0,
        )
        return SolveResult(x=x, diagnostics=diag)
