"""What attack (paper §4.2) and repair (§4.3) share above one edit: the salient target of a
test example (its top word, s_test and the candidates' exact influence), the objectives
(direction d = ±1 on I(z, w) for a target) and the loop that turns ranked candidates into
edits, plus the random baseline.

Influence of a training example z on the saliency score w of a test word (Eq. 5):
    I(z, w) = -s_testᵀ ∇θL(z),  s_test = H⁻¹ ∇θw.
Replacing z by z̃ changes it by (Eq. 6–7)
    I(z, z̃, w) = I(z̃, w) - I(z, w) = -s_testᵀ (∇θL(z̃) - ∇θL(z)).
Token influence (Eq. 8): I(x_t, w) = I(z, w) - I(z̃(t, UNK), w), summed over a word's pieces.

The greedy search that makes one edit (Eq. 11–12) is perturb/search.py.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from pairdots_server.errors import InvalidArgument
from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import PipelineSettings
from pairdots_server.perturb.lexicon import Lexicon
from pairdots_server.perturb.search import (
    SearchSettings,
    StopFn,
    greedy_edit,
    random_edit,
)
from pairdots_server.storage.data import Example

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


def no_progress(stage: str, done: int, total: int) -> None:
    return None


# -- settings ------------------------------------------------------------------------------


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """A perturbed (attack) or added (repair) training example (proto TrainingEdit)."""

    train_index: int
    original_text: str
    new_text: str
    label: int
    example_index: int
    word_index: int
    original_word: str
    substitute: str
    relation: str
    influence_change: float  # I(z̃, w) - I(z, w), Eq. 7; 0 for the random baselines
    objective: str


@dataclass
class SalientTarget:
    """The top salient word of a test example for one label, its s_test, and the candidate
    training examples with their exact I(z_i, w) (Eq. 5)."""

    label: int
    word_index: int
    word: str
    saliency: float
    s_test: Tensor
    scores: dict[int, float]
    solver: dict[str, object]

    def ranked(self, direction: int) -> list[int]:
        """Training indices, most promising first for objective direction d: d < 0 (decrease
        I) starts from the largest positive I (supporting), d > 0 (increase I) from the most
        negative (opposing)."""
        sign = -1.0 if direction < 0 else 1.0
        return [i for i, _ in sorted(self.scores.items(), key=lambda p: (sign * p[1], p[0]))]


# -- salient target ------------------------------------------------------------------------


def salient_target(
    rt: ModelRuntime, text: str, label: int, settings: PipelineSettings, should_stop: StopFn
) -> SalientTarget | None:
    """The top salient word of `text` for `label` (Eq. 1–2, largest word score magnitude), its
    s_test (Eq. 5) and the exact influence of the candidate training examples (as Explain).
    None when the text has no word the model saw."""
    enc = steps.encode_text(rt, text)
    ws = steps.word_saliency(rt, enc, label, settings.target, settings.token_score)  # [W]
    top = steps.top_words(ws, enc.pieces, 1)
    if not top:
        return None
    wi = top[0]
    s_test, diag = steps.word_s_test(rt, enc, wi, label, settings, should_stop)
    cand = steps.candidates(rt, s_test, settings)
    scores = steps.score_examples(rt, s_test, cand, settings, should_stop)  # [K]
    table = {
        int(i): float(s) for i, s in zip(cand, scores.tolist(), strict=True) if math.isfinite(s)
    }
    return SalientTarget(label, wi, enc.words[wi], ws[wi], s_test, table, dict(diag))


def take_edits(
    rt: ModelRuntime,
    target: SalientTarget,
    direction: int,
    n: int,
    used: set[int],
    lexicon: Lexicon,
    search: SearchSettings,
    rng: random.Random,
    should_stop: StopFn,
    *,
    train: Sequence[Example],
    example_index: int,
    objective: str,
    max_attempts: int | None = None,
) -> list[Edit]:
    """Up to n edits for one objective, walking the ranked candidates (`target.ranked`),
    skipping training examples in `used` (and adding the chosen ones to it)."""
    out: list[Edit] = []
    attempts = 0
    limit = max_attempts if max_attempts is not None else max(3 * n, n + 10)
    for idx in target.ranked(direction):
        if len(out) >= n or attempts >= limit:
            break
        if idx in used:
            continue
        should_stop()
        attempts += 1
        ex = train[idx]
        scored = greedy_edit(rt, target.s_test, ex, direction, lexicon, search, rng, should_stop)
        if scored is None:
            continue
        used.add(idx)
        e = scored.edit
        out.append(Edit(
            idx, ex.text, e.new_text, ex.label, example_index, e.word_index, e.original_word,
            e.substitute, e.relation, scored.change, objective,
        ))
    return out


TargetCache = dict[tuple[str, int], SalientTarget | None]
Objective = tuple[SalientTarget | None, int, str]  # (target, direction, objective name)


def check_labels(rt: ModelRuntime, examples: Sequence[Example]) -> None:
    """InvalidArgument on the first example whose label is not one of the model's."""
    n_labels = len(rt.bundle.labels)
    for i, ex in enumerate(examples):
        if not 0 <= ex.label < n_labels:
            raise InvalidArgument.for_field(
                f"examples[{i}].label", f"{ex.label} is not a label of model {rt.name!r}; "
                f"valid: 0..{n_labels - 1}"
            )


def target_finder(
    rt: ModelRuntime, settings: PipelineSettings, should_stop: StopFn, cache: TargetCache
) -> Callable[[str, int], SalientTarget | None]:
    """salient_target(text, label) memoised in `cache` (targets do not depend on the mode or
    the objective, so attack modes and repair directions share them)."""

    def target(text: str, label: int) -> SalientTarget | None:
        key = (text, label)
        if key not in cache:
            cache[key] = salient_target(rt, text, label, settings, should_stop)
        return cache[key]

    return target


def edits_for_objectives(
    rt: ModelRuntime,
    objectives: Sequence[Objective],
    n: int,
    used: set[int],
    lexicon: Lexicon,
    search: SearchSettings,
    rng: random.Random,
    should_stop: StopFn,
    *,
    train: Sequence[Example],
    example_index: int,
) -> list[Edit]:
    """Up to n edits split evenly across the objectives (earlier ones take the remainder),
    each share from take_edits; an objective without a target contributes none."""
    shares = [n // len(objectives) + (j < n % len(objectives)) for j in range(len(objectives))]
    got: list[Edit] = []
    for (tgt, direction, objective), share in zip(objectives, shares, strict=True):
        if tgt is None or share == 0:
            continue
        got += take_edits(
            rt, tgt, direction, share, used, lexicon, search, rng, should_stop,
            train=train, example_index=example_index, objective=objective,
        )
    return got


RANDOM_OBJECTIVE = "random substitution (baseline, no influence objective)"


def random_edits(
    rt: ModelRuntime,
    example_index: int,
    n: int,
    used: set[int],
    lexicon: Lexicon,
    relations: Sequence[str],
    rng: random.Random,
    max_substitutes: int,
) -> list[Edit]:
    """The RANDOM baseline of attack and repair: n random training examples not in `used`
    (which it extends), each with a random substitution of one of `relations`."""
    train = rt.bundle.train
    order = [i for i in range(len(train)) if i not in used]
    rng.shuffle(order)
    out: list[Edit] = []
    for idx in order:
        if len(out) >= n:
            break
        ex = train[idx]
        e = random_edit(rt, ex, lexicon, relations, rng, max_substitutes)
        if e is None:
            continue
        used.add(idx)
        out.append(Edit(
            idx, ex.text, e.new_text, ex.label, example_index, e.word_index, e.original_word,
            e.substitute, e.relation, 0.0, RANDOM_OBJECTIVE,
        ))
    return out
