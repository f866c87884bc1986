"""core/scoring: jvp scores equal -⟨s_test, ∇θL(z)⟩ from explicit per-example gradients
(the reference loop, one autograd call per example), whatever the batching and padding, and
the batched Eq. 8 equals the one-example path (core/influence.token_influence_exact)."""

from __future__ import annotations

import torch
from core_tiny import Tiny

from pairdots_server.core.grads import per_example_loss_grads_loop
from pairdots_server.core.influence import influence_on_score, token_influence_exact
from pairdots_server.core.scoring import Row, influence_jvp, score_rows, token_influence_many


def _direction(tiny: Tiny, params: dict[str, torch.Tensor]) -> torch.Tensor:
    n = sum(int(p.numel()) for p in params.values())
    s = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return s / s.norm()


def _rows(tiny: Tiny, idx: list[int]) -> list[Row]:
    # each row unpadded (its own length), so score_rows must pad them itself
    return [
        Row(tiny.embeds[i, : tiny.lengths[i]], tiny.mask[i, : tiny.lengths[i]], int(tiny.labels[i]))
        for i in idx
    ]


def test_jvp_scores_equal_explicit_gradients(tiny: Tiny) -> None:
    params = tiny.scope("last_layer_head")
    s_test = _direction(tiny, params)
    n = tiny.embeds.shape[0]
    g = per_example_loss_grads_loop(tiny.logits_fn, params, tiny.embeds, tiny.mask, tiny.labels)
    expect = influence_on_score(s_test, g)  # [N]
    got = influence_jvp(tiny.logits_fn, params, s_test, tiny.embeds, tiny.mask, tiny.labels)
    torch.testing.assert_close(got, expect, atol=1e-12, rtol=1e-9)
    idx = list(range(n - 1, -1, -1))  # any order, batches of 5 with their own padding
    got_rows = score_rows(tiny.logits_fn, params, s_test, _rows(tiny, idx), batch_size=5)
    torch.testing.assert_close(got_rows, expect[idx], atol=1e-12, rtol=1e-9)
    by_tokens = score_rows(  # batches of at most 12 padded tokens (one row when longer)
        tiny.logits_fn, params, s_test, _rows(tiny, idx), batch_size=100, max_tokens=12
    )
    torch.testing.assert_close(by_tokens, expect[idx], atol=1e-12, rtol=1e-9)
    assert expect.abs().max() > 1e-4  # not trivially zero


def test_batched_eq8_equals_the_one_example_path(tiny: Tiny) -> None:
    params = tiny.scope("last_layer_head")
    s_test = _direction(tiny, params)
    idx = [2, 5, 7, 11]
    rows = _rows(tiny, idx)
    positions = [list(range(1, tiny.lengths[i] - 1)) for i in idx]
    got = token_influence_many(
        tiny.logits_fn, params, s_test, rows, positions, tiny.unk_embed, batch_size=7
    )
    for k, i in enumerate(idx):
        length = tiny.lengths[i]
        ref = token_influence_exact(
            tiny.logits_fn,
            params,
            s_test,
            tiny.embeds[i : i + 1, :length],
            tiny.mask[i : i + 1, :length],
            int(tiny.labels[i]),
            tiny.unk_embed,
            positions[k],
        )  # [T_i]
        assert got[k].shape == (length,)
        torch.testing.assert_close(got[k], ref, atol=1e-12, rtol=1e-9)
        assert got[k][0] == 0 and got[k][length - 1] == 0  # [CLS]/[SEP] not evaluated
    assert max(float(v.abs().max()) for v in got) > 1e-6
