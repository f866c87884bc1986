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
from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import InfluenceSettings
from pairdots_server.influence.solver_policy import SolverSettings
from pairdots_server.storage.bundle import load_bundle

__all__ = [
    "WordQuery", "default_candidates", "load_runtime", "log", "no_stop", "sample_sentences",
    "summary", "top_word_query",
]


no_stop = steps.no_stop


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
    """Explain steps 1–4 (influence/explain.py) for the single most salient word of `text`,
    with the service's default saliency (InfluenceSettings defaults: target and token score,
    Eq. 1–2), the top word by |score|, ∇θ w by double backprop, and s_test from the bundle's
    default solver."""
    resolved = InfluenceSettings(solver=settings or SolverSettings()).resolve(
        rt, default_candidates=default_candidates(rt.n_train)
    )
    enc = steps.encode_text(rt, text)
    label = int(steps.predict(rt, enc).argmax())
    ws = steps.word_saliency(rt, enc, label, resolved.target, resolved.token_score)  # [W]
    wi = steps.top_words(ws, enc.pieces, 1)[0]
    s_test, diag = steps.word_s_test(rt, enc, wi, label, resolved, no_stop)
    return WordQuery(text, label, wi, enc.words[wi], s_test, diag)
