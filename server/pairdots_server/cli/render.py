"""Text rendering of an Explain answer for `pairdots explain` and `pairdots demo`."""

from __future__ import annotations

from typing import Any


def print_explanation(expl: Any) -> None:
    """Readable text rendering of a pairdots.Explanation."""
    pred = expl.prediction
    probs = ", ".join(f"{p:.3f}" for p in pred.probabilities)
    print(f"model {expl.model}: predicted {pred.label_name!r} (p = [{probs}])")
    for e in expl.explanations:
        print(f"\n== explaining label {e.label_name!r} ({e.role}) ==")
        print("word saliency: " + "  ".join(
            f"{w.text}:{s:+.3f}" for w, s in zip(expl.words, e.word_saliency)))
        for sw in e.salient_words:
            d = sw.solver
            print(f"\n  salient word {sw.text!r} (saliency {sw.saliency:+.4f}; s_test by "
                  f"{getattr(d.solver, 'name', d.solver)} in {d.iterations} it, converged={d.converged}, "
                  f"{d.seconds:.2f} s{', cached' if d.cached else ''})")
            for title, items in (("supporting", sw.supporting), ("opposing", sw.opposing)):
                print(f"    {title}:")
                for ex in items:
                    resp = ""
                    if 0 <= ex.responsible_word < len(ex.words):
                        resp = f"  [responsible: {ex.words[ex.responsible_word].text!r}]"
                    print(f"      #{ex.train_index:<6} I={ex.influence:+.3e} "
                          f"({ex.label_name}) {ex.text[:90]}{resp}")
    diag = expl.diagnostics
    stages = ", ".join(f"{t.stage} {t.seconds:.2f}s" for t in diag.timings)
    print(f"\ncandidates scored: {diag.candidates_scored} of {diag.training_examples}; "
          f"{stages}; total {diag.total_seconds:.2f} s")
    for w in diag.warnings:
        print(f"warning: {w}")
    for n in diag.notes:
        print(f"note: {n}")
