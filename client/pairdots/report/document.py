"""The HTML report of an Explanation, section by section (pairdots.report has the overview).

Every piece of text from the Explanation is HTML-escaped (element text and attributes); the
document has inline CSS and inline SVG only.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from pairdots.options import ExplanationRole
from pairdots.report.charts import Bar, ColourScale, bar_chart, colour_bar, fmt
from pairdots.report.style import CSS
from pairdots.report.terms import MARGIN, Terms
from pairdots.results import (
    Explanation,
    InfluentialExample,
    LabelExplanation,
    PredictionInfluence,
    SalientWord,
    SolverDiagnostics,
    word_separators,
)

__all__ = ["RESPONSIBLE_MARK", "render_html"]

#: Marker of the responsible word of a training example (paper Eq. 8).
RESPONSIBLE_MARK = "◆"


def _e(text: object) -> str:
    """HTML-escape for element text and double-quoted attributes."""
    return html.escape(str(text), quote=True)


def _plain(x: float, digits: int = 4) -> str:
    return "NaN" if math.isnan(x) else f"{x:.{digits}g}"


def _sign_mark(value: float) -> str:
    if not math.isfinite(value) or value == 0:
        return "·"
    return "▲" if value > 0 else "▼"


# -- the input's words ------------------------------------------------------------------------


def _heatmap(expl: Explanation, lab: LabelExplanation, terms: Terms) -> str:
    """The input as coloured words for one explained label: by c_w when the answer has the
    word contributions (signed, diverging), else by saliency (signed or one hue); the value
    after every word; explained words boxed; a colour bar that names both ends."""
    name = lab.label_name
    by_contribution = bool(lab.word_contribution)
    values = lab.word_contribution if by_contribution else lab.word_saliency
    signed = True if by_contribution else terms.saliency_signed(values)
    scale = ColourScale.of(values, signed=signed)
    salient = {s.word_index for s in lab.salient_words}
    parts: list[str] = []
    for sep, word in zip(word_separators(expl.words), expl.words):
        i = word.index
        v = values[i] if 0 <= i < len(values) else math.nan
        s = lab.word_saliency[i] if 0 <= i < len(lab.word_saliency) else math.nan
        weight = (
            1 + round(3 * min(1.0, abs(v) / scale.vmax))
            if scale.vmax > 0 and math.isfinite(v)
            else 1
        )
        classes = "tok salient" if i in salient else "tok"
        if by_contribution:
            tip = (
                f"{word.text} — contribution c_w = {fmt(v, 6)}, saliency s = {fmt(s, 6)} "
                f"(word #{i}, {word.pieces} pieces)"
            )
            data = f'data-contribution="{_e(fmt(v, 6))}" data-saliency="{_e(fmt(s, 6))}"'
        else:
            tip = f"{word.text} — saliency s = {fmt(s, 6)} (word #{i}, {word.pieces} pieces)"
            data = f'data-saliency="{_e(fmt(s, 6))}"'
        mark = _sign_mark(v) if signed else ""
        parts.append(
            f'{sep}<span class="{classes}" title="{_e(tip)}" {data} '
            f'style="background:{scale.css(v)};border-bottom-width:{weight}px">{_e(word.text)}'
            f'<span class="mark" aria-hidden="true">{mark}</span>'
            f'<span class="val">{_e(fmt(v))}</span></span>'
        )
    if by_contribution:
        title = f"word contribution c_w to the margin of {name}"
        legend = (
            f"Word colours and the number after each word: the word's contribution "
            f"c_w = m_y(x) − m_y(x with the word → [UNK]) to the logit margin of "
            f"<b>{_e(name)}</b>; blue ▲ raises {_e(name)}, red ▼ lowers it."
        )
        bar = colour_bar(scale, title=title, low=f"lowers {name}", high=f"raises {name}")
    elif signed:
        title = f"saliency s(x_t) for {name}"
        legend = (
            f"Word colours and the number after each word: signed saliency "
            f"{_e(terms.saliency)} for <b>{_e(name)}</b>; blue ▲ raises the label's "
            "score, red ▼ lowers it (to first order)."
        )
        bar = colour_bar(scale, title=title, low=f"lowers {name}", high=f"raises {name}")
    else:
        title = f"saliency s(x_t) for {name} (unsigned)"
        legend = (
            f"Word colours and the number after each word: saliency {_e(terms.saliency)} "
            f"for <b>{_e(name)}</b>. The score is unsigned (≥ 0 for every word): a darker "
            "word means the label's score is more sensitive to it, not whether the word "
            "raises or lowers the label."
        )
        bar = colour_bar(scale, title=title, low="less sensitive", high="more sensitive")
    return (
        f'<p class="legend">{legend} Underline weight grows with the magnitude; boxed words '
        f"are explained with training examples below.</p>{bar}"
        f'\n<p class="sentence">{"".join(parts)}</p>'
    )


def _word_charts(expl: Explanation, lab: LabelExplanation, terms: Terms) -> str:
    """Bar charts over the input's words: c_w (when present) and the saliency."""
    name = lab.label_name
    salient = {s.word_index for s in lab.salient_words}
    out: list[str] = []

    def bars(values: Sequence[float]) -> list[Bar]:
        return [
            Bar(
                w.text,
                values[w.index] if w.index < len(values) else math.nan,
                "▣ explained" if w.index in salient else "",
                "salient" if w.index in salient else "",
            )
            for w in expl.words
        ]

    if lab.word_contribution:
        scale = ColourScale.of(lab.word_contribution, signed=True)
        out.append(
            f"<figure><figcaption>Contribution c_w of every word to the margin of "
            f"{_e(name)}</figcaption>"
            + bar_chart(
                bars(lab.word_contribution),
                scale,
                kind="word-contribution",
                title=f"word contribution c_w to the margin of {name}",
                low=f"lowers {name}",
                high=f"raises {name}",
            )
            + "</figure>"
        )
    if lab.word_saliency:
        signed = terms.saliency_signed(lab.word_saliency)
        scale = ColourScale.of(lab.word_saliency, signed=signed)
        kind = "signed" if signed else "unsigned, ≥ 0"
        out.append(
            f"<figure><figcaption>Saliency {_e(terms.saliency)} of every word for "
            f"{_e(name)} ({kind})</figcaption>"
            + bar_chart(
                bars(lab.word_saliency),
                scale,
                kind="word-saliency",
                title=f"word saliency for {name} ({kind})",
                low=f"lowers {name}" if signed else "",
                high=f"raises {name}" if signed else "",
            )
            + "</figure>"
        )
    return '<div class="charts">' + "".join(out) + "</div>"


# -- training examples ------------------------------------------------------------------------


def _example(ex: InfluentialExample, css: str, measured: str) -> str:
    """One training example: its words coloured by I(x_t, f) with every value shown, the
    responsible word marked."""
    if ex.words:
        scale = ColourScale.of([w.influence for w in ex.words], signed=True)
        words: list[str] = []
        for i, w in enumerate(ex.words):
            tip = f"{w.text} — token influence I(x_t, {measured}) = {fmt(w.influence, 6)}"
            if i == ex.responsible_word:
                tip += " (responsible word)"
                words.append(
                    f'<span class="w resp" title="{_e(tip)}" style="background:'
                    f'{scale.css(w.influence)}">{RESPONSIBLE_MARK}{_e(w.text)}'
                    f'<span class="val"> [{_e(fmt(w.influence))}]</span></span>'
                )
            else:
                words.append(
                    f'<span class="w" title="{_e(tip)}" style="background:'
                    f'{scale.css(w.influence)}">{_e(w.text)}'
                    f'<span class="val wv">{_e(fmt(w.influence, 2))}</span></span>'
                )
        body = " ".join(words)
    else:
        body = _e(ex.text)
    resp = ex.responsible
    resp_txt = (
        f"; responsible word {RESPONSIBLE_MARK}<b>{_e(resp.text)}</b> "
        f"(I(x_t, {measured}) = {_e(fmt(resp.influence, 4))})"
        if resp is not None
        else ""
    )
    return (
        f'<div class="ex {css}"><div class="meta">train #{ex.train_index} · label '
        f"<b>{_e(ex.label_name)}</b> · influence I(z, {measured}) = "
        f"<b>{_e(fmt(ex.influence, 4))}</b>{resp_txt}</div><div>{body}</div></div>"
    )


def _influence_chart(
    supporting: Sequence[InfluentialExample],
    opposing: Sequence[InfluentialExample],
    measured: str,
    what: str,
    kind: str,
) -> str:
    """One bar per returned training example: I(z, f), supporting then opposing."""
    items = list(supporting) + list(opposing)
    if not items:
        return ""
    bars = [
        Bar(
            f"#{ex.train_index} {ex.label_name}",
            ex.influence,
            f"{RESPONSIBLE_MARK}{ex.responsible.text}" if ex.responsible else "",
        )
        for ex in items
    ]
    scale = ColourScale.of([ex.influence for ex in items], signed=True)
    title = f"influence I(z, {measured}) of each training example on {what}"
    return (
        f"<figure><figcaption>Influence I(z, {_e(measured)}) per training example (train # "
        f"and its label; {RESPONSIBLE_MARK} its responsible word)</figcaption>"
        + bar_chart(bars, scale, kind=kind, title=title, low="opposing", high="supporting")
        + "</figure>"
    )


def _examples(
    title: str, css: str, examples: Sequence[InfluentialExample], measured: str
) -> list[str]:
    out = [f"<p><b>{title}</b>: {len(examples)}</p>"]
    if not examples:
        out.append('<p class="none">none</p>')
    out.extend(_example(ex, css, measured) for ex in examples)
    return out


def _prediction_influence(
    lab: LabelExplanation, p: PredictionInfluence | None, predicted: bool
) -> str:
    """The training examples that support / oppose the prediction itself (I(z, m_y)), or
    the explained label when it is not the prediction (`predicted` False)."""
    name = _e(lab.label_name)
    what = f"the prediction {name}" if predicted else f"the label {name}"
    out = [
        (
            f'<section class="prediction-influence"><h3>Training examples that support / '
            f"oppose {what}</h3>"
        )
    ]
    if p is None:
        out.append('<p class="none">Prediction-level influence not requested.</p></section>')
        return "\n".join(out)
    d = p.solver
    solve = (
        "no solver diagnostics"
        if d is None
        else f"{_e(d.solver.name)} / {_e(d.curvature.name)}, "
        + ("converged" if d.converged else '<span class="bad">not converged</span>')
        + f", {d.iterations} iterations, {d.seconds:.3f} s"
    )
    out.append(
        f"<p>Influence I(z, m_y) on the logit margin m_y = z_y − max_{{c≠y}} z_c = "
        f"<b>{_e(fmt(p.margin, 4))}</b> of {name} · {p.candidates_scored} training "
        f"examples scored · {solve}</p>"
    )
    out.append(
        _influence_chart(
            p.supporting, p.opposing, MARGIN, f"the margin of {name}", "prediction-influence"
        )
    )
    out += _examples(
        f"Supporting {what} (training more on them raises the margin of {name})",
        "sup",
        p.supporting,
        MARGIN,
    )
    out += _examples(
        f"Opposing {what} (training more on them lowers it)", "opp", p.opposing, MARGIN
    )
    out.append("</section>")
    return "\n".join(out)


def _salient_word(sw: SalientWord, n: int, lab: LabelExplanation, terms: Terms) -> str:
    name = _e(lab.label_name)
    measured = terms.word_symbol
    head = (
        f"contribution c_w = {_e(fmt(sw.contribution, 4))} {_sign_mark(sw.contribution)}"
        f" · saliency {_e(fmt(sw.saliency, 4))}"
    )
    if measured == MARGIN:
        titles = (
            f"Supporting: examples with “{_e(sw.text)}” that raise the margin of {name}",
            "Opposing: examples with the word that lower it",
        )
    elif measured == "c_w":
        titles = (
            f"Supporting (make the word push more towards {name})",
            "Opposing (make it push less)",
        )
    else:
        titles = ("Supporting (raise this word's measurement)", "Opposing (lower it)")
    out = [
        (
            f'<section class="salient-word"><h3>{n}. “{_e(sw.text)}” (word #{sw.word_index})'
            f" — {head} · in {sw.containing_examples} training examples</h3>"
        ),
        (
            f'<p class="measured">Influence I(z, {_e(measured)}) on {_e(terms.word_measurement)}'
            f" for {name}.</p>"
        ),
        _influence_chart(sw.supporting, sw.opposing, measured, f"“{sw.text}”", "word-influence"),
    ]
    out += _examples(titles[0], "sup", sw.supporting, measured)
    out += _examples(titles[1], "opp", sw.opposing, measured)
    out.append("</section>")
    return "\n".join(out)


# -- the document -----------------------------------------------------------------------------


def _solver_cells(d: SolverDiagnostics | None) -> str:
    if d is None:
        return '<td colspan="7" class="none">no solver diagnostics</td>'
    conv = (
        '<span class="ok">✓ converged</span>'
        if d.converged
        else '<span class="bad">✗ not converged</span>'
    )
    return (
        f"<td>{_e(d.solver.name)} / {_e(d.curvature.name)}</td><td>{conv}</td>"
        f'<td class="num">{d.iterations}</td><td class="num">{_plain(d.relative_change)}</td>'
        f'<td class="num">{_plain(d.norm)}</td><td class="num">{_plain(d.effective_damping)}'
        f'</td><td class="num">{d.seconds:.3f}{" (cached)" if d.cached else ""}</td>'
    )


def _heading(expl: Explanation, lab: LabelExplanation) -> str:
    name = _e(lab.label_name)
    predicted = _e(expl.prediction.label_name)
    if lab.role == ExplanationRole.GOLD:
        return (
            f'<h2 class="role gold">Gold label: {name} <span class="idx">(label '
            f"{lab.label})</span></h2><p>Error analysis: why the model did not predict "
            f"the gold label {name} (it predicted {predicted}).</p>"
        )
    why = (
        "the prediction"
        if lab.label == expl.prediction.label
        else f"the requested label; the model predicted {predicted}"
    )
    return (
        f'<h2 class="role target">Target label: {name} <span class="idx">(label '
        f"{lab.label}, {why})</span></h2>"
    )


def _explanation(expl: Explanation, lab: LabelExplanation, terms: Terms) -> str:
    out = [
        _heading(expl, lab),
        f"<h3>Words of the input for {_e(lab.label_name)}</h3>",
        _heatmap(expl, lab, terms),
        _word_charts(expl, lab, terms),
        _prediction_influence(lab, lab.prediction, lab.label == expl.prediction.label),
    ]
    if not lab.salient_words:
        out.append('<p class="none">No salient words explained (saliency only).</p>')
    else:
        rows = "".join(
            f"<tr><td>{_e(sw.text)}</td>{_solver_cells(sw.solver)}</tr>" for sw in lab.salient_words
        )
        out.append(
            "<table><caption>Inverse-HVP solve per salient word</caption><tr><th>word</th>"
            "<th>solver / curvature</th><th>converged</th><th class=num>iterations</th>"
            "<th class=num>relative change</th><th class=num>‖s_test‖</th>"
            "<th class=num>damping</th><th class=num>seconds</th></tr>" + rows + "</table>"
        )
        out.extend(_salient_word(sw, i + 1, lab, terms) for i, sw in enumerate(lab.salient_words))
    return "\n".join(out)


def _prediction(expl: Explanation) -> str:
    probs = expl.prediction.probabilities
    rows = []
    for i, p in enumerate(probs):
        mark = " ◀ predicted" if i == expl.prediction.label else ""
        rows.append(
            f"<tr><td>{_e(expl.label_name(i))} <span class=idx>({i})</span>{mark}</td>"
            f'<td class="num">{_plain(p)}</td></tr>'
        )
    chart = bar_chart(
        [Bar(expl.label_name(i), p) for i, p in enumerate(probs)],
        ColourScale(False, 1.0),
        kind="probabilities",
        title="p(y|x) per label",
    )
    return (
        f"<h2>Prediction: {_e(expl.prediction.label_name)} "
        f'<span class="idx">(label {expl.prediction.label})</span></h2>'
        '<div class="charts"><table><tr><th>label</th><th class=num>p(y|x)</th></tr>'
        + "".join(rows)
        + f"</table><figure>{chart}</figure></div>"
    )


def _settings(terms: Terms) -> str:
    rows = terms.rows()
    if not rows:
        return (
            '<p class="settings none">The server did not report the settings of this '
            "answer; its measurements are named generically (f, s).</p>"
        )
    return (
        '<table class="settings"><caption>Settings of this answer (defaults resolved by '
        "the server)</caption>"
        + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _diagnostics(expl: Explanation) -> str:
    d = expl.diagnostics
    out = [
        "<h2>Diagnostics</h2><table>",
        f"<tr><th>influence computed</th><td>{'yes' if d.influence_computed else 'no'}</td></tr>",
        f"<tr><th>candidate search</th><td>{_e(d.candidate_search.name)}</td></tr>",
        f"<tr><th>candidates scored per word</th><td>{d.candidates_scored}</td></tr>",
        f"<tr><th>training examples</th><td>{d.training_examples}</td></tr>",
        f"<tr><th>total server time</th><td>{d.total_seconds:.3f} s</td></tr></table>",
    ]
    if d.timings:
        out.append(
            "<table><caption>Stage timings</caption><tr><th>stage</th>"
            "<th class=num>seconds</th></tr>"
            + "".join(
                f'<tr><td>{_e(t.stage)}</td><td class="num">{t.seconds:.3f}</td></tr>'
                for t in d.timings
            )
            + "</table>"
        )
    if d.warnings:
        out.append(
            "<h3>Warnings</h3><ul>"
            + "".join(f'<li class="warn">⚠ {_e(w)}</li>' for w in d.warnings)
            + "</ul>"
        )
    if d.notes:
        out.append("<h3>Notes</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in d.notes) + "</ul>")
    return "\n".join(out)


def _legend(terms: Terms) -> str:
    return (
        '<p class="legend">Influence I(z, f) &gt; 0: training more on the training example z '
        "raises f (<span class=supk>supporting</span>); &lt; 0: lowers it "
        "(<span class=oppk>opposing</span>); removing z from the n training examples changes f "
        f"by about −I/n. f is the logit margin m_y for the prediction-level examples and "
        f"{_e(terms.word_symbol)} ({_e(terms.word_measurement)}) for a salient word's examples. "
        f"{RESPONSIBLE_MARK}<b>bold</b> marks the responsible word of a training example "
        "(paper Eq. 8); the small number after each of its words is I(x_t, f).</p>"
    )


def render_html(expl: Explanation, *, title: str | None = None) -> str:
    """The report as one self-contained HTML document (see pairdots.report)."""
    terms = Terms(expl.settings)
    heading = title if title is not None else f"pairdots explanation — {expl.model}"
    body = [
        f"<h1>{_e(heading)}</h1>",
        f"<p>Model <b>{_e(expl.model)}</b> · input: “{_e(expl.text)}”</p>",
        _prediction(expl),
        _settings(terms),
        _legend(terms),
    ]
    body.extend(_explanation(expl, lab, terms) for lab in expl.explanations)
    body.append(_diagnostics(expl))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(heading)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
