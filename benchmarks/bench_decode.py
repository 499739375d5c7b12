"""Decode throughput of the CFG paths, side by side, and the batch-2 forward pass they are bound by.

Five greedy variants continue the same ~200-token story by N tokens (EOS masked, so every run is
N tokens long), interleaved repetition by repetition (the order rotates), medians reported:

    plain      model.generate
    hf_cfg     model.generate(guidance_scale=1.5, negative_prompt_ids=[[bos]])  (transformers' CFG)
    ours_proc  model.generate(logits_processor=[CFGLogitsProcessor(scale=1.5)])
    engine     engine.Stream(scale=1.5): both branches in one batch-2 forward
    engine_1   engine.Stream(scale=1): no opposing branch

transformers' processor defaults to the last prompt token as the unconditional input; it is given
[[bos]] here because ours defaults to a blank story (BOS), so both do the same work and must give
the same tokens. Tokens/s is the decode rate: 1 / the median of the N - 1 step times between the
time-stamps the `Stamp` processor takes (the prompt's prefill is not in it); mean-step and
end-to-end rates are in the JSON as well. Before any figure is kept, the paths that must agree are compared token by
token, on every repetition: plain = engine_1, ours_proc = hf_cfg, engine = ours_proc.

Run alone: python3 benchmarks/bench_decode.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from _common import (CheckFailed, Section, default_model, have_engine, log, machine, median,  # noqa: E402
                     now, story_ids)

SCALE = 1.5
TIE = 2e-3  # a first difference where the reference's top-2 scores are this close is a float tie


class Stamp(LogitsProcessor):
    """Last in every chain: masks EOS (so every run has the same length, as `min_new_tokens` does)
    and records when each step's scores were ready, and the gap between the two best scores."""

    def __init__(self, eos_ids):
        self.eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
        self.times: list[float] = []
        self.gaps: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(now())
        out = scores.index_fill(-1, self.eos, float("-inf"))
        top = torch.topk(out[0].float(), 2).values
        self.gaps.append(float(top[0] - top[1]))
        return out


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos)


class Variants:
    """The paths being compared; each call returns (new token ids, Stamp, wall seconds)."""

    def __init__(self, model, tokenizer, prompt: list[int]):
        self.model, self.tokenizer, self.prompt = model, tokenizer, prompt
        self.ids = torch.tensor([prompt], dtype=torch.long)
        self.eos = eos_ids(model)
        self.bos = model.config.bos_token_id

    def _generate(self, n, extra=(), **kwargs):
        stamp = Stamp(self.eos)
        t0 = now()
        with torch.no_grad():
            out = self.model.generate(
                self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=n,
                do_sample=False, num_beams=1,  # greedy: transformers adds no warper
                logits_processor=LogitsProcessorList([*extra, stamp]), **kwargs)
        wall = now() - t0
        return out[0, self.ids.shape[1]:].tolist(), stamp, wall

    def plain(self, n):
        return self._generate(n)

    def hf_cfg(self, n):
        return self._generate(n, guidance_scale=SCALE,
                              negative_prompt_ids=torch.tensor([[self.bos]], dtype=torch.long))

    def ours_proc(self, n):
        from cfg_textgen.guidance import CFGLogitsProcessor

        return self._generate(n, extra=[CFGLogitsProcessor(self.model, scale=SCALE)])

    def _engine(self, n, scale):
        from cfg_textgen.engine import Stream

        stamp = Stamp(self.eos)
        t0 = now()
        stream = Stream(self.model, self.tokenizer, self.prompt, scale=scale, chain=[stamp],
                        max_new_tokens=n, do_sample=False)
        for _ in stream:
            pass
        wall = now() - t0
        return list(stream.token_ids), stamp, wall

    def engine(self, n):
        return self._engine(n, SCALE)

    def engine_1(self, n):
        return self._engine(n, 1.0)


# (variant, reference it must equal)
CHECKS = [("engine_1", "plain"), ("ours_proc", "hf_cfg"), ("engine", "ours_proc")]


def compare(name, ref_name, got, ref, ref_stamp, tokenizer) -> str:
    """'identical' or 'identical for k tokens, then a float tie'; raises CheckFailed otherwise."""
    if got == ref:
        return "identical"
    k = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    gap = ref_stamp.gaps[k] if k < len(ref_stamp.gaps) else float("inf")
    if len(got) == len(ref) and gap < TIE:
        return f"identical for {k} tokens, then a float tie (top-2 gap {gap:.1e} < {TIE:g})"
    raise CheckFailed(
        f"{name} and {ref_name} give different tokens from token {k} on (top-2 gap there {gap:.3g}):\n"
        f"  {ref_name}: {tokenizer.decode(ref[max(0, k - 5):k + 5])!r}\n"
        f"  {name}: {tokenizer.decode(got[max(0, k - 5):k + 5])!r}")


def decode_rate(stamp) -> float:
    """Tokens/s from the median step: every step does the same work, and the median ignores the
    seconds a neighbour's burst takes from a few of them (the mean rate is in the JSON too)."""
    t = stamp.times
    return 1.0 / median([b - a for a, b in zip(t, t[1:])])


def mean_rate(stamp) -> float:
    t = stamp.times
    return (len(t) - 1) / (t[-1] - t[0])


def forward_ratio(model, prompt: list[int], iters: int) -> dict:
    """One decode step (1 new token, KV cache of len(prompt)) at batch 2 vs batch 1, interleaved.

    Shaped like the engine's step: attention mask, position ids, logits of the last token only;
    the batch-2 cache holds the story and a left-padded BOS row, as with CFG."""
    from cfg_textgen.backends.transformers import cache_keyword, left_pad, positions_from_mask, returned_cache

    bos = model.config.bos_token_id
    setups = {}
    for batch, rows in ((1, [prompt]), (2, [prompt, [bos]])):
        ids, mask = left_pad(rows, 0)
        with torch.no_grad():
            cache = returned_cache(model(ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                                         use_cache=True, logits_to_keep=1))
        step_ids = torch.full((batch, 1), int(prompt[-1]), dtype=torch.long)
        step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        step_pos = mask.sum(-1, keepdim=True)
        setups[batch] = (cache, step_ids, step_mask, step_pos)
    times = {1: [], 2: []}
    for i in range(iters + 2):
        for batch in ((1, 2) if i % 2 else (2, 1)):
            cache, step_ids, step_mask, step_pos = setups[batch]
            t0 = now()
            with torch.no_grad():
                model(step_ids, attention_mask=step_mask, position_ids=step_pos,
                      **{cache_keyword(model): cache}, use_cache=True, logits_to_keep=1)
            dt = now() - t0
            cache.crop(-1)  # back to the prompt: every step sees the same cache length
            if i >= 2:  # two warm-up rounds
                times[batch].append(dt)
    ratios = [b / a for a, b in zip(times[1], times[2])]
    return {"cache_tokens": len(prompt), "iters": iters,
            "batch1_ms": 1e3 * median(times[1]), "batch2_ms": 1e3 * median(times[2]),
            "ratio": median(ratios), "ratio_of_medians": median(times[2]) / median(times[1])}


def run(quick: bool = False, reps: int | None = None) -> Section:
    sec = Section("decode")
    model, tokenizer = default_model()
    prompt = story_ids(tokenizer)
    n = 32 if quick else 128
    reps = reps or (2 if quick else 4)
    v = Variants(model, tokenizer, prompt)
    names = ["plain", "hf_cfg", "ours_proc"] + (["engine", "engine_1"] if have_engine() else [])
    checks = [c for c in CHECKS if c[0] in names and c[1] in names]
    sec.data.update(new_tokens=n, prompt_tokens=len(prompt), reps=reps, scale=SCALE,
                    hf_unconditional="negative_prompt_ids=[[bos]] (a blank story, as ours)",
                    generation_config=model.generation_config.to_diff_dict(),
                    variants=names, engine_available=have_engine())

    # warm-up round: short, every path checked before anything is timed
    log(f"decode: warm-up and correctness round ({', '.join(names)})")
    outs = {name: getattr(v, name)(16) for name in names}
    for name, ref in checks:
        compare(name, ref, outs[name][0], outs[ref][0], outs[ref][1], tokenizer)

    rates = {name: [] for name in names}
    means = {name: [] for name in names}
    e2e = {name: [] for name in names}
    verdicts = {f"{a} = {b}": [] for a, b in checks}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        outs = {}
        for name in order:
            tokens, stamp, wall = getattr(v, name)(n)
            if len(tokens) != n:
                raise CheckFailed(f"{name} generated {len(tokens)} tokens, not {n}")
            outs[name] = (tokens, stamp)
            rates[name].append(decode_rate(stamp))
            means[name].append(mean_rate(stamp))
            e2e[name].append(n / wall)
        for name, ref in checks:
            verdicts[f"{name} = {ref}"].append(
                compare(name, ref, outs[name][0], outs[ref][0], outs[ref][1], tokenizer))
        log(f"decode: rep {r + 1}/{reps}: " + ", ".join(f"{k} {rates[k][-1]:.1f}" for k in names) + " tok/s")
    sec.checks = [f"{k}: " + "; ".join(sorted(set(vs))) + f" ({len(vs)} runs of {n} tokens + warm-up)"
                  for k, vs in verdicts.items()]
    sec.data["sample_text"] = tokenizer.decode(outs["plain"][0][:40])

    med = {k: median(x) for k, x in rates.items()}
    # a ratio per repetition (same minute of machine load), then the median of those
    rel = {k: median([a / b for a, b in zip(rates[k], rates["plain"])]) for k in names}
    sec.data.update(tokens_per_s=med, tokens_per_s_all=rates,
                    mean_step_tokens_per_s={k: median(x) for k, x in means.items()},
                    end_to_end_tokens_per_s={k: median(x) for k, x in e2e.items()},
                    ratio_to_plain=rel)
    for k in names:
        sec.row(f"{k}: decode tokens/s", med[k], "tok/s", fmt="{:.2f}")
    proc_vs_hf = median([a / b for a, b in zip(rates["ours_proc"], rates["hf_cfg"])])
    sec.data["ours_proc_over_hf_cfg"] = proc_vs_hf
    if "engine" in names:
        sec.row("engine CFG 1.5 / plain", rel["engine"], "x", ">= 0.80", rel["engine"] >= 0.80, fmt="{:.3f}")
    else:
        sec.row("engine CFG 1.5 / plain", None, target=">= 0.80", note="engine.py not there yet")
    sec.row("our processor / transformers' CFG", proc_vs_hf, "x", ">= 1.00", proc_vs_hf >= 1.0, fmt="{:.3f}")
    sec.row("our processor CFG 1.5 / plain", rel["ours_proc"], "x", fmt="{:.3f}")
    sec.row("transformers' CFG 1.5 / plain", rel["hf_cfg"], "x", fmt="{:.3f}")
    if "engine_1" in names:
        sec.row("engine scale 1 / plain", rel["engine_1"], "x", ">= 0.97", rel["engine_1"] >= 0.97, fmt="{:.3f}")
    else:
        sec.row("engine scale 1 / plain", None, target=">= 0.97", note="engine.py not there yet")

    log("decode: batch-2 vs batch-1 forward step")
    fr = forward_ratio(model, prompt, 10 if quick else 40)
    sec.data["forward_step"] = fr
    sec.row(f"forward step, batch 2 / batch 1 (KV cache {fr['cache_tokens']})", fr["ratio"], "x",
            "measured (~1.15-1.3)", fmt="{:.3f}")
    sec.row("forward step, batch 1", fr["batch1_ms"], "ms", fmt="{:.1f}")
    if "engine" in names:
        # the best a batched engine can do: plain speed / (batch-2 step / batch-1 step)
        sec.data["engine_over_limit"] = rel["engine"] * fr["ratio"]
        sec.row("engine CFG / physical limit (1 / batch ratio)", rel["engine"] * fr["ratio"], "x", fmt="{:.3f}")
    return sec


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int)
    args = ap.parse_args()
    from _common import table

    s = run(args.quick, args.reps)
    print(table(s.rows))
    print("\n".join(s.checks))
    print(json.dumps({"machine": machine(), **s.data}, indent=1, default=str)[:3000])
