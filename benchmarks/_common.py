"""Shared parts of the benchmarks: the machine record, the story, timing helpers and result rows.

The machine these run on is shared and noisy, so every figure that matters is a ratio of variants
measured in the same run, interleaved repetition by repetition, and summarised by a median.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

# A ~200-token story opening (trimmed to exactly PROMPT_TOKENS tokens of the default tokenizer).
STORY = (
    "The lighthouse keeper had not seen a ship in eleven years. Every night he climbed the one "
    "hundred and twelve stairs, lit the lamp, and wrote the same line in the logbook: no vessels "
    "sighted, weather fair or foul. His name was Tobias Renn, and he had been sent to the island "
    "of Carrow by a harbour board that no longer answered his letters. The supply boat still came "
    "on the first Monday of each month, crewed by a silent girl who left crates of flour, lamp oil "
    "and tinned peaches on the jetty and rowed away before he could reach the bottom of the path. "
    "He had stopped waving to her in the third year. In the seventh year he had started leaving "
    "notes under a stone, asking about the mainland, the war, the price of tobacco, and whether "
    "anyone remembered that the light was still burning. The notes were always gone when he came "
    "back, but no answer ever came in their place. On the night of the great storm, when the waves "
    "broke over the lower gallery and the glass of the lantern room sang in its frame, Tobias saw "
    "a light moving on the water where no light should be. It was small and green, and it was "
    "coming towards the rocks."
)
PROMPT_TOKENS = 200


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def now() -> float:
    return time.perf_counter()


def machine() -> dict:
    """What the figures were measured on (recorded with every result)."""
    import torch
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
    }


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


_MODEL = None


def default_model():
    """The embedded default model (SmolLM2-135M-Instruct), loaded once per process."""
    global _MODEL
    if _MODEL is None:
        from cfg_textgen.models import load_model

        model, tokenizer = load_model()
        _MODEL = (model.eval(), tokenizer)
    return _MODEL


def story_ids(tokenizer, n: int = PROMPT_TOKENS) -> list[int]:
    ids = tokenizer(STORY, add_special_tokens=True)["input_ids"]
    if len(ids) < n:
        raise RuntimeError(f"the benchmark story is only {len(ids)} tokens; need {n}")
    return list(ids[:n])


def have_engine() -> bool:
    import importlib.util

    return importlib.util.find_spec("cfg_textgen.engine") is not None


def have_cli_generate() -> bool:
    try:
        from cfg_textgen.cli import main
    except Exception:  # noqa: BLE001 - a half-written cli.py counts as "not there yet"
        return False
    return "generate" in getattr(main, "commands", {})


class CheckFailed(AssertionError):
    """Two paths that must give the same tokens did not: no timing of a wrong path is reported."""


@dataclass
class Row:
    """One line of the printed table (and of the JSON `rows`)."""

    section: str
    figure: str
    value: float | None
    unit: str = ""
    target: str = ""
    ok: bool | None = None  # None: informative, no target
    note: str = ""
    fmt: str = "{:.3g}"

    def cells(self) -> list[str]:
        if self.value is None:  # not measured: the note says why
            status = "skipped" if "not run" in self.note else "pending"
            return [self.figure, "-", self.target, status, self.note]
        shown = self.fmt.format(self.value) + (f" {self.unit}" if self.unit else "")
        status = "" if self.ok is None else ("pass" if self.ok else "MISS")
        return [self.figure, shown, self.target, status, self.note]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("fmt")
        return d


@dataclass
class Section:
    """The result of one benchmark: table rows, every raw figure, and the checks it ran."""

    name: str
    rows: list[Row] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)

    def row(self, figure, value, unit="", target="", ok=None, note="", fmt="{:.3g}") -> Row:
        r = Row(self.name, figure, value, unit, target, ok, note, fmt)
        self.rows.append(r)
        return r


def table(rows: list[Row]) -> str:
    """A plain-text table: figure, value, target, pass/MISS, grouped by section."""
    head = ["figure", "value", "target", "result", "note"]
    body = [r.cells() for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    section = None
    for r, cells in zip(rows, body):
        if r.section != section:
            section = r.section
            lines.append(f"[{section}]")
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    out = ["| section | figure | value | target | result | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        fig, val, tgt, res, note = r.cells()
        res = {"pass": "pass", "MISS": "**miss**"}.get(res, res)
        out.append(f"| {r.section} | {fig} | {val} | {tgt} | {res} | {note} |")
    return "\n".join(out)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
