"""The last encoder layer of a BERT-style classifier at the first position only.

A BERT pooler reads the last layer's output at position 0 ([CLS]) and nothing else, so the
logits depend on that layer through

    a_0   = softmax(q_0 Kᵀ · d_h^{-1/2} + mask) V          per head; q_0 = h_0 W_qᵀ + b_q,
                                                          K = h W_kᵀ + b_k, V = h W_vᵀ + b_v
    u_0   = LayerNorm(a_0 W_oᵀ + b_o + h_0)                attention output at position 0
    out_0 = LayerNorm(act(u_0 W_iᵀ + b_i) W_fᵀ + b_f + u_0)  the feed-forward block at 0

with h the layer's input [B,T,D]. Keys and values still take every position; the query, the
attention output and the feed-forward block take one. On a sequence of T tokens that is
about 2T + 10 of the layer's 12T per-token D²-products, and the logits, their derivatives
with respect to every parameter of the layer and with respect to h are those of the whole
layer (the other positions' outputs never reach the pooler). Forward-mode (jvp), reverse
mode and vmap all go through the same ops.

Nothing here is fitted or cached: the submodules are called with `params` swapped in
(torch.func.functional_call), so any parameter not in `params` is the module's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


def subparams(params: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of params under `prefix`, with the prefix removed (a submodule's names)."""
    n = len(prefix)
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix)}


def supports(layer: Any) -> bool:
    """Whether `layer` is a BERT-style encoder layer that first_position can run: self-attention
    with query/key/value Linear modules and its head sizes, an attention output taking
    (context, input), intermediate and output blocks; no decoder, no cross-attention."""
    attention = getattr(layer, "attention", None)
    sa = getattr(attention, "self", None)
    if sa is None or getattr(attention, "output", None) is None:
        return False
    if getattr(layer, "is_decoder", False) or getattr(layer, "add_cross_attention", False):
        return False
    if getattr(attention, "is_cross_attention", False):
        return False
    # relative position scores (older transformers) would need the distance embeddings
    if getattr(sa, "position_embedding_type", "absolute") != "absolute":
        return False
    needed = ("query", "key", "value", "num_attention_heads", "attention_head_size")
    if not all(hasattr(sa, a) for a in needed):
        return False
    return hasattr(layer, "intermediate") and hasattr(layer, "output")


def reads_first_position_only(pooler: Any) -> bool:
    """Whether pooler(h) depends on h[:, 0] alone (BERT's pooler: tanh(W h[:, 0] + b)): its
    output on a fixed [1,3,D] input is unchanged when positions 1.. are replaced (no RNG, so
    it may run anywhere, inside torch.func transforms included)."""
    import torch

    weight = next((p for p in pooler.parameters()), None)
    dim = getattr(getattr(pooler, "dense", None), "in_features", None)
    if weight is None or dim is None:
        return False
    n = 3 * int(dim)
    h = torch.sin(torch.arange(n, dtype=torch.float64) * 0.37).reshape(1, 3, -1).to(weight)
    other = h.clone()
    other[:, 1:] = torch.cos(torch.arange(n - int(dim), dtype=torch.float64) * 0.91).reshape(
        1, 2, -1
    ).to(weight)
    with torch.no_grad():
        try:
            a, b = pooler(h), pooler(other)
        except Exception:  # noqa: BLE001 - a pooler of another shape: not this case
            return False
    return bool(a.shape == b.shape and torch.equal(a, b))


def first_position(
    layer: Any, params: Mapping[str, Tensor], hidden: Tensor, mask4: Tensor
) -> Tensor:
    """The layer's output at position 0: hidden [B,T,D], additive mask4 [B,1,1,T] (0 keep,
    dtype-min masked) -> [B,1,D], equal to layer(hidden, mask4)[:, :1] up to summation order.
    `params` are the layer's own names ("attention.self.query.weight", ...); `supports(layer)`
    must hold."""
    import torch
    from torch.func import functional_call

    sa = layer.attention.self
    heads, size = int(sa.num_attention_heads), int(sa.attention_head_size)
    scaling = float(getattr(sa, "scaling", size**-0.5))
    b, t, _ = hidden.shape
    h0 = hidden[:, :1]  # [B,1,D]

    def linear(name: str, x: Tensor) -> Tensor:
        module = getattr(sa, name)
        out: Tensor = functional_call(
            module, subparams(params, f"attention.self.{name}."), args=(x,), strict=False
        )
        return out

    q = linear("query", h0).view(b, 1, heads, size).transpose(1, 2)  # [B,H,1,d]
    k = linear("key", hidden).view(b, t, heads, size).transpose(1, 2)  # [B,H,T,d]
    v = linear("value", hidden).view(b, t, heads, size).transpose(1, 2)  # [B,H,T,d]
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling + mask4  # [B,H,1,T]
    probs = torch.softmax(scores, dim=-1)
    dropout = getattr(sa, "dropout", None)
    if dropout is not None:
        probs = dropout(probs)
    context = torch.matmul(probs, v).transpose(1, 2).reshape(b, 1, heads * size)  # [B,1,H·d]
    attended: Tensor = functional_call(
        layer.attention.output, subparams(params, "attention.output."), args=(context, h0),
        strict=False,
    )  # [B,1,D]
    inner = functional_call(
        layer.intermediate, subparams(params, "intermediate."), args=(attended,), strict=False
    )  # [B,1,I]
    out: Tensor = functional_call(
        layer.output, subparams(params, "output."), args=(inner, attended), strict=False
    )  # [B,1,D]
    return out
