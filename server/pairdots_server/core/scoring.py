"""Exact influence scores without per-example gradients: one forward-mode pass per batch.

Eq. 5's score of a training example is a directional derivative of its loss along s_test,

    I(z_i, f) = -⟨s_test, ∇θL(z_i)⟩ = -d/dε L(z_i; θ + ε s_test) |_{ε=0},

so a batch of B examples needs one jvp of the per-example losses [B] (cost about one forward
pass of the model, the tangent carried through the scoped layers only) instead of B backward
passes and a [B, P] gradient matrix. Eq. 8's [UNK] copies are scored the same way:
I(x_t, f) = I(z, f) − I(z̃(t, UNK), f), every copy of every example in the same batches.

Rows of a batch are padded to the batch's longest row with attention mask 0; padded keys get
the additive mask's dtype-min, so a row's loss is the one of its unpadded sequence up to
floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pairdots_server.core.aliases import FORWARD_AD_LOCK, LogitsFn
from pairdots_server.core.params import unflatten

BATCH_TOKENS = {"cpu": 1024, "cuda": 8192}
"""Padded tokens per scoring batch of [UNK] / substituted copies, by device type. On CPU a
batch beyond ~1k tokens spills the FFN activations ([B·T, 4D] floats) out of cache: 641
copies of 30 MiniLM SST-2 examples (17k tokens, scope split) took 8.0 s at 4096 tokens per
batch, 6.3 s at 1024, 6.7 s at 2048, 7.1 s at 512 (2 threads, median of 3 interleaved runs).
The CUDA figure is a guess sized for occupancy, not measured."""


def batch_tokens_for(device: str | torch.device) -> int:
    """BATCH_TOKENS for a device ("cpu", "cuda:0", ...); other device types get the CPU one."""
    kind = torch.device(device).type
    return BATCH_TOKENS.get(kind, BATCH_TOKENS["cpu"])


TrunkFn = Callable[[Tensor, Tensor], Tensor]
"""trunk(embeds [B,T,D], mask [B,T]) -> h [B,T,D']: the layers below the scope (no scoped
parameter), run once without tangents; logits_fn then maps h to logits
(model/scope_split.py)."""


@dataclass(frozen=True)
class Row:
    """One sequence to score: embeds [T,D], mask [T] (0/1), label (an int)."""

    embeds: Tensor
    mask: Tensor
    label: int


def neg_directional_losses(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    direction: Mapping[str, Tensor],
    embeds: Tensor,
    mask: Tensor,
    labels: Tensor,
) -> Tensor:
    """-⟨direction, ∇θL(z_b)⟩ for every row: embeds [B,T,D], mask [B,T], labels [B] -> [B]."""

    def losses(p: Mapping[str, Tensor]) -> Tensor:
        logits = logits_fn(p, embeds, mask)  # [B,C]
        return F.cross_entropy(logits, labels.long(), reduction="none")  # [B]

    with FORWARD_AD_LOCK, torch.no_grad():
        dl = torch.func.jvp(losses, (dict(params),), (dict(direction),))[1]  # [B]
    return -dl


def influence_jvp(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    s_test: Tensor,
    embeds: Tensor,
    mask: Tensor,
    labels: Tensor,
) -> Tensor:
    """I(z_b, f) = -⟨s_test, ∇θL(z_b)⟩ (Eq. 5) for a padded batch: s_test [P], embeds [B,T,D],
    mask [B,T], labels [B] -> [B], by one jvp."""
    detached = {k: v.detach() for k, v in params.items()}
    direction = unflatten(s_test.detach().to(embeds.dtype), detached)
    return neg_directional_losses(logits_fn, detached, direction, embeds.detach(), mask, labels)


def pad_rows(rows: Sequence[Row]) -> tuple[Tensor, Tensor, Tensor]:
    """Stack rows padded to the longest: embeds [B,T,D], mask [B,T], labels [B]."""
    t = max(int(r.embeds.shape[0]) for r in rows)
    first = rows[0].embeds
    emb = first.new_zeros(len(rows), t, first.shape[1])
    mask = rows[0].mask.new_zeros(len(rows), t)
    for b, r in enumerate(rows):
        n = int(r.embeds.shape[0])
        emb[b, :n] = r.embeds
        mask[b, :n] = r.mask
    labels = torch.tensor([r.label for r in rows], dtype=torch.long, device=first.device)
    return emb, mask, labels


def score_rows(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    s_test: Tensor,
    rows: Sequence[Row],
    batch_size: int = 64,
    max_tokens: int | None = None,
    trunk: TrunkFn | None = None,
) -> Tensor:
    """I(z_r, f) = -⟨s_test, ∇θL(z_r)⟩ (Eq. 5) for every row -> [R] (rows' dtype).

    Rows are batched in order of their attended length (little padding): at most batch_size
    rows per batch, and with max_tokens also at most max_tokens padded tokens (rows · longest),
    which bounds the activations a batch holds. With `trunk`, each padded batch goes through
    trunk first (plain forward, no tangent) and the jvp runs through logits_fn from there:
    logits(E) = logits_fn(θ, trunk(E, mask), mask).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not rows:
        return torch.zeros(0)
    detached = {k: v.detach() for k, v in params.items()}
    direction = unflatten(s_test.detach().to(rows[0].embeds.dtype), detached)
    lengths = [int(r.mask.sum()) for r in rows]
    order = sorted(range(len(rows)), key=lambda r: (lengths[r], r))
    out = torch.empty(len(rows), dtype=rows[0].embeds.dtype, device=rows[0].embeds.device)
    for chunk in token_batches(order, lengths, batch_size, max_tokens):
        batch = [rows[r] for r in chunk]
        t = max(lengths[r] for r in chunk)  # trim to the longest attended length
        emb, mask, labels = pad_rows([Row(r.embeds[:t], r.mask[:t], r.label) for r in batch])
        if trunk is not None:
            with torch.no_grad():
                emb = trunk(emb, mask)
        out[torch.tensor(chunk)] = neg_directional_losses(
            logits_fn, detached, direction, emb, mask, labels
        )
    return out


def token_batches(
    order: Sequence[int], lengths: Sequence[int], batch_size: int, max_tokens: int | None
) -> list[list[int]]:
    """Consecutive runs of `order` (ascending length) of at most batch_size rows and, with
    max_tokens, at most max_tokens padded tokens (a single longer row is its own batch)."""
    out: list[list[int]] = []
    cur: list[int] = []
    for r in order:
        too_long = max_tokens is not None and (len(cur) + 1) * lengths[r] > max_tokens
        if cur and (len(cur) >= batch_size or too_long):
            out.append(cur)
            cur = []
        cur.append(r)
    if cur:
        out.append(cur)
    return out


def unk_rows(row: Row, positions: Sequence[int], unk_embed: Tensor) -> list[Row]:
    """z̃(t, UNK) for every t in positions: the row with token t's embedding set to [UNK]."""
    out = []
    for t in positions:
        emb = row.embeds.clone()
        emb[t] = unk_embed.to(emb.dtype)
        out.append(Row(emb, row.mask, row.label))
    return out


def token_influence_many(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    s_test: Tensor,
    rows: Sequence[Row],
    positions: Sequence[Sequence[int]],
    unk_embed: Tensor,
    batch_size: int = 256,
    max_tokens: int | None = 4096,
    trunk: TrunkFn | None = None,
) -> list[Tensor]:
    """Eq. 8 for several training examples at once: for row r, out[r][t] = I(z_r, f) −
    I(z̃_r(t, UNK), f) at every t in positions[r] (0 elsewhere), each [T_r]. All bases and
    [UNK] copies go through score_rows together (through `trunk` first when given)."""
    if len(rows) != len(positions):
        raise ValueError(f"{len(rows)} rows but {len(positions)} position lists")
    flat: list[Row] = list(rows)
    for r, pos in zip(rows, positions, strict=True):
        flat.extend(unk_rows(r, pos, unk_embed))
    scores = score_rows(
        logits_fn, params, s_test, flat, batch_size, max_tokens, trunk
    )  # [R + Σ|pos|]
    out = []
    offset = len(rows)
    for i, (r, pos) in enumerate(zip(rows, positions, strict=True)):
        vals = torch.zeros(r.embeds.shape[0], dtype=scores.dtype, device=scores.device)
        if pos:
            idx = torch.tensor(list(pos), dtype=torch.long)
            vals[idx] = scores[i] - scores[offset : offset + len(pos)]
        offset += len(pos)
        out.append(vals)
    return out


def token_influence_first_order_many(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    s_test: Tensor,
    rows: Sequence[Row],
    positions: Sequence[Sequence[int]],
    unk_embed: Tensor,
    max_tokens: int = 4096,
) -> list[Tensor]:
    """First-order Eq. 8 for several rows: with g_r(E) = -s_testᵀ∇θL(z_r; E) = I(z_r, f),

        I(z_r, f) - I(z̃_r(t, UNK), f) = g_r(E) - g_r(Ẽ_t) ≈ ∇_{e_t} g_r · (e_t - e_unk)

    at every t in positions[r] (0 elsewhere) -> [T_r] each. Rows are independent in a padded
    batch, so ∇_{E_r} Σ_b g_b = ∇_{E_r} g_r: one double backward per batch of at most
    max_tokens padded tokens (rows in order of length). Double backward, not reverse over
    forward mode: torch.func.grad of a jvp gives wrong gradients through F.layer_norm with a
    weight tangent in torch 2.13 (measured: 2 % error on a tiny BERT)."""
    if len(rows) != len(positions):
        raise ValueError(f"{len(rows)} rows but {len(positions)} position lists")
    if not rows:
        return []
    detached = {k: v.detach() for k, v in params.items()}
    direction = unflatten(s_test.detach().to(rows[0].embeds.dtype), detached)
    theta = {k: v.detach().requires_grad_(True) for k, v in detached.items()}
    lengths = [int(r.mask.sum()) for r in rows]
    order = sorted(range(len(rows)), key=lambda r: (lengths[r], r))
    out: list[Tensor] = [torch.zeros(0)] * len(rows)
    for chunk in token_batches(order, lengths, max_tokens, max_tokens):
        t = max(lengths[r] for r in chunk)
        emb, mask, labels = pad_rows(
            [Row(rows[r].embeds[:t], rows[r].mask[:t], rows[r].label) for r in chunk]
        )
        e = emb.detach().requires_grad_(True)  # [B,t,D]
        with torch.enable_grad():
            loss = F.cross_entropy(logits_fn(theta, e, mask), labels, reduction="sum")
            grads = torch.autograd.grad(
                loss, list(theta.values()), create_graph=True, allow_unused=True
            )
            g = -sum(
                (
                    (gr * direction[k]).sum()
                    for k, gr in zip(theta, grads, strict=True)
                    if gr is not None
                ),
                torch.zeros((), dtype=e.dtype, device=e.device),
            )
            (grad_e,) = torch.autograd.grad(g, e)
        est = (grad_e * (emb - unk_embed.to(emb.dtype))).sum(-1).detach()  # [B,t]
        for b, r in enumerate(chunk):
            vals = torch.zeros(rows[r].embeds.shape[0], dtype=est.dtype, device=est.device)
            if positions[r]:
                idx = torch.tensor(list(positions[r]), dtype=torch.long)
                vals[idx] = est[b, idx]
            out[r] = vals
    return out
