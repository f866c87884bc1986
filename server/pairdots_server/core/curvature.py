"""Curvature-vector products H v for the influence solvers (the H of Eq. 4–5).

H is the curvature of the mean training loss (1/N) Σ_i L(z_i) w.r.t. the scoped parameters,
plus an optional L2 term: H v + l2·v.

* ``Curvature.GGN`` (default): the Gauss–Newton matrix G = (1/B) Σ_i J_iᵀ H_i J_i with
  J_i = ∂logits_i/∂θ and H_i = diag(p_i) - p_i p_iᵀ the Hessian of cross-entropy w.r.t. the
  logits. G is positive semi-definite, so LiSSA/CG on G + λI converge. Computed as a forward-mode
  J v (jvp), the closed-form H_i u, and a reverse-mode Jᵀ(·) (vjp).
* ``Curvature.HESSIAN``: the true Hessian ∇²θ L (the paper's H), forward-over-reverse.
  It is indefinite for a fine-tuned transformer (LiSSA diverges on it); equal to the GGN when the
  logits are linear in the scoped parameters (e.g. only the classifier head scoped).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from pairdots_server.core.aliases import FORWARD_AD_LOCK, LogitsFn
from pairdots_server.core.batches import Batch, BatchProvider
from pairdots_server.core.params import flatten, num_params, unflatten


class Curvature(enum.Enum):
    """Which curvature matrix H is: Gauss–Newton (default, PSD) or the true Hessian (paper)."""

    GGN = "ggn"
    HESSIAN = "hessian"


class CurvatureOperator:
    """v [P] -> (H + l2·I) v [P], H averaged over a batch or over all of ``batches``."""

    def __init__(
        self,
        logits_fn: LogitsFn,
        params: Mapping[str, Tensor],
        batches: BatchProvider,
        curvature: Curvature = Curvature.GGN,
        l2: float = 0.0,
    ) -> None:
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0 (it is the weight-decay curvature), got {l2}")
        self.logits_fn = logits_fn
        self.params = {k: v.detach() for k, v in params.items()}
        self.batches = batches
        self.curvature = curvature
        self.l2 = float(l2)

    @property
    def num_params(self) -> int:
        return num_params(self.params)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def matvec(self, v: Tensor, batch: Batch | None = None) -> Tensor:
        """(H + l2·I) v with H the mean over ``batch``, or over every batch of the provider."""
        if v.shape != (self.num_params,):
            raise ValueError(
                f"vector has shape {tuple(v.shape)}, the scope has {self.num_params} parameters"
            )
        if batch is not None:
            hv = self._batch_matvec(v, batch)
        else:
            total = torch.zeros_like(v)
            count = 0
            for b in self.batches.full():
                total = total + self._batch_matvec(v, b) * b.size
                count += b.size
            if count == 0:
                raise ValueError("the batch provider yielded no examples; give it training data")
            hv = total / count
        return hv + self.l2 * v if self.l2 else hv

    def matmat(self, vs: Tensor, batch: Batch | None = None, chunk_size: int | None = 64) -> Tensor:
        """(H + l2·I) V for the columns of vs [P,k] -> [P,k], vmapped over the columns."""
        if vs.dim() != 2 or vs.shape[0] != self.num_params:
            raise ValueError(f"expected [P,k] with P = {self.num_params}, got {tuple(vs.shape)}")
        mv = torch.func.vmap(lambda col: self.matvec(col, batch), chunk_size=chunk_size)
        return mv(vs.T).T

    def _batch_matvec(self, v: Tensor, batch: Batch) -> Tensor:
        vd = unflatten(v.detach(), self.params)
        if self.curvature is Curvature.GGN:
            return self._ggn(vd, batch)
        if self.curvature is Curvature.HESSIAN:
            return self._hessian(vd, batch)
        raise ValueError(f"unknown curvature {self.curvature!r}")  # pragma: no cover

    def _ggn(self, vd: Mapping[str, Tensor], batch: Batch) -> Tensor:
        def f(p: Mapping[str, Tensor]) -> Tensor:
            return self.logits_fn(p, batch.embeds, batch.mask)  # [B,C]

        with FORWARD_AD_LOCK:
            fwd = torch.func.jvp(f, (self.params,), (dict(vd),))
        logits, jv = fwd[0], fwd[1]  # [B,C], [B,C]
        prob = torch.softmax(logits.detach(), dim=-1)
        hu = prob * jv - prob * (prob * jv).sum(-1, keepdim=True)  # H_logits J v, [B,C]
        vjp_fn = torch.func.vjp(f, self.params)[1]
        (g,) = vjp_fn(hu.detach() / batch.size)
        return flatten(g).detach()

    def _hessian(self, vd: Mapping[str, Tensor], batch: Batch) -> Tensor:
        def loss(p: Mapping[str, Tensor]) -> Tensor:
            logits = self.logits_fn(p, batch.embeds, batch.mask)
            return F.cross_entropy(logits, batch.labels.long())

        with FORWARD_AD_LOCK:
            hv = torch.func.jvp(torch.func.grad(loss), (self.params,), (dict(vd),))[1]
        return flatten(hv).detach()


def power_iteration(
    apply: Callable[[Tensor], Tensor], dim: int, *, iters: int, seed: int,
    dtype: torch.dtype, device: torch.device | str, rayleigh: bool,
) -> float:
    """The dominant eigenvalue of the linear map `apply` on R^dim by power iteration from a
    seeded Gaussian start: y ← A y / ‖A y‖; the estimate is the Rayleigh quotient yᵀA y
    (rayleigh, for a symmetric A: its sign is kept) or ‖A y‖ (for A similar to an SPD matrix,
    e.g. M⁻¹(H + δI)) at the last step. Stops early when A y is 0 or not finite."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(dim, generator=gen, dtype=dtype).to(device)
    y /= y.norm()
    lam = 0.0
    for _ in range(iters):
        z = apply(y)
        norm = z.norm()
        if rayleigh:
            lam = float(y @ z)
        if not torch.isfinite(norm) or norm == 0:
            break
        if not rayleigh:
            lam = float(norm)
        y = z / norm
    return lam


def estimate_lambda_max(
    op: CurvatureOperator, iters: int = 20, seed: int = 0, batch: Batch | None = None
) -> float:
    """Largest-magnitude eigenvalue of (H + l2·I) by power iteration (Rayleigh quotient).

    For the PSD GGN this is λ_max; for an indefinite Hessian it may be the most negative one.
    """
    return power_iteration(lambda v: op.matvec(v, batch), op.num_params, iters=iters,
                           seed=seed, dtype=op.dtype, device=op.device, rayleigh=True)
