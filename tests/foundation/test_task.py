"""The model adapter: scope selection, encoding/word alignment, logits_fn, vmap, loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.func import functional_call, grad, vmap

from pairdots_server.errors import InvalidArgument
from pairdots_server.model.scope import ScopeSpec
from pairdots_server.model.task import Task

TEXTS = [
    "I loved it!",
    "the movie was boring , not good .",
    "a great film",
    "awful",
]

HEAD = [
    "bert.pooler.dense.weight",
    "bert.pooler.dense.bias",
    "classifier.weight",
    "classifier.bias",
]


def _layer_names(task: Task, i: int) -> list[str]:
    return [n for n, _ in task.model.named_parameters() if n.startswith(f"bert.encoder.layer.{i}.")]


# -- ScopeSpec --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"kind": "everything"}, "scope.kind"),
        ({"kind": "last_n", "n": 0}, "scope.n"),
        ({"kind": "pattern", "pattern": ""}, "scope.pattern"),
        ({"kind": "pattern", "pattern": "layer.(1"}, "scope.pattern"),
    ],
)
def test_scope_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        ScopeSpec(**kwargs)  # type: ignore[arg-type]
    assert info.value.violations[0].field == field


def test_scope_selection_kinds(tiny_task: Task) -> None:
    m = tiny_task.model
    all_names = [n for n, _ in m.named_parameters()]
    layer1 = _layer_names(tiny_task, 1)
    layer0 = _layer_names(tiny_task, 0)
    assert len(layer1) == 16 and len(layer0) == 16
    assert ScopeSpec().select(m) == layer1 + HEAD
    assert ScopeSpec("head").select(m) == HEAD
    assert ScopeSpec("last_n", n=1).select(m) == layer1 + HEAD
    assert ScopeSpec("last_n", n=2).select(m) == layer0 + layer1 + HEAD
    assert ScopeSpec("all").select(m) == [n for n in all_names if "word_embeddings" not in n]
    assert ScopeSpec("pattern", pattern=r"^classifier\.").select(m) == HEAD[2:]
    with pytest.raises(InvalidArgument, match="2 encoder layers"):
        ScopeSpec("last_n", n=3).select(m)
    with pytest.raises(InvalidArgument, match="selects no parameter"):
        ScopeSpec("pattern", pattern="nothing-like-this").select(m)


def test_scope_unknown_layout() -> None:
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Linear(3, 3)
            self.out = torch.nn.Linear(3, 2)

    odd = Odd()
    for kind in ("default", "head", "last_n"):
        with pytest.raises(InvalidArgument, match="pattern"):
            ScopeSpec(kind).select(odd)
    assert ScopeSpec("pattern", pattern="^out").select(odd) == ["out.weight", "out.bias"]
    assert ScopeSpec("all").select(odd) == ["body.weight", "body.bias", "out.weight", "out.bias"]


def test_scope_dict_roundtrip_and_describe() -> None:
    for spec in (ScopeSpec(), ScopeSpec("last_n", 3), ScopeSpec("pattern", pattern="x")):
        assert ScopeSpec.from_dict(spec.to_dict()) == spec
        assert spec.describe()
    assert "last 3" in ScopeSpec("last_n", 3).describe()
    with pytest.raises(InvalidArgument, match="unknown keys"):
        ScopeSpec.from_dict({"kind": "head", "layers": 2})


def test_scope_params_are_detached_views(tiny_task: Task) -> None:
    params = tiny_task.scope_params()
    assert list(params) == tiny_task.scope_names
    live = dict(tiny_task.model.named_parameters())
    for name, t in params.items():
        assert not t.requires_grad
        assert t.data_ptr() == live[name].data_ptr()
    tiny_task.set_scope(ScopeSpec("head"))
    assert list(tiny_task.scope_params()) == HEAD


# -- encoding ---------------------------------------------------------------------------------


def test_encode_words_and_alignment(tiny_task: Task) -> None:
    texts = ["loved it!", "Xyzzy, the movie"]
    enc = tiny_task.encode(texts)
    assert enc.words == [["loved", "it", "!"], ["Xyzzy", ",", "the", "movie"]]
    for b, text in enumerate(texts):
        assert [text[s:e] for s, e in enc.word_spans[b]] == enc.words[b]
    T = enc.input_ids.shape[1]
    assert enc.input_ids.shape == enc.attention_mask.shape == (2, T)
    tok = tiny_task.tokenizer
    # "loved it!" → [CLS] loved it ! [SEP] [PAD]...
    assert enc.word_ids[0][:5] == [None, 0, 1, 2, None]
    assert tok.convert_ids_to_tokens(enc.input_ids[0, 1:4].tolist()) == ["loved", "it", "!"]
    assert enc.attention_mask[0].sum() == 5
    assert all(w is None for w in enc.word_ids[0][5:])
    assert enc.input_ids[0, 5:].eq(tok.pad_token_id).all()
    # "Xyzzy" is not in the vocabulary: five word pieces x ##y ##z ##z ##y, all word 0
    pieces = [
        t
        for t, w in zip(tok.convert_ids_to_tokens(enc.input_ids[1].tolist()), enc.word_ids[1])
        if w == 0
    ]
    assert pieces == ["x", "##y", "##z", "##z", "##y"]
    assert enc.word_ids[1].count(0) == 5 and enc.word_ids[1].count(3) == 1
    assert enc.attention_mask[1].sum() == T  # the longest text sets the padded length


def test_encode_truncation_and_errors(tiny_task: Task) -> None:
    enc = tiny_task.encode(["the movie " * 50], max_length=16)
    assert enc.input_ids.shape == (1, 16)
    assert enc.word_ids[0][-1] is None and enc.word_ids[0][-2] == 13
    assert len(enc.words[0]) == 100  # words beyond the cut are kept, without tokens
    with pytest.raises(InvalidArgument):
        tiny_task.encode("a single string")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        tiny_task.encode([])


def test_special_and_unk_ids(tiny_task: Task) -> None:
    tok = tiny_task.tokenizer
    assert tiny_task.unk_token_id == tok.convert_tokens_to_ids("[UNK]") == 1
    assert tiny_task.special_ids == {0, 1, 2, 3, 4}
    assert tiny_task.labels == ["negative", "positive"] and tiny_task.num_labels == 2


# -- logits / loss ----------------------------------------------------------------------------


def test_logits_fn_equals_model_logits(tiny_task: Task) -> None:
    enc = tiny_task.encode(TEXTS)
    with torch.no_grad():
        ref = tiny_task.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        got = tiny_task.logits_fn(
            tiny_task.scope_params(), tiny_task.embed(enc.input_ids), enc.attention_mask
        )
    assert got.shape == (4, 2)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # padding does not change an example's logits (the mask is applied)
    short = tiny_task.encode(TEXTS[3:])  # "awful" alone: no padding
    assert enc.attention_mask[3].sum() < enc.input_ids.shape[1]
    with torch.no_grad():
        alone = tiny_task.forward_ids(short.input_ids, short.attention_mask)
    torch.testing.assert_close(alone[0], got[3], rtol=0, atol=1e-12)


def test_logits_fn_uses_given_params(tiny_task: Task) -> None:
    enc = tiny_task.encode(TEXTS)
    params = {k: v.clone() for k, v in tiny_task.scope_params().items()}
    params["classifier.weight"] = torch.zeros_like(params["classifier.weight"])
    params["classifier.bias"] = torch.tensor([0.25, -0.5], dtype=torch.float64)
    out = tiny_task.logits_fn(params, tiny_task.embed(enc.input_ids), enc.attention_mask)
    torch.testing.assert_close(out, torch.tensor([[0.25, -0.5]] * 4, dtype=torch.float64))
    # and the model itself is untouched
    assert tiny_task.model.classifier.weight.abs().sum() > 0


def test_loss_and_predict(tiny_task: Task) -> None:
    logits = torch.tensor([[2.0, -1.0], [0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    want = -torch.log_softmax(logits, -1)[torch.arange(2), y]
    torch.testing.assert_close(tiny_task.loss(logits, y), want, rtol=0, atol=1e-15)
    probs = tiny_task.predict(TEXTS, batch_size=3)
    assert probs.shape == (4, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=torch.float64))
    enc = tiny_task.encode(TEXTS)
    with torch.no_grad():
        ref = tiny_task.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    torch.testing.assert_close(probs, ref.softmax(-1), rtol=0, atol=1e-12)


def test_vmap_per_example_grads_match_loop(tiny_task: Task) -> None:
    """torch.func.vmap over single examples (E[None]) gives the same ∇θ L(z_i) as a loop."""
    enc = tiny_task.encode(TEXTS)
    E = tiny_task.embed(enc.input_ids)  # [B,T,D]
    y = torch.tensor([1, 0, 1, 0])
    params = {k: v.clone() for k, v in tiny_task.scope_params().items()}

    def loss_one(
        p: dict[str, torch.Tensor], e: torch.Tensor, m: torch.Tensor, yy: torch.Tensor
    ) -> torch.Tensor:
        return tiny_task.loss(tiny_task.logits_fn(p, e[None], m[None]), yy[None]).sum()

    batched = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(params, E, enc.attention_mask, y)
    for i in range(len(TEXTS)):
        one = grad(loss_one)(params, E[i], enc.attention_mask[i], y[i])
        for k in params:
            torch.testing.assert_close(batched[k][i], one[k], rtol=0, atol=1e-12)
    assert batched["classifier.weight"].abs().sum() > 0


def test_double_backward_through_attention(tiny_task: Task) -> None:
    """∇θ (w · e) with w = ∇_E log p(y|x) (Eq. 5's ∇θ w) needs eager attention."""
    enc = tiny_task.encode(TEXTS[:2])
    params = {k: v.clone().requires_grad_(True) for k, v in tiny_task.scope_params().items()}
    E = tiny_task.embed(enc.input_ids).detach().requires_grad_(True)
    logp = torch.log_softmax(tiny_task.logits_fn(params, E, enc.attention_mask), -1)[:, 1].sum()
    (w,) = torch.autograd.grad(logp, E, create_graph=True)  # [B,T,D]
    score = (w * E).sum()
    g = torch.autograd.grad(score, list(params.values()))
    assert all(torch.isfinite(t).all() for t in g)
    assert sum(float(t.abs().sum()) for t in g) > 0


def test_functional_call_strict_false_matches(tiny_task: Task, tiny_dir: Path) -> None:
    """Swapping in θ_scope equal to the model's own gives the model's logits (contract)."""
    enc = tiny_task.encode(TEXTS)
    mask4 = tiny_task.additive_mask(enc.attention_mask, torch.float64)
    out = functional_call(
        tiny_task.model, {}, args=(), kwargs={"input_ids": enc.input_ids, "attention_mask": mask4}
    ).logits
    ref = tiny_task.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert mask4.shape == (4, 1, 1, enc.input_ids.shape[1])


def test_label_count_mismatch(tiny_dir: Path) -> None:
    with pytest.raises(InvalidArgument, match="labels"):
        Task.from_pretrained(tiny_dir, labels=["a", "b", "c"], num_labels=2)
    t = Task.from_pretrained(tiny_dir, num_labels=3)
    assert t.labels == ["label_0", "label_1", "label_2"]
    assert t.model.classifier.out_features == 3
