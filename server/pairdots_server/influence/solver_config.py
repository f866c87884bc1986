"""The solver registry's vocabulary: methods (SolverChoice), per-request settings
(SolverSettings), the fallback defaults and how a bundle overrides them (setting), and the
shape of one registry entry (SolverEntry). solver_policy.py assembles the registry from
solvers_iterative.py and solvers_fixed.py and chooses among its entries.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pairdots_server.core.curvature import Curvature
from pairdots_server.core.ihvp.base import InverseHVPSolver
from pairdots_server.core.ihvp.kfac import HEURISTIC_DAMPING_SCALE
from pairdots_server.influence.runtime import ModelRuntime


class SolverChoice(enum.Enum):
    LISSA = "lissa"
    CG = "cg"
    LOW_RANK = "low_rank"
    EXACT = "exact"
    EKFAC = "ekfac"
    DIAGONAL = "diagonal"
    IDENTITY = "identity"


@dataclass(frozen=True)
class SolverSettings:
    """Per-request solver settings; None = the bundle's default (then the constants here)."""

    method: SolverChoice | None = None
    curvature: Curvature | None = None
    damping: float | None = None
    scale: float | None = None
    max_iterations: int | None = None
    repeats: int | None = None
    batch_size: int | None = None
    tolerance: float | None = None
    seed: int | None = None


# Fallback defaults (docs/DESIGN.md §2: GGN, damping relative to λ_max, stop on a tolerance).
DEFAULTS: dict[str, Any] = {
    "curvature": "ggn",
    "damping_ratio": 0.01,  # δ = ratio · λ_max when no absolute damping is given
    # LiSSA preconditioned by the bundle's fitted curvature ("auto": low-rank when the bundle
    # has it; "none", "low_rank", "ekfac", "diagonal") on the whole curvature sample, stopping
    # at 1 % (docs/DESIGN.md §2, bench/lissa_convergence.py)
    "lissa_preconditioner": "auto",
    "lissa_preconditioned_depth": 50,
    "lissa_preconditioned_tol": 0.01,
    # the paper's plain recursion (no preconditioner, or a minibatch asked): minibatches of 8
    "lissa_depth": 1000,
    "lissa_repeats": 1,
    "lissa_batch_size": 8,
    "lissa_tol": 0.05,
    "cg_max_iter": 50,
    "cg_tol": 1e-3,
    "curvature_sample": 256,
    "curvature_batch_size": 16,
    "power_iters": 20,
    "seed": 0,
    "identity_damping": 1.0,
    "ekfac_damping_scale": HEURISTIC_DAMPING_SCALE,
    "diagonal_damping_scale": HEURISTIC_DAMPING_SCALE,
}


def setting(rt: ModelRuntime, key: str) -> Any:
    """The bundle's manifest "defaults" value for `key`, else DEFAULTS[key]."""
    return rt.defaults.get(key, DEFAULTS[key])


def parse_method(value: Any) -> SolverChoice | None:
    """A SolverChoice from a manifest value ("ekfac", "low_rank", "lowrank", "EKFAC", ...);
    None when it names no method."""
    if isinstance(value, SolverChoice):
        return value
    if not isinstance(value, str):
        return None
    key = value.strip().lower().replace("-", "_")
    key = {"lowrank": "low_rank", "ek_fac": "ekfac", "diag": "diagonal"}.get(key, key)
    try:
        return SolverChoice(key)
    except ValueError:
        return None


# Solvers whose curvature is fixed at fit time (they take neither CURVATURE_HESSIAN nor the
# iterative options).
PRECOMPUTED = (SolverChoice.LOW_RANK, SolverChoice.EKFAC, SolverChoice.DIAGONAL,
               SolverChoice.IDENTITY)


def wants_iterative(s: SolverSettings) -> bool:
    """Whether the settings ask for what only an iterative solver does: the Hessian curvature
    or LiSSA/CG options (scale, iterations, repeats, batch size, tolerance, seed)."""
    return s.curvature is Curvature.HESSIAN or any(
        x is not None
        for x in (s.scale, s.max_iterations, s.repeats, s.batch_size, s.tolerance, s.seed)
    )


@dataclass(frozen=True)
class SolverEntry:
    """How one method fills its defaults (resolve: request settings -> settings with no None
    the method uses, damping None = the method's rule), builds its solver from resolved
    settings (build), whether a bundle can run it (available: None = always) with the artifact
    and the command that adds it (missing, formatted with {path}), and the damping rule the
    diagnostics report when the solver itself states none (damping_rule)."""

    resolve: Callable[[ModelRuntime, SolverSettings], SolverSettings]
    build: Callable[[ModelRuntime, SolverSettings], InverseHVPSolver]
    available: Callable[[ModelRuntime], bool] | None = None
    missing: str = ""
    damping_rule: Callable[[ModelRuntime, SolverSettings], str] | None = None
