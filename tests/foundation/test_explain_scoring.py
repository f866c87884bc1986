"""Explain's exact scoring (jvp per batch, the union of candidates scored once through a
ScoreMemo, every [UNK] copy of Eq. 8 batched) equals the per-example-gradient path it replaced:
-⟨s_test, ∇θL(z_i)⟩ from core.grads and pipeline.word_attribution one example at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pairdots_server.core.grads import per_example_loss_grads
from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.explain import ExplainQuery, explain
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import InfluenceSettings
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.testing import make_tiny_root

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    root = make_tiny_root(tmp_path_factory.mktemp("scoring"))
    return ModelRuntime(load_bundle(Path(root) / "tiny"))


def _reference(rt: ModelRuntime, s_test: torch.Tensor, idx: list[int]) -> torch.Tensor:
    enc = rt.encode_train(idx)
    g = per_example_loss_grads(rt.task.logits_fn, rt.params, enc.embeds, enc.mask, enc.labels)
    return -(g.double() @ s_test.double())  # [K]


def _s_test(rt: ModelRuntime) -> tuple[torch.Tensor, steps.PipelineSettings]:
    settings = InfluenceSettings().resolve(rt, default_candidates=8, scoring_batch_size=5)
    enc = steps.encode_text(rt, "a gorgeous , witty movie")
    m = steps.Measurement(steps.MeasurementKind.PREDICTION_MARGIN, 1)
    s_test, _ = steps.measurement_s_test(rt, enc, m, settings, steps.no_stop)
    return s_test, settings


def test_score_examples_equals_per_example_gradients(rt: ModelRuntime) -> None:
    s_test, settings = _s_test(rt)
    idx = [7, 3, 40, 12, 3, 0, 63, 21]  # any order, a repeat, batches of 5
    got = steps.score_examples(rt, s_test, idx, settings, steps.no_stop)
    ref = _reference(rt, s_test, idx)
    # float32 model: agreement to 1e-4 of the largest score
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert float(ref.abs().max()) > 0


def test_memo_scores_are_reused_not_recomputed(rt: ModelRuntime) -> None:
    s_test, settings = _s_test(rt)
    memo = steps.ScoreMemo(scores={5: 123.0})  # a sentinel no real score equals
    got = steps.score_examples(rt, s_test, [5, 6], settings, steps.no_stop, memo=memo)
    assert float(got[0]) == 123.0
    assert set(memo.scores) == {5, 6}
    ref = _reference(rt, s_test, [6])
    assert abs(float(got[1] - ref[0])) <= 1e-4 * abs(float(ref[0])) + 1e-9


def test_explain_answers_equal_the_one_by_one_path(rt: ModelRuntime) -> None:
    q = ExplainQuery("a gorgeous , witty , seductive movie .", examples_per_word=3,
                     token_influence=steps.TokenInfluence.EXACT)  # float32 Eq. 8 (not AUTO)
    ans = explain(rt, q, steps.no_stop, default_candidates=8, scoring_batch_size=5)
    label_ans = ans.explanations[0]
    assert label_ans.prediction is not None and label_ans.salient_words
    s_test, _ = _s_test_for(rt, q.text, label_ans.label)
    items = label_ans.prediction.supporting + label_ans.prediction.opposing
    for sw in label_ans.salient_words:  # margin pairing: the same s_test
        items += sw.supporting + sw.opposing
    assert items
    ref = _reference(rt, s_test, [it.train_index for it in items])
    scale = float(ref.abs().max())
    for it, r in zip(items, ref.tolist(), strict=True):
        assert abs(it.influence - r) <= 1e-4 * scale
        enc = steps.encode_train_example(rt, it.train_index)
        one = steps.word_attribution(rt, s_test, enc, it.label)
        assert [w for w, _ in it.words] == enc.words
        top = max(abs(v) for v in one) or 1.0
        for (_, got), want in zip(it.words, one, strict=True):
            assert abs(got - want) <= 1e-4 * top


def _s_test_for(rt: ModelRuntime, text: str, label: int) -> tuple[torch.Tensor, object]:
    settings = InfluenceSettings().resolve(rt, default_candidates=8)
    enc = steps.encode_text(rt, text)
    m = steps.Measurement(steps.MeasurementKind.PREDICTION_MARGIN, label)
    return steps.measurement_s_test(rt, enc, m, settings, steps.no_stop)
