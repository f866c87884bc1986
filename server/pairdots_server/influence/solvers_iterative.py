"""The iterative solvers' registry entries (LiSSA, CG, exact): they run on the curvature
operator over the bundle's seeded curvature sample, with δ relative to λ_max unless given.
Also the low-rank fit, which runs on the same operator.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from pairdots_server.core.curvature import Curvature, CurvatureOperator, estimate_lambda_max
from pairdots_server.core.ihvp.base import InverseHVPSolver
from pairdots_server.core.ihvp.cg import CGSolver
from pairdots_server.core.ihvp.exact import ExactSolver
from pairdots_server.core.ihvp.lissa import LissaSolver
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.solver_config import (
    SolverChoice,
    SolverEntry,
    SolverSettings,
    setting,
)

_LAMBDA_LOCK = threading.Lock()


def curvature_operator(rt: ModelRuntime, curvature: Curvature, seed: int) -> CurvatureOperator:
    sample = rt.curvature_sample(
        int(setting(rt, "curvature_sample")), int(setting(rt, "curvature_batch_size")), seed
    )
    return CurvatureOperator(rt.task.logits_fn, rt.params, sample, curvature=curvature)


def lambda_max(rt: ModelRuntime, op: CurvatureOperator, seed: int) -> float:
    """|λ|_max of the curvature on one batch of the sample, cached per model+curvature+seed
    (in rt.lambda_max, beside the curvature sample it is measured on)."""
    key = (op.curvature, seed)
    cached = rt.lambda_max.get(key)
    if cached is not None:
        return cached
    with _LAMBDA_LOCK:
        batch = next(iter(op.batches.full()))
        lam = abs(estimate_lambda_max(op, int(setting(rt, "power_iters")), seed, batch=batch))
    rt.lambda_max[key] = lam
    return lam


def curvature_defaults(rt: ModelRuntime, s: SolverSettings, **extra: Any) -> SolverSettings:
    """curvature and seed (every method that runs on the curvature operator), plus `extra`."""
    return replace(
        s,
        curvature=s.curvature or Curvature(str(setting(rt, "curvature"))),
        seed=int(s.seed if s.seed is not None else setting(rt, "seed")),
        **extra,
    )


def op_damping(rt: ModelRuntime, s: SolverSettings) -> tuple[CurvatureOperator, float]:
    """The curvature operator of resolved settings and δ (absolute, else ratio · λ_max)."""
    assert s.curvature is not None and s.seed is not None
    op = curvature_operator(rt, s.curvature, s.seed)
    if s.damping is not None:
        return op, s.damping
    return op, float(setting(rt, "damping_ratio")) * lambda_max(rt, op, s.seed)


def _resolve_lissa(rt: ModelRuntime, s: SolverSettings) -> SolverSettings:
    return curvature_defaults(
        rt, s,
        max_iterations=s.max_iterations or int(setting(rt, "lissa_depth")),
        repeats=s.repeats or int(setting(rt, "lissa_repeats")),
        batch_size=s.batch_size or int(setting(rt, "lissa_batch_size")),
        tolerance=s.tolerance or float(setting(rt, "lissa_tol")),
    )


def _build_lissa(rt: ModelRuntime, s: SolverSettings) -> InverseHVPSolver:
    op, damping = op_damping(rt, s)
    assert s.max_iterations and s.repeats and s.batch_size and s.tolerance and s.seed is not None
    return LissaSolver(
        op, damping=damping, scale=s.scale, depth=s.max_iterations, repeats=s.repeats,
        batch_size=s.batch_size, tol=s.tolerance, seed=s.seed,
        lambda_max=None if s.scale is not None else lambda_max(rt, op, s.seed),
    )


def _resolve_cg(rt: ModelRuntime, s: SolverSettings) -> SolverSettings:
    return curvature_defaults(
        rt, s,
        max_iterations=s.max_iterations or int(setting(rt, "cg_max_iter")),
        tolerance=s.tolerance or float(setting(rt, "cg_tol")),
    )


def _build_cg(rt: ModelRuntime, s: SolverSettings) -> InverseHVPSolver:
    op, damping = op_damping(rt, s)
    assert s.max_iterations and s.tolerance
    return CGSolver(op, damping=damping, max_iter=s.max_iterations, tol=s.tolerance)


def _build_exact(rt: ModelRuntime, s: SolverSettings) -> InverseHVPSolver:
    op, damping = op_damping(rt, s)
    return ExactSolver(op, damping=damping)


def op_damping_rule(rt: ModelRuntime, s: SolverSettings) -> str:
    if s.damping is not None:
        return "absolute"
    return f"relative: {float(setting(rt, 'damping_ratio')):g} × λ_max (power iteration)"



ITERATIVE: dict[SolverChoice, SolverEntry] = {
    SolverChoice.LISSA: SolverEntry(_resolve_lissa, _build_lissa,
                                    damping_rule=op_damping_rule),
    SolverChoice.CG: SolverEntry(_resolve_cg, _build_cg, damping_rule=op_damping_rule),
    SolverChoice.EXACT: SolverEntry(curvature_defaults, _build_exact,
                                    damping_rule=op_damping_rule),
}


def fit_lowrank_factors(
    rt: ModelRuntime, rank: int, seed: int = 0, should_stop: Callable[[], None] | None = None
) -> dict[str, torch.Tensor]:
    """Top-`rank` GGN eigenpairs on the curvature sample, as tensors for the bundle."""
    from pairdots_server.core.ihvp.lowrank import fit_lowrank

    op = curvature_operator(rt, Curvature.GGN, seed)
    factors = fit_lowrank(op, rank, seed=seed, should_stop=should_stop)
    return factors.to_tensors()
