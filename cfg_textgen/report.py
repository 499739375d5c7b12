"""How analysis results are shown: texts side by side in the terminal, metric tables, the explain
table, a progress bar on stderr (tqdm, on a terminal only), and the self-contained HTML sweep
report with its plot.

The plot needs matplotlib (the optional extra `report`); it is imported only when a plot is drawn.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import shutil
import sys
import textwrap
import unicodedata
from typing import Sequence

from .analysis import METRIC_LABELS, METRICS, ExplainStep, LambadaResult, SweepRow
from .errors import CFGTextgenError
from .files import write_file

INSTALL_REPORT = "pip install 'cfg-textgen[report]'"
MIN_COLUMN = 24  # narrower than this, texts are shown one after another instead of side by side
SHORT_NAMES = {"fluency": "fluency", "entropy": "entropy", "distinct2": "distinct-2",
               "repeat3": "repeat-3", "diff_vs_plain": "diff-vs-1"}


def fmt_scale(scale: float) -> str:
    return f"{scale:g}"


def fmt_num(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


# ---- terminal ---------------------------------------------------------------------------------


def printable(text: str) -> str:
    """Control characters other than newline and tab shown as escapes, so that model output cannot
    move the cursor or recolour the terminal."""
    return "".join(repr(ch)[1:-1] if unicodedata.category(ch) == "Cc" and ch not in "\n\t" else ch
                   for ch in text)


def _wrap(text: str, width: int) -> list[str]:
    """Wrap keeping the text's own line breaks (an empty paragraph stays an empty line)."""
    text = printable(text).replace("\t", "    ")
    lines = []
    for para in text.split("\n"):
        lines.extend(textwrap.wrap(para, width, replace_whitespace=False, drop_whitespace=True) or [""])
    return lines


def format_texts(rows: Sequence[SweepRow], width: int | None = None) -> str:
    """The continuations side by side in columns when the terminal is wide enough, else one section
    per scale."""
    if width is None:
        width = shutil.get_terminal_size((100, 24)).columns
    gap = 3
    col = (width - gap * (len(rows) - 1)) // max(1, len(rows))
    if col >= MIN_COLUMN and len(rows) > 1:
        columns = [[f"scale {fmt_scale(r.scale)}", "-" * min(col, 12)] + _wrap(r.text, col) for r in rows]
        height = max(len(c) for c in columns)
        out = []
        for i in range(height):
            cells = [(c[i] if i < len(c) else "").ljust(col) for c in columns]
            out.append((" " * gap).join(cells).rstrip())
        return "\n".join(out)
    out = []
    for r in rows:
        out.append(f"=== scale {fmt_scale(r.scale)} ===")
        out.extend(_wrap(r.text, max(20, width)))
        out.append("")
    return "\n".join(out).rstrip()


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A plain text table. `align` has one letter per column, "l" or "r"; by default the first column
    is left-aligned and the others right-aligned."""
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                         for a, c, w in zip(align, cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_metrics(rows: Sequence[SweepRow]) -> str:
    header = ["scale"] + [SHORT_NAMES[m] for m in METRICS] + ["tokens"]
    body = [[fmt_scale(r.scale)] + [fmt_num(getattr(r, m)) for m in METRICS] + [str(len(r.token_ids))]
            for r in rows]
    return format_table(header, body)


METRIC_HELP = (
    "fluency: mean log p of the text under the plain model (higher = more natural); "
    "entropy: of the guided distribution, nats (lower = more forced); "
    "distinct-2: distinct word bigrams / bigrams; repeat-3: share of word 3-grams seen before; "
    "diff-vs-1: word edit distance to the scale-1 text / longer length."
)


def show_token(tokenizer, token_id: int) -> str:
    """A token as a quoted Python literal, so that spaces and newlines are visible."""
    return repr(tokenizer.decode([token_id]))


def _pct(p: float) -> str:
    return f"{100 * p:5.1f}%"


def format_explain(steps: Sequence[ExplainStep], tokenizer, scale: float) -> str:
    """One block per generated token: the top candidates before and after CFG side by side, with the
    most promoted (+) and most demoted (-) candidates marked, then both summarised."""
    def change(c):
        return (f"{show_token(tokenizer, c.token_id)} {_pct(c.plain_p).strip()} -> "
                f"{_pct(c.guided_p).strip()} (log p {c.log_change:+.2f})")

    out = []
    for s in steps:
        def cell(c, p):
            mark = "+" if c.token_id == s.promoted.token_id else "-" if c.token_id == s.demoted.token_id else " "
            return [f"{mark} {show_token(tokenizer, c.token_id)}", _pct(p)]

        rows = []
        for i in range(max(len(s.before), len(s.after))):
            b = cell(s.before[i], s.before[i].plain_p) if i < len(s.before) else ["", ""]
            a = cell(s.after[i], s.after[i].guided_p) if i < len(s.after) else ["", ""]
            rows.append([str(i + 1), *b, *a])
        header = ["rank", "before CFG (plain)", "p", f"after CFG (scale {fmt_scale(scale)})", "p"]
        out.append(f"[{s.index + 1}] {show_token(tokenizer, s.chosen.token_id)}  plain "
                   f"{_pct(s.chosen.plain_p).strip()} -> guided {_pct(s.chosen.guided_p).strip()}")
        out.extend("    " + ln for ln in format_table(header, rows, align="rlrlr").splitlines())
        out.append(f"    + promoted most: {change(s.promoted)}")
        out.append(f"    - demoted most:  {change(s.demoted)}")
        out.append("")
    return "\n".join(out).rstrip()


def format_lambada(results: Sequence[LambadaResult]) -> str:
    body = [[fmt_scale(r.scale), f"{r.correct}/{r.total}", f"{100 * r.accuracy:.1f}%"] for r in results]
    return format_table(["scale", "correct", "accuracy"], body)


class ProgressBar:
    """`bar(done, total)` shows progress on stderr (a tqdm bar, redrawn in place) when stderr is a
    terminal, and writes nothing otherwise: logs, pipes and captured stderr stay clean. The call
    shape analysis.sweep / analysis.lambada take as `progress`."""

    def __init__(self, label: str, stream=None):
        self.label, self.stream = label, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = None

    def __call__(self, done: int, total: int) -> None:
        if not self.tty:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self.label, file=self.stream, unit="", leave=True,
                             dynamic_ncols=True)
        self._bar.total = total
        self._bar.update(done - self._bar.n)
        if done >= total:
            self._bar.close()


# ---- the plot and the HTML report -----------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise CFGTextgenError(f"the plot of the sweep report needs matplotlib: {INSTALL_REPORT}") from None
    matplotlib.use("Agg", force=True)  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Fail early (before minutes of generation) when the report cannot be drawn."""
    _pyplot()


def sweep_plot_png(rows: Sequence[SweepRow], title: str = "", dpi: int = 80) -> bytes:
    """A PNG with one small panel per metric against the scale (scale 1 marked)."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r.scale)
    xs = [r.scale for r in rows]
    fig, axes = plt.subplots(len(METRICS), 1, figsize=(7, 1.6 * len(METRICS) + 0.6), sharex=True)
    for ax, metric in zip(axes, METRICS):
        ys = [getattr(r, metric) for r in rows]
        ax.plot(xs, ys, marker="o", color="tab:red" if metric == "fluency" else "tab:blue")
        ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(METRIC_LABELS[metric], fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    if min(xs) >= 0 and max(xs) > 4:  # 0..1 linear, above it logarithmic: small scales stay readable
        axes[-1].set_xscale("symlog", linthresh=1.0, linscale=0.6)
    axes[-1].set_xticks(xs)
    axes[-1].set_xticklabels([fmt_scale(x) for x in xs])
    axes[-1].set_xlabel("CFG scale (dashed: 1 = no guidance)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px; color: #222; }
pre { white-space: pre-wrap; word-wrap: break-word; font-family: Georgia, serif; font-size: 0.95em; }
.prompt { background: #f4f4f4; padding: 0.8em; border-radius: 4px; }
.texts { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1em; }
.text { border: 1px solid #ddd; border-radius: 4px; padding: 0.5em 0.8em; }
.text h3 { margin: 0.2em 0; font-size: 1em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
dl dt { font-weight: bold; } dl dd { margin: 0 0 0.5em 1.5em; }
"""


def sweep_html(rows: Sequence[SweepRow], prompt: str, settings: dict, png: bytes) -> str:
    """The self-contained report: settings, the plot (PNG inline), the metric table and every text.
    Every piece of user or model text is HTML-escaped."""
    esc = html.escape
    setting_rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(str(v))}</td></tr>" for k, v in settings.items())
    metric_head = "".join(f"<th>{esc(SHORT_NAMES[m])}</th>" for m in METRICS)
    metric_rows = "".join(
        f"<tr><td>{esc(fmt_scale(r.scale))}</td>"
        + "".join(f"<td>{esc(fmt_num(getattr(r, m)))}</td>" for m in METRICS)
        + f"<td>{len(r.token_ids)}</td></tr>" for r in rows)
    texts = "".join(f'<div class="text"><h3>scale {esc(fmt_scale(r.scale))}</h3><pre>{esc(r.text)}</pre></div>'
                    for r in rows)
    definitions = "".join(f"<dt>{esc(SHORT_NAMES[m])}</dt><dd>{esc(_DEFINITIONS[m])}</dd>" for m in METRICS)
    img = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>cfg-textgen sweep</title><style>{_CSS}</style></head>
<body>
<h1>CFG scale sweep</h1>
<h2>Prompt</h2><pre class="prompt">{esc(prompt)}</pre>
<table>{setting_rows}</table>
<h2>Metrics against the scale</h2>
<p>Where fluency falls and repeat-3 rises, the text starts to burn.</p>
<img alt="metrics against the CFG scale" src="data:image/png;base64,{img}">
<table><tr><th>scale</th>{metric_head}<th>tokens</th></tr>{metric_rows}</table>
<dl>{definitions}</dl>
<h2>Continuations (same seed)</h2>
<div class="texts">{texts}</div>
</body></html>
"""


_DEFINITIONS = {
    "fluency": "mean log-probability of the generated tokens under the plain model (scale 1, no "
               "samplers); higher reads more naturally, a drop means the text is burning",
    "entropy": "mean entropy (nats) of the guided next-token distribution, before the preset's "
               "samplers; guidance sharpens it",
    "distinct2": "distinct word bigrams / word bigrams; lower is more repetitive",
    "repeat3": "share of word 3-grams that already occurred earlier in the text (1 - distinct-3)",
    "diff_vs_plain": "word-level edit distance to the scale-1 text (same seed) / the longer length; "
                     "0 = identical",
}


write_atomic = write_file  # the report's writer (files.write_file)
