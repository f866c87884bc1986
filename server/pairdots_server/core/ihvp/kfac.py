"""K-FAC and EK-FAC inverse curvature products over the flat scope vector θ.

Curvature: the Fisher / Gauss–Newton of the mean training loss L = -log p(y|x), approximated
block-diagonally (George et al. 2018, "Fast approximate natural gradient descent in a Kronecker-
factored eigenbasis"; Grosse et al. 2023, "Studying large language model generalization with
influence functions", §2.2; kronfluence is the reference implementation):

* every ``nn.Linear`` of the scope whose weight is scoped is one block. With a_t [I'] the layer
  input at token t (a trailing 1 appended when the bias is scoped, I' = I + 1) and δ_t [O] the
  gradient of the example's loss w.r.t. the layer output, the per-example gradient of
  [W | b] is G_n = Σ_t δ_t a_tᵀ [O,I'], and the block's Fisher is E_n[vec G_n vec G_nᵀ].
  ``core.kfac_fit.fit_kfac`` estimates

      A = Σ_{n,t} a_t a_tᵀ / N_tokens        [I',I']   (mean over the attended tokens)
      S = Σ_{n,t} δ_t δ_tᵀ / N_examples      [O,O]     (mean over examples of Σ_t)

  ("K-FAC expand" normalisation: A ⊗ S equals E_n Σ_t (a_t a_tᵀ) ⊗ (δ_t δ_tᵀ) when a and δ are
  independent, so the K-FAC eigenvalues carry the scale of the per-example Fisher. kronfluence
  divides S by N_tokens instead; its S = ours · N_examples / N_tokens, identical for layers that
  see one token per example, and the EK-FAC eigenvalues below do not depend on this choice.)

  With A = Q_A diag(λ_A) Q_Aᵀ and S = Q_S diag(λ_S) Q_Sᵀ, the block is approximated in the
  eigenbasis Q_S ⊗ Q_A (row-major vec of [O,I'] matrices) by the eigenvalues

      K-FAC :  Λ[o,i] = λ_S[o] · λ_A[i]                       (clamped at 0)
      EK-FAC:  Λ[o,i] = mean_n ((Q_Sᵀ G_n Q_A)[o,i])²         (George et al.'s correction:
               the exact diagonal of the block Fisher in the K-FAC eigenbasis)

  and the inverse-HVP of the block V [O,I'] of v (weight columns, then the bias column) is

      X = Q_S [ (Q_Sᵀ V Q_A) / (Λ + λ) ] Q_Aᵀ.

* every other scoped parameter (LayerNorm weight/bias, embeddings, a bias whose weight is not
  scoped, ...) gets a diagonal block d = mean_n g_n² (elementwise) and x = v / (d + λ).

Damping λ: an absolute value for every block (``damping=float``), or kronfluence's heuristic
(``damping=None``, ``heuristic_damping``): λ_l = ``heuristic_scale`` (0.1) × mean(Λ_l) for
each Linear block and λ = 0.1 × mean(d) for each diagonal parameter tensor; or a mapping block
name -> λ. The rule and the per-block values are in
``KFACSolveDiagnostics``. The factors themselves and their storage are in ``kfac_factors``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pairdots_server.core.aliases import ShouldStop
from pairdots_server.core.exceptions import SolverError
from pairdots_server.core.ihvp.base import (
    InverseHVPSolver,
    SolveDiagnostics,
    SolveResult,
    check_vector,
)
from pairdots_server.core.ihvp.kfac_factors import (  # noqa: F401 (re-exported)
    FISHER_KINDS,
    HEURISTIC_DAMPING_SCALE,
    KFACFactors,
    LinearFactors,
)


@dataclass(frozen=True)
class KFACSolveDiagnostics(SolveDiagnostics):
    """``SolveDiagnostics`` plus the damping rule and the damping of every block.

    damping_rule: "absolute", "per-block" or "heuristic: 0.1 × mean eigenvalue per block";
    block_damping: block name (Linear module or diagonal parameter) -> λ. With the heuristic,
    ``effective_damping`` is the parameter-count-weighted mean of the per-block λ (there is no
    single δ; the fixed point is the block-diagonal (Ĥ + diag(λ_blocks))⁻¹ v).
    """

    damping_rule: str = "absolute"
    block_damping: dict[str, float] = field(default_factory=dict)


def heuristic_damping(
    factors: KFACFactors, ekfac: bool = True, scale: float = HEURISTIC_DAMPING_SCALE
) -> dict[str, float]:
    """kronfluence's damping rule, per block: λ_l = scale × mean(Λ_l) for each Linear block
    (Λ the EK-FAC or the K-FAC eigenvalues) and scale × mean(d) for each diagonal parameter.
    Block name (Linear module or parameter name) -> λ."""
    if not scale > 0:
        raise SolverError(f"heuristic_scale must be > 0, got {scale}")
    out = {lf.module: scale * float(lf.eigenvalues(ekfac).mean()) for lf in factors.linear}
    out.update({name: scale * float(d.mean()) for name, d in factors.diag.items()})
    return out


class EKFACSolver(InverseHVPSolver):
    """x = blockdiag(Q_S⊗Q_A diag(Λ+λ) (Q_S⊗Q_A)ᵀ, diag(d+λ))⁻¹ v (see module docstring).

    ``ekfac=True`` uses the corrected eigenvalues Λ = mean_n (Q_Sᵀ G_n Q_A)² (EK-FAC),
    ``ekfac=False`` the K-FAC eigenvalues λ_S ⊗ λ_A. ``damping``: an absolute λ ≥ 0 for every
    block; None for kronfluence's per-block heuristic (``heuristic_damping``, λ_l =
    ``heuristic_scale`` × mean(Λ_l)); or a mapping block name -> λ (every block named).
    """

    method = "ekfac"

    def __init__(
        self,
        factors: KFACFactors,
        damping: float | Mapping[str, float] | None = None,
        *,
        ekfac: bool = True,
        heuristic_scale: float = HEURISTIC_DAMPING_SCALE,
    ) -> None:
        blocks = [lf.module for lf in factors.linear] + list(factors.diag)
        if damping is None:
            per_block = heuristic_damping(factors, ekfac, heuristic_scale)
            self.damping_rule = f"heuristic: {heuristic_scale:g} × mean eigenvalue per block"
        elif isinstance(damping, Mapping):
            missing = sorted(set(blocks) - set(damping))
            if missing:
                raise SolverError(f"per-block damping is missing blocks {missing[:3]}")
            per_block = {b: float(damping[b]) for b in blocks}
            self.damping_rule = "per-block"
        else:
            per_block = {b: float(damping) for b in blocks}
            self.damping_rule = "absolute"
        negative = [b for b, lam in per_block.items() if lam < 0]
        if negative:
            raise SolverError(
                f"damping must be >= 0 (or None for the heuristic); block {negative[0]!r} has "
                f"{per_block[negative[0]]}"
            )
        self.factors = factors
        self.ekfac = ekfac
        self.method = "ekfac" if ekfac else "kfac"
        self.block_damping: dict[str, float] = per_block
        # precompute 1 / (Λ + λ) per block
        self._inv_linear: list[Tensor] = []
        weighted = 0.0
        for lf in factors.linear:
            lam = lf.eigenvalues(ekfac)  # [O,I']
            lam_d = per_block[lf.module]
            self._check_positive(lam, lam_d, lf.module)
            self._inv_linear.append(1.0 / (lam + lam_d))
            weighted += lam_d * lam.numel()
        self._inv_diag: dict[str, Tensor] = {}
        for name, d in factors.diag.items():
            lam_d = per_block[name]
            self._check_positive(d, lam_d, name)
            self._inv_diag[name] = 1.0 / (d + lam_d)
            weighted += lam_d * d.numel()
        self.effective_damping = (
            float(damping)
            if isinstance(damping, int | float)
            else weighted / max(1, factors.num_params)
        )

    @staticmethod
    def _check_positive(lam: Tensor, damping: float, block: str) -> None:
        low = float(lam.min()) + damping if lam.numel() else 1.0
        if not low > 0:
            raise SolverError(
                f"block {block!r}: smallest eigenvalue + damping = {low:.3g} <= 0; the factors "
                "are singular there, use damping > 0 (or the heuristic, damping=None)"
            )

    def _split(self, v: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        offset = 0
        for name, shape in self.factors.shapes.items():
            n = 1
            for s in shape:
                n *= s
            out[name] = v[offset : offset + n].view(shape)
            offset += n
        return out

    def _apply(
        self, v: Tensor, scale_linear: list[Tensor], scale_diag: Mapping[str, Tensor]
    ) -> Tensor:
        parts = self._split(v)
        out: dict[str, Tensor] = {}
        for lf, scale in zip(self.factors.linear, scale_linear, strict=True):
            w = parts[lf.weight_name]  # [O,I]
            blk = w if lf.bias_name is None else torch.cat([w, parts[lf.bias_name][:, None]], 1)
            q_a, q_s = lf.q_a.to(v.dtype), lf.q_s.to(v.dtype)
            rot = q_s.T @ blk @ q_a  # [O,I'] in the eigenbasis
            x = q_s @ (rot * scale.to(v.dtype)) @ q_a.T  # [O,I']
            if lf.bias_name is None:
                out[lf.weight_name] = x
            else:
                out[lf.weight_name] = x[:, :-1]
                out[lf.bias_name] = x[:, -1]
        for name, scale in scale_diag.items():
            out[name] = parts[name] * scale.to(v.dtype)
        return torch.cat([out[name].reshape(-1) for name in self.factors.shapes])

    def curvature_matvec(self, v: Tensor) -> Tensor:
        """Ĥ v [P] with the block-diagonal approximation itself (no damping)."""
        check_vector(v, self.factors.num_params)
        return self._apply(
            v, [lf.eigenvalues(self.ekfac) for lf in self.factors.linear], self.factors.diag
        )

    def solve(self, v: Tensor, should_stop: ShouldStop | None = None) -> SolveResult:
        check_vector(v, self.factors.num_params)
        t0 = time.perf_counter()
        x = self._apply(v, self._inv_linear, self._inv_diag)
        diag = KFACSolveDiagnostics(
            method=self.method,
            iterations=0,
            rel_change=0.0,
            norm=float(x.norm()),
            effective_damping=self.effective_damping,
            converged=True,
            seconds=time.perf_counter() - t0,
            damping_rule=self.damping_rule,
            block_damping=dict(self.block_damping),
        )
        return SolveResult(x=x, diagnostics=diag)


class KFACSolver(EKFACSolver):
    """``EKFACSolver`` with the plain K-FAC eigenvalues λ_S ⊗ λ_A (no eigenvalue correction)."""

    def __init__(
        self,
        factors: KFACFactors,
        damping: float | Mapping[str, float] | None = None,
        *,
        heuristic_scale: float = HEURISTIC_DAMPING_SCALE,
    ) -> None:
        super().__init__(factors, damping, ekfac=False, heuristic_scale=heuristic_scale)
