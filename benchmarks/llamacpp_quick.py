"""Quick decode-rate check of the llama.cpp backend (the full table is bench_llamacpp.py).

Greedy, EOS banned, the default GGUF, a ~145-token story, N new tokens; interleaved repetitions
in ONE process so a neighbour's load hits every variant alike. Rates exclude the prefill:
(tokens - 1) / (time after the first token).

    bare plain    llama_decode of one sequence per step, argmax in numpy
    bare CFG      story + BOS-only opposing as two sequences of one llama_decode, combine in numpy
                  (the issue's "obvious way", the bar)
    ours 1        engine.Stream on LlamaCppBackend at scale 1 (story sequence only)
    ours 1.5      engine.Stream on LlamaCppBackend at scale 1.5

    python benchmarks/llamacpp_quick.py [--tokens 128] [--reps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from cfg_textgen.backends.llama_cpp import LlamaCppBackend  # noqa: E402
from cfg_textgen.engine import generate_stream  # noqa: E402
from cfg_textgen.models import default_gguf_path  # noqa: E402

STORY = ("The lighthouse keeper had not seen a ship in eleven years. Every night he climbed the "
         "stairs, lit the lamp, and watched the dark water for a sail that never came. ") * 4


def bare(backend: LlamaCppBackend, story: list[int], tokens: int, cfg: bool) -> float:
    """A bare llama.cpp loop on the backend's model and context, no torch, no engine."""
    L, ctx, mem = backend.lib, backend.ctx, backend.memory
    batch = L.llama_batch_init(len(story) + 1, 0, 1)
    eos = sorted(backend.eos_ids)
    try:
        def decode(entries):  # [(seq, ids, start)]
            n = 0
            for seq, ids, start in entries:
                for k, t in enumerate(ids):
                    batch.token[n], batch.pos[n], batch.n_seq_id[n] = t, start + k, 1
                    batch.seq_id[n][0], batch.logits[n] = seq, k == len(ids) - 1
                    n += 1
            batch.n_tokens = n
            assert L.llama_decode(ctx, batch) == 0
            # outputs in batch order (llama_get_logits_ith takes a batch position, not an output)
            return np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(entries), backend.n_vocab))

        def logsoftmax(x):
            x = x - x.max()
            return x - np.log(np.exp(x).sum())

        seqs = [(0, story, 0)] + ([(1, [backend.bos_id], 0)] if cfg else [])
        out = decode(seqs)
        pos = [len(story), 1]
        t0 = None
        for i in range(tokens):
            if cfg:
                c, u = logsoftmax(out[0]), logsoftmax(out[1])
                scores = u + 1.5 * (c - u)
            else:
                scores = out[0].copy()
            scores[eos] = -np.inf
            tok = int(np.argmax(scores))
            if i == 0:
                t0 = time.perf_counter()
            if i == tokens - 1:
                break
            out = decode([(s, [tok], pos[s]) for s, _, _ in seqs])
            pos = [p + 1 for p in pos]
        rate = (tokens - 1) / (time.perf_counter() - t0)
    finally:
        for s in (0, 1):
            L.llama_memory_seq_rm(mem, s, -1, -1)
        L.llama_batch_free(batch)
    return rate


def ours(backend, story: list[int], tokens: int, scale: float) -> float:
    s = generate_stream(backend, None, story, scale=scale, max_new_tokens=tokens, do_sample=False,
                        ban_eos=True)
    list(s)
    assert len(s.token_ids) == tokens
    return (tokens - 1) / (s.stats.seconds - s.stats.first_token_seconds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    backend = LlamaCppBackend(default_gguf_path(), n_threads=args.threads)
    story = backend.tokenize(STORY)
    runs = {"bare plain": [], "bare CFG": [], "ours 1": [], "ours 1.5": []}
    ours(backend, story, 8, 1.5)  # warm-up
    for _ in range(args.reps):
        runs["bare plain"].append(bare(backend, story, args.tokens, cfg=False))
        runs["bare CFG"].append(bare(backend, story, args.tokens, cfg=True))
        runs["ours 1"].append(ours(backend, story, args.tokens, 1.0))
        runs["ours 1.5"].append(ours(backend, story, args.tokens, 1.5))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"story {len(story)} tokens, {args.tokens} new, greedy, EOS banned, threads {backend.n_threads}, "
          f"{args.reps} interleaved reps (median tokens/s; all reps)")
    for k, v in runs.items():
        print(f"  {k:<11} {med[k]:7.1f}   {[round(x, 1) for x in v]}")
    print(f"  ours 1.5 / bare CFG   = {med['ours 1.5'] / med['bare CFG']:.2f}  (target >= 0.85)")
    print(f"  ours 1 / bare plain   = {med['ours 1'] / med['bare plain']:.2f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
