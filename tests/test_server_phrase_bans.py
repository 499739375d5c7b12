"""Phrase bans through `cfg-textgen serve` (a real process, default model, llama.cpp): the web UI's /
TabbyAPI's `banned_strings` and KoboldCpp's `banned_tokens` strings, streamed and not, CFG off and
on. A phrase greedy decoding writes never appears, the length is kept, streamed == non-streamed."""

from __future__ import annotations

import json

import httpx
import pytest

from llamacpp_reference import have_llama_cpp
from server_process import ServerProcess

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not have_llama_cpp(), reason="llama-cpp-python is not installed")]

STORY = "The old lighthouse keeper climbed the stairs one last time. At the top, he found"
TOKENS = 16


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--backend", "llama.cpp", "--deterministic")
    yield srv
    assert srv.terminate() == 0, srv.stderr()


def post(srv, path: str, body: dict, status: int = 200) -> httpx.Response:
    r = httpx.post(srv.url + path, json=body, timeout=600)
    assert r.status_code == status, r.text
    return r


def events(r: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]


def webui(srv, **body) -> dict:
    return post(srv, "/v1/completions", {"prompt": STORY, "max_tokens": TOKENS, "do_sample": False,
                                         "ban_eos_token": True, **body}).json()


def webui_streamed(srv, **body) -> str:
    r = post(srv, "/v1/completions", {"prompt": STORY, "max_tokens": TOKENS, "do_sample": False,
                                      "ban_eos_token": True, "stream": True, **body})
    return "".join(json.loads(e)["choices"][0]["text"] for e in events(r) if e != "[DONE]")


def a_phrase_of(text: str) -> str:
    phrase = " " + " ".join(text.split()[3:5])  # two words from the middle of the greedy text
    assert phrase in text
    return phrase


@pytest.mark.parametrize("cfg", [{}, {"guidance_scale": 1.5, "negative_prompt": "A dull, generic story."}])
def test_webui_banned_strings_never_appear_streamed_or_not(server, cfg):
    plain = webui(server, **cfg)["choices"][0]["text"]
    phrase = a_phrase_of(plain)
    done = webui(server, banned_strings=[phrase.upper()], **cfg)
    text = done["choices"][0]["text"]
    assert phrase.lower() not in text.lower() and text != plain
    assert done["usage"]["completion_tokens"] == TOKENS and done["choices"][0]["finish_reason"] == "length"
    assert webui_streamed(server, banned_strings=[phrase.upper()], **cfg) == text


def test_kobold_banned_tokens_strings_are_phrase_bans_streamed_or_not(server):
    body = {"prompt": STORY, "max_length": TOKENS, "top_k": 1, "use_default_badwordsids": True}
    plain = post(server, "/api/v1/generate", body).json()["results"][0]["text"]
    phrase = a_phrase_of(plain)
    body["banned_tokens"] = [phrase.strip().upper(), "zebra"]  # Kobold Lite's entries, as it sends them
    result = post(server, "/api/v1/generate", body).json()["results"][0]
    assert phrase.strip().lower() not in result["text"].lower() and result["text"] != plain
    assert result["completion_tokens"] == TOKENS
    streamed = [json.loads(e) for e in events(post(server, "/api/extra/generate/stream", body))]
    assert "".join(e["token"] for e in streamed) == result["text"]
    # SillyTavern's KoboldCpp type sends them as banned_strings (KoboldCpp reads it without banned_tokens)
    del body["banned_tokens"]
    alias = post(server, "/api/v1/generate", body | {"banned_strings": [phrase.strip().upper()]}).json()
    assert alias["results"][0]["text"] == result["text"]


@pytest.mark.parametrize("path,value", [("/v1/completions", [5]), ("/v1/completions", {"a": 1}),
                                        ("/api/v1/generate", [["nested"]])])
def test_bad_banned_strings_are_a_400_naming_the_field(server, path, value):
    r = post(server, path, {"prompt": STORY, "max_tokens": 2, "max_length": 2, "banned_strings": value}, status=400)
    err = r.json()
    assert (err["error"]["param"] if "error" in err else err["detail"]["field"]) == "banned_strings", err
    assert post(server, "/v1/completions", {"prompt": STORY, "max_tokens": 2}).json()["choices"]  # still serving
