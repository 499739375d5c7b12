"""Two checkouts of cfg-textgen side by side on llama.cpp, in one run: did a change make anything slower?

    git worktree add --detach /tmp/before <older commit>
    python3 benchmarks/bench_before_after.py --before /tmp/before            # this checkout = after
    python3 benchmarks/bench_before_after.py --before /tmp/before --rounds 5 --threads 8

Each round runs every figure once per checkout, the order alternating by round, and the summary is
the median over rounds (the same minute of load for both sides of a ratio):

start    `python -m cfg_textgen.cli generate "Once upon a time" --tokens 4 --backend llama.cpp`,
         spawn to its first byte on stdout, warm (imports included): what a writer waits for.
import   `python -X importtime -c "import cfg_textgen.engine, cfg_textgen.backends.llama_cpp"`:
         the seconds it reports and whether any `transformers` module was loaded.
decode   a child process per checkout, on the default model: 128 greedy tokens (EOS banned) after
         a 145-token story with that checkout's engine (`engine.Stream` on its `LlamaCppBackend`),
         at scale 1 and 1.5; tokens/s = 1 / the median step. Both checkouts must give the same
         tokens (else the figure is not kept: the row says where they part).
ttft     the same child: time from `Stream` start to the first token of a 2,000-token story.

Needs llama-cpp-python and the default model (`make setup`). Nothing is written; the table is
printed (paste it into the issue or the README with the command)."""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The child: imports the checkout given in sys.argv[1] and measures its engine. It uses only what
# both old and new checkouts have (engine.Stream, backends.llama_cpp.LlamaCppBackend).
CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
threads, tokens = int(sys.argv[2]), int(sys.argv[3])
from cfg_textgen.backends.llama_cpp import LlamaCppBackend
from cfg_textgen.engine import Stream
from cfg_textgen.models import default_gguf_path
try:
    from cfg_textgen.runtime import configure_process
    configure_process("llama.cpp")
except ImportError:
    pass
STORY = sys.stdin.read()
backend = LlamaCppBackend(default_gguf_path(), n_threads=threads)
story = backend.tokenize(STORY)
out = {}

class Stamp:
    def __init__(self):
        self.times = []
    def __call__(self, ids, scores):
        self.times.append(time.perf_counter())
        return scores

def run(ids, scale, n):
    stamp = Stamp()
    t0 = time.perf_counter()
    s = Stream(backend, None, ids, scale=scale, chain=[stamp], max_new_tokens=n, do_sample=False, ban_eos=True)
    for _ in s:
        pass
    return list(s.token_ids), stamp.times, t0

for scale in (1.0, 1.5):
    ids, times, _ = run(story[:145], scale, tokens)
    steps = sorted(b - a for a, b in zip(times, times[1:]))
    out[str(scale)] = {"tokens": ids, "step": steps[len(steps) // 2]}
long = (story * (2000 // max(1, len(story)) + 1))[:2000]
for scale in (1.0, 1.5):
    _, times, t0 = run(long, scale, 1)
    out["ttft_" + str(scale)] = times[0] - t0
print(json.dumps(out))
"""


def first_byte(cmd: list[str], cwd: Path) -> float:
    """bench_startup's spawn-to-first-byte, in the checkout `cwd` and importing it."""
    from bench_startup import first_byte as measure

    return measure(cmd, {**os.environ, "PYTHONPATH": str(cwd)}, cwd=cwd)["first"]


def import_time(cwd: Path) -> tuple[float, bool]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    r = subprocess.run([sys.executable, "-X", "importtime", "-c",
                        "import cfg_textgen.engine, cfg_textgen.backends.llama_cpp"],
                       capture_output=True, text=True, env=env, cwd=cwd, check=True)
    total = 0
    for line in r.stderr.splitlines():  # "import time: self | cumulative | name": top-level rows
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| \S", line)  # nested names start with spaces
        if m:
            total += int(m.group(1))
    return total / 1e6, " transformers" in r.stderr


def child(cwd: Path, threads: int, tokens: int, story: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(cwd), str(threads), str(tokens)], input=story,
                       capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(cwd)})
    if r.returncode != 0:
        raise RuntimeError(f"the decode child in {cwd} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import STORY

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, type=Path, help="the older checkout")
    ap.add_argument("--after", type=Path, default=ROOT, help="the newer checkout (default: this one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    sides = {"before": a.before.resolve(), "after": a.after.resolve()}
    story = " ".join([STORY] * 40)
    got: dict[str, dict[str, list]] = {k: {} for k in sides}
    transformers_loaded = {}
    for r in range(a.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            cwd = sides[name]
            cmd = [sys.executable, "-m", "cfg_textgen.cli", "generate", "Once upon a time", "--tokens", "4",
                   "--backend", "llama.cpp", "--threads", str(a.threads)]
            if r == 0:
                first_byte(cmd, cwd)  # warm-up: page cache, converted files
            got[name].setdefault("start", []).append(first_byte(cmd, cwd))
            seconds, tf = import_time(cwd)
            got[name].setdefault("import", []).append(seconds)
            transformers_loaded[name] = tf
            c = child(cwd, a.threads, a.tokens, story)
            for scale in ("1.0", "1.5"):
                got[name].setdefault("tokens_" + scale, []).append(c[scale]["tokens"])
                got[name].setdefault("rate_" + scale, []).append(1 / c[scale]["step"])
                got[name].setdefault("ttft_" + scale, []).append(c["ttft_" + scale])
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)

    med = {k: {f: statistics.median(v) for f, v in d.items() if not f.startswith("tokens")} for k, d in got.items()}
    print(f"threads {a.threads}, {a.rounds} rounds, load average {os.getloadavg()[0]:.2f} at the end")
    print("| figure | before | after | after / before |")
    print("|---|---|---|---|")
    rows = [("warm CLI start to first byte (s)", "start"), ("import engine + llama backend (s)", "import"),
            ("decode scale 1 (tok/s)", "rate_1.0"), ("decode CFG 1.5 (tok/s)", "rate_1.5"),
            ("first token, 2,000-token story, scale 1 (s)", "ttft_1.0"),
            ("first token, 2,000-token story, CFG 1.5 (s)", "ttft_1.5")]
    for label, key in rows:
        b, f = med["before"][key], med["after"][key]
        print(f"| {label} | {b:.3f} | {f:.3f} | {f / b:.2f} |")
    print(f"| transformers imported by the llama.cpp path | {transformers_loaded['before']} | "
          f"{transformers_loaded['after']} | |")
    for scale in ("1.0", "1.5"):
        b, f = got["before"]["tokens_" + scale][0], got["after"]["tokens_" + scale][0]
        part = next((i for i, (x, y) in enumerate(zip(b, f)) if x != y), None)
        print(f"scale {scale}: " + ("same tokens" if part is None else f"tokens part at step {part} "
                                     "(threads split a step differently: see the README's --deterministic)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
