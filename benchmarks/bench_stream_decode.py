"""Streaming decode cost per generated token: tokens/decoders.DecodeStream (`StreamDecoder`, what
the transformers backend uses for a fast tokenizer) against the re-decoding `IncrementalDecoder`
(the fallback for slow tokenizers, and what every tokenizer used before), on the default model's
tokenizer (SmolLM2, byte-level BPE).

The "generated" tokens are a long story's own tokens (accents, emoji, dialogue, new lines) after
the 200-token benchmark story as the prompt, so no model runs: only the decoders are timed. Each
decoder's `add` is timed on its own, per token; the figure at token t is the median over tokens
t-w..t (w = 9 at t = 10, else 50) and over the repetitions, which alternate the two decoders
(interleaved: a load burst hits both). Before any figure is kept, both decoders' text must equal
`tokenizer.decode(all new ids)`.

Targets: DecodeStream flat (its cost at 4,000 tokens <= 1.5 x its cost at 10); the old decoder
grows with the text (reported, no target).

Run alone: python3 benchmarks/bench_stream_decode.py [--quick]   (prints the table, then the JSON)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CheckFailed, Section, default_model, log, median, story_ids, table  # noqa: E402

POINTS = (10, 100, 1000, 4000)
QUICK_POINTS = (10, 100, 1000)
FLAT = 1.5  # DecodeStream's cost at the last point / at 10 must stay under this

# A story with what streaming must get right: accents, emoji (split over byte-level tokens),
# CJK, dialogue, new lines and runs of spaces. Repeated with its chapter number to any length.
CHAPTER = (
    "Chapter {n}\n\nThe café on the quay was closed, but Zoë knocked anyway. \"Déjà vu,\" she said, "
    "and the old man behind the glass laughed — a dry, crackling sound. 🦊 The fox was back on the "
    "roof; 🐉 the dragon kite still hung in the window.  Two spaces, then a tab:\tthen 日本語 and "
    "naïve façades, Ørsted's ∮ notes, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 letters. He opened the door. ✨\n"
)


def new_ids(tokenizer, n: int) -> list[int]:
    text, k = "", 1
    ids: list[int] = []
    while len(ids) < n:
        text += CHAPTER.format(n=k)
        k += 1
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids[:n])


def _timed(decoder, ids) -> tuple[list[float], str]:
    times = []
    for t in ids:
        t0 = time.perf_counter()
        decoder.add(t)
        times.append(time.perf_counter() - t0)
    decoder.flush()
    return times, decoder.released


def _window(times: list[float], t: int) -> list[float]:
    w = 9 if t <= 10 else 50
    return times[max(0, t - 1 - w):t]


def run(quick: bool = False, reps: int | None = None) -> Section:
    from cfg_textgen.backends.transformers import IncrementalDecoder, StreamDecoder

    sec = Section("stream_decode")
    _, tok = default_model()
    points = QUICK_POINTS if quick else POINTS
    reps = reps or (2 if quick else 3)
    n = points[-1]
    prompt, ids = story_ids(tok), new_ids(tok, n)
    want = tok.decode(ids, skip_special_tokens=True)
    decoders = {"DecodeStream": StreamDecoder, "old decoder": IncrementalDecoder}
    per: dict[str, list[list[float]]] = {name: [] for name in decoders}
    t0 = time.perf_counter()
    for rep in range(reps):
        order = list(decoders) if rep % 2 == 0 else list(reversed(decoders))
        for name in order:
            times, text = _timed(decoders[name](tok, prompt), ids)
            if text != want:
                raise CheckFailed(f"{name}: streamed text differs from tokenizer.decode of the {n} ids")
            per[name].append(times)
        log(f"stream_decode: repetition {rep + 1}/{reps} done")
    sec.checks.append(f"stream_decode: DecodeStream and the old decoder both give tokenizer.decode(ids) "
                      f"for {n} tokens, every repetition")
    us = {name: {t: 1e6 * median([x for times in runs for x in _window(times, t)]) for t in points}
          for name, runs in per.items()}
    total = {name: median([sum(times) for times in runs]) for name, runs in per.items()}
    sec.data.update(tokenizer=type(tok).__name__, prompt_tokens=len(prompt), new_tokens=n, reps=reps,
                    points=list(points), per_token_us=us, total_seconds=total,
                    seconds=time.perf_counter() - t0)
    for t in points:
        sec.row(f"DecodeStream per token at {t}", us["DecodeStream"][t], "us", fmt="{:.1f}",
                note=f"old decoder {us['old decoder'][t]:.1f} us")
    flat = us["DecodeStream"][n] / us["DecodeStream"][points[0]]
    grows = us["old decoder"][n] / us["old decoder"][points[0]]
    sec.data.update(decodestream_last_over_first=flat, old_last_over_first=grows)
    sec.row(f"DecodeStream at {n} / at {points[0]}", flat, "x", f"<= {FLAT}", flat <= FLAT, fmt="{:.2f}")
    sec.row(f"old decoder at {n} / at {points[0]}", grows, "x", fmt="{:.1f}")
    sec.row(f"all {n} tokens: old / DecodeStream", total["old decoder"] / total["DecodeStream"], "x",
            fmt="{:.1f}", note=f"{total['DecodeStream'] * 1e3:.0f} ms vs {total['old decoder'] * 1e3:.0f} ms")
    return sec


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int)
    s = run(**vars(ap.parse_args()))
    print(table(s.rows) + "\n" + json.dumps({"rows": [r.to_dict() for r in s.rows], "checks": s.checks,
                                             "data": s.data}, indent=1, default=str))
