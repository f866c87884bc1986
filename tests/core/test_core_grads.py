"""vmap per-example gradients vs the loop reference, padding and batch/chunk invariance."""

import torch

from pairdots_server.core.grads import per_example_loss_grads, per_example_loss_grads_loop

TOL = 1e-10  # float64


def test_vmap_matches_loop_on_padded_batch(tiny) -> None:
    params = tiny.scope("last_layer_head")
    e, m, y = tiny.embeds[:8], tiny.mask[:8], tiny.labels[:8]
    assert len(set(m.sum(1).tolist())) > 2  # really different lengths
    g_vmap = per_example_loss_grads(tiny.logits_fn, params, e, m, y)
    g_loop = per_example_loss_grads_loop(tiny.logits_fn, params, e, m, y)
    assert g_vmap.shape == (8, sum(p.numel() for p in params.values()))
    assert g_vmap.abs().max() > 1e-3
    torch.testing.assert_close(g_vmap, g_loop, atol=TOL, rtol=0)


def test_chunk_and_batch_invariance(tiny) -> None:
    params = tiny.scope("last_layer_head")
    e, m, y = tiny.embeds[:8], tiny.mask[:8], tiny.labels[:8]
    ref = per_example_loss_grads(tiny.logits_fn, params, e, m, y)
    for chunk in (1, 3):
        got = per_example_loss_grads(tiny.logits_fn, params, e, m, y, chunk_size=chunk)
        torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    # a sub-batch, trimmed to its own longest example, gives the same rows
    t = int(m[2:5].sum(1).max())
    sub = per_example_loss_grads(tiny.logits_fn, params, e[2:5, :t], m[2:5, :t], y[2:5])
    torch.testing.assert_close(sub, ref[2:5], atol=TOL, rtol=0)


def test_padding_does_not_change_an_example(tiny) -> None:
    params = tiny.scope("last_layer_head")
    i = min(range(len(tiny.lengths)), key=lambda k: tiny.lengths[k])
    length = tiny.lengths[i]
    assert length < tiny.embeds.shape[1]
    padded = per_example_loss_grads(
        tiny.logits_fn, params, tiny.embeds[i : i + 1], tiny.mask[i : i + 1], tiny.labels[i : i + 1]
    )
    bare = per_example_loss_grads(
        tiny.logits_fn,
        params,
        tiny.embeds[i : i + 1, :length],
        tiny.mask[i : i + 1, :length],
        tiny.labels[i : i + 1],
    )
    torch.testing.assert_close(padded, bare, atol=TOL, rtol=0)
