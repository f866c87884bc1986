"""Attack (paper §4.2, Eq. 9–12): perturb training examples with WordNet synonyms so that a
retrained model loses its focus on a test example's salient word, or its prediction.

For each test example (x, gold y), with the targets of perturb/objectives.py (the measurement
f follows InfluenceSettings.word_measurement; the default is the Explain default, f = m_y(x)
over the training examples containing the word w with the largest contribution c_w):
  * w_y  = the top word of x for y;  w_y' = the top word for the strongest wrong label
    y' = argmax_{c ≠ y} p(c|x);
  * s_test = H⁻¹∇θf and the exact I(z_i, f) (Eq. 5) of the candidate training examples;
  * up to n training examples are replaced by perturbed copies z̃ (up to m substituted words
    each), each from the greedy search (Eq. 11–12, perturb/search.py) for the mode's objective
    (Eq. 9–10):
      DEMOTE_SALIENT     minimise I(z, z̃, f_y)   (start from the most supporting examples),
      PROMOTE_WRONG      maximise I(z, z̃, f_y')  (start from the most opposing examples),
      COMBINED           both, taking turns (demote first), n edits in all,
      PREDICTION_MARGIN  minimise I(z, z̃, m_y) over every training example (Koh & Liang's
                         training-set attack; Yang et al., EACL 2023),
      RANDOM             baseline: n random training examples, a random substitutable word and
                         a random synonym each (no influence computed; influence_change 0).
Every edit carries its first-order predicted change of the test example's margin m_y; with
`adaptive` the search for a test example stops once Σ Δm_y < -m_y (the prediction is predicted
to flip); the report gives the flip budget (objectives.flip_budget) and, once every example's
edits are made, the predicted change of its margin under all the request's edits together
(objectives.request_effects: what a retrain on the perturbed set is predicted to do).
A training example is perturbed at most once per attack (no duplicates across modes or test
examples), so the perturbed set is the training set with those examples replaced.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pairdots_server.errors import InvalidArgument
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import InfluenceSettings
from pairdots_server.perturb.lexicon import Lexicon, default_lexicon
from pairdots_server.perturb.objectives import (
    Edit,
    ExampleReport,
    Objective,
    ProgressFn,
    TargetCache,
    Targets,
    check_labels,
    edits_for_objectives,
    example_report,
    no_progress,
    random_edits,
    request_effects,
)
from pairdots_server.perturb.search import SearchSettings, StopFn
from pairdots_server.storage.data import Example

DEMOTE = "decrease I(z, w_y)"
PROMOTE = "increase I(z, w_y')"
LOWER_MARGIN = "decrease I(z, m_y)"


class AttackMode(enum.Enum):
    DEMOTE_SALIENT = "demote_salient"
    PROMOTE_WRONG = "promote_wrong"
    COMBINED = "combined"
    RANDOM = "random"
    PREDICTION_MARGIN = "prediction_margin"


@dataclass(frozen=True)
class AttackQuery:
    """A validated Attack request (rpc/convert_jobs.py builds it)."""

    examples: tuple[Example, ...]
    mode: AttackMode
    examples_per_test: int
    random_candidates: int = 5
    influence: InfluenceSettings = field(default_factory=InfluenceSettings)
    seed: int = 0
    max_substitutes: int = 10
    max_words: int = 1  # m: substituted words per training example
    adaptive: bool = False  # stop at the predicted flip

    def __post_init__(self) -> None:
        if not self.examples:
            raise InvalidArgument.for_field("examples", "at least one test example is needed")
        if not 1 <= self.max_words <= 10:
            raise InvalidArgument.for_field(
                "max_words", f"must be in 1..10, got {self.max_words}"
            )
        if self.examples_per_test < 1:
            raise InvalidArgument.for_field(
                "examples_per_test", f"must be >= 1, got {self.examples_per_test}"
            )
        if self.random_candidates < 0:
            raise InvalidArgument.for_field(
                "random_candidates", f"must be >= 0, got {self.random_candidates}"
            )


@dataclass
class AttackOutcome:
    edits: list[Edit]
    notes: list[str]
    train: list[Example]  # the training set with the edited examples replaced
    reports: list[ExampleReport] = field(default_factory=list)  # one per test example


def wrong_label(rt: ModelRuntime, text: str, gold: int) -> int:
    """The strongest wrong label y' = argmax_{c ≠ gold} p(c|x)."""
    probs = rt.task.predict([text], max_length=rt.max_length)[0]  # [C]
    probs = probs.clone()
    probs[gold] = -torch.inf
    return int(probs.argmax())


def apply_replacements(train: Sequence[Example], edits: Sequence[Edit]) -> list[Example]:
    """The training set with each edited example's text replaced (labels unchanged)."""
    out = list(train)
    for e in edits:
        out[e.train_index] = Example(e.new_text, out[e.train_index].label)
    return out


def run_attack(
    rt: ModelRuntime,
    q: AttackQuery,
    should_stop: StopFn,
    progress: ProgressFn = no_progress,
    *,
    default_candidates: int,
    scoring_batch_size: int = 32,
    lexicon: Lexicon | None = None,
    target_cache: TargetCache | None = None,
) -> AttackOutcome:
    """Edits for every test example of `q` (see the module docstring) and the perturbed set.

    target_cache: targets and margin s_tests shared between calls (benchmarks run every mode
    on the same examples; they do not depend on the mode). The random words of each training
    example's search are seeded by (q.seed, its index) (objectives.search_rng); the RANDOM
    baseline draws from one generator seeded by q.seed.
    """
    lex = lexicon or default_lexicon()
    train = rt.bundle.train
    check_labels(rt, q.examples)
    search = SearchSettings(q.random_candidates, q.max_substitutes, ("synonym",),
                            scoring_batch_size, max_words=q.max_words)
    rng = random.Random(q.seed)
    used: set[int] = set()
    edits: list[Edit] = []
    notes: list[str] = []
    reports: list[ExampleReport] = []
    settings = q.influence.resolve(
        rt, default_candidates=default_candidates, scoring_batch_size=scoring_batch_size
    )
    targets = Targets(rt, settings, should_stop, target_cache)
    target = targets.target
    total = len(q.examples)
    progress("perturbing", 0, total)
    for k, ex in enumerate(q.examples):
        should_stop()
        n = q.examples_per_test
        objectives: list[Objective] = []
        if q.mode is AttackMode.RANDOM:  # no influence: only the margin, for the report
            margin = targets.margin_value(ex.text, ex.label)
            got = random_edits(rt, k, n, used, lex, ("synonym",), rng,
                               search.max_substitutes)
        else:
            if q.mode in (AttackMode.DEMOTE_SALIENT, AttackMode.COMBINED):
                objectives.append((target(ex.text, ex.label), -1, DEMOTE))
            if q.mode in (AttackMode.PROMOTE_WRONG, AttackMode.COMBINED):
                y_wrong = wrong_label(rt, ex.text, ex.label)
                objectives.append((target(ex.text, y_wrong), +1, PROMOTE))
            if q.mode is AttackMode.PREDICTION_MARGIN:
                objectives.append((target(ex.text, ex.label, True), -1, LOWER_MARGIN))
            track, margin = targets.margin(ex.text, ex.label)
            got = edits_for_objectives(
                rt, objectives, n, used, lex, search, q.seed, should_stop,
                train=train, example_index=k, track=track, margin=margin,
                adaptive=q.adaptive,
            )
        reports.append(example_report(k, ex.label, margin, got, objectives))
        if len(got) < n and not (q.adaptive and reports[-1].flip_budget_reached):
            notes.append(
                f"example {k}: {len(got)} of {n} training examples perturbed (no further "
                "candidate had a substitutable word whose substitution moved the influence "
                "the wanted way)"
            )
        edits += got
        progress("perturbing", k + 1, total)
    request_effects(rt, q.examples, reports, edits, targets, additive=False,
                    should_stop=should_stop, progress=progress,
                    baseline=q.mode is AttackMode.RANDOM)
    return AttackOutcome(edits, notes, apply_replacements(train, edits), reports)
