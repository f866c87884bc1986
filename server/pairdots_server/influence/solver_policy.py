"""Choosing and running the inverse-HVP solver for s_test = (H + δI)⁻¹ ∇θw (paper Eq. 5).

Request settings override the bundle's defaults (manifest "defaults"), which override the
constants below. The curvature H is averaged over a fixed, seeded sample of the training set
(`curvature_sample` examples); λ_max for relative damping/scale is estimated once per model
and curvature by power iteration on one batch of that sample, and cached.

The methods are a registry, SOLVERS: one SolverEntry per SolverChoice with its defaults
(resolve), its constructor (build), the bundle artifact it needs (available + the command that
adds it) and its damping rule as reported in the diagnostics; adding a solver is one enum member
and one entry.

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
from pairdots_server.core.exceptions import NonFiniteInput, SolverError
from pairdots_server.core.exceptions import SolverDiverged as CoreDiverged
from pairdots_server.core.ihvp.base import InverseHVPSolver
from pairdots_server.core.ihvp.cg import CGSolver
from pairdots_server.core.ihvp.exact import ExactSolver
from pairdots_server.core.ihvp.kfac import HEURISTIC_DAMPING_SCALE
from pairdots_server.core.ihvp.lissa import LissaSolver
from pairdots_server.errors import FailedPrecondition, InvalidArgument, SolverDiverged
from pairdots_server.influence.runtime import ModelRuntime


class SolverChoice(enum.Enum):
    LISSA = "lissa"
    CG = "cg"
    LOW_RANK = "low_rank"
    EXACT = "exact"
    EKFAC = "ekfac"
    DIAGONAL = "diagonal"
    IDENTITY = "identity"


# The default method of a request that names none: the first of these the bundle can run
# (low-rank needs lowrank.safetensors, EK-FAC ekfac.safetensors, ...). A bundle's manifest
# "defaults": {"solver": "<value>"} takes precedence when the bundle has its artifact. This
# tuple is the one place the server-wide default lives.
DEFAULT_METHOD_ORDER: tuple[SolverChoice, ...] = (SolverChoice.LOW_RANK, SolverChoice.LISSA)


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

_lambda_lock = threading.Lock()


def _default(rt: ModelRuntime, key: str) -> Any:
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
    the method uses, damping None = the method's rule), builds its solver from resolved
    settings (build), whether a bundle can run it (available: None = always) with the artifact
    and the command that adds it (missing, formatted with {path}), and the damping rule the
    diagnostics report when the solver itself states none (damping_rule)."""

    resolve: Callable[[ModelRuntime, SolverSettings], SolverSettings]
    build: Callable[[ModelRuntime, SolverSettings], InverseHVPSolver]
    available: Callable[[ModelRuntime], bool] | None = None
    missing: str = ""
    damping_rule: Callable[[ModelRuntime, SolverSettings], str] | None = None


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
    manifest_damping = float(rt.defaults.get("lowrank_damping", 0.0) or 0.0)
    if s.damping is not None:
        damping, rule = s.damping, "absolute"
    elif manifest_damping > 0:
        damping, rule = manifest_damping, "absolute (bundle default lowrank_damping)"
    else:
        ratio = float(DEFAULTS["damping_ratio"])
        damping = ratio * float(factors.eigvals.max())
        rule = f"relative: {ratio:g} × λ_1 (largest stored eigenvalue)"
    return LowRankSolver(factors, damping, damping_rule=rule)


def _op_damping_rule(rt: ModelRuntime, s: SolverSettings) -> str:
    if s.damping is not None:
        return "absolute"
    return f"relative: {float(_default(rt, 'damping_ratio')):g} × λ_max (power iteration)"


def _resolve_fixed(rt: ModelRuntime, s: SolverSettings, prefix: str) -> SolverSettings:
    """EK-FAC / diagonal: factors fitted on the whole training set (a Fisher ≈ the GGN); the
    damping stays None (the heuristic) unless the request or the manifest gives one."""
    damping = s.damping
    if damping is None and rt.defaults.get(f"{prefix}_damping") is not None:
        damping = float(rt.defaults[f"{prefix}_damping"])
    return replace(
        s, curvature=Curvature.GGN, damping=damping,
        seed=int(s.seed if s.seed is not None else _default(rt, "seed")),
    )


def _resolve_ekfac(rt: ModelRuntime, s: SolverSettings) -> SolverSettings:
    return _resolve_fixed(rt, s, "ekfac")


def _build_ekfac(rt: ModelRuntime, s: SolverSettings) -> InverseHVPSolver:
    from pairdots_server.core.ihvp.kfac import EKFACSolver

    return EKFACSolver(
        rt.ekfac(), s.damping,
        heuristic_scale=float(_default(rt, "ekfac_damping_scale")),
    )


def _resolve_diagonal(rt: ModelRuntime, s: SolverSettings) -> SolverSettings:
    return _resolve_fixed(rt, s, "diagonal")


def _build_diagonal(rt: ModelRuntime, s: SolverSettings) -> InverseHVPSolver:
    from pairdots_server.core.ihvp.diagonal import DiagonalSolver

    return DiagonalSolver(
        rt.diagonal(), s.damping,
        heuristic_scale=float(_default(rt, "diagonal_damping_scale")),
    )


def _resolve_identity(rt: ModelRuntime, s: SolverSettings) -> SolverSettings:
    # no curvature at all: reported as GGN (the proto's default) so diagnostics stay total
    damping = s.damping if s.damping is not None else float(_default(rt, "identity_damping"))
    return replace(s, curvature=Curvature.GGN, damping=damping)


def _build_identity(rt: ModelRuntime, s: SolverSettings) -> InverseHVPSolver:
    from pairdots_server.core.ihvp.identity import IdentitySolver

    assert s.damping is not None
    return IdentitySolver(s.damping, num_params=rt.num_params)


def _identity_rule(rt: ModelRuntime, s: SolverSettings) -> str:
    return f"absolute: x = v / {s.damping:g} (H taken as 0; 1 = the plain gradient dot product)"


SOLVERS: dict[SolverChoice, SolverEntry] = {
    SolverChoice.LISSA: SolverEntry(_resolve_lissa, _build_lissa,
                                    damping_rule=_op_damping_rule),
    SolverChoice.CG: SolverEntry(_resolve_cg, _build_cg, damping_rule=_op_damping_rule),
    SolverChoice.EXACT: SolverEntry(_curvature_defaults, _build_exact,
                                    damping_rule=_op_damping_rule),
    SolverChoice.LOW_RANK: SolverEntry(
        _resolve_lowrank, _build_lowrank,
        available=lambda rt: rt.has_lowrank,
        missing="precomputed low-rank curvature (lowrank.safetensors); rebuild the bundle with "
                "`pairdots prepare --low-rank 24`",
    ),
    SolverChoice.EKFAC: SolverEntry(
        _resolve_ekfac, _build_ekfac,
        available=lambda rt: rt.has_ekfac,
        missing="EK-FAC factors (ekfac.safetensors); add them with "
                "`pairdots curvature fit --bundle {path} --kind ekfac`",
    ),
    SolverChoice.DIAGONAL: SolverEntry(
        _resolve_diagonal, _build_diagonal,
        available=lambda rt: rt.has_diagonal,
        missing="diagonal Fisher factors (diagonal.safetensors); add them with "
                "`pairdots curvature fit --bundle {path} --kind diagonal`",
    ),
    SolverChoice.IDENTITY: SolverEntry(_resolve_identity, _build_identity,
                                       damping_rule=_identity_rule),
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


def fit_lowrank_factors(
    rt: ModelRuntime, rank: int, seed: int = 0, should_stop: Callable[[], None] | None = None
) -> dict[str, torch.Tensor]:
    """Top-`rank` GGN eigenpairs on the curvature sample, as tensors for the bundle."""
    from pairdots_server.core.ihvp.lowrank import fit_lowrank

    op = _operator(rt, Curvature.GGN, seed)
    factors = fit_lowrank(op, rank, seed=seed, should_stop=should_stop)
    return factors.to_tensors()
