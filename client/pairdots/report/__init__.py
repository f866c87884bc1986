"""Self-contained HTML report of an Explanation, laid out like the paper's Table 1.

`render_html(expl)` returns one HTML document with inline CSS and inline SVG only (no
scripts, fonts, images or external URLs), so it can be mailed or archived as is:

* the settings the answer was computed with (ExplainResponse.settings: word measurement,
  candidates, token score, target S_y, solver, candidate search, Eq. 8 method), and every
  measurement named by them: I(z, m_y), I(z, c_w) or I(z, s_w) (terms.py);
* the prediction with every label's name and p(y|x), as a table and a bar chart;
* per explanation (target, and gold in error analysis) the prediction-level pairing: the
  training examples that support (I(z, m_y) > 0) and oppose (< 0) the prediction itself, on
  the logit margin m_y = z_y − max_{c≠y} z_c, as a bar chart and as a list;
* the input sentence coloured by the words' contributions c_w to the margin (signed:
  diverging blue/red with a labelled colour bar), or by saliency when the answer has no c_w
  (signed token scores diverging, the unsigned L2 norm in one hue with its own colour bar);
  the value after every word; bar charts of c_w and of the saliency of every word;
* each salient word with c_w, saliency, the training examples containing it and a bar chart
  and list of its supporting / opposing training examples (paper Eq. 5); every example's words
  coloured by token influence I(x_t, f) (Eq. 8) with each value printed and the responsible
  word in bold, marked ◆;
* the diagnostics: solver convergence per word, candidates, stage timings, warnings, notes.

`write_html(expl, path)` writes it atomically. `pairdots.report.browser` renders a report in
headless Chromium (DOM checks, screenshots).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pairdots.report.document import RESPONSIBLE_MARK, render_html
from pairdots.results import Explanation

__all__ = ["RESPONSIBLE_MARK", "render_html", "write_html"]


def write_html(
    expl: Explanation, path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
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
