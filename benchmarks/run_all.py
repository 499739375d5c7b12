"""Run every benchmark in one process (the model loaded once), print one table, write the JSON.

    python3 benchmarks/run_all.py            full run (~12 min on 2 idle cores), writes
                                             results/<UTC time>.json and results/latest.json and
                                             the table in benchmarks/README.md
    python3 benchmarks/run_all.py --quick    smoke run (short lengths, no cold start); writes
                                             results/<UTC time>-quick.json only
    --only decode,growth  --threads 1  --reps 6  --profile-startup
    --only llamacpp --llama-threads 2    just the llama.cpp section (a partial run writes
                                         results/<UTC time>-llamacpp.json only)

Sections: decode (tokens/s of the CFG paths, with token-for-token checks), growth (CFG overhead vs
generated length), samplers (the full chain per token), stream_decode (text decoding per token,
DecodeStream vs the re-decoding fallback, 10 to 4,000 tokens), memory (peak RSS, child processes),
startup (first streamed token, child processes), llamacpp (our llama.cpp backend vs
bare llama.cpp loops and the transformers engine, sampler chains per preset, time to first token,
memory, CLI start; `--only llamacpp` runs just that), writers (a 1B/3B/7B-shaped model or your own
GGUF: llama-cpp-python's server vs `cfg-textgen serve`, bare loops vs ours; bench_writers.py;
`--writers-shape 7b`, `--writers-model PATH`). Exit code 1 if two paths that must agree gave
different tokens (nothing is written then) or a section crashed; a missed target is reported in
the table, not in the exit code (these are measurements on a shared machine, not tests).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTIONS = ("decode", "growth", "samplers", "stream_decode", "memory", "startup", "llamacpp", "writers")
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="cfg-textgen benchmarks: what CFG costs, side by side.")
    ap.add_argument("--quick", action="store_true", help="short smoke run; does not touch latest.json")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--reps", type=int, help="repetitions of the decode comparison (default 4; 2 quick)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own, = cores)")
    ap.add_argument("--llama-threads", type=int, default=2,
                    help="llama.cpp threads in the llamacpp section (default 2)")
    ap.add_argument("--writers-shape", default="1b", choices=["1b", "3b", "7b"],
                    help="the random-weight model shape of the writers section (default 1b)")
    ap.add_argument("--writers-model", metavar="GGUF",
                    help="run the writers section on your own GGUF instead of a random-weight shape")
    ap.add_argument("--writers-threads", type=int,
                    help="llama.cpp threads in the writers section (default: the physical cores)")
    ap.add_argument("--profile-startup", action="store_true",
                    help="also profile the warm start (-X importtime, py-spy)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:  # before torch is imported, so child processes get the same
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.environ["MKL_NUM_THREADS"] = str(args.threads)
    # OpenMP's waiting (OMP_WAIT_POLICY) is left as the user's environment has it, as cfg_textgen does
    sys.path.insert(0, str(HERE))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from _common import CheckFailed, Section, load_average, log, machine, markdown_table, table

    started = time.perf_counter()
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "machine": machine(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
        "load_average": {"start": load_average()},
        "sections": {},
    }
    log(f"machine: {record['machine']['usable_cores']} cores, {record['machine']['torch_threads']} torch "
        f"threads, load average {record['load_average']['start']}")
    failed = []
    rows = []
    for name in SECTIONS:
        if name not in args.only:
            continue
        t0 = time.perf_counter()
        load0 = load_average()
        try:
            sec = run_section(name, args)
        except CheckFailed as err:
            print(f"\nCORRECTNESS CHECK FAILED in {name}: {err}\n"
                  "Nothing was written: a fast path that gives other tokens does not get a figure.",
                  file=sys.stderr)
            return 1
        except Exception:  # noqa: BLE001 - one crashed section must not hide the others
            failed.append(name)
            log(f"{name}: crashed\n{traceback.format_exc()}")
            sec = Section(name)
            sec.row("section crashed", None, note=traceback.format_exc().strip().splitlines()[-1])
            sec.data["error"] = traceback.format_exc()
        sec.data["seconds"] = round(time.perf_counter() - t0, 1)
        sec.data["load_average"] = {"start": load0, "end": load_average()}
        rows += sec.rows
        record["sections"][name] = {"rows": [r.to_dict() for r in sec.rows], "checks": sec.checks,
                                    "data": sec.data}
        log(f"{name}: done in {sec.data['seconds']:.0f} s")
    record["load_average"]["end"] = load_average()
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    record["rows"] = [r.to_dict() for r in rows]
    record["misses"] = [f"{r.section}: {r.figure}" for r in rows if r.ok is False]
    record["pending"] = [f"{r.section}: {r.figure}" for r in rows if r.value is None]
    checks = [c for s in record["sections"].values() for c in s["checks"]]

    m = record["machine"]
    print(f"\ncfg-textgen benchmarks, {record['date']}, {m['usable_cores']} cores, {m['torch_threads']} torch "
          f"threads, torch {m['torch']}, transformers {m['transformers']}, load average "
          f"{record['load_average']['start']} -> {record['load_average']['end']}, {record['wall_seconds']:.0f} s\n")
    print(table(rows))
    if checks:
        print("\nchecked before timing (token for token):\n  " + "\n  ".join(checks))
    if not args.no_write:
        # a partial run (--only) must not replace the full record and README table with a subset
        partial = set(args.only) != set(SECTIONS)
        write(record, rows, checks, args.quick, markdown_table,
              suffix="-quick" if args.quick else ("-" + "-".join(args.only) if partial else ""))
    return 1 if failed else 0


def run_section(name, args):
    if name == "decode":
        import bench_decode

        return bench_decode.run(args.quick, args.reps)
    if name == "growth":
        import bench_growth

        return bench_growth.run(args.quick)
    if name == "samplers":
        import bench_samplers

        return bench_samplers.run(args.quick)
    if name == "stream_decode":
        import bench_stream_decode

        return bench_stream_decode.run(args.quick)
    if name == "memory":
        import bench_memory

        return bench_memory.run(args.quick)
    if name == "llamacpp":  # late: it sets torch to 1 thread in this process, as the CLI does for llama.cpp
        import bench_llamacpp

        return bench_llamacpp.run(args.quick, args.reps, args.llama_threads)
    if name == "writers":
        import bench_writers

        return bench_writers.run(args.writers_shape, args.writers_model, args.quick, args.writers_threads,
                                 args.reps)
    import bench_startup

    return bench_startup.run(args.quick, args.profile_startup)


def write(record, rows, checks, quick, markdown_table, suffix="") -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + suffix
    text = json.dumps(record, indent=1, default=str) + "\n"
    (out / f"{stamp}.json").write_text(text)
    written = [out / f"{stamp}.json"]
    if not suffix:  # a full run: the committed record and the README table
        (out / "latest.json").write_text(text)
        written.append(out / "latest.json")
        readme = HERE / "README.md"
        if readme.exists():
            body = readme.read_text()
            if README_START in body and README_END in body:
                m = record["machine"]
                block = (f"{README_START}\n"
                         f"Measured {record['date']} on {m['usable_cores']} cores ({m['cpu']}), "
                         f"{m['torch_threads']} torch threads, torch {m['torch']}, transformers "
                         f"{m['transformers']}, load average {record['load_average']['start']} -> "
                         f"{record['load_average']['end']}, {record['wall_seconds']:.0f} s in all "
                         f"(`{record['command']}`).\n\n{markdown_table(rows)}\n\n"
                         + ("Checked token for token before timing:\n\n"
                            + "\n".join(f"- {c}" for c in checks) + "\n" if checks else "")
                         + f"{README_END}")
                head, rest = body.split(README_START, 1)
                readme.write_text(head + block + rest.split(README_END, 1)[1])
                written.append(readme)
    print("\nwrote " + ", ".join(str(p.relative_to(HERE.parent)) for p in written))


if __name__ == "__main__":
    sys.exit(main())
