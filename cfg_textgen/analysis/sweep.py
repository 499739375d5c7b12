"""The sweep: one continuation per scale with the same seed, each measured (fluency, entropy,
distinct-2, repeat-3, diff-vs-1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from ..backends import as_backend
from ..errors import CFGTextgenError
from .generate import _strip_eos_padding
from .metrics import distinct_n, entropy, normalized_edit_distance, repeated_ngram_rate
from .scoring import Opposing, _plain_and_guided
from .side_by_side import Forced, GenerateFn, LANES, MAX_LANES, Progress, run_side_by_side


# ---- the sweep ----------------------------------------------------------------------------------


@dataclass
class SweepRow:
    """One scale of a sweep: its continuation and the metrics of the module docstring."""

    scale: float
    text: str
    token_ids: list
    fluency: float
    entropy: float
    distinct2: float
    repeat3: float
    diff_vs_plain: float = math.nan

    def metrics(self) -> dict:
        return {k: getattr(self, k) for k in METRICS}


METRICS = ("fluency", "entropy", "distinct2", "repeat3", "diff_vs_plain")
METRIC_LABELS = {
    "fluency": "fluency (mean log p, plain model)",
    "entropy": "entropy of the guided distribution (nats)",
    "distinct2": "distinct-2 (word bigrams)",
    "repeat3": "repeated 3-gram rate (words)",
    "diff_vs_plain": "difference from the scale-1 text",
}


def parse_scales(text: str) -> list[float]:
    """"0,1,1.5" -> [0.0, 1.0, 1.5]; every scale finite; duplicates removed, order kept."""
    scales = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise CFGTextgenError(f"--scales: {part!r} is not a number (give e.g. 0,1,1.5,3)") from None
        if not math.isfinite(value):
            raise CFGTextgenError(f"--scales: every scale has to be a finite number, but one is {part!r}")
        if value not in scales:
            scales.append(value)
    return scales


def text_metrics(text: str) -> tuple[float, float]:
    """(distinct-2, repeated 3-gram rate) of a text, on whitespace-separated words."""
    w = text.split()
    return distinct_n(w, 2), repeated_ngram_rate(w, 3)


def _sweep_measure(scale: float):
    """Per step: (log p of the forced token under the plain model, entropy of the guided
    distribution), as floats (nothing of the step's logits is kept)."""
    def measure(logits, token):
        plain, guided = _plain_and_guided(logits, scale)
        return float(plain[0, token]), float(entropy(guided)[0])

    return measure


def score_rows(model, prompt_ids: Sequence[int], continuations: Sequence[tuple[float, list]],
               opposing_ids: Sequence[int], tokenizer=None, lanes: int = LANES,
               on_done: Callable[[int], None] | None = None) -> list[SweepRow]:
    """Decode and measure continuations [(scale, new ids)], all teacher-forced side by side."""
    backend = as_backend(model, tokenizer)
    jobs = {i: Forced(prompt_ids, None if scale == 1.0 else opposing_ids, ids, _sweep_measure(scale))
            for i, (scale, ids) in enumerate(continuations) if ids}
    order = list(jobs)
    run_side_by_side(backend, [jobs[i] for i in order], lanes,
                     None if on_done is None else (lambda k: on_done(order[k])))
    rows = []
    for i, (scale, ids) in enumerate(continuations):
        text = backend.tokenizer.decode(list(ids), skip_special_tokens=True)
        if i in jobs:
            values = jobs[i].values
            fluency = sum(v[0] for v in values) / len(values)
            ent = sum(v[1] for v in values) / len(values)
        else:
            fluency = ent = math.nan
        d2, r3 = text_metrics(text)
        rows.append(SweepRow(scale, text, list(ids), fluency, ent, d2, r3))
    return rows


def score_row(model, tokenizer, prompt_ids, new_ids, scale, opposing_ids) -> SweepRow:
    """Decode and measure one continuation (`model`: a backend, or a transformers model)."""
    return score_rows(model, prompt_ids, [(scale, list(new_ids))], opposing_ids, tokenizer)[0]


def sweep(model, tokenizer, prompt_ids: Sequence[int], scales: Iterable[float], generate_fn: GenerateFn,
          opposing: Opposing = Opposing(), progress: Progress | None = None,
          lanes: int = MAX_LANES) -> list[SweepRow]:
    """One continuation per scale (the generate function seeds itself), scored; rows in `scales`
    order. The scale-1 text is the reference for diff-vs-1: it is generated even when 1 is not
    among `scales` (and then not returned). A generate function with `many` (EngineGenerate)
    generates every scale side by side; the scoring always runs them side by side."""
    backend = as_backend(model, tokenizer)
    scales = list(scales)
    todo = scales if 1.0 in scales else scales + [1.0]
    # progress counts scales measured (generated and scored); side by side they finish together
    done = [0]

    def tick(_=None):
        done[0] += 1
        if progress:
            progress(done[0], len(todo))

    if progress:
        progress(0, len(todo))
    many = getattr(generate_fn, "many", None)
    if many is not None:
        outs = many(list(prompt_ids), todo)
    else:
        outs = [generate_fn(list(prompt_ids), scale) for scale in todo]
    new = [_strip_eos_padding(list(ids), backend) for ids in outs]
    opposing_ids = opposing.start_ids(prompt_ids, backend)
    scored = score_rows(backend, prompt_ids, list(zip(todo, new)), opposing_ids, lanes=lanes, on_done=tick)
    if done[0] < len(todo) and progress:  # a continuation without tokens has nothing to score
        progress(len(todo), len(todo))
    rows = dict(zip(todo, scored))
    plain_words = rows[1.0].text.split()
    for row in rows.values():
        row.diff_vs_plain = normalized_edit_distance(row.text.split(), plain_words)
    return [rows[s] for s in scales]
