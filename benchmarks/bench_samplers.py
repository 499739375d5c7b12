"""What the sampler chain costs per token: a preset with every sampler switched on, at the default
model's vocabulary (49152), beside a decode step (one batch-1 forward, KV cache of ~330 tokens)
measured in the same run, interleaved.

The history is the 200-token story plus 128 tokens the model wrote after it (greedy), and each call
sees one token more (so mirostat updates its state and the penalties see a growing window). The
scores are the model's real logits for that context. Each sampler is timed inside the chain, so
the per-sampler figures add up to the chain and show which one dominates.

Per preset (each built-in preset and the community's Blook-Kayra.json <= 1 ms per token
on the default vocabulary): every preset's chain on the same real logits and growing history,
interleaved preset by preset and call by call, each through the chain object build_chain returns;
the pick is timed apart, both ways the engine draws (pick_token: torch.multinomial on the
transformers backend, as model.generate; inverse CDF on the llama.cpp backend). With
`--before REV` the same presets also run through the samplers of git revision REV, interleaved.

Run alone: python3 benchmarks/bench_samplers.py [--quick] [--before REV]
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
        {"sampler": "logit_bias", "bias": {"13": -2.0, "30": 1.5, "198": -1.0}, "ban": [0]},
        {"sampler": "repetition_penalty", "penalty": 1.1, "range": 512, "slope": 0.5,
         "presence": 0.05, "frequency": 0.02, "whitelist": [13, 30]},
        {"sampler": "no_repeat_ngram", "size": 6},
        {"sampler": "dry", "multiplier": 0.8, "base": 1.75, "allowed_length": 2, "range": 1024},
        {"sampler": "unified", "linear": 1.0, "quad": 0.02, "conf": 0.05},
        {"sampler": "dynamic_temperature", "low": 0.7, "high": 1.2, "exponent": 1.0},
        {"sampler": "quadratic", "factor": 0.3, "curve": 1.5},
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
        {"sampler": "adaptive_p", "target": 0.5, "decay": 0.9},
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


def run(quick: bool = False, before: str | None = None) -> Section:
    from cfg_textgen.backends.transformers import cache_keyword, returned_cache
    from cfg_textgen.guidance import cfg_combine
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
    presets_section(sec, model, tokenizer, hist, L0, calls, before)
    return sec


COMMUNITY_PRESET = "novelai/sillytavern-with-cfg/Blook-Kayra.json"


def _community_dir() -> Path | None:
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "community-presets").is_dir():
            return parent / "shared" / "community-presets"
    return None


def bench_presets():
    """name -> Preset: every built-in preset and the community's Blook-Kayra (when found)."""
    from cfg_textgen.importers import import_preset
    from cfg_textgen.presets import list_presets, load_preset, parse_preset

    out = {p.name: p for p in list_presets()}
    community = _community_dir()
    if community is not None and (community / COMMUNITY_PRESET).is_file():
        data, _ = import_preset(community / COMMUNITY_PRESET)
        out["Blook-Kayra (community)"] = parse_preset(data, COMMUNITY_PRESET)
    return out


def samplers_at(rev: str):
    """The SAMPLERS registry of cfg_textgen as it was at git revision `rev` (a module or a package
    there), loaded as a separate copy of the package (for a before/after comparison in one run)."""
    import importlib
    import io
    import re
    import subprocess
    import tarfile
    import tempfile

    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "cfg_textgen"], capture_output=True,
                             check=True).stdout
    dest = Path(tempfile.mkdtemp())
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(dest)
    name = "cfg_textgen_at_" + re.sub(r"\W", "_", rev)  # its modules import each other relatively
    (dest / "cfg_textgen").rename(dest / name)
    sys.path.insert(0, str(dest))
    return importlib.import_module(f"{name}.samplers").SAMPLERS


def presets_section(sec, model, tokenizer, hist, L0, calls, before: str | None = None) -> None:
    """Chain ms per token for each preset on the model's real logits, interleaved; target <= 1 ms.
    With `before` (a git revision), the same presets through that revision's samplers too."""
    from transformers import LogitsProcessorList

    from cfg_textgen.presets import build_chain
    from cfg_textgen.samplers import pick_token

    presets = bench_presets()
    with torch.no_grad():  # the real next-token logits after each history prefix
        rows = model(hist, logits_to_keep=calls).logits[0].float()  # (calls, vocab)

    variants = ["chain"] + ([f"at {before}"] if before else [])
    gens = {(n, v): torch.Generator().manual_seed(0) for n in presets for v in variants}
    chains = {(n, "chain"): build_chain(p, tokenizer, gens[(n, "chain")]) for n, p in presets.items()}
    if before:
        old = samplers_at(before)
        for n, p in presets.items():
            chains[(n, variants[1])] = LogitsProcessorList(
                old[s.name].from_params({k: list(v) if isinstance(v, tuple) else v for k, v in s.params.items()},
                                        tokenizer=tokenizer) for s in p.samplers)
            for proc in chains[(n, variants[1])]:
                if hasattr(proc, "generator"):
                    proc.generator = gens[(n, variants[1])]
    times = {key: [] for key in chains}
    pick = {n: [] for n in presets}
    pick_cdf = {n: [] for n in presets}
    cdf_gen = torch.Generator().manual_seed(0)
    log(f"samplers: {len(presets)} presets x {calls} calls ({', '.join(variants)})")
    for i in range(calls):
        history = hist[:, :L0 + i + 1]
        scores = rows[i:i + 1]
        for name, preset in presets.items():
            for variant in variants:
                t0 = now()
                out = chains[(name, variant)](history, scores)
                times[(name, variant)].append(now() - t0)
            t0 = now()
            pick_token(out, preset.do_sample, gens[(name, "chain")])
            pick[name].append(now() - t0)
            t0 = now()
            pick_token(out, preset.do_sample, cdf_gen, draw="inverse-cdf")
            pick_cdf[name].append(now() - t0)
    per = {}
    for name, preset in presets.items():
        ms = 1e3 * median(times[(name, "chain")])
        per[name] = {"samplers": [s.name for s in preset.samplers], "chain_ms": ms,
                     "pick_ms": 1e3 * median(pick[name]), "pick_inverse_cdf_ms": 1e3 * median(pick_cdf[name])}
        note = "+".join(s.name for s in preset.samplers) or "empty"
        if before:
            per[name][f"chain_ms_at_{before}"] = was = 1e3 * median(times[(name, variants[1])])
            note += f"; at {before}: {was:.2f} ms"
        sec.row(f"preset {name}: chain per token", ms, "ms", "<= 1 ms", ms <= 1.0, note=note, fmt="{:.2f}")
    worst = max(d["pick_ms"] for d in per.values()) if per else float("nan")
    sec.row("pick, as model.generate (softmax + multinomial over the vocabulary), per token", worst, "ms",
            note="the engine's part on the transformers backend, after the chain; worst preset", fmt="{:.2f}")
    worst = max(d["pick_inverse_cdf_ms"] for d in per.values()) if per else float("nan")
    sec.row("pick, as llama.cpp (one uniform along the candidates' cumulative sum), per token", worst, "ms",
            note="the engine's part on the llama.cpp backend; worst preset", fmt="{:.2f}")
    sec.data["per_preset"] = per
    sec.data["per_preset_before"] = before


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--before", metavar="REV", help="also time the presets with the samplers of this git revision")
    args = ap.parse_args()
    s = run(args.quick, args.before)
    print(table(s.rows))
    for k, v in s.data["per_sampler_us"].items():
        print(f"{k:22s} {v:8.0f} us")
    import json

    print(json.dumps(s.data.get("per_preset", {}), indent=1))
