"""The common interface of the inverse-HVP solvers: x ≈ (H + δ·I)⁻¹ v.

Every solver's fixed point is (H + δI)⁻¹ v with δ the solver's *effective damping*, reported in
``SolveDiagnostics.effective_damping`` so answers from different solvers are comparable.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import Tensor

from pairdots_server.core.aliases import ShouldStop
from pairdots_server.core.exceptions import NonFiniteInput


@dataclass(frozen=True)
class SolveDiagnostics:
    """How a solve went.

    method: solver name; iterations: matvecs/steps spent; rel_change: the solver's final
    convergence measure (CG: relative residual; LiSSA: relative change of the iterate over its
    check window; exact/low-rank: 0); norm: ‖x‖; effective_damping: δ in (H + δI)⁻¹;
    converged: the tolerance was met; seconds: wall time.
    """

    method: str
    iterations: int
    rel_change: float
    norm: float
    effective_damping: float
    converged: bool
    seconds: float


@dataclass(frozen=True)
class SolveResult:
    """x [P] ≈ (H + δI)⁻¹ v, plus diagnostics."""

    x: Tensor
    diagnostics: SolveDiagnostics


class InverseHVPSolver(abc.ABC):
    """x = (H + δ·I)⁻¹ v for a curvature operator H."""

    @abc.abstractmethod
    def solve(self, v: Tensor, should_stop: ShouldStop | None = None) -> SolveResult:
        """Solve for v [P]; ``should_stop()`` is called between iterations and raises to abort."""


def check_vector(v: Tensor, num_params: int) -> None:
    """Raise ValueError unless v is a finite [P] vector."""
    if v.shape != (num_params,):
        raise ValueError(f"v has shape {tuple(v.shape)}, the scope has {num_params} parameters")
    if not bool(torch.isfinite(v).all()):
        bad = int((~torch.isfinite(v)).sum())
        raise NonFiniteInput(
            f"the right-hand side has {bad} non-finite (NaN/Inf) entries of {num_params}: the "
            "gradient itself overflowed, before any solver ran; solver settings cannot fix it "
            "(check the model's dtype and the input)")
