"""Choosing and running the inverse-HVP solver for s_test = (H + δI)⁻¹ ∇θw (paper Eq. 5).

Request settings override the bundle's defaults (manifest "defaults"), which override the
constants below. The curvature H is averaged over a fixed, seeded sample of the training set
(`curvature_sample` examples); λ_max for relative damping/scale is estimated once per model
and curvature by power iteration on one batch of that sample, and cached.

The methods are a registry, SOLVERS: one SolverEntry per SolverChoice with its defaults
(resolve), its constructor (build), the bundle artifact it needs (available + the command that
adds it) and its damping rule as reported in the diagnostics; adding a solver is one enum member
and one entry. The vocabulary (SolverChoice, SolverSettings, DEFAULTS, SolverEntry) lives in
solver_config.py, the iterative entries (LiSSA, CG, exact) in solvers_iterative.py, the
fixed-curvature ones (low-rank, EK-FAC, diagonal, identity) in solvers_fixed.py; this module
assembles them and chooses, resolves and runs a method.

The default method (a request without one) is ``default_method``: the bundle's manifest
"defaults": {"solver": ...} when the bundle has what that method needs, else the first method
of DEFAULT_METHOD_ORDER the bundle can run. That tuple is the one place to change the default.

Default damping per method (request damping > manifest "defaults" > this rule):
  lissa, cg, exact  δ = damping_ratio (0.01) × λ_max (power iteration on the sample)
  low_rank          δ = manifest lowrank_damping, else 0.01 × λ_1 (largest stored eigenvalue)
  ekfac             kronfluence's heuristic per block: 0.1 × mean eigenvalue of the block
                    (manifest ekfac_damping: absolute; ekfac_damping_scale: the 0.1)
  diagonal          0.1 × mean(d) (manifest diagonal_damping: absolute; diagonal_damping_scale)
  identity          δ = 1: x = v, the plain gradient dot product (manifest identity_damping)

LiSSA runs preconditioned by the bundle's low-rank factors on the whole curvature sample when
the bundle has them and the request asks no smaller batch_size (solvers_iterative: manifest
"lissa_preconditioner", the "lissa_preconditioned_*" defaults); the diagnostics then carry
"preconditioner" and "scale", and the damping rule says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from torch import Tensor

from pairdots_server.core.curvature import Curvature
from pairdots_server.core.exceptions import NonFiniteInput, SolverError
from pairdots_server.core.exceptions import SolverDiverged as CoreDiverged
from pairdots_server.core.ihvp.base import InverseHVPSolver
from pairdots_server.errors import FailedPrecondition, InvalidArgument, SolverDiverged
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.solver_config import (  # noqa: F401 (re-exported)
    DEFAULTS,
    PRECOMPUTED,
    SolverChoice,
    SolverEntry,
    SolverSettings,
    parse_method,
    wants_iterative,
)
from pairdots_server.influence.solvers_fixed import FIXED
from pairdots_server.influence.solvers_iterative import (  # noqa: F401 (re-exported)
    ITERATIVE,
    fit_lowrank_factors,
    lambda_max,
)

# The default method of a request that names none: the first of these the bundle can run
# (low-rank needs lowrank.safetensors, EK-FAC ekfac.safetensors, ...). A bundle's manifest
# "defaults": {"solver": "<value>"} takes precedence when the bundle has its artifact. This
# tuple is the one place the server-wide default lives.
# Measured on minilm-sst2 (bench/semantics.py, 99 SST-2 test sentences; bench/faithfulness.py,
# LDS over 30 random halves, 20 sentences): the diagonal Fisher keeps class structure
# (prediction-level identical class 1.00, word level among examples with the word 0.96; LDS
# 0.42 / 0.57 for the margin / c_w), where the rank-24 GGN scrambles it (0.49 / 0.87; LDS
# 0.42 / 0.57) and EK-FAC with kronfluence's damping sits between (0.62 / 0.92; LDS 0.37 /
# 0.38). The identity (0.435 LDS on the margin, 1.00 identical class) is an option.
DEFAULT_METHOD_ORDER: tuple[SolverChoice, ...] = (
    SolverChoice.DIAGONAL, SolverChoice.LOW_RANK, SolverChoice.LISSA,
)


#: The registry: one entry per SolverChoice (iterative ones, then the fixed-curvature ones).
SOLVERS: dict[SolverChoice, SolverEntry] = {**ITERATIVE, **FIXED}


def is_available(rt: ModelRuntime, method: SolverChoice) -> bool:
    """Whether the bundle has what `method` needs (its precomputed artifact, if any)."""
    entry = SOLVERS[method]
    return entry.available is None or bool(entry.available(rt))


def default_method(rt: ModelRuntime) -> SolverChoice:
    """The method of a request that names none (see DEFAULT_METHOD_ORDER); also the
    Model.default_solver GetModel reports."""
    declared = parse_method(rt.defaults.get("solver"))
    if declared is not None and is_available(rt, declared):
        return declared
    for method in DEFAULT_METHOD_ORDER:
        if is_available(rt, method):
            return method
    return SolverChoice.LISSA


def resolve_solver(rt: ModelRuntime, s: SolverSettings) -> SolverSettings:
    """The request's settings with every unset field filled: the method (the request's, else
    default_method), then the method's own defaults (SOLVERS[method].resolve). Idempotent;
    never raises (build_solver does)."""
    if s.method is not None:
        method = s.method
    elif wants_iterative(s):  # a precomputed default would ignore what the request asks
        method = SolverChoice.LISSA
    else:
        method = default_method(rt)
    return SOLVERS[method].resolve(rt, replace(s, method=method))


def missing_artifact_message(rt: ModelRuntime, method: SolverChoice) -> str:
    entry = SOLVERS[method]
    fix = entry.missing.format(path=rt.bundle.path, name=rt.name)
    return (
        f"model {rt.name!r} has no {fix}; or choose another solver (SOLVER_LISSA, "
        "SOLVER_CONJUGATE_GRADIENT, SOLVER_IDENTITY need no precomputed artifact)"
    )


def resolve_method(rt: ModelRuntime, s: SolverSettings) -> SolverChoice:
    """The resolved method; FailedPrecondition naming the command that adds the artifact when
    the bundle lacks what the method needs."""
    method = resolve_solver(rt, s).method
    assert method is not None
    if method in PRECOMPUTED and s.curvature is Curvature.HESSIAN:
        raise InvalidArgument.for_field(
            "influence.solver.curvature",
            f"SOLVER_{method.name} uses curvature fixed when the bundle was prepared; for "
            "CURVATURE_HESSIAN choose SOLVER_LISSA, SOLVER_CONJUGATE_GRADIENT or SOLVER_EXACT",
        )
    if not is_available(rt, method):
        raise FailedPrecondition(missing_artifact_message(rt, method))
    return method


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
    except NonFiniteInput as exc:
        raise FailedPrecondition(
            f"model {rt.name!r}: the gradient of the measurement is not finite, so there is "
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
    diag.update(_extra_diagnostics(rt, method, resolved, solver, d))
    return result.x.detach(), diag


UNKNOWN = "unknown"


def _extra_diagnostics(
    rt: ModelRuntime, method: SolverChoice, s: SolverSettings, solver: InverseHVPSolver,
    d: Any,
) -> dict[str, Any]:
    """damping_rule for every method; fisher for the fitted factors; the low-rank tail
    (λ_{k+1}, λ_{k+1}/δ, max Ritz residual; "unknown" for factors stored without them)."""
    entry = SOLVERS[method]
    rule = getattr(d, "damping_rule", None)
    if rule is None and entry.damping_rule is not None:
        rule = entry.damping_rule(rt, s)
    out: dict[str, Any] = {"damping_rule": rule or "absolute"}
    pre = getattr(d, "preconditioner", None)
    if method is SolverChoice.LISSA and pre is not None:
        out["preconditioner"] = pre
        out["scale"] = float(d.scale)
        if pre != "none":
            out["damping_rule"] += f"; preconditioned by {pre} (M ≈ H + δI), s = {d.scale:.3g}"
    factors = getattr(solver, "factors", None)
    if method in (SolverChoice.EKFAC, SolverChoice.DIAGONAL) and factors is not None:
        out["fisher"] = factors.fisher
        out["fit_examples"] = factors.num_examples
    if method is SolverChoice.LOW_RANK:
        def known(x: float | None) -> float | str:
            return UNKNOWN if x is None else float(x)

        out["lowrank_rank"] = int(factors.rank) if factors is not None else 0
        out["lowrank_next_eigval"] = known(getattr(d, "next_eigval", None))
        out["lowrank_tail_ratio"] = known(getattr(d, "next_over_damping", None))
        out["lowrank_max_residual"] = known(getattr(d, "max_residual", None))
    return out


def solver_warnings(diag: dict[str, Any]) -> list[str]:
    """Warning texts for an answer's solver diagnostics (solve_s_test's dict): for the
    low-rank solver, λ_{k+1}/δ > 1 or a Ritz residual > 0.1 (core.ihvp.lowrank.tail_warning);
    unknown values warn nothing."""
    from pairdots_server.core.ihvp.lowrank import tail_warning

    if diag.get("method") != SolverChoice.LOW_RANK.value:
        return []

    def num(key: str) -> float | None:
        v = diag.get(key)
        return float(v) if isinstance(v, (int, float)) else None

    text = tail_warning(num("lowrank_tail_ratio"), num("lowrank_max_residual"))
    return [text] if text else []
