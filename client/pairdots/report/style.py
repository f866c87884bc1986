"""The report's inline CSS (colours of the scales are written inline by charts.py)."""

from __future__ import annotations

__all__ = ["CSS"]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em;
color:#111;background:#fff;line-height:1.45;max-width:72em}
h1{font-size:1.4em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
h3{font-size:1.05em;margin:1.1em 0 .3em}
.idx{font-weight:normal;color:#555;font-size:.85em}
table{border-collapse:collapse;margin:.4em 0}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
table.settings{font-size:.85em}table.settings th{font-weight:600;background:#f6f6f6;white-space:nowrap}
caption{text-align:left;font-weight:600;padding:.2em 0}
.sentence{font-size:1.15em;line-height:2.3}
.tok{padding:.1em .2em;margin:0 .05em;border-radius:.2em;border-bottom-style:solid;
border-bottom-color:#333}
.tok.salient{outline:2px solid #111;outline-offset:1px}
.mark{font-size:.7em;vertical-align:super;margin-left:.1em}
.val{font-size:.75em;color:#333;font-variant-numeric:tabular-nums}
.tok .val{margin-left:.15em}
.w .wv{font-size:.62em;vertical-align:sub;margin-left:.1em;color:#444}
.charts{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
figure{margin:.4em 0}
figure figcaption{font-size:.85em;color:#333}
figure.colour-bar{display:inline-block;margin:.2em 0 .4em 0}
figure.colour-bar figcaption{display:flex;justify-content:space-between;gap:1em}
svg text{font-size:12px;font-family:system-ui,sans-serif;fill:#111}
svg text.bar-value{font-variant-numeric:tabular-nums}
svg text.bar-note,svg text.axis-caption,svg text.tick{fill:#444}
svg .row.salient text.bar-label{font-weight:bold}
svg text.cb-title{font-weight:600}
.prediction-influence{margin:.4em 0 1em 0}
.ex{margin:.3em 0 .6em 0;padding:.3em .5em;border-left:4px solid #999}
.ex.sup{border-left-color:rgb(33,102,172)}.ex.opp{border-left-color:rgb(178,24,43)}
.supk{color:rgb(33,102,172);font-weight:600}.oppk{color:rgb(178,24,43);font-weight:600}
.ex .meta{font-size:.85em;color:#333}
.ex .w{padding:0 .1em;border-radius:.15em}
.ex .resp{font-weight:bold;text-decoration:underline;text-decoration-thickness:2px}
.warn{color:#8a4b00;font-weight:bold}
.ok{color:#1a6b1a}.bad{color:#a00;font-weight:bold}
.legend{font-size:.85em;color:#333}
.none{color:#555;font-style:italic}
"""
