"""Writer-sized models, side by side in one run: llama-cpp-python's own server vs `cfg-textgen serve`,
and the bare llama.cpp loops vs our decode, on a 1B/3B/7B-shaped model or your own GGUF.

    python3 benchmarks/bench_writers.py                      # the 1B shape (made once: bench_models.py)
    python3 benchmarks/bench_writers.py --shape 7b
    python3 benchmarks/bench_writers.py --model ~/models/my-model.Q4_K_M.gguf
    python3 benchmarks/bench_writers.py --quick              # tiny settings: checks that it all runs
    (or: python3 benchmarks/run_all.py --only writers [--writers-shape 3b | --writers-model PATH])

Needs the `bench` extra (`pip install -e ".[bench]"`: llama-cpp-python's server). Every figure is
measured on the same model, threads (`--threads`, default the physical cores) and default
environment (no OMP_WAIT_POLICY set here); servers run as real processes on free local ports and are
driven over HTTP with streaming `/v1/completions`.

turns    first-token time of turn 1 (a `--story-tokens` story, default 1,500) and turn 2 (the same
         story + 40 tokens, as a writer's next turn), each server fresh per round:
           llama-cpp-python's server, prompt cache on (`--cache true`), no CFG
           cfg-textgen serve, CFG 1.5 with a negative prompt as long as the story (the story with
           one line inserted near its end, as SillyTavern builds it)
           cfg-textgen serve, scale 1
streams  cfg-textgen serve: aggregate tokens/s of 4 CFG 1.5 streams / 1 stream, at 32 and 128 tokens
decode   bench_llamacpp's variants on this model: the bare llama-cpp-python loops (plain; story +
         BOS-only opposing sequence in one llama_decode) vs our engine at scale 1 and 1.5 (tokens/s
         = 1 / the median step; where our tokens part from the bare loop's is reported: the text of
         random weights is noise, the exact checks run on the default model)
join     cfg-textgen serve: 3 CFG streams running, then a `--join-tokens` prompt (default 3,000)
         joins: the longest gap between two tokens of the running streams / their median gap

Targets (the issue's, on a quiet machine): turn 2 with CFG <= 2x llama-cpp-python's turn 2; CFG
decode >= 1.0x the bare two-sequence loop; scale 1 >= 0.95x the bare plain loop; the joining
prompt's longest gap <= 3x a normal step; 4 CFG streams >= 2x the aggregate of 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import ROOT, STORY, Section, load_average, log, markdown_table, median, now, table  # noqa: E402

SCALE = 1.5
TURN2_EXTRA = 40


class LlamaCppPythonServer:
    """`python -m llama_cpp.server` on a free local port: its prompt cache on, flash attention at
    its own default (off), what a user of it runs; cfg-textgen's `auto` is off on a CPU too, so on
    these machines both read with the same attention kernels."""

    def __init__(self, model: Path, threads: int, n_ctx: int, timeout: float = 600):
        from server_process import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-cpp-python-server-{self.port}.log"
        self._log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", str(self.port),
             "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
             "--cache", "true", "--verbose", "false"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        _wait_up(self.url, self.proc, timeout, self.log_path)

    def terminate(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _wait_up(url: str, proc, timeout: float, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{url}: the server did not come up in {timeout} s")
        time.sleep(0.5)


def ours(model: Path, threads: int, parallel: int | None = None):
    """`cfg-textgen serve` on `model`; `parallel` None: the default, `--parallel auto`."""
    from server_process import ServerProcess

    flags = ["--parallel", str(parallel)] if parallel is not None else []
    return ServerProcess("--model", str(model), "--threads", str(threads), *flags, timeout=600)


def stream(url: str, body: dict, on_event=None, stop: threading.Event | None = None) -> dict:
    """POST a streaming /v1/completions; the time to the first token and the whole text. Once
    `stop` is set, the stream is closed (the server cancels the request)."""
    import httpx

    t0 = now()
    first = None
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=3600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            if stop is not None and stop.is_set():
                break
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"{url}: {event['error']}")
            piece = event["choices"][0].get("text") or ""
            t = now()
            if first is None:  # the first token's event (its text may be a partial character)
                first = t - t0
            if on_event is not None and piece:
                on_event(t, len((event["choices"][0].get("logprobs") or {}).get("tokens") or [piece]))
            text += piece
    return {"first": first, "seconds": now() - t0, "text": text}


# ---- the texts -------------------------------------------------------------------------------


def story_tokens(url: str, n: int, round_: int) -> list[int]:
    """`n` tokens of a long story (round `round_`'s own opening, so no server has seen it)."""
    import httpx

    text = f"Book {round_ + 1}.\n\n" + "\n\n".join(f"Chapter {i + 1}.\n{STORY}" for i in range(n // 150 + 2))
    tokens = httpx.post(url + "/v1/internal/encode", json={"text": text}, timeout=60).json()["tokens"]
    if len(tokens) < n:
        raise RuntimeError(f"the story has {len(tokens)} tokens, fewer than {n}")
    return tokens[:n]


def detokenize(url: str, tokens: list[int]) -> str:
    import httpx

    return httpx.post(url + "/v1/internal/decode", json={"tokens": tokens}, timeout=60).json()["text"]


def negative_of(story: str) -> str:
    """SillyTavern's negative prompt: the same story with one line inserted near its end."""
    cut = story.rfind("\n", 0, int(len(story) * 0.9))
    cut = cut if cut > 0 else len(story) // 2
    return story[:cut] + "\n[Style: cheerful, silly, careless.]" + story[cut:]


# ---- sections ----------------------------------------------------------------------------------


def turns_section(sec: Section, model: Path, threads: int, n: int, rounds: int, n_ctx: int) -> None:
    """Turn 1 / turn 2 first-token times on a fresh server per round, three servers interleaved."""
    got = {k: {"turn1": [], "turn2": []} for k in ("llama-cpp-python", "ours CFG 1.5", "ours scale 1")}
    for r in range(rounds):
        srv = ours(model, threads)
        try:
            tokens = story_tokens(srv.url, n + TURN2_EXTRA, r)
            turn1, turn2 = detokenize(srv.url, tokens[:n]), detokenize(srv.url, tokens)
        finally:
            srv.terminate()
        order = list(got)
        order = order[r % 3:] + order[:r % 3]
        for name in order:
            if name == "llama-cpp-python":
                server = LlamaCppPythonServer(model, threads, n_ctx)
                extra = {}
            else:
                server = ours(model, threads)
                extra = {"guidance_scale": SCALE if "CFG" in name else 1.0}
            try:
                for turn, story in (("turn1", turn1), ("turn2", turn2)):
                    body = {"prompt": story, "max_tokens": 2, "temperature": 0, "seed": 0} | extra
                    if "CFG" in name:
                        body["negative_prompt"] = negative_of(story)
                    got[name][turn].append(stream(server.url, body)["first"])
            finally:
                server.terminate()
            log(f"writers: turns round {r + 1}/{rounds}: {name}: turn 1 {got[name]['turn1'][-1]:.2f} s, "
                f"turn 2 {got[name]['turn2'][-1]:.2f} s")
    sec.data["turns"] = got
    sec.data["story_tokens"] = n
    for name, times in got.items():
        sec.row(f"turn 1 first token, {n}-token story: {name}", median(times["turn1"]), "s", fmt="{:.2f}")
        sec.row(f"turn 2 first token (+{TURN2_EXTRA} tokens): {name}", median(times["turn2"]), "s", fmt="{:.2f}")
    ratio = median(got["ours CFG 1.5"]["turn2"]) / median(got["llama-cpp-python"]["turn2"])
    sec.row("turn 2: ours CFG 1.5 / llama-cpp-python (no CFG)", ratio, "x", "<= 2", ratio <= 2, fmt="{:.2f}")


def bare_step_seconds(model: Path, threads: int, sequences: int, steps: int = 12) -> float:
    """Median seconds of a bare llama.cpp decode step of `sequences` sequences, one token each,
    after the streams' story (llama-cpp-python's low-level API, no engine): what batching can give
    on this machine at all."""
    from cfg_textgen.runtime import RuntimeSettings
    from llamacpp_reference import LlamaRef

    # attention as our server's default runs it (flash attention off on a CPU)
    ref = LlamaRef(model, n_threads=threads, n_seq_max=sequences,
                   flash_attn_type=RuntimeSettings().flash_attn_type)
    try:
        return median(ref.step_seconds(ref.tokenize(STORY), sequences, steps))
    finally:
        ref.close()


def streams_section(sec: Section, model: Path, threads: int, token_counts, rounds: int) -> None:
    from bench_server import level

    # the ceiling: 4 CFG streams are 8 sequences a step, 1 is 2; a compute-bound machine (few
    # cores: a step costs in proportion to its sequences) cannot gain from batching them
    two, eight = (bare_step_seconds(model, threads, n) for n in (2, 8))
    sec.row("bare llama.cpp decode: a step of 8 sequences / a step of 2", eight / two, "x", fmt="{:.2f}")
    sec.row("what batching gives here: bare 4 x (2-sequence step) / (8-sequence step)",
            4 * two / eight, "x", fmt="{:.2f}")
    srv = ours(model, threads, parallel=4)  # 4 requests at once, whatever auto would take
    try:
        level(srv.url, 1, 2)  # warm-up
        for tokens in token_counts:
            rates = {1: [], 4: []}
            for r in range(rounds):
                for n in ((1, 4) if r % 2 == 0 else (4, 1)):
                    rates[n].append(level(srv.url, n, tokens)["tokens_per_s"])
            ratio = median(rates[4]) / median(rates[1])
            sec.data[f"streams_{tokens}"] = rates
            sec.row(f"server, {tokens} tokens: 1 CFG stream", median(rates[1]), "tok/s", fmt="{:.1f}")
            sec.row(f"server, {tokens} tokens: 4 CFG streams / 1 (aggregate)", ratio, "x", ">= 2", ratio >= 2,
                    fmt="{:.2f}")
    finally:
        srv.terminate()


def decode_section(sec: Section, model: Path, threads: int, quick: bool, reps: int | None) -> None:
    import bench_llamacpp

    v = bench_llamacpp.Variants(threads, gguf=model)
    try:
        names = ["bare_plain", "bare_cfg", "ours_1", "ours_cfg", "sampled_multinomial", "sampled_cdf"]
        bench_llamacpp.decode_section(sec, v, quick, reps, names=names, strict=False,
                                      targets={"cfg": 1.0, "scale_1": 0.95})
    finally:
        v.close()


def join_section(sec: Section, model: Path, threads: int, join_tokens: int, tokens: int) -> None:
    """3 CFG streams run; a long prompt joins; the running streams' gaps between tokens."""
    srv = ours(model, threads, parallel=4)  # 4 requests at once, whatever auto would take
    try:
        long = detokenize(srv.url, story_tokens(srv.url, join_tokens, 99))
        # (time, tokens) of each text event: a token that ends inside a character (byte tokens,
        # frequent in a random-weight model's text) arrives with the next one, one event for two
        # steps, so the body asks for logprobs, whose token list says how many steps an event spans
        stamps = [[] for _ in range(3)]
        joined_at = []
        body = {"prompt": STORY, "max_tokens": tokens, "temperature": 0, "guidance_scale": SCALE,
                "ban_eos_token": True, "logprobs": 1}
        done = threading.Event()  # the joiner has its first token: the running streams may end
        runners = [threading.Thread(target=stream, args=(srv.url, body, lambda t, k, s=stamps[i]: s.append((t, k)), done))
                   for i in range(3)]
        for t in runners:
            t.start()
        # the normal gap: all three decoding, none still reading its prompt (their reads are
        # paced too, so gaps from before the last one's first token are not normal steps)
        while min(len(s) for s in stamps) < 1:
            time.sleep(0.01)
        all_running = max(s[0][0] for s in stamps)
        while min(len(s) for s in stamps) < 12:
            time.sleep(0.01)
        joined_at.append(now())
        try:
            joiner = stream(srv.url, {"prompt": long, "max_tokens": 1, "temperature": 0, "guidance_scale": SCALE})
            joined_at.append(now())
            # the streams' step once the prompt is read, at the length they have grown to by then
            counts = [len(s) for s in stamps]
            while any(len(s) < c + 12 for s, c in zip(stamps, counts)) and all(t.is_alive() for t in runners):
                time.sleep(0.01)
        finally:
            done.set()
        for t in runners:
            t.join()
    finally:
        srv.terminate()

    def gaps(keep):  # seconds per step between two events (the later one's tokens)
        return [(b - a) / k for s in stamps for (a, _), (b, k) in zip(s, s[1:]) if keep(a, b)]

    before = gaps(lambda a, b: a >= all_running and b < joined_at[0])
    during = gaps(lambda a, b: joined_at[0] <= b and a <= joined_at[1])
    after = gaps(lambda a, b: a > joined_at[1])
    if len(during) < 3:
        raise RuntimeError(f"the running streams ended before the {join_tokens}-token prompt was read: "
                           f"more --tokens for them")
    step, longest = median(before), max(during) if during else float("nan")
    sec.data["join"] = {"prompt_tokens": join_tokens, "gaps_before": before, "gaps_after": during,
                        "joiner_first_token_s": joiner["first"]}
    sec.row(f"3 CFG streams: normal gap between tokens", step * 1e3, "ms", fmt="{:.0f}")
    sec.row(f"the {join_tokens}-token CFG prompt's first token, read beside them", joiner["first"], "s", fmt="{:.1f}")
    sec.row(f"3 CFG streams: longest gap while a {join_tokens}-token prompt joins / normal", longest / step,
            "x", "<= 3", longest / step <= 3, fmt="{:.1f}", note=f"longest {longest:.2f} s")
    # the streams grew by hundreds of tokens while the prompt was read, and a step over a longer
    # story takes longer: their step right after, at the length the longest gap came at
    if after:
        late = median(after)
        sec.row("3 CFG streams: gap between tokens once it is read", late * 1e3, "ms", fmt="{:.0f}")
        sec.row("3 CFG streams: longest gap while it joins / the gap once it is read", longest / late, "x",
                fmt="{:.1f}")
        sec.data["join"]["gaps_once_read"] = after


SECTIONS = ("decode", "turns", "streams", "join")


def run(shape: str = "1b", model: str | None = None, quick: bool = False, threads: int | None = None,
        reps: int | None = None, rounds: int | None = None, only=SECTIONS) -> Section:
    import bench_models

    from cfg_textgen.backends.llama_cpp import physical_cores

    sec = Section("writers")
    path = Path(model).expanduser() if model else bench_models.ensure(shape)
    threads = threads or physical_cores()
    story = 200 if quick else 1500
    join = 300 if quick else 3000
    rounds = rounds or (1 if quick else 3)
    sec.data.update(model=str(path), threads=threads, quick=quick, load_average_start=load_average())
    log(f"writers: {path.name}, {threads} threads")
    if "decode" in only:
        log("writers: decode (bare llama.cpp loops vs ours)")
        decode_section(sec, path, threads, quick, reps)
    if "turns" in only:
        log("writers: turn 1 / turn 2 first token (llama-cpp-python's server vs ours)")
        turns_section(sec, path, threads, story, rounds, n_ctx=4096)
        log(table(sec.rows))
    if "streams" in only:
        log("writers: 4 CFG streams vs 1")
        streams_section(sec, path, threads, (8, 16) if quick else (32, 128), rounds)
        log(table(sec.rows))  # so far: a run cut short still shows what it measured
    if "join" in only:
        log("writers: a long prompt joins 3 running streams")
        join_section(sec, path, threads, join, 400 if quick else 2000)
    sec.data["load_average_end"] = load_average()
    return sec


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b", choices=["1b", "3b", "7b"])
    ap.add_argument("--model", help="your own GGUF instead of a random-weight shape")
    ap.add_argument("--quick", action="store_true", help="tiny settings: checks that everything runs")
    ap.add_argument("--threads", type=int, help="llama.cpp threads for every variant (default: physical cores)")
    ap.add_argument("--reps", type=int, help="repetitions of the decode comparison")
    ap.add_argument("--rounds", type=int, help="rounds of the turns and streams sections (default 3)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    a = ap.parse_args()
    s = run(a.shape, a.model, a.quick, a.threads, a.reps, a.rounds, tuple(a.only.split(",")))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": [r.cells() for r in s.rows], "data": s.data}, indent=1,
                                           default=str))
    print(table(s.rows))
    print(markdown_table(s.rows))
    print("\n".join(s.checks))
