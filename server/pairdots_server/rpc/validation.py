"""Request validation shared by the Explain and the job converters: every bad field of a
request is collected into one InvalidArgument with BadRequest field violations, so a caller
fixes all of them in one round trip."""

from __future__ import annotations

import math

from pairdots.v1 import pairdots_pb2 as pb
from pairdots_server.core.curvature import Curvature
from pairdots_server.errors import FieldViolation, InvalidArgument
from pairdots_server.influence.solver_policy import PRECOMPUTED, SolverChoice, SolverSettings

CURVATURES = {
    pb.CURVATURE_UNSPECIFIED: None,
    pb.CURVATURE_GAUSS_NEWTON: Curvature.GGN,
    pb.CURVATURE_HESSIAN: Curvature.HESSIAN,
}
SOLVERS = {
    pb.SOLVER_UNSPECIFIED: None,
    pb.SOLVER_LISSA: SolverChoice.LISSA,
    pb.SOLVER_CONJUGATE_GRADIENT: SolverChoice.CG,
    pb.SOLVER_LOW_RANK: SolverChoice.LOW_RANK,
    pb.SOLVER_EXACT: SolverChoice.EXACT,
    pb.SOLVER_EKFAC: SolverChoice.EKFAC,
    pb.SOLVER_DIAGONAL: SolverChoice.DIAGONAL,
    pb.SOLVER_IDENTITY: SolverChoice.IDENTITY,
}


# SolverOptions fields that only the iterative solvers use (LiSSA; CG uses the first two)
ITERATIVE_ONLY = ("max_iterations", "tolerance", "scale", "repeats", "batch_size", "seed")


class Violations:
    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def enum(self, field: str, value: int, table: dict[int, object], name: str) -> object:
        if value not in table:
            self.add(field, f"{value} is not a valid {name}; see the proto for the values")
            return None
        return table[value]

    def raise_if_any(self) -> None:
        if self.items:
            summary = "; ".join(f"{v.field}: {v.description}" for v in self.items)
            raise InvalidArgument(f"invalid request: {summary}", violations=self.items)


def solver_settings(v: Violations, s: pb.SolverOptions, prefix: str) -> SolverSettings:
    method = v.enum(f"{prefix}.solver", s.solver, SOLVERS, "Solver")
    curvature = v.enum(f"{prefix}.curvature", s.curvature, CURVATURES, "Curvature")

    def positive(name: str, value: float, upper: float = math.inf) -> float | None:
        if not s.HasField(name):
            return None
        if not (math.isfinite(value) and 0 < value < upper):
            bound = "" if upper == math.inf else f" and < {upper}"
            v.add(f"{prefix}.{name}", f"must be a finite number > 0{bound}, got {value}")
            return None
        return float(value)

    def bounded(name: str, value: int, lo: int, hi: int) -> int | None:
        if not s.HasField(name):
            return None
        if not lo <= value <= hi:
            v.add(f"{prefix}.{name}", f"must be in {lo}..{hi}, got {value}")
            return None
        return int(value)

    if method in PRECOMPUTED:
        name_ = f"SOLVER_{method.name}"  # type: ignore[union-attr]
        if curvature is Curvature.HESSIAN:
            v.add(f"{prefix}.curvature", f"{name_} solves with curvature fitted when the bundle "
                  "was prepared; for CURVATURE_HESSIAN choose SOLVER_LISSA, "
                  "SOLVER_CONJUGATE_GRADIENT or SOLVER_EXACT")
        for name in ITERATIVE_ONLY:
            if s.HasField(name):
                v.add(f"{prefix}.{name}", f"is not used by {name_} (a closed-form solve from "
                      "precomputed factors; only damping applies); remove it or choose "
                      "SOLVER_LISSA / SOLVER_CONJUGATE_GRADIENT")
    return SolverSettings(
        method=method,  # type: ignore[arg-type]
        curvature=curvature,  # type: ignore[arg-type]
        damping=positive("damping", s.damping),
        scale=positive("scale", s.scale),
        max_iterations=bounded("max_iterations", s.max_iterations, 1, 100_000),
        repeats=bounded("repeats", s.repeats, 1, 16),
        batch_size=bounded("batch_size", s.batch_size, 1, 1024),
        tolerance=positive("tolerance", s.tolerance, 1.0),
        seed=int(s.seed) if s.HasField("seed") else None,
    )
