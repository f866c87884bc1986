"""Repair (paper §4.3): add influence-guided training examples that restore the model's focus
on the misclassified examples of a dev set.

For each example the served model gets wrong (gold y, predicted y'):
  * w_y, w_y' = the top salient words of x for y and for y';
  * n new training examples, the objectives taking turns
      ↑ I(z̃, f_y)   start from the training examples with the largest I(z, f_y) (most
                     supporting) and perturb them to maximise I(z̃, f_y) (greedy, Eq. 11–12,
                     direction +1),
      ↓ I(z̃, f_y')  start from the most negative I(z, f_y') (most opposing) and minimise
                     I(z̃, f_y') (direction -1),
    with WordNet synonyms AND antonyms as substitutes; labels are kept; an edit is kept only
    when d · I(z̃, f) > 0 (the added example itself pushes f the wanted way).
Adding z̃ to the N training examples moves f by ≈ I(z̃, f)/N — not by I(z̃) - I(z), since z
stays — so the objective is d · I(z̃, f) and the sources are the examples whose influence
already points the wanted way. f follows InfluenceSettings.word_measurement (the Explain
default: m_y among the examples containing the top word, perturb/objectives.py). The new
examples are ADDED to the training set (nothing is replaced). RANDOM: the same number of random training examples with a random
synonym/antonym substitution, added.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from pairdots_server.errors import InvalidArgument
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import InfluenceSettings
from pairdots_server.model.train import evaluate
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
from pairdots_server.perturb.search import RELATIONS, SearchSettings, StopFn
from pairdots_server.storage.data import Example

RAISE_GOLD = "increase I(z~, w_y)"
LOWER_WRONG = "decrease I(z~, w_y')"


class RepairMode(enum.Enum):
    INFLUENCE = "influence"
    RANDOM = "random"


@dataclass(frozen=True)
class RepairQuery:
    """A validated Repair request (rpc/convert_jobs.py builds it)."""

    examples: tuple[Example, ...]
    examples_per_error: int
    mode: RepairMode = RepairMode.INFLUENCE
    random_candidates: int = 5
    influence: InfluenceSettings = field(default_factory=InfluenceSettings)
    seed: int = 0
    max_substitutes: int = 10
    max_words: int = 1  # m: substituted words per new example

    def __post_init__(self) -> None:
        if not self.examples:
            raise InvalidArgument.for_field("examples", "at least one example is needed")
        if not 1 <= self.max_words <= 10:
            raise InvalidArgument.for_field(
                "max_words", f"must be in 1..10, got {self.max_words}"
            )
        if self.examples_per_error < 1:
            raise InvalidArgument.for_field(
                "examples_per_error", f"must be >= 1, got {self.examples_per_error}"
            )


@dataclass
class RepairOutcome:
    errors_found: int
    edits: list[Edit]
    notes: list[str]
    train: list[Example]  # the training set plus the added examples
    reports: list[ExampleReport] = field(default_factory=list)  # one per error


def find_errors(rt: ModelRuntime, examples: tuple[Example, ...]) -> list[tuple[int, int]]:
    """(example index, predicted label) of every example the served model gets wrong."""
    ev = evaluate(rt.task, list(examples), max_length=rt.max_length)
    return [(i, p) for i, (p, ex) in enumerate(zip(ev.predictions, examples)) if p != ex.label]


def run_repair(
    rt: ModelRuntime,
    q: RepairQuery,
    should_stop: StopFn,
    progress: ProgressFn = no_progress,
    *,
    default_candidates: int,
    scoring_batch_size: int = 32,
    lexicon: Lexicon | None = None,
    target_cache: TargetCache | None = None,
) -> RepairOutcome:
    """New training examples for every error of the served model on `q.examples`."""
    lex = lexicon or default_lexicon()
    check_labels(rt, q.examples)
    train = rt.bundle.train
    progress("evaluating", 0, len(q.examples))
    errors = find_errors(rt, q.examples)
    search = SearchSettings(q.random_candidates, q.max_substitutes, RELATIONS, scoring_batch_size,
                            max_words=q.max_words, additive=True)
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
    if not errors:
        notes.append("the served model classifies every example correctly; nothing to repair")
    progress("perturbing", 0, len(errors))
    n = q.examples_per_error
    for done, (k, predicted) in enumerate(errors):
        should_stop()
        ex = q.examples[k]
        objectives: list[Objective] = []
        if q.mode is RepairMode.RANDOM:  # no influence: only the margin, for the report
            margin = targets.margin_value(ex.text, ex.label)
            got = random_edits(rt, k, n, used, lex, RELATIONS, rng, search.max_substitutes)
        else:
            objectives = [
                (target(ex.text, ex.label), +1, RAISE_GOLD),
                (target(ex.text, predicted), -1, LOWER_WRONG),
            ]
            track, margin = targets.margin(ex.text, ex.label)
            got = edits_for_objectives(
                rt, objectives, n, used, lex, search, q.seed, should_stop,
                train=train, example_index=k, track=track, margin=margin,
            )
        reports.append(example_report(k, ex.label, margin, got, objectives))
        if len(got) < n:
            notes.append(f"example {k}: {len(got)} of {n} new training examples found")
        edits += got
        progress("perturbing", done + 1, len(errors))
    request_effects(rt, [q.examples[r.example_index] for r in reports], reports, edits,
                    targets, additive=True, should_stop=should_stop, progress=progress,
                    baseline=q.mode is RepairMode.RANDOM)
    added = [Example(e.new_text, e.label) for e in edits]
    return RepairOutcome(len(errors), edits, notes, list(train) + added, reports)
