"""What the K-FAC fit (core.kfac_fit) records: forward hooks on the scoped ``nn.Linear``
modules capturing each call's input a and output y, one recorded forward pass, the output
gradients δ of the weighted loss, and the masking of padded tokens (see core.kfac_fit's
docstring for how A, S and Λ are built from them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pairdots_server.core.aliases import LogitsFn
from pairdots_server.core.exceptions import SolverError
from pairdots_server.core.fisher_terms import fisher_label_terms


class LinearCapture:
    """Forward hooks recording (module name, input, output) of every call while ``active``."""

    def __init__(self, modules: Mapping[str, nn.Linear]) -> None:
        self.active = False
        self.records: list[tuple[str, Tensor, Tensor]] = []
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if self.active:
                self.records.append((name, inputs[0].detach(), output))

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def masked_tokens(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """x [B,*,F] -> (x [B,T',F] with padded tokens zeroed, token mask [B,T',1]).

    [B,T,F] with [B,T] matching the attention mask: masked by it; [B,F]: one token; any other
    shape: the middle dims flattened into tokens, all kept.
    """
    b = x.shape[0]
    if x.dim() == 3 and x.shape[:2] == mask.shape:
        m = mask.to(x.dtype)[..., None]  # [B,T,1]
        return x * m, m
    x3 = x.reshape(b, -1, x.shape[-1])
    return x3, torch.ones(b, x3.shape[1], 1, dtype=x.dtype, device=x.device)


def with_bias_column(a: Tensor, m: Tensor, bias: bool) -> Tensor:
    """a [B,T,I] (masked) -> [B,T,I+1] with the masked 1 of the bias appended (if ``bias``)."""
    return torch.cat([a, m], dim=-1) if bias else a


def scoped_linears(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, nn.Linear]:
    """module name -> nn.Linear for every Linear whose weight is in ``params``, in model order."""
    names = {n for n, _ in model.named_parameters()}
    unknown = [n for n in params if n not in names]
    if unknown:
        raise SolverError(
            f"scope parameters {unknown[:3]} are not parameters of {type(model).__name__}; "
            "pass the scope dict of this model (Task.scope_params())"
        )
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and f"{name}.weight" in params
    }


def recorded_forward(
    capture: LinearCapture,
    params: Mapping[str, Tensor],
    logits_fn: LogitsFn,
    embeds: Tensor,
    mask: Tensor,
    labels: Tensor,
    fisher: str,
    gen: torch.Generator,
    num_samples: int,
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """One recorded forward pass: logits [B,C] (with graph) and the Fisher label terms."""
    if embeds.dim() != 3 or mask.shape != embeds.shape[:2] or labels.shape != embeds.shape[:1]:
        raise SolverError(
            f"expected embeds [B,T,D], mask [B,T], labels [B]; got {tuple(embeds.shape)}, "
            f"{tuple(mask.shape)}, {tuple(labels.shape)}"
        )
    theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    capture.records = []
    capture.active = True
    try:
        with torch.enable_grad():
            logits = logits_fn(theta, embeds.detach(), mask)  # [B,C]
    finally:
        capture.active = False
    terms = fisher_label_terms(logits, labels, fisher, gen, num_samples)
    return logits, terms


def output_deltas(
    logits: Tensor, y: Tensor, w: Tensor, records: list[tuple[str, Tensor, Tensor]]
) -> list[Tensor | None]:
    """δ = ∂(Σ_n sqrt(w_n) L_n(y_n))/∂(recorded outputs), one per record (None: unused)."""
    outs = [out for _, _, out in records]
    if not outs:
        return []
    with torch.enable_grad():
        loss = (w.detach().sqrt() * F.cross_entropy(logits, y, reduction="none")).sum()
        grads = torch.autograd.grad(loss, outs, retain_graph=True, allow_unused=True)
    return [None if g is None else g.detach() for g in grads]
