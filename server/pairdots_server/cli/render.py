"""Text rendering of an Explain answer for `pairdots explain` and `pairdots demo`.

First the settings the server reports (word measurement, candidates, token score, target S_y,
solver, candidate search, Eq. 8 method), then per explained label, named by its label (the
gold one of an error analysis as "gold label 'negative'"): every word's contribution c_w to
the margin and its saliency, the prediction-level pairing (the training examples that support /
oppose the prediction itself, influence on the logit margin m_y), then the salient words with
c_w, the number of training examples containing them and their supporting / opposing training
examples, each influence named by the measurement that ran: I(z, m_y), I(z, c_w) or I(z, s_w)
(pairdots.report.terms). Every training example is shown with its label name, its influence
I(z, ·), its responsible word (paper Eq. 8) and its whole text, never cut.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pairdots.report.terms import MARGIN, Terms

if TYPE_CHECKING:
    from pairdots import Explanation, InfluentialExample, LabelExplanation, SolverDiagnostics


def _name(value: object) -> str:
    return value.name if isinstance(value, enum.Enum) else str(value)


def _solver(d: SolverDiagnostics | None) -> str:
    if d is None:
        return "no solver diagnostics"
    return (f"s_test by {_name(d.solver)} in {d.iterations} it, converged={d.converged}, "
            f"{d.seconds:.2f} s{', cached' if d.cached else ''}")


def _example_lines(title: str, items: Sequence[InfluentialExample], measured: str) -> list[str]:
    out = [f"    {title} ({len(items)}):"]
    for ex in items:
        resp = ex.responsible
        resp_txt = (f"  [responsible word: {resp.text!r}, I(x_t, {measured}) = "
                    f"{resp.influence:+.3e}]" if resp is not None else "  [no responsible word]")
        out.append(f"      #{ex.train_index:<6} I(z, {measured}) = {ex.influence:+.3e}  "
                   f"label {ex.label_name!r}  {ex.text}{resp_txt}")
    return out


def _heading(expl: Explanation, e: LabelExplanation) -> str:
    from pairdots import ExplanationRole

    predicted = expl.prediction.label_name
    if e.role == ExplanationRole.GOLD:
        return (f"== gold label {e.label_name!r} (error analysis: why not the gold label; the "
                f"model predicted {predicted!r}) ==")
    why = ("the prediction" if e.label == expl.prediction.label
           else f"the requested label; the model predicted {predicted!r}")
    return f"== target label {e.label_name!r} ({why}) =="


def explanation_lines(expl: Explanation) -> list[str]:
    """The text rendering of a pairdots.Explanation, one string per line."""
    terms = Terms(expl.settings)
    pred = expl.prediction
    probs = ", ".join(f"{expl.label_name(i)} {p:.3f}" for i, p in enumerate(pred.probabilities))
    out = [f"model {expl.model}: predicted {pred.label_name!r} (p(y|x): {probs})"]
    rows = terms.rows()
    if rows:
        out.append("settings:")
        out += [f"  {k}: {v}" for k, v in rows]
    else:
        out.append("settings: not reported by the server (measurements named generically)")
    measured = terms.word_symbol
    for e in expl.explanations:
        out += ["", _heading(expl, e)]
        if e.word_contribution:
            out.append("  word contribution c_w to the margin (+ raises "
                       f"{e.label_name!r}, - lowers it): " + "  ".join(
                           f"{w.text}:{c:+.3f}" for w, c in zip(expl.words, e.word_contribution)))
        signed = "signed" if terms.saliency_signed(e.word_saliency) else "unsigned"
        out.append(f"  word saliency {terms.saliency} ({signed}): " + "  ".join(
            f"{w.text}:{s:+.3f}" for w, s in zip(expl.words, e.word_saliency)))
        p = e.prediction
        if p is not None:
            what = ("the prediction" if e.label == pred.label else "the label") + (
                f" {e.label_name!r}")
            out.append(
                f"  training examples that support / oppose {what} "
                f"(influence on the logit margin m_y = {p.margin:+.4f}; "
                f"{p.candidates_scored} scored; {_solver(p.solver)}):")
            out += _example_lines(f"supporting {what}", p.supporting, MARGIN)
            out += _example_lines(f"opposing {what}", p.opposing, MARGIN)
        for sw in e.salient_words:
            c = sw.contribution
            contrib = f"contribution c_w = {c:+.4f}" if math.isfinite(c) else f"c_w = {c}"
            out += ["", (f"  salient word {sw.text!r} ({contrib}; saliency {sw.saliency:+.4f}; "
                         f"in {sw.containing_examples} training examples; {_solver(sw.solver)})"),
                    f"    influence I(z, {measured}) on {terms.word_measurement}"]
            out += _example_lines(f"supporting {sw.text!r}", sw.supporting, measured)
            out += _example_lines(f"opposing {sw.text!r}", sw.opposing, measured)
    diag = expl.diagnostics
    stages = ", ".join(f"{t.stage} {t.seconds:.2f}s" for t in diag.timings)
    out += ["", (f"candidates scored: {diag.candidates_scored} of {diag.training_examples}; "
                 f"{stages}; total {diag.total_seconds:.2f} s")]
    out += [f"warning: {w}" for w in diag.warnings]
    out += [f"note: {n}" for n in diag.notes]
    return out


def print_explanation(expl: Explanation) -> None:
    """Readable text rendering of a pairdots.Explanation."""
    print("\n".join(explanation_lines(expl)))
