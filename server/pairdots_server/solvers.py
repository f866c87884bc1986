"""Choosing and running the inverse-HVP solver for s_test = (H + δI)⁻¹ ∇θw (paper Eq. 5).

Request settings override the bundle's defaults (manifest "defaults"), which override the
constants below. The curvature H is averaged over a fixed, seeded sample of the training set
(`curvature_sample` examples); λ_max for relative damping/scale is estimated once per model
and curvature by power iteration on one batch of that sample, and cached.
"""

from __future__ import annotations

import enum
import math
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pairdots_server.core.curvature import Curvature, CurvatureOperator, estimate_lambda_max
from pairdots_server.core.exceptions import NonFiniteInput, SolverError
from pairdots_server.core.exceptions import SolverDiverged as CoreDiverged
from pairdots_server.core.ihvp.base import InverseHVPSolver
from pairdots_server.core.ihvp.cg import CGSolver
from pairdots_server.core.ihvp.exact import ExactSolver
from pairdots_server.core.ihvp.lissa import LissaSolver
from pairdots_server.errors import FailedPrecondition, InvalidArgument, SolverDiverged
from pairdots_server.runtime import ModelRuntime


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


# Fallback defaults (DESIGN §2: GGN, damping relative to λ_max, stop on a tolerance).
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


def resolve_method(rt: ModelRuntime, s: SolverSettings) -> SolverChoice:
    # the low-rank default is skipped when the settings ask for what it cannot do: Hessian
    # curvature or iterative-solver options (they would be ignored silently)
    iterative = s.curvature is Curvature.HESSIAN or any(
        x is not None for x in (s.scale, s.max_iterations, s.repeats, s.batch_size, s.tolerance,
                                s.seed))
    if s.method is not None:
        method = s.method
    elif rt.has_lowrank and not iterative:
        method = SolverChoice.LOW_RANK
    else:
        method = SolverChoice(_default(rt, "solver"))
    if method is SolverChoice.LOW_RANK and s.curvature is Curvature.HESSIAN:
        raise InvalidArgument.for_field(
            "influence.solver.curvature", "SOLVER_LOW_RANK uses the precomputed Gauss-Newton "
            "factors; for CURVATURE_HESSIAN choose SOLVER_LISSA, SOLVER_CONJUGATE_GRADIENT or "
            "SOLVER_EXACT")
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
    """|λ|_max of the curvature on one batch of the sample, cached per model+curvature."""
    key = ("lambda_max", op.curvature, seed)
    cached = rt.s_test_cache.get(key)
    if cached is not None:
        return float(cached)
    with _lambda_lock:
        batch = next(iter(op.batches.full()))
        lam = abs(estimate_lambda_max(op, int(_default(rt, "power_iters")), seed, batch=batch))
    rt.s_test_cache.put(key, lam)
    return lam


def build_solver(rt: ModelRuntime, s: SolverSettings) -> InverseHVPSolver:
    method = resolve_method(rt, s)
    seed = int(s.seed if s.seed is not None else _default(rt, "seed"))
    if method is SolverChoice.LOW_RANK:
        from pairdots_server.core.ihvp.lowrank import LowRankSolver

        factors = rt.lowrank()
        damping = s.damping if s.damping is not None else float(
            rt.defaults.get("lowrank_damping", 0.0)
        ) or DEFAULTS["damping_ratio"] * float(factors.eigvals.max())
        return LowRankSolver(factors, damping)
    curvature = s.curvature or Curvature(str(_default(rt, "curvature")))
    op = _operator(rt, curvature, seed)
    if s.damping is not None:
        damping = s.damping
    else:
        damping = float(_default(rt, "damping_ratio")) * lambda_max(rt, op, seed)
    if method is SolverChoice.EXACT:
        return ExactSolver(op, damping=damping)
    if method is SolverChoice.CG:
        return CGSolver(
            op, damping=damping,
            max_iter=s.max_iterations or int(_default(rt, "cg_max_iter")),
            tol=s.tolerance or float(_default(rt, "cg_tol")),
        )
    return LissaSolver(
        op,
        damping=damping,
        scale=s.scale,
        depth=s.max_iterations or int(_default(rt, "lissa_depth")),
        repeats=s.repeats or int(_default(rt, "lissa_repeats")),
        batch_size=s.batch_size or int(_default(rt, "lissa_batch_size")),
        tol=s.tolerance or float(_default(rt, "lissa_tol")),
        seed=seed,
        lambda_max=None if s.scale is not None else lambda_max(rt, op, seed),
    )


def solve_s_test(
    rt: ModelRuntime,
    grad_w: Tensor,
    settings: SolverSettings,
    should_stop: Callable[[], None],
    *,
    cache_key: Hashable | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """s_test = (H + δI)⁻¹ ∇θw with diagnostics; identical queries come from the cache."""
    if cache_key is not None:
        hit = rt.s_test_cache.get(("s_test", cache_key))
        if hit is not None:
            x, diag = hit
            return x, {**diag, "cached": True}
    method = resolve_method(rt, settings)
    try:
        solver = build_solver(rt, settings)
        result = solver.solve(grad_w, should_stop=should_stop)
    except NonFiniteInput as exc:
        raise FailedPrecondition(
            f"model {rt.name!r}: the gradient of the word score is not finite, so there is "
            f"nothing to solve ({exc})", reason="NON_FINITE_GRADIENT",
        ) from exc
    except CoreDiverged as exc:
        raise SolverDiverged(
            f"{exc}. Use CURVATURE_GAUSS_NEWTON, more damping or a larger scale"
        ) from exc
    except SolverError as exc:
        raise InvalidArgument.for_field("influence.solver", str(exc)) from exc
    d = result.diagnostics
    if not math.isfinite(d.norm):
        raise SolverDiverged("the solve produced a non-finite s_test; raise the damping")
    curvature = settings.curvature or Curvature(str(_default(rt, "curvature")))
    diag: dict[str, Any] = {
        "method": method.value,
        "curvature": "ggn" if method is SolverChoice.LOW_RANK else curvature.value,
        "iterations": d.iterations,
        "rel_change": d.rel_change,
        "norm": d.norm,
        "effective_damping": d.effective_damping,
        "converged": d.converged,
        "seconds": d.seconds,
        "cached": False,
    }
    x = result.x.detach()
    if cache_key is not None:
        rt.s_test_cache.put(("s_test", cache_key), (x, diag))
    return x, diag


def fit_lowrank_factors(
    rt: ModelRuntime, rank: int, seed: int = 0, should_stop: Callable[[], None] | None = None
) -> dict[str, torch.Tensor]:
    """Top-`rank` GGN eigenpairs on the curvature sample, as tensors for the bundle."""
    from pairdots_server.core.ihvp.lowrank import fit_lowrank

    op = _operator(rt, Curvature.GGN, seed)
    factors = fit_lowrank(op, rank, seed=seed)
    return factors.to_tensors()
