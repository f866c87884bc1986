"""Explain end to end through the typed client against a real server, checked against the
core computed directly on the same bundle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pairdots import (
    CandidateSearch,
    ExplanationRole,
    InfluenceOptions,
    NotFoundError,
    PairdotsClient,
    Solver,
    SolverOptions,
    TokenInfluenceMethod,
    WordCandidates,
    WordMeasurement,
)
from pairdots_server.core.grads import per_example_loss_grads
from pairdots_server.core.saliency import Target, TokenScore, token_saliency, word_scores
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.solver_policy import SolverChoice, SolverSettings, solve_s_test
from pairdots_server.storage.bundle import load_bundle

TEXT = "i loved it !"
CG = SolverOptions(solver=Solver.CONJUGATE_GRADIENT, max_iterations=40, damping=0.01)
CG_SETTINGS = SolverSettings(method=SolverChoice.CG, max_iterations=40, damping=0.01)


@pytest.fixture(scope="module")
def runtime(bundle_root: Path) -> ModelRuntime:
    return ModelRuntime(load_bundle(bundle_root / "tiny"))


def exact_influences(
    rt: ModelRuntime, text: str, label: int, word: int | None, measure: str = "saliency"
) -> torch.Tensor:
    """I(z_i, f) for every training example, straight from the core (Eq. 5): f = the word's
    saliency score, its occlusion contribution c_w, or (word None) the margin m_y."""
    from pairdots_server.core.measure import grad_theta_margin, grad_theta_occlusion
    from pairdots_server.core.saliency import grad_theta_word_score

    enc = rt.task.encode([text], max_length=rt.max_length)
    e = rt.task.embed(enc.input_ids).detach()
    pos = [t for t, w in enumerate(enc.word_ids[0]) if w == word]
    if word is None:
        g_w = grad_theta_margin(rt.task.logits_fn, rt.params, e, enc.attention_mask, label)
    elif measure == "occlusion":
        g_w = grad_theta_occlusion(rt.task.logits_fn, rt.params, e, enc.attention_mask, label,
                                   pos, rt.unk_embed)
    else:
        g_w = grad_theta_word_score(rt.task.logits_fn, rt.params, e, enc.attention_mask, label,
                                    Target.LOG_PROB, TokenScore.L2_NORM, pos,
                                    baseline=rt.unk_embed)
    s_test, _ = solve_s_test(rt, g_w, CG_SETTINGS, lambda: None)
    tr = rt.encode_train(list(range(rt.n_train)))
    grads = per_example_loss_grads(rt.task.logits_fn, rt.params, tr.embeds, tr.mask, tr.labels)
    return -(grads @ s_test)


def test_list_and_get_models(client: PairdotsClient) -> None:
    models = client.list_models()
    assert [m.name for m in models] == ["tiny"]
    m = client.get_model("tiny")
    assert m.training_examples == 64 and m.has_index and m.has_low_rank
    assert list(m.labels) == ["negative", "positive"]
    with pytest.raises(NotFoundError):
        client.get_model("nope")


def test_saliency_matches_core(client: PairdotsClient, runtime: ModelRuntime) -> None:
    expl = client.explain(TEXT, model="tiny", top_words=0)
    rt = runtime
    enc = rt.task.encode([TEXT], max_length=rt.max_length)
    e = rt.task.embed(enc.input_ids).detach()
    probs = torch.softmax(rt.task.logits_fn({}, e, enc.attention_mask), -1)[0]
    assert expl.prediction.label == int(probs.argmax())
    assert expl.prediction.probabilities == pytest.approx(probs.tolist(), abs=1e-6)
    # the service default: L2 norm of the embedding gradient of log p(y|x)
    tok = token_saliency(rt.task.logits_fn, rt.params, e, enc.attention_mask,
                         expl.prediction.label, Target.LOG_PROB, TokenScore.L2_NORM,
                         baseline=rt.unk_embed)
    ws = word_scores(tok, enc.word_ids[0], len(enc.words[0]))
    assert [w.text for w in expl.words] == ["i", "loved", "it", "!"]
    assert list(expl.target.word_saliency) == pytest.approx(ws.tolist(), rel=1e-5, abs=1e-9)
    assert not expl.diagnostics.influence_computed and expl.target.salient_words == ()


def test_exhaustive_influence_equals_core(client: PairdotsClient, runtime: ModelRuntime) -> None:
    opts = InfluenceOptions(solver=CG, candidate_search=CandidateSearch.EXHAUSTIVE,
                            token_influence=TokenInfluenceMethod.NONE,
                            word_measurement=WordMeasurement.SALIENCY,
                            word_candidates=WordCandidates.ALL, prediction_influence=False)
    expl = client.explain(TEXT, model="tiny", top_words=1, examples_per_word=3, influence=opts)
    assert expl.target.prediction is None
    sw = expl.target.salient_words[0]
    exact = exact_influences(runtime, TEXT, expl.target.label, sw.word_index)
    for ex in sw.supporting + sw.opposing:
        assert ex.influence == pytest.approx(float(exact[ex.train_index]), rel=1e-4, abs=1e-10)
    # the returned examples are the exhaustive top-3 in each direction (positive = supporting)
    top_pos = [i for i in torch.argsort(-exact).tolist() if exact[i] > 0][:3]
    top_neg = [i for i in torch.argsort(exact).tolist() if exact[i] < 0][:3]
    assert [e.train_index for e in sw.supporting] == top_pos
    assert [e.train_index for e in sw.opposing] == top_neg
    assert len(sw.supporting) + len(sw.opposing) > 0
    assert expl.diagnostics.candidates_scored == 64


def test_default_measurements_equal_core(client: PairdotsClient, runtime: ModelRuntime) -> None:
    """The defaults: words ranked by their occlusion contribution c_w, word-level influence on
    the margin among the training examples that contain the word (and, as an option, on c_w),
    prediction-level influence on the margin over all of them — each equal to the core's
    exact, exhaustive computation."""
    from pairdots_server.core.measure import word_occlusion
    from pairdots_server.influence.wordmatch import WordIndex

    opts = InfluenceOptions(solver=CG, candidate_search=CandidateSearch.EXHAUSTIVE,
                            token_influence=TokenInfluenceMethod.NONE)
    expl = client.explain(TEXT, model="tiny", top_words=2, examples_per_word=3, influence=opts)
    rt, y = runtime, expl.target.label
    enc = rt.task.encode([TEXT], max_length=rt.max_length)
    e = rt.task.embed(enc.input_ids).detach()
    c = word_occlusion(rt.task.logits_fn, rt.params, e, enc.attention_mask, y,
                       enc.word_ids[0], len(enc.words[0]), rt.unk_embed)
    assert list(expl.target.word_contribution) == pytest.approx(c.tolist(), rel=1e-5, abs=1e-7)
    wordlike = [i for i, w in enumerate(enc.words[0]) if w.isalnum()]
    order = sorted(wordlike, key=lambda i: -float(c[i]))[:2]
    assert [w.word_index for w in expl.target.salient_words] == order
    index = WordIndex([ex.text for ex in rt.bundle.train])
    occ = client.explain(TEXT, model="tiny", top_words=2, examples_per_word=3, influence=replace(
        opts, word_measurement=WordMeasurement.OCCLUSION, prediction_influence=False))
    # default word measurement: the margin among the examples with the word; OCCLUSION: c_w
    for answer, measure in ((expl, None), (occ, "occlusion")):
        assert [w.word_index for w in answer.target.salient_words] == order
        for sw in answer.target.salient_words:
            exact = exact_influences(rt, TEXT, y, None if measure is None else sw.word_index,
                                     measure or "saliency")
            allowed = index.containing(sw.text) or list(range(rt.n_train))
            assert sw.containing_examples == len(index.containing(sw.text))
            ranked = sorted(allowed, key=lambda i: -float(exact[i]))
            assert [x.train_index for x in sw.supporting] == \
                [i for i in ranked if exact[i] > 0][:3]
            for x in sw.supporting + sw.opposing:
                assert x.influence == pytest.approx(float(exact[x.train_index]), rel=1e-4,
                                                    abs=1e-10)
    pred = expl.target.prediction
    assert pred is not None and pred.candidates_scored == rt.n_train
    exact = exact_influences(rt, TEXT, y, None)
    top_pos = [i for i in torch.argsort(-exact).tolist() if exact[i] > 0][:3]
    assert [x.train_index for x in pred.supporting] == top_pos
    for x in pred.supporting + pred.opposing:
        assert x.influence == pytest.approx(float(exact[x.train_index]), rel=1e-4, abs=1e-10)


def test_index_prefilter_scores_exactly(client: PairdotsClient, runtime: ModelRuntime) -> None:
    opts = InfluenceOptions(solver=CG, candidate_search=CandidateSearch.INDEX, candidates=16,
                            word_measurement=WordMeasurement.SALIENCY,
                            word_candidates=WordCandidates.ALL)
    expl = client.explain(TEXT, model="tiny", top_words=1, examples_per_word=2, influence=opts)
    sw = expl.target.salient_words[0]
    exact = exact_influences(runtime, TEXT, expl.target.label, sw.word_index)
    assert 0 < expl.diagnostics.candidates_scored <= 32
    assert sw.supporting or sw.opposing
    for ex in sw.supporting + sw.opposing:
        assert ex.influence == pytest.approx(float(exact[ex.train_index]), rel=1e-4, abs=1e-10)
        # Eq. 8 words are present and the responsible word is a valid index
        assert len(ex.words) > 0 and 0 <= ex.responsible_word < len(ex.words)


def test_error_analysis_explains_gold_too(client: PairdotsClient) -> None:
    base = client.explain(TEXT, model="tiny", top_words=0)
    wrong = 1 - base.prediction.label
    expl = client.explain(TEXT, model="tiny", target_label=wrong, gold_label=1 - wrong,
                          top_words=1, examples_per_word=1,
                          influence=InfluenceOptions(solver=CG))
    roles = [e.role for e in expl.explanations]
    assert roles == [ExplanationRole.TARGET, ExplanationRole.GOLD]
    assert [e.label for e in expl.explanations] == [wrong, 1 - wrong]
    first, second = expl.explanations
    # each label gets its own words: in the binary case c_w of one label is −c_w of the other,
    # so the word that pushes most towards the wrong label is not the gold label's
    assert list(first.word_contribution) == pytest.approx(
        [-x for x in second.word_contribution], abs=1e-6)
    assert first.salient_words[0].word_index != second.salient_words[0].word_index


def test_low_rank_default_and_cache(client: PairdotsClient) -> None:
    first = client.explain(TEXT, model="tiny", top_words=1, examples_per_word=1)
    d = first.target.salient_words[0].solver
    assert d.solver == Solver.LOW_RANK and d.converged
    assert "λ" in d.damping_rule or "absolute" in d.damping_rule, d.damping_rule
    again = client.explain(TEXT, model="tiny", top_words=1, examples_per_word=1)
    assert again.target.salient_words[0].solver.cached
    assert [e.influence for e in again.target.salient_words[0].supporting] == \
        [e.influence for e in first.target.salient_words[0].supporting]
