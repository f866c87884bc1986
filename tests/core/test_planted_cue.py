"""A planted-cue data set where the right pairing is known (issue: explanations that mean what
they say).

Every training sentence is neutral filler plus exactly one cue word, and the cue decides the
label: "zorp"/"quib" → positive, "blick"/"fexa" → negative, except that 2 of the 20 sentences of
each cue carry the flipped label (label noise the model must overrule). After fine-tuning a tiny
BERT until it classifies every clean sentence right, for a test sentence carrying "zorp":

* the most salient word by occlusion of the margin is "zorp", and for the other label it is
  not (explaining the two labels gives different words: error analysis is not one ranking
  times a constant);
* prediction-level influence (f = logit margin) ranks examples of the explained label as
  supporting, and the mislabelled sentences of that label's cues as the most opposing;
* word-level influence on c_zorp = m(x) − m(x with zorp → [UNK]) among the training examples
  that contain "zorp" ranks the correctly labelled ones as supporting and the two mislabelled
  ones as the most opposing;
* the responsible word (paper Eq. 8) of the top supporter is "zorp".

Influence is exact here: s_test by conjugate gradient to 1e-10 on the damped GGN of the whole
training set, and every training gradient computed (no prefilter).

Measured on this toy, not asserted (it is why word-level pairing is restricted to examples
that contain the word): over the whole training set, the top supporters of c_zorp are negative
examples ("fexa", "blick"), because upweighting them lowers the margin of the occluded input
x∖zorp more than that of x — the contrast moves through its baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from pairdots_server.core.batches import TensorBatches
from pairdots_server.core.curvature import Curvature, CurvatureOperator
from pairdots_server.core.grads import per_example_loss_grads
from pairdots_server.core.ihvp.cg import CGSolver
from pairdots_server.core.influence import token_influence_exact
from pairdots_server.core.measure import (
    grad_theta_margin,
    grad_theta_occlusion,
    margin,
    word_occlusion,
)
from pairdots_server.model.task import ScopeSpec, Task
from pairdots_server.model.train import TrainConfig, fine_tune
from pairdots_server.storage.data import Example
from pairdots_server.testing import (
    PLANTED_CUES,
    PLANTED_FILLER,
    make_tiny_task,
    planted_cue,
    planted_cue_examples,
)

CUES = PLANTED_CUES
FILLER = PLANTED_FILLER
FLIPPED = 2  # mislabelled sentences per cue


def clean(ex: Example) -> bool:
    return ex.label == CUES[planted_cue(ex.text) or ""]


@dataclass
class Planted:
    task: Task
    train: list[Example]
    params: dict[str, Tensor]
    grads: Tensor  # [N,P] per-example training-loss gradients
    op: CurvatureOperator
    unk: Tensor

    def encode(self, text: str) -> tuple[Tensor, Tensor, list[int | None], list[str]]:
        enc = self.task.encode([text], max_length=32)
        return self.task.embed(enc.input_ids).detach(), enc.attention_mask, enc.word_ids[0], \
            enc.words[0]

    def s_test(self, v: Tensor) -> Tensor:
        return CGSolver(self.op, damping=1e-3, max_iter=500, tol=1e-10).solve(v).x

    def influence(self, v: Tensor) -> Tensor:
        """Exact I(z_i, f) = -∇θL(z_i)ᵀ (H + δI)⁻¹ ∇θf for every training example -> [N]."""
        return -(self.grads @ self.s_test(v))


@pytest.fixture(scope="module")
def planted_model() -> Planted:
    torch.manual_seed(0)
    train = planted_cue_examples(20, FLIPPED, seed=0)
    task = make_tiny_task(list(FILLER) + list(CUES), seed=0, dtype=torch.float64)
    task.set_scope(ScopeSpec("default"))
    fine_tune(task, train, TrainConfig(
        epochs=100, batch_size=8, lr=3e-3, warmup_ratio=0.0, max_length=32, seed=0,
        max_steps=100,
    ))
    params = task.scope_params()
    enc = task.encode([ex.text for ex in train], max_length=32)
    embeds = task.embed(enc.input_ids).detach()
    labels = torch.tensor([ex.label for ex in train])
    with torch.no_grad():
        pred = task.logits_fn(params, embeds, enc.attention_mask).argmax(1)
    right = [int(p) == CUES[planted_cue(ex.text) or ""] for p, ex in zip(pred.tolist(), train)]
    assert all(right), f"the tiny model did not learn the planted cues ({sum(right)}/{len(train)})"
    grads = per_example_loss_grads(task.logits_fn, params, embeds, enc.attention_mask, labels)
    op = CurvatureOperator(
        task.logits_fn, params, TensorBatches(embeds, enc.attention_mask, labels), curvature=Curvature.GGN
    )
    unk = task.embed(torch.tensor([[task.unk_token_id]]))[0, 0].detach()
    return Planted(task, train, params, grads, op, unk)


def top(scores: Tensor, k: int = 5) -> list[int]:
    return [int(i) for i in torch.argsort(scores, descending=True)[:k]]


def test_margin_is_label_logit_minus_best_other() -> None:
    logits = torch.tensor([[1.0, 3.0, -2.0], [0.5, 0.25, 4.0]])
    got = margin(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(got, torch.tensor([3.0 - 1.0, 0.5 - 4.0]))


def test_occlusion_finds_the_cue(planted_model: Planted) -> None:
    pm = planted_model
    e, m, wid, words = pm.encode("the plot was zorp and the cast")
    c = word_occlusion(pm.task.logits_fn, pm.params, e, m, 1, wid, len(words), pm.unk)
    assert words[int(c.argmax())] == "zorp"
    # for the other label, the same word pulls the other way: its contribution is negated
    c0 = word_occlusion(pm.task.logits_fn, pm.params, e, m, 0, wid, len(words), pm.unk)
    torch.testing.assert_close(c0, -c, atol=1e-9, rtol=0)
    assert words[int(c0.argmax())] != "zorp"


def test_prediction_level_supporters_share_the_label(planted_model: Planted) -> None:
    pm = planted_model
    for text, y in (("the plot was zorp and the cast", 1), ("it was a blick story", 0)):
        e, m, _, _ = pm.encode(text)
        scores = pm.influence(grad_theta_margin(pm.task.logits_fn, pm.params, e, m, y))
        assert [pm.train[i].label for i in top(scores)] == [y] * 5
        # the most opposing: the mislabelled sentences of the cues of y (2 cues × FLIPPED)
        flipped = {i for i, ex in enumerate(pm.train) if not clean(ex) and ex.label != y}
        assert set(top(-scores, len(flipped))) == flipped


def test_word_level_pairing_among_examples_with_the_word(planted_model: Planted) -> None:
    pm = planted_model
    e, m, wid, words = pm.encode("the plot was zorp and the cast")
    pos = [t for t, w in enumerate(wid) if w is not None and words[w] == "zorp"]
    scores = pm.influence(grad_theta_occlusion(pm.task.logits_fn, pm.params, e, m, 1, pos, pm.unk))
    present = [i for i, ex in enumerate(pm.train) if "zorp" in ex.text.split()]
    ranked = sorted(present, key=lambda i: -float(scores[i]))
    assert all(clean(pm.train[i]) and scores[i] > 0 for i in ranked[:5])
    assert {i for i in ranked[-FLIPPED:]} == {i for i in present if not clean(pm.train[i])}
    assert all(scores[i] < 0 for i in ranked[-FLIPPED:])


def test_responsible_word_of_a_supporter_is_the_cue(planted_model: Planted) -> None:
    pm = planted_model
    e, m, wid, words = pm.encode("the plot was zorp and the cast")
    pos = [t for t, w in enumerate(wid) if w is not None and words[w] == "zorp"]
    s = pm.s_test(grad_theta_occlusion(pm.task.logits_fn, pm.params, e, m, 1, pos, pm.unk))
    scores = -(pm.grads @ s)
    present = [i for i, ex in enumerate(pm.train) if "zorp" in ex.text.split()]
    best = max(present, key=lambda i: float(scores[i]))
    ex = pm.train[best]
    te, tm, twid, twords = pm.encode(ex.text)
    per_token = token_influence_exact(pm.task.logits_fn, pm.params, s, te, tm, ex.label, pm.unk)
    per_word = [0.0] * len(twords)
    for t, w in enumerate(twid):
        if w is not None:
            per_word[w] += float(per_token[t])
    assert twords[max(range(len(twords)), key=lambda i: per_word[i])] == "zorp"
