"""Test helpers for the core: tiny BERT classifiers built in code (float64, eager attention) and
dense reference curvature matrices built with torch.autograd.functional."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import BertConfig, BertForSequenceClassification

from pairdots_server.core.aliases import LogitsFn
from pairdots_server.core.params import flatten, unflatten

VOCAB = 50
UNK_ID = 3
CLS_ID = 1
SEP_ID = 2


@dataclass
class Tiny:
    """A tiny BERT classifier plus a padded dataset of word embeddings."""

    model: BertForSequenceClassification
    logits_fn: LogitsFn
    embeds: Tensor  # [N,T,D]
    mask: Tensor  # [N,T]
    labels: Tensor  # [N]
    lengths: list[int]

    def scope(self, which: str) -> dict[str, Tensor]:
        """'head' (classifier), 'pooler_head', or 'last_layer_head' (last layer + pooler + head)."""
        last = self.model.config.num_hidden_layers - 1
        prefixes = {
            "head": ("classifier.",),
            "pooler_head": ("classifier.", "bert.pooler."),
            "last_layer_head": ("classifier.", "bert.pooler.", f"bert.encoder.layer.{last}."),
        }[which]
        return {
            n: p.detach() for n, p in self.model.named_parameters() if n.startswith(prefixes)
        }

    @property
    def unk_embed(self) -> Tensor:
        return self.model.get_input_embeddings().weight[UNK_ID].detach()


def make_model(
    seed: int = 0, hidden: int = 16, layers: int = 2, init: float = 0.2
) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
        initializer_range=init,  # wider than BERT's 0.02 so features differ between inputs
        attn_implementation="eager",
    )
    model = BertForSequenceClassification(cfg).double().eval()
    model.requires_grad_(False)  # only the scoped params (passed explicitly) are differentiated
    return model


def make_logits_fn(model: BertForSequenceClassification) -> LogitsFn:
    def logits_fn(params: Mapping[str, Tensor], e: Tensor, m: Tensor) -> Tensor:
        out = torch.func.functional_call(
            model, dict(params), args=(), kwargs={"inputs_embeds": e, "attention_mask": m},
            strict=False,
        )
        return out.logits

    return logits_fn


def make_tiny(n: int = 24, seed: int = 0, hidden: int = 16, layers: int = 2) -> Tiny:
    model = make_model(seed, hidden, layers)
    gen = torch.Generator().manual_seed(seed + 1)
    lengths = [int(x) for x in torch.randint(4, 11, (n,), generator=gen)]
    t = max(lengths)
    ids = torch.zeros(n, t, dtype=torch.long)
    mask = torch.zeros(n, t, dtype=torch.long)
    for i, length in enumerate(lengths):
        body = torch.randint(4, VOCAB, (length - 2,), generator=gen)
        ids[i, :length] = torch.cat([torch.tensor([CLS_ID]), body, torch.tensor([SEP_ID])])
        mask[i, :length] = 1
    # a learnable rule (+ noise): label 1 when low token ids dominate
    score = ((ids >= 4) & (ids < 27)).sum(1).double() - (ids >= 27).sum(1).double()
    labels = (score + torch.randn(n, generator=gen, dtype=torch.float64) > 0).long()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    return Tiny(model, make_logits_fn(model), embeds, mask, labels, lengths)


def explicit_ggn(tiny, params, n: int) -> Tensor:
    """(1/n) Σ_i J_iᵀ (diag p_i - p_i p_iᵀ) J_i for the first n examples -> [P,P]."""
    theta = flatten(params)
    e, m = tiny.embeds[:n], tiny.mask[:n]

    def logits(vec: Tensor) -> Tensor:
        return tiny.logits_fn(unflatten(vec, params), e, m)

    jac = torch.autograd.functional.jacobian(logits, theta)  # [n,C,P]
    p = torch.softmax(logits(theta), -1)  # [n,C]
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [n,C,C]
    return torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / n


def explicit_hessian(tiny, params, n: int) -> Tensor:
    """∇²θ of the mean cross-entropy over the first n examples -> [P,P]."""
    theta = flatten(params)
    e, m, y = tiny.embeds[:n], tiny.mask[:n], tiny.labels[:n]

    def loss(vec: Tensor) -> Tensor:
        return F.cross_entropy(tiny.logits_fn(unflatten(vec, params), e, m), y)

    return torch.autograd.functional.hessian(loss, theta)
