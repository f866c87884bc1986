"""Attack (paper §4.2, Eq. 9–12) on a tiny float64 bundle: every edit's Eq. 7 influence change,
recomputed independently with the reference per-example gradients, has the intended sign and
equals the reported value; substitutions keep the rest of the text intact."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from nltk.stem.porter import PorterStemmer

from pairdots_server.core.grads import per_example_loss_grads_loop
from pairdots_server.core.influence import perturbed_influence
from pairdots_server.core.measure import grad_theta_margin, word_occlusion
from pairdots_server.core.saliency import grad_theta_word_score, token_saliency, word_scores
from pairdots_server.errors import InvalidArgument
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import InfluenceSettings, WordMeasurement
from pairdots_server.influence.solver_policy import SolverChoice, SolverSettings, solve_s_test
from pairdots_server.perturb.attack import (
    DEMOTE,
    LOWER_MARGIN,
    PROMOTE,
    AttackMode,
    AttackQuery,
    run_attack,
    wrong_label,
)
from pairdots_server.perturb.objectives import Edit, flip_budget
from pairdots_server.perturb.search import substitute_word
from pairdots_server.perturb.vocabulary import is_substitutable
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.storage.data import Example
from pairdots_server.testing import make_tiny_bundle, tiny_examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CG = SolverSettings(method=SolverChoice.CG, max_iterations=40, damping=0.01)
# the paper's measurement (f = the word's saliency score, Eq. 5); the default is tested below
SETTINGS = InfluenceSettings(solver=CG, use_index=False,
                             word_measurement=WordMeasurement.SALIENCY)
N_TRAIN = 48
TESTS = tuple(tiny_examples(3, split="dev"))


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    root = tmp_path_factory.mktemp("attack")
    path = make_tiny_bundle(root, "tiny", n_train=N_TRAIN, dtype=torch.float64)
    return ModelRuntime(load_bundle(path))


def attack(rt: ModelRuntime, mode: AttackMode, n: int = 2, seed: int = 0) -> list[Edit]:
    q = AttackQuery(TESTS, mode, n, random_candidates=3, influence=SETTINGS, seed=seed)
    return run_attack(rt, q, lambda: None, default_candidates=N_TRAIN).edits


def independent_s_test(rt: ModelRuntime, text: str, label: int) -> torch.Tensor:
    """s_test for the top salient word of text for label, from the core functions."""
    enc = rt.task.encode([text], max_length=rt.max_length)
    e = rt.task.embed(enc.input_ids).detach()
    tok = token_saliency(rt.task.logits_fn, rt.params, e, enc.attention_mask, label,
                         SETTINGS.target, SETTINGS.token_score, baseline=rt.unk_embed)
    ws = word_scores(tok, enc.word_ids[0], len(enc.words[0]))
    top = int(torch.argmax(ws.abs()))
    pos = [t for t, w in enumerate(enc.word_ids[0]) if w == top]
    g_w = grad_theta_word_score(rt.task.logits_fn, rt.params, e, enc.attention_mask, label,
                                SETTINGS.target, SETTINGS.token_score, pos,
                                baseline=rt.unk_embed)
    s_test, _ = solve_s_test(rt, g_w, CG, lambda: None)
    return s_test


def eq7_change(rt: ModelRuntime, s_test: torch.Tensor, edit: Edit) -> float:
    """I(z, z̃, w) = -s_testᵀ(∇θL(z̃) - ∇θL(z)) with the loop reference gradients."""
    grads = []
    for text in (edit.original_text, edit.new_text):
        enc = rt.task.encode([text], max_length=rt.max_length)
        e = rt.task.embed(enc.input_ids).detach()
        y = torch.tensor([edit.label])
        grads.append(per_example_loss_grads_loop(rt.task.logits_fn, rt.params, e,
                                                 enc.attention_mask, y))
    return float(perturbed_influence(s_test, grads[0], grads[1])[0])


def check_text_intact(rt: ModelRuntime, edit: Edit) -> None:
    words = rt.task.split_words(edit.original_text)
    word, (start, end) = words[edit.word_index]
    assert word == edit.original_word and is_substitutable(word)
    assert edit.new_text == edit.original_text[:start] + edit.substitute + edit.original_text[end:]
    assert edit.substitute != edit.original_word


@pytest.mark.parametrize("mode,label_of,sign", [
    (AttackMode.DEMOTE_SALIENT, "gold", -1.0),
    (AttackMode.PROMOTE_WRONG, "wrong", 1.0),
])
def test_single_objective_modes_move_influence_the_intended_way(
    rt: ModelRuntime, mode: AttackMode, label_of: str, sign: float
) -> None:
    edits = attack(rt, mode)
    assert len(edits) == 2 * len(TESTS)
    assert len({e.train_index for e in edits}) == len(edits)  # no training example twice
    for e in edits:
        ex = TESTS[e.example_index]
        label = ex.label if label_of == "gold" else wrong_label(rt, ex.text, ex.label)
        s_test = independent_s_test(rt, ex.text, label)
        change = eq7_change(rt, s_test, e)
        assert sign * change > 0, e
        assert change == pytest.approx(e.influence_change, rel=1e-6, abs=1e-12)
        assert e.objective == (DEMOTE if sign < 0 else PROMOTE)
        assert e.label == rt.bundle.train[e.train_index].label
        assert e.original_text == rt.bundle.train[e.train_index].text
        assert e.relation == "synonym"
        check_text_intact(rt, e)


def test_combined_does_both_without_duplicates(rt: ModelRuntime) -> None:
    edits = attack(rt, AttackMode.COMBINED, n=2)
    assert len({e.train_index for e in edits}) == len(edits)
    for k in range(len(TESTS)):
        mine = [e for e in edits if e.example_index == k]
        assert [e.objective for e in mine] == [DEMOTE, PROMOTE]
        for e in mine:
            assert (e.influence_change < 0) == (e.objective == DEMOTE)


def test_random_baseline_same_budget(rt: ModelRuntime) -> None:
    out = run_attack(rt, AttackQuery(TESTS, AttackMode.RANDOM, 3, seed=7), lambda: None,
                     default_candidates=N_TRAIN)
    assert len(out.edits) == 3 * len(TESTS)
    assert len({e.train_index for e in out.edits}) == len(out.edits)
    for e in out.edits:
        check_text_intact(rt, e)
        assert e.influence_change == 0.0
    again = run_attack(rt, AttackQuery(TESTS, AttackMode.RANDOM, 3, seed=7), lambda: None,
                       default_candidates=N_TRAIN)
    assert again.edits == out.edits  # seeded
    # no low-rank GGN in this bundle: the baseline solves no s_test, so no request effect
    assert all(r.request_predicted_margin_change is None and not r.predicted_flip
               for r in out.reports)


def test_perturbed_training_set_replaces(rt: ModelRuntime) -> None:
    out = run_attack(rt, AttackQuery(TESTS[:1], AttackMode.DEMOTE_SALIENT, 2,
                                     random_candidates=2, influence=SETTINGS),
                     lambda: None, default_candidates=N_TRAIN)
    assert len(out.train) == rt.n_train
    changed = {e.train_index: e for e in out.edits}
    for i, (new, old) in enumerate(zip(out.train, rt.bundle.train, strict=True)):
        assert new.label == old.label
        assert new.text == (changed[i].new_text if i in changed else old.text)


def test_substitute_word_keeps_everything_else() -> None:
    text = "it 's  good, really!"
    assert substitute_word(text, (7, 11), "fine") == "it 's  fine, really!"
    with pytest.raises(ValueError):
        substitute_word(text, (5, 99), "x")


def test_bad_label_is_refused(rt: ModelRuntime) -> None:
    q = AttackQuery((Example("a good film", 5),), AttackMode.DEMOTE_SALIENT, 1)
    with pytest.raises(InvalidArgument) as info:
        run_attack(rt, q, lambda: None, default_candidates=N_TRAIN)
    assert info.value.violations[0].field == "examples[0].label"


def test_cancel_stops_the_attack(rt: ModelRuntime) -> None:
    from pairdots_server.errors import Cancelled

    def stop() -> None:
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        run_attack(rt, AttackQuery(TESTS, AttackMode.DEMOTE_SALIENT, 1, influence=SETTINGS),
                   stop, default_candidates=N_TRAIN)



# -- the default measurement, the prediction-margin mode, multi-word edits, flip budget ---------

DEFAULT = InfluenceSettings(solver=CG, use_index=False)  # word_measurement MARGIN (Explain's)


def margin_s_test(rt: ModelRuntime, text: str, label: int) -> torch.Tensor:
    """s_test for f = m_y(x) from the core functions (independent of perturb/)."""
    enc = rt.task.encode([text], max_length=rt.max_length)
    e = rt.task.embed(enc.input_ids).detach()
    g = grad_theta_margin(rt.task.logits_fn, rt.params, e, enc.attention_mask, label)
    s_test, _ = solve_s_test(rt, g, CG, lambda: None)
    return s_test


def multi_eq7(rt: ModelRuntime, s_test: torch.Tensor, original: str, new: str, label: int) -> float:
    grads = []
    for text in (original, new):
        enc = rt.task.encode([text], max_length=rt.max_length)
        e = rt.task.embed(enc.input_ids).detach()
        grads.append(per_example_loss_grads_loop(rt.task.logits_fn, rt.params, e,
                                                 enc.attention_mask, torch.tensor([label])))
    return float(perturbed_influence(s_test, grads[0], grads[1])[0])


def test_default_demote_lowers_the_margin_among_examples_with_the_word(rt: ModelRuntime) -> None:
    """DEMOTE on the default measurement: f = m_y, sources contain the top-c_w word, and each
    edit's Eq. 7 change of I(z, m_y) is negative and matches an independent recomputation;
    predicted_change = change / N."""
    out = run_attack(rt, AttackQuery(TESTS, AttackMode.DEMOTE_SALIENT, 2, random_candidates=2,
                                     influence=DEFAULT), lambda: None, default_candidates=N_TRAIN)
    assert out.edits, out.notes
    for e in out.edits:
        ex = TESTS[e.example_index]
        enc = rt.task.encode([ex.text], max_length=rt.max_length)
        emb = rt.task.embed(enc.input_ids).detach()
        c = word_occlusion(rt.task.logits_fn, rt.params, emb, enc.attention_mask, ex.label,
                           enc.word_ids[0], len(enc.words[0]), rt.unk_embed)
        words = list(enc.words[0])
        top = max((i for i in range(len(words)) if any(ch.isalnum() for ch in words[i])),
                  key=lambda i: (float(c[i]), -i))
        stem = PorterStemmer().stem(words[top].lower())
        source_stems = {PorterStemmer().stem(w.lower()) for w, _ in
                        rt.task.split_words(e.original_text)}
        assert stem in source_stems, (words[top], e.original_text)
        change = eq7_change(rt, margin_s_test(rt, ex.text, ex.label), e)
        assert change < 0
        assert change == pytest.approx(e.influence_change, rel=1e-6, abs=1e-12)
        assert e.predicted_change == pytest.approx(change / rt.n_train, rel=1e-6, abs=1e-15)
        # f is the margin itself: the tracked margin change is the same number
        assert e.predicted_margin_change == pytest.approx(e.predicted_change, rel=1e-6,
                                                          abs=1e-15)
    for rep in out.reports:
        mine = [e for e in out.edits if e.example_index == rep.example_index]
        assert rep.edits == len(mine)
        assert rep.predicted_margin_change == pytest.approx(
            sum(e.predicted_margin_change for e in mine))
        assert rep.targets[0].measurement == "prediction_margin"


def test_prediction_margin_mode_lowers_the_margin(rt: ModelRuntime) -> None:
    out = run_attack(rt, AttackQuery(TESTS, AttackMode.PREDICTION_MARGIN, 2,
                                     random_candidates=2, influence=DEFAULT),
                     lambda: None, default_candidates=N_TRAIN)
    assert len(out.edits) == 2 * len(TESTS)
    assert len({e.train_index for e in out.edits}) == len(out.edits)
    for e in out.edits:
        ex = TESTS[e.example_index]
        change = eq7_change(rt, margin_s_test(rt, ex.text, ex.label), e)
        assert change < 0 and e.objective == LOWER_MARGIN
        assert change == pytest.approx(e.influence_change, rel=1e-6, abs=1e-12)
        assert e.predicted_margin_change == pytest.approx(change / rt.n_train, rel=1e-6,
                                                          abs=1e-15)


def test_multi_word_edits_go_further_than_one_word(rt: ModelRuntime) -> None:
    """max_words = 3: the text is the original with every listed substitution and nothing
    else; its exact Eq. 7 change is the reported one and at least as far as the one-word edit
    of the same source (the greedy extends the best single substitution)."""
    q1 = AttackQuery(TESTS[:1], AttackMode.PREDICTION_MARGIN, 4, random_candidates=3,
                     influence=DEFAULT)
    q3 = AttackQuery(TESTS[:1], AttackMode.PREDICTION_MARGIN, 4, random_candidates=3,
                     influence=DEFAULT, max_words=3)
    out1 = run_attack(rt, q1, lambda: None, default_candidates=N_TRAIN)
    one = out1.edits
    three = run_attack(rt, q3, lambda: None, default_candidates=N_TRAIN).edits
    # one request example: the request-wide effect and budget are its own
    rep = out1.reports[0]
    assert rep.request_predicted_margin_change == pytest.approx(rep.predicted_margin_change,
                                                                rel=1e-6, abs=1e-15)
    assert (rep.request_flip_budget, rep.request_flip_budget_reached) == (
        rep.flip_budget, rep.flip_budget_reached)
    assert one[0].train_index == three[0].train_index
    assert three[0].influence_change <= one[0].influence_change
    s_test = margin_s_test(rt, TESTS[0].text, TESTS[0].label)
    assert any(len(e.substitutions) > 1 for e in three)
    for e in three:
        assert 1 <= len(e.substitutions) <= 3
        words = rt.task.split_words(e.original_text)
        text = e.original_text
        for wi, original, sub, _ in sorted(e.substitutions, key=lambda s: -words[s[0]][1][0]):
            word, (start, end) = words[wi]
            assert word == original
            text = text[:start] + sub + text[end:]
        assert text == e.new_text
        change = multi_eq7(rt, s_test, e.original_text, e.new_text, e.label)
        assert change == pytest.approx(e.influence_change, rel=1e-6, abs=1e-12)
    with pytest.raises(InvalidArgument):
        AttackQuery(TESTS, AttackMode.RANDOM, 1, max_words=0)


@pytest.mark.parametrize("margin,changes,want", [
    (1.0, [-0.4, -0.4, -0.4], (3, True)),  # crosses at the third edit
    (1.0, [-0.6, -0.6], (2, True)),
    (1.0, [-0.1, -0.1], (10, False)),  # extrapolated: 1.0 / 0.1
    (1.0, [0.2, -0.1], (0, False)),  # net away from zero: never
    (-0.5, [0.2, 0.2], (3, False)),  # repair: a negative margin raised; ceil(0.5/0.2)
    (1.0, [], (0, False)),
])
def test_flip_budget(margin: float, changes: list[float], want: tuple[int, bool]) -> None:
    assert flip_budget(margin, changes) == want


def test_adaptive_n_stops_at_the_predicted_flip(rt: ModelRuntime) -> None:
    """adaptive: an example's edits stop at the first one whose cumulative predicted margin
    change crosses -margin (then flip_budget = edits, reached); an example that does not get
    there takes n. The first example's search is the fixed-n search cut at its flip budget
    (later examples differ: the training examples it did not use stay available)."""
    kw = {"random_candidates": 2, "influence": DEFAULT}
    n = 12
    fixed = run_attack(rt, AttackQuery(TESTS, AttackMode.PREDICTION_MARGIN, n, **kw),
                       lambda: None, default_candidates=N_TRAIN)
    adaptive = run_attack(rt, AttackQuery(TESTS, AttackMode.PREDICTION_MARGIN, n,
                                          adaptive=True, **kw),
                          lambda: None, default_candidates=N_TRAIN)
    stopped = 0
    for ra in adaptive.reports:
        ae = [e for e in adaptive.edits if e.example_index == ra.example_index]
        assert ra.edits == len(ae)
        if ra.margin <= 0:  # misclassified already: lowering its margin never "flips" it
            assert len(ae) == n
            continue
        partial = [ra.margin + sum(e.predicted_margin_change for e in ae[:k])
                   for k in range(1, len(ae) + 1)]
        assert all(p > 0 for p in partial[:-1])
        if partial and partial[-1] <= 0:
            stopped += 1
            assert ra.flip_budget_reached and ra.flip_budget == len(ae)
        else:
            assert len(ae) == n and not ra.flip_budget_reached
    assert stopped >= 1, [(r.margin, r.predicted_margin_change) for r in fixed.reports]
    f0 = [e for e in fixed.edits if e.example_index == 0]
    a0 = [e for e in adaptive.edits if e.example_index == 0]
    assert f0[: len(a0)] == a0
    assert fixed.reports[0].flip_budget == (len(a0) if adaptive.reports[0].flip_budget_reached
                                            else fixed.reports[0].flip_budget)


def test_request_effect_sums_every_edit_of_the_request(rt: ModelRuntime) -> None:
    """A retrain sees every edit, so each example's request_predicted_margin_change is
    Σ over ALL the request's edits of (I(z̃, m_k) − I(z, m_k))/N, recomputed here with the loop
    reference gradients and an independent CG s_test of m_k; predicted_flip is its sign
    change. The other examples' edits count: the sum differs from the own-edit sum."""
    out = run_attack(rt, AttackQuery(TESTS, AttackMode.PREDICTION_MARGIN, 2, random_candidates=2,
                                     influence=DEFAULT),
                     lambda: None, default_candidates=N_TRAIN)
    assert len(out.edits) == 2 * len(TESTS)
    cross = 0
    for rep in out.reports:
        ex = TESTS[rep.example_index]
        s = margin_s_test(rt, ex.text, ex.label)
        changes = [eq7_change(rt, s, e) / rt.n_train for e in out.edits]
        want = sum(changes)
        assert rep.request_predicted_margin_change == pytest.approx(want, rel=1e-6, abs=1e-15)
        assert rep.predicted_flip == ((rep.margin + want) * rep.margin < 0)
        own = sum(c for c, e in zip(changes, out.edits, strict=True)
                  if e.example_index == rep.example_index)
        assert rep.predicted_margin_change == pytest.approx(own, rel=1e-6, abs=1e-15)
        cross += abs(want - own) > 1e-6 * max(abs(want), 1e-12)
        # the request budget: rounds j = 1, 2 add every example's j-th edit
        mine: dict[int, list[float]] = {}
        for c, e in zip(changes, out.edits, strict=True):
            mine.setdefault(e.example_index, []).append(c)
        after = [rep.margin + sum(v[j] for v in mine.values()) for j in range(1)]
        after.append(rep.margin + want)
        flipped = [j + 1 for j, m in enumerate(after) if m * rep.margin < 0]
        if flipped:
            assert (rep.request_flip_budget, rep.request_flip_budget_reached) == (flipped[0], True)
        else:
            assert not rep.request_flip_budget_reached
            rate = -want / 2 if rep.margin > 0 else want / 2
            assert rep.request_flip_budget == (max(3, math.ceil(abs(rep.margin) / rate))
                                               if rate > 0 else 0)
    assert cross > 0


def test_the_margin_prediction_uses_the_bundles_low_rank_curvature(
    rt: ModelRuntime, tmp_path: Path,
) -> None:
    """With a low-rank GGN in the bundle, predicted_margin_change (and the flip budget) come
    from the low-rank s_test of m_y whatever solver the search used (CG here): the edits are
    CG's, their margin prediction (I_lr(z̃) − I_lr(z))/N."""
    import shutil

    from pairdots_server.testing import add_index_and_lowrank

    path = tmp_path / "tiny-lr"
    shutil.copytree(rt.bundle.path, path)
    add_index_and_lowrank(path, index_dim=16, low_rank=4)
    rt_lr = ModelRuntime(load_bundle(path))
    assert rt_lr.has_lowrank
    out = run_attack(rt_lr, AttackQuery(TESTS[:2], AttackMode.PREDICTION_MARGIN, 2,
                                        random_candidates=2, influence=DEFAULT),
                     lambda: None, default_candidates=N_TRAIN)
    assert out.edits, out.notes
    low = SolverSettings(method=SolverChoice.LOW_RANK)
    differs = 0
    for e in out.edits:
        ex = TESTS[e.example_index]
        enc = rt_lr.task.encode([ex.text], max_length=rt_lr.max_length)
        emb = rt_lr.task.embed(enc.input_ids).detach()
        g = grad_theta_margin(rt_lr.task.logits_fn, rt_lr.params, emb, enc.attention_mask,
                              ex.label)
        s_lr, _ = solve_s_test(rt_lr, g, low, lambda: None)
        lr_change = eq7_change(rt_lr, s_lr, e)
        assert e.predicted_margin_change == pytest.approx(lr_change / rt_lr.n_train, rel=1e-6,
                                                          abs=1e-15)
        # the search's own objective stays CG's
        cg_change = eq7_change(rt_lr, margin_s_test(rt_lr, ex.text, ex.label), e)
        assert e.influence_change == pytest.approx(cg_change, rel=1e-6, abs=1e-12)
        differs += abs(lr_change - cg_change) > 1e-6 * max(abs(cg_change), 1e-12)
    assert differs > 0
    s_by_example: dict[int, torch.Tensor] = {}
    for rep in out.reports:
        mine = [e for e in out.edits if e.example_index == rep.example_index]
        assert rep.predicted_margin_change == pytest.approx(
            sum(e.predicted_margin_change for e in mine))
        ex = TESTS[rep.example_index]
        enc = rt_lr.task.encode([ex.text], max_length=rt_lr.max_length)
        g = grad_theta_margin(rt_lr.task.logits_fn, rt_lr.params,
                              rt_lr.task.embed(enc.input_ids).detach(), enc.attention_mask,
                              ex.label)
        s_lr, _ = solve_s_test(rt_lr, g, low, lambda: None)
        want = sum(eq7_change(rt_lr, s_lr, e) for e in out.edits) / rt_lr.n_train
        assert rep.request_predicted_margin_change == pytest.approx(want, rel=1e-6, abs=1e-15)
        s_by_example[rep.example_index] = s_lr
    # the RANDOM baseline gets the same low-rank prediction of its (random) edits
    rnd = run_attack(rt_lr, AttackQuery(TESTS[:2], AttackMode.RANDOM, 2, seed=3),
                     lambda: None, default_candidates=N_TRAIN)
    for rep in rnd.reports:
        want = sum(eq7_change(rt_lr, s_by_example[rep.example_index], e)
                   for e in rnd.edits) / rt_lr.n_train
        assert rep.request_predicted_margin_change == pytest.approx(want, rel=1e-6, abs=1e-15)
