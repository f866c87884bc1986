"""Diagonal Fisher curvature: x = v / (d + λ).

d [P] = the diagonal of the Fisher of the mean training loss L = -log p(y|x),

    d = (1/N) Σ_n Σ_k w_nk (∇θ L_n(y_nk))²      (elementwise square)

with the labels/weights of ``core.kfac_fit.fisher_label_terms``: the gold labels (empirical
Fisher, the default here), labels sampled from the model (true Fisher, MC), or all classes
weighted by p (true Fisher, exact; for softmax cross-entropy this is diag of the GGN).
``fit_diagonal`` accumulates it over batches with ``core.grads.per_example_loss_grads``.

Damping λ: absolute (``damping=float``, ≥ 0) or, with ``damping=None``, kronfluence's heuristic
λ = 0.1 × mean(d).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from pairdots_server.core.aliases import LogitsFn, ShouldStop
from pairdots_server.core.exceptions import SolverError
from pairdots_server.core.fisher_terms import (
    BatchLike,
    as_triple,
    check_fisher,
    fisher_label_terms,
    squared_grad_sum,
)
from pairdots_server.core.grads import VmapMask
from pairdots_server.core.ihvp.base import (
    InverseHVPSolver,
    SolveResult,
    check_vector,
)
from pairdots_server.core.ihvp.kfac import (
    FISHER_KINDS,
    HEURISTIC_DAMPING_SCALE,
    KFACSolveDiagnostics,
)


@dataclass(frozen=True)
class DiagonalFactors:
    """diag [P]: the mean squared per-example gradient (flat-θ order); fisher: which Fisher;
    num_examples: N."""

    diag: Tensor
    fisher: str = "empirical"
    num_examples: int = 0

    def __post_init__(self) -> None:
        if self.diag.dim() != 1:
            raise SolverError(f"diagonal factors need diag [P], got {tuple(self.diag.shape)}")
        if self.fisher not in FISHER_KINDS:
            raise SolverError(f"unknown fisher {self.fisher!r}; use one of {FISHER_KINDS}")

    @property
    def num_params(self) -> int:
        return int(self.diag.shape[0])

    @property
    def num_bytes(self) -> int:
        return int(self.diag.numel() * self.diag.element_size())

    def to_tensors(self) -> dict[str, Tensor]:
        """Name -> tensor (contiguous) for safetensors: diag [P], meta [fisher code, N]."""
        meta = torch.tensor([FISHER_KINDS.index(self.fisher), self.num_examples], dtype=torch.int64)
        return {"diag": self.diag.contiguous(), "meta": meta}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> DiagonalFactors:
        missing = {"diag", "meta"} - set(tensors)
        if missing:
            raise SolverError(
                f"diagonal factors are missing {sorted(missing)}; refit them (fit_diagonal)"
            )
        code, n = (int(x) for x in tensors["meta"].tolist())
        return cls(diag=tensors["diag"], fisher=FISHER_KINDS[code], num_examples=n)


def fit_diagonal(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    batches: Iterable[BatchLike],
    *,
    fisher: str = "empirical",
    num_samples: int = 1,
    seed: int = 0,
    chunk_size: int | None = None,
    vmap_mask: VmapMask = VmapMask.ADDITIVE_4D,
    should_stop: ShouldStop | None = None,
) -> DiagonalFactors:
    """d = mean_n Σ_k w_nk g_nk² over ``batches`` (Batch or (embeds, mask, labels) tuples, or a
    BatchProvider). Cost: one forward per batch (for the label terms, none for "empirical") plus
    one vmapped per-example gradient per label term; memory B × P per batch."""
    check_fisher(fisher, num_samples)
    if hasattr(batches, "full"):
        batches = batches.full()  # type: ignore[union-attr]
    detached = {k: v.detach() for k, v in params.items()}
    gen = torch.Generator().manual_seed(seed)
    total: Tensor | None = None
    count = 0
    for batch in batches:
        if should_stop is not None:
            should_stop()
        embeds, mask, labels = as_triple(batch)
        if fisher == "empirical":
            b = int(labels.shape[0])
            w = torch.ones(b, dtype=embeds.dtype, device=embeds.device)
            terms = [(labels.long(), w)]
        else:
            with torch.no_grad():
                logits = logits_fn(detached, embeds, mask)  # [B,C]
            terms = fisher_label_terms(logits, labels, fisher, gen, num_samples)
        part = squared_grad_sum(logits_fn, detached, embeds, mask, terms, chunk_size, vmap_mask)
        total = part if total is None else total + part
        count += int(labels.shape[0])
    if total is None or count == 0:
        raise SolverError("fit_diagonal: the batches hold no examples; give it training data")
    return DiagonalFactors(diag=total / count, fisher=fisher, num_examples=count)


class DiagonalSolver(InverseHVPSolver):
    """x = v / (d + λ); λ absolute, or ``heuristic_scale`` × mean(d) when damping is None."""

    def __init__(
        self,
        factors: DiagonalFactors,
        damping: float | None = None,
        *,
        heuristic_scale: float = HEURISTIC_DAMPING_SCALE,
    ) -> None:
        if damping is not None and damping < 0:
            raise SolverError(f"damping must be >= 0 (or None for the heuristic), got {damping}")
        if damping is None:
            if not heuristic_scale > 0:
                raise SolverError(f"heuristic_scale must be > 0, got {heuristic_scale}")
            self.damping = heuristic_scale * float(factors.diag.mean())
            self.damping_rule = f"heuristic: {heuristic_scale:g} × mean(d)"
        else:
            self.damping = float(damping)
            self.damping_rule = "absolute"
        low = float(factors.diag.min()) + self.damping
        if not low > 0:
            raise SolverError(
                f"min(d) + damping = {low:.3g} <= 0: some parameter has zero squared gradient; "
                "use damping > 0"
            )
        self.factors = factors

    def solve(self, v: Tensor, should_stop: ShouldStop | None = None) -> SolveResult:
        check_vector(v, self.factors.num_params)
        t0 = time.perf_counter()
        x = v / (self.factors.diag.to(v.dtype) + self.damping)
        diag = KFACSolveDiagnostics(
            method="diagonal",
            iterations=0,
            rel_change=0.0,
            norm=float(x.norm()),
            effective_damping=self.damping,
            converged=True,
            seconds=time.perf_counter() - t0,
            damping_rule=self.damping_rule,
            block_damping={},
        )
        return SolveResult(x=x, diagnostics=diag)
