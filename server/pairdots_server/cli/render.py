"""Text rendering of an Explain answer for `pairdots explain` and `pairdots demo`.

Per explained label, first the prediction-level pairing (the training examples that support /
oppose the prediction itself, influence on the logit margin m_y), then the salient words with
their contribution c_w to the margin, the number of training examples containing them and
their supporting / opposing training examples; every training example is shown with its label
name, its influence I(z, ·) and its responsible word (paper Eq. 8).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pairdots import Explanation, InfluentialExample, SolverDiagnostics

#: Characters of a training example's text shown per line.
TEXT_WIDTH = 90


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
        text = ex.text if len(ex.text) <= TEXT_WIDTH else ex.text[:TEXT_WIDTH - 1] + "…"
        out.append(f"      #{ex.train_index:<6} I(z, {measured}) = {ex.influence:+.3e}  "
                   f"label {ex.label_name!r}  {text}{resp_txt}")
    return out


def explanation_lines(expl: Explanation) -> list[str]:
    """The text rendering of a pairdots.Explanation, one string per line."""
    pred = expl.prediction
    probs = ", ".join(f"{p:.3f}" for p in pred.probabilities)
    out = [f"model {expl.model}: predicted {pred.label_name!r} (p = [{probs}])"]
    for e in expl.explanations:
        out += ["", f"== explaining label {e.label_name!r} ({_name(e.role)}) =="]
        p = e.prediction
        if p is not None:
            out.append(
                f"  training examples that support / oppose the prediction {e.label_name!r} "
                f"(influence on the logit margin m_y = {p.margin:+.4f}; "
                f"{p.candidates_scored} scored; {_solver(p.solver)}):")
            out += _example_lines(f"supporting the prediction {e.label_name!r}",
                                  p.supporting, "m_y")
            out += _example_lines(f"opposing the prediction {e.label_name!r}", p.opposing, "m_y")
        if e.word_contribution:
            out.append("  word contribution c_w to the margin (+ raises "
                       f"{e.label_name!r}, - lowers it): " + "  ".join(
                           f"{w.text}:{c:+.3f}" for w, c in zip(expl.words, e.word_contribution)))
        out.append("  word saliency: " + "  ".join(
            f"{w.text}:{s:+.3f}" for w, s in zip(expl.words, e.word_saliency)))
        # the salient words' measurement f: c_w under OCCLUSION (word_contribution filled)
        measured = "c_w" if e.word_contribution else "w"
        for sw in e.salient_words:
            c = sw.contribution
            if not e.word_contribution and c == 0.0:
                contrib = "contribution c_w not measured"
            else:
                contrib = f"contribution c_w = {c:+.4f}" if math.isfinite(c) else f"c_w = {c}"
            out += ["", (f"  salient word {sw.text!r} ({contrib}; saliency {sw.saliency:+.4f}; "
                         f"in {sw.containing_examples} training examples; {_solver(sw.solver)})")]
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
