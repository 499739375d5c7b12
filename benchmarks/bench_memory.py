"""Peak memory (VmHWM, the peak resident set) with and without CFG, each in its own child process.

Every child loads the default model from the cache, resets the peak to the current RSS (loading has
a transient peak of its own that would hide the generation's), continues the ~200-token story by N
greedy tokens through one path, and reports the peak while generating and the RSS after loading:

    plain       model.generate
    engine_cfg  engine.Stream at scale 1.5 (batch-2 forward: the CLI's path)
    proc_cfg    model.generate with CFGLogitsProcessor at 1.5 (the plugin: a second KV cache)

Run alone: python3 benchmarks/bench_memory.py [--quick]; a child: --child NAME --tokens N
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, Section, have_engine, log, table  # noqa: E402


def vm(field: str) -> int:
    """A /proc/self/status figure in bytes (VmHWM = peak resident set, VmRSS = now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(name: str, n: int) -> dict:
    import torch

    from _common import default_model, story_ids
    from bench_decode import Variants

    model, tokenizer = default_model()
    loaded = vm("VmRSS")
    peak_load = vm("VmHWM")
    # the load's own transient peak would hide the generation's: reset VmHWM to the current RSS
    # (Linux: writing 5 to clear_refs), so "peak" is the peak while generating, model resident
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = vm("VmHWM") < peak_load or vm("VmHWM") <= vm("VmRSS") * 1.01
    except OSError:
        reset = False
    v = Variants(model, tokenizer, story_ids(tokenizer))
    fn = {"plain": v.plain, "engine_cfg": v.engine, "proc_cfg": v.ours_proc}[name]
    with torch.no_grad():
        tokens, _, wall = fn(n)
    return {"variant": name, "tokens": len(tokens), "rss_after_load": loaded,
            "peak_after_load": peak_load, "peak": vm("VmHWM"), "peak_was_reset": reset,
            "seconds": wall}


def run(quick: bool = False) -> Section:
    sec = Section("memory")
    n = 32 if quick else 128
    names = ["plain", "proc_cfg"] + (["engine_cfg"] if have_engine() else [])
    res = {}
    for name in names:
        log(f"memory: child process, {name}, {n} tokens")
        p = subprocess.run([sys.executable, __file__, "--child", name, "--tokens", str(n)],
                           capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            raise RuntimeError(f"memory child {name} failed:\n{p.stderr[-2000:]}")
        res[name] = json.loads(p.stdout.strip().splitlines()[-1])
    mb = 1 / 2**20
    sec.data.update(new_tokens=n, children=res, measure="VmHWM from /proc/self/status, one process per variant")
    plain = res["plain"]["peak"]
    sec.row("peak RSS, plain generate", plain * mb, "MB",
            note=f"{res['plain']['rss_after_load'] * mb:.0f} MB after loading", fmt="{:.0f}")
    for name, label in (("engine_cfg", "engine CFG 1.5"), ("proc_cfg", "processor CFG 1.5")):
        if name not in res:
            sec.row(f"peak RSS, {label} / plain", None, target="<= 1.15", note="engine.py not there yet")
            continue
        ratio = res[name]["peak"] / plain
        sec.data[f"{name}_over_plain"] = ratio
        sec.row(f"peak RSS, {label} / plain", ratio, "x", "<= 1.15", ratio <= 1.15,
                note=f"{res[name]['peak'] * mb:.0f} MB", fmt="{:.3f}")
    return sec


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child")
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.tokens)))
    else:
        s = run(a.quick)
        print(table(s.rows))
        print(json.dumps(s.data, indent=1))
