"""Explain on a planted-cue model, through a real server: the answer whose right content is
known (issue: explanations that mean what they say).

Training set: filler words plus one cue per sentence that decides the label ("zorp"/"quib" →
positive, "blick"/"fexa" → negative), 2 of the 20 sentences of every cue mislabelled. The
tiny BERT learns the cues (every sentence is predicted by its cue). With the service defaults,
for "the plot was zorp and the cast":

* the top salient word is "zorp";
* its supporting examples contain "zorp", carry the explained label, and their responsible
  word (Eq. 8) is "zorp"; the mislabelled "zorp" sentences are among its opposing examples;
* the prediction-level supporters carry the explained label; the most opposing are the
  mislabelled sentences of the positive cues;
* explaining the wrong label with the gold one (error analysis) gives different words and
  different training examples for the two labels.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pdserver_util import RunningServer, start_server

from pairdots import PairdotsClient
from pairdots_server.config import ServerConfig
from pairdots_server.model.scope import ScopeSpec
from pairdots_server.model.task import Task
from pairdots_server.model.train import TrainConfig, fine_tune
from pairdots_server.storage.bundle import save_bundle
from pairdots_server.testing import (
    PLANTED_CUES,
    PLANTED_FILLER,
    add_index_and_lowrank,
    build_tiny_model_dir,
    planted_cue,
    planted_cue_examples,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "the plot was zorp and the cast"
FLIPPED = 2


def build_planted_root(root: Path) -> Path:
    train = planted_cue_examples(20, FLIPPED, seed=0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        build_tiny_model_dir(d, list(PLANTED_FILLER) + list(PLANTED_CUES), seed=0)
        task = Task.from_pretrained(d, labels=["negative", "positive"], scope=ScopeSpec())
        fine_tune(task, train, TrainConfig(epochs=100, batch_size=8, lr=3e-3, warmup_ratio=0.0,
                                           max_length=32, seed=0, max_steps=100))
        path = save_bundle(root, "planted", task, train, {"train": {"max_length": 32}})
    add_index_and_lowrank(path)
    return root


@pytest.fixture(scope="module")
def planted_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = build_planted_root(tmp_path_factory.mktemp("planted"))
    running = start_server(ServerConfig(bundles=root, port=0,
                                        jobs_db=root / "jobs.sqlite3", max_queue=16))
    yield running
    running.stop()


@pytest.fixture()
def client(planted_server: RunningServer) -> Iterator[PairdotsClient]:
    with planted_server.client() as c:
        yield c


def clean(text: str, label: int) -> bool:
    return PLANTED_CUES[planted_cue(text) or ""] == label


def test_model_learned_the_cues(client: PairdotsClient) -> None:
    for cue, label in PLANTED_CUES.items():
        expl = client.explain(f"the plot was {cue} and the cast", model="planted", top_words=0)
        assert expl.prediction.label == label, cue


def test_word_level_pairing_is_about_the_word(client: PairdotsClient) -> None:
    expl = client.explain(TEXT, model="planted")
    assert expl.prediction.label == 1
    word = expl.target.salient_words[0]
    assert word.text == "zorp"
    assert word.contribution > 0 and word.containing_examples == 20
    assert len(word.supporting) == 5
    for ex in word.supporting:
        assert "zorp" in ex.text.split() and ex.label == 1
        assert ex.words[ex.responsible_word].text == "zorp"
    mislabelled = {ex.train_index for ex in word.opposing if not clean(ex.text, ex.label)}
    assert len(mislabelled) == FLIPPED


def test_prediction_level_pairing(client: PairdotsClient) -> None:
    expl = client.explain(TEXT, model="planted")
    pred = expl.target.prediction
    assert pred is not None and pred.margin > 0
    assert [ex.label for ex in pred.supporting] == [1] * 5
    # the most opposing: the mislabelled sentences of the positive cues (2 cues × FLIPPED)
    top_opp = pred.opposing[: 2 * FLIPPED]
    assert all(planted_cue(ex.text) in ("zorp", "quib") and ex.label == 0 for ex in top_opp)


def test_error_analysis_is_not_one_ranking(client: PairdotsClient) -> None:
    expl = client.explain(TEXT, model="planted", target_label=0, gold_label=1, top_words=1)
    wrong, gold = expl.explanations
    assert (wrong.label, gold.label) == (0, 1)
    assert gold.salient_words[0].text == "zorp"
    assert wrong.salient_words[0].text != "zorp"
    assert {e.train_index for e in wrong.salient_words[0].supporting}.isdisjoint(
        {e.train_index for e in gold.salient_words[0].supporting})
    assert wrong.prediction is not None and gold.prediction is not None
    assert {e.train_index for e in wrong.prediction.supporting}.isdisjoint(
        {e.train_index for e in gold.prediction.supporting})
