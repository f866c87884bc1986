"""Helpers shared by bench/prefilter.py and bench/explain_latency.py (issue 4 benchmarks).

Both run the served pipeline's own code (pairdots_server.influence.runtime / explain / solvers) on a
prepared bundle; SST-2 reading and logging come from bench/fidelity.py.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from fidelity import log, read_sst2  # also puts <repo>/server on sys.path
from torch import Tensor

from pairdots_server.config import ExplainLimits
from pairdots_server.influence.pipeline import ExplainQuery, _top_words, word_s_test, word_saliency
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.solver_policy import SolverSettings
from pairdots_server.storage.bundle import load_bundle

__all__ = [
    "WordQuery", "default_candidates", "load_runtime", "log", "no_stop", "sample_sentences",
    "summary", "top_word_query",
]


def no_stop() -> None:
    """should_stop callback that never cancels."""


def load_runtime(bundle: str, threads: int) -> tuple[ModelRuntime, float]:
    """(ModelRuntime of the bundle, seconds to load it) with torch limited to `threads`."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    rt = ModelRuntime(load_bundle(bundle))
    return rt, time.perf_counter() - t0


def default_candidates(n_train: int) -> int:
    """The server's default K per direction: clamp(2 % · N, 50, 2000) (config.ExplainLimits)."""
    return ExplainLimits().default_candidates(n_train)


def sample_sentences(n: int, seed: int, split: str = "test") -> list[tuple[str, int]]:
    """n (text, gold label) pairs drawn without replacement from SST-2 `split`, seeded."""
    texts, labels = read_sst2(split, 10**9)
    pick = random.Random(seed).sample(range(len(texts)), min(n, len(texts)))
    return [(texts[i], labels[i]) for i in pick]


def summary(xs: Sequence[float]) -> dict[str, float]:
    """mean / median / min / max of a non-empty sequence."""
    return {
        "mean": statistics.fmean(xs), "median": statistics.median(xs),
        "min": min(xs), "max": max(xs),
    }


@dataclass
class WordQuery:
    """One test sentence's top salient word and its s_test = (H + δI)⁻¹ ∇θ w (paper Eq. 5)."""

    text: str
    label: int  # the predicted label (Explain's default target)
    word_index: int
    word: str
    s_test: Tensor  # [P]
    solver: dict[str, object]


def top_word_query(
    rt: ModelRuntime, text: str, settings: SolverSettings | None = None
) -> WordQuery:
    """Explain steps 1–3 (explain.py) for the single most salient word of `text`, with the
    service's default saliency (ExplainQuery defaults: target and token score, Eq. 1–2), the
    top word by |score|, ∇θ w by double backprop, and s_test from the bundle's default solver."""
    defaults = ExplainQuery(text=text)
    task = rt.task
    enc = task.encode([text], max_length=rt.max_length)
    with torch.no_grad():
        embeds = task.embed(enc.input_ids).detach()  # [1,T,D]
        label = int(task.logits_fn({}, embeds, enc.attention_mask).argmax(-1)[0])
    word_ids = enc.word_ids[0]
    words = enc.words[0]
    pieces = [0] * len(words)
    for w in word_ids:
        if w is not None:
            pieces[w] += 1
    ws = word_saliency(
        rt, embeds, enc.attention_mask, word_ids, len(words), label, defaults.target,
        defaults.token_score,
    )  # [W]
    wi = _top_words(ws, pieces, 1)[0]
    s_test, diag = word_s_test(
        rt, text, embeds, enc.attention_mask, word_ids, wi, label, defaults.target,
        defaults.token_score, settings or SolverSettings(), no_stop,
    )
    return WordQuery(text, label, wi, words[wi], s_test, diag)
