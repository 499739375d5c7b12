"""Every request the real apps sent (SillyTavern 2026, Kobold Lite v180; recorded in
../shared/client-traffic/*.jsonl) replayed against `cfg-textgen serve` as a real process on the
default model (llama.cpp when installed, else transformers), in the recorded order, with the
lengths capped so it stays fast. Each answers 2xx; a browser's OPTIONS is sent as the CORS
preflight it was.

Then each recorded generate request's effect, as the real backends give it:
- SillyTavern puts `adaptive_p` in every `sampler_priority` with `adaptive_target: -0.01`: it is a
  sampler here (not skipped) and off at that target, so the greedy text equals the same request's
  without it; at a target above 0 it is on and the text changes.
- Kobold Lite's `memory` goes in front of the prompt (KoboldCpp): the text equals a request whose
  prompt is the token ids memory + story, also when a small context cuts the story.
- `use_default_badwordsids: true` bans EOS (KoboldCpp): on a prompt the model ends at once, the
  request runs to its length; with the recorded false it stops.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import httpx
import pytest

from server_process import ServerProcess



def _traffic_dir() -> Path:
    """../shared/client-traffic beside the clone (CI's layout: the repo's parent holds `shared`),
    else beside a folder further up (a worktree one level deeper)."""
    for parent in Path(__file__).resolve().parents[2:]:
        if (parent / "shared" / "client-traffic").is_dir():
            return parent / "shared" / "client-traffic"
    return Path(__file__).resolve().parents[2] / "shared" / "client-traffic"


TRAFFIC = _traffic_dir()
if not TRAFFIC.is_dir():
    pytest.skip(f"the recorded client traffic is not at {TRAFFIC} (CI puts ../shared beside the clone)",
                allow_module_level=True)

pytestmark = pytest.mark.slow
MAX_NEW = 6  # every replayed length is capped to this
STORY_CHARS = 800  # the effect checks keep this much of SillyTavern's 4-8k-character prompts
LENGTH_KEYS = ("max_tokens", "max_new_tokens", "n_predict", "num_predict", "max_length")
ORIGIN = "http://127.0.0.1:5001"  # a page served elsewhere, as Kobold Lite in a browser is
# a chat turn the default model ends at once: greedy, its next token is EOS
ENDS_AT_ONCE = "<|im_start|>user\nSay OK.<|im_end|>\n<|im_start|>assistant\nOK."


# sillytavern-ooba-chat-cfg.jsonl holds the generate body without its `prompt` and `negative_prompt`
# (the chat text was left out of the file): a chat of the same shape stands in, the negative prompt
# being the story with one line inserted one message deep, as SillyTavern builds it
STAND_IN_CHAT = ("Seraphina is a guardian of the forest glade.\nUser: Where am I?\nSeraphina: You are safe in "
                 "my glade, traveller. The wolves will not follow you here.\nUser: Who are you?\nSeraphina:")
STAND_IN_NEGATIVE = STAND_IN_CHAT.replace("\nUser: Who", "\n[Seraphina speaks in a dull, flat voice.]\nUser: Who")


def recorded() -> list[tuple[str, int, dict]]:
    out = []
    for path in sorted(TRAFFIC.glob("*.jsonl")):
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                rec = json.loads(line)
                if rec["path"] == "/v1/completions" and "prompt" not in rec["body"]:
                    rec["body"] = dict(rec["body"], prompt=STAND_IN_CHAT, negative_prompt=STAND_IN_NEGATIVE)
                out.append((path.name, i + 1, rec))
    return out


RECORDED = recorded()


def capped(body):
    if not isinstance(body, dict):
        return body
    return {k: (min(v, MAX_NEW) if k in LENGTH_KEYS and isinstance(v, int) else v) for k, v in body.items()}


@pytest.fixture(scope="module")
def server():
    backend = "llama.cpp" if importlib.util.find_spec("llama_cpp") else "transformers"
    # deterministic: the effect checks compare two requests' greedy texts, and a prompt read partly
    # from the prompt cache rounds differently from a cold read unless the server runs exact
    srv = ServerProcess("--backend", backend, "--cors-origin", ORIGIN, "--deterministic", timeout=600)
    yield srv
    assert srv.terminate() == 0, srv.stderr()


def send(srv, method: str, path: str, body=None, **kw) -> httpx.Response:
    with httpx.Client(timeout=600) as client:
        if method == "OPTIONS":  # a browser's preflight for the request that follows
            after = "POST" if any(p in path for p in ("generate", "abort", "tokencount", "encode")) else "GET"
            return client.options(srv.url + path, headers={"Origin": ORIGIN, "Access-Control-Request-Method": after,
                                                           "Access-Control-Request-Headers": "content-type"})
        r = client.request(method, srv.url + path, json=body, **kw)
        r.read()
        return r


@pytest.mark.parametrize("name,line,rec", RECORDED, ids=[f"{n}:{i}:{r['method']} {r['path']}" for n, i, r in RECORDED])
def test_client_traffic_replayed_request_answers_2xx(server, name, line, rec):
    r = send(server, rec["method"], rec["path"], capped(rec["body"]))
    assert 200 <= r.status_code < 300, f"{name}:{line} {rec['method']} {rec['path']}: {r.status_code} {r.text[:300]}"
    if rec["method"] == "POST" and rec["path"] in ("/v1/completions", "/api/v1/generate", "/api/extra/generate/stream"):
        # nothing the app sent in its sampler order is unknown here (adaptive_p included)
        assert "x-skipped-samplers" not in r.headers, r.headers["x-skipped-samplers"]


def generate_bodies(*paths) -> list[tuple[str, int, dict]]:
    return [(n, i, r["body"]) for n, i, r in RECORDED if r["method"] == "POST" and r["path"] in paths]


def completion_text(srv, body) -> str:
    r = send(srv, "POST", "/v1/completions", dict(body, stream=False))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


SILLYTAVERN = generate_bodies("/v1/completions")


@pytest.mark.parametrize("name,line,body", SILLYTAVERN, ids=[f"{n}:{i}" for n, i, _ in SILLYTAVERN])
def test_client_traffic_adaptive_p_is_off_at_sillytaverns_negative_target(server, name, line, body):
    # the story and its negative prompt shortened to their ends (three CFG requests per body)
    # greedy: a seeded draw may differ between two runs on llama.cpp (the prompt cache prefills the
    # second run differently), which would hide what adaptive_p does or does not change
    body = dict(capped(body), temperature=0, logprobs=None, n_probs=None, prompt=body["prompt"][-STORY_CHARS:],
                negative_prompt=body["negative_prompt"][-STORY_CHARS:])
    assert body["adaptive_target"] < 0
    if "sampler_priority" in body and "adaptive_p" not in body["sampler_priority"]:
        # the harness took it out of this recording to get past the old 400; the app sends it
        body["sampler_priority"] = body["sampler_priority"] + ["adaptive_p"]
    as_sent = completion_text(server, body)
    without = {k: v for k, v in body.items() if k not in ("adaptive_target", "adaptive_decay")}
    if "sampler_priority" in without:
        without["sampler_priority"] = [s for s in body["sampler_priority"] if s != "adaptive_p"]
    assert as_sent == completion_text(server, without)
    assert as_sent != completion_text(server, dict(body, adaptive_target=0.05))  # on, it steers the text


LITE = generate_bodies("/api/v1/generate", "/api/extra/generate/stream")


def kobold_greedy(srv, body) -> dict:
    r = send(srv, "POST", "/api/v1/generate", dict(body, temperature=0, rep_pen=1, max_length=MAX_NEW))
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def encode(srv, text) -> list[int]:
    return send(srv, "POST", "/v1/internal/encode", {"text": text}).json()["tokens"]


@pytest.mark.parametrize("name,line,body", [b for b in LITE if b[2]["memory"]],
                         ids=[f"{n}:{i}" for n, i, b in LITE if b["memory"]])
def test_client_traffic_kobold_memory_goes_in_front_and_survives_the_cut(server, name, line, body):
    memory, story, bos = encode(server, body["memory"]), encode(server, body["prompt"]), encode(server, "")
    if bos and story[:len(bos)] == bos:
        story = story[len(bos):]  # KoboldCpp: the prompt's BOS goes, the memory brings its own
    for context, kept in ((None, story), (len(memory) + 4 + MAX_NEW, story[-4:])):
        got = kobold_greedy(server, dict(body, **({"max_context_length": context} if context else {})))
        want = send(server, "POST", "/v1/completions", {"prompt": memory + kept, "temperature": 0,
                                                        "max_tokens": MAX_NEW}).json()
        assert got["prompt_tokens"] == len(memory) + len(kept) == want["usage"]["prompt_tokens"]
        assert got["text"] == want["choices"][0]["text"], context


@pytest.mark.parametrize("name,line,body", LITE, ids=[f"{n}:{i}" for n, i, _ in LITE])
def test_client_traffic_use_default_badwordsids_bans_eos(server, name, line, body):
    ending = dict(body, prompt=ENDS_AT_ONCE, memory="")
    got = kobold_greedy(server, ending)
    if body["use_default_badwordsids"]:
        assert (got["finish_reason"], got["completion_tokens"]) == ("length", MAX_NEW), got
        assert kobold_greedy(server, dict(ending, use_default_badwordsids=False))["finish_reason"] == "stop"
    else:
        assert got["finish_reason"] == "stop" and got["completion_tokens"] < MAX_NEW, got
