"""Self-contained HTML report of an Explanation, laid out like the paper's Table 1.

`render_html(expl)` returns one HTML document with inline CSS only (no scripts, fonts, images
or external URLs), so it can be mailed or archived as is:

* the prediction and its probabilities;
* per explanation (target, and gold in error analysis), first the prediction-level pairing:
  the training examples that support (I(z, m_y) > 0) and oppose (< 0) the prediction itself,
  measured on the logit margin m_y = z_y − max_{c≠y} z_c (LabelExplanation.prediction);
* then the input sentence as a token heatmap. When the answer carries the words' contributions
  c_w to the margin (LabelExplanation.word_contribution), the colour is the sign of c_w: blue
  raises the explained label, red lowers it (alpha = |c_w| / max|c_w|). Otherwise the old
  saliency colouring s(x_t), and the legend says when that score is unsigned (≥ 0 everywhere).
  The value is printed after every word (and in the tooltip), with a colour-free marker
  (▲ / ▼ and an underline whose weight grows with the magnitude); explained (salient) words are
  boxed;
* each salient word with its c_w, the training examples containing it and its top supporting
  (I(z, f) > 0) and opposing (I(z, f) < 0) training examples (paper Eq. 5); every example's
  words are coloured by token influence I(x_t, ·) (Eq. 8) with the responsible word in bold,
  marked ◆ and its value shown;
* the diagnostics: solver convergence per word, candidates, stage timings, warnings, notes.

Every piece of text from the Explanation is HTML-escaped (element text and attributes).
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pairdots.options import ExplanationRole
from pairdots.results import (
    Explanation,
    InfluentialExample,
    LabelExplanation,
    PredictionInfluence,
    SalientWord,
    SolverDiagnostics,
    word_separators,
)

__all__ = ["render_html", "write_html"]

#: Colours of positive and negative values (RGB); text stays dark on alpha <= 0.7.
_POS = (33, 102, 172)
_NEG = (178, 24, 43)
#: Colour of an unsigned score (saliency ≥ 0 everywhere): intensity only, no direction.
_UNSIGNED = (110, 110, 110)
_MAX_ALPHA = 0.7
#: Marker of the responsible word of a training example (paper Eq. 8).
RESPONSIBLE_MARK = "◆"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em;
color:#111;background:#fff;line-height:1.45;max-width:70em}
h1{font-size:1.4em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
h3{font-size:1.05em;margin:1.1em 0 .3em}
table{border-collapse:collapse;margin:.4em 0}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.sentence{font-size:1.15em;line-height:2.3}
.tok{padding:.1em .2em;margin:0 .05em;border-radius:.2em;border-bottom-style:solid;
border-bottom-color:#333}
.tok.salient{outline:2px solid #111;outline-offset:1px}
.mark{font-size:.7em;vertical-align:super;margin-left:.1em}
.val{font-size:.75em;color:#333;font-variant-numeric:tabular-nums}
.tok .val{margin-left:.15em}
.prediction-influence{margin:.4em 0 1em 0}
.ex{margin:.3em 0 .6em 0;padding:.3em .5em;border-left:4px solid #999}
.ex.sup{border-left-color:rgb(33,102,172)}.ex.opp{border-left-color:rgb(178,24,43)}
.ex .meta{font-size:.85em;color:#333}
.ex .w{padding:0 .1em;border-radius:.15em}
.ex .resp{font-weight:bold;text-decoration:underline;text-decoration-thickness:2px}
.warn{color:#8a4b00;font-weight:bold}
.ok{color:#1a6b1a}.bad{color:#a00;font-weight:bold}
.legend{font-size:.85em;color:#333}
.none{color:#555;font-style:italic}
"""


def _e(text: object) -> str:
    """HTML-escape for element text and double-quoted attributes."""
    return html.escape(str(text), quote=True)


def _num(x: float, digits: int = 4) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{x:+.{digits}g}"


def _plain(x: float, digits: int = 4) -> str:
    return "NaN" if math.isnan(x) else f"{x:.{digits}g}"


def _scale(values: Sequence[float]) -> float:
    finite = [abs(v) for v in values if math.isfinite(v)]
    return max(finite, default=0.0)


def _bg(value: float, scale: float, *, unsigned: bool = False) -> str:
    """CSS background for a signed value: blue positive, red negative, alpha ∝ |value|
    (grey for an unsigned score)."""
    if not math.isfinite(value) or scale <= 0 or value == 0:
        return "transparent"
    rgb = _UNSIGNED if unsigned else _POS if value > 0 else _NEG
    alpha = _MAX_ALPHA * min(1.0, abs(value) / scale)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.3f})"


def _sign_mark(value: float) -> str:
    if not math.isfinite(value) or value == 0:
        return "·"
    return "▲" if value > 0 else "▼"


def _swatch(rgb: tuple[int, int, int], text: str) -> str:
    return f'<span style="background:rgba({rgb[0]},{rgb[1]},{rgb[2]},.6)">{text}</span>'


def _heatmap_legend(lab: LabelExplanation, by_contribution: bool, unsigned: bool) -> str:
    name = _e(lab.label_name)
    if by_contribution:
        what = (f"Word colours: the word's contribution c_w to the logit margin of "
                f"<b>{name}</b> (c_w = m_y(x) − m_y(x with the word → [UNK])): "
                f"{_swatch(_POS, 'blue ▲')} raises the explained label {name}, "
                f"{_swatch(_NEG, 'red ▼')} lowers it; the number after each word is c_w.")
    elif unsigned:
        what = (f"Word colours: saliency s(x_t) for <b>{name}</b>. The score is unsigned (≥ 0 "
                f"for every word): {_swatch(_UNSIGNED, 'darker')} means the label's score is "
                "more sensitive to the word, not whether the word raises or lowers the label; "
                "the number after each word is s.")
    else:
        what = (f"Word colours: signed saliency s(x_t) for <b>{name}</b>: "
                f"{_swatch(_POS, 'blue ▲')} raises the explained label's score, "
                f"{_swatch(_NEG, 'red ▼')} lowers it (to first order); the number after each "
                "word is s.")
    return (f'<p class="legend">{what} Underline weight grows with the magnitude; boxed words '
            "are explained with training examples; hover a word for details.</p>")


def _heatmap(expl: Explanation, lab: LabelExplanation) -> str:
    """The input as coloured tokens for one explained label: by c_w when the answer has the
    word contributions, else by saliency."""
    by_contribution = bool(lab.word_contribution)
    values = lab.word_contribution if by_contribution else lab.word_saliency
    unsigned = not by_contribution and all(v >= 0 for v in values if math.isfinite(v))
    scale = _scale(values)
    salient = {s.word_index for s in lab.salient_words}
    parts: list[str] = []
    for sep, word in zip(word_separators(expl.words), expl.words):
        i = word.index
        v = values[i] if 0 <= i < len(values) else math.nan
        s = lab.word_saliency[i] if 0 <= i < len(lab.word_saliency) else math.nan
        weight = 1 + round(3 * min(1.0, abs(v) / scale)) if scale > 0 and math.isfinite(v) else 1
        classes = "tok salient" if i in salient else "tok"
        if by_contribution:
            tip = (f"{word.text} — contribution c_w = {_num(v, 6)}, saliency s = {_num(s, 6)} "
                   f"(word #{i}, {word.pieces} pieces)")
            data = f'data-contribution="{_e(_num(v, 6))}" data-saliency="{_e(_num(s, 6))}"'
        else:
            tip = f"{word.text} — saliency s = {_num(s, 6)} (word #{i}, {word.pieces} pieces)"
            data = f'data-saliency="{_e(_num(s, 6))}"'
        mark = "" if unsigned else _sign_mark(v)
        parts.append(
            f'{sep}<span class="{classes}" title="{_e(tip)}" {data} '
            f'style="background:{_bg(v, scale, unsigned=unsigned)};'
            f'border-bottom-width:{weight}px">{_e(word.text)}'
            f'<span class="mark" aria-hidden="true">{mark}</span>'
            f'<span class="val">{_e(_num(v, 3))}</span></span>')
    return (_heatmap_legend(lab, by_contribution, unsigned)
            + f'\n<p class="sentence">{"".join(parts)}</p>')


def _solver_cells(d: SolverDiagnostics | None) -> str:
    if d is None:
        return '<td colspan="7" class="none">no solver diagnostics</td>'
    conv = ('<span class="ok">✓ converged</span>' if d.converged
            else '<span class="bad">✗ not converged</span>')
    return (f"<td>{_e(d.solver.name)} / {_e(d.curvature.name)}</td><td>{conv}</td>"
            f'<td class="num">{d.iterations}</td><td class="num">{_plain(d.relative_change)}</td>'
            f'<td class="num">{_plain(d.norm)}</td><td class="num">{_plain(d.effective_damping)}</td>'
            f'<td class="num">{d.seconds:.3f}{" (cached)" if d.cached else ""}</td>')


def _example(ex: InfluentialExample, css: str, measured: str = "w") -> str:
    """One training example: its words coloured by I(x_t, ·), responsible word marked."""
    if ex.words:
        scale = _scale([w.influence for w in ex.words])
        words: list[str] = []
        for i, w in enumerate(ex.words):
            tip = f"{w.text} — token influence I(x_t, {measured}) = {_num(w.influence, 6)}"
            if i == ex.responsible_word:
                tip += " (responsible word)"
                words.append(
                    f'<span class="w resp" title="{_e(tip)}" style="background:'
                    f'{_bg(w.influence, scale)}">{RESPONSIBLE_MARK}{_e(w.text)}'
                    f'<span class="val"> [{_e(_num(w.influence))}]</span></span>')
            else:
                words.append(f'<span class="w" title="{_e(tip)}" style="background:'
                             f'{_bg(w.influence, scale)}">{_e(w.text)}</span>')
        body = " ".join(words)
    else:
        body = _e(ex.text)
    resp = ex.responsible
    resp_txt = (f"; responsible word {RESPONSIBLE_MARK}<b>{_e(resp.text)}</b> "
                f"(I(x_t, {measured}) = {_e(_num(resp.influence))})" if resp is not None else "")
    return (f'<div class="ex {css}"><div class="meta">train #{ex.train_index} · label '
            f"{_e(ex.label_name)} ({ex.label}) · influence I(z, {measured}) = "
            f"<b>{_e(_num(ex.influence))}</b>{resp_txt}</div><div>{body}</div></div>")


def _salient_word(sw: SalientWord, n: int, lab: LabelExplanation) -> str:
    if lab.word_contribution:
        measured = "c_w"
        head = (f"contribution c_w = {_e(_num(sw.contribution))} {_sign_mark(sw.contribution)}"
                f" · saliency {_e(_num(sw.saliency))}")
        titles = (f"Supporting (make the word push more towards {_e(lab.label_name)})",
                  "Opposing (make it push less)")
    else:
        measured = "w"
        head = f"saliency {_e(_num(sw.saliency))} {_sign_mark(sw.saliency)}"
        titles = ("Supporting (raise this word's saliency)", "Opposing (lower it)")
    out = [(f'<h3>{n}. “{_e(sw.text)}” (word #{sw.word_index}) — {head} · in '
            f"{sw.containing_examples} training examples</h3>")]
    for title, css, examples in ((titles[0], "sup", sw.supporting),
                                 (titles[1], "opp", sw.opposing)):
        out.append(f"<p><b>{title}</b>: {len(examples)}</p>")
        if examples:
            out.extend(_example(ex, css, measured) for ex in examples)
    return "\n".join(out)


def _prediction_influence(lab: LabelExplanation, p: PredictionInfluence | None) -> str:
    """The training examples that support / oppose the prediction itself (I(z, m_y))."""
    name = _e(lab.label_name)
    out = [(f'<section class="prediction-influence"><h3>Training examples that support / '
            f"oppose the prediction {name}</h3>")]
    if p is None:
        out.append('<p class="none">Prediction-level influence not requested.</p></section>')
        return "\n".join(out)
    d = p.solver
    solve = ("no solver diagnostics" if d is None else
             f"{_e(d.solver.name)} / {_e(d.curvature.name)}, "
             + ("converged" if d.converged else '<span class="bad">not converged</span>')
             + f", {d.iterations} iterations, {d.seconds:.3f} s")
    out.append(f"<p>Influence I(z, m_y) on the logit margin m_y = {_e(_num(p.margin))} of "
               f"{name} · {p.candidates_scored} training examples scored · {solve}</p>")
    for title, css, examples in (
            (f"Supporting the prediction (training more on them raises the margin of {name})",
             "sup", p.supporting),
            ("Opposing the prediction (training more on them lowers it)", "opp", p.opposing)):
        out.append(f"<p><b>{title}</b>: {len(examples)}</p>")
        out.extend(_example(ex, css, "m_y") for ex in examples)
    out.append("</section>")
    return "\n".join(out)


def _explanation(expl: Explanation, lab: LabelExplanation) -> str:
    role = {ExplanationRole.TARGET: "Target", ExplanationRole.GOLD: "Gold"}.get(lab.role, "Label")
    out = [f"<h2>{role} label: {_e(lab.label_name)} ({lab.label})</h2>",
           _prediction_influence(lab, lab.prediction), "<h3>Words</h3>", _heatmap(expl, lab)]
    if not lab.salient_words:
        out.append('<p class="none">No salient words explained (saliency only).</p>')
    else:
        rows = "".join(f"<tr><td>{_e(sw.text)}</td>{_solver_cells(sw.solver)}</tr>"
                       for sw in lab.salient_words)
        out.append(
            "<table><caption>Inverse-HVP solve per salient word</caption><tr><th>word</th>"
            "<th>solver / curvature</th><th>converged</th><th class=num>iterations</th>"
            "<th class=num>relative change</th><th class=num>‖s_test‖</th>"
            "<th class=num>damping</th><th class=num>seconds</th></tr>" + rows + "</table>")
        out.extend(_salient_word(sw, i + 1, lab) for i, sw in enumerate(lab.salient_words))
    return "\n".join(out)


def _prediction(expl: Explanation) -> str:
    names = {lab.label: lab.label_name for lab in expl.explanations}
    names[expl.prediction.label] = expl.prediction.label_name
    rows = []
    for i, p in enumerate(expl.prediction.probabilities):
        mark = " ◀ predicted" if i == expl.prediction.label else ""
        rows.append(f"<tr><td>{_e(names.get(i, f'label {i}'))} ({i}){mark}</td>"
                    f'<td class="num">{_plain(p)}</td></tr>')
    return (f"<h2>Prediction: {_e(expl.prediction.label_name)} ({expl.prediction.label})</h2>"
            "<table><tr><th>label</th><th class=num>p(y|x)</th></tr>" + "".join(rows)
            + "</table>")


def _diagnostics(expl: Explanation) -> str:
    d = expl.diagnostics
    out = ["<h2>Diagnostics</h2><table>",
           f"<tr><th>influence computed</th><td>{'yes' if d.influence_computed else 'no'}</td></tr>",
           f"<tr><th>candidate search</th><td>{_e(d.candidate_search.name)}</td></tr>",
           f"<tr><th>candidates scored per word</th><td>{d.candidates_scored}</td></tr>",
           f"<tr><th>training examples</th><td>{d.training_examples}</td></tr>",
           f"<tr><th>total server time</th><td>{d.total_seconds:.3f} s</td></tr></table>"]
    if d.timings:
        out.append("<table><caption>Stage timings</caption><tr><th>stage</th>"
                   "<th class=num>seconds</th></tr>"
                   + "".join(f'<tr><td>{_e(t.stage)}</td><td class="num">{t.seconds:.3f}</td></tr>'
                             for t in d.timings) + "</table>")
    if d.warnings:
        out.append("<h3>Warnings</h3><ul>"
                   + "".join(f'<li class="warn">⚠ {_e(w)}</li>' for w in d.warnings) + "</ul>")
    if d.notes:
        out.append("<h3>Notes</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in d.notes) + "</ul>")
    return "\n".join(out)


_LEGEND = (
    '<p class="legend">Influence I(z, f) &gt; 0: training more on the training example z raises '
    "f (supporting); &lt; 0: lowers it (opposing). f is the logit margin m_y for the "
    "prediction-level examples, and the salient word's contribution c_w (or its saliency, "
    "w in the paper's notation) for a word's examples. "
    f"{RESPONSIBLE_MARK}<b>bold</b> marks the responsible word of a training example "
    "(paper Eq. 8).</p>")


def render_html(expl: Explanation, *, title: str | None = None) -> str:
    """The report as one self-contained HTML document (see the module docstring)."""
    heading = title if title is not None else f"pairdots explanation — {expl.model}"
    body = [f"<h1>{_e(heading)}</h1>",
            f"<p>Model <b>{_e(expl.model)}</b> · input: “{_e(expl.text)}”</p>",
            _LEGEND, _prediction(expl)]
    body.extend(_explanation(expl, lab) for lab in expl.explanations)
    body.append(_diagnostics(expl))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(heading)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_html(expl: Explanation, path: str | os.PathLike[str], *,
               title: str | None = None) -> Path:
    """Write render_html(expl) to `path` atomically (temp file in the same folder, fsync,
    rename); returns the path."""
    target = Path(path)
    text = render_html(expl, title=title)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be shared
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
