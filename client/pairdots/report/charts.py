"""Colour scales, colour bars and bar charts of the HTML report, as inline SVG (no scripts, no
external references, no url(): every colour is written out).

A ColourScale maps a value v to a colour:
  signed    diverging, blue for v > 0 (raises the label), red for v < 0 (lowers it), white
            at 0; opacity α = 0.7 · min(1, |v| / vmax)
  unsigned  one hue (purple), α = 0.7 · min(1, v / vmax): magnitude only, no direction
vmax is the largest finite |v| of the values shown together. `colour_bar` draws the scale
as 21 (signed) or 11 (unsigned) swatches with its end values and what each end means;
`bar_chart` draws one horizontal bar per value (from a zero axis in the middle when signed,
from the left edge when unsigned) with the value printed beside each bar.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Bar", "ColourScale", "bar_chart", "colour_bar", "fmt"]

POS = (33, 102, 172)  # blue: raises the explained label
NEG = (178, 24, 43)  # red: lowers it
HUE = (84, 39, 143)  # purple: an unsigned magnitude
MAX_ALPHA = 0.7

_ROW = 20  # px per bar
_FONT = 12  # px
_CHAR = 7.0  # px per character of a label at _FONT (an estimate for the layout)
_PLOT = 300  # px of the bar area
_VALUE = 78  # px of the printed value


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def fmt(x: float, digits: int = 3) -> str:
    """A signed number with `digits` significant digits (NaN, ±inf spelled out)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{x:+.{digits}g}"


@dataclass(frozen=True)
class ColourScale:
    """A signed (diverging) or unsigned (one hue) scale up to vmax (see the module doc)."""

    signed: bool
    vmax: float

    @classmethod
    def of(cls, values: Sequence[float], *, signed: bool) -> ColourScale:
        finite = [abs(v) for v in values if math.isfinite(v)]
        return cls(signed, max(finite, default=0.0))

    def rgb(self, value: float) -> tuple[int, int, int]:
        if not self.signed:
            return HUE
        return POS if value > 0 else NEG

    def alpha(self, value: float) -> float:
        if not math.isfinite(value) or self.vmax <= 0 or value == 0:
            return 0.0
        return MAX_ALPHA * min(1.0, abs(value) / self.vmax)

    def css(self, value: float) -> str:
        """CSS colour of `value` ("transparent" for 0, NaN or an all-zero scale)."""
        a = self.alpha(value)
        if a == 0.0:
            return "transparent"
        r, g, b = self.rgb(value)
        return f"rgba({r},{g},{b},{a:.3f})"


def colour_bar(scale: ColourScale, *, title: str, low: str, high: str) -> str:
    """The scale as a labelled colour bar: swatches from −vmax (signed) or 0 to +vmax, the end
    values under them and `low` / `high` saying what each end means."""
    steps = 21 if scale.signed else 11
    width, height, top = 16, 14, 16
    lo = -scale.vmax if scale.signed else 0.0
    rects = []
    for i in range(steps):
        v = lo + (scale.vmax - lo) * i / (steps - 1)
        rects.append(
            f'<rect class="swatch" x="{i * width}" y="{top}" width="{width}" '
            f'height="{height}" fill="{scale.css(v)}" data-value="{_e(fmt(v))}"/>'
        )
    total = steps * width
    y = top + height + 13
    ticks = [
        f'<text class="tick" x="0" y="{y}">{_e(fmt(lo) if scale.signed else "0")}</text>',
        f'<text class="tick" x="{total}" y="{y}" text-anchor="end">{_e(fmt(scale.vmax))}</text>',
    ]
    if scale.signed:
        ticks.append(f'<text class="tick" x="{total / 2}" y="{y}" text-anchor="middle">0</text>')
    kind = "signed" if scale.signed else "unsigned"
    return (
        f'<figure class="colour-bar" data-scale="{kind}">'
        f'<svg role="img" width="{total + 2}" '
        f'height="{y + 4}" aria-label="{_e(title)}"><title>{_e(title)}</title>'
        f'<text class="cb-title" x="0" y="11">{_e(title)}</text>'
        f'<rect x="0" y="{top}" width="{total}" height="{height}" fill="none" stroke="#999"/>'
        + "".join(rects)
        + "".join(ticks)
        + "</svg>"
        f'<figcaption><span class="cb-low">◀ {_e(low)}</span> '
        f'<span class="cb-high">{_e(high)} ▶</span></figcaption></figure>'
    )


@dataclass(frozen=True)
class Bar:
    """One bar: its label (left), value, an optional note printed after the value, and a
    css class (e.g. "salient")."""

    label: str
    value: float
    note: str = ""
    css: str = ""


def bar_chart(
    bars: Sequence[Bar], scale: ColourScale, *, kind: str, title: str, low: str = "", high: str = ""
) -> str:
    """Horizontal bars of `bars` on `scale` (module doc), value printed beside every bar;
    `kind` becomes data-chart (what is charted), `low` / `high` caption the axis ends."""
    if not bars:
        return ""
    label_w = int(min(260, max(60, _CHAR * max(len(b.label) for b in bars) + 12)))
    note_w = (
        int(min(220, _CHAR * max(len(b.note) for b in bars) + 8))
        if any(b.note for b in bars)
        else 0
    )
    width = label_w + _PLOT + _VALUE + note_w
    axis_y = 14 if (low or high) else 0
    height = axis_y + _ROW * len(bars) + 4
    zero = label_w + (_PLOT / 2 if scale.signed else 0)
    half = _PLOT / 2 if scale.signed else _PLOT
    out = [
        (
            f'<svg class="bar-chart" data-chart="{_e(kind)}" '
            f'role="img" width="{width}" height="{height}" aria-label="{_e(title)}">'
            f"<title>{_e(title)}</title>"
        )
    ]
    if low:
        out.append(
            f'<text class="axis-caption" x="{zero - 4}" y="10" text-anchor="end">◀ {_e(low)}</text>'
        )
    if high:
        out.append(f'<text class="axis-caption" x="{zero + 4}" y="10">{_e(high)} ▶</text>')
    for i, b in enumerate(bars):
        y = axis_y + i * _ROW
        v = b.value
        frac = min(1.0, abs(v) / scale.vmax) if scale.vmax > 0 and math.isfinite(v) else 0.0
        w = frac * half
        x = zero - w if (scale.signed and v < 0) else zero
        r, g, bl = scale.rgb(v)
        sign = "mag" if not scale.signed else "pos" if v > 0 else "neg" if v < 0 else "zero"
        mid = y + _ROW / 2 + 4
        out.append(
            f'<g class="row {_e(b.css)}"><text class="bar-label" x="{label_w - 6}" y="{mid}" '
            f'text-anchor="end">{_e(b.label)}</text>'
            f'<rect class="bar {sign}" x="{x:.1f}" y="{y + 3}" width="{w:.1f}" '
            f'height="{_ROW - 6}" fill="rgb({r},{g},{bl})" data-value="{_e(fmt(v, 6))}">'
            f"<title>{_e(b.label)}: {_e(fmt(v, 6))}</title></rect>"
            f'<text class="bar-value" x="{label_w + _PLOT + 6}" y="{mid}">{_e(fmt(v))}</text>'
            + (
                f'<text class="bar-note" x="{label_w + _PLOT + _VALUE}" y="{mid}">'
                f"{_e(b.note)}</text>"
                if b.note
                else ""
            )
            + "</g>"
        )
    out.append(
        f'<line class="axis" x1="{zero}" y1="{axis_y}" x2="{zero}" '
        f'y2="{height - 2}" stroke="#333"/></svg>'
    )
    return "".join(out)
