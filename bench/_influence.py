"""Exact influence of every training example on many measurements in one pass (benches).

I(z_i, f_j) = -∇θL(z_i)ᵀ s_j for the stacked s_test vectors s_j: per-example gradients of the
training set are computed once, batch by batch (sorted by length), and multiplied with every
query block — the exhaustive, exact reference the semantics and faithfulness benches rank by.
When the scope sits on top of frozen layers, the gradients can come from cached hidden states
entering the scope (`scope_inputs`): the same ∇θL(z_i), without the frozen layers' forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from _common import log
from torch import Tensor

from pairdots_server.core.grads import VmapMask, per_example_loss_grads
from pairdots_server.influence.runtime import ModelRuntime


def _pad(rows: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Rows [T_i,D] -> zero-padded [B,T,D] and the 0/1 mask [B,T]."""
    t = max(r.shape[0] for r in rows)
    h = torch.zeros(len(rows), t, rows[0].shape[1], dtype=rows[0].dtype)
    m = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        h[i, : r.shape[0]] = r
        m[i, : r.shape[0]] = 1
    return h, m


def training_pass(
    rt: ModelRuntime,
    blocks: list[Tensor],
    batch_size: int,
    with_diag: bool,
    indices: Sequence[int] | None = None,
    scope_inputs: tuple[Callable[..., Tensor], Sequence[Tensor]] | None = None,
) -> tuple[list[Tensor], Tensor | None]:
    """Exact I(z_i, f_j) = -g_iᵀ s_j for every training example i and query column j of each
    block [P,M] -> scores [N,M] per block (and Σ_i g_i² [P] when with_diag). With `indices`
    only those rows are computed (the others stay 0): a long pass can be done in parts. With
    `scope_inputs` = (logits_fn(params, h [B,T,D], mask [B,T]), cached h_i [T_i,D] per example)
    the per-example gradients are taken through that function on the cached inputs."""
    n = rt.n_train
    rows = range(n) if indices is None else indices
    if scope_inputs is None:
        order = sorted(rows, key=lambda i: len(rt.bundle.train[i].text))
    else:
        order = sorted(rows, key=lambda i: int(scope_inputs[1][i].shape[0]))
    scores = [torch.zeros(n, q.shape[1]) for q in blocks]
    diag = torch.zeros(blocks[0].shape[0]) if with_diag else None
    t0 = time.perf_counter()
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        if scope_inputs is None:
            enc = rt.encode_train(idx)
            g = per_example_loss_grads(
                rt.task.logits_fn, rt.params, enc.embeds, enc.mask, enc.labels
            )
        else:
            fn, hidden = scope_inputs
            h, m = _pad([hidden[i] for i in idx])
            y = torch.tensor([rt.bundle.train[i].label for i in idx])
            g = per_example_loss_grads(fn, rt.params, h, m, y, vmap_mask=VmapMask.BINARY_2D)
        g = g.float()  # [B,P]
        for q, out in zip(blocks, scores):
            out[idx] = -(g @ q)  # [B,M]
        if diag is not None:
            diag += (g * g).sum(0)
        if (b // batch_size) % 40 == 0:
            log(f"  training pass {b}/{len(order)} ({time.perf_counter() - t0:.0f} s)")
    return scores, diag
