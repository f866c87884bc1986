"""What attack (paper §4.2) and repair (§4.3) share above one edit: the targets of a test
example (its salient word and measurement f, s_test and the candidates' exact influence), the
objectives (direction d = ±1 on I(z, f) for a target), the loop that turns ranked candidates
into edits with what they are predicted to move, and the random baseline.

Influence of a training example z on a measurement f of a test input (Eq. 5):
    I(z, f) = -s_testᵀ ∇θL(z),  s_test = H⁻¹ ∇θf,
so upweighting z by ε moves f by ≈ ε·I(z, f). With N training examples:
    replacing z by z̃ (attack)   Δf ≈ (I(z̃, f) - I(z, f)) / N   (Eq. 6–7),
    adding z̃ (repair)           Δf ≈ I(z̃, f) / N.
Token influence (Eq. 8): I(x_t, f) = I(z, f) - I(z̃(t, UNK), f), summed over a word's pieces.

The measurement f of a target follows the request's InfluenceSettings.word_measurement (the
Explain default, influence/settings.py): MARGIN f = m_y(x) = z_y - max_{c≠y} z_c over the
training examples that contain the word w with the largest contribution c_w (the default),
OCCLUSION f = c_w = m_y(x) - m_y(x with w → [UNK]), SALIENCY f = the word's saliency score
(the paper's Eq. 5). A prediction target is f = m_y(x) over every training example (Koh &
Liang's training-set attack). Every edit also carries the first-order predicted change of the
test example's margin m_y(x) (its gold label), so the flip budget — the number of edits after
which the predicted margin crosses zero — and the adaptive n come from the same numbers.

The greedy search that makes one edit (Eq. 11–12) is perturb/search.py.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pairdots_server.errors import InvalidArgument
from pairdots_server.influence import pipeline as steps
from pairdots_server.influence import words as words_
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import (
    PipelineSettings,
    WordCandidates,
    WordMeasurement,
)
from pairdots_server.model.task import Task
from pairdots_server.perturb.lexicon import Lexicon
from pairdots_server.perturb.search import (
    ScoredEdit,
    SearchSettings,
    StopFn,
    Substitution,
    greedy_edits,
    random_edit,
)
from pairdots_server.storage.data import Example

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


def no_progress(stage: str, done: int, total: int) -> None:
    return None


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """A perturbed (attack) or added (repair) training example (proto TrainingEdit).

    influence_before/after: I(z, f), I(z̃, f) of the optimised target (Eq. 5);
    influence_change: I(z̃, f) - I(z, f) (Eq. 7); predicted_change: the first-order change of
    f it causes (replace: change/N, add: I(z̃, f)/N); predicted_margin_change: the same for the
    test example's margin m_y (gold label). 0 for the random baselines."""

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
    influence_before: float = 0.0
    influence_after: float = 0.0
    predicted_change: float = 0.0
    predicted_margin_change: float = 0.0
    substitutions: tuple[tuple[int, str, str, str], ...] = ()  # (word, original, new, rel)


@dataclass
class SalientTarget:
    """A target of a test example for one label: the word (None for the prediction itself),
    its measurement f (kind, value f(x)), s_test = H⁻¹∇θf and the candidate training
    examples with their exact I(z_i, f) (Eq. 5)."""

    label: int
    word_index: int | None
    word: str
    saliency: float  # the word's ranking score (c_w, or |s| for SALIENCY); m_y for a prediction
    s_test: Tensor
    scores: dict[int, float]
    solver: dict[str, object]
    measurement: str = steps.MeasurementKind.PREDICTION_MARGIN.value
    value: float = 0.0  # f(x) on the served model

    def ranked(self, direction: int, *, additive: bool = False) -> list[int]:
        """Training indices, most promising first for objective direction d.

        Replacing z (attack) gains d·(I(z̃) - I(z)), most where d·I(z) is lowest: d < 0 starts
        from the largest positive I (supporting), d > 0 from the most negative (opposing).
        Adding z̃ (repair, `additive`) gains d·I(z̃) ≈ d·I(z): largest d·I(z) first, and only
        the sources with d·I(z) > 0 (whose influence already points the wanted way; an
        opposing source would need its sign flipped by the substitutions)."""
        sign = -1.0 if direction < 0 else 1.0
        if additive:
            sign = -sign
        items: list[tuple[int, float]] = list(self.scores.items())
        if additive:
            d = 1.0 if direction > 0 else -1.0
            items = [(i, v) for i, v in items if d * v > 0]
        return [i for i, _ in sorted(items, key=lambda p: (sign * p[1], p[0]))]


@dataclass
class ExampleReport:
    """What the edits for one test example are predicted to move, and the flip budget.

    margin: m_y(x) of the label the request names (gold); predicted_margin_change: Σ of the
    edits' first-order Δm_y; flip_budget: the number of edits (in search order) after which
    m_y + ΣΔm_y changes sign, extrapolated at the mean Δm_y per edit beyond the edits made,
    0 when no edit moves the margin towards zero ("never"); targets: per objective, the
    targeted word, the measurement, f(x) and the predicted Δf; measured_margin: m_y after
    retraining (None without retraining).

    request_predicted_margin_change: the first-order Δm_y of every edit of the request, not
    only this example's own (a retrain sees them all; request_effects): Σ_e ΔI(e, m_y)/N,
    None when not computed (a RANDOM baseline on a bundle without a low-rank GGN: it would
    need an s_test solve per example); predicted_flip: m_y + that sum has the other sign
    than m_y (the retrain is predicted to flip the prediction); request_flip_budget (and
    _reached): the flip budget over rounds of the request, round j adding every example's
    (j+1)-th edit (request_flip_budget)."""

    example_index: int
    label: int
    margin: float
    edits: int = 0
    predicted_margin_change: float = 0.0
    flip_budget: int = 0
    flip_budget_reached: bool = False  # the budget lies within the edits made
    targets: list[TargetReport] = field(default_factory=list)
    measured_margin: float | None = None
    request_predicted_margin_change: float | None = None  # None: not computed (RANDOM)
    predicted_flip: bool = False
    request_flip_budget: int = 0
    request_flip_budget_reached: bool = False


@dataclass
class TargetReport:
    objective: str
    word: str
    measurement: str
    value: float
    predicted_change: float = 0.0


def flip_budget(margin: float, changes: Sequence[float]) -> tuple[int, bool]:
    """(edits needed for m + ΣΔm to change sign, whether it happens within `changes`).

    Beyond the edits made it extrapolates at the mean change per edit: ceil(|m| / rate) with
    rate the mean of the changes towards zero; 0 when they do not move m towards zero."""
    toward = -1.0 if margin > 0 else 1.0
    total = 0.0
    for k, c in enumerate(changes, start=1):
        total += c
        if toward * (margin + total) >= 0 and margin != 0:
            return k, True
    rate = toward * total / len(changes) if changes else 0.0
    if not rate > 0:
        return 0, False
    return max(len(changes) + 1, math.ceil(abs(margin) / rate)), False


def margins(task: Task, examples: Sequence[Example], max_length: int) -> list[float]:
    """m_y(x) = z_y - max_{c≠y} z_c = log p_y - max_{c≠y} log p_c of each example's label under
    `task` (e.g. a retrained model: the measured counterpart of predicted_margin_change)."""
    if not examples:
        return []
    logp = task.predict([e.text for e in examples], max_length=max_length).double().log()
    out = []
    for row, ex in zip(logp, examples, strict=True):
        others = torch.cat([row[: ex.label], row[ex.label + 1 :]])
        out.append(float(row[ex.label] - others.max()))
    return out


# -- targets -------------------------------------------------------------------------------


def salient_target(
    rt: ModelRuntime, text: str, label: int, settings: PipelineSettings, should_stop: StopFn,
    *, prediction: bool = False,
) -> SalientTarget | None:
    """The target of `text` for `label` with its s_test (Eq. 5) and the exact influence of the
    candidate training examples (as Explain does): the prediction's margin (`prediction`),
    else the top word and measurement of settings.word_measurement (module docstring).
    None when the text has no word the model saw."""
    enc = steps.encode_text(rt, text)
    margin_kind = steps.MeasurementKind.PREDICTION_MARGIN
    allowed: list[int] | None = None
    if prediction:
        m = steps.Measurement(margin_kind, label)
        wi, word, rank, value = None, "", steps.margin_of(rt, enc, label), 0.0
        value = rank
    elif settings.word_measurement is WordMeasurement.SALIENCY:
        ws = steps.word_saliency(rt, enc, label, settings.target, settings.token_score)  # [W]
        top = steps.top_words(ws, enc.pieces, 1)
        if not top:
            return None
        wi = top[0]
        word, rank, value = enc.words[wi], ws[wi], ws[wi]
        m = steps.Measurement(steps.MeasurementKind.WORD_SALIENCY, label, wi, settings.target,
                              settings.token_score)
    else:
        contrib = words_.word_contribution(rt, enc, label)  # c_w [W]
        top = words_.top_contributing_words(contrib, enc.words, enc.pieces, 1)
        if not top:
            return None
        wi = top[0]
        word, rank = enc.words[wi], contrib[wi]
        if settings.word_measurement is WordMeasurement.MARGIN:
            m, value = steps.Measurement(margin_kind, label), steps.margin_of(rt, enc, label)
        else:
            m = steps.Measurement(steps.MeasurementKind.WORD_OCCLUSION, label, wi)
            value = contrib[wi]
        if settings.word_candidates is WordCandidates.CONTAINING:
            allowed = words_.examples_containing(rt, word) or None
    s_test, diag = steps.measurement_s_test(rt, enc, m, settings, should_stop)
    cand = steps.candidates(rt, s_test, settings, allowed=allowed)
    scores = steps.score_examples(rt, s_test, cand, settings, should_stop)  # [K]
    table = {
        int(i): float(s) for i, s in zip(cand, scores.tolist(), strict=True) if math.isfinite(s)
    }
    return SalientTarget(label, wi, word, rank, s_test, table, dict(diag), m.kind.value, value)


def margin_s_test(
    rt: ModelRuntime, text: str, label: int, settings: PipelineSettings, should_stop: StopFn
) -> tuple[Tensor, float]:
    """(s_test of f = m_y(x), m_y(x)) for tracking the margin (cached per text and label)."""
    enc = steps.encode_text(rt, text)
    m = steps.Measurement(steps.MeasurementKind.PREDICTION_MARGIN, label)
    s, _ = steps.measurement_s_test(rt, enc, m, settings, should_stop)
    return s, steps.margin_of(rt, enc, label)


def tracking_settings(rt: ModelRuntime, settings: PipelineSettings) -> PipelineSettings:
    """The settings of the margin s_test that predicts what the edits do to m_y (Edit.
    predicted_margin_change, the flip budget): the bundle's low-rank GGN (δ = 0.01 λ_max) when
    it has one, else the request's. Measured on minilm-sst2 against scope-only retrains
    (bench/attack_calibration.py, 10 sentences × 6 rows): summed over the row's edits the
    low-rank prediction has slope 1.08 (measured on predicted) and Spearman 0.87, the diagonal
    Fisher's (the default solver, δ = 0.1 mean(d)) slope 8.8e-6 — it overshoots 10⁵×."""
    from dataclasses import replace

    from pairdots_server.influence.solver_config import SolverChoice, SolverSettings

    if not rt.has_lowrank or settings.solver.method is SolverChoice.LOW_RANK:
        return settings
    return replace(settings, solver=SolverSettings(method=SolverChoice.LOW_RANK))


def search_rng(seed: int, train_index: int) -> random.Random:
    """The generator of one training example's T random words (Eq. 11), seeded by (seed,
    index): an example's search does not depend on which were searched before it, so
    candidates can be searched in batches and shared between objectives."""
    return random.Random(f"{seed}:{train_index}")


def iter_edits(
    rt: ModelRuntime,
    target: SalientTarget,
    direction: int,
    used: set[int],
    lexicon: Lexicon,
    search: SearchSettings,
    seed: int,
    should_stop: StopFn,
    *,
    train: Sequence[Example],
    example_index: int,
    objective: str,
    track: Tensor | None = None,
    max_attempts: int,
    chunk: Callable[[], int] = lambda: 8,
) -> Iterator[Edit]:
    """Edits for one objective, walking the ranked candidates (`target.ranked`), skipping
    training examples in `used` (adding the chosen ones to it), at most `max_attempts`
    searches. `track` [P]: the s_test of the test example's margin (predicted_margin_change).

    The candidates are searched chunk() at a time (search.greedy_edits, one batch; chunk is
    asked again before each batch: how many edits the caller still needs) and
    yielded in rank order; one taken meanwhile by another objective is skipped, so the edits
    are those of searching the candidates one by one."""
    n_train = rt.n_train
    ranked = target.ranked(direction, additive=search.additive)
    pos = attempts = 0
    while attempts < max_attempts:
        batch: list[int] = []
        size = max(1, min(chunk(), max_attempts - attempts))
        while pos < len(ranked) and len(batch) < size:
            if ranked[pos] not in used:
                batch.append(ranked[pos])
            pos += 1
        if not batch:
            return
        should_stop()
        found = greedy_edits(
            rt, target.s_test, [train[i] for i in batch], direction, lexicon, search,
            [search_rng(seed, i) for i in batch], should_stop,
            track=None if track is None else track[None],
        )
        for idx, scored in zip(batch, found, strict=True):
            if idx in used:
                continue
            if attempts >= max_attempts:
                return
            attempts += 1
            if scored is None:
                continue
            used.add(idx)
            yield _edit(idx, train[idx], scored, example_index, objective, search.additive,
                        n_train)


def _edit(idx: int, ex: Example, scored: ScoredEdit, example_index: int, objective: str,
          additive: bool, n_train: int) -> Edit:
    e = scored.edit
    moved = scored.influence_after if additive else scored.change
    dm = 0.0
    if scored.tracked_after:
        dm = scored.tracked_after[0] - (0.0 if additive else scored.tracked_before[0])
    return Edit(
        idx, ex.text, e.new_text, ex.label, example_index, e.word_index, e.original_word,
        e.substitute, e.relation, scored.change, objective,
        influence_before=scored.influence_before, influence_after=scored.influence_after,
        predicted_change=moved / n_train, predicted_margin_change=dm / n_train,
        substitutions=_subs(e.substitutions),
    )


def _subs(subs: Sequence[Substitution]) -> tuple[tuple[int, str, str, str], ...]:
    return tuple((s.word_index, s.original_word, s.substitute, s.relation) for s in subs)


@dataclass
class TargetCache:
    """Targets and margin s_tests by (text, label), kept across calls: they do not depend on
    the mode or the objective, so attack modes and repair directions share them.
    targets[(text, label, prediction)]: salient_target; margins[(text, label)]: (s_test of
    f = m_y(x), m_y(x))."""

    targets: dict[tuple[str, int, bool], SalientTarget | None] = field(default_factory=dict)
    margins: dict[tuple[str, int], tuple[Tensor, float]] = field(default_factory=dict)


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


class Targets:
    """A request's targets, memoised in a TargetCache (see there)."""

    def __init__(self, rt: ModelRuntime, settings: PipelineSettings, should_stop: StopFn,
                 cache: TargetCache | None = None) -> None:
        self.rt, self.settings, self.should_stop = rt, settings, should_stop
        self.cache = cache if cache is not None else TargetCache()

    def target(self, text: str, label: int, prediction: bool = False) -> SalientTarget | None:
        """salient_target(text, label, prediction=...), computed once."""
        key = (text, label, prediction)
        if key not in self.cache.targets:
            self.cache.targets[key] = salient_target(self.rt, text, label, self.settings,
                                                     self.should_stop, prediction=prediction)
        return self.cache.targets[key]

    def margin(self, text: str, label: int) -> tuple[Tensor, float]:
        """(s_test of f = m_y(x), m_y(x)) behind predicted_margin_change and the flip budget,
        computed once, by tracking_settings' solver (the prediction target's s_test when that
        is the request's own solver)."""
        key = (text, label)
        if key not in self.cache.margins:
            track = tracking_settings(self.rt, self.settings)
            tgt = self.cache.targets.get((text, label, True))
            self.cache.margins[key] = (
                (tgt.s_test, tgt.value) if tgt is not None and track is self.settings
                else margin_s_test(self.rt, text, label, track, self.should_stop)
            )
        return self.cache.margins[key]

    def margin_value(self, text: str, label: int) -> float:
        """m_y(x) alone (the random baselines need no s_test)."""
        if (text, label) in self.cache.margins:
            return self.cache.margins[(text, label)][1]
        return steps.margin_of(self.rt, steps.encode_text(self.rt, text), label)


def edits_for_objectives(
    rt: ModelRuntime,
    objectives: Sequence[Objective],
    n: int,
    used: set[int],
    lexicon: Lexicon,
    search: SearchSettings,
    seed: int,
    should_stop: StopFn,
    *,
    train: Sequence[Example],
    example_index: int,
    track: Tensor | None = None,
    margin: float | None = None,
    adaptive: bool = False,
) -> list[Edit]:
    """Up to n edits, the objectives taking turns (one edit each, in order; an objective that
    runs out leaves its turns to the others); an objective without a target contributes none.
    `adaptive` with the test example's `margin` (and `track`, its s_test): stop as soon as the
    first-order predicted margin change Σ Δm_y moves m_y across zero."""
    live: list[tuple[Iterator[Edit], str]] = []
    limit = max(3 * n, n + 10)
    present = [o for o in objectives if o[0] is not None]
    got: list[Edit] = []

    def chunk() -> int:  # the edits still needed, shared between the live objectives
        return min(search.candidate_batch, math.ceil((n - len(got)) / max(1, len(live))))

    for tgt, direction, objective in present:
        assert tgt is not None
        live.append((iter_edits(
            rt, tgt, direction, used, lexicon, search, seed, should_stop, train=train,
            example_index=example_index, objective=objective, track=track,
            max_attempts=limit, chunk=chunk,
        ), objective))
    total = 0.0
    while live and len(got) < n:
        for item in list(live):
            if len(got) >= n:
                break
            e = next(item[0], None)
            if e is None:
                live.remove(item)
                continue
            got.append(e)
            total += e.predicted_margin_change
            if adaptive and margin is not None and margin != 0 and (margin + total) * margin <= 0:
                return got
    return got


def example_report(
    example_index: int, label: int, margin: float, edits: Sequence[Edit],
    targets: Sequence[Objective],
) -> ExampleReport:
    """The ExampleReport of one test example from its edits (in search order)."""
    changes = [e.predicted_margin_change for e in edits]
    budget, reached = flip_budget(margin, changes)
    rep = ExampleReport(example_index, label, margin, len(edits), float(sum(changes)),
                        budget, reached)
    for tgt, _, objective in targets:
        if tgt is None:
            continue
        moved = sum(e.predicted_change for e in edits if e.objective == objective)
        rep.targets.append(TargetReport(objective, tgt.word, tgt.measurement, tgt.value,
                                        float(moved)))
    return rep


def edit_margin_changes(
    rt: ModelRuntime, edits: Sequence[Edit], s_tests: Tensor | Sequence[Tensor], *,
    additive: bool,
    should_stop: StopFn, batch_size: int = 32,
) -> Tensor:
    """First-order change of every test example's margin m_k by each edit e of the request:
    s_tests [K,P] or K vectors [P] (the s_test of each example's margin m_k) -> [E,K]
    (float64),

        replace (attack)  Δm_k(e) ≈ (I(z̃_e, m_k) - I(z_e, m_k)) / N   (Eq. 6–7),
        add (repair)      Δm_k(e) ≈ I(z̃_e, m_k) / N,

    with I(z, f) = -s_testᵀ∇θL(z) (Eq. 5) and N the training examples; the retrained set holds
    every edit, so m_k moves by Σ_e Δm_k(e). Each edited text (and, replacing, its original)
    gets one per-example gradient scored against all K s_tests (pipeline.score_texts_many),
    so the cost is that of 2E gradients whatever K is."""
    k = int(s_tests.shape[0]) if isinstance(s_tests, Tensor) else len(s_tests)
    if not edits or k == 0:
        return torch.zeros(len(edits), k, dtype=torch.float64)
    texts = [e.new_text for e in edits]
    labels = [e.label for e in edits]
    if not additive:
        texts += [e.original_text for e in edits]
        labels += [e.label for e in edits]
    scores = steps.score_texts_many(rt, s_tests, texts, labels, batch_size,
                                    should_stop)  # [E or 2E, K]
    e = len(edits)
    delta = scores[:e] if additive else scores[:e] - scores[e:]  # [E,K]
    return delta / rt.n_train


def request_flip_budget(margin: float, per_edit: Sequence[float],
                        ranks: Sequence[int]) -> tuple[int, bool]:
    """flip_budget over rounds of the request: round j applies every example's (j+1)-th edit
    (ranks[e]: edit e's place among its own example's edits, in search order), so the budget
    is the edits per example after which margin + Σ_{e: rank_e < j} Δm(e) changes sign,
    extrapolated at the mean change per round beyond the rounds made."""
    rounds = max(ranks, default=-1) + 1
    changes = [0.0] * rounds
    for dm, r in zip(per_edit, ranks, strict=True):
        changes[r] += dm
    return flip_budget(margin, changes)


def request_effects(
    rt: ModelRuntime, examples: Sequence[Example], reports: Sequence[ExampleReport],
    edits: Sequence[Edit], targets: Targets, *, additive: bool, should_stop: StopFn,
    progress: ProgressFn = no_progress, baseline: bool = False,
) -> None:
    """Fill every report's request_predicted_margin_change, predicted_flip and request flip
    budget (edit_margin_changes with the margin s_tests of Targets.margin: the tracking
    solver; request_flip_budget). Nothing to do without reports; `baseline` (the RANDOM modes,
    which solve no s_test of their own): only when the tracking solver is the bundle's
    low-rank GGN (cheap), else the reports keep None."""
    if not reports or (baseline and not rt.has_lowrank):
        return
    progress("predicting", 0, 1)
    s_tests = [targets.margin(ex.text, ex.label)[0] for ex in examples]  # K × [P]
    per_edit = edit_margin_changes(rt, edits, s_tests, additive=additive,
                                   should_stop=should_stop)  # [E,K]
    seen: dict[int, int] = {}
    ranks = []
    for e in edits:
        ranks.append(seen.get(e.example_index, 0))
        seen[e.example_index] = ranks[-1] + 1
    for k, rep in enumerate(reports):
        col = per_edit[:, k].tolist()
        dm = float(sum(col))
        rep.request_predicted_margin_change = dm
        rep.predicted_flip = (rep.margin + dm) * rep.margin < 0
        rep.request_flip_budget, rep.request_flip_budget_reached = request_flip_budget(
            rep.margin, col, ranks)
    progress("predicting", 1, 1)


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
            e.substitute, e.relation, 0.0, RANDOM_OBJECTIVE, substitutions=_subs(e.substitutions),
        ))
    return out
