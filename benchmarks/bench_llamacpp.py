"""llama.cpp: our backend against bare llama.cpp loops, side by side, in one run.

decode   a ~145-token story, greedy, EOS banned, N = 128 new tokens, llama.cpp on --llama-threads
         (default 2) threads; five variants interleaved repetition by repetition (the order
         rotates), tokens/s = 1 / the median step time (prefill excluded):
             bare_plain  the bare llama-cpp-python loop: one llama_decode per token, argmax in numpy
             bare_cfg    story + a BOS-only opposing sequence in ONE llama_decode per step, the
                         combine u + 1.5 (c - u) in numpy (the issue's 73 tok/s bar)
             ours_1      our engine (engine.Stream) on our llama.cpp backend at scale 1
             ours_cfg    the same at scale 1.5
             sampled_multinomial, sampled_cdf
                         ours_cfg with a writer's sampled preset (balanced-story), the token drawn
                         as model.generate draws it (torch.multinomial) / as llama.cpp does (one
                         uniform along the candidates' cumulative sum: the llama.cpp backend's way)
             hf_cfg      our engine on the transformers backend at scale 1.5 (float32 weights)
         The bare loops are tests/llamacpp_reference.py (low-level API only, none of our code).
         Checked token for token before any figure: ours_1 = bare_plain, ours_cfg = bare_cfg
         (a float tie, top-2 gap < 2e-3, is reported, anything else aborts the run); hf_cfg is
         another rounding of the model (4-bit weights and 8-bit activations vs float32), so only
         where it parts from ours_cfg is reported.
samplers every built-in preset's chain (and the community's Blook-Kayra.json when found), per
         token, on real llama.cpp logits (story + a greedy history growing by one per call).
ttft     time to the first token for a 2,000-token story, CFG 1.5 / scale 1, interleaved.
memory   peak RSS (VmHWM) of a child process that loads the backend and writes 128 tokens, CFG 1.5 /
         scale 1 (llama.cpp allocates its KV cache when the context is made, so the whole
         process's peak is the figure).
startup  `python -m cfg_textgen.cli generate PROMPT --tokens 4 --backend llama.cpp`, spawn to the
         first byte on stdout, warm (torch import included).

Run alone: python3 benchmarks/bench_llamacpp.py [--quick] [--llama-threads N]
           (or: python3 benchmarks/run_all.py --only llamacpp)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the independent reference lives with the tests

from _common import (ROOT, STORY, CheckFailed, Section, default_model, load_average, log,  # noqa: E402
                     median, now, table)

SCALE = 1.5
STORY_TOKENS = 145
TTFT_TOKENS = 2000
TIE = 2e-3
COMMUNITY = [ROOT / "presets" / "community" / "Blook-Kayra.json",
             Path("/work/shared/community-presets/novelai/sillytavern-with-cfg/Blook-Kayra.json")]


def available() -> bool:
    import importlib.util

    return (importlib.util.find_spec("llama_cpp") is not None
            and importlib.util.find_spec("cfg_textgen.backends.llama_cpp") is not None)


class Stamp:
    """Last in our chain: records when each step's scores were ready and the top-2 gap."""

    def __init__(self):
        self.times: list[float] = []
        self.gaps: list[float] = []

    def __call__(self, ids, scores):
        import numpy as np

        self.times.append(now())
        # the very bookkeeping the bare loops' on_step does (np.partition), so both sides pay the same
        top = np.partition(scores[0].numpy(), -2)[-2:]
        self.gaps.append(float(top[1] - top[0]))
        return scores


def rate(times) -> float:
    return 1.0 / median([b - a for a, b in zip(times, times[1:])])


class Variants:
    """The bare loops and our engine on one GGUF (default: the default model), `threads` each."""

    def __init__(self, threads: int, gguf: Path | None = None):
        from cfg_textgen.backends.llama_cpp import LlamaCppBackend
        from cfg_textgen.runtime import RuntimeSettings, configure_process
        from llamacpp_reference import LlamaRef, default_gguf

        configure_process("llama.cpp")  # torch's threads, as the CLI and the server decide them
        self.threads = threads
        # every run reads the whole story, as the bare loops do: with the prompt cache a later run
        # would read only its last token, which plain attention rounds differently from a read of
        # the whole prompt (README, "Runtime settings"), and the token-for-token checks would part
        self.ours = LlamaCppBackend(gguf or default_gguf(), RuntimeSettings(cache_prompt=False), n_threads=threads)
        # the bare loops attend as ours does by default (flash attention off on a CPU, runtime.py:
        # llama.cpp's own default would turn it on), so both run the same kernels: the same
        # tokens, and the speed of the same computation
        self.ref = LlamaRef(gguf, n_threads=threads, flash_attn_type=self.ours.runtime.flash_attn_type)
        self.story = self.ref.tokenize(STORY)[:STORY_TOKENS]
        if self.ours.tokenize(STORY)[:STORY_TOKENS] != self.story:
            raise CheckFailed("our backend tokenizes the story differently from llama.cpp")
        self.ban = self.ref.eog_ids
        self._hf = None

    def close(self) -> None:
        self.ours.close()
        self.ref.close()

    def _bare(self, fn, *args):
        import numpy as np

        times, gaps = [], []

        def on_step(scores):
            times.append(now())
            top = np.partition(scores, -2)[-2:]
            gaps.append(float(top[1] - top[0]))

        tokens = fn(*args, ban=self.ban, on_step=on_step)
        return tokens, times, gaps

    def bare_plain(self, n):
        return self._bare(self.ref.greedy, self.story, n)

    def bare_cfg(self, n):
        return self._bare(self.ref.greedy_cfg_batched, self.story, [self.ref.bos_id], SCALE, n)

    def _engine(self, backend, scale, n):
        from cfg_textgen.engine import Stream

        stamp = Stamp()
        stream = Stream(backend, None, self.story, scale=scale, chain=[stamp], max_new_tokens=n,
                        do_sample=False, ban_eos=True)
        for _ in stream:
            pass
        return list(stream.token_ids), stamp.times, stamp.gaps

    def _sampled(self, n, draw):
        """Our engine at 1.5 with a writer's sampled preset (balanced-story: repetition penalty,
        temperature, top-p), the token drawn `draw` (samplers.base.pick_token); nothing to check
        token for token, so a figure only."""
        import torch

        from cfg_textgen.engine import Stream
        from cfg_textgen.presets import build_chain, load_preset

        preset = load_preset("balanced-story")
        gen = torch.Generator().manual_seed(1)
        stamp = Stamp()
        before, self.ours.token_draw = self.ours.token_draw, draw
        try:
            stream = Stream(self.ours, None, self.story, scale=SCALE,
                            chain=[*build_chain(preset, self.ours.tokenizer, gen), stamp],
                            max_new_tokens=n, do_sample=True, generator=gen, ban_eos=True)
            for _ in stream:
                pass
        finally:
            self.ours.token_draw = before
        return list(stream.token_ids), stamp.times, stamp.gaps

    def sampled_multinomial(self, n):
        return self._sampled(n, "multinomial")

    def sampled_cdf(self, n):
        return self._sampled(n, "inverse-cdf")

    def ours_1(self, n):
        return self._engine(self.ours, 1.0, n)

    def ours_cfg(self, n):
        return self._engine(self.ours, SCALE, n)

    def hf_cfg(self, n):
        import torch

        if self._hf is None:
            from cfg_textgen.backends.transformers import TransformersBackend

            self._hf = TransformersBackend(*default_model())
        # our llama.cpp backend sets torch to 1 thread (torch only combines and samples beside it);
        # the transformers engine does its matmuls in torch: give it the same threads as llama.cpp
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._engine(self._hf, SCALE, n)
        finally:
            torch.set_num_threads(before)


CHECKS = [("ours_1", "bare_plain"), ("ours_cfg", "bare_cfg")]


def compare(name, ref_name, got, ref, ref_gaps, strict=True) -> str:
    if got == ref:
        return "identical"
    k = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    gap = ref_gaps[k] if k < len(ref_gaps) else float("inf")
    if not strict:
        return f"part at token {k} ({ref_name} top-2 gap there {gap:.3g})"
    if len(got) == len(ref) and gap < TIE:
        return f"identical for {k} tokens, then a float tie (top-2 gap {gap:.1e} < {TIE:g})"
    raise CheckFailed(f"{name} and {ref_name} give different tokens from token {k} on (top-2 gap {gap:.3g})")


DECODE_TARGETS = {"cfg": 0.85, "scale_1": 0.90}


def decode_section(sec: Section, v: Variants, quick: bool, reps: int | None,
                   names=("bare_plain", "bare_cfg", "ours_1", "ours_cfg", "sampled_multinomial", "sampled_cdf",
                          "hf_cfg"), strict: bool = True,
                   targets=DECODE_TARGETS) -> None:
    """Tokens/s of `names`, interleaved. `strict`: ours must give the bare loops' tokens (a
    difference aborts the run); otherwise where they part is reported (random-weight models)."""
    n = 32 if quick else 128
    reps = reps or (2 if quick else 4)
    names = list(names)
    log(f"llamacpp: decode warm-up and checks ({', '.join(names)})")
    outs = {name: getattr(v, name)(16) for name in names}
    for name, ref in CHECKS:
        compare(name, ref, outs[name][0], outs[ref][0], outs[ref][2], strict)
    rates = {name: [] for name in names}
    verdicts = {f"{a} = {b}": [] for a, b in CHECKS}
    hf_vs_ours = []
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        outs = {}
        for name in order:
            tokens, times, gaps = getattr(v, name)(n)
            if len(tokens) != n:
                raise CheckFailed(f"{name} generated {len(tokens)} tokens, not {n}")
            outs[name] = (tokens, times, gaps)
            rates[name].append(rate(times))
        for name, ref in CHECKS:
            verdicts[f"{name} = {ref}"].append(compare(name, ref, outs[name][0], outs[ref][0], outs[ref][2],
                                                       strict))
        if "hf_cfg" in names:
            hf_vs_ours.append(compare("hf_cfg", "ours_cfg", outs["hf_cfg"][0], outs["ours_cfg"][0],
                                      outs["ours_cfg"][2], strict=False))
        log(f"llamacpp: rep {r + 1}/{reps}: " + ", ".join(f"{k} {rates[k][-1]:.1f}" for k in names) + " tok/s")
    sec.checks += [f"llama.cpp {k}: " + "; ".join(sorted(set(vs))) + f" ({len(vs)} runs of {n} tokens + warm-up)"
                   for k, vs in verdicts.items()]
    if hf_vs_ours:
        sec.checks.append("llama.cpp hf_cfg vs ours_cfg (not required to agree: float32 vs 4-bit): "
                          + "; ".join(sorted(set(hf_vs_ours))))
    med = {k: median(x) for k, x in rates.items()}

    def rel(a, b):  # per repetition (same minute of load), then the median
        return median([x / y for x, y in zip(rates[a], rates[b])])

    sec.data.update(new_tokens=n, story_tokens=len(v.story), reps=reps, scale=SCALE,
                    tokens_per_s=med, tokens_per_s_all=rates, sample_text=v.ref.detokenize(outs["bare_plain"][0][:40]))
    for k in names:
        sec.row(f"{k}: decode tokens/s", med[k], "tok/s", fmt="{:.1f}")
    r_cfg, r_1 = rel("ours_cfg", "bare_cfg"), rel("ours_1", "bare_plain")
    load = f"load average {load_average()[0]} on {os.cpu_count()} cores, {v.threads} llama.cpp threads"
    t_cfg, t_1 = targets["cfg"], targets["scale_1"]
    sec.row("ours CFG 1.5 / bare two-sequence loop", r_cfg, "x", f">= {t_cfg:g}", r_cfg >= t_cfg, fmt="{:.3f}",
            note=load)
    sec.row("ours scale 1 / bare plain loop", r_1, "x", f">= {t_1:g}", r_1 >= t_1, fmt="{:.3f}", note=load)
    sec.row("bare two-sequence CFG / bare plain", rel("bare_cfg", "bare_plain"), "x", fmt="{:.3f}")
    sec.row("ours CFG 1.5 / ours scale 1", rel("ours_cfg", "ours_1"), "x", fmt="{:.3f}")
    if "sampled_cdf" in names:
        sec.row("ours CFG 1.5 sampled (balanced-story), drawn as llama.cpp / as model.generate",
                rel("sampled_cdf", "sampled_multinomial"), "x", fmt="{:.3f}",
                note="inverse CDF over the candidates / torch.multinomial over the vocabulary")
        sec.row("ours CFG 1.5 sampled (balanced-story) / ours CFG 1.5 greedy", rel("sampled_cdf", "ours_cfg"), "x",
                fmt="{:.3f}", note="what a writer's samplers and draw cost beside the greedy pick")
    if "hf_cfg" in names:
        sec.row("ours CFG 1.5 (llama.cpp) / transformers engine CFG 1.5", rel("ours_cfg", "hf_cfg"), "x",
                fmt="{:.2f}")


def preset_files():
    from cfg_textgen.presets import builtin_names, load_preset

    out = [(name, load_preset(name)) for name in builtin_names()]
    for path in COMMUNITY:
        if path.is_file():
            from cfg_textgen.importers import import_preset
            from cfg_textgen.presets import parse_preset

            data, _ = import_preset(str(path))
            out.append((path.stem + " (community)", parse_preset(data, str(path))))
            break
    return out


def samplers_section(sec: Section, v: Variants, quick: bool) -> None:
    import torch
    import torch.nn.functional as F

    from cfg_textgen.presets import build_chain
    from cfg_textgen.samplers import pick_token

    calls = 24 if quick else 96
    history = v.story + v.ref.greedy(v.story, calls, ban=v.ban)
    # real llama.cpp logits for every step of that history (the reference, teacher-forced)
    logits = torch.from_numpy(v.ref.logits(history)[len(v.story) - 1:-1])
    per = {}
    for name, preset in preset_files():
        gen = torch.Generator().manual_seed(0)
        chain = build_chain(preset, v.ours.tokenizer, gen)
        times = []
        for i in range(calls):
            ids = torch.tensor([history[:len(v.story) + i]])
            scores = F.log_softmax(logits[i:i + 1], dim=-1)
            t0 = now()
            for proc in chain:
                scores = proc(ids, scores)
            pick_token(scores, preset.do_sample, gen)
            times.append(now() - t0)
        per[name] = 1e3 * median(times[2:])
        sec.row(f"sampler chain + pick per token: {name}", per[name], "ms", "<= 1 ms", per[name] <= 1.0,
                note=f"{len(preset.samplers)} samplers", fmt="{:.2f}")
    sec.data["sampler_chain_ms"] = per


def ttft_section(sec: Section, v: Variants, quick: bool) -> None:
    from cfg_textgen.engine import Stream

    long = (v.ref.tokenize((STORY + "\n\n") * 12))[:TTFT_TOKENS]
    reps = 2 if quick else 3
    got = {"cfg": [], "plain": []}
    for r in range(reps):
        for name in (("cfg", "plain") if r % 2 == 0 else ("plain", "cfg")):
            stream = Stream(v.ours, None, long, scale=SCALE if name == "cfg" else 1.0,
                            max_new_tokens=1, do_sample=False, ban_eos=True)
            t0 = now()
            next(iter(stream), None)
            got[name].append(now() - t0)
            for _ in stream:
                pass
    ratio = median([a / b for a, b in zip(got["cfg"], got["plain"])])
    sec.data["ttft_s"] = got
    sec.row(f"time to first token, {len(long)}-token story, scale 1", median(got["plain"]), "s", fmt="{:.2f}")
    sec.row("time to first token, CFG 1.5 / scale 1", ratio, "x", "<= 1.2", ratio <= 1.2, fmt="{:.3f}")


def vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(name: str, n: int, threads: int) -> dict:
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend
    from cfg_textgen.engine import Stream
    from llamacpp_reference import default_gguf

    backend = LlamaCppBackend(default_gguf(), n_threads=threads)
    loaded = vm("VmRSS")
    story = backend.tokenize(STORY)[:STORY_TOKENS]
    stream = Stream(backend, None, story, scale=SCALE if name == "cfg" else 1.0, max_new_tokens=n,
                    do_sample=False, ban_eos=True)
    for _ in stream:
        pass
    return {"variant": name, "tokens": len(stream.token_ids), "rss_after_load": loaded, "peak": vm("VmHWM")}


def memory_section(sec: Section, quick: bool, threads: int) -> None:
    n = 32 if quick else 128
    res = {}
    for name in ("plain", "cfg"):
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-child", name,
                              "--tokens", str(n), "--llama-threads", str(threads)],
                             capture_output=True, text=True, cwd=ROOT, timeout=900,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode != 0:
            raise RuntimeError(f"memory child {name} failed:\n{out.stderr[-2000:]}")
        res[name] = json.loads(out.stdout.strip().splitlines()[-1])
    sec.data["memory"] = res
    ratio = res["cfg"]["peak"] / res["plain"]["peak"]
    sec.row("peak RSS, llama.cpp scale 1", res["plain"]["peak"] / 2**20, "MB", fmt="{:.0f}",
            note=f"{res['plain']['rss_after_load'] / 2**20:.0f} MB after loading")
    sec.row("peak RSS, llama.cpp CFG 1.5 / scale 1", ratio, "x", "<= 1.1", ratio <= 1.1, fmt="{:.3f}",
            note=f"{res['cfg']['peak'] / 2**20:.0f} MB")


def startup_section(sec: Section, quick: bool, threads: int) -> None:
    from bench_startup import first_byte

    cmd = [sys.executable, "-m", "cfg_textgen.cli", "generate", "Once upon a time", "--tokens", "4",
           "--backend", "llama.cpp", "--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    help_text = subprocess.run([*cmd[:4], "--help"], capture_output=True, text=True, cwd=ROOT, env=env).stdout
    if "--backend" not in help_text:
        sec.row("cli generate --backend llama.cpp, warm, first token", None, target="<= 2.5 s",
                note="`generate --backend` not in cli.py yet")
        return
    first_byte(cmd, env)  # warm-up: page cache, any first-run cache
    runs = [first_byte(cmd, env)["first"] for _ in range(1 if quick else 3)]
    sec.data["startup_s"] = runs
    sec.data["startup_command"] = " ".join(cmd[2:])
    sec.row("cli generate --backend llama.cpp, warm, first token", median(runs), "s", "<= 2.5 s",
            median(runs) <= 2.5, fmt="{:.2f}", note="torch import included")


def run(quick: bool = False, reps: int | None = None, threads: int = 2) -> Section:
    sec = Section("llamacpp")
    if not available():
        sec.row("llama.cpp benchmarks", None, note="not run: llama-cpp-python or the backend is not installed")
        return sec
    import torch

    sec.data["llama_threads"] = threads
    sec.data["torch_threads"] = torch.get_num_threads()
    v = Variants(threads)
    try:
        decode_section(sec, v, quick, reps)
        log("llamacpp: sampler chains per preset")
        samplers_section(sec, v, quick)
        log("llamacpp: time to first token, 2,000-token story")
        ttft_section(sec, v, quick)
    finally:
        v.close()
    log("llamacpp: peak memory (child processes)")
    memory_section(sec, quick, threads)
    log("llamacpp: warm start of the CLI")
    startup_section(sec, quick, threads)
    return sec


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--llama-threads", type=int, default=2)
    ap.add_argument("--memory-child")
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    if a.memory_child:
        print(json.dumps(memory_child(a.memory_child, a.tokens, a.llama_threads)))
        sys.exit(0)
    s = run(a.quick, a.reps, a.llama_threads)
    print(table(s.rows))
    print("\n".join(s.checks))
