"""The HTML report of a real Explain answer (error analysis on the tiny served bundle), rendered
in headless Chromium (Debian's chromium + chromium-driver, .ci/install): the DOM has the legend,
a labelled diverging colour bar per explained label, inline SVG bar charts whose bar lengths
are |value| / max |value| of the answer's own numbers, every number printed (visible without
hovering), one hue for the unsigned saliency, label names everywhere; a screenshot is saved."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from pairdots import Explanation, PairdotsClient
from pairdots.report import write_html
from pairdots.report.browser import headless_chromium

TEXT = "i loved it !"
POS, NEG, HUE = "33,102,172", "178,24,43", "84,39,143"


def _fmt(x: float) -> str:
    return f"{x:+.3g}"


@pytest.fixture(scope="module")
def answer(server: Any) -> Explanation:
    with server.client() as client:
        assert isinstance(client, PairdotsClient)
        base = client.explain(TEXT, model="tiny", top_words=0)
        gold = 1 - base.prediction.label
        return client.explain(TEXT, model="tiny", gold_label=gold, top_words=2, examples_per_word=2)


@pytest.fixture(scope="module")
def page(answer: Explanation, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("report")
    html = write_html(answer, out / "report.html")
    with headless_chromium(1100, 1400) as driver:
        driver.get(html.resolve().as_uri())
        png = out / "report.png"
        driver.save_screenshot(str(png))
        driver.png_path = png
        yield driver


def _js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def test_screenshot_saved(page: Any) -> None:
    data = Path(page.png_path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_legend_and_labelled_colour_bars(page: Any, answer: Explanation) -> None:
    text = _js(page, "return document.body.innerText")
    assert "Influence I(z, f) > 0" in text and "supporting" in text and "opposing" in text
    bars = _js(
        page,
        """return [...document.querySelectorAll('figure.colour-bar')].map(f => ({
        scale: f.dataset.scale, caption: f.querySelector('figcaption').innerText,
        fills: [...f.querySelectorAll('rect.swatch')].map(r => r.getAttribute('fill')),
        ticks: [...f.querySelectorAll('text.tick')].map(t => t.textContent),
        shown: f.getBoundingClientRect().width > 0}))""",
    )
    assert len(bars) == len(answer.explanations) == 2
    for bar, lab in zip(bars, answer.explanations):
        # c_w is signed: a diverging bar, red at −max, white at 0, blue at +max, both ends named
        assert bar["scale"] == "signed" and bar["shown"]
        assert len(bar["fills"]) == 21
        assert NEG in bar["fills"][0] and POS in bar["fills"][-1]
        assert bar["fills"][10] == "transparent"
        vmax = max(abs(v) for v in lab.word_contribution)
        assert bar["ticks"] == [_fmt(-vmax), _fmt(vmax), "0"]
        assert f"lowers {lab.label_name}" in bar["caption"]
        assert f"raises {lab.label_name}" in bar["caption"]


def _chart(driver: Any, kind: str, nth: int = 0) -> list[dict[str, Any]]:
    return _js(
        driver,
        """const svg = document.querySelectorAll(
        `svg.bar-chart[data-chart="${arguments[0]}"]`)[arguments[1]];
        if (!svg) return null;
        return [...svg.querySelectorAll('g.row')].map(g => {
          const r = g.querySelector('rect.bar'), v = g.querySelector('text.bar-value');
          const rb = r.getBoundingClientRect(), vb = v.getBoundingClientRect();
          return {label: g.querySelector('text.bar-label').textContent, cls: r.getAttribute('class'),
                  fill: r.getAttribute('fill'), width: rb.width, value: v.textContent,
                  value_shown: vb.width > 0 && vb.right <= document.documentElement.scrollWidth};
        })""",
        kind,
        nth,
    )


def _check_lengths(rows: list[dict[str, Any]], values: list[float]) -> None:
    """Bar length / longest bar = |v| / max |v| (0.5 px of rounding per bar)."""
    vmax = max(abs(v) for v in values)
    longest = max(r["width"] for r in rows)
    assert longest > 50
    for r, v in zip(rows, values):
        assert r["width"] == pytest.approx(longest * abs(v) / vmax, abs=0.5)
        assert r["value"] == _fmt(v) and r["value_shown"]


def test_word_charts_match_the_answer(page: Any, answer: Explanation) -> None:
    words = [w.text for w in answer.words]
    for nth, lab in enumerate(answer.explanations):
        rows = _chart(page, "word-contribution", nth)
        assert rows is not None and [r["label"] for r in rows] == words
        _check_lengths(rows, list(lab.word_contribution))
        for r, c in zip(rows, lab.word_contribution):  # diverging: blue raises, red lowers
            assert (POS if c > 0 else NEG) in r["fill"]
        sal = _chart(page, "word-saliency", nth)
        assert sal is not None
        _check_lengths(sal, list(lab.word_saliency))
        # the default L2 norm is unsigned: one hue, no direction
        assert answer.settings is not None and not answer.settings.signed_saliency
        assert {r["fill"] for r in sal} == {f"rgb({HUE})"}
        assert all(r["cls"] == "bar mag" for r in sal)


def test_influence_charts_match_the_answer(page: Any, answer: Explanation) -> None:
    for nth, lab in enumerate(answer.explanations):
        p = lab.prediction
        assert p is not None
        items = list(p.supporting) + list(p.opposing)
        rows = _chart(page, "prediction-influence", nth)
        assert rows is not None
        assert [r["label"] for r in rows] == [f"#{e.train_index} {e.label_name}" for e in items]
        _check_lengths(rows, [e.influence for e in items])
    charts = [sw for lab in answer.explanations for sw in lab.salient_words]
    for nth, sw in enumerate(charts):
        items = list(sw.supporting) + list(sw.opposing)
        if not items:
            continue
        rows = _chart(page, "word-influence", nth)
        assert rows is not None and len(rows) == len(items)
        _check_lengths(rows, [e.influence for e in items])


def test_numbers_visible_and_label_names_everywhere(page: Any, answer: Explanation) -> None:
    target, gold = answer.explanations
    heat = _js(
        page,
        """return [...document.querySelectorAll('p.sentence')].map(p =>
        [...p.querySelectorAll('.tok > .val')].map(v => [v.textContent, v.offsetWidth > 0]))""",
    )
    for vals, lab in zip(heat, answer.explanations):
        assert [v for v, _ in vals] == [_fmt(c) for c in lab.word_contribution]
        assert all(shown for _, shown in vals)
    text = _js(page, "return document.body.innerText")
    assert f"Target label: {target.label_name}" in text
    assert f"Gold label: {gold.label_name}" in text and "Error analysis" in text
    probs = _chart(page, "probabilities")
    assert probs is not None
    assert [r["label"] for r in probs] == list(answer.prediction.label_names)
    metas = _js(page, "return [...document.querySelectorAll('.ex .meta')].map(m => m.innerText)")
    examples = [
        e
        for lab in answer.explanations
        for group in ([lab.prediction] if lab.prediction else []) + list(lab.salient_words)
        for e in list(group.supporting) + list(group.opposing)
    ]
    assert len(metas) == len(examples) > 0
    for meta, ex in zip(metas, examples):
        assert f"train #{ex.train_index} · label {ex.label_name} ·" in meta
        assert f"I(z, m_y) = {ex.influence:+.4g}" in meta
    # the settings that ran, and the word-level influence named by them (MARGIN: m_y)
    assert "MARGIN" in text and "L2_NORM" in text and "LOW_RANK" in text
    measured = _js(
        page,
        """return [...document.querySelectorAll('section.salient-word .meta')]
        .map(m => m.innerText)""",
    )
    assert measured and all("I(z, m_y) =" in m for m in measured)
    assert not any("I(z, c_w)" in m for m in measured)
    assert not math.isnan(answer.diagnostics.total_seconds)
