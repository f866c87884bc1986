"""The registry entries of the solvers whose curvature is fixed when the bundle is prepared
(low-rank eigenpairs, EK-FAC and diagonal Fisher factors: each needs its bundle artifact) and
of the identity solver (no curvature at all).
"""

from __future__ import annotations

from dataclasses import replace

from pairdots_server.core.curvature import Curvature
from pairdots_server.core.ihvp.base import InverseHVPSolver
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.solver_config import (
    DEFAULTS,
    SolverChoice,
    SolverEntry,
    SolverSettings,
    setting,
)


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


def _resolve_fixed(rt: ModelRuntime, s: SolverSettings, prefix: str) -> SolverSettings:
    """EK-FAC / diagonal: factors fitted on the whole training set (a Fisher ≈ the GGN); the
    damping stays None (the heuristic) unless the request or the manifest gives one."""
    damping = s.damping
    if damping is None and rt.defaults.get(f"{prefix}_damping") is not None:
        damping = float(rt.defaults[f"{prefix}_damping"])
    return replace(
        s, curvature=Curvature.GGN, damping=damping,
        seed=int(s.seed if s.seed is not None else setting(rt, "seed")),
    )


def _resolve_ekfac(rt: ModelRuntime, s: SolverSettings) -> SolverSettings:
    return _resolve_fixed(rt, s, "ekfac")


def _build_ekfac(rt: ModelRuntime, s: SolverSettings) -> InverseHVPSolver:
    from pairdots_server.core.ihvp.kfac import EKFACSolver

    return EKFACSolver(
        rt.ekfac(), s.damping,
        heuristic_scale=float(setting(rt, "ekfac_damping_scale")),
    )


def _resolve_diagonal(rt: ModelRuntime, s: SolverSettings) -> SolverSettings:
    return _resolve_fixed(rt, s, "diagonal")


def _build_diagonal(rt: ModelRuntime, s: SolverSettings) -> InverseHVPSolver:
    from pairdots_server.core.ihvp.diagonal import DiagonalSolver

    return DiagonalSolver(
        rt.diagonal(), s.damping,
        heuristic_scale=float(setting(rt, "diagonal_damping_scale")),
    )


def _resolve_identity(rt: ModelRuntime, s: SolverSettings) -> SolverSettings:
    # no curvature at all: reported as GGN (the proto's default) so diagnostics stay total
    damping = s.damping if s.damping is not None else float(setting(rt, "identity_damping"))
    return replace(s, curvature=Curvature.GGN, damping=damping)


def _build_identity(rt: ModelRuntime, s: SolverSettings) -> InverseHVPSolver:
    from pairdots_server.core.ihvp.identity import IdentitySolver

    assert s.damping is not None
    return IdentitySolver(s.damping, num_params=rt.num_params)


def _identity_rule(rt: ModelRuntime, s: SolverSettings) -> str:
    return f"absolute: x = v / {s.damping:g} (H taken as 0; 1 = the plain gradient dot product)"


FIXED: dict[SolverChoice, SolverEntry] = {
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


