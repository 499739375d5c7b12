"""Start-up: seconds from process start to the first streamed byte of story text on stdout.

    floor  python -c "import torch, transformers; from transformers import LlamaForCausalLM"
           (to exit: what any tool on this stack pays before it can do anything)
    cli    python -m cfg_textgen.cli generate PROMPT --tokens 4 (to the first byte on stdout)
           cold: CFG_TEXTGEN_CACHE is an empty folder (converts the GGUF); warm: the same folder after
    lib    the library alone: load_model() and one forward pass, then print the token (diagnostic:
           what the CLI adds on top of the library)

Floor, warm cli and lib runs are interleaved, medians kept; the cold run happens once (~30 s+), not
with --quick (whose warm runs use the user's own cache).
With --profile, the warm cli start is run under `python -X importtime` and py-spy (if installed)
and the biggest costs are printed.

Run alone: python3 benchmarks/bench_startup.py [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, Section, have_cli_generate, log, median, now, table  # noqa: E402

PROMPT = "The lighthouse keeper had not seen a ship in eleven years. Every night he climbed the stairs, lit the lamp, and"
FLOOR = [sys.executable, "-c", "import torch, transformers; from transformers import LlamaForCausalLM"]
CLI = [sys.executable, "-m", "cfg_textgen.cli", "generate", PROMPT, "--tokens", "4"]
LIB = [sys.executable, "-c", (
    "import sys, torch\n"
    "from cfg_textgen.models import load_model\n"
    "m, t = load_model()\n"
    f"ids = t({PROMPT!r}, return_tensors='pt').input_ids\n"
    "with torch.no_grad():\n"
    "    tok = int(m(ids).logits[0, -1].argmax())\n"
    "sys.stdout.write(t.decode([tok])); sys.stdout.flush()\n")]


def first_byte(cmd, env, timeout=600.0, cwd=None) -> dict:
    """Seconds from spawning `cmd` (in `cwd`, default the repository) to its first byte on stdout,
    and to its exit."""
    with tempfile.TemporaryFile() as err:
        t0 = now()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=cwd or ROOT)
        first = os.read(p.stdout.fileno(), 1)
        t_first = now() - t0 if first else None
        p.stdout.read()
        code = p.wait(timeout)
        total = now() - t0
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {code}:\n{stderr[-2000:]}")
    return {"first": t_first, "total": total, "stderr_tail": stderr[-300:]}


def child_env(cache: Path | None) -> dict:
    env = dict(os.environ)
    if cache is not None:
        env["CFG_TEXTGEN_CACHE"] = str(cache)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def importtime(cmd, env, top=15) -> list[tuple[float, str]]:
    """The largest cumulative import times (seconds) of a run under `python -X importtime`."""
    p = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    rows = []
    for line in p.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            parts = [x.strip() for x in line[len("import time:"):].split("|")]
            if parts[1].isdigit():
                rows.append((int(parts[1]) / 1e6, parts[2]))
    rows.sort(reverse=True)
    return rows[:top]


def pyspy(cmd, env, top=20) -> list[tuple[float, str]] | None:
    """Share of samples per function (cumulative) of a run under py-spy, or None if not installed."""
    spy = shutil.which("py-spy")
    if not spy:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        subprocess.run([spy, "record", "-r", "100", "--format", "raw", "-o", str(raw), "--", *cmd],
                       env=env, cwd=ROOT, capture_output=True)
        if not raw.exists():
            return None
        cum, total = {}, 0
        for line in raw.read_text().splitlines():
            stack, n = line.rsplit(" ", 1)
            total += int(n)
            for frame in set(stack.split(";")):
                if "importlib._bootstrap" in frame:
                    continue
                cum[frame] = cum.get(frame, 0) + int(n)
    ranked = sorted(((v / total, k) for k, v in cum.items()), reverse=True)
    return ranked[:top]


def run(quick: bool = False, profile: bool = False) -> Section:
    sec = Section("startup")
    reps = 2 if quick else 3
    cli = have_cli_generate()
    tmp = Path(tempfile.mkdtemp(prefix="cfg-bench-cache-"))
    try:
        runs = {"floor": [], "lib_warm": [], "cli_warm": []}
        if quick:  # no conversion: the warm runs use the user's own cache
            env = child_env(None)
            cold = {"first": None, "total": None}
        else:
            env = child_env(tmp / "cache")
            log("startup: cold start (converts the GGUF into an empty cache)")
            cold = first_byte(CLI if cli else LIB, env)
        sec.data["cold"] = cold
        for r in range(reps):
            order = ["floor", "lib_warm", "cli_warm"] if cli else ["floor", "lib_warm"]
            for name in order[r % len(order):] + order[:r % len(order)]:
                cmd = {"floor": FLOOR, "lib_warm": LIB, "cli_warm": CLI}[name]
                res = first_byte(cmd, env)
                runs[name].append(res["total"] if name == "floor" else res["first"])
            log(f"startup: rep {r + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items() if v))
        med = {k: median(v) for k, v in runs.items() if v}
        sec.data.update(reps=reps, seconds=runs, median_s=med, cli_available=cli,
                        cli_command=" ".join(CLI[1:4]) + " PROMPT --tokens 4")
        floor = med["floor"]
        sec.row("floor: import torch, transformers, LlamaForCausalLM", floor, "s", fmt="{:.2f}")
        if cli:
            sec.row("cli generate, cold (converts the GGUF), first token", cold["first"], "s", fmt="{:.1f}",
                    note="not run with --quick" if quick else "")
            warm = med["cli_warm"]
            sec.row("cli generate, warm, first token", warm, "s", f"<= floor + 1.5 = {floor + 1.5:.2f} s",
                    warm <= floor + 1.5, fmt="{:.2f}")
            sec.row("cli warm - floor", warm - floor, "s", "<= 1.5 s", warm - floor <= 1.5, fmt="{:.2f}")
        else:
            sec.row("cli generate, cold, first token", None, note="`generate` not in cli.py yet")
            sec.row("cli generate, warm, first token", None, target="<= floor + 1.5 s",
                    note="`generate` not in cli.py yet")
            sec.row("library load_model + 1 forward, cold", cold["first"], "s", fmt="{:.1f}",
                    note="not run with --quick" if quick else "")
        sec.row("library load_model + 1 forward, warm, first token", med["lib_warm"], "s",
                note=f"{med['lib_warm'] - floor:+.2f} s over the floor", fmt="{:.2f}")
        if profile:
            target = CLI if cli else LIB
            log("startup: profiling the warm start (-X importtime, py-spy)")
            sec.data["importtime_top"] = importtime(target, env)
            sec.data["pyspy_top"] = pyspy(target, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sec


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    s = run(a.quick, a.profile)
    print(table(s.rows))
    for key in ("importtime_top", "pyspy_top"):
        if s.data.get(key):
            print(f"\n{key}:")
            for v, name in s.data[key]:
                print(f"  {v:8.3f}  {name[:140]}")
