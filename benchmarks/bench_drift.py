"""How far the default (fast) llama.cpp mode drifts from the deterministic one: a correctness figure,
not a speed one (fine to run on a busy machine).

    python3 benchmarks/bench_drift.py [--threads N] [--tokens 200] [--model PATH.gguf]

The two modes differ in a decode of ONE token (a lone scale-1 stream): the default runs it on every
thread, where ggml's CPU flash attention splits the keys into one chunk per thread and merges the
partial sums; the deterministic mode runs it on one thread, the same sums as a step of several
sequences. And in reading a prompt: the deterministic mode reads it in micro-batches of 32 tokens,
the default in 512 (other matrix kernels). (A CFG pair steps two tokens, on `threads_batch` in both
modes.)

Measured on a ~400-token story (past the 256 cells where the split starts), scale 1:
- greedy agreement: each mode generates `--tokens` greedily on its own; the tokens equal before
  the first difference, and the share of equal positions;
- logits: both modes teacher-forced along the deterministic mode's tokens, the largest absolute
  difference of a logit over every step and the vocabulary (and of a log-probability), and what a
  sampler sees: the largest KL divergence of a step and the largest change of a token's probability.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import STORY, log  # noqa: E402


def backend(path, threads: int, deterministic: bool):
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend
    from cfg_textgen.runtime import RuntimeSettings

    return LlamaCppBackend(path, RuntimeSettings(threads=threads, deterministic=deterministic))


def greedy(b, story: list[int], n: int) -> list[int]:
    [pair] = b.prefill([(story, None)])
    out = []
    try:
        for _ in range(n):
            out.append(int(pair.logits[0].argmax()))
            b.step([(pair, out[-1])])
    finally:
        b.release(pair)
    return out


def forced_difference(a, b, story: list[int], tokens: list[int]) -> dict:
    """How far the two backends' distributions part along `tokens`: the largest |logit| and
    |log-probability| difference (anywhere in the vocabulary, so mostly in the tail no sampler keeps),
    and what sampling sees: the largest KL(deterministic || default) in nats and the largest
    difference of a token's probability, over every step (step 0 is the prompt's last logits)."""
    import torch

    [pa], [pb] = a.prefill([(story, None)]), b.prefill([(story, None)])
    r = {"max_logit_difference": 0.0, "max_logprob_difference": 0.0, "max_kl_nats": 0.0,
         "max_probability_difference": 0.0, "prompt_logit_difference": None}
    try:
        for token in tokens:
            la, lb = pa.logits[0].clone(), pb.logits[0]
            lpa, lpb = torch.log_softmax(la.double(), -1), torch.log_softmax(lb.double(), -1)
            if r["prompt_logit_difference"] is None:
                r["prompt_logit_difference"] = float((la - lb).abs().max())
            r["max_logit_difference"] = max(r["max_logit_difference"], float((la - lb).abs().max()))
            r["max_logprob_difference"] = max(r["max_logprob_difference"], float((lpa - lpb).abs().max()))
            r["max_kl_nats"] = max(r["max_kl_nats"], float((lpb.exp() * (lpb - lpa)).sum()))
            r["max_probability_difference"] = max(r["max_probability_difference"],
                                                  float((lpa.exp() - lpb.exp()).abs().max()))
            a.step([(pa, token)])
            b.step([(pb, token)])
    finally:
        a.release(pa)
        b.release(pb)
    return r


def run(threads: int, n: int, model: str | None = None) -> dict:
    from cfg_textgen.models import default_gguf_path
    from cfg_textgen.runtime import configure_process

    configure_process("llama.cpp")
    path = Path(model) if model else default_gguf_path()
    fast, exact = backend(path, threads, False), backend(path, threads, True)
    try:
        story = fast.tokenize(STORY + "\n\n" + STORY)[:400]
        log(f"drift: {path.name}, {len(story)}-token story, {n} greedy tokens, {threads} threads")
        a, b = greedy(fast, story, n), greedy(exact, story, n)
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), n)
        same = sum(x == y for x, y in zip(a, b))
        forced = forced_difference(fast, exact, story, b)
    finally:
        fast.close()
        exact.close()
    return {"model": path.name, "threads": threads, "story_tokens": len(story), "tokens": n,
            "greedy_equal_before_first_difference": first, "greedy_equal_positions": same, **forced}


if __name__ == "__main__":
    from cfg_textgen.backends.llama_cpp import physical_cores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="default: the physical cores (at least 2)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--model")
    a = ap.parse_args()
    r = run(a.threads or max(2, physical_cores()), a.tokens, a.model)
    print(f"default vs deterministic ({r['model']}, {r['threads']} threads, scale 1, {r['story_tokens']}-token "
          f"story): greedy equal for {r['greedy_equal_before_first_difference']} of {r['tokens']} tokens "
          f"({r['greedy_equal_positions']} positions equal); largest logit difference "
          f"{r['max_logit_difference']:.3g} (at the prompt {r['prompt_logit_difference']:.3g}), log-probability "
          f"{r['max_logprob_difference']:.3g}; largest KL {r['max_kl_nats']:.3g} nats, largest change of a "
          f"token's probability {r['max_probability_difference']:.3g}")
    print(json.dumps(r))
