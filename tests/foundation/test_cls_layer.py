"""The scoped top's last layer at [CLS] only (model/cls_layer.py) against the whole layer.

Reference: ScopeSplit.top_every_token, which calls every scoped layer's own module at every
position (HF's BertLayer). On a tiny float64 BERT with perturbed scoped parameters and a
padded batch of different lengths, the CLS-only top must give the same logits, the same
jvp along a random parameter direction (Eq. 5's score), the same per-example gradients (vmap)
and the same gradient with respect to h_L. Tolerance: 1e-10 of the largest value (float64
round-off)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pairdots_server.core.grads import per_example_loss_grads
from pairdots_server.core.params import flatten
from pairdots_server.core.scoring import influence_jvp
from pairdots_server.model import cls_layer
from pairdots_server.model.scope import ScopeSpec
from pairdots_server.model.scope_split import ScopeSplit
from pairdots_server.model.task import Task

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-10
TEXTS = ["the movie was good .", "bad", "a long , long sentence here , not short"]


def _setup(task: Task, scope: ScopeSpec) -> tuple[ScopeSplit, dict[str, torch.Tensor],
                                                   torch.Tensor, torch.Tensor, torch.Tensor]:
    task.set_scope(scope)
    split = ScopeSplit.for_task(task)
    assert split is not None
    enc = task.encode(TEXTS)
    mask = enc.attention_mask  # [3,T], rows padded to the longest
    assert int(mask.sum(1).min()) < mask.shape[1]  # the batch has padding
    hidden = split.trunk(task.embed(enc.input_ids), mask)  # [3,T,D]
    g = torch.Generator().manual_seed(0)
    params = {
        k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        for k, v in task.scope_params().items()
    }
    labels = torch.tensor([1, 0, 1])
    return split, params, hidden, mask, labels


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    scale = float(ref.abs().max())
    assert scale > 0
    assert float((got - ref).abs().max()) <= TOL * scale, (got, ref)


@pytest.mark.parametrize("scope", [ScopeSpec(), ScopeSpec("last_n", 2)])
def test_cls_only_top_equals_the_whole_layer(tiny_task: Task, scope: ScopeSpec) -> None:
    split, params, hidden, mask, labels = _setup(tiny_task, scope)
    assert split.cls_only
    _close(split.top(params, hidden, mask), split.top_every_token(params, hidden, mask))

    # Eq. 5's score by one jvp along a random direction
    g = torch.Generator().manual_seed(1)
    s_test = torch.randn(sum(v.numel() for v in params.values()), generator=g,
                         dtype=torch.float64)
    _close(influence_jvp(split.top, params, s_test, hidden, mask, labels),
           influence_jvp(split.top_every_token, params, s_test, hidden, mask, labels))

    # per-example gradients (vmap over examples) with respect to every scoped parameter
    got = per_example_loss_grads(split.top, params, hidden, mask, labels)
    ref = per_example_loss_grads(split.top_every_token, params, hidden, mask, labels)
    _close(got, ref)
    # the query / attention-output / feed-forward weights of the last layer get a gradient
    last = f"{split.layer_prefix}{split.num_layers - 1}."
    names = list(params)
    offsets = torch.tensor([0] + [params[k].numel() for k in names]).cumsum(0)
    for part in ("attention.self.query.weight", "intermediate.dense.weight"):
        i = names.index(last + part)
        assert float(got[:, offsets[i]:offsets[i + 1]].abs().max()) > 0

    # and with respect to h_L (the trunk's output), e.g. for Eq. 8's first-order estimate
    def grad_h(fn: object) -> torch.Tensor:
        h = hidden.clone().requires_grad_(True)
        loss = F.cross_entropy(fn(params, h, mask), labels, reduction="sum")  # type: ignore[operator]
        return torch.autograd.grad(loss, h)[0]

    _close(grad_h(split.top), grad_h(split.top_every_token))
    assert flatten(params).numel() == s_test.numel()


def test_head_scope_has_no_layer_to_cut(tiny_task: Task) -> None:
    split, params, hidden, mask, _ = _setup(tiny_task, ScopeSpec("head"))
    assert not split.cls_only
    _close(split.top(params, hidden, mask), split.top_every_token(params, hidden, mask))


def test_a_pooler_that_reads_every_position_keeps_the_whole_layer(tiny_task: Task) -> None:
    """cls-only is exact only under a pooler of position 0: a mean pooler switches it off,
    and then top still equals the whole-layer path."""

    class MeanPooler(nn.Module):
        def __init__(self, dense: nn.Linear) -> None:
            super().__init__()
            self.dense = dense

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.dense(h.mean(1)))

    assert cls_layer.reads_first_position_only(tiny_task.model.base_model.pooler)
    tiny_task.model.base_model.pooler = MeanPooler(tiny_task.model.base_model.pooler.dense)
    assert not cls_layer.reads_first_position_only(tiny_task.model.base_model.pooler)
    split, params, hidden, mask, _ = _setup(tiny_task, ScopeSpec())
    assert not split.cls_only
    _close(split.top(params, hidden, mask), split.top_every_token(params, hidden, mask))


def test_unsupported_layers_are_recognised(tiny_task: Task) -> None:
    layer = tiny_task.model.base_model.encoder.layer[-1]
    assert cls_layer.supports(layer)
    layer.is_decoder = True
    assert not cls_layer.supports(layer)
    layer.is_decoder = False
    assert not cls_layer.supports(nn.Linear(2, 2))
