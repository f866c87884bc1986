"""Every Explain answer says which settings ran (ExplainResponse.settings, defaults resolved by
the server) and every label's name; the CLI's text rendering names the word-level influence by
the measurement that ran (I(z, m_y) under MARGIN, I(z, c_w) under OCCLUSION) and never cuts a
training example's text. Real server, real tiny bundle."""

from __future__ import annotations

import torch

from pairdots import (
    CandidateSearch,
    Curvature,
    ExplanationRole,
    InfluenceOptions,
    PairdotsClient,
    SaliencyOptions,
    Solver,
    SolverOptions,
    TargetFunction,
    TokenInfluenceMethod,
    TokenScoreMethod,
    WordCandidates,
    WordMeasurement,
)
from pairdots_server.cli.render import explanation_lines

TEXT = "i loved it !"


def test_defaults_are_reported_resolved(client: PairdotsClient) -> None:
    expl = client.explain(TEXT, model="tiny", top_words=1, examples_per_word=2)
    s = expl.settings
    assert s is not None
    assert s.word_measurement == WordMeasurement.MARGIN
    assert s.word_candidates == WordCandidates.CONTAINING
    assert s.token_score == TokenScoreMethod.L2_NORM and not s.signed_saliency
    assert s.target_function == TargetFunction.LOG_PROBABILITY
    # the tiny bundle has low-rank factors and an index (its default solver and search)
    assert s.solver == Solver.LOW_RANK == expl.target.salient_words[0].solver.solver
    assert s.curvature == Curvature.GAUSS_NEWTON
    assert s.candidate_search == CandidateSearch.INDEX == expl.diagnostics.candidate_search
    assert s.candidates == 50  # clamp(2 % of 64, 50, 2000)
    # AUTO: bfloat16 copies for this float32 model where the CPU multiplies bfloat16 natively
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert s.token_influence == (
        TokenInfluenceMethod.EXACT_BF16 if native else TokenInfluenceMethod.EXACT)
    assert s.prediction_influence and expl.target.prediction is not None
    assert expl.prediction.label_names == ("negative", "positive")
    assert expl.label_name(0) == "negative" and expl.label_name(1) == "positive"


def test_requested_settings_are_reported(client: PairdotsClient) -> None:
    opts = InfluenceOptions(
        solver=SolverOptions(solver=Solver.CONJUGATE_GRADIENT, max_iterations=20, damping=0.01),
        candidate_search=CandidateSearch.EXHAUSTIVE,
        token_influence=TokenInfluenceMethod.NONE,
        word_measurement=WordMeasurement.OCCLUSION,
        word_candidates=WordCandidates.ALL,
        prediction_influence=False,
    )
    sal = SaliencyOptions(
        target_function=TargetFunction.PROBABILITY,
        token_score=TokenScoreMethod.GRADIENT_TIMES_INPUT,
    )
    expl = client.explain(
        TEXT, model="tiny", top_words=1, examples_per_word=2, influence=opts, saliency=sal
    )
    s = expl.settings
    assert s is not None
    assert (s.word_measurement, s.word_candidates) == (
        WordMeasurement.OCCLUSION,
        WordCandidates.ALL,
    )
    assert (s.target_function, s.token_score) == (
        TargetFunction.PROBABILITY,
        TokenScoreMethod.GRADIENT_TIMES_INPUT,
    )
    assert s.signed_saliency
    assert s.solver == Solver.CONJUGATE_GRADIENT == expl.target.salient_words[0].solver.solver
    assert s.candidate_search == CandidateSearch.EXHAUSTIVE
    assert s.token_influence == TokenInfluenceMethod.NONE
    assert not s.prediction_influence and expl.target.prediction is None


def test_bfloat16_token_influence_is_served_and_reported(client: PairdotsClient) -> None:
    """EXACT_BF16 runs the [UNK] copies' trunk in bfloat16: the answer says so, and every
    returned example still has its per-word totals and a responsible word."""
    opts = InfluenceOptions(token_influence=TokenInfluenceMethod.EXACT_BF16)
    expl = client.explain(TEXT, model="tiny", top_words=1, examples_per_word=2, influence=opts)
    assert expl.settings is not None
    assert expl.settings.token_influence == TokenInfluenceMethod.EXACT_BF16
    exact = client.explain(TEXT, model="tiny", top_words=1, examples_per_word=2,
                           influence=InfluenceOptions(token_influence=TokenInfluenceMethod.EXACT))
    assert exact.settings is not None
    assert exact.settings.token_influence == TokenInfluenceMethod.EXACT
    examples = [*expl.target.salient_words[0].supporting, *expl.target.salient_words[0].opposing]
    assert examples
    for ex in examples:
        assert ex.words and ex.responsible_word is not None


def _word_influence_lines(lines: list[str]) -> list[str]:
    """The lines of the salient words' training examples (after the first 'salient word')."""
    start = next(i for i, line in enumerate(lines) if "salient word" in line)
    return [line for line in lines[start:] if line.strip().startswith("#")]


def test_text_names_the_measurement_that_ran(client: PairdotsClient) -> None:
    margin = client.explain(TEXT, model="tiny", top_words=1, examples_per_word=2)
    occlusion = client.explain(
        TEXT,
        model="tiny",
        top_words=1,
        examples_per_word=2,
        influence=InfluenceOptions(word_measurement=WordMeasurement.OCCLUSION),
    )
    m_lines, o_lines = explanation_lines(margin), explanation_lines(occlusion)
    m_words, o_words = _word_influence_lines(m_lines), _word_influence_lines(o_lines)
    assert m_words and o_words
    assert all("I(z, m_y) =" in line for line in m_words), m_words
    assert all("I(z, c_w) =" in line for line in o_words), o_words
    assert not any("c_w" in line for line in m_words)
    assert any(line.startswith("  word measurement: MARGIN") for line in m_lines)
    assert any(line.startswith("  word measurement: OCCLUSION") for line in o_lines)


def test_text_keeps_whole_texts_and_names_the_gold_label(client: PairdotsClient) -> None:
    base = client.explain(TEXT, model="tiny", top_words=0)
    gold = 1 - base.prediction.label
    expl = client.explain(TEXT, model="tiny", gold_label=gold, top_words=1, examples_per_word=3)
    assert [e.role for e in expl.explanations] == [ExplanationRole.TARGET, ExplanationRole.GOLD]
    text = "\n".join(explanation_lines(expl))
    gold_name = expl.label_name(gold)
    assert f"== gold label {gold_name!r} (error analysis" in text
    assert "(GOLD)" not in text and "(2)" not in text
    examples = [
        ex
        for lab in expl.explanations
        for sw in lab.salient_words
        for ex in sw.supporting + sw.opposing
    ]
    assert examples
    for ex in examples:  # every example's whole text, never cut with "…"
        assert f"label {ex.label_name!r}  {ex.text}  [" in text
    assert "…" not in text
