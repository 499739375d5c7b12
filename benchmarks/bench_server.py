"""`cfg-textgen serve` under load: aggregate tokens/s and time to first token at 1, 2, 4 and 8
concurrent CFG streams, and what HTTP costs over the same generation in-process.

    python3 benchmarks/bench_server.py            (64 tokens per stream, 3 rounds)
    python3 benchmarks/bench_server.py --quick    (16 tokens, 1 round)
    --backend transformers|llama.cpp  --tokens N  --rounds R  --no-write

A real server process on a free local port (the same one `cfg-textgen serve` starts), real HTTP
clients (httpx, one thread per stream), streaming `/v1/completions` with guidance_scale 1.5 on a
~200-token story; `ban_eos_token` so every stream generates exactly N tokens. Concurrency levels
are interleaved round by round (the machine is shared: ratios within one run, medians).

Targets: aggregate at 4 streams >= 2x the aggregate at 1 (the batched Scheduler on
llama.cpp decodes every stream in one batch per step); one stream through HTTP >= 0.95x the same
generation in-process (tokens/s; in-process = the engine's Scheduler in this process, interleaved).
Writes results/server-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import STORY, load_average, machine  # noqa: E402

LEVELS = (1, 2, 4, 8)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def body(tokens: int, seed: int = 0) -> dict:
    return {"prompt": STORY, "max_tokens": tokens, "temperature": 0, "guidance_scale": 1.5,
            "negative_prompt": "", "ban_eos_token": True, "seed": seed}


def one_stream(url: str, tokens: int, out: list, start: threading.Barrier):
    import httpx

    start.wait()
    t0 = time.perf_counter()
    first = None
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body(tokens) | {"stream": True}, timeout=900) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                piece = json.loads(line[6:])["choices"][0]["text"]
                if piece and first is None:
                    first = time.perf_counter() - t0
                text += piece
    out.append({"ttft": first, "seconds": time.perf_counter() - t0, "text": text})


def level(url: str, n: int, tokens: int) -> dict:
    out: list = []
    barrier = threading.Barrier(n)
    threads = [threading.Thread(target=one_stream, args=(url, tokens, out, barrier)) for _ in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    # the same greedy request n times: every text should be the one it gives alone (recorded, and
    # reported in the table: a difference is an engine bug, not a benchmark failure)
    return {"wall": wall, "tokens_per_s": n * tokens / wall, "ttft": [r["ttft"] for r in out],
            "text": out[0]["text"], "texts": [r["text"] for r in out]}


def in_process(scheduler, Request, preset, tokens: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    job = scheduler.submit(Request(prompt=STORY, preset=preset, seed=0, ban_eos=True))
    job.wait()
    return time.perf_counter() - t0, job.text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    tokens = args.tokens or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)

    from server_process import ServerProcess

    from cfg_textgen.engine import Request, Scheduler
    from cfg_textgen.server.scheduling import _load_backend
    from cfg_textgen.server.translate import build_preset

    flags = ["--parallel", str(max(LEVELS))] + (["--backend", args.backend] if args.backend else [])
    srv = ServerProcess(*flags)
    try:
        loader = __import__("httpx").get(srv.url + "/v1/internal/model/info").json()["loader"]
        level(srv.url, 1, 4)  # warm-up
        runs = {n: [] for n in LEVELS}
        for r in range(rounds):
            for n in (LEVELS if r % 2 == 0 else LEVELS[::-1]):
                runs[n].append(level(srv.url, n, tokens))
                print(f"round {r + 1}: {n} streams: {runs[n][-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr)

        backend = _load_backend(None, args.backend, 1, lambda m: None)
        scheduler = Scheduler(backend, max_parallel=1)
        preset, _ = build_preset(body(tokens), "webui", tokens, [])
        in_process(scheduler, Request, preset, 4)
        http_s, local_s = [], []
        for _ in range(max(3, rounds)):
            http_s.append(level(srv.url, 1, tokens)["wall"])
            seconds, text = in_process(scheduler, Request, preset, tokens)
            local_s.append(seconds)
        alone = runs[1][0]["text"]
        same_as_alone = {n: all(t == alone for run in runs[n] for t in run["texts"]) for n in LEVELS}
        same_in_process = text == alone
        scheduler.close()
    finally:
        code = srv.terminate()

    rows = []
    for n in LEVELS:
        ttfts = [t for run in runs[n] for t in run["ttft"]]
        rows.append({"streams": n, "aggregate_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[n]),
                     "ttft_p50_s": pct(ttfts, 0.5), "ttft_p95_s": pct(ttfts, 0.95)})
    base = rows[0]["aggregate_tokens_per_s"]
    for row in rows:
        row["x_of_1"] = row["aggregate_tokens_per_s"] / base
    overhead = statistics.median(local_s) / statistics.median(http_s)
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "backend": loader,
              "tokens_per_stream": tokens, "rounds": rounds, "levels": rows,
              "http_vs_in_process": overhead, "http_seconds": http_s, "in_process_seconds": local_s,
              "targets": {"4_streams_x_of_1": {"target": 2.0, "value": rows[2]["x_of_1"], "met": rows[2]["x_of_1"] >= 2},
                          "http_vs_in_process": {"target": 0.95, "value": overhead, "met": overhead >= 0.95}},
              "texts_equal_alone": same_as_alone, "in_process_text_equal": same_in_process,
              "server_exit_code": code, "load_average": load_average(), "machine": machine()}
    print(f"\nserver on {loader}, CFG scale 1.5, {tokens} tokens per stream, median of {rounds} rounds "
          f"(load average {result['load_average']})")
    print("| streams | aggregate tok/s | x of 1 stream | TTFT p50 (s) | TTFT p95 (s) |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['streams']} | {row['aggregate_tokens_per_s']:.1f} | {row['x_of_1']:.2f} | "
              f"{row['ttft_p50_s']:.2f} | {row['ttft_p95_s']:.2f} |")
    print(f"\n4 streams: {rows[2]['x_of_1']:.2f}x one stream (target >= 2); one stream through HTTP: "
          f"{overhead:.3f}x in-process tokens/s (target >= 0.95)")
    print(f"every stream's text equals the request alone: {same_as_alone}; in-process == HTTP: {same_in_process}")
    if not args.no_write:
        out = HERE / "results" / f"server-{result['when'].replace(':', '')}{'-quick' if args.quick else ''}.json"
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
