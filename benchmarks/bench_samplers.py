"""What the sampler chain costs per token: a preset with every sampler switched on, at the default
model's vocabulary (49152), beside a decode step (one batch-1 forward, KV cache of ~330 tokens)
measured in the same run, interleaved.

The history is the 200-token story plus 128 tokens the model wrote after it (greedy), and each call
sees one token more (so mirostat updates its state and the penalties see a growing window). The
scores are the model's real logits for that context. Each sampler is timed inside the chain, so
the per-sampler figures add up to the chain and show which one dominates.

Run alone: python3 benchmarks/bench_samplers.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import Section, default_model, log, median, now, story_ids, table  # noqa: E402

# every sampler on, with the settings people use (NovelAI / text-generation-webui ranges)
FULL_PRESET = {
    "name": "bench-everything-on",
    "description": "Every sampler switched on, for the cost benchmark (not for writing).",
    "cfg": {"scale": 1.5},
    "samplers": [
        {"sampler": "repetition_penalty", "penalty": 1.1, "range": 512, "slope": 0.5,
         "presence": 0.05, "frequency": 0.02, "whitelist": [13, 30]},
        {"sampler": "no_repeat_ngram", "size": 6},
        {"sampler": "dry", "multiplier": 0.8, "base": 1.75, "allowed_length": 2, "range": 1024},
        {"sampler": "unified", "linear": 1.0, "quad": 0.02, "conf": 0.05},
        {"sampler": "dynamic_temperature", "low": 0.7, "high": 1.2, "exponent": 1.0},
        {"sampler": "temperature", "temperature": 0.9},
        {"sampler": "top_n_sigma", "n": 4.0},
        {"sampler": "top_k", "k": 400},
        {"sampler": "top_a", "a": 0.05},
        {"sampler": "epsilon", "epsilon": 0.0001},
        {"sampler": "eta", "eta": 0.0003},
        {"sampler": "tfs", "z": 0.99},
        {"sampler": "typical", "p": 0.98},
        {"sampler": "top_p", "p": 0.98},
        {"sampler": "min_p", "p": 0.01},
        {"sampler": "xtc", "threshold": 0.1, "probability": 0.5},
        {"sampler": "mirostat", "version": 2, "tau": 5.0, "eta": 0.1},
    ],
    "do_sample": True,
}


class Profiled:
    """The chain, with the seconds each sampler takes recorded per call."""

    def __init__(self, chain):
        self.chain = list(chain)
        self.names = [getattr(p, "name", type(p).__name__) for p in self.chain]
        self.seconds = {name: [] for name in self.names}

    def __call__(self, ids, scores):
        for name, proc in zip(self.names, self.chain):
            t0 = now()
            scores = proc(ids, scores)
            self.seconds[name].append(now() - t0)
        return scores


def run(quick: bool = False) -> Section:
    from cfg_textgen.guidance import cache_keyword, cfg_combine, returned_cache
    from cfg_textgen.presets import build_chain, parse_preset
    from cfg_textgen.samplers import SAMPLERS, pick_token

    sec = Section("samplers")
    model, tokenizer = default_model()
    prompt = story_ids(tokenizer)
    preset = parse_preset(FULL_PRESET, "<bench>")  # validated by the project's own preset parser
    missing = sorted(set(SAMPLERS) - {s.name for s in preset.samplers})
    if missing:
        raise RuntimeError(f"the full preset leaves samplers out: {missing}")
    calls = 32 if quick else 128

    # history: story + the model's own greedy continuation; logits for that context
    log(f"samplers: writing a {calls}-token history, then timing the chain")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        hist = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=calls,
                              min_new_tokens=calls, do_sample=False)
        out = model(hist, use_cache=True, logits_to_keep=1)
    cache, scores = returned_cache(out), out.logits[:, -1].float()
    opposing = scores.roll(1, dims=-1)  # any second row of logits, for timing the combine
    L0 = ids.shape[1]

    gen = torch.Generator().manual_seed(0)
    chain = Profiled(build_chain(preset, tokenizer, gen))
    step_ids = hist[:, -1:]
    step_mask = torch.ones((1, hist.shape[1] + 1), dtype=torch.long)
    chain_s, step_s, combine_s = [], [], []
    for i in range(calls):
        if i % 4 == 0:  # a decode step every 4 chain calls, interleaved
            t0 = now()
            with torch.no_grad():
                model(step_ids, attention_mask=step_mask, **{cache_keyword(model): cache}, use_cache=True,
                      logits_to_keep=1)
            step_s.append(now() - t0)
            cache.crop(-1)
        history = hist[:, :L0 + i + 1]
        t0 = now()
        guided = cfg_combine(scores, opposing, 1.5)
        t1 = now()
        pick_token(chain(history, guided), True, gen)
        chain_s.append(now() - t1)
        combine_s.append(t1 - t0)

    step_us = 1e6 * median(step_s)
    chain_us = 1e6 * median(chain_s)
    per = {name: 1e6 * median(s) for name, s in chain.seconds.items()}
    ranked = sorted(per.items(), key=lambda kv: -kv[1])
    sec.data.update(vocab=int(scores.shape[-1]), history_tokens=[L0 + 1, L0 + calls], calls=calls,
                    preset=FULL_PRESET, chain_us=chain_us, decode_step_us=step_us,
                    chain_fraction_of_step=chain_us / step_us, cfg_combine_us=1e6 * median(combine_s),
                    per_sampler_us=dict(ranked))
    frac = chain_us / step_us
    sec.row(f"full chain ({len(preset.samplers)} samplers) + pick, per token", chain_us, "us", fmt="{:.0f}")
    sec.row("full chain as a share of a decode step", 100 * frac, "%", "<= 5 %", frac <= 0.05,
            note=f"decode step {step_us / 1e3:.1f} ms", fmt="{:.1f}")
    sec.row("cfg_combine, per token", 1e6 * median(combine_s), "us", fmt="{:.0f}")
    for name, us in ranked[:3]:
        sec.row(f"  {name}", us, "us", note=f"{100 * us / chain_us:.0f}% of the chain", fmt="{:.0f}")
    return sec


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    s = run(ap.parse_args().quick)
    print(table(s.rows))
    for k, v in s.data["per_sampler_us"].items():
        print(f"{k:22s} {v:8.0f} us")
