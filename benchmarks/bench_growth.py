"""How the cost of CFG's opposing branch grows with the generated length.

The engine at scale 1.5 (story and opposing rows in one batch-2 forward) and at scale 1 (batch 1)
continue the same story in lockstep: one token of one, one token of the other, so both see the same
machine load at the same moment. The CFG overhead at position t is the median per-token time of the
scale-1.5 run minus that of the scale-1 run, over the tokens t-16 .. t+16. With the opposing branch
KV-cached (one new token per step, never re-encoded) it stays flat as t grows; re-encoding would
make it grow linearly. Without the engine, the plugin is measured instead: the time spent inside
CFGLogitsProcessor (its own opposing forward plus the combine), step by step.

Run alone: python3 benchmarks/bench_growth.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from _common import Section, default_model, have_engine, log, median, now, story_ids, table  # noqa: E402
from bench_decode import SCALE, Stamp, eos_ids  # noqa: E402

HALF = 16  # window: positions t - HALF .. t + HALF


def window(per_token: list[float], t: int) -> list[float]:
    """Per-token times around position t (1-based); position 1 holds the prefill, so never used."""
    lo, hi = max(2, t - HALF), min(len(per_token), t + HALF)
    return per_token[lo - 1:hi]


def lockstep_engine(model, tokenizer, prompt, n) -> dict[str, list[float]]:
    """Per-token seconds of the engine at SCALE and at 1, stepped alternately."""
    from cfg_textgen.engine import Stream

    eos = eos_ids(model)
    streams = {name: Stream(model, tokenizer, prompt, scale=s, chain=[Stamp(eos)], max_new_tokens=n,
                            do_sample=False)
               for name, s in (("cfg", SCALE), ("plain", 1.0))}
    per_token = {name: [] for name in streams}
    live = dict(streams)
    turn = 0
    while live:
        name = list(live)[turn % len(live)]
        turn += 1
        stream = live[name]
        before = len(stream.token_ids)
        t0 = now()
        try:
            next(stream)
        except StopIteration:
            del live[name]
        dt = now() - t0
        made = len(stream.token_ids) - before
        if made:  # a piece may hold several tokens; the last call may hold none
            per_token[name].extend([dt / made] * made)
    for name, s in streams.items():
        if len(s.token_ids) != n:
            raise RuntimeError(f"engine ({name}) stopped after {len(s.token_ids)} of {n} tokens")
    return per_token


class Timed(LogitsProcessor):
    """Wraps a processor and records the seconds each call takes."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, []

    def __call__(self, input_ids, scores):
        t0 = now()
        out = self.inner(input_ids, scores)
        self.seconds.append(now() - t0)
        return out


def plugin_overhead(model, prompt, n) -> dict[str, list[float]]:
    """Per-token seconds inside CFGLogitsProcessor, and of the whole step, in one generate run."""
    from cfg_textgen.guidance import CFGLogitsProcessor

    ids = torch.tensor([prompt])
    timed, stamp = Timed(CFGLogitsProcessor(model, scale=SCALE)), Stamp(eos_ids(model))
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                       logits_processor=LogitsProcessorList([timed, stamp]))
    steps = [b - a for a, b in zip(stamp.times, stamp.times[1:])]
    return {"overhead": timed.seconds, "step": [float("nan")] + steps}


def run(quick: bool = False) -> Section:
    sec = Section("growth")
    model, tokenizer = default_model()
    prompt = story_ids(tokenizer)
    points = (16, 64, 128) if quick else (16, 256, 1024)
    n = points[-1] + HALF
    engine = have_engine()
    log(f"growth: {'engine lockstep, scale ' + str(SCALE) + ' vs 1' if engine else 'plugin'}, {n} tokens")
    t0 = now()
    if engine:
        per = lockstep_engine(model, tokenizer, prompt, n)
        over = {t: 1e3 * (median(window(per["cfg"], t)) - median(window(per["plain"], t))) for t in points}
        plain_ms = {t: 1e3 * median(window(per["plain"], t)) for t in points}
        cfg_ms = {t: 1e3 * median(window(per["cfg"], t)) for t in points}
        path = "engine (batch-2 forward) minus engine at scale 1, stepped in lockstep"
    else:
        per = plugin_overhead(model, prompt, n)
        over = {t: 1e3 * median(window(per["overhead"], t)) for t in points}
        plain_ms = {t: 1e3 * (median(window(per["step"], t)) - over[t] / 1e3) for t in points}
        cfg_ms = {t: 1e3 * median(window(per["step"], t)) for t in points}
        path = "plugin: time inside CFGLogitsProcessor (second forward + combine)"
    sec.data.update(path=path, points=list(points), window=f"t-{HALF}..t+{HALF}", new_tokens=n,
                    prompt_tokens=len(prompt), overhead_ms=over, plain_step_ms=plain_ms, cfg_step_ms=cfg_ms,
                    seconds=now() - t0)
    for t in points:
        sec.row(f"CFG overhead at token {t}", over[t], "ms/token", fmt="{:.1f}",
                note=f"step {plain_ms[t]:.1f} ms plain, {cfg_ms[t]:.1f} ms CFG")
    growth = over[points[-1]] / over[points[0]] if over[points[0]] > 0 else float("inf")
    sec.data["overhead_last_over_first"] = growth
    # the plain step barely changes with length (its attention is a few % of it); if its window
    # medians differ by more than 1.5 x, a neighbour's burst hit a window and the ratio is not ours
    spread = max(plain_ms.values()) / min(plain_ms.values())
    sec.data["plain_step_spread"] = spread
    noisy = spread > 1.5
    sec.data["noisy"] = noisy
    sec.row(f"overhead at {points[-1]} / at {points[0]}", growth, "x", "<= 1.3",
            None if noisy else growth <= 1.3, fmt="{:.2f}",
            note=f"NOT VALID: plain steps vary {spread:.1f} x between windows (load burst); rerun"
            if noisy else "")
    step_growth = plain_ms[points[-1]] / plain_ms[points[0]]
    sec.data["plain_step_last_over_first"] = step_growth
    sec.row(f"plain step at {points[-1]} / at {points[0]}", step_growth, "x", fmt="{:.2f}")
    return sec


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    s = run(ap.parse_args().quick)
    print(table(s.rows))
    print(s.data)
