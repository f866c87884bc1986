"""Exceptions raised by the influence core.

The core imports nothing from the rest of the project, so it cannot raise the domain errors of
``pairdots_server.errors``; the service layer maps these two classes onto them (both are
``ValueError`` subclasses so plain callers can still catch them). Every message says which
setting to change.
"""

from __future__ import annotations


class SolverError(ValueError):
    """An inverse-HVP solver cannot run with the given settings (e.g. too many parameters for the
    exact solver, a non-positive damping where one is required)."""


class SolverDiverged(SolverError):
    """An iterative solver produced NaN/Inf or a norm that a convergent iteration cannot reach
    (typically: indefinite curvature, too little damping, or a LiSSA scale below λ_max)."""


class NonFiniteInput(ValueError):
    """The vector handed to a solver contains NaN or Inf (e.g. the gradient of the word score
    overflowed); no solver setting can fix that."""
