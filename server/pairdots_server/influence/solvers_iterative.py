"""The iterative solvers' registry entries (LiSSA, CG, exact): they run on the curvature
operator over the bundle's seeded curvature sample, with δ relative to λ_max unless given.
Also the low-rank fit, which runs on the same operator.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from pairdots_server.core.curvature import Curvature, CurvatureOperator, estimate_lambda_max
from pairdots_server.core.ihvp.base import InverseHVPSolver
from pairdots_server.core.ihvp.cg import CGSolver
from pairdots_server.core.ihvp.exact import ExactSolver
from pairdots_server.core.ihvp.lissa import LissaSolver, estimate_preconditioned_lambda_max
from pairdots_server.core.ihvp.lowrank import LowRankFactors
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
    return CurvatureOperator(sample.logits_fn, rt.params, sample, curvature=curvature)


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


#: The preconditioners LiSSA can use, by name (each needs its bundle artifact).
LISSA_PRECONDITIONERS = ("low_rank", "ekfac", "diagonal")
#: What "auto" picks, in order, among those the bundle has (docs/DESIGN.md §2: measured on
#: minilm-sst2 by bench/lissa_convergence.py).
LISSA_AUTO: tuple[str, ...] = ("low_rank",)


def lissa_preconditioner(rt: ModelRuntime, name: str, damping: float) -> InverseHVPSolver | None:
    """M⁻¹ for LiSSA's preconditioned recursion, M ≈ H + δI from the bundle's fitted curvature
    with LiSSA's own δ: "low_rank" M = U diag(λ) Uᵀ + δI (the top-k GGN eigenpairs),
    "diagonal" M = diag(d) + δI (diagonal Fisher), "ekfac" M = EK-FAC + δI; "none": M = I."""
    if name == "none":
        return None
    if name == "low_rank":
        from pairdots_server.core.ihvp.lowrank import LowRankSolver

        return LowRankSolver(rt.lowrank(), damping)
    if name == "diagonal":
        from pairdots_server.core.ihvp.diagonal import DiagonalSolver

        return DiagonalSolver(rt.diagonal(), damping)
    if name == "ekfac":
        from pairdots_server.core.ihvp.kfac import EKFACSolver

        return EKFACSolver(rt.ekfac(), damping)
    raise ValueError(f"unknown LiSSA preconditioner {name!r}; use none, {LISSA_PRECONDITIONERS}")


def lissa_preconditioner_name(rt: ModelRuntime) -> str:
    """The preconditioner LiSSA runs with on this bundle: the manifest/DEFAULTS
    "lissa_preconditioner"; "auto" = the first of LISSA_AUTO the bundle has, else "none"."""
    name = str(setting(rt, "lissa_preconditioner"))
    if name != "auto":
        return name
    available = {"low_rank": rt.has_lowrank, "ekfac": rt.has_ekfac, "diagonal": rt.has_diagonal}
    return next((n for n in LISSA_AUTO if available[n]), "none")


def _sample_size(rt: ModelRuntime) -> int:
    """Examples in the curvature sample (TrainingSample holds min(curvature_sample, N))."""
    return min(int(setting(rt, "curvature_sample")), rt.n_train)


def _lissa_preconditioned(rt: ModelRuntime, batch_size: int | None) -> bool:
    """Whether LiSSA runs preconditioned: the bundle has the preconditioner and the curvature
    is the whole sample (no batch size asked, or one ≥ the sample). On minibatches M⁻¹
    amplifies the minibatch noise of H_j (measured: docs/DESIGN.md §2), so an explicit
    minibatch runs the paper's plain recursion."""
    if lissa_preconditioner_name(rt) == "none":
        return False
    return batch_size is None or batch_size >= _sample_size(rt)


def _resolve_lissa(rt: ModelRuntime, s: SolverSettings) -> SolverSettings:
    """Defaults: preconditioned, the whole curvature sample (batch size = its size), depth and
    tol "lissa_preconditioned_*"; else the paper's "lissa_depth/batch_size/tol"."""
    if _lissa_preconditioned(rt, s.batch_size):
        pre = "lissa_preconditioned_"
        batch = _sample_size(rt)
    else:
        pre = "lissa_"
        batch = int(setting(rt, "lissa_batch_size"))
    return curvature_defaults(
        rt, s,
        max_iterations=s.max_iterations or int(setting(rt, f"{pre}depth")),
        repeats=s.repeats or int(setting(rt, "lissa_repeats")),
        batch_size=s.batch_size or batch,
        tolerance=s.tolerance or float(setting(rt, f"{pre}tol")),
    )


_MU_CACHE: weakref.WeakKeyDictionary[ModelRuntime, dict[tuple[Any, ...], float]] = (
    weakref.WeakKeyDictionary()
)


def lowrank_mu_max(factors: LowRankFactors, damping: float) -> float:
    """μ̃_max of M⁻¹(H + δI) for M = U diag(λ) Uᵀ + δI with the top-k eigenpairs of H: 1 on
    span(U), (μ + δ)/δ ≤ 1 + λ_{k+1}/δ off it. λ_{k+1}: the stored next Ritz value, else the
    smallest stored eigenvalue λ_k (≥ λ_{k+1}). No power iteration (it would cost 20 products
    on the flat deflated spectrum, where it also converges slowly)."""
    tail = factors.next_eigval
    if tail is None:
        tail = float(factors.eigvals.min()) if factors.rank else 0.0
    return 1.0 + max(float(tail), 0.0) / damping


def preconditioned_mu_max(
    rt: ModelRuntime, op: CurvatureOperator, name: str, m_inv: InverseHVPSolver, damping: float,
    seed: int,
) -> float:
    """μ̃_max of M⁻¹(H + δI) on one batch of the sample (power iteration), cached per model,
    curvature, seed, preconditioner and δ (the scale s = μ̃_max of the preconditioned LiSSA)."""
    key = (op.curvature, seed, name, damping)
    cache = _MU_CACHE.setdefault(rt, {})
    if key not in cache:
        with _LAMBDA_LOCK:
            batch = next(iter(op.batches.full()))
            cache[key] = estimate_preconditioned_lambda_max(
                op, m_inv, damping, int(setting(rt, "power_iters")), seed, batch=batch)
    return cache[key]


def _build_lissa(rt: ModelRuntime, s: SolverSettings) -> InverseHVPSolver:
    op, damping = op_damping(rt, s)
    assert s.max_iterations and s.repeats and s.batch_size and s.tolerance and s.seed is not None
    full = s.batch_size >= _sample_size(rt)  # the whole sample: H_j = H, deterministic
    name = lissa_preconditioner_name(rt) if _lissa_preconditioned(rt, s.batch_size) else "none"
    m_inv = lissa_preconditioner(rt, name, damping)
    mu = None
    if name == "low_rank" and s.scale is None:
        mu = lowrank_mu_max(rt.lowrank(), damping)
    elif m_inv is not None and s.scale is None:
        mu = preconditioned_mu_max(rt, op, name, m_inv, damping, s.seed)
    return LissaSolver(
        op, damping=damping, scale=s.scale, depth=s.max_iterations, repeats=s.repeats,
        batch_size=None if full else s.batch_size, tol=s.tolerance, seed=s.seed,
        check_every=1 if full else 10,
        lambda_max=None if s.scale is not None else lambda_max(rt, op, s.seed),
        preconditioner=m_inv, preconditioner_name=name, mu_max=mu,
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
