"""Wall time of `sweep` and `eval lambada` on the default model, llama.cpp vs transformers.

Each command runs as the user runs it (`python -m cfg_textgen.cli ...`, a fresh process), the two
backends interleaved round by round so that the machine's load hits both alike; the table shows
each run's wall time, the part after "model ready" (the analysis itself) and the ratios within the
round. LAMBADA also runs with `--batch 1` on llama.cpp, to show what decoding 8 examples side by
side buys.

    python3 benchmarks/bench_analysis.py [--rounds 2] [--threads 1] [--no-write]

`--threads` goes to llama.cpp (default 1: on 2 cores shared with other work, 2 llama.cpp threads
spin-wait and run many times slower; on an idle machine leave it out with --threads 0). Writes
results/<UTC time>-analysis.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

SWEEP_PROMPT = "The old lighthouse keeper climbed the stairs one last time. At the top, he found"


def commands(data: Path, threads: int) -> dict[str, list[str]]:
    llama = ["--backend", "llama.cpp"] + (["--threads", str(threads)] if threads else [])
    hf = ["--backend", "transformers"]
    sweep = ["sweep", SWEEP_PROMPT, "--scales", "0,1,1.5,3,6,12", "--seed", "7", "--tokens", "60"]
    lambada = ["eval", "lambada", str(data), "--scales", "1,1.5"]
    return {
        "sweep llama.cpp": sweep + llama,
        "sweep transformers": sweep + hf,
        "lambada llama.cpp": lambada + llama,
        "lambada llama.cpp --batch 1": lambada + llama + ["--batch", "1"],
        "lambada transformers": lambada + hf,
    }


def run(args: list[str]) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cfg_textgen.cli", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{r.stderr[-2000:]}")
    load = float(re.search(r"model ready in ([\d.]+) s", r.stderr).group(1))
    return {"wall_s": round(wall, 2), "load_s": load, "stdout": r.stdout}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (0: its default)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    from test_lambada_rule import HANDWRITTEN

    data = HERE / "results" / ".lambada-handwritten.jsonl"
    data.parent.mkdir(exist_ok=True)
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in HANDWRITTEN), encoding="utf-8")
    cmds = commands(data, args.threads)
    rows: dict[str, list[dict]] = {name: [] for name in cmds}
    for _ in range(args.rounds):
        for name, cmd in cmds.items():
            rows[name].append(run(cmd))
    data.unlink()
    out = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
           "lambada_examples": len(HANDWRITTEN), "commands": {}, "rounds": []}
    print(f"{'command':32} " + "  ".join(f"round {i + 1}: wall (after load)" for i in range(args.rounds)))
    for name, cmd in cmds.items():
        cells = [f"{r['wall_s']:7.1f} s ({r['wall_s'] - r['load_s']:6.1f} s)" for r in rows[name]]
        print(f"{name:32} " + "  ".join(f"{c:>28}" for c in cells))
        out["commands"][name] = "cfg-textgen " + " ".join(cmd).replace(str(data), "lambada28.jsonl")
    for i in range(args.rounds):
        work = {name: rows[name][i]["wall_s"] - rows[name][i]["load_s"] for name in cmds}
        ratios = {
            "sweep transformers / llama.cpp": work["sweep transformers"] / work["sweep llama.cpp"],
            "lambada transformers / llama.cpp": work["lambada transformers"] / work["lambada llama.cpp"],
            "lambada llama.cpp batch 1 / batch 8": work["lambada llama.cpp --batch 1"] / work["lambada llama.cpp"],
        }
        print(f"round {i + 1} (after load): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
        out["rounds"].append({"seconds": {n: rows[n][i] | {"stdout": None} for n in cmds}, "ratios": ratios})
    # the same verdicts on both backends is not expected (Q4 kernels vs float32); show the accuracies
    for name in cmds:
        if name.startswith("lambada"):
            acc = re.findall(r"^(\S+) +(\d+/\d+)", rows[name][0]["stdout"], flags=re.M)
            print(f"{name}: " + ", ".join(f"scale {s}: {c}" for s, c in acc if s != "scale"))
    if not args.no_write:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = HERE / "results" / f"{stamp}-analysis.json"
        path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
