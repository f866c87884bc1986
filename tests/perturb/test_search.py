"""The batched greedy search (perturb/search.greedy_edits) returns the edits of the one-by-one
search it replaced: for each training example, Eq. 8 per word with the exact [UNK] copies,
Eq. 11's word plus T seeded random words, Eq. 12 over every substitute with per-example
gradients (Eq. 7), multi-word steps while the objective rises. The reference below is that
algorithm written out with per-example gradients (core/grads, no jvp); the batched search
must choose the same substitutions with the same I(z, f), I(z̃, f) and tracked values
(float64, rel 1e-9), for attack (replace) and repair (add), one and two words."""

from __future__ import annotations

import random

import pytest
import torch

from pairdots_server.core.grads import per_example_loss_grads
from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import InfluenceSettings
from pairdots_server.influence.solver_policy import SolverChoice, SolverSettings
from pairdots_server.perturb.lexicon import default_lexicon
from pairdots_server.perturb.objectives import search_rng
from pairdots_server.perturb.search import (
    SearchSettings,
    Substitution,
    greedy_edits,
    substitute_words,
    word_substitutes,
)
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.storage.data import Example
from pairdots_server.testing import make_tiny_bundle, tiny_examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CG = SolverSettings(method=SolverChoice.CG, max_iterations=40, damping=0.01)
N_TRAIN = 24


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    path = make_tiny_bundle(tmp_path_factory.mktemp("search"), "tiny", n_train=N_TRAIN,
                            dtype=torch.float64)
    return ModelRuntime(load_bundle(path))


def s_tests(rt: ModelRuntime) -> tuple[torch.Tensor, torch.Tensor]:
    """Two margin s_tests of dev sentences: the objective's and the tracked one."""
    settings = InfluenceSettings(solver=CG, use_index=False).resolve(rt, default_candidates=8)
    out = []
    for ex in tiny_examples(2, split="dev"):
        enc = steps.encode_text(rt, ex.text)
        m = steps.Measurement(steps.MeasurementKind.PREDICTION_MARGIN, ex.label)
        out.append(steps.measurement_s_test(rt, enc, m, settings, lambda: None)[0])
    return out[0], out[1]


def reference_scores(rt: ModelRuntime, s: torch.Tensor, texts: list[str],
                     label: int) -> list[float]:
    """-s_testᵀ∇θL(z) from per-example gradients (Eq. 5)."""
    enc = rt.encode_texts(texts, [label] * len(texts))
    g = per_example_loss_grads(rt.task.logits_fn, rt.params, enc.embeds, enc.mask, enc.labels)
    return (-(g @ s.to(g.dtype))).tolist()


def reference_edit(rt: ModelRuntime, s: torch.Tensor, track: torch.Tensor, ex: Example,
                   d: int, search: SearchSettings, rng: random.Random,
                   ) -> tuple[list[Substitution], float, float, float, float] | None:
    """The one-example search: (substitutions, I(z), I(z̃), tracked I(z), tracked I(z̃))."""
    enc = steps.encode_text(rt, ex.text)
    lex = default_lexicon()
    subs = {wi: c for wi, w in enumerate(enc.words) if enc.pieces[wi] > 0
            and (c := word_substitutes(lex, w, search.relations, search.max_substitutes,
                                       search.pos_agreement))}
    if not subs:
        return None
    totals = steps.word_attribution(rt, s, enc, ex.label)  # Eq. 8, exact [UNK] copies
    greedy = max(subs, key=lambda w: (-d * totals[w], -w))  # Eq. 11
    others = sorted(w for w in subs if w != greedy)
    rng.shuffle(others)
    words = [greedy] + others[: search.random_candidates]
    base = reference_scores(rt, s, [ex.text], ex.label)[0]
    best: list[Substitution] = []
    best_value, best_score, best_text = 0.0, None, ex.text
    for _ in range(search.max_words):
        taken = {b.word_index for b in best}
        opts = [[*best, Substitution(wi, enc.words[wi], sub, rel, enc.spans[wi])]
                for wi in words if wi not in taken for sub, rel in subs[wi]]
        if not opts:
            break
        texts = [substitute_words(ex.text, o) for o in opts]
        scores = reference_scores(rt, s, texts, ex.label)
        values = [d * (v - (0.0 if search.additive else base)) for v in scores]
        k = max(range(len(opts)), key=lambda k: (values[k], -k))  # Eq. 12
        if not values[k] > best_value:
            break
        best, best_value, best_score, best_text = opts[k], values[k], scores[k], texts[k]
    if best_score is None:
        return None
    t0, t1 = reference_scores(rt, track, [ex.text, best_text], ex.label)
    return best, base, best_score, t0, t1


@pytest.mark.parametrize("direction,additive,max_words", [
    (-1, False, 1),  # attack, DEMOTE-like
    (1, False, 2),  # attack, PROMOTE-like, two words
    (1, True, 1),  # repair: added examples, synonyms and antonyms
])
def test_batched_search_matches_the_one_by_one_search(
    rt: ModelRuntime, direction: int, additive: bool, max_words: int
) -> None:
    s, track = s_tests(rt)
    relations = ("synonym", "antonym") if additive else ("synonym",)
    search = SearchSettings(random_candidates=1, max_substitutes=4, relations=relations,
                            batch_size=7, max_words=max_words, additive=additive)
    train = list(rt.bundle.train)
    got = greedy_edits(rt, s, train, direction, default_lexicon(), search,
                       [search_rng(3, i) for i in range(len(train))], track=track[None])
    found = eq11_used = 0
    for i, (ex, edit) in enumerate(zip(train, got, strict=True)):
        want = reference_edit(rt, s, track, ex, direction, search, search_rng(3, i))
        enc = steps.encode_text(rt, ex.text)
        n_subs = sum(1 for wi, w in enumerate(enc.words) if enc.pieces[wi] > 0
                     and word_substitutes(default_lexicon(), w, relations, 4, True))
        eq11_used += n_subs > 2  # more words than T + 1: Eq. 11 decides the candidates
        if want is None:
            assert edit is None, (i, edit)
            continue
        assert edit is not None, i
        found += 1
        subs, before, after, t0, t1 = want
        assert list(edit.edit.substitutions) == subs
        assert edit.edit.new_text == substitute_words(ex.text, subs)
        assert edit.influence_before == pytest.approx(before, rel=1e-9, abs=1e-12)
        assert edit.influence_after == pytest.approx(after, rel=1e-9, abs=1e-12)
        assert edit.tracked_before == pytest.approx((t0,), rel=1e-9, abs=1e-12)
        assert edit.tracked_after == pytest.approx((t1,), rel=1e-9, abs=1e-12)
    assert found >= N_TRAIN // 2 and eq11_used >= 2, (found, eq11_used)
