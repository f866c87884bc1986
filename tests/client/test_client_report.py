"""HTML report: escaping, self-containedness, content, well-formedness, atomic write; the
measurement named by the answer's settings, signed / unsigned colour scales, bar lengths, the
CLI text never cutting an example."""

from __future__ import annotations

import html
import math
import os
import re
from html.parser import HTMLParser

from pairdots_client_fakes import HOSTILE, example_proto, explain_response

from pairdots.report import RESPONSIBLE_MARK, render_html, write_html
from pairdots.report.charts import Bar, ColourScale, bar_chart
from pairdots.results import Explanation
from pairdots.v1 import pairdots_pb2

_VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr"}


class _Checker(HTMLParser):
    """Collects text, attribute values and tag-balance errors."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self.attrs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend(v or "" for _, v in attrs)
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _hostile_explanation() -> Explanation:
    return Explanation.from_proto(explain_response(f"{HOSTILE} gripping film"))


def _parse(doc: str) -> _Checker:
    c = _Checker()
    c.feed(doc)
    c.close()
    return c


def test_escapes_everything_and_stays_well_formed() -> None:
    doc = render_html(_hostile_explanation(), title='T <b>"q"</b>')
    checker = _parse(doc)
    assert checker.errors == [] and checker.stack == []
    assert "script" not in checker.tags and "b" in checker.tags  # our own <b>, none injected
    assert "<script" not in doc.lower()
    text = "".join(checker.text)
    # the hostile text survives as text (words, example text, warning, title)
    assert HOSTILE in text and 'T <b>"q"</b>' in text
    assert text.count("solver note " + HOSTILE) == 1
    # and as attribute values (tooltips), never breaking out of the attribute
    assert any(HOSTILE in a for a in checker.attrs)
    assert html.escape(HOSTILE, quote=True) in doc


def test_self_contained() -> None:
    doc = render_html(_hostile_explanation())
    low = doc.lower()
    for banned in ("http", "<script", "<link", "@import", "url(", "<img", "src=", "@font-face"):
        assert banned not in low, banned
    assert "<style>" in doc


def test_content_words_markers_and_diagnostics() -> None:
    expl = Explanation.from_proto(explain_response())
    doc = render_html(expl)
    text = "".join(_parse(doc).text)
    for w in ("a", "gripping", "funny", "film"):
        assert f">{w}<" in doc
    # heatmap: tooltip value and the colour-free markers
    assert 'title="a — saliency s = +0.5 ' in doc and "▲" in doc and "▼" in doc
    assert 'data-saliency="-0.7"' in doc
    # responsible word of train #7 ("truly gripping story", word 1) in bold with marker + value
    assert f'{RESPONSIBLE_MARK}gripping<span class="val"> [+0.125]</span>' in doc
    assert f"responsible word {RESPONSIBLE_MARK}<b>gripping</b>" in doc
    assert 'class="w resp"' in doc
    # examples, influence values, both roles, prediction, diagnostics
    # no settings in this answer: the word measurement is named generically, and says so
    assert "train #7" in text and "train #11" in text and "I(z, f) = +0.25" in text
    assert "did not report the settings" in text
    assert "Target label: positive (label 1, the prediction)" in text
    assert "Gold label: negative (label 0)" in text
    assert "0.75" in text and "◀ predicted" in text
    assert "✓ converged" in text and "LISSA / GAUSS_NEWTON" in text
    assert "no solver diagnostics" in text
    assert "EXHAUSTIVE" in text and "saliency" in text and "solve" in text and "a note" in text


def test_saliency_only_explanation_renders() -> None:
    msg = explain_response()
    for lab in msg.explanations:
        del lab.salient_words[:]
    msg.diagnostics.influence_computed = False
    doc = render_html(Explanation.from_proto(msg))
    assert "No salient words explained" in doc and _parse(doc).errors == []


def test_write_html_atomic(tmp_path) -> None:
    expl = Explanation.from_proto(explain_response())
    target = tmp_path / "report.html"
    target.write_text("old")
    out = write_html(expl, target, title="R")
    assert out == target and target.read_text(encoding="utf-8") == render_html(expl, title="R")
    assert sorted(os.listdir(tmp_path)) == ["report.html"]  # no temp file left behind


def test_text_rebuilt_from_offsets() -> None:
    msg = explain_response("a fine film")
    # "film" followed by a touching "." and a spaced "!" (offsets decide the spacing)
    msg.words.add(index=3, text=".", char_start=11, char_end=12, piece_count=1)
    msg.words.add(index=4, text="!", char_start=13, char_end=14, piece_count=1)
    for lab in msg.explanations:
        lab.word_saliency.extend([0.0, 0.0])
    expl = Explanation.from_proto(msg)
    assert expl.text == "a fine film. !"
    doc = render_html(expl)
    assert "film<span" in doc and '</span></span><span class="tok"' in doc  # "." touches


# -- settings, scales and charts ---------------------------------------------------------------

_SVG_RECT = re.compile(r'<rect class="bar (\w+)" x="([-\d.]+)" y="[-\d.]+" width="([-\d.]+)"')


def _with_settings(**fields: object) -> pairdots_pb2.ExplainResponse:
    msg = explain_response()
    base: dict[str, object] = {
        "target_function": pairdots_pb2.TARGET_FUNCTION_LOG_PROBABILITY,
        "token_score": pairdots_pb2.TOKEN_SCORE_METHOD_L2_NORM,
        "word_measurement": pairdots_pb2.WORD_MEASUREMENT_MARGIN,
        "word_candidates": pairdots_pb2.WORD_CANDIDATES_CONTAINING,
        "solver": pairdots_pb2.SOLVER_DIAGONAL,
        "curvature": pairdots_pb2.CURVATURE_GAUSS_NEWTON,
        "candidate_search": pairdots_pb2.CANDIDATE_SEARCH_INDEX,
        "candidate_count": 138,
        "token_influence": pairdots_pb2.TOKEN_INFLUENCE_METHOD_EXACT,
        "prediction_influence": True,
    }
    base.update(fields)
    msg.settings.CopyFrom(pairdots_pb2.ExplainSettings(**base))  # type: ignore[arg-type]
    msg.prediction.label_names[:] = ["negative", "positive"]
    return msg


def test_word_influence_named_by_the_measurement_that_ran() -> None:
    margin = render_html(Explanation.from_proto(_with_settings()))
    assert "I(z, m_y) = <b>+0.25</b>" in margin and "I(z, c_w)" not in margin
    assert "MARGIN: I(z, m_y) on the prediction&#x27;s logit margin" in margin
    assert "DIAGONAL / GAUSS_NEWTON" in margin and "138 candidates per direction" in margin
    occ = render_html(
        Explanation.from_proto(
            _with_settings(word_measurement=pairdots_pb2.WORD_MEASUREMENT_OCCLUSION)
        )
    )
    assert "I(z, c_w) = <b>+0.25</b>" in occ and "I(z, m_y) = <b>+0.25</b>" not in occ
    sal = render_html(
        Explanation.from_proto(
            _with_settings(word_measurement=pairdots_pb2.WORD_MEASUREMENT_SALIENCY)
        )
    )
    assert "I(z, s_w) = <b>+0.25</b>" in sal


def test_unsigned_saliency_one_hue_signed_diverging() -> None:
    msg = _with_settings()  # L2_NORM: unsigned; no c_w in this answer: colours by saliency
    for lab in msg.explanations:
        lab.word_saliency[:] = [abs(v) for v in lab.word_saliency]
    doc = render_html(Explanation.from_proto(msg))
    assert doc.count('<figure class="colour-bar" data-scale="unsigned">') == 2
    assert 'data-scale="signed"' not in doc
    sentence = doc.split('<p class="sentence">')[1].split("</p>")[0]
    assert "▲" not in sentence and "▼" not in sentence
    assert set(re.findall(r"rgba\((\d+,\d+,\d+),", sentence)) == {"84,39,143"}
    assert "less sensitive" in doc and "more sensitive" in doc
    # with the words' contributions c_w (signed) the heatmap and its bar diverge
    for lab in msg.explanations:
        lab.word_contribution[:] = [0.5, -1.0, 0.25, 0.0, -0.125]
    doc = render_html(Explanation.from_proto(msg))
    assert doc.count('<figure class="colour-bar" data-scale="signed">') == 2
    sentence = doc.split('<p class="sentence">')[1].split("</p>")[0]
    assert set(re.findall(r"rgba\((\d+,\d+,\d+),", sentence)) == {"33,102,172", "178,24,43"}
    assert "raises positive" in doc and "lowers positive" in doc


def test_colour_scale_exact_values() -> None:
    signed = ColourScale(True, 2.0)
    assert signed.css(1.0) == "rgba(33,102,172,0.350)"
    assert signed.css(-2.0) == "rgba(178,24,43,0.700)"
    assert signed.css(-8.0) == "rgba(178,24,43,0.700)"  # saturates at vmax
    assert signed.css(0.0) == "transparent" and signed.css(math.nan) == "transparent"
    assert ColourScale(False, 4.0).css(1.0) == "rgba(84,39,143,0.175)"
    assert ColourScale.of([1.0, -3.0, math.inf], signed=True).vmax == 3.0


def test_bar_lengths_are_proportional() -> None:
    signed = bar_chart(
        [Bar("a", 1.0), Bar("b", -0.5), Bar("c", 0.25)], ColourScale(True, 1.0), kind="k", title="t"
    )
    rows = [(c, float(x), float(w)) for c, x, w in _SVG_RECT.findall(signed)]
    assert [c for c, _, _ in rows] == ["pos", "neg", "pos"]
    (_, x0, w0), (_, x1, w1), (_, x2, w2) = rows
    assert (w0, w1, w2) == (150.0, 75.0, 37.5)  # half of the 300 px plot per side
    assert x0 == x2 and x1 == x0 - w1  # positive bars start at the zero axis, negative end there
    for v in ("+1", "-0.5", "+0.25"):
        assert f">{v}</text>" in signed  # the value is printed beside its bar
    unsigned = bar_chart(
        [Bar("a", 2.0), Bar("b", 0.5)], ColourScale(False, 2.0), kind="k", title="t"
    )
    assert [(c, float(w)) for c, _, w in _SVG_RECT.findall(unsigned)] == [
        ("mag", 300.0),
        ("mag", 75.0),
    ]


def test_text_render_never_cuts_and_names_the_gold_label() -> None:
    from pairdots_server.cli.render import explanation_lines

    msg = _with_settings()
    long_text = " ".join(f"word{i}" for i in range(60))  # 349 characters
    msg.explanations[0].salient_words[0].supporting.append(example_proto(9, long_text, 0.01, 3))
    lines = explanation_lines(Explanation.from_proto(msg))
    text = "\n".join(lines)
    assert long_text in text and "…" not in text
    assert "== gold label 'negative' (error analysis" in text
    assert "== target label 'positive' (the prediction) ==" in text
    assert "I(z, m_y) = +2.500e-01" in text and "I(z, c_w)" not in text
    assert "p(y|x): negative 0.250, positive 0.750" in text
