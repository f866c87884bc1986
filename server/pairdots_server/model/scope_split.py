"""The model split at the influence scope: a trunk below it and the scoped top above it.

Every scoped parameter θ_scope of a BERT-family classifier with a last-n / head scope lives in
encoder layers L..N-1, the pooler and the classifier, so

    logits(E; θ) = top(h_L(E); θ_scope),   h_L(E) = layer_{L-1} ∘ … ∘ layer_0 ∘ emb(E)

and h_L (the hidden states entering the first scoped layer, [B,T,D]) does not depend on
θ_scope. Anything that differentiates with respect to θ_scope only (the jvp of Eq. 5's
-⟨s_test, ∇θL(z)⟩, per-example gradients) can therefore start from h_L: computed once per
training example (influence/scope_inputs.py caches it) instead of once per query.

`ScopeSplit.for_task` returns None when the split is not available (another model family, or a
scope that reaches below the first scoped layer, e.g. the embedding LayerNorm or a pattern that
skips a layer); callers then use the full `Task.logits_fn`.

Padding: `top` takes the same 0/1 mask [B,T] (or additive [B,1,1,T]) as Task.logits_fn; a
padded row's attended positions are those of its unpadded sequence up to summation order, so
h_L can be stored unpadded per example and re-padded per batch.

Threads: trunk() hooks the model's first scoped layer for the duration of one forward pass,
so, like functional_call's parameter swap, it relies on the model's ComputeGate (compute.py:
one computation on a model at a time).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pairdots_server.model import cls_layer

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from pairdots_server.model.task import Task

_LAYER = re.compile(r"^(?P<prefix>.*?encoder\.layer\.)(?P<i>\d+)\.")


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once h_L is known."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__("captured")
        self.hidden = hidden


@dataclass(frozen=True)
class ScopeSplit:
    """trunk(E, mask) -> h_L [B,T,D] and top(params, h_L, mask) -> logits [B,C] of one Task,
    with top(θ, trunk(E, m), m) = Task.logits_fn(θ, E, m) up to floating-point order.

    first_layer = L (the number of encoder layers when the scope is the head only); key names
    what the split depends on (the first scoped layer) for cache keys."""

    task: Task
    first_layer: int
    num_layers: int
    layer_prefix: str  # e.g. "bert.encoder.layer."
    pooler_prefix: str  # e.g. "bert.pooler."
    cls_only: bool = False  # the last layer at position 0 only (set by for_task)

    @property
    def key(self) -> str:
        return f"{self.layer_prefix}{self.first_layer}/{self.num_layers}"

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def for_task(cls, task: Task) -> ScopeSplit | None:
        """The split of `task` at its scope, or None when the model or the scope does not
        allow it (see the module docstring)."""
        model = task.model
        base = getattr(model, "base_model", None)
        encoder = getattr(base, "encoder", None)
        layers = getattr(encoder, "layer", None)
        pooler = getattr(base, "pooler", None)
        classifier = getattr(model, "classifier", None)
        if layers is None or pooler is None or classifier is None:
            return None
        base_prefix = getattr(model, "base_model_prefix", "")
        if not base_prefix or getattr(model, base_prefix, None) is not base:
            return None
        layer_prefix = f"{base_prefix}.encoder.layer."
        pooler_prefix = f"{base_prefix}.pooler."
        n = len(layers)
        scoped = task.scope_names
        first = n
        for nm in scoped:
            m = _LAYER.match(nm)
            if m is not None and m.group("prefix") == layer_prefix:
                first = min(first, int(m.group("i")))
            elif not nm.startswith((pooler_prefix, "classifier.")):
                return None  # a scoped parameter below the encoder layers or elsewhere
        split = cls(task, first, n, layer_prefix, pooler_prefix)
        return replace(split, cls_only=split._cls_only())

    # -- the two halves --------------------------------------------------------------------------

    def _modules(self) -> tuple[Any, Any, Any, Any]:
        model: Any = self.task.model
        base = model.base_model
        return base.encoder.layer, base.pooler, getattr(model, "dropout", None), model.classifier

    def trunk(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """h_L: the hidden states entering encoder layer L (the encoder output when L = N),
        with the model's own parameters: [B,T,D], [B,T] -> [B,T,D] (no grad)."""
        import torch

        layers, pooler, _, _ = self._modules()
        target = pooler if self.first_layer >= self.num_layers else layers[self.first_layer]

        def hook(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            raise _Captured(hidden)

        handle = target.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self.task.logits_fn({}, inputs_embeds, attention_mask)
        except _Captured as got:
            return got.hidden.detach()
        finally:
            handle.remove()
        raise RuntimeError("the scope split's capture hook did not run")  # pragma: no cover

    def _cls_only(self) -> bool:
        """Whether `top` may compute the last encoder layer at the first position only: a
        scoped BERT-style encoder layer (cls_layer.supports) under a pooler that reads
        position 0 alone (cls_layer.reads_first_position_only)."""
        layers, pooler, _, _ = self._modules()
        return (
            self.first_layer < self.num_layers
            and cls_layer.supports(layers[-1])
            and cls_layer.reads_first_position_only(pooler)
        )

    def trunk_in(self, precision: torch.dtype | None) -> Callable[[Tensor, Tensor], Tensor]:
        """trunk with its matrix products in `precision` (torch.autocast on the model's device;
        None or the model's dtype: trunk itself), h_L returned in the model's dtype:
        [B,T,D], [B,T] -> [B,T,D]. bfloat16 runs the products ~3x faster on CPUs with native
        bf16 dot products (AVX512-BF16, AMX) at ~3 significant digits per product
        (bench/eq8_precision.py measures what Eq. 8 loses)."""
        import torch

        dtype = self.task.dtype
        if precision is None or precision == dtype:
            return self.trunk
        device = torch.device(self.task.device).type

        def trunk(inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
            with torch.autocast(device_type=device, dtype=precision):
                hidden = self.trunk(inputs_embeds, attention_mask)
            return hidden.to(dtype)

        return trunk

    def top(self, params: Mapping[str, Tensor], hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """logits = top(h_L; θ_scope) with θ_scope replaced by `params` (names as in
        Task.scope_params; others are the model's own): [B,T,D], [B,T] -> [B,C]. A LogitsFn
        over h_L instead of the word embeddings.

        The pooler reads the last layer's output at position 0 only, so that layer runs for
        the first position's query (model/cls_layer.py): the same logits and the same
        derivatives with respect to every parameter as the whole layer, for ~1/6 of its
        work on the other positions (their keys and values). `top_every_token` runs the
        whole layer, for callers that observe the layer's modules (the K-FAC capture)."""
        return self._top(params, hidden, attention_mask, cls_only=self.cls_only)

    def top_every_token(
        self, params: Mapping[str, Tensor], hidden: Tensor, attention_mask: Tensor
    ) -> Tensor:
        """`top` with every scoped layer run at every position through its own modules, so
        forward hooks on the scoped Linear modules see every token: [B,T,D], [B,T] -> [B,C]."""
        return self._top(params, hidden, attention_mask, cls_only=False)

    def _top(
        self, params: Mapping[str, Tensor], hidden: Tensor, attention_mask: Tensor,
        cls_only: bool,
    ) -> Tensor:
        from torch.func import functional_call

        if attention_mask.dim() == 4:
            mask4 = attention_mask
        else:
            mask4 = self.task.additive_mask(attention_mask, hidden.dtype)  # [B,1,1,T]
        layers, pooler, dropout, classifier = self._modules()
        h = hidden
        for i in range(self.first_layer, self.num_layers):
            sub = cls_layer.subparams(params, f"{self.layer_prefix}{i}.")
            if cls_only and i == self.num_layers - 1:
                h = cls_layer.first_position(layers[i], sub, h, mask4)  # [B,1,D]
                continue
            out = functional_call(layers[i], sub, args=(h, mask4), strict=False)
            h = out[0] if isinstance(out, tuple) else out
        pooled = functional_call(
            pooler, cls_layer.subparams(params, self.pooler_prefix), args=(h,), strict=False
        )
        if dropout is not None:
            pooled = dropout(pooled)
        logits: Tensor = functional_call(
            classifier, cls_layer.subparams(params, "classifier."), args=(pooled,), strict=False
        )
        return logits

