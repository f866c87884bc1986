"""Choosing and running the inverse-HVP solver for s_test = (H + δI)⁻¹ ∇θw (paper Eq. 5).

Request settings override the bundle's defaults (manifest "defaults"), which override the
constants below. The curvature H is averaged over a fixed, seeded sample of the training set
(`curvature_sample` examples); λ_max for relative damping/scale is estimated once per model
and curvature by power iteration on one batch of that sample, and cached.

The methods are a registry, SOLVERS: one SolverEntry per SolverChoice with its defaults
(resolve) and its constructor (build); adding a solver is one enum member and one entry.
"""

from __future__ import annotations

import enum
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from pairdots_server.core.curvature import Curvature, CurvatureOperator, estimate_lambda_max
from pairdots_server.core.exceptions import SolverDiverged as CoreDiverged
from pairdots_server.core.exceptions import SolverError
from pairdots_server.core.ihvp.base import InverseHVPSolver
from pairdots_server.core.ihvp.cg import CGSolver
from pairdots_server.core.ihvp.exact import ExactSolver
from pairdots_server.core.ihvp.lissa import LissaSolver
from pairdots_server.errors import FailedPrecondition, InvalidArgument, SolverDiverged
from pairdots_server.influence.runtime import ModelRuntime


class SolverChoice(enum.Enum):
    LISSA = "lissa"
    CG = "cg"
    LOW_RANK = "low_rank"
    EXACT = "exact"


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
    "solver": "lissa",
    "curvature": "ggn",
    "damping_ratio": 0.01,  # δ = ratio · λ_max when no absolute damping is given
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
}

_lambda_lock = threading.Lock()


def _default(rt: ModelRuntime, key: str) -> Any:
    return rt.defaults.get(key, DEFAULTS[key])


def resolve_solver(rt: ModelRuntime, s: SolverSettings) -> SolverSettings:
    """The request's settings with every unset field filled: the method (the request's, else
    low-rank when the bundle has factors, else the bundle's default), then the method's own
    defaults (SOLVERS[method].resolve). Idempotent; never raises (build_solver does)."""
    if s.method is not None:
        method = s.method
    elif rt.has_lowrank:
        method = SolverChoice.LOW_RANK
    else:
        method = SolverChoice(_default(rt, "solver"))
    return SOLVERS[method].resolve(rt, replace(s, method=method))


def resolve_method(rt: ModelRuntime, s: SolverSettings) -> SolverChoice:
    method = resolve_solver(rt, s).method
    assert method is not None
    if method is SolverChoice.LOW_RANK and not rt.has_lowrank:
        raise FailedPrecondition(
            f"model {rt.name!r} has no precomputed low-rank curvature; choose SOLVER_LISSA or "
            "SOLVER_CONJUGATE_GRADIENT, or rebuild the bundle with `pairdots prepare --low-rank`"
        )
    return method


def _operator(rt: ModelRuntime, curvature: Curvature, seed: int) -> CurvatureOperator:
    sample = rt.curvature_sample(
        int(_default(rt, "curvature_sample")), int(_default(rt, "curvature_batch_size")), seed
    )
    return CurvatureOperator(rt.task.logits_fn, rt.params, sample, curvature=curvature)


def lambda_max(rt: ModelRuntime, op: CurvatureOperator, seed: int) -> float:
    """|λ|_max of the curvature on one batch of the sample, cached per model+curvature+seed
    (in rt.lambda_max, beside the curvature sample it is measured on)."""
    key = (op.curvature, seed)
    cached = rt.lambda_max.get(key)
    if cached is not None:
        return cached
    with _lambda_lock:
        batch = next(iter(op.batches.full()))
        lam = abs(estimate_lambda_max(op, int(_default(rt, "power_iters")), seed, batch=batch))
    rt.lambda_max[key] = lam
    return lam


# -- the registry: one entry per SolverChoice -------------------------------------------------


@dataclass(frozen=True)
class SolverEntry:
    """How one method fills its defaults (resolve: request settings -> settings with no None
    the method uses) and builds its solver from resolved settings (build)."""

    resolve: Callable[[ModelRuntime, SolverSettings], SolverSettings]
    build: Callable[[ModelRuntime, SolverSettings], InverseHVPSolver]


def _curvature_defaults(rt: ModelRuntime, s: SolverSettings, **extra: Any) -> SolverSettings:
    """curvature and seed (every method that runs on the curvature operator), plus `extra`."""
    return replace(
        s,
        curvature=s.curvature or Curvature(str(_default(rt, "curvature"))),
        seed=int(s.seed if s.seed is not None else _default(rt, "seed")),
        **extra,
    )


def _op_damping(rt: ModelRuntime, s: SolverSettings) -> tuple[CurvatureOperator, float]:
    """The curvature operator of resolved settings and δ (absolute, else ratio · λ_max)."""
    assert s.curvature is not None and s.seed is not None
    op = _operator(rt, s.curvature, s.seed)
    if s.damping is not None:
        return op, s.damping
    return op, float(_default(rt, "damping_ratio")) * lambda_max(rt, op, s.seed)


def _resolve_lissa(rt: ModelRuntime, s: SolverSettings) -> SolverSettings:
    return _curvature_defaults(
        rt, s,
        max_iterations=s.max_iterations or int(_default(rt, "lissa_depth")),
        repeats=s.repeats or int(_default(rt, "lissa_repeats")),
        batch_size=s.batch_size or int(_default(rt, "lissa_batch_size")),
        tolerance=s.tolerance or float(_default(rt, "lissa_tol")),
    )


def _build_lissa(rt: ModelRuntime, s: SolverSettings) -> InverseHVPSolver:
    op, damping = _op_damping(rt, s)
    assert s.max_iterations and s.repeats and s.batch_size and s.tolerance and s.seed is not None
    return LissaSolver(
        op, damping=damping, scale=s.scale, depth=s.max_iterations, repeats=s.repeats,
        batch_size=s.batch_size, tol=s.tolerance, seed=s.seed,
        lambda_max=None if s.scale is not None else lambda_max(rt, op, s.seed),
    )


def _resolve_cg(rt: ModelRuntime, s: SolverSettings) -> SolverSettings:
    return _curvature_defaults(
        rt, s,
        max_iterations=s.max_iterations or int(_default(rt, "cg_max_iter")),
        tolerance=s.tolerance or float(_default(rt, "cg_tol")),
    )


def _build_cg(rt: ModelRuntime, s: SolverSettings) -> InverseHVPSolver:
    op, damping = _op_damping(rt, s)
    assert s.max_iterations and s.tolerance
    return CGSolver(op, damping=damping, max_iter=s.max_iterations, tol=s.tolerance)


def _build_exact(rt: ModelRuntime, s: SolverSettings) -> InverseHVPSolver:
    op, damping = _op_damping(rt, s)
    return ExactSolver(op, damping=damping)


def _resolve_lowrank(rt: ModelRuntime, s: SolverSettings) -> SolverSettings:
    # the factors are GGN eigenpairs: the request's curvature does not apply
    return replace(s, curvature=Curvature.GGN)


def _build_lowrank(rt: ModelRuntime, s: SolverSettings) -> InverseHVPSolver:
    from pairdots_server.core.ihvp.lowrank import LowRankSolver

    factors = rt.lowrank()
    damping = s.damping if s.damping is not None else float(
        rt.defaults.get("lowrank_damping", 0.0)
    ) or DEFAULTS["damping_ratio"] * float(factors.eigvals.max())
    return LowRankSolver(factors, damping)


SOLVERS: dict[SolverChoice, SolverEntry] = {
    SolverChoice.LISSA: SolverEntry(_resolve_lissa, _build_lissa),
    SolverChoice.CG: SolverEntry(_resolve_cg, _build_cg),
    SolverChoice.EXACT: SolverEntry(_curvature_defaults, _build_exact),
    SolverChoice.LOW_RANK: SolverEntry(_resolve_lowrank, _build_lowrank),
}


def build_solver(rt: ModelRuntime, s: SolverSettings) -> InverseHVPSolver:
    method = resolve_method(rt, s)
    return SOLVERS[method].build(rt, resolve_solver(rt, s))


def solve_s_test(
    rt: ModelRuntime,
    grad_w: Tensor,
    settings: SolverSettings,
    should_stop: Callable[[], None],
) -> tuple[Tensor, dict[str, Any]]:
    """s_test = (H + δI)⁻¹ ∇θw with diagnostics ("cached": False; pipeline.s_test caches)."""
    method = resolve_method(rt, settings)
    resolved = resolve_solver(rt, settings)
    try:
        solver = SOLVERS[method].build(rt, resolved)
        result = solver.solve(grad_w, should_stop=should_stop)
    except CoreDiverged as exc:
        raise SolverDiverged(
            f"{exc}. Use CURVATURE_GAUSS_NEWTON, more damping or a larger scale"
        ) from exc
    except SolverError as exc:
        raise InvalidArgument.for_field("influence.solver", str(exc)) from exc
    d = result.diagnostics
    if not math.isfinite(d.norm):
        raise SolverDiverged("the solve produced a non-finite s_test; raise the damping")
    assert resolved.curvature is not None
    diag: dict[str, Any] = {
        "method": method.value,
        "curvature": resolved.curvature.value,
        "iterations": d.iterations,
        "rel_change": d.rel_change,
        "norm": d.norm,
        "effective_damping": d.effective_damping,
        "converged": d.converged,
        "seconds": d.seconds,
        "cached": False,
    }
    return result.x.detach(), diag


def fit_lowrank_factors(
    rt: ModelRuntime, rank: int, seed: int = 0, should_stop: Callable[[], None] | None = None
) -> dict[str, torch.Tensor]:
    """Top-`rank` GGN eigenpairs on the curvature sample, as tensors for the bundle."""
    from pairdots_server.core.ihvp.lowrank import fit_lowrank

    op = _operator(rt, Curvature.GGN, seed)
    factors = fit_lowrank(op, rank, seed=seed, should_stop=should_stop)
    return factors.to_tensors()
