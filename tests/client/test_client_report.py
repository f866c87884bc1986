"""HTML report: escaping, self-containedness, content, well-formedness, atomic write."""

from __future__ import annotations

import html
import os
from html.parser import HTMLParser

from pairdots_client_fakes import HOSTILE, explain_response

from pairdots.report import RESPONSIBLE_MARK, render_html, write_html
from pairdots.results import Explanation

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
    assert "train #7" in text and "train #11" in text and "I(z, w) = +0.25" in text
    assert "Target label: positive (1)" in text and "Gold label: negative (0)" in text
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
    msg.words.add(index=3, text=".", char_start=11, char_end=12, pieces=1)
    msg.words.add(index=4, text="!", char_start=13, char_end=14, pieces=1)
    for lab in msg.explanations:
        lab.word_saliency.extend([0.0, 0.0])
    expl = Explanation.from_proto(msg)
    assert expl.text == "a fine film. !"
    doc = render_html(expl)
    assert "film<span" in doc and '</span></span><span class="tok"' in doc  # "." touches
